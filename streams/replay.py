"""Replaying historic tag events (SPEC §6): `tagstream replay` and `tagstream archive`.

A replay folds historic input through the same pure engine as the live worker
(`streams.semantics`), in the same order, with the same rules, so it produces the reports a
live run would have produced for those events:

- **Order.** Per partition, the two event topics are merged by `ts` with the live worker's
  own merge (`streams.merge`, contacts first on ties, each topic's offset order kept). A
  topic partition counts as caught up once it is read to the end of the range, exactly as a
  live worker catching up on a backlog sees it.
- **Rules as of event time.** The rule book is the live worker's: the `rule_versions`
  changelog (every version ever folded) plus every record still on the rules topic, or the
  rule records of an archive.
- **Time.** Holds are released on stream time. At the end of the input every open hold is
  resolved in deadline order (`ReportingEngine.flush`). Wall-clock time only stamps
  `emitted_at`.
- **Isolation.** State lives in memory (`MemoryStore`), never in the worker's tables; topics
  are read with no consumer group, so the live group's offsets never move. Reports go to the
  outbound topic, where the sink's delivered-id record stops anything already delivered;
  or, with `--dry-run`, to a file, with a comparison against what was delivered.

Sources: a time range of the input topics (`--from/--to`, offsets found with
`offsets_for_times`), or NDJSON archives, plain or gzip, as `tagstream archive` writes them:

    {"kind": "tag"|"contact"|"rule", "key": "corp:user", "value": {...}, "partition": 0,
     "offset": 17, "timestamp": 1763800000000}

`partition`, `offset` and `timestamp` are optional (the partition is then the one Kafka's
default partitioner picks for the key); `value_b64` replaces `value` for bytes that are not
JSON. Lines that fail validation go to the dead-letter file with their reason and are
counted; they never stop the run.
"""
from __future__ import annotations

import asyncio
import base64
import gzip
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import IO, Iterable, Optional

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import murmur2

from schemas.validation import (
    Rejection, RuleTombstone, decode_contact_event, decode_reporting_rule, decode_tag_event)
from streams.merge import CoPartitionMerge
from streams.rulebook import RuleBook
from streams.semantics import MemoryStore, ReportingEngine, ReportingPolicy, StepResult
from streams.settings import ConfigError, Settings

CONTACT, TAG, RULE = "contact", "tag", "rule"
SOURCES = (CONTACT, TAG)                  # merge order: contacts first on equal ts
DECODERS = {TAG: decode_tag_event, CONTACT: decode_contact_event}
TOPIC_SETTING = {TAG: "tag_events_topic", CONTACT: "contact_events_topic", RULE: "tag_mappings_topic"}


