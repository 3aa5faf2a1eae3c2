"""The reporting sink: delivers conversion reports from the outbound topic to a target.

Targets:
- `api`: the Marketing API `user_actions/add` (SPEC §5), once per `outer_action_id`;
- `file:PATH` (NDJSON, one report per line) and `stdout`: the embedded default and dry runs.

How `api` delivers each report once. The sink works in rounds: read up to `sink_round`
reports (waiting at most `sink_linger` for them), drop those already delivered, deliver
the rest, and commit the round's offsets only when every report in it is acknowledged by
the API, dead-lettered to `report-failures`, or *parked* (below). So a crash re-reads,
never skips.

The record of what was delivered is the compacted topic `delivered-reports`, keyed by
`outer_action_id`, written to the same partition number as the report it covers (so the
sink owning report partition N reads exactly record partition N, whatever the partitioner).
Each id moves through `sending` (written before the request) to `acked` or `failed`
(written after the answer, before the commit). On (re)assignment the sink reads its
partitions of the record from the start: `acked` ids are never sent again (after a crash,
a rebalance or a replay); `sending` ids are *in doubt* (the sink died while the request was
out) and are sent again, counted in `tagstream_sink_reports_total{outcome="in_doubt_resent"}`.
No protocol can close that last window without the API's help: the API documents
`outer_action_id` as its own dedupe key, which makes an in-doubt resend harmless there.

Non-blocking retries (SPEC §5: one stuck account must not hold back the others). A request
that keeps getting retryable answers is retried within its round for at most
`sink_retry_budget`; then its reports are parked and the round commits past them:

1. park: each report is copied, as it is, to the retry topic (`conversion-reports-retry`,
   the same partition number), with headers (`streams.sinks.parking.RetryEnvelope`): the
   attempt, the original record timestamp and a not-before time `sink_retry_delay` on;
2. record: once the broker has the copy, the id becomes `parked:<copy offset>:<timestamp>`
   in the record. The record names the one *live* copy; any other copy is stale;
3. commit past the report on conversion-reports.

The account's breaker opens (`AccountBreaker`): its next reports are parked at once,
without a request, until the API answers it again. A report read on conversion-reports
whose id is parked is skipped (the re-read after a crash between 2 and 3, or a replay).

The retry loop runs beside the rounds, on the same consumer (the range assignor gives it
partition N of both topics) and the same record. With one fixed delay the copies of a
partition are due in the order they were written: at the first copy not due yet it rewinds
and pauses the partition until then. For each due copy: skip it unless the record names it
(counted `stale_retry_copy`); otherwise mark it `retrying:<offset>:<timestamp>` (the
retry's "sending") and send it, one request per batch, no in-round retries, at most one
request per `sink_retry_delay` for an account that was refused. Delivered: `acked`;
rejected for good: `report-failures` and `failed`; refused again: parked again as a new
copy with attempt + 1 (`reparked`). Then the loop commits past the copies.

Why once-only holds, crash by crash: a SIGKILL after a copy is written but before it is
named leaves the id `sending` and the report uncommitted: the rounds re-read it and send
it (in doubt) or park a second copy and name that one; the unnamed copy is stale. A kill
after naming but before the commit: the re-read finds `parked` and skips. A kill in the
retry loop leaves the live copy uncommitted: it is read again, and if it was `retrying`,
sent again in doubt, like `sending`. So a report goes to the API twice only in the
documented in-doubt window, and the retry topic never loses one: the copy is on the broker
before the report's offset moves. `tagstream_sink_oldest_unacknowledged_report_age_seconds`
counts parked reports by their original timestamp, so a stuck account shows as age.

What the sink reads is validated like the worker's input (`decode_conversion_report`): any
producer can write to the outbound topic (`tagstream replay` does, and so can an operator),
and one bad record must not stop delivery. A record that is not a report (garbage bytes, a
tombstone, JSON that is not a report, a report under another key) goes to `report-failures`
in the dead-letter format (SPEC §3.5: the reason, where it came from, its bytes), is
counted (`tagstream_sink_reports_total{outcome="invalid"}`), and the offsets move past it,
for every target.

Why the record stays bounded: compaction keeps one record per `outer_action_id`, and an id
is the hash of (corp, customer, standard type), so there are at most six per customer:
the same order as the worker's own per-customer state. In memory the sink holds only the
ids of the partitions assigned to it. The retry topic holds only what is parked:
a copy is written once per attempt, one per report and `sink_retry_delay`, and expires
with the topic's retention.

Erasure of a corp that left (streams/core/erasure.py). Every record write carries the
SHA-256 of the report's corp id in a header (`tagstream.corp`), since an id is itself a hash.
The sink follows the erasure requests: from then on it sends nothing of the corp (counted
`erased`) and writes nothing of it to the record, and before its next round it reads its
partitions of the record again and tombstones every id last written for the corp, with an
audit record per partition. A partition loaded later is rid of erased corps as it loads.
The file and stdout targets keep no record, and erase nothing.
"""
from __future__ import annotations

