"""Event-time merge of the two co-partitioned input topics, per partition number.

Kafka orders records within one topic partition, but not across topics: a customer's
contact event on `contact-events` and their next tag event on `tag-events` may reach the
worker in either order. Like Kafka Streams (which picks, among the heads of a task's input
partitions, the record with the smallest timestamp), tagstream buffers the heads of both
topics' partition N and releases them in `ts` order; at equal `ts`, the source listed
first wins (contacts before tags: an identity recorded at the same millisecond as a tag
counts for it). Each topic's own offset order is never changed.

A head is released when every other source of its partition either has a later head
buffered or has nothing more to deliver (is caught up with its log end). `caught_up`
answers True, False (records are known to be waiting: keep waiting, however long the
worker is busy elsewhere) or None (unknown, e.g. before the first fetch): only then does
the head wait at most `max_wait_ms` of wall-clock time, the trade-off of Kafka Streams'
`max.task.idle.ms`. A partition buffering more than `max_buffered` events is drained
regardless, so a stalled topic cannot exhaust memory.

Plain Python: no Faust, no Kafka. The agent supplies `caught_up(source)` and the clock.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Generic, Hashable, Iterator, Optional, TypeVar

Item = TypeVar("Item")


# A buffered head: (ts, arrived_ms, item). A tuple, not an object: this is per event.
TS, ARRIVED, ITEM = 0, 1, 2


@dataclass
class PartitionMerge(Generic[Item]):
    """The merge buffer of one partition number."""
    sources: tuple[Hashable, ...]
    buffers: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.buffers = {source: deque() for source in self.sources}

    def offer(self, source: Hashable, ts: int, item: Item, now_ms: int) -> None:
        self.buffers[source].append((ts, now_ms, item))

    def __len__(self) -> int:
        return sum(len(b) for b in self.buffers.values())

    def release(self, caught_up: Callable[[Hashable], Optional[bool]], now_ms: int,
                max_wait_ms: int, max_buffered: int, forced: dict) -> Iterator[Item]:
        """Yield the items that may be applied now, in merge order. Heads released before
        the other topic is known to be caught up are counted in `forced`, by cause."""
        while True:
            heads = [(b[0][TS], rank, source) for rank, (source, b) in
                     enumerate(self.buffers.items()) if b]
            if not heads:
                return
            ts, _, source = min(heads)
            if len(heads) < len(self.sources):
                waiting_on = [s for s, b in self.buffers.items() if not b]
                head = self.buffers[source][0]
                states = [caught_up(s) for s in waiting_on]
                if not all(states):
                    if len(self) > max_buffered:
                        forced["max_buffered"] += 1
                    elif None in states and False not in states and now_ms - head[ARRIVED] >= max_wait_ms:
                        forced["max_wait"] += 1
                    else:
                        return
            yield self.buffers[source].popleft()[ITEM]


class CoPartitionMerge(Generic[Item]):
    """One `PartitionMerge` per partition number."""

    def __init__(self, sources: tuple[Hashable, ...], max_wait_ms: int, max_buffered: int = 10_000):
        self.sources = sources
        self.max_wait_ms = max_wait_ms
        self.max_buffered = max_buffered
        self.partitions: dict[int, PartitionMerge[Item]] = {}
        self.forced = {"max_wait": 0, "max_buffered": 0}

    def offer(self, partition: int, source: Hashable, ts: int, item: Item, now_ms: int) -> None:
        merge = self.partitions.get(partition)
        if merge is None:
            merge = self.partitions[partition] = PartitionMerge(self.sources)
        merge.offer(source, ts, item, now_ms)

    def release(self, partition: int, caught_up: Callable[[Hashable], Optional[bool]], now_ms: int) -> Iterator[Item]:
        merge = self.partitions.get(partition)
        if merge is not None:
            yield from merge.release(caught_up, now_ms, self.max_wait_ms, self.max_buffered, self.forced)

    def oldest(self, partition: int, source: Hashable) -> Optional[Item]:
        """The first item of `source` still buffered for `partition` (None if none)."""
        merge = self.partitions.get(partition)
        if merge is None or not merge.buffers[source]:
            return None
        return merge.buffers[source][0][ITEM]

    def waiting_partitions(self) -> list[int]:
        return [p for p, merge in self.partitions.items() if len(merge)]

    def forget(self, partition: int) -> list[Item]:
        """Drop a revoked partition's buffer (its records were never acked, so they will be
        consumed again by whoever owns the partition next)."""
        merge = self.partitions.pop(partition, None)
        return [head[ITEM] for buffer in (merge.buffers.values() if merge else ()) for head in buffer]
