"""Per-customer processing: tag events and contact events, merged in event time, applied by
the reporting engine (`streams.core.semantics`) to the changelogged `reporting_state`.

Both event topics are keyed by `corp_id:external_userid` and have the same partition count,
so partition N of each lands on the same worker. Kafka orders each topic partition but not
the two topics against each other, so arriving events go through `streams.core.merge` first and
are applied in `ts` order (contacts first on ties). A head whose other topic has nothing
buffered waits until that topic's partition is known to be received up to an end offset
learned after the head arrived; the agent learns it with a ListOffsets request of its own
(`_probe_end_offsets`), because the high-water mark of the last fetch can predate the
records written since (issue 16; streams/core/merge.py has the argument).

**Batches.** The worker's consumer (`streams.kafka.faust_consumer.BatchingConsumer`) hands this
agent every fetched batch of both topics whole (`on_records`); Faust's per-record stream
machinery is not on this path. Steps are applied at once and their reports sent at once;
then, once per batch (group commit: `batch_max` events, `batch_linger`, or staged state near
`COMMIT_MAX_BYTES`), the agent waits for the broker's acks of those reports, commits the
state (`streams.state.store`) and only then moves the offsets Faust may commit
(`committable`). So the state never says "reported" for a lost report, and no offset is
committed before its step is in the state. A record waiting in the merge buffer holds its
partition's committable offset back; a crash or rebalance re-delivers it.

**State keys** in `reporting_state`, partitioned like the input topics:
- `c:corp_id:external_userid` -> CustomerState
- `e:N:corp_id:external_userid:event_id` -> ts of an applied event, remembered for dedupe
  (N is the customer key's length in bytes, so ids with ':' cannot collide)
- `x:partition:number`        -> (ts, customer, event_id): the partition's remembered-id
  queue, which forgets ids past the dedupe horizon (streams/core/semantics.py)
- `k:partition`               -> PartitionClock (stream time, hold-index range, held count,
  remembered-id queue span)
- `h:partition:bucket`        -> table of contents of the hold-index entries due in that
  minute, stored in sorted chunks `h:partition:bucket:id` -> [(deadline, customer, type)]
  of at most 512 entries (streams/state/hold_buckets.py)
- `o:topic:partition`         -> offset of the last input record applied
- `z:partition`               -> the corps erased from the partition: {sha256 of the corp id:
  the erasure request's time} (streams/core/erasure.py)

The `o:` marker makes application exactly-once per input record: it is committed with the
state it covers, and a record at or below it is skipped when Kafka re-delivers it after a
crash. Event-id dedupe (SPEC rule 1) then only has to catch real duplicates from upstream.

**Erasure** (issue 21). The agent follows the erasure requests (`ErasureRequests`). From the
moment it knows of one, it refuses the corp's records (counted as `erased`, neither applied
nor dead-lettered), and at its next tick it erases the corp from each assigned partition:
commit what is open, delete the corp's keys (`streams.core.erasure.erase_partition_state`),
drop its holds, record the request in `z:`, audit it, commit, and compact the partition's
database so the deleted values leave its files.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import time
from functools import partial
from collections import Counter
from typing import Any, Mapping, Optional, Union

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from faust.types import TP

from agents import dead_letters
from agents.rules import RuleReplica
from schemas.validation import Rejection, decode_contact_event, decode_event_record, decode_tag_event
from streams.observability import metrics
from streams.observability.hot_keys import HotKeys
from streams.state.failpoints import failpoint
from streams.core.erasure import audit_record, corp_hash, erase_partition_state
from streams.core.merge import ASKED, CoPartitionMerge
from streams.kafka.partitioner import partitioner
from streams.kafka.replica import ErasureRequests
from streams.core.semantics import (
    CustomerState, HoldEntry, PartitionClock, ReportingEngine, ReportingPolicy, SeenEntry, StepResult)
from streams.state.hold_buckets import ChunkedBucket
from streams.state.store import JOURNAL_KEY, ChangeloggedStore

log = logging.getLogger(__name__)

#: Commit before the staged state (all partitions together) reaches this, so each
#: partition's commit fits one producer record batch: appended whole by the broker, it needs
#: no journal (streams/state/store.py).
COMMIT_MAX_BYTES = 256 * 1024
#: A producer record batch, and so the most state one changelog batch carries.
PRODUCER_BATCH_BYTES = 512 * 1024
#: The client id of the agent's producer (reports, dead letters, state changelog), so an
#: operator can tell its traffic and quotas from Faust's own clients.
PRODUCER_CLIENT_ID = "tagstream-worker"
#: Sealed commits whose acks are awaited while the next batch is applied.
MAX_COMMITS_IN_FLIGHT = 4


#: The cyclic collector's thresholds once the heap is frozen. Python's default first
#: threshold (700 allocations) ran a young collection every few events; a step allocates
#: dozens of containers, nearly all freed by reference counting, so rarer young collections
#: scan about as many survivors in total and save the fixed cost of each.
GC_THRESHOLDS = (20_000, 20, 20)


def freeze_heap() -> None:
    """Move every object alive now (Faust, aiokafka, the rule book: hundreds of thousands of
    them) out of the cyclic collector's sight. Without this, each full collection scanned
    them all, stalling the event loop 60-150 ms every few seconds under load, which was most
    of the p99 of real-time latency (docs/performance.md). Objects created later are
    collected as usual."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    log.info("froze %d startup objects out of the garbage collector's scans", gc.get_freeze_count())