import asyncio
import logging
import os
import random
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import IO, Optional

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import CommitFailedError, IllegalStateError

from schemas.validation import Rejection, decode_conversion_report
from streams.core.erasure import audit_record, corp_hash
from streams.kafka.admin import partition_counts
from streams.kafka.connection import client_kwargs, producer_kwargs, start_client
from streams.kafka.reads import read_to_end
from streams.kafka.replica import ErasureRequests
from streams.observability import metrics
from streams.sinks.marketing_api import (
    Batch, MarketingApiClient, Outcome, RateLimiter, classify, pack, token_from_settings)
from streams.sinks.parking import (
    ACKED, FAILED, SENDING, AccountBreaker, Parked, RetryEnvelope, State, is_live_copy, parse_state)
from streams.settings import ConfigError, Settings
from streams.state.failpoints import failpoint

log = logging.getLogger(__name__)


def open_target(target: str) -> IO[bytes]:
    if target == "stdout":
        return sys.stdout.buffer
    if target.startswith("file:") and len(target) > 5:
        path = target[5:]
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return open(path, "ab")
    raise ConfigError(f"--target {target!r}: use api, file:PATH (NDJSON) or stdout")


def _sink_consumer(settings: Settings, topics: list[str],
                   listener: Optional[ConsumerRebalanceListener] = None) -> AIOKafkaConsumer:
    """The sink group's consumer. The range assignor gives each member the same partition
    numbers of every topic with the same partition count, so the sink owning partition N of
    conversion-reports also owns partition N of the retry topic (the default round-robin
    assignor does not)."""
    consumer = AIOKafkaConsumer(
        **client_kwargs(settings), group_id=f"{settings.app_id}-sink",
        enable_auto_commit=False, auto_offset_reset="earliest", isolation_level="read_committed",
        partition_assignment_strategy=(RangePartitionAssignor,),
        session_timeout_ms=settings.session_timeout, heartbeat_interval_ms=max(settings.session_timeout // 3, 500))
    consumer.subscribe(topics, listener=listener)
    return consumer


def _producer(settings: Settings) -> AIOKafkaProducer:
    return AIOKafkaProducer(**producer_kwargs(settings, linger_ms=2))


def split_reports(batches: dict) -> tuple[list, list]:
    """A round's records: ([(tp, record, report)], [(tp, record, why it is not a report)])."""
    reports, invalid = [], []
    for tp, records in batches.items():
        for record in records:
            decoded = decode_conversion_report(record.key, record.value)
            if isinstance(decoded, Rejection):
                invalid.append((tp, record, decoded))
            else:
                reports.append((tp, record, decoded))
    return reports, invalid


async def park_invalid(producer: AIOKafkaProducer, settings: Settings, invalid: list) -> None:
    """Records of the outbound topic that are not reports, to `report-failures` in the
    dead-letter format, acknowledged before the round's offsets are committed."""
    if not invalid:
        return
    topic, at = settings.topic("report_failures_topic"), int(time.time() * 1000)
    futures = []
    for tp, record, rejection in invalid:
        letter = rejection.dead_letter(topic=tp.topic, partition=tp.partition, offset=record.offset,
                                       key=record.key, value=record.value, at=at)
        futures.append(await producer.send(topic, key=record.key, value=orjson.dumps(letter.as_wire())))
    await asyncio.gather(*futures)
    metrics.SINK_REPORTS.labels("invalid").inc(len(invalid))
    codes = sorted({rejection.error for _, _, rejection in invalid})
    log.warning("%d records of the outbound topic are not reports (%s); parked on %s", len(invalid),
                ", ".join(codes), topic)


async def run_file_sink(settings: Settings, target: str, stop: asyncio.Event) -> int:
    """Copy reports to the target until `stop` is set; returns how many were written."""
    out = open_target(target)
    producer = _producer(settings)
    await start_client(producer)
    consumer = _sink_consumer(settings, [settings.topic("conversion_reports_topic")])
    await start_client(consumer)
    written = 0
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=200, max_records=2000)
            if not batches:
                continue
            reports, invalid = split_reports(batches)
            for _, record, _ in reports:
                out.write(record.value + b"\n")           # as it is on the topic
            written += len(reports)
            out.flush()
            if out is not sys.stdout.buffer:
                # Durable before the offsets move: a crash here re-writes, never loses.
                await asyncio.get_running_loop().run_in_executor(None, os.fsync, out.fileno())
            await park_invalid(producer, settings, invalid)
            await consumer.commit()
    finally:
        await consumer.stop()
        await producer.stop()
        if out is not sys.stdout.buffer:
            out.close()
    return written


# -- the Marketing API target ------------------------------------------------------------

#: The delivered record's header naming the corp of an id: the SHA-256 of its corp id (an
#: id is a hash too, so without it a corp that leaves could not be found to be erased).
CORP_HEADER = "tagstream.corp"


class DeliveredRecord:
    """The sink's durable record of delivered ids, for its assigned partitions: per id the
    last state written (acked, sending, failed, or parked with its live retry copy)."""

    def __init__(self, settings: Settings, producer: AIOKafkaProducer, erasures: Optional[ErasureRequests] = None):
        self.settings = settings
        self.topic = settings.topic("delivered_reports_topic")
        self.producer = producer
        self.erasures = erasures
        self.erased_version = 0
        self.write_lock = asyncio.Lock()       # writes wait while an erasure runs
        # per partition number; a partition is loaded iff it is a key of `acked`
        self.acked: dict[int, set[str]] = {}
        self.sending: dict[int, set[str]] = {}
        self.parked: dict[int, dict[str, Parked]] = {}
        self.loading = asyncio.Lock()

    def forget(self, partitions) -> None:
        for p in partitions:
            self.acked.pop(p, None)
            self.sending.pop(p, None)
            self.parked.pop(p, None)
        self._gauge()

    async def ensure_loaded(self, partitions) -> None:
        """Load the partitions not loaded yet. aiokafka may hand out records of a new
        assignment while the rebalance listener is still loading, so the sink calls this too."""
        async with self.loading:
            missing = sorted(p for p in partitions if p not in self.acked)
            if missing:
                await self._load(missing)

    async def _read(self, partitions: list[int]) -> dict[int, dict[str, tuple[Optional[bytes], Optional[bytes]]]]:
        """The record's partitions from the start to their current end: per id, the newest
        value and the corp header (the hash of its corp id) it was written with."""
        reader = AIOKafkaConsumer(**client_kwargs(self.settings), group_id=None,
                                  enable_auto_commit=False, isolation_level="read_committed")
        await start_client(reader)
        values: dict[int, dict[str, tuple]] = {p: {} for p in partitions}

        def keep(record) -> None:         # the newest state of each order id
            corp = next((v for k, v in record.headers or () if k == CORP_HEADER), None)
            values[record.partition][record.key.decode()] = (record.value, corp)
        try:
            await read_to_end(reader, [TopicPartition(self.topic, p) for p in partitions], keep, max_records=50_000)
        finally:
            await reader.stop()
        return values

    async def _load(self, partitions: list[int]) -> None:
        """Read the record's partitions, and erase from them the corps erased meanwhile."""
        values = await self._read(partitions)
        for p, ids in values.items():
            self.acked[p], self.sending[p], self.parked[p] = set(), set(), {}
            for oid, (value, _) in ids.items():
                self._apply(p, oid, parse_state(value))
        self._gauge()
        retrying = sum(1 for p in partitions for state in self.parked[p].values() if state.retrying)
        # "<n> in doubt" ends the line: the sink tests and the chaos harness add these up
        log.info("delivered record: partitions %s loaded, %d ids acknowledged, %d parked, %d in doubt", partitions,
                 sum(len(self.acked[p]) for p in partitions), sum(len(self.parked[p]) for p in partitions),
                 sum(len(self.sending[p]) for p in partitions) + retrying)
        if self.erasures is not None and self.erasures.erased:
            async with self.write_lock:
                await self._erase(values, dict(self.erasures.erased))

    # -- erasure (streams/core/erasure.py) ---------------------------------------------------
    def erasure_due(self) -> bool:
        return self.erasures is not None and self.erasures.version != self.erased_version

    async def erase_requested(self) -> None:
        """Erase the newly requested corps from the loaded partitions: read them again, and
        tombstone every id whose newest value was written for one of those corps."""
        version = self.erasures.version
        async with self.write_lock:
            partitions = sorted(self.acked)
            await self._erase(await self._read(partitions) if partitions else {}, dict(self.erasures.erased))
        self.erased_version = version
        self.erasures.applied(version)

    async def _erase(self, values: dict, erased: dict[str, int]) -> None:
        by_hash = {corp_hash(corp).encode(): corp for corp in erased}
        futures, now = [], int(time.time() * 1000)
        for p, ids in values.items():
            doomed = [(oid, by_hash[corp]) for oid, (value, corp) in ids.items()
                      if value is not None and corp in by_hash]
            for oid, _ in doomed:
                futures.append(await self.producer.send(self.topic, key=oid.encode(), value=None, partition=p))
                self._apply(p, oid, None)
            if doomed:
                failpoint("delivered-erased")
            for corp, count in Counter(corp for _, corp in doomed).items():
                futures.append(await self.producer.send(self.erasures.topic, key=corp.encode(), value=audit_record(
                    corp, now, "sink", self.topic, p, count)))
                metrics.ERASURES.labels("sink").inc()
                log.info("delivered record: corp %s: %d ids of partition %d erased", corp, count, p)
        if futures:
            await asyncio.gather(*futures)
        self._gauge()

    def state(self, partition: int, outer_action_id: str) -> State:
        # A partition whose record did not load raises (KeyError) rather than answer
        # "nothing recorded": the sink stops instead of sending something twice.
        if outer_action_id in self.acked[partition]:
            return ACKED
        parked = self.parked[partition].get(outer_action_id)
        if parked is not None:
            return parked
        return SENDING if outer_action_id in self.sending[partition] else None

    async def write(self, entries: list[tuple[int, str, State, str]]) -> None:
        """Write each (partition, id, state, corp id) and wait until the broker has them all.
        A record carries the hash of its corp id in a header, so a corp that leaves can be
        erased; an entry of a corp erased meanwhile is not written."""
        async with self.write_lock:
            erased = self.erasures.erased if self.erasures is not None else {}
            entries = [entry for entry in entries if entry[3] not in erased]
            futures = [await self.producer.send(self.topic, key=oid.encode(), partition=p,
                                                value=state.value() if isinstance(state, Parked) else state,
                                                headers=[(CORP_HEADER, corp_hash(corp).encode())])
                       for p, oid, state, corp in entries]
            if futures:
                await asyncio.gather(*futures)
            for p, oid, state, _ in entries:
                self._apply(p, oid, state)
            self._gauge()

    def _apply(self, partition: int, oid: str, state: State) -> None:
        if partition not in self.acked:       # not (or no longer) assigned here
            return
        self.acked[partition].discard(oid)
        self.sending[partition].discard(oid)
        self.parked[partition].pop(oid, None)
        if state == ACKED:
            self.acked[partition].add(oid)
        elif state == SENDING:
            self.sending[partition].add(oid)
        elif isinstance(state, Parked):
            self.parked[partition][oid] = state

    def parked_count(self) -> int:
        return sum(len(ids) for ids in list(self.parked.values()))

    def oldest_parked_ts(self) -> Optional[int]:
        """The earliest record timestamp (ms) among parked reports. Also called from the
        metrics server's thread, hence the copies."""
        return min((state.first_ts for ids in list(self.parked.values()) for state in list(ids.values())),
                   default=None)

    def _gauge(self) -> None:
        metrics.SINK_DELIVERED_IDS.set(sum(len(s) for s in self.acked.values()))


@dataclass
class Pending:
    """A report on its way to the API, from conversion-reports or from the retry topic."""
    partition: int
    report: dict
    value: bytes          # as it is on conversion-reports: what a parked copy carries
    first_ts: int         # its record timestamp on conversion-reports (ms)
    origin: str           # "<topic>/<partition>@<offset>" on conversion-reports
    attempt: int = 0      # times parked so far
    copy_offset: Optional[int] = None    # read from the retry topic: the copy's offset

    @property
    def oid(self) -> str:
        return self.report["outer_action_id"]

    @property
    def corp_id(self) -> str:
        return self.report["corp_id"]


@dataclass
class RoundResult:
    delivered: list[Pending] = field(default_factory=list)
    failed: list[tuple[Pending, dict]] = field(default_factory=list)   # (report, the API's answer)
    parked: list[Pending] = field(default_factory=list)


class ApiSink:
    """Two loops on one consumer (see the module docstring): rounds of read, deliver, park,
    record and commit on conversion-reports, and the retry loop on the retry topic."""

    def __init__(self, settings: Settings, client: MarketingApiClient, record: DeliveredRecord,
                 producer: AIOKafkaProducer):
        self.settings = settings
        self.client = client
        self.record = record
        self.producer = producer
        self.reports_topic = settings.topic("conversion_reports_topic")
        self.retry_topic = settings.topic("retry_reports_topic")
        self.slots = asyncio.Semaphore(settings.sink_concurrency)
        self.breaker = AccountBreaker(settings.sink_retry_delay / 1000)
        self.commit_lock = asyncio.Lock()
        self.resume_timers: set[asyncio.TimerHandle] = set()
        self.round_oldest_ms: Optional[int] = None
        self.totals: dict[str, int] = defaultdict(int)
        metrics.SINK_OLDEST_UNACKED.set_function(self.oldest_unacked_age)
        metrics.SINK_PARKED.set_function(record.parked_count)
        metrics.SINK_BROKEN_ACCOUNTS.set_function(lambda: len(self.breaker))

    def listener(self) -> ConsumerRebalanceListener:
        sink = self

        class Rebalance(ConsumerRebalanceListener):
            async def on_partitions_revoked(self, revoked) -> None:
                sink.record.forget({tp.partition for tp in revoked})
                sink.breaker.clear()         # an account's parked reports may be elsewhere now

            async def on_partitions_assigned(self, assigned) -> None:
                await sink.record.ensure_loaded({tp.partition for tp in assigned})
        return Rebalance()

    def oldest_unacked_age(self) -> float:
        """Seconds since the oldest report not yet acknowledged or failed was written:
        the round in progress, and every parked report."""
        try:
            times = [t for t in (self.round_oldest_ms, self.record.oldest_parked_ts()) if t is not None]
        except RuntimeError:          # changed while the metrics thread read it; next scrape
            return 0.0
        return max(0.0, time.time() - min(times) / 1000) if times else 0.0

    async def run(self, consumer: AIOKafkaConsumer, stop: asyncio.Event) -> dict:
        loops = [asyncio.create_task(self._reports_loop(consumer, stop), name="sink-reports"),
                 asyncio.create_task(self._retry_loop(consumer, stop), name="sink-retries")]
        try:
            done, _ = await asyncio.wait(loops, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()             # the first loop that failed stops the sink
        finally:
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            for timer in self.resume_timers:
                timer.cancel()
        return dict(self.totals)

    # -- conversion-reports: rounds ------------------------------------------------------
    async def _reports_loop(self, consumer: AIOKafkaConsumer, stop: asyncio.Event) -> None:
        s = self.settings
        while not stop.is_set():
            tps = _assigned(consumer, self.reports_topic)
            if not tps:                   # getmany() with no partitions would return the retry topic's
                await asyncio.sleep(0.05)
                continue
            if self.record.erasure_due():
                await self.record.erase_requested()
            if self.record.erasures is not None:
                self.record.erasures.check_deadline("sink")
            batches = await consumer.getmany(*tps, timeout_ms=s.sink_linger, max_records=s.sink_round)
            if not batches:
                continue
            await self.deliver_round(batches)
            await self._commit(consumer, batches)

    async def deliver_round(self, batches: dict) -> None:
        self.round_oldest_ms = min(r.timestamp for records in batches.values() for r in records)
        try:
            await self.record.ensure_loaded({tp.partition for tp in batches})
            reports, invalid = split_reports(batches)
            await park_invalid(self.producer, self.settings, invalid)
            self.totals["invalid"] += len(invalid)
            todo: list[Pending] = []
            seen: set[str] = set()
            erased = self.record.erasures.erased if self.record.erasures is not None else {}
            for tp, record, report in reports:
                if report["corp_id"] in erased:
                    self._count("erased")       # a corp that left: nothing more of it is sent
                    continue
                oid = report["outer_action_id"]
                state = self.record.state(tp.partition, oid)
                if state == ACKED or oid in seen:
                    self._count("already_delivered")
                    continue
                if isinstance(state, Parked):     # its live copy is on the retry topic
                    self._count("already_parked")
                    continue
                seen.add(oid)
                if state == SENDING:
                    self._count("in_doubt_resent")
                todo.append(Pending(tp.partition, report, record.value, record.timestamp,
                                    f"{tp.topic}/{tp.partition}@{record.offset}"))
            if not todo:
                return
            # An account known to be stuck costs no budget: its reports are parked at once.
            stuck = [p for p in todo if self.breaker.is_open(p.report["account_id"])]
            todo = [p for p in todo if not self.breaker.is_open(p.report["account_id"])]
            await self.record.write([(p.partition, p.oid, SENDING, p.corp_id) for p in todo])
            result = await self._deliver(todo, self.settings.sink_retry_budget / 1000, retrying=False)
            result.parked += stuck
            await self._settle(result)
        finally:
            self.round_oldest_ms = None

    # -- the retry topic: parked reports, due in append order ------------------------------
    async def _retry_loop(self, consumer: AIOKafkaConsumer, stop: asyncio.Event) -> None:
        while not stop.is_set():
            paused = consumer.paused()
            tps = [tp for tp in _assigned(consumer, self.retry_topic) if tp not in paused]
            if not tps:
                await asyncio.sleep(0.1)
                continue
            batches = await consumer.getmany(*tps, timeout_ms=200, max_records=self.settings.sink_round)
            due = self._take_due(consumer, batches)
            if due:
                await self.retry_round(due)
                await self._commit(consumer, due)

    def _take_due(self, consumer: AIOKafkaConsumer, batches: dict) -> dict:
        """The records whose not-before has passed. At a partition's first record not due
        yet, rewind the partition to it and pause it until then: with one fixed delay,
        copies are due in the order they were written, so nothing behind it is due either."""
        now = _now_ms()
        due = {}
        for tp, records in batches.items():
            for i, record in enumerate(records):
                not_before = RetryEnvelope.from_headers(record.headers, record.timestamp).not_before
                if not_before > now:
                    consumer.seek(tp, record.offset)
                    consumer.pause(tp)
                    self._resume_later(consumer, tp, (not_before - now) / 1000)
                    records = records[:i]
                    break
            if records:
                due[tp] = records
        return due

    def _resume_later(self, consumer: AIOKafkaConsumer, tp: TopicPartition, delay_s: float) -> None:
        def resume() -> None:
            self.resume_timers.discard(timer)
            try:
                consumer.resume(tp)
            except (IllegalStateError, AssertionError):    # not assigned here any more
                pass
        timer = asyncio.get_running_loop().call_later(delay_s, resume)
        self.resume_timers.add(timer)

    async def retry_round(self, batches: dict) -> None:
        await self.record.ensure_loaded({tp.partition for tp in batches})
        reports, invalid = split_reports(batches)     # anyone can write to a topic
        await park_invalid(self.producer, self.settings, invalid)
        self.totals["invalid"] += len(invalid)
        todo: list[Pending] = []
        erased = self.record.erasures.erased if self.record.erasures is not None else {}
        for tp, record, report in reports:
            if report["corp_id"] in erased:
                self._count("erased")
                continue
            state = self.record.state(tp.partition, report["outer_action_id"])
            if not is_live_copy(state, record.offset):
                # a second copy (written by a sink that died before recording it), or one
                # whose report was settled since, or that the main loop holds after a crash
                self._count("stale_retry_copy")
                continue
            if state.retrying:
                self._count("in_doubt_resent")
            envelope = RetryEnvelope.from_headers(record.headers, record.timestamp)
            todo.append(Pending(tp.partition, report, record.value, envelope.first_ts, envelope.origin,
                                envelope.attempt, copy_offset=record.offset))
        if todo:
            await self._settle(await self._deliver(todo, 0.0, retrying=True))

    # -- delivering, both paths ------------------------------------------------------------
    async def _deliver(self, todo: list[Pending], budget_s: float, retrying: bool) -> RoundResult:
        result = RoundResult()
        pending_of = {p.oid: p for p in todo}
        by_account: dict[int, list[Batch]] = defaultdict(list)
        for batch in pack([p.report for p in todo]):
            by_account[batch.account_id].append(batch)
        # One task per account keeps each account's requests in order; accounts run side
        # by side, at most `sink_concurrency` requests at a time.
        await asyncio.gather(*(self._deliver_account(batches, result, pending_of, budget_s, retrying)
                               for batches in by_account.values()))
        return result

    async def _deliver_account(self, batches: list[Batch], result: RoundResult, pending_of: dict,
                               budget_s: float, retrying: bool) -> None:
        account = batches[0].account_id
        for batch in batches:
            items = [pending_of[r["outer_action_id"]] for r in batch.reports]
            if retrying:
                if not self.breaker.may_probe(account):
                    result.parked += items
                    continue
                await self.record.write([(p.partition, p.oid, Parked(p.copy_offset, p.first_ts, retrying=True),
                                          p.corp_id) for p in items])
            elif self.breaker.is_open(account):       # tripped earlier in this round
                result.parked += items
                continue
            await self._deliver_batch(batch, result, pending_of, budget_s, retrying)

    async def _deliver_batch(self, batch: Batch, result: RoundResult, pending_of: dict,
                             budget_s: float, retrying: bool) -> None:
        outcome, status, answer, text = await self._post_until_answered(batch, budget_s)
        items = [pending_of[r["outer_action_id"]] for r in batch.reports]
        account = batch.account_id
        if outcome is Outcome.DELIVERED:
            self._answered(account)
            result.delivered += items
            return
        if outcome is not Outcome.PERMANENT:          # still retryable when the budget ran out
            result.parked += items
            if retrying:
                self.breaker.refused(account)
                log.info("account %d: refused again on retry (%s, attempt %d); %d reports parked again",
                         account, _answer_code(status, answer), max(p.attempt for p in items), len(items))
            elif self.breaker.trip(account):
                log.warning("account %d: retryable answers for %.1f s (%s); its reports are parked on %s and "
                            "tried again every %.1f s while the other accounts go on", account, budget_s,
                            _answer_code(status, answer), self.retry_topic, self.settings.sink_retry_delay / 1000)
            return
        self._answered(account)
        if len(batch.reports) > 1:
            # The API rejects a whole request for one bad action: bisect, so only the bad
            # ones fail, at about 2·log2(50) extra requests per bad action.
            half = len(batch.reports) // 2
            for part in (slice(None, half), slice(half, None)):
                await self._deliver_batch(Batch(batch.account_id, batch.user_action_set_id,
                                                batch.reports[part], batch.actions[part]),
                                          result, pending_of, budget_s, retrying)
            return
        failure = {"http_status": status, "response": answer if answer is not None else text}
        result.failed.append((items[0], failure))

    def _answered(self, account: int) -> None:
        if self.breaker.answered(account):
            log.warning("account %d: the API answers again; its reports are sent directly", account)

    async def _post_until_answered(self, batch: Batch, budget_s: float):
        """Post until the API gives a final answer (delivered or permanent) or `budget_s`
        has passed since the first request. Retryable answers and errors back off
        exponentially with full jitter; token errors reload the token first."""
        body = batch.body()
        attempt = 0
        started = time.monotonic()
        while True:
            async with self.slots:
                metrics.SINK_IN_FLIGHT.inc()
                sent = time.monotonic()
                try:
                    status, answer, text = await self.client.post(body)
                finally:
                    metrics.SINK_IN_FLIGHT.dec()
                    metrics.SINK_REQUEST_SECONDS.observe(time.monotonic() - sent)
            outcome = classify(status, answer)
            metrics.SINK_REQUESTS.labels(outcome.value).inc()
            if outcome is Outcome.DELIVERED:
                metrics.SINK_BATCH_ACTIONS.observe(len(batch.actions))
            if outcome in (Outcome.DELIVERED, Outcome.PERMANENT):
                return outcome, status, answer, text
            if outcome is Outcome.RELOAD_TOKEN:
                changed = self.client.token.reload()
                metrics.SINK_RETRIES.labels("token").inc()
                log.warning("Marketing API answered %s: token reloaded (%s)", answer.get("code"),
                            "changed" if changed else "unchanged; backing off")
                if changed:
                    continue
            remaining = budget_s - (time.monotonic() - started)
            if remaining <= 0:
                return outcome, status, answer, text
            if outcome is not Outcome.RELOAD_TOKEN:
                metrics.SINK_RETRIES.labels(_retry_reason(status)).inc()
            attempt += 1
            cap = min(self.settings.sink_max_backoff, 50 * 2 ** min(attempt, 16))
            await asyncio.sleep(min(random.uniform(0, cap) / 1000, remaining))

    # -- settling a round: failures, parked copies, the record ------------------------------
    async def _settle(self, result: RoundResult) -> None:
        """Make the round's outcomes durable, before its offsets are committed."""
        await self._send_failures(result.failed)
        await self._park(result.parked)
        await self.record.write([(p.partition, p.oid, ACKED, p.corp_id) for p in result.delivered]
                                + [(p.partition, p.oid, FAILED, p.corp_id) for p, _ in result.failed])
        self._count("delivered", len(result.delivered))
        self._count("failed", len(result.failed))

    async def _park(self, items: list[Pending]) -> None:
        """Copy the reports to the retry topic (same partition number), then name each
        copy in the record: from then on it is the one live copy."""
        if not items:
            return
        not_before = _now_ms() + self.settings.sink_retry_delay
        futures = []
        for p in items:
            envelope = RetryEnvelope(p.attempt + 1, not_before, p.first_ts, p.origin)
            futures.append(await self.producer.send(self.retry_topic, key=p.oid.encode(), value=p.value,
                                                    partition=p.partition, headers=envelope.headers()))
        written = await asyncio.gather(*futures)
        await self.record.write([(p.partition, p.oid, Parked(meta.offset, p.first_ts), p.corp_id)
                                 for p, meta in zip(items, written)])
        first = sum(1 for p in items if p.attempt == 0)
        self._count("parked", first)
        self._count("reparked", len(items) - first)

    async def _send_failures(self, failed: list[tuple[Pending, dict]]) -> None:
        topic = self.settings.topic("report_failures_topic")
        futures = []
        for pending, failure in failed:
            report = pending.report
            value = orjson.dumps({**report, "api_response": failure, "failed_at": _now_ms()})
            futures.append(await self.producer.send(topic, key=report["outer_action_id"].encode(), value=value))
        if futures:
            await asyncio.gather(*futures)

    async def _commit(self, consumer: AIOKafkaConsumer, batches: dict) -> None:
        async with self.commit_lock:
            try:
                await consumer.commit({tp: records[-1].offset + 1 for tp, records in batches.items()})
            except (CommitFailedError, IllegalStateError) as exc:
                # A rebalance took partitions away mid-round: their new owner re-reads the
                # round and finds what was delivered (or parked) in the record.
                log.warning("commit after a rebalance failed (%s); the new owner re-reads", type(exc).__name__)

    def _count(self, outcome: str, n: int = 1) -> None:
        if n:
            metrics.SINK_REPORTS.labels(outcome).inc(n)
            self.totals[outcome] += n


def _assigned(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    return sorted(tp for tp in consumer.assignment() if tp.topic == topic)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _retry_reason(status: Optional[int]) -> str:
    if status is None:
        return "timeout_or_connection"
    if status == 429:
        return "http_429"
    if status >= 500:
        return "http_5xx"
    return "api_code"


def _answer_code(status: Optional[int], answer) -> str:
    """A short description of a refusal for the log (never the answer's text: no token)."""
    if isinstance(answer, dict) and "code" in answer:
        return f"code {answer['code']}"
    return "no answer" if status is None else f"HTTP {status}"


async def check_retry_topic(settings: Settings) -> None:
    """The retry topic must have as many partitions as conversion-reports: a parked report
    keeps its partition number, so the record partition and the consumer's co-partitioned
    assignment (RangePartitionAssignor) cover both."""
    reports, retry = settings.topic("conversion_reports_topic"), settings.topic("retry_reports_topic")
    admin = AIOKafkaAdminClient(**client_kwargs(settings), request_timeout_ms=30000)
    await admin.start()
    try:
        deadline = time.monotonic() + 30
        while (counts := partition_counts(await admin.describe_topics([reports, retry]))) is None:
            if time.monotonic() > deadline:
                raise ConfigError(f"topics {reports} and {retry} are missing from the broker's metadata; "
                                  f"run `tagstream topics` or check the broker")
            await asyncio.sleep(0.2)
    finally:
        await admin.close()
    if counts[reports] != counts[retry]:
        raise ConfigError(f"{retry} has {counts[retry]} partitions and {reports} {counts[reports]}: they must "
                          f"match (a parked report keeps its partition); recreate {retry} with "
                          f"{counts[reports]} partitions while no report is parked on it")


async def run_api_sink(settings: Settings, stop: asyncio.Event) -> dict:
    """Deliver reports to the Marketing API until `stop` is set. Returns counts by outcome."""
    if not settings.marketing_api_base:
        raise ConfigError("--target api needs the API address: set TAGSTREAM_MARKETING_API_BASE "
                          "(e.g. https://api.e.qq.com)")
    token = token_from_settings(settings)
    if not token.token:
        raise ConfigError("--target api needs an access token: set TAGSTREAM_ACCESS_TOKEN_FILE "
                          "(re-read when the token expires) or TAGSTREAM_ACCESS_TOKEN")
    await check_retry_topic(settings)
    producer = _producer(settings)
    await start_client(producer)
    erasures = ErasureRequests(settings, "tagstream-sink-erasures")
    try:
        await erasures.follow()                # no report of an erased corp is taken for a live one's
        metrics.ERASURE_PENDING.labels("sink").set_function(erasures.pending_seconds)
        async with MarketingApiClient(settings.marketing_api_base, token,
                                      RateLimiter(settings.sink_rate_limit),
                                      settings.sink_request_timeout / 1000) as client:
            record = DeliveredRecord(settings, producer, erasures)
            sink = ApiSink(settings, client, record, producer)
            consumer = _sink_consumer(settings, [settings.topic("conversion_reports_topic"),
                                                 settings.topic("retry_reports_topic")], sink.listener())
            await start_client(consumer)
            try:
                return await sink.run(consumer, stop)
            finally:
                await consumer.stop()
    finally:
        await erasures.stop()
        await producer.stop()
