"""`tagstream replay` and `tagstream archive` (SPEC §6): reading the input topics' time
range or archives, feeding the replay (`streams.replay.engine`), and writing the results.

- **Rules as of event time.** The rule book is the live worker's: the `rule_versions`
  changelog (every version ever folded) plus every record still on the rules topic, or the
  rule records of an archive.
- **Isolation.** Topics are read with no consumer group (`offsets_for_times` finds the
  range), so the live group's offsets never move. Reports go to the outbound topic, where
  the sink's delivered-id record stops anything already delivered; or, with `--dry-run`, to
  a file, with a comparison against what was delivered.
- **Erased corps.** A corp whose erasure was requested (a provider-mode corp that cancelled)
  is skipped, record by record, counted as `erased`: its data must not come back.
- Records and archive lines that fail validation go to the dead-letter file with their
  reason and are counted; they never stop the run.
"""
from __future__ import annotations

import asyncio
import base64
import os
import sys
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import IO, Optional

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from schemas.validation import Rejection, RuleTombstone, decode_reporting_rule
from streams.cli.progress import Progress
from streams.kafka.connection import producer_kwargs, start_client
from streams.kafka.reads import partitions_of, read_whole, reader
from streams.core.erasure import fold_requests
from streams.core.rulebook import RuleBook
from streams.core.semantics import ReportingPolicy
from streams.replay.archive import archive_line, open_archive, read_archives
from streams.replay.engine import (
    RULE, SOURCES, TOPIC_SETTING, InputRecord, Output, Replay, ReplaySummary, format_time)
from streams.settings import ConfigError, Settings

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



# -- Kafka: rules, ranges, delivered record ------------------------------------------------------

async def load_rule_book(settings: Settings) -> tuple[RuleBook, int]:
    """The live worker's rules: the rule_versions changelog, then every rules-topic record
    folded on top (a version the worker has not folded yet still counts)."""
    book, records = RuleBook(), 0
    consumer = reader(settings)
    await start_client(consumer)
    try:
        def from_rules_topic(record) -> None:
            nonlocal records
            rule = decode_reporting_rule(record.key, record.value)
            if isinstance(rule, RuleTombstone):
                book.delete(rule.corp_id, rule.tag_id)
            elif not isinstance(rule, Rejection):
                book.add(rule)
                records += 1
        await read_whole(consumer, f"{settings.app_id}-rule_versions-changelog",
                          lambda record: book.apply_changelog(record.key, record.value))
        await read_whole(consumer, settings.topic("tag_mappings_topic"), from_rules_topic)
    finally:
        await consumer.stop()
    return book, records


async def load_erased_corps(settings: Settings) -> dict[str, int]:
    """The corps whose erasure was requested (streams/core/erasure.py): a replay takes none
    of their records, as the live worker refuses them."""
    erased: dict[str, int] = {}
    consumer = reader(settings)
    await start_client(consumer)
    try:
        await read_whole(consumer, settings.topic("wecom_erasures_topic"),
                          lambda record: fold_requests(erased, record.value))
    finally:
        await consumer.stop()
    return erased


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


async def plan_range(consumer: AIOKafkaConsumer, settings: Settings, from_ms: int, to_ms: int,
                     only: Optional[set[int]] = None, known: Optional[dict[str, list[int]]] = None) -> RangePlan:
    """Offsets of [from, to) on both event topics, with offsets_for_times; with `only`, of
    those partition numbers alone (`tagstream explain` reads one customer's). `known` holds
    topics' partition numbers the caller has already asked for."""
    tps = []
    for source in SOURCES:
        topic = settings.topic(TOPIC_SETTING[source])
        numbers = (known or {}).get(topic) or await partitions_of(consumer, topic)
        partitions = [p for p in numbers if only is None or p in only]
        if not partitions:
            if settings.sasl_username:     # Kafka hides a topic the user may not Describe
                raise ConfigError(f"topic {topic} does not exist or user {settings.sasl_username!r} may not "
                                  f"Describe it: check --topic-prefix / TAGSTREAM_TOPIC_PREFIX, or the user's ACLs")
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
                                         f"{tp.topic}/{tp.partition}@{record.offset}", record.timestamp))
        replay.release(tp.partition)
        if isinstance(replay.output, TopicOutput):
            await replay.output.drain()      # keeps memory flat on long replays


async def delivered_state(settings: Settings) -> dict[str, bytes]:
    """outer_action_id -> its state in the sink's delivered record (acked, failed, sending)."""
    state: dict[str, bytes] = {}
    consumer = reader(settings)
    await start_client(consumer)
    try:
        def apply(record) -> None:
            state[record.key.decode()] = record.value
        await read_whole(consumer, settings.topic("delivered_reports_topic"), apply)
    finally:
        await consumer.stop()
    return state


async def first_reports(settings: Settings, ids: set[str]) -> dict[str, dict]:
    """The first report on the outbound topic for each of `ids`: the one the sink delivered
    (later copies of an acknowledged id are skipped by the sink)."""
    found: dict[str, dict] = {}
    consumer = reader(settings)
    await start_client(consumer)
    try:
        def apply(record) -> None:
            oid = record.key.decode() if record.key else None
            if oid in ids and oid not in found:
                found[oid] = orjson.loads(record.value)
        await read_whole(consumer, settings.topic("conversion_reports_topic"), apply)
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
    erased = await load_erased_corps(settings)
    dead_letters = DeadLetterFile(options.dead_letters)
    producer = None
    if options.dry_run:
        output: Output = FileOutput(options.out, dead_letters)
    else:
        producer = AIOKafkaProducer(**producer_kwargs(settings, linger_ms=5))
        await start_client(producer)
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
            replay = Replay(book, policy, output, summary, progress, settings.max_future_skew, erased)
            for (source, partition), batch in sorted(contents.records.items()):
                for record in batch:
                    replay.offer(record)
                replay.source_done(source, partition)
            for partition in sorted(replay.partitions):
                replay.release(partition)
            replay.finish()
        else:
            book, _ = await load_rule_book(settings)
            consumer = reader(settings)
            await start_client(consumer)
            try:
                plan = await plan_range(consumer, settings, options.from_ms, options.to_ms)
                if plan.records == 0:
                    raise plan.empty_error(settings, options.from_ms, options.to_ms)
                progress = Progress(plan.records, "replay")
                replay = Replay(book, policy, output, summary, progress, settings.max_future_skew, erased)
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
    consumer = reader(settings)
    await start_client(consumer)
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