def _now_ms() -> int:
    return int(time.time() * 1000)


def _monotonic_ms() -> float:
    """The merge's clock: arrivals, probe times and `merge_wait` (never the wall clock, which
    can step)."""
    return time.monotonic() * 1000


#: How long one end-offset probe may take before it counts as failed. The merge waits for a
#: probe's answer however slow (a loaded cluster is not an outage), so this bounds that wait;
#: after a failure, heads wait at most `merge_wait` more.
PROBE_TIMEOUT_MS = 2_000
#: Buffered events of one topic in one partition at which that topic's partition stops
#: fetching until the other topic catches up (`_balance_fetching`), and where it resumes.
#: A fetched batch is at most `partition_fetch_bytes` (1 MiB, a few thousand events), so the
#: merge's own `max_buffered` (10,000) is never reached by a paused partition.
MERGE_PAUSE_AT = 2_000
MERGE_RESUME_AT = 500
#: Pause after a failed probe before the next (the broker is likely down or moving leaders).
PROBE_RETRY_S = 0.2


def _seen_key(customer: str, event_id: str) -> bytes:
    """State key of a remembered event id: `e:<length of the customer key>:<customer>:<id>`."""
    encoded = customer.encode()
    return b"e:%d:%s:%s" % (len(encoded), encoded, event_id.encode())


def _applied_key(tp: TP) -> bytes:
    """State key of the offset of the last record of `tp` applied (`o:topic:partition`)."""
    return b"o:%s:%d" % (tp.topic.encode(), tp.partition)


