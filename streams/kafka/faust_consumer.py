"""A Faust consumer that never skips records fetched during recovery.

The trap (faust-streaming 0.15.3; upstream issues #216 and #629 describe its relatives):
while a worker restores its tables after an assignment, its fetcher already runs for the
assigned input partitions, and the records it fetches land in the agents' channel queues.
Those queues are created with `clear_on_resume=True`, so when recovery ends and flow
control resumes, the records are thrown away; Faust relies on `perform_seek` to rewind
every partition to its committed offset and fetch them again. But a partition with *no*
committed offset (a new consumer group, or a worker killed before its first commit) is not
rewound at all (`seek_to_committed` skips it), so the fetcher carries on after the records
it dropped and they are never processed. In tagstream's SIGKILL test this lost whole
contact-event partitions.

`RewindingConsumer.perform_seek` rewinds such partitions to their earliest offset, which
is what `auto_offset_reset=earliest` promises for a partition with no committed offset, and
remembers it in `rewound_to`. `BatchingConsumer.next_offsets` then holds, per partition,
the offset of the first record the handler will receive, which the agent's event-time merge
needs to tell "records waiting" from "caught up" before anything has arrived
(agents/customers.py, `_caught_up`).
"""
from __future__ import annotations

import time
from typing import Optional

from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP

from streams.observability import metrics


class RewindingConsumer(faust_aiokafka.Consumer):
    #: partition without a committed offset -> the earliest offset it was rewound to
    rewound_to: dict = {}

    async def perform_seek(self) -> None:
        await super().perform_seek()
        changelogs = self.app.tables.changelog_topics
        uncommitted = [tp for tp in self.assignment()
                       if self._committed_offset.get(tp) is None and tp.topic not in changelogs]
        self.rewound_to = {}
        if uncommitted:
            earliest = await self._thread.earliest_offsets(*uncommitted)
            await self._thread.seek_wait(earliest)
            self.rewound_to = dict(earliest)
            self.log.info("rewound %d input partitions without a committed offset to their "
                          "earliest offset", len(uncommitted))


def continuing(batches: dict, next_offsets: dict, refetching: frozenset) -> tuple[dict, dict, frozenset]:
    """Which fetched batches continue each partition's sequence (see `BatchingConsumer`).

    `batches`: {tp: [record, ...]} in offset order; `next_offsets`: {tp: the offset the
    handler is to receive next}; `refetching`: partitions sought back to it since their last
    batch. Returns (the batches to hand over, with records before `next_offsets` cut off;
    {tp: offset} to seek back to, for batches that start past it; the new `refetching`).
    A partition without a next offset is not this generation's: its batch is dropped."""
    handed, seek_back = {}, {}
    for tp, batch in batches.items():
        expected = next_offsets.get(tp)
        if expected is None:
            continue
        if batch[0].offset < expected:
            batch = [record for record in batch if record.offset >= expected]
            if not batch:
                continue
        if batch[0].offset > expected and tp not in refetching:
            seek_back[tp] = expected
            continue
        handed[tp] = batch
    return handed, seek_back, frozenset(seek_back) | (refetching - set(handed))


#: How long the broker may hold a fetch with no data. Faust fixes 1,500 ms; while a fetch
#: for quiet partitions waits, aiokafka fetches nothing new for the busy ones, which showed
#: as 1.5 s spikes in real-time latency at steady load (docs/performance.md).
FETCH_MAX_WAIT_MS = 100


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport):
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS     # read when the consumer starts
        # The enrichment writes events in transactions (streams/wecom/enrich.py): an aborted
        # one's events must never be applied. Faust reads committed only under exactly_once.
        consumer._isolation_level = "read_committed"
        return consumer