def parse_time(flag: str, text: str) -> int:
    """An ISO-8601 time (naive means UTC) as epoch milliseconds."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: not an ISO-8601 time; e.g. {flag} 2026-11-01T00:00:00Z "
                          f"or {flag} 2026-11-01T08:00:00+08:00") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp() * 1000)


def format_time(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class InputRecord:
    source: str                 # TAG or CONTACT
    partition: int
    offset: int
    key: Optional[bytes]
    value: Optional[bytes]
    origin: str                 # where it came from, for dead letters: "topic/p@offset" or "file:line"


# -- progress -------------------------------------------------------------------------------

class Progress:
    """A progress bar on stderr: done/total, events/s and ETA. Redrawn in place on a
    terminal; one line every 5 s otherwise (logs, CI)."""

    def __init__(self, total: int, label: str, out: IO[str] = sys.stderr):
        self.total = max(total, 1)
        self.label = label
        self.out = out
        self.done = 0
        self.started = time.monotonic()
        self.shown = 0.0
        self.tty = out.isatty()

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.shown >= (0.25 if self.tty else 5.0):
            self.shown = now
            self._draw(now)

    def _draw(self, now: float, final: bool = False) -> None:
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        share = min(self.done / self.total, 1.0)
        eta = (self.total - self.done) / rate if rate > 0 and not final else 0.0
        bar = "#" * int(share * 30) + "." * (30 - int(share * 30))
        line = (f"{self.label} [{bar}] {share:6.1%} {self.done:,}/{self.total:,} events "
                f"{rate:,.0f} ev/s ETA {eta:,.0f}s")
        self.out.write(("\r" + line) if self.tty else line + "\n")
        if final and self.tty:
            self.out.write("\n")
        self.out.flush()

    def finish(self) -> float:
        """Draw the final line; returns the elapsed seconds."""
        now = time.monotonic()
        self._draw(now, final=True)
        return now - self.started


# -- the replay core (no Kafka) ---------------------------------------------------------------

@dataclass
class ReplaySummary:
    events: int = 0
    outcomes: Counter = field(default_factory=Counter)
    reports: Counter = field(default_factory=Counter)          # "TYPE mode" -> count
    unreportable: Counter = field(default_factory=Counter)
    dead_letters: Counter = field(default_factory=Counter)     # error code -> count
    seconds: float = 0.0
    comparison: Counter = field(default_factory=Counter)       # new / already_delivered / ...

    def as_dict(self) -> dict:
        return {"events": self.events, "seconds": round(self.seconds, 3),
                "events_per_second": round(self.events / self.seconds) if self.seconds else None,
                "outcomes": dict(self.outcomes), "reports": dict(self.reports),
                "unreportable": dict(self.unreportable), "dead_letters": dict(self.dead_letters),
                "comparison": dict(self.comparison)}

    def render(self) -> str:
        lines = [f"replayed {self.events:,} events in {self.seconds:.1f}s "
                 f"({self.events / max(self.seconds, 1e-9):,.0f} events/s)"]
        lines.append("  reports      " + (", ".join(f"{k} {v:,}" for k, v in sorted(self.reports.items())) or "none"))
        lines.append("  unreportable " + (", ".join(f"{k} {v:,}" for k, v in sorted(self.unreportable.items())) or "none"))
        lines.append("  outcomes     " + ", ".join(f"{k} {v:,}" for k, v in sorted(self.outcomes.items())))
        lines.append("  dead letters " + (", ".join(f"{k} {v:,}" for k, v in sorted(self.dead_letters.items())) or "none"))
        if self.comparison:
            lines.append("  against what was delivered: "
                         + ", ".join(f"{k} {v:,}" for k, v in sorted(self.comparison.items())))
        return "\n".join(lines)


class Output:
    """Where a replay's results go (a topic, or files for --dry-run)."""
    def report(self, wire: dict) -> None: ...
    def unreportable(self, wire: dict) -> None: ...
    def dead_letter(self, record: InputRecord, rejection: Rejection) -> None: ...


class Replay:
    """Input records in, results out, exactly as the live agent applies them."""

    def __init__(self, book: RuleBook, policy: ReportingPolicy, output: Output, summary: ReplaySummary,
                 progress: Optional[Progress] = None):
        self.engine = ReportingEngine(MemoryStore(), book.rule_as_of, policy)
        self.merge: CoPartitionMerge = CoPartitionMerge(SOURCES, max_wait_ms=0, max_buffered=sys.maxsize)
        self.done: set[tuple[str, int]] = set()
        self.partitions: set[int] = set()
        self.output = output
        self.summary = summary
        self.progress = progress

    def offer(self, record: InputRecord) -> None:
        self.partitions.add(record.partition)
        decoded = DECODERS[record.source](record.key, record.value)
        if isinstance(decoded, Rejection):
            self.summary.dead_letters[decoded.error] += 1
            self.summary.outcomes["dead_lettered"] += 1
            self.output.dead_letter(record, decoded)
            self._advance()
            return
        self.merge.offer(record.partition, record.source, decoded.ts, decoded, 0)

    def source_done(self, source: str, partition: int) -> None:
        self.done.add((source, partition))
        self.partitions.add(partition)

    def release(self, partition: int) -> None:
        # a replay reads finished logs: a source is caught up once read to its end, and until
        # then records are known to be waiting (never "unknown")
        caught_up = lambda source, since: (source, partition) in self.done   # noqa: E731
        for event in self.merge.release(partition, caught_up, lambda: 0):
            result = self.engine.on_event(partition, event, _now_ms())
            self.summary.outcomes[result.outcome] += 1
            self._emit(result)
            self._advance()

    def finish(self) -> ReplaySummary:
        """End of input: every source is done; apply what is buffered, then resolve every
        open hold in deadline order."""
        for partition in sorted(self.partitions):
            for source in SOURCES:
                self.done.add((source, partition))
            self.release(partition)
        for partition in sorted(self.partitions):
            self._emit(self.engine.flush(partition, _now_ms()))
        return self.summary

    def _emit(self, result: StepResult) -> None:
        for report in result.reports:
            self.summary.reports[f"{report.standard_type} {report.mode}"] += 1
            self.output.report(report.as_wire())
        for report in result.unreportable:
            self.summary.unreportable[f"{report.standard_type} {report.reason}"] += 1
            self.output.unreportable(report.as_wire())

    def _advance(self) -> None:
        self.summary.events += 1
        if self.progress:
            self.progress.advance()