class ReportingState:
    """The engine's `StateStore` (customers, clocks, hold index) on the changelogged store,
    plus the applied-offset markers. Steps run for one partition at a time: `partition`.

    Partition clocks and hold-index buckets are read and written by every step, so they are
    kept decoded: a clock for as long as the partition is assigned, a bucket until the end of
    the batch. Changed ones are encoded and staged once per batch (`stage_cached`), not once
    per event.

    Customers are not kept decoded between batches: with a cache of the 50,000 most recently
    used ones, alternating A/B drains were slower (encoding cold objects cost more than the
    decodes saved), and full collections of 166-184 ms showed in the tail of real-time
    latency (docs/performance.md)."""

    def __init__(self, store: ChangeloggedStore):
        self.store = store
        self.partition = 0
        self.clocks: dict[int, PartitionClock] = {}
        self.marks: dict[TP, int] = {}      # applied offsets not staged yet
        self.buckets: dict[tuple[int, int], ChunkedBucket] = {}
        self.dirty_clocks: set[int] = set()
        self.dirty_buckets: set[tuple[int, int]] = set()

    def customer(self, key: str) -> CustomerState:
        return CustomerState.decode(self.store.get(self.partition, b"c:" + key.encode()))

    def put_customer(self, key: str, state: CustomerState) -> None:
        self.store.stage(self.partition, b"c:" + key.encode(), state.encode())

    def seen_ts(self, key: str, event_id: str) -> Optional[int]:
        stored = self.store.get(self.partition, _seen_key(key, event_id))
        return int(stored) if stored is not None else None

    def put_seen_ts(self, key: str, event_id: str, ts: Optional[int]) -> None:
        self.store.stage(self.partition, _seen_key(key, event_id), None if ts is None else b"%d" % ts)

    def seen_entry(self, partition: int, number: int) -> Optional[SeenEntry]:
        stored = self.store.get(partition, b"x:%d:%d" % (partition, number))
        return tuple(orjson.loads(stored)) if stored is not None else None

    def put_seen_entry(self, partition: int, number: int, entry: Optional[SeenEntry]) -> None:
        self.store.stage(partition, b"x:%d:%d" % (partition, number),
                         None if entry is None else orjson.dumps(entry))

    def clock(self, partition: int) -> PartitionClock:
        clock = self.clocks.get(partition)
        if clock is None:
            clock = self.clocks[partition] = PartitionClock.decode(self.store.get(partition, b"k:%d" % partition))
        return clock

    def put_clock(self, partition: int, clock: PartitionClock) -> None:
        self.clocks[partition] = clock
        self.dirty_clocks.add(partition)

    def _bucket(self, partition: int, bucket: int) -> ChunkedBucket:
        chunked = self.buckets.get((partition, bucket))
        if chunked is None:
            chunked = self.buckets[(partition, bucket)] = ChunkedBucket(
                b"h:%d:%d" % (partition, bucket), lambda key: self.store.get(partition, key))
        return chunked

    def index_hold(self, partition: int, bucket: int, entry: HoldEntry) -> None:
        chunked = self._bucket(partition, bucket)
        before = chunked.pending_bytes()
        chunked.add(entry)
        self._changed_bucket(partition, bucket, chunked.pending_bytes() - before)

    def take_due(self, partition: int, bucket: int, up_to: int) -> list[HoldEntry]:
        chunked = self._bucket(partition, bucket)
        before = chunked.pending_bytes()
        due = chunked.take_due(up_to)
        if due:
            self._changed_bucket(partition, bucket, chunked.pending_bytes() - before)
        return due

    def has_holds(self, partition: int, bucket: int) -> bool:
        return bool(self._bucket(partition, bucket))

    def _changed_bucket(self, partition: int, bucket: int, grown: int) -> None:
        self.dirty_buckets.add((partition, bucket))
        self.store.staged_bytes += max(0, grown)     # the batch's share: its dirty chunks, bounded

    def stage_cached(self) -> None:
        """Stage the changed clocks and buckets and the applied-offset markers; forget the
        buckets (the next batch reads them again, so the cache never grows past one batch's
        buckets)."""
        stage = self.store.stage
        for tp, offset in self.marks.items():
            stage(tp.partition, _applied_key(tp), b"%d" % offset)
        self.marks.clear()
        for partition in self.dirty_clocks:
            stage(partition, b"k:%d" % partition, self.clocks[partition].encode())
        for partition, bucket in self.dirty_buckets:
            for key, value in self.buckets[(partition, bucket)].writes():
                stage(partition, key, value)
        self.dirty_clocks.clear()
        self.dirty_buckets.clear()
        self.buckets.clear()

    def forget(self, partition: int) -> None:
        """After a revocation (everything was staged and committed first)."""
        self.clocks.pop(partition, None)

    def applied_offset(self, tp: TP) -> Optional[int]:
        if tp in self.marks:
            return self.marks[tp]
        stored = self.store.get(tp.partition, _applied_key(tp))
        return int(stored) if stored is not None else None

    def mark_applied(self, tp: TP, offset: int) -> None:
        """Staged with the batch's state (`stage_cached`): one marker per partition, not one
        per event."""
        self.marks[tp] = offset