class BatchingConsumer(RewindingConsumer):
    """Hands whole fetched batches of some topics to one handler, outside Faust's streams.

    Faust delivers every record on its own: a `Message` and an `Event` object, a callback
    under a lock, a channel queue, the stream iterator, sensors, an ack; on this machine that
    path alone costs more than a raw aiokafka consumer spends on a record in total
    (docs/performance.md). For the topics in `batch_topics`, this consumer takes the records
    as aiokafka fetched them, per partition, and awaits `batch_handler(records)` instead; the
    handler's `await` is the fetcher's back-pressure. Everything else stays Faust's: the
    group, the co-partitioned assignment, flow control during rebalances and recovery,
    seeking, and the commit loop, which commits the handler's `committable` offsets (the
    next offset to read per partition) instead of acked messages.

    Until `batch_ready()` is true (the worker's rule book is loaded), fetched batches are not
    handed over: their partitions are rewound and paused (`held`), and resumed once ready.
    Waiting inside the handler instead would stall this consumer's other topics, among them
    the rules topic whose fold the handler would be waiting for; rewinding without pausing
    fetched the same records again and again, which under a fetch quota starved the rules
    topic too.

    **Every record once, in order.** The handler sees each partition's records as one
    contiguous sequence, starting where the group's committed offset (or the rewind) says,
    with nothing skipped. aiokafka moves a partition's position as soon as it returns
    records, and Faust drops returned records in several places (a partition not active yet,
    flow stopped, a generation changed); it repairs that for its own streams with the seek
    after each assignment. But after an assignment Faust resumes the stream partitions
    *before* that seek, and a batch handed over from the old position, followed by the
    seek's batch, looked like "records already taken" to the handler: a dropped batch's
    records were never applied, and the batch after it was applied ahead of them (the
    chaos run's lost stretches, issue 16). So this consumer keeps `next_offsets`, the offset
    the handler is to receive next per partition: set by `perform_seek` for the generation it
    ran in, advanced by each batch handed over. Before that seek nothing is handed over. A
    batch that starts past `next_offsets` (records were dropped on the way) is not handed
    over: the partition is sought back and fetched again (counted in
    `tagstream_input_refetches_total`). Only a batch fetched right after such a seek may
    start later, because then the log itself has no records in between (transaction markers,
    compaction). A batch this consumer drops itself (its partition not active) is sought
    back at once.
    """

    def _new_consumer_thread(self):
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    # set by `install`
    batch_topics: frozenset = frozenset()
    batch_handler = None          # async (dict[TP, list[ConsumerRecord]]) -> None
    batch_ready = staticmethod(lambda: True)     # () -> bool: may batches be handed over?
    committable: dict = {}        # the handler's; never mutated here

    held: frozenset = frozenset()     # partitions paused until `batch_ready()`
    # partitions the agent's merge paused (back-pressure: the other topic is behind); the
    # agent pauses and resumes them (agents/customers.py, `_balance_fetching`)
    merge_paused: set = None
    # set by `perform_seek` (instance attributes from then on; see the class docstring)
    next_offsets: dict = {}       # TP -> the offset the handler is to receive next
    skipped: dict = {}            # TP -> (first, end): the last run of offsets no fetch returned (markers)
    positioned_generation: Optional[int] = None    # the generation `next_offsets` belong to
    refetching: frozenset = frozenset()   # partitions sought back to `next_offsets` since their last batch

    async def perform_seek(self) -> None:
        generation = self.app.consumer_generation_id
        self.positioned_generation = None        # nothing is handed over while seeking
        await super().perform_seek()
        next_offsets = {}
        for tp in self.assignment():
            if tp.topic in self.batch_topics:
                start = self._committed_offset.get(tp)
                if start is None:
                    start = self.rewound_to.get(tp)
                if start is None:                # neither committed nor rewound: ask the client
                    start = await self._thread.position(tp)
                next_offsets[tp] = start
        # Batches dropped while this ran (nothing is handed over until it ends) moved the
        # positions: put them back where the handler starts.
        await self._thread.seek_wait(next_offsets)
        self.next_offsets, self.refetching, self.skipped = next_offsets, frozenset(), {}
        self.handed_at = time.monotonic()
        if generation == self.app.consumer_generation_id:
            self.positioned_generation = generation

    #: how long input records may wait unhanded, with the rule book ready, before the
    #: consumer says so (and, if this generation was never positioned, positions it)
    STALL_S = 20.0
    handed_at: float = 0.0        # monotonic time of the last batch handed over (or of the seek)
    watched_at: float = 0.0

    def _watch_progress(self) -> None:
        """Every few seconds: are records waiting on an input partition while nothing has
        been handed over for `STALL_S`? Then say why, in one warning with the consumer's
        state, so a stall is never silent; a generation that was never positioned (its seek
        was cut short) is positioned now, since until then every batch is dropped."""
        now = time.monotonic()
        if now - self.watched_at < 5 or not self.batch_ready() or now - self.handed_at < self.STALL_S:
            return
        self.watched_at = now
        waiting = {tp: (self.next_offsets.get(tp), self.highwater(tp)) for tp in self.assignment()
                   if tp.topic in self.batch_topics and self.highwater(tp) is not None
                   and self.next_offsets.get(tp) is not None and self.highwater(tp) > self.next_offsets[tp]}
        if not waiting:
            return
        generation = self.app.consumer_generation_id
        metrics.INPUT_STALLS.inc()
        self.log.warning(
            "no input handed over for %.0f s while %d partitions have records waiting (e.g. %s): "
            "generation %s, positioned %s, flow %s, rebalancing %s, paused %d, held %d, refetching %d",
            now - self.handed_at, len(waiting),
            ", ".join(f"{tp.topic}[{tp.partition}] next {a} end {b}" for tp, (a, b) in sorted(waiting.items())[:3]),
            generation, self.positioned_generation, "active" if self.flow_active else "stopped", self.app.rebalancing,
            len(self._paused_partitions), len(self.held), len(self.refetching))
        # (A generation is positioned at the end of Faust's recovery: while it runs, no seek.)
        if (self.flow_active and self.positioned_generation != generation and not self.seeking
                and not self.app.rebalancing):
            self.log.warning("positioning generation %s now: its seek never completed", generation)
            self.seeking = True
            self.add_future(self._position_now())
        elif self.flow_active and self.positioned_generation == generation:
            # Seen in the cluster chaos run: every input partition of a worker left paused
            # after a rebalance (Faust pauses the assignment when a rebalance starts, and its
            # recovery resumes it; a recovery cut short by the next rebalance can skip that).
            # This generation is positioned, so fetching may go on from `next_offsets`.
            stuck = {tp for tp in self.assignment() if tp.topic in self.batch_topics
                     and tp in self._paused_partitions and tp not in self.held and tp not in (self.merge_paused or ())}
            if stuck:
                self.log.warning("resuming %d input partitions left paused after the rebalance", len(stuck))
                metrics.INPUT_STALLS_REPAIRED.inc()
                self.resume_partitions(stuck)

    seeking: bool = False

    async def _position_now(self) -> None:
        try:
            await self.perform_seek()
        finally:
            self.seeking = False

    async def _wait_next_records(self, timeout: float):
        self._watch_progress()
        if self.held and self.batch_ready():
            self.resume_partitions({tp for tp in self.assignment() if tp in self.held})
            self.log.info("rule book ready: resumed %d held input partitions", len(self.held))
            self.held = frozenset()
        records, active = await super()._wait_next_records(timeout)
        generation = self.app.consumer_generation_id
        consumed = self._consumed_positions()
        if not records or not self.batch_topics:
            self._past_skipped_offsets(consumed, generation, set())
            return records, active
        taken = {tp: batch for tp, batch in records.items() if tp.topic in self.batch_topics and batch}
        for tp in taken:
            del records[tp]
        # What Faust's getmany would do with them: drop them while flow is stopped (a
        # rebalance seeks back to the committed offsets) or for a paused partition; and,
        # until this generation's seek, drop everything.
        if not (self.flow_active and generation == self.positioned_generation):
            return records, active
        inactive = {tp: self.next_offsets[tp] for tp in taken if tp in self.next_offsets and not (
            active is None or tp in active or tp in self._buffered_partitions)}
        if inactive:                             # fetched again once active, from where the handler is
            await self._thread.seek_wait(inactive)
            self.refetching |= set(inactive)
        taken = await self._contiguous({tp: batch for tp, batch in taken.items() if tp not in inactive})
        if taken and self.flow_active and generation == self.app.consumer_generation_id:
            if not self.batch_ready():
                await self._thread.seek_wait({tp: batch[0].offset for tp, batch in taken.items()})
                paused = {TP(tp.topic, tp.partition) for tp in taken}    # Faust's TP, not aiokafka's
                self.pause_partitions(paused)
                self.log.info("holding %d input partitions until the rule book is ready", len(paused))
                self.held |= paused
                return records, active
            for tp, batch in taken.items():
                self.next_offsets[tp] = batch[-1].offset + 1
            self._past_skipped_offsets(consumed, generation, set(inactive) | self.last_seek_back)
            self.handed_at = time.monotonic()
            await self.batch_handler(taken)
            for tp, batch in taken.items():
                self._read_offset[tp] = batch[-1].offset
        elif not taken:
            self._past_skipped_offsets(consumed, generation, set(inactive) | self.last_seek_back)
        return records, active

    last_seek_back: set = set()

    def _consumed_positions(self) -> dict:
        """aiokafka's consumed position of each batch partition right after a fetch: past the
        records it returned and past the control records (transaction markers) and aborted
        records it skipped, which are never returned."""
        try:
            assignment = self._thread._ensure_consumer()._subscription.subscription.assignment
        except Exception:                  # no consumer or no assignment yet (a rebalance)
            return {}
        if assignment is None:
            return {}
        positions = {}
        for tp in self.next_offsets:
            try:
                state = assignment.state_value(tp)
            except Exception:
                continue
            if state is not None and state.has_valid_position:
                positions[tp] = state.position
        return positions

    def _past_skipped_offsets(self, consumed: dict, generation: int, sought_back: set) -> None:
        """Move `next_offsets` past offsets that hold no record for the handler: a
        transaction's commit marker is an offset no fetch returns, so without this a
        partition written in transactions (the WeCom enrichment's) looks forever one record
        behind its end, and the merge waits for a record that will never come. Only for
        partitions whose records of this fetch were all handed over (none sought back)."""
        if not (self.flow_active and generation == self.positioned_generation == self.app.consumer_generation_id):
            return
        for tp, position in consumed.items():
            if tp not in sought_back and position > self.next_offsets.get(tp, position):
                start, end = self.skipped.get(tp, (None, None))
                self.skipped[tp] = (start if end == self.next_offsets[tp] else self.next_offsets[tp], position)
                self.next_offsets[tp] = position

    async def _contiguous(self, taken: dict) -> dict:
        """The batches that continue where the handler left off; partitions whose batch
        started too late are sought back (`continuing`)."""
        handed, seek_back, self.refetching = continuing(taken, self.next_offsets, self.refetching)
        self.last_seek_back = set(seek_back)
        if seek_back:
            for tp in seek_back:
                metrics.INPUT_REFETCHES.labels(tp.topic).inc()
            self.log.info("fetching again from %s: records before the batch fetched were dropped on the way",
                          ", ".join(f"{tp.topic}[{tp.partition}]@{offset}" for tp, offset in sorted(seek_back.items())))
            await self._thread.seek_wait(seek_back)
        return handed

    def _filter_tps_with_pending_acks(self, topics=None):
        yield from super()._filter_tps_with_pending_acks(topics)
        for tp in list(self.committable):
            if tp not in self._acked and (topics is None or tp in topics or tp.topic in topics):
                yield tp

    def _new_offset(self, tp):
        if tp.topic not in self.batch_topics:
            return super()._new_offset(tp)
        return self.committable.get(tp)


def install(app, *, batch_topics=(), batch_handler=None, batch_ready=lambda: True, committable=None) -> None:
    """Make `app` create a `BatchingConsumer` that hands `batch_topics` to `batch_handler`
    once `batch_ready()`, and commits `committable` for them (call before the app's consumer
    exists)."""
    app.transport.Consumer = type("BatchingConsumer", (BatchingConsumer,), {
        "batch_topics": frozenset(batch_topics), "batch_handler": batch_handler,
        "batch_ready": staticmethod(batch_ready),
        "committable": committable if committable is not None else {}})