def _now_ms() -> int:
    return int(time.time() * 1000)


# -- archives (NDJSON files) -------------------------------------------------------------------

def open_archive(path: str, mode: str = "rb") -> IO[bytes]:
    try:
        if path.endswith(".gz"):
            handle = gzip.open(path, mode)
            if "r" in mode:
                handle.peek(1)          # fail now, with a clear message, if it is not gzip
            return handle
        return open(path, mode)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, EOFError) as exc:
        raise ConfigError(f"{path}: cannot read it as {'gzip' if path.endswith('.gz') else 'NDJSON'} ({exc})") from None


def archive_line(kind: str, key: Optional[bytes], value: Optional[bytes], partition: int, offset: int,
                 timestamp: int) -> bytes:
    line = {"kind": kind, "key": None if key is None else key.decode("utf-8", "replace"),
            "partition": partition, "offset": offset, "timestamp": timestamp}
    try:
        line["value"] = None if value is None else orjson.loads(value)
    except orjson.JSONDecodeError:
        line["value_b64"] = base64.b64encode(value).decode()
    return orjson.dumps(line) + b"\n"


@dataclass
class ArchiveContents:
    book: RuleBook
    rules: int
    records: dict                    # (source, partition) -> [InputRecord] in offset order
    bad_lines: list                  # (origin, reason, raw line)


def read_archives(paths: Iterable[str], partitions: int, from_ms: Optional[int], to_ms: Optional[int]) -> ArchiveContents:
    """Every valid line of the archives; bad lines are returned, not raised."""
    book, rules = RuleBook(), 0
    records: dict[tuple[str, int], list] = {}
    bad: list = []
    sequence = 0
    for path in paths:
        with open_archive(path) as handle:
            for number, raw in enumerate(handle, 1):
                origin = f"{os.path.basename(path)}:{number}"
                if not raw.strip():
                    continue
                try:
                    line = orjson.loads(raw)
                except orjson.JSONDecodeError as exc:
                    bad.append((origin, f"not JSON: {exc}", raw))
                    continue
                problem = _line_problem(line)
                if problem:
                    bad.append((origin, problem, raw))
                    continue
                key = None if line.get("key") is None else line["key"].encode()
                value = (base64.b64decode(line["value_b64"]) if "value_b64" in line
                         else None if line.get("value") is None else orjson.dumps(line["value"]))
                if line["kind"] == RULE:
                    rule = decode_reporting_rule(key, value)
                    if isinstance(rule, Rejection):
                        bad.append((origin, f"{rule.error}: {rule.detail}", raw))
                    elif isinstance(rule, RuleTombstone):
                        book.delete(rule.corp_id, rule.tag_id)
                    else:
                        book.add(rule)
                        rules += 1
                    continue
                timestamp = line.get("timestamp")
                if timestamp is not None and ((from_ms is not None and timestamp < from_ms)
                                              or (to_ms is not None and timestamp >= to_ms)):
                    continue
                partition = line.get("partition")
                if partition is None:
                    partition = (murmur2(key) & 0x7FFFFFFF) % partitions if key else 0
                sequence += 1
                offset = line.get("offset", sequence)
                records.setdefault((line["kind"], partition), []).append(
                    InputRecord(line["kind"], partition, offset, key, value, origin))
    for batch in records.values():
        batch.sort(key=lambda r: r.offset)
    return ArchiveContents(book, rules, records, bad)