class CustomerEvents:
    """The agent over tag-events + contact-events, and the timer for waiting work."""

    def __init__(self, app, *, store: ChangeloggedStore, connection: Mapping[str, Any],
                 replica: RuleReplica, erasures: ErasureRequests, policy: ReportingPolicy,
                 tag_events_topic: str, contact_events_topic: str, merge_wait_ms: int,
                 conversion_reports_topic: str, unreportable_topic: str, dead_letters_topic: str,
                 max_future_skew_ms: int = 3_600_000, batch_max: int = 500, batch_linger_ms: int = 50):
        self.app = app
        self.replica = replica
        self.erasures = erasures
        self.erasure_checked: dict[int, int] = {}    # partition -> the erasures' version it is rid of
        self.store = store
        self.connection = connection        # streams.kafka.connection.client_kwargs
        self.producer: Optional[AIOKafkaProducer] = None     # created on the worker's loop
        self.state = ReportingState(store)
        self.engine = ReportingEngine(self.state, replica.book.rule_as_of, policy)
        self.tag_events_topic = tag_events_topic
        self.decoders = {tag_events_topic: decode_tag_event, contact_events_topic: decode_contact_event}
        self.max_future_skew_ms = max_future_skew_ms
        self.hot_keys = HotKeys()           # the busiest customer's share, per partition
        self.topics = (conversion_reports_topic, unreportable_topic, dead_letters_topic)
        self.merge: CoPartitionMerge = CoPartitionMerge(
            (contact_events_topic, tag_events_topic), max_wait_ms=merge_wait_ms)
        self.seen: dict[TP, int] = {}       # last offset received per input partition
        # End offsets learned by this agent's own ListOffsets probes: TP -> (end, monotonic
        # ms when the request was sent). Only knowledge younger than a head lets it go.
        self.end_offsets: dict[TP, tuple[int, float]] = {}
        self.probe_wanted: set[TP] = set()
        self.prober: Optional[AIOKafkaConsumer] = None     # no group: ListOffsets only
        self.probing: Optional[asyncio.Future] = None
        self.release_wanted: set[int] = set()      # partitions whose probes were answered
        self.releasing: Optional[asyncio.Future] = None
        self.probe_failures = 0             # in a row
        self.applied: dict[TP, Optional[int]] = {}  # last offset applied, from the state
        self.committable: dict[TP, int] = {}  # next offset to read after a restart, per partition
        self.restored: set[int] = set()     # partitions whose state was restored since assignment
        # The partitions of this generation's assignment, from the group's own signals. Not
        # the consumer's `assignment()`: between a revocation and the next assignment it
        # still lists the revoked partitions, and the timer restored their state then; a
        # partition that then went to another worker stayed "restored" here, so its state
        # was not read again when it came back (found by the chaos run, issue 16).
        self.assigned: set[int] = set()
        self.stopping = False               # drained for a graceful stop: take no more work
        self.lock = asyncio.Lock()          # the agent and the timer take turns
        self.started = False
        self.heap_frozen = False
        self.last_unknown: Optional[tuple] = None        # why `_caught_up` last answered None
        self.forced_logged_at = 0.0
        # Group commit: steps applied since the last commit, their reports' deliveries, and
        # their outcome counts (exported once per batch).
        self.batch_max = batch_max
        self.batch_linger_s = batch_linger_ms / 1000
        self.batch_started: Optional[float] = None
        self.batch_events = 0
        self.deliveries: list = []
        self.outcomes: Counter = Counter()
        self.durable: Optional[asyncio.Future] = None   # the last commit on its way (streams/state/store.py)
        self.failed: Optional[BaseException] = None

    # -- entry points --------------------------------------------------------------------
    async def on_records(self, records: dict) -> None:
        """A fetched batch: {TP: [ConsumerRecord, ...]} in offset order per partition. The
        consumer calls this only once the rule book is ready (agents/rules.py): an event
        looked up in a partial book would look unmapped, and its report would be lost."""
        generation = self.app.consumer_generation_id      # the batch's: handed over just now
        async with self.lock:
            if self.stopping:
                return                      # not seen, not committable: the next owner's
            # A rebalance may have begun while this batch waited for the lock: its revocation
            # forgot what the merge held for the partition, to be fetched again from the
            # committed offset. Taken now, the batch would mark its offsets seen, and that
            # refetch would skip them and the forgotten ones as "already taken" (the cluster
            # chaos run's lost stretch). The next generation's seek fetches it again.
            if generation != self.app.consumer_generation_id or any(
                    tp.partition not in self.assigned for tp in records):
                metrics.STALE_BATCHES.inc()
                log.info("dropped a batch handed over before a rebalance (generation %s, now %s): "
                         "fetched again from the committed offsets", generation, self.app.consumer_generation_id)
                return
            await self._ready()
            arrived = _monotonic_ms()
            offer, skew, count_key = self.merge.offer, self.max_future_skew_ms, self.hot_keys.add
            erased = self.erasures.erased_bytes
            for tp, batch in records.items():
                topic, partition = tp.topic, tp.partition
                decode = self.decoders[topic]
                seen = self.seen.get(tp, -1)
                applied = self._applied(tp)
                for record in batch:
                    offset = record.offset
                    if offset <= seen:
                        continue                 # handed over again after a seek back: already taken
                    seen = offset
                    if applied is not None and offset <= applied:
                        self.outcomes[(topic, "redelivered")] += 1
                        continue
                    if erased and record.key.split(b":", 1)[0] in erased:
                        self.outcomes[(topic, "erased")] += 1     # a corp that left: not kept anywhere
                        continue
                    count_key(partition, record.key)
                    decoded = decode_event_record(decode, record.key, record.value, record.timestamp, skew)
                    if isinstance(decoded, Rejection):
                        await self._dead_letter(tp, record, decoded)
                        continue
                    offer(partition, topic, decoded.ts, (tp, offset, decoded), arrived)
                self.seen[tp] = seen
            for partition in {tp.partition for tp in records}:
                await self._release(partition)
            self._balance_fetching()
            if self._batch_full():
                await self._commit()

    def _balance_fetching(self) -> None:
        """Pause and resume input partitions as the merge's `fetch_balance` says. Found by the
        cluster chaos run: with a leader killed, one topic's partition kept coming while the
        other's stalled, the buffer passed the merge's `max_buffered`, and thousands of events
        were forced out of ts order."""
        consumer = self.app.consumer
        paused_by_merge = getattr(consumer, "merge_paused", False)
        if paused_by_merge is False:             # not the batching consumer
            return
        if paused_by_merge is None:
            paused_by_merge = consumer.merge_paused = set()
        # Faust's own pause set: a rebalance pauses and then resumes every partition, ours too
        pause, resume = self.merge.fetch_balance({(tp.topic, tp.partition) for tp in consumer._paused_partitions},
                                                 {(tp.topic, tp.partition) for tp in paused_by_merge},
                                                 MERGE_PAUSE_AT, MERGE_RESUME_AT)
        pause, resume = {TP(*key) for key in pause}, {TP(*key) for key in resume}
        if pause:
            paused_by_merge |= pause
            consumer.pause_partitions(pause)
            metrics.MERGE_BACKPRESSURE.inc(len(pause))
        if resume:
            paused_by_merge -= resume
            consumer.resume_partitions(resume)

    async def tick(self) -> None:
        """Timer: apply events that waited `merge_wait` for the other topic, release holds of
        idle partitions once wall-clock time is `idle_grace` past their deadline, and commit
        what is left of the batch."""
        if not (self.replica.ready.is_set() and self.erasures.ready.is_set()):
            return
        async with self.lock:
            if self.stopping:
                return
            await self._ready()
            for partition in self.merge.waiting_partitions():
                await self._release(partition)
            self._balance_fetching()
            await self._erase_requested()
            wall = _now_ms()
            for partition in self._assigned_partitions():
                if self._idle(partition):
                    self.state.partition = partition
                    await self._send(self.engine.on_idle(partition, wall, wall), wall)
            await self._commit()

    async def drain(self) -> None:
        """Before a graceful stop: commit the open batch, wait until every commit is durable,
        and take no more work (batches fetched from now on are left to the partitions' next
        owner, which reads them again from the committed offsets). A stopping worker stays in
        the group until Faust stops it, and leaves it without a revocation; a commit still on
        its way then could land in the changelog after the next owner has restored it."""
        async with self.lock:
            self.stopping = True
            await self._flush()
            if self.started:
                await self.producer.flush()

    def on_partitions_assigned(self, assigned) -> None:
        """The group's new assignment (eager protocol: all of it), before any record of it is
        fetched."""
        self.assigned = {tp.partition for tp in assigned if tp.topic == self.tag_events_topic}

    async def on_partitions_revoked(self, revoked) -> None:
        self.assigned -= {tp.partition for tp in revoked}
        async with self.lock:
            await self._flush()
            try:
                await self.app.consumer.commit()      # Faust committed before this signal
            except Exception as exc:                  # the new owner skips what the state covers
                log.warning("offset commit at revocation failed: %r", exc)
            for tp in revoked:
                self.seen.pop(tp, None)
                self.end_offsets.pop(tp, None)
                self.probe_wanted.discard(tp)
                self.applied.pop(tp, None)
                self.committable.pop(tp, None)
                self.merge.forget(tp.partition)      # never committed: the new owner reads them again
                self.erasure_checked.pop(tp.partition, None)
                self.state.forget(tp.partition)
                if tp.partition in self.restored and tp.topic == self.tag_events_topic:
                    self.restored.discard(tp.partition)
                    self.store.close_partition(tp.partition)

    def state_keys(self, partition: int) -> Optional[int]:
        return self.store.estimate_keys(partition) if partition in self.restored else None

    def held_reports(self, partition: int) -> Optional[int]:
        """Running holds of `partition`, as its clock in the state counts them."""
        if partition not in self.restored:
            return None
        return self.state.clock(partition).held

    # -- internals -----------------------------------------------------------------------
    async def _ready(self) -> None:
        """Start the producer once, and restore the state of newly assigned partitions
        before their first step."""
        if not self.started:
            self.producer = self.store.producer = AIOKafkaProducer(
                **self.connection, acks="all", enable_idempotence=True, partitioner=partitioner,
                client_id=PRODUCER_CLIENT_ID,
                linger_ms=1, max_batch_size=PRODUCER_BATCH_BYTES, max_request_size=2 * PRODUCER_BATCH_BYTES)
            await self.producer.start()
            self.prober = AIOKafkaConsumer(
                **self.connection, group_id=None, enable_auto_commit=False, isolation_level="read_committed",
                request_timeout_ms=PROBE_TIMEOUT_MS, client_id="tagstream-merge-probe")
            await self.prober.start()
            self.started = True
        missing = set(self._assigned_partitions()) - self.restored
        if missing:
            log.info("restoring the state of partitions %s", sorted(missing))
            await self._flush()               # a restore commits; staged steps go first, properly
            await self.store.restore(missing)
            self.restored |= missing
            if not self.heap_frozen:
                freeze_heap()
                self.heap_frozen = True

    async def _release(self, partition: int) -> None:
        """Apply what the merge lets go of `partition` now."""
        def caught_up(source: str, since: float) -> Optional[bool]:
            return self._caught_up(TP(source, partition), since)
        released = self.merge.release(partition, caught_up, _monotonic_ms)
        self.state.partition = partition
        on_event, mark_applied, outcomes = self.engine.on_event, self.state.mark_applied, self.outcomes
        now_ms = _now_ms()
        erased = self.erasures.erased
        for tp, offset, decoded in released:
            if erased and decoded.corp_id in erased:      # its erasure was asked while it waited
                mark_applied(tp, offset)
                self.applied[tp] = offset
                outcomes[(tp.topic, "erased")] += 1
                continue
            result = on_event(partition, decoded, now_ms)
            mark_applied(tp, offset)
            self.applied[tp] = offset
            outcomes[(tp.topic, result.outcome)] += 1
            self.batch_events += 1
            if result.reports or result.unreportable:
                await self._send(result, now_ms)
            if self._batch_at_limit():
                await self._commit()          # each partition's commit stays one record batch

    async def _erase_requested(self) -> None:
        """Erase the corps whose erasure was requested from each assigned partition that is
        not rid of them yet (module docstring). The `z:` marker makes it once per request,
        restarts included."""
        version = self.erasures.version
        todo = [p for p in self._assigned_partitions() if p in self.restored and self.erasure_checked.get(p) != version]
        requested = dict(self.erasures.erased)
        for partition in todo:
            marker_key = b"z:%d" % partition
            stored = self.store.get(partition, marker_key)
            done = orjson.loads(stored) if stored is not None else {}
            corps = {corp for corp, at in requested.items() if done.get(corp_hash(corp)) != at}
            if corps:
                started = time.monotonic()
                await self._flush()           # the store then holds the whole state: scan it
                erasure = erase_partition_state(partial(self.store.scan, partition), partition, corps)
                for key, value in erasure.writes:
                    self.store.stage(partition, key, value)
                clock = self.state.clock(partition)
                clock.held -= erasure.holds_dropped
                self.state.put_clock(partition, clock)
                done.update({corp_hash(corp): at for corp, at in requested.items()})
                self.store.stage(partition, marker_key, orjson.dumps(done))
                # the changelog's journal of an earlier large commit may name the corp: delete it
                self.store.stage(partition, JOURNAL_KEY, None)
                now = _now_ms()
                for corp in sorted(corps):
                    self.deliveries.append(await self.producer.send(
                        self.erasures.topic, key=corp.encode(), value=audit_record(
                            corp, now, "worker", self.store.changelog_topic, partition, erasure.keys[corp])))
                failpoint("erasure-staged")
                await self._flush()
                self.store.compact(partition)
                metrics.ERASURES.labels("worker").inc(len(corps))
                log.info("erased %d corps from partition %d: %d keys, %d holds dropped, in %.2f s", len(corps),
                         partition, sum(erasure.keys.values()), erasure.holds_dropped, time.monotonic() - started)
            self.erasure_checked[partition] = version
        if all(self.erasure_checked.get(p) == version for p in self._assigned_partitions()):
            self.erasures.applied(version)
        self.erasures.check_deadline("worker")

    async def _send(self, result: StepResult, now_ms: int) -> None:
        """Send a step's reports now (real-time reports are not held back by the batch);
        their acknowledgements are awaited by `_commit`."""
        reports_topic, unreportable_topic, _ = self.topics
        for report in result.reports:
            self.deliveries.append(await self.producer.send(
                reports_topic, key=report.outer_action_id.encode(), value=orjson.dumps(report.as_wire())))
            metrics.observe_report(report, now_ms)
        for report in result.unreportable:
            self.deliveries.append(await self.producer.send(
                unreportable_topic, key=report.outer_action_id.encode(), value=orjson.dumps(report.as_wire())))
            metrics.UNREPORTABLE.labels(report.standard_type, report.reason).inc()

    async def _dead_letter(self, tp: TP, record, rejection: Rejection) -> None:
        value = dead_letters.dead_letter_value(rejection, topic=tp.topic, partition=tp.partition,
                                               offset=record.offset, key=record.key, value=record.value)
        self.deliveries.append(await self.producer.send(self.topics[2], key=record.key, value=value))
        dead_letters.count(tp.topic, rejection)

    async def _commit(self) -> None:
        """End the batch: seal its state writes, and make them durable in the background, in
        order (`_make_durable`), while the next batch is applied. The fetcher waits only when
        `MAX_COMMITS_IN_FLIGHT` commits are already on their way."""
        if self.failed is not None:
            raise self.failed
        deliveries, self.deliveries = self.deliveries, []
        offsets = {}
        skipped = getattr(self.app.consumer, "skipped", {})
        for tp, seen in self.seen.items():
            waiting = self.merge.oldest(tp.partition, tp.topic)
            if waiting is not None:
                offsets[tp] = waiting[1]
            elif skipped.get(tp, (None,))[0] == seen + 1:
                # past the transaction markers after the last record applied: else a partition
                # written in transactions (the WeCom enrichment's) shows a lag of 1 for as long
                # as it stays idle, and TagstreamNoProgress fires on it
                offsets[tp] = skipped[tp][1]
            else:
                offsets[tp] = seen + 1
        for (topic, outcome), n in self.outcomes.items():
            metrics.EVENTS.labels(topic, outcome).inc(n)
        self.outcomes.clear()
        self._export_merge_stats()
        self.batch_events = 0
        self.batch_started = None
        self.state.stage_cached()
        if not deliveries and not self.store.staged and not self.store.in_flight:
            self.committable.update(offsets)          # nothing to wait for
            return
        previous = self.durable
        self.durable = asyncio.ensure_future(self._make_durable(previous, deliveries, self.store.seal(), offsets))
        if previous is not None and len(self.store.in_flight) > MAX_COMMITS_IN_FLIGHT:
            await asyncio.shield(previous)

    async def _make_durable(self, previous, deliveries: list, commit: dict, offsets: dict) -> None:
        """After the commit before it: wait until the broker has every report and dead letter
        of the batch, then make its state durable, then let Faust commit the offsets it
        covers. So the state never says "reported" for a lost report, and no offset is
        committed before its step is in the state. A failure stops the worker: a restart
        re-applies everything after the last durable commit."""
        try:
            if previous is not None:
                await previous
            if deliveries:
                await asyncio.gather(*deliveries)
                failpoint("reports-acked")
            await self.store.make_durable(commit)
            failpoint("state-durable")
            for tp, offset in offsets.items():
                if tp in self.seen:                   # not revoked meanwhile
                    self.committable[tp] = offset
        except BaseException as exc:
            if self.failed is None:
                self.failed = exc
                if not isinstance(exc, asyncio.CancelledError):
                    log.critical("a commit failed, stopping the worker: %r", exc)
                    asyncio.ensure_future(self.app.crash(exc))
            raise

    async def _flush(self) -> None:
        """Commit the open batch and wait until every commit is durable."""
        await self._commit()
        if self.durable is not None:
            await asyncio.shield(self.durable)

    def _batch_full(self) -> bool:
        """Commit at `batch_max` events, after `batch_linger`, or before the staged state grows
        past `COMMIT_MAX_BYTES` (one record batch per partition); the timer commits
        whatever is left when events stop coming."""
        if not self.batch_events and not self.deliveries:
            return False
        if self.batch_started is None:
            self.batch_started = time.monotonic()
        return self._batch_at_limit() or time.monotonic() - self.batch_started >= self.batch_linger_s

    def _batch_at_limit(self) -> bool:
        return self.batch_events >= self.batch_max or self.store.staged_bytes >= COMMIT_MAX_BYTES

    def _applied(self, tp: TP) -> Optional[int]:
        """The last offset of `tp` the state covers (re-delivered records up to it are skipped)."""
        if tp not in self.applied:
            self.applied[tp] = self.state.applied_offset(tp)
        return self.applied[tp]

    def _assigned_partitions(self) -> list[int]:
        return sorted(self.assigned)

    def _idle(self, partition: int) -> bool:
        """No event of this partition is waiting or still unread on either topic (as far as
        the latest end offsets known tell: the wall-clock flush needs no fresher answer)."""
        if partition in self.merge.waiting_partitions():
            return False
        return all(self._caught_up(TP(source, partition), float("-inf"), probe=False) is True
                   for source in self.merge.sources)

    def _position(self, tp: TP) -> Optional[int]:
        """The next offset of `tp` this worker will receive (None: cannot tell yet)."""
        seen = self.seen.get(tp)
        # The consumer's `next_offsets`: from the committed offset (or, with none committed,
        # the earliest offset it rewound to), advanced by each batch handed over and past
        # offsets no fetch returns (transaction markers). (Answering "unknown" before the
        # first record let a fresh group whose fetches brought tag events first apply them
        # ahead of the contact events before them: found by the chaos run, see
        # tests/integration/test_merge_catching_up.py.)
        handed = getattr(self.app.consumer, "next_offsets", {}).get(tp)
        if seen is None:
            return handed
        return seen + 1 if handed is None else max(seen + 1, handed)

    def _caught_up(self, tp: TP, since: float, probe: bool = True) -> Union[bool, str, None]:
        """Has this worker received every record that was in `tp` at (monotonic ms) `since`?
        True; False (records are known to be waiting); or, not known as of `since`: with
        `probe`, an end-offset probe is started, which calls the merge again when the broker
        answers, and the answer is `merge.ASKED` (wait for it), or None if the last probe
        failed (the broker is not answering: the merge waits at most `merge_wait`). The end
        offsets known: the high-water mark of the last fetch (of unknown age) and this
        agent's probes (sent at a known moment)."""
        known = []
        log_end = self.app.consumer.highwater(tp)
        if log_end is not None:
            known.append((log_end, float("-inf")))
        if tp in self.end_offsets:
            known.append(self.end_offsets[tp])
        position = self._position(tp)
        if position is None:
            if known and all(end == 0 for end, _ in known):
                return True
            self.last_unknown = (tp, "position unknown", known)
            return None
        if any(position < end for end, _ in known):
            return False
        if known and max(as_of for _, as_of in known) >= since:
            return True
        if probe and self.prober is not None:
            self._want_end_offset(tp)
            if self.probe_failures:
                self.last_unknown = (tp, f"{self.probe_failures} probes failed", known)
                return None
            return ASKED
        self.last_unknown = (tp, "no probe", known)
        return None

    # -- end-offset probes -----------------------------------------------------------------
    def _want_end_offset(self, tp: TP) -> None:
        self.probe_wanted.add(tp)
        if self.prober is not None and (self.probing is None or self.probing.done()):
            self.probing = asyncio.ensure_future(self._probe_end_offsets())

    async def _probe_end_offsets(self) -> None:
        """Ask the broker for the end offsets of the partitions the merge waits on, one
        request at a time (the wants that pile up meanwhile go in the next), and have the
        merge go on with the answers. The requests go over this agent's own connection: on
        the consumer's, they would queue behind a fetch the broker holds for
        `fetch_max_wait`. Probing never waits for the agent's lock, so a worker busy with a
        slow commit still learns what its waiting heads need."""
        while self.probe_wanted:
            wanted, self.probe_wanted = self.probe_wanted, set()
            sent = _monotonic_ms()
            try:
                # aiokafka gives up after the client's request_timeout_ms (PROBE_TIMEOUT_MS); the
                # outer bound is for a connection that hangs anyway: the merge waits on this
                ends = await asyncio.wait_for(
                    self.prober.end_offsets([TopicPartition(tp.topic, tp.partition) for tp in wanted]),
                    2 * PROBE_TIMEOUT_MS / 1000)
            except asyncio.CancelledError:
                raise
            except Exception as exc:      # the broker is down or moving: merge_wait bounds the cost
                metrics.MERGE_END_OFFSET_PROBES.labels("failed").inc()
                if self.probe_failures % 50 == 0:
                    log.warning("merge: end-offset probe failed (%r, %d in a row); events wait at most "
                                "merge_wait for the other topic", exc, self.probe_failures + 1)
                self.probe_failures += 1
                self.probe_wanted |= wanted           # asked again after the pause
                await asyncio.sleep(PROBE_RETRY_S)
                continue
            self.probe_failures = 0
            metrics.MERGE_END_OFFSET_PROBES.labels("answered").inc()
            for atp, end in ends.items():
                tp = TP(atp.topic, atp.partition)
                if tp.partition in self.restored:      # still ours
                    self.end_offsets[tp] = (end, sent)
            self.release_wanted |= {tp.partition for tp in wanted}
            if self.releasing is None or self.releasing.done():
                self.releasing = asyncio.ensure_future(self._release_probed())

    async def _release_probed(self) -> None:
        """Apply what the probes' answers let go (under the lock, after whatever holds it)."""
        async with self.lock:
            if self.stopping:
                return
            while self.release_wanted:
                partitions, self.release_wanted = self.release_wanted, set()
                for partition in sorted(partitions & set(self.merge.waiting_partitions())):
                    await self._release(partition)
            if self._batch_full():
                await self._commit()

    def _export_merge_stats(self) -> None:
        stats = self.merge.stats
        for wait_ms in stats.take_waits():
            metrics.MERGE_WAIT_SECONDS.observe(wait_ms / 1000)
        forced = stats.take_forced()
        for cause, count in forced.items():
            metrics.MERGE_FORCED.labels(cause).inc(count)
        if forced and time.monotonic() - self.forced_logged_at > 10:
            # Outside a broker outage a forced release is a defect (an event applied possibly
            # out of ts order): say why the other topic's answer was unknown.
            self.forced_logged_at = time.monotonic()
            tp, why, known = self.last_unknown or (None, "?", [])
            log.warning("merge: %s released out of ts order without knowing the other topic (%s: %s; "
                        "position %s, known ends %s)", dict(forced), tp and f"{tp.topic}[{tp.partition}]", why,
                        tp and self._position(tp), known)
