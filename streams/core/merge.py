"""Event-time merge of the two co-partitioned input topics, per partition number.

Kafka orders records within one topic partition, but not across topics: a customer's
contact event on `contact-events` and their next tag event on `tag-events` may reach the
worker in either order. Like Kafka Streams (which picks, among the heads of a task's input
partitions, the record with the smallest timestamp), tagstream buffers the heads of both
topics' partition N and releases them in `ts` order; at equal `ts`, the source listed
first wins (contacts before tags: an identity recorded at the same millisecond as a tag
counts for it). Each topic's own offset order is never changed.

**When a head may go while the other topic's buffer is empty.** Only once the worker
knows that the other partition holds nothing unread that was already in the log when the
head arrived. A record that was appended before the head (a contact event produced, and
acknowledged, before the tag) is below the other partition's end offset as of any moment
after the head arrived; so the head goes when the other partition has been received up
to an end offset *learned after the head arrived* (`caught_up(source, since=arrived)`).
An end offset learned earlier (the high-water mark of the last fetch response) proves
nothing: under live load it predates the records written since, and applying the tag
then lost its report (issue 16). `caught_up` answers:

- True: received up to an end offset learned at or after `since`;
- False: records are known to be waiting (received less than any known end offset): wait
  for them, however long the worker is busy elsewhere;
- `ASKED`: not known yet, and the broker has been asked (a ListOffsets "probe", see
  agents/customers.py): wait for its answer; the agent calls `release` again when it comes.
  A slow answer is not an outage: on a loaded secured cluster a probe can take longer than
  `merge_wait`, and counting that wait as one forced thousands of heads out of ts order
  (the cluster chaos run of issue 19). The probe itself times out, so this wait is bounded;
- None: not known, and the broker is not answering (the last probe failed). The head waits
  at most `max_wait_ms` (the `merge_wait` setting) from the first time the merge found the
  answer unknown this way, and then goes anyway, counted in `forced["max_wait"]`.

This is Kafka Streams' KIP-695 decision (wait while the other partition's lag is unknown
or non-zero, up to `max.task.idle.ms`) with one difference: Kafka Streams trusts the lag
from the consumer's last fetch response, which can be older than the head; tagstream
requires end-offset knowledge younger than the head.

A partition buffering more than `max_buffered` events is drained regardless (counted in
`forced["max_buffered"]`), so a stalled topic cannot exhaust memory.

Plain Python: no Faust, no Kafka. The agent supplies `caught_up` and a monotonic clock.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Generic, Hashable, Iterator, Optional, TypeVar, Union

Item = TypeVar("Item")

#: `caught_up`'s answer while the broker's answer is on its way (see the module docstring)
ASKED = "asked"
#: caught_up(source, since_ms) -> True / False / ASKED / None, as the module docstring says
CaughtUp = Callable[[Hashable, float], Union[bool, str, None]]
#: () -> now, in the milliseconds of the arrival times given to `offer` (monotonic)
Clock = Callable[[], float]

# A buffered head: (ts, arrived_ms, item). A tuple, not an object: this is per event.
TS, ARRIVED, ITEM = 0, 1, 2


@dataclass
class MergeStats:
    """What the merge decided, for the metrics: how long each hold lasted (a partition's
    next event held back for the other topic, from the first time the merge found it
    blocked until it went), and events released without knowing the other side."""
    waited_ms: list = field(default_factory=list)     # one entry per hold, until taken
    forced: dict = field(default_factory=lambda: {"max_wait": 0, "max_buffered": 0})

    exported: dict = field(default_factory=lambda: {"max_wait": 0, "max_buffered": 0})

    def take_waits(self) -> list:
        waits, self.waited_ms = self.waited_ms, []
        return waits

    def take_forced(self) -> dict:
        """Forced releases since the last call, by cause (for a counter's `inc`)."""
        new = {cause: n - self.exported[cause] for cause, n in self.forced.items() if n > self.exported[cause]}
        self.exported = dict(self.forced)
        return new


@dataclass
class PartitionMerge(Generic[Item]):
    """The merge buffer of one partition number."""
    sources: tuple[Hashable, ...]
    buffers: dict = field(default_factory=dict)
    blocked: Optional[list] = None      # the hold of the first head, see `_hold`

    def __post_init__(self) -> None:
        self.buffers = {source: deque() for source in self.sources}

    def offer(self, source: Hashable, ts: int, item: Item, now_ms: float) -> None:
        self.buffers[source].append((ts, now_ms, item))

    def __len__(self) -> int:
        return sum(len(b) for b in self.buffers.values())

    def _hold(self, head: tuple, now_ms: float) -> list:
        """The hold of `head`: [head, first moment the merge found it blocked, first moment
        it was blocked on an unknown answer (or None)]."""
        if self.blocked is None or self.blocked[0] is not head:
            self.blocked = [head, now_ms, None]
        return self.blocked

    def release(self, caught_up: CaughtUp, clock: Clock, max_wait_ms: int, max_buffered: int,
                stats: MergeStats) -> Iterator[Item]:
        """Yield the items that may be applied now, in merge order. The consumer of this
        generator may take its time between items (an item's reports are sent, a commit is
        awaited), so the time is read from `clock` whenever it is needed, never once."""
        while True:
            heads = [(b[0][TS], rank, source) for rank, (source, b) in
                     enumerate(self.buffers.items()) if b]
            if not heads:
                return
            ts, _, source = min(heads)
            head = self.buffers[source][0]
            if len(heads) < len(self.sources):
                states = [caught_up(s, head[ARRIVED]) for s, b in self.buffers.items() if not b]
                if any(state is not True for state in states):
                    now_ms = clock()
                    hold = self._hold(head, now_ms)
                    unanswerable = all(state is True or state is None for state in states)
                    if unanswerable and hold[2] is None:
                        # `merge_wait` runs from here: not from the head's arrival (a worker
                        # busy with a large batch of other partitions may look at it seconds
                        # later; that delay is the worker's, not the broker's), nor from a
                        # wait for records known to be coming (once they came, the question
                        # is a new one)
                        hold[2] = now_ms
                    if len(self) > max_buffered:
                        stats.forced["max_buffered"] += 1
                    elif unanswerable and now_ms - hold[2] >= max_wait_ms:
                        stats.forced["max_wait"] += 1
                    else:
                        return
            self.buffers[source].popleft()
            if self.blocked is not None and self.blocked[0] is head:
                stats.waited_ms.append(clock() - self.blocked[1])
                self.blocked = None
            yield head[ITEM]


class CoPartitionMerge(Generic[Item]):
    """One `PartitionMerge` per partition number."""

    def __init__(self, sources: tuple[Hashable, ...], max_wait_ms: int, max_buffered: int = 10_000):
        self.sources = sources
        self.max_wait_ms = max_wait_ms
        self.max_buffered = max_buffered
        self.partitions: dict[int, PartitionMerge[Item]] = {}
        self.stats = MergeStats()

    @property
    def forced(self) -> dict:
        return self.stats.forced

    def offer(self, partition: int, source: Hashable, ts: int, item: Item, now_ms: float) -> None:
        merge = self.partitions.get(partition)
        if merge is None:
            merge = self.partitions[partition] = PartitionMerge(self.sources)
        merge.offer(source, ts, item, now_ms)

    def release(self, partition: int, caught_up: CaughtUp, clock: Clock) -> Iterator[Item]:
        """The items of `partition` that may be applied now, by `clock` (the clock of
        `offer`'s arrival times)."""
        merge = self.partitions.get(partition)
        if merge is not None:
            yield from merge.release(caught_up, clock, self.max_wait_ms, self.max_buffered, self.stats)

    def oldest(self, partition: int, source: Hashable) -> Optional[Item]:
        """The first item of `source` still buffered for `partition` (None if none)."""
        merge = self.partitions.get(partition)
        if merge is None or not merge.buffers[source]:
            return None
        return merge.buffers[source][0][ITEM]

    def fetch_balance(self, paused: set, paused_by_merge: set, pause_at: int,
                      resume_at: int) -> tuple[set, set]:
        """Back-pressure, not reordering: which (source, partition) pairs should stop fetching
        and which of those the merge paused may fetch again. A source whose buffer in one
        partition holds `pause_at` items (the other source is behind it) is paused unless
        already `paused`; one the merge paused (`paused_by_merge`) resumes once drained to
        `resume_at`, or once its partition is gone (revoked). Like Kafka Streams'
        `buffered.records.per.partition`; it keeps buffers far below `max_buffered`, where
        items would be forced out of order."""
        pause, resume = set(), set()
        for partition, merge in self.partitions.items():
            for source, queue in merge.buffers.items():
                key = (source, partition)
                if len(queue) >= pause_at and key not in paused:
                    pause.add(key)
                elif len(queue) <= resume_at and key in paused_by_merge:
                    resume.add(key)
        resume |= {key for key in paused_by_merge if key[1] not in self.partitions}
        return pause, resume

    def waiting_partitions(self) -> list[int]:
        return [p for p, merge in self.partitions.items() if len(merge)]

    def forget(self, partition: int) -> list[Item]:
        """Drop a revoked partition's buffer (its records were never acked, so they will be
        consumed again by whoever owns the partition next)."""
        merge = self.partitions.pop(partition, None)
        return [head[ITEM] for buffer in (merge.buffers.values() if merge else ()) for head in buffer]