def _line_problem(line) -> Optional[str]:
    if not isinstance(line, dict):
        return "not a JSON object"
    if line.get("kind") not in (TAG, CONTACT, RULE):
        return f"kind: expected tag, contact or rule, got {line.get('kind')!r}"
    if line.get("key") is not None and not isinstance(line["key"], str):
        return "key: expected a string"
    for name in ("partition", "offset", "timestamp"):
        if line.get(name) is not None and (not isinstance(line[name], int) or isinstance(line[name], bool)
                                           or line[name] < 0):
            return f"{name}: expected a non-negative integer"
    if "value_b64" in line:
        try:
            base64.b64decode(line["value_b64"], validate=True)
        except (ValueError, TypeError):
            return "value_b64: not base64"
    elif "value" not in line:
        return "value: missing (use null for a tombstone)"
    return None


# -- Kafka: rules, ranges, delivered record ------------------------------------------------------

def _consumer(settings: Settings) -> AIOKafkaConsumer:
    # No group: a replay never moves the live group's offsets.
    return AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, group_id=None,
                            enable_auto_commit=False, isolation_level="read_committed",
                            max_partition_fetch_bytes=4 * 1024 * 1024)


async def partitions_of(consumer: AIOKafkaConsumer, topic: str) -> list[int]:
    """The topic's partition numbers (empty if it does not exist), from fresh metadata."""
    cluster = await consumer._client.fetch_all_metadata()        # noqa: SLF001 (no public call returns it)
    return sorted(cluster.partitions_for_topic(topic) or ())


async def _read_whole(consumer: AIOKafkaConsumer, topic: str, on_record) -> None:
    """Every record of `topic` from its start to its current end."""
    tps = [TopicPartition(topic, p) for p in await partitions_of(consumer, topic)]
    if not tps:
        return
    ends = await consumer.end_offsets(tps)
    todo = {tp for tp in tps if ends[tp] > 0}
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    while todo:
        batches = await consumer.getmany(*todo, timeout_ms=500, max_records=10_000)
        for tp, batch in batches.items():
            for record in batch:
                on_record(record)
        for tp in list(todo):
            if await consumer.position(tp) >= ends[tp]:
                todo.discard(tp)


async def load_rule_book(settings: Settings) -> tuple[RuleBook, int]:
    """The live worker's rules: the rule_versions changelog, then every rules-topic record
    folded on top (a version the worker has not folded yet still counts)."""
    book, records = RuleBook(), 0
    consumer = _consumer(settings)
    await consumer.start()
    try:
        def from_rules_topic(record) -> None:
            nonlocal records
            rule = decode_reporting_rule(record.key, record.value)
            if isinstance(rule, RuleTombstone):
                book.delete(rule.corp_id, rule.tag_id)
            elif not isinstance(rule, Rejection):
                book.add(rule)
                records += 1
        await _read_whole(consumer, f"{settings.app_id}-rule_versions-changelog",
                          lambda record: book.apply_changelog(record.key, record.value))
        await _read_whole(consumer, settings.topic("tag_mappings_topic"), from_rules_topic)
    finally:
        await consumer.stop()
    return book, records


@dataclass
class RangePlan:
    start: dict          # TopicPartition -> first offset in the range
    end: dict            # TopicPartition -> first offset after the range
    span: tuple          # (earliest, latest) record timestamp on the topics, for messages

    @property
    def records(self) -> int:
        return sum(self.end[tp] - self.start[tp] for tp in self.start)

    def empty_error(self, settings: Settings, from_ms: int, to_ms: int) -> ConfigError:
        earliest, latest = self.span
        span = (f"the topics hold records from {format_time(earliest)} to {format_time(latest)}"
                if earliest is not None and latest is not None else "the topics are empty")
        return ConfigError(f"no records between {format_time(from_ms)} and {format_time(to_ms)} on "
                           f"{settings.topic('tag_events_topic')} or {settings.topic('contact_events_topic')}; {span}")


