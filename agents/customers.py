"""Per-customer processing: tag events and contact events, merged in event time, applied by
the reporting engine (`streams.semantics`) to state in changelogged tables.

Both event topics are keyed by `corp_id:external_userid` and have the same partition count,
so partition N of each lands on the same worker. Kafka orders each topic partition but not
the two topics against each other, so arriving events go through `streams.merge` first and
are applied in `ts` order (contacts first on ties). The stream runs without automatic acks:
an event is acked only once it has been applied, so a buffered event is never committed
past, and a crash or rebalance re-delivers it.

State lives in one changelogged table, `reporting_state`, partitioned like the input topics:
- `c:corp_id:external_userid` -> CustomerState
- `k:partition`               -> PartitionClock (stream time, hold-index range)
- `h:partition:bucket`        -> [(deadline, customer, type)] due in that minute
- `o:topic:partition`         -> offset of the last input record applied

- `j:partition`               -> the journal of the last commit: every write it made

The `o:` marker makes application exactly-once per input record: it is written after the
state it covers (same changelog partition, so Kafka keeps the order), and a record at or
below it is skipped when Kafka re-delivers it after a crash. Event-id dedupe (SPEC rule 1)
then only has to catch real duplicates from upstream, and its horizon never matters for
redeliveries.

The `j:` journal makes each commit atomic. Steps are applied in batches (group commit: the
reports of every step are sent at once, and once per batch the agent waits for the broker's
acks, writes the state, then acks the events). A batch writes many keys (clocks, hold-index
buckets, customers, markers), and a crash can cut the changelog anywhere in between: the
index emptied but the customer still holding, say. So each commit first writes, per
partition, one record holding all the batch's writes, then the writes themselves. The
changelog then always ends in "all of batch k, the journal of batch k+1, a prefix of batch
k+1's writes", and replaying the journal when a partition is taken over completes batch k+1.
Replaying is idempotent.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections import deque
from typing import Iterator, Optional

import orjson
from faust.streams import _current_event  # the context Faust's tables read the partition from
from faust.types import TP

from agents.dead_letters import park
from agents.rules import RuleReplica
from schemas.validation import Rejection, decode_contact_event, decode_tag_event
from streams import metrics
from streams.merge import CoPartitionMerge
from streams.semantics import (
    CustomerState, HoldEntry, PartitionClock, ReportingEngine, ReportingPolicy, StepResult)


log = logging.getLogger(__name__)


#: A commit's journal holds every write of the batch in one changelog record; commit before
#: it nears Kafka's default 1 MB message limit.
JOURNAL_MAX_BYTES = 256 * 1024


def _now_ms() -> int:
    return int(time.time() * 1000)


class TableStore:
    """The engine's `StateStore` on one changelogged Faust table, with write-behind.

    Customer states, partition clocks and hold-index buckets share the `reporting_state`
    table under prefixed keys, so all writes for partition N go to partition N of one
    changelog topic, where Kafka keeps them in order: if a customer's state survived a
    crash, the index entries written before it did too.

    Writes are held in `pending` (per partition: the one the agent is working on is
    `self.partition`) until `flush(partition)`. The agent flushes a batch of steps only after
    their reports are acknowledged by the broker, so the state can never say "reported" for
    a report that was lost; a crash in between re-sends instead (duplicates on the topic,
    removed by the sink's acknowledged-id record).
    """

    def __init__(self, table):
        self.table = table
        self.partition = 0
        self.pending_by_partition: dict[int, dict[bytes, Optional[bytes]]] = {}
        self.pending_bytes = 0            # an upper bound of the next journals' size

    @property
    def pending(self) -> dict[bytes, Optional[bytes]]:
        """Unflushed writes of the current partition."""
        pending = self.pending_by_partition.get(self.partition)
        if pending is None:
            pending = self.pending_by_partition[self.partition] = {}
        return pending

    def dirty_partitions(self) -> list[int]:
        return [p for p, pending in self.pending_by_partition.items() if pending]

    def _get(self, key: bytes) -> Optional[bytes]:
        if key in self.pending:
            return self.pending[key]
        return self.table.get(key)

    def applied_offset(self, tp: TP) -> Optional[int]:
        stored = self._get(b"o:%s:%d" % (tp.topic.encode(), tp.partition))
        return int(stored) if stored is not None else None

    def mark_applied(self, tp: TP, offset: int) -> None:
        key = b"o:%s:%d" % (tp.topic.encode(), tp.partition)
        self.pending.pop(key, None)          # re-insert: written after everything it covers
        self.pending[key] = b"%d" % offset

    def flush(self, partition: int) -> None:
        """Write the partition's pending steps to the table: one journal with all their
        writes first, then the writes."""
        pending = self.pending_by_partition.pop(partition, None)
        if not self.pending_by_partition:
            self.pending_bytes = 0
        if not pending:
            return
        self.table[b"j:%d" % partition] = orjson.dumps(
            [[key.decode(), None if value is None else value.decode()]
             for key, value in pending.items()])
        self._write(pending.items())

    def replay_journal(self, partition: int) -> int:
        """Complete the last step of `partition` a crash may have cut short (see module
        docstring). Returns how many writes were replayed."""
        journal = self.table.get(b"j:%d" % partition)
        if journal is None:
            return 0
        writes = [(key.encode(), None if value is None else value.encode())
                  for key, value in orjson.loads(journal)]
        self._write(writes)
        return len(writes)

    def _write(self, writes) -> None:
        table = self.table
        for key, value in writes:
            if value is not None:
                table[key] = value
            elif key in table:
                del table[key]

    def customer(self, key: str) -> CustomerState:
        return CustomerState.decode(self._get(b"c:" + key.encode()))

    def put_customer(self, key: str, state: CustomerState) -> None:
        encoded = state.encode()
        self.pending_bytes += len(encoded) + len(key)
        self.pending[b"c:" + key.encode()] = encoded

    def clock(self, partition: int) -> PartitionClock:
        return PartitionClock.decode(self._get(b"k:%d" % partition))

    def put_clock(self, partition: int, clock: PartitionClock) -> None:
        self.pending[b"k:%d" % partition] = clock.encode()

    def bucket(self, partition: int, bucket: int) -> list[HoldEntry]:
        stored = self._get(b"h:%d:%d" % (partition, bucket))
        return [tuple(e) for e in orjson.loads(stored)] if stored else []

    def put_bucket(self, partition: int, bucket: int, entries: list[HoldEntry]) -> None:
        self.pending[b"h:%d:%d" % (partition, bucket)] = orjson.dumps(entries) if entries else None


class _Message:
    __slots__ = ("topic", "partition", "tp", "offset", "timestamp", "__weakref__")

    def __init__(self, topic: str, partition: int):
        self.topic, self.partition, self.tp = topic, partition, TP(topic, partition)
        self.offset, self.timestamp = -1, 0.0


class _PartitionContext:
    """What Faust's tables read from the current event: the partition to store under."""
    __slots__ = ("message", "__weakref__")

    def __init__(self, topic: str, partition: int):
        self.message = _Message(topic, partition)


class CustomerEvents:
    """The agent over tag-events + contact-events, and the timer for waiting work."""

    def __init__(self, app, *, store: TableStore, replica: RuleReplica, policy: ReportingPolicy,
                 tag_events_topic: str, contact_events_topic: str, merge_wait_ms: int,
                 conversion_reports, unreportable, dead_letters, batch_max: int = 500,
                 batch_linger_ms: int = 50):
        self.app = app
        self.replica = replica
        self.store = store
        self.engine = ReportingEngine(store, replica.book.rule_as_of, policy)
        self.tag_events_topic = tag_events_topic
        self.decoders = {tag_events_topic: decode_tag_event, contact_events_topic: decode_contact_event}
        self.merge: CoPartitionMerge = CoPartitionMerge(
            (contact_events_topic, tag_events_topic), max_wait_ms=merge_wait_ms)
        self.conversion_reports = conversion_reports
        self.unreportable = unreportable
        self.dead_letters = dead_letters
        self.seen: dict[TP, int] = {}       # last offset received per input partition
        self.applied: dict[TP, Optional[int]] = {}  # last offset applied, from the state table
        self.contexts: dict[int, _PartitionContext] = {}
        self.journal_replayed: set[int] = set()  # partitions whose journal was replayed since assignment
        self.lock = asyncio.Lock()          # the agent and the timer take turns
        self.stream = None
        # Group commit: steps applied since the last commit. Their reports are sent at
        # once; the broker's acks are awaited, the state flushed and the events acked once
        # per batch (see `_commit`).
        self.batch_max = batch_max
        self.batch_linger_s = batch_linger_ms / 1000
        self.batch_started: Optional[float] = None
        self.batch_events: list = []
        self.batch_deliveries: list = []
        self.unacked: dict[TP, deque] = {}  # per input partition, received events in offset order

    # -- Faust entry points --------------------------------------------------------------
    async def agent(self, stream) -> None:
        self.stream = stream.noack()
        async for event in self.stream.events():
            if not self.replica.ready.is_set():
                # Rules must be loaded before the first lookup, or early events would look unmapped.
                await self.replica.ready.wait()
            message = event.message
            async with self.lock:
                self.seen[message.tp] = message.offset
                entry = self._receive(event)
                if self._already_applied(message.tp, message.offset):
                    metrics.EVENTS.labels(message.topic, "redelivered").inc()
                    await self._finish([entry])
                    continue
                decoded = self.decoders[message.topic](message.key, message.value)
                if isinstance(decoded, Rejection):
                    await park(self.dead_letters, message, decoded)
                    await self._finish([entry])
                    continue
                self.merge.offer(message.partition, message.topic, decoded.ts, (entry, decoded), _now_ms())
                await self._release(message.partition)
                if self._batch_full():
                    await self._commit()

    async def tick(self) -> None:
        """Timer: apply events that waited `merge_wait` for the other topic, and release
        holds of idle partitions once wall-clock time is `idle_grace` past their deadline."""
        if self.stream is None:
            return
        async with self.lock:
            for partition in self.merge.waiting_partitions():
                await self._release(partition)
            wall = _now_ms()
            for partition in self._assigned_partitions():
                if self._idle(partition):
                    with self._applying(partition):
                        result = self.engine.on_idle(partition, wall, wall)
                    await self._stage(result, wall)
            await self._commit()

    async def drain(self) -> None:
        """Before a graceful stop: commit the open batch, and from now on commit after every
        event, so a stopped worker leaves nothing applied but unacked (Faust abandons
        unacked events at shutdown, and a restart would apply them again)."""
        async with self.lock:
            self.batch_max = 1
            await self._commit()

    async def on_partitions_revoked(self, revoked) -> None:
        async with self.lock:
            await self._commit()
            for tp in revoked:
                self.unacked.pop(tp, None)      # never acked: the new owner consumes them again
                self.seen.pop(tp, None)
                self.applied.pop(tp, None)
                self.merge.forget(tp.partition)
                self.journal_replayed.discard(tp.partition)

    # -- internals -----------------------------------------------------------------------
    def held_reports(self, partition: int) -> int:
        """Running holds of `partition`, as its clock in the state table counts them."""
        with self._partition(partition):
            return self.store.clock(partition).held

    @contextlib.contextmanager
    def _partition(self, partition: int) -> Iterator[None]:
        """Make Faust's tables read and store under `partition`, even when the work is done
        later than the event's arrival (merge release) or without an event (timers)."""
        context = self.contexts.get(partition)
        if context is None:
            context = self.contexts[partition] = _PartitionContext(self.tag_events_topic, partition)
        token = _current_event.set(weakref.ref(context))
        previous, self.store.partition = self.store.partition, partition
        try:
            yield
        finally:
            self.store.partition = previous
            _current_event.reset(token)

    @contextlib.contextmanager
    def _applying(self, partition: int) -> Iterator[None]:
        """`_partition`, for a step: the first step after an assignment completes the last
        step a crash may have cut short."""
        with self._partition(partition):
            if partition not in self.journal_replayed:
                replayed = self.store.replay_journal(partition)
                self.journal_replayed.add(partition)
                if replayed:
                    log.info("partition %d: replayed %d writes of the last step's journal", partition, replayed)
            yield

    async def _release(self, partition: int) -> None:
        def caught_up(source: str) -> Optional[bool]:
            return self._caught_up(TP(source, partition))
        released = list(self.merge.release(partition, caught_up, _now_ms()))
        for cause, count in self.merge.forced.items():
            metrics.MERGE_FORCED.labels(cause).set(count)
        for entry, decoded in released:
            event = entry[0]
            now_ms = _now_ms()
            with self._applying(partition):
                result = self.engine.on_event(partition, decoded, now_ms)
                self.store.mark_applied(event.message.tp, event.message.offset)
            self.applied[event.message.tp] = event.message.offset
            metrics.EVENTS.labels(event.message.topic, result.outcome).inc()
            await self._stage(result, now_ms)
            self.batch_events.append(entry)

    async def _stage(self, result: StepResult, now_ms: int) -> None:
        """Send a step's reports now (real-time reports are not held back by the batch);
        their acknowledgements are awaited by `_commit`."""
        for report in result.reports:
            self.batch_deliveries.append(await self.conversion_reports.send(
                key=report.outer_action_id.encode(), value=orjson.dumps(report.as_wire()), force=True))
            metrics.observe_report(report, now_ms)
        for report in result.unreportable:
            self.batch_deliveries.append(await self.unreportable.send(
                key=report.outer_action_id.encode(), value=orjson.dumps(report.as_wire()), force=True))
            metrics.UNREPORTABLE.labels(report.standard_type, report.reason).inc()

    async def _commit(self) -> None:
        """End the batch: wait until the broker has every report sent, then write the
        state of each touched partition (one journal per partition), then ack the events.
        So the state never says "reported" for a lost report, and Faust never commits an
        offset whose step is not in the state."""
        if self.batch_deliveries:
            deliveries, self.batch_deliveries = self.batch_deliveries, []
            await asyncio.gather(*deliveries)
        for partition in self.store.dirty_partitions():
            with self._applying(partition):
                self.store.flush(partition)
        entries, self.batch_events = self.batch_events, []
        self.batch_started = None
        await self._finish(entries)

    # Acks go to Faust strictly in offset order per partition. Faust commits the first run of
    # consecutive acked offsets, and for a partition whose committed offset is 0 or unknown
    # it does not check that the run starts at the committed offset: acking offset 6 (a dead
    # letter) while offset 5 waits in the merge buffer could commit past 5 and lose it.
    def _receive(self, event) -> list:
        entry = [event, False]                          # [event, done]
        self.unacked.setdefault(event.message.tp, deque()).append(entry)
        return entry

    async def _finish(self, entries: list) -> None:
        """Mark events done, then ack every done event at the head of its partition."""
        for entry in entries:
            entry[1] = True
        for tp in {entry[0].message.tp for entry in entries}:
            queue = self.unacked.get(tp)
            while queue and queue[0][1]:
                await self.stream.ack(queue.popleft()[0])

    def _batch_full(self) -> bool:
        """Commit at `batch_max` events, after `batch_linger`, or before the journal grows
        past `JOURNAL_MAX_BYTES` (Kafka's default message limit is 1 MB); the timer commits
        whatever is left when events stop coming."""
        if not self.batch_events:
            return False
        if self.batch_started is None:
            self.batch_started = time.monotonic()
        return (len(self.batch_events) >= self.batch_max or self.store.pending_bytes >= JOURNAL_MAX_BYTES
                or time.monotonic() - self.batch_started >= self.batch_linger_s)

    def _already_applied(self, tp: TP, offset: int) -> bool:
        """Re-delivered after a crash: the state already covers this record."""
        if tp not in self.applied:
            with self._applying(tp.partition):
                self.applied[tp] = self.store.applied_offset(tp)
        applied = self.applied[tp]
        return applied is not None and offset <= applied

    def _assigned_partitions(self) -> list[int]:
        return sorted(tp.partition for tp in self.app.consumer.assignment()
                      if tp.topic == self.tag_events_topic)

    def _idle(self, partition: int) -> bool:
        """No event of this partition is waiting or still unread on either topic."""
        if partition in self.merge.waiting_partitions():
            return False
        return all(self._caught_up(TP(source, partition)) is True for source in self.merge.sources)

    def _caught_up(self, tp: TP) -> Optional[bool]:
        """Has this worker received every record of `tp` up to its log end? True, False
        (records are known to be waiting), or None (cannot tell yet)."""
        consumer = self.app.consumer
        log_end = consumer.highwater(tp)
        if log_end is None:
            return None                     # not fetched yet
        seen = self.seen.get(tp)
        if seen is None:
            # Nothing received since assignment: we start at the committed offset, which
            # Faust records when it seeks after an assignment.
            committed = consumer._committed_offset.get(tp)  # noqa: SLF001
            if committed is None:
                return True if log_end == 0 else None
            seen = committed - 1
        return seen + 1 >= log_end