async def plan_range(consumer: AIOKafkaConsumer, settings: Settings, from_ms: int, to_ms: int) -> RangePlan:
    """Offsets of [from, to) on both event topics, with offsets_for_times."""
    tps = []
    for source in SOURCES:
        topic = settings.topic(TOPIC_SETTING[source])
        partitions = await partitions_of(consumer, topic)
        if not partitions:
            raise ConfigError(f"topic {topic} does not exist; nothing to replay (check --topic-prefix / TAGSTREAM_TOPIC_PREFIX)")
        tps += [TopicPartition(topic, p) for p in partitions]
    beginnings = await consumer.beginning_offsets(tps)
    ends = await consumer.end_offsets(tps)
    at_from = await consumer.offsets_for_times({tp: from_ms for tp in tps})
    at_to = await consumer.offsets_for_times({tp: to_ms for tp in tps})
    start = {tp: at_from[tp].offset if at_from[tp] else ends[tp] for tp in tps}
    end = {tp: max(start[tp], at_to[tp].offset if at_to[tp] else ends[tp]) for tp in tps}
    first = await consumer.offsets_for_times({tp: 0 for tp in tps})
    earliest = min((o.timestamp for o in first.values() if o), default=None)
    latest = None
    if any(ends[tp] > beginnings[tp] for tp in tps):
        latest = max((o.timestamp for o in (await consumer.offsets_for_times(
            {tp: 2 ** 62 for tp in tps})).values() if o), default=None)
    return RangePlan(start, end, (earliest, latest))


async def read_range(consumer: AIOKafkaConsumer, plan: RangePlan, from_ms: int, to_ms: int):
    """Yield (tp, records with a timestamp in [from, to)) for the planned offsets, and
    (tp, None) once a partition is read to the end of the range."""
    todo = {tp for tp in plan.start if plan.end[tp] > plan.start[tp]}
    for tp in plan.start:
        if tp not in todo:
            yield tp, None
    consumer.assign(list(plan.start))
    for tp in todo:
        consumer.seek(tp, plan.start[tp])
    while todo:
        batches = await consumer.getmany(*todo, timeout_ms=500, max_records=20_000)
        for tp, records in batches.items():
            yield tp, [r for r in records if r.offset < plan.end[tp] and from_ms <= r.timestamp < to_ms]
        for tp in list(todo):
            if await consumer.position(tp) >= plan.end[tp]:
                todo.discard(tp)
                yield tp, None


async def replay_topics(settings: Settings, replay: Replay, plan: RangePlan, consumer: AIOKafkaConsumer,
                        from_ms: int, to_ms: int) -> None:
    """Stream the range through the replay, releasing each partition as it goes."""
    source_of = {settings.topic(TOPIC_SETTING[s]): s for s in SOURCES}
    async for tp, records in read_range(consumer, plan, from_ms, to_ms):
        source = source_of[tp.topic]
        if records is None:
            replay.source_done(source, tp.partition)
        else:
            for record in records:
                replay.offer(InputRecord(source, tp.partition, record.offset, record.key, record.value,
                                         f"{tp.topic}/{tp.partition}@{record.offset}"))
        replay.release(tp.partition)
        if isinstance(replay.output, TopicOutput):
            await replay.output.drain()      # keeps memory flat on long replays


async def delivered_state(settings: Settings) -> dict[str, bytes]:
    """outer_action_id -> its state in the sink's delivered record (acked, failed, sending)."""
    state: dict[str, bytes] = {}
    consumer = _consumer(settings)
    await consumer.start()
    try:
        def apply(record) -> None:
            state[record.key.decode()] = record.value
        await _read_whole(consumer, settings.topic("delivered_reports_topic"), apply)
    finally:
        await consumer.stop()
    return state


async def first_reports(settings: Settings, ids: set[str]) -> dict[str, dict]:
    """The first report on the outbound topic for each of `ids`: the one the sink delivered
    (later copies of an acknowledged id are skipped by the sink)."""
    found: dict[str, dict] = {}
    consumer = _consumer(settings)
    await consumer.start()
    try:
        def apply(record) -> None:
            oid = record.key.decode() if record.key else None
            if oid in ids and oid not in found:
                found[oid] = orjson.loads(record.value)
        await _read_whole(consumer, settings.topic("conversion_reports_topic"), apply)
    finally:
        await consumer.stop()
    return found


def compare(replayed: list[dict], delivered: dict[str, bytes], sent: dict[str, dict]) -> tuple[Counter, list[dict]]:
    """Classify replayed reports against the delivered record: new, already_delivered,
    would_change (delivered with different content: the sink will not send the new one),
    previously_failed. Returns the counts and the would_change details."""
    counts: Counter = Counter()
    changes = []
    for report in replayed:
        oid = report["outer_action_id"]
        state = delivered.get(oid)
        if state == b"acked":
            before = sent.get(oid)
            differing = sorted(k for k in set(report) | set(before or {})
                               if k != "emitted_at" and (before or {}).get(k) != report.get(k))
            if before is not None and differing:
                counts["would_change"] += 1
                changes.append({"outer_action_id": oid, "fields": differing,
                                "delivered": before, "replayed": report})
            else:
                counts["already_delivered"] += 1
        elif state == b"failed":
            counts["previously_failed"] += 1
        else:
            counts["new"] += 1
    return counts, changes


# -- outputs -----------------------------------------------------------------------------------

class DeadLetterFile:
    def __init__(self, path: str):
        self.path = path
        self.handle: Optional[IO[bytes]] = None

    def write(self, origin: str, error: str, detail: str, raw: Optional[bytes]) -> None:
        if self.handle is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self.handle = open(self.path, "wb")
        self.handle.write(orjson.dumps({"origin": origin, "error": error, "detail": detail,
                                        "value_b64": None if raw is None else base64.b64encode(raw).decode()}) + b"\n")

    def close(self) -> None:
        if self.handle:
            self.handle.close()


class FileOutput(Output):
    """--dry-run: reports and unreportable reports to NDJSON files."""

    def __init__(self, reports_path: str, dead_letters: DeadLetterFile):
        os.makedirs(os.path.dirname(os.path.abspath(reports_path)), exist_ok=True)
        self.reports_path = reports_path
        self.unreportable_path = _sibling(reports_path, "unreportable")
        self.reports = open(reports_path, "wb")
        self.unreportables = open(self.unreportable_path, "wb")
        self.dead_letters = dead_letters
        self.replayed: list[dict] = []

    def report(self, wire: dict) -> None:
        self.replayed.append(wire)
        self.reports.write(orjson.dumps(wire) + b"\n")

    def unreportable(self, wire: dict) -> None:
        self.unreportables.write(orjson.dumps(wire) + b"\n")

    def dead_letter(self, record: InputRecord, rejection: Rejection) -> None:
        self.dead_letters.write(record.origin, rejection.error, rejection.detail, record.value)

    def close(self) -> None:
        self.reports.close()
        self.unreportables.close()


class TopicOutput(Output):
    """Reports to the outbound topic (the sink skips ids already delivered) and unreportable
    reports to theirs, as the live worker sends them; keyed by outer_action_id."""

    def __init__(self, settings: Settings, producer: AIOKafkaProducer, dead_letters: DeadLetterFile):
        self.producer = producer
        self.reports_topic = settings.topic("conversion_reports_topic")
        self.unreportable_topic = settings.topic("unreportable_topic")
        self.dead_letters = dead_letters
        self.pending: list = []
        self.replayed: list[dict] = []

    def report(self, wire: dict) -> None:
        self.replayed.append(wire)
        self.pending.append((self.reports_topic, wire))

    def unreportable(self, wire: dict) -> None:
        self.pending.append((self.unreportable_topic, wire))

    def dead_letter(self, record: InputRecord, rejection: Rejection) -> None:
        self.dead_letters.write(record.origin, rejection.error, rejection.detail, record.value)

    async def drain(self) -> None:
        """Send what is pending and wait until the broker has it all."""
        pending, self.pending = self.pending, []
        futures = [await self.producer.send(topic, key=wire["outer_action_id"].encode(), value=orjson.dumps(wire))
                   for topic, wire in pending]
        if futures:
            await asyncio.gather(*futures)


def _sibling(path: str, name: str) -> str:
    base, ext = os.path.splitext(path)
    return f"{base}.{name}{ext or '.ndjson'}"


# -- the commands ------------------------------------------------------------------------------

@dataclass
class ReplayOptions:
    from_ms: Optional[int]
    to_ms: Optional[int]
    files: list[str]
    dry_run: bool
    out: str
    dead_letters: str
    summary_json: Optional[str]


async def run_replay(settings: Settings, options: ReplayOptions) -> ReplaySummary:
    policy = ReportingPolicy.from_settings(settings)
    summary = ReplaySummary()
    dead_letters = DeadLetterFile(options.dead_letters)
    producer = None
    if options.dry_run:
        output: Output = FileOutput(options.out, dead_letters)
    else:
        producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all",
                                    enable_idempotence=True, linger_ms=5)
        await producer.start()
        output = TopicOutput(settings, producer, dead_letters)
    try:
        if options.files:
            contents = read_archives(options.files, settings.partitions, options.from_ms, options.to_ms)
            for origin, reason, raw in contents.bad_lines:
                dead_letters.write(origin, "bad_archive_line", reason, raw)
                summary.dead_letters["bad_archive_line"] += 1
            book, rules = contents.book, contents.rules
            if rules == 0:
                book, rules = await load_rule_book(settings)
                print(f"replay: the archives hold no rules; using the {rules} rule records on the topics",
                      file=sys.stderr)
            total = sum(len(batch) for batch in contents.records.values())
            if total == 0:
                raise ConfigError("the archives hold no tag or contact records"
                                  + (" in the --from/--to range" if options.from_ms or options.to_ms else "")
                                  + f" ({len(contents.bad_lines)} bad lines, see {options.dead_letters})")
            progress = Progress(total, "replay")
            replay = Replay(book, policy, output, summary, progress)
            for (source, partition), batch in sorted(contents.records.items()):
                for record in batch:
                    replay.offer(record)
                replay.source_done(source, partition)
            for partition in sorted(replay.partitions):
                replay.release(partition)
            replay.finish()
        else:
            book, _ = await load_rule_book(settings)
            consumer = _consumer(settings)
            await consumer.start()
            try:
                plan = await plan_range(consumer, settings, options.from_ms, options.to_ms)
                if plan.records == 0:
                    raise plan.empty_error(settings, options.from_ms, options.to_ms)
                progress = Progress(plan.records, "replay")
                replay = Replay(book, policy, output, summary, progress)
                await replay_topics(settings, replay, plan, consumer, options.from_ms, options.to_ms)
                replay.finish()
            finally:
                await consumer.stop()
        if isinstance(output, TopicOutput):
            await output.drain()
        summary.seconds = progress.finish()
        delivered = await delivered_state(settings)
        if options.dry_run:
            sent = await first_reports(settings, {r["outer_action_id"] for r in output.replayed
                                                  if delivered.get(r["outer_action_id"]) == b"acked"})
            summary.comparison, changes = compare(output.replayed, delivered, sent)
            if changes:
                with open(_sibling(options.out, "changes"), "wb") as f:
                    for change in changes:
                        f.write(orjson.dumps(change) + b"\n")
        else:
            acked = sum(1 for r in output.replayed if delivered.get(r["outer_action_id"]) == b"acked")
            summary.comparison = Counter({"sent_to_topic": len(output.replayed), "sink_will_skip_as_delivered": acked})
    finally:
        if isinstance(output, FileOutput):
            output.close()
        dead_letters.close()
        if producer:
            await producer.stop()
    if options.summary_json:
        with open(options.summary_json, "wb") as f:
            f.write(orjson.dumps(summary.as_dict(), option=orjson.OPT_INDENT_2))
    return summary


async def run_archive(settings: Settings, from_ms: int, to_ms: int, out: str) -> dict:
    """Write the rule book and the event topics' records in [from, to) to an NDJSON archive."""
    book_records = []
    consumer = _consumer(settings)
    await consumer.start()
    counts: Counter = Counter()
    try:
        plan = await plan_range(consumer, settings, from_ms, to_ms)
        if plan.records == 0:
            raise plan.empty_error(settings, from_ms, to_ms)
        book, _ = await load_rule_book(settings)
        for rule in book.all_rules():
            book_records.append(archive_line(RULE, f"{rule.corp_id}:{rule.tag_id}".encode(),
                                             orjson.dumps(rule.as_wire()), 0, 0, 0))
        progress = Progress(plan.records, "archive")
        source_of = {settings.topic(TOPIC_SETTING[s]): s for s in SOURCES}
        with open_archive(out, "wb") as handle:
            for line in book_records:
                handle.write(line)
            counts["rule"] = len(book_records)
            async for tp, records in read_range(consumer, plan, from_ms, to_ms):
                for record in records or ():
                    handle.write(archive_line(source_of[tp.topic], record.key, record.value, tp.partition,
                                              record.offset, record.timestamp))
                    counts[source_of[tp.topic]] += 1
                progress.advance(len(records or ()))
        progress.finish()
    finally:
        await consumer.stop()
    return dict(counts)
