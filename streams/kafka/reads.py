"""Reading partitions from their start to their end: a restore, a replica's first load, replay.

The end offsets are asked *before* the partitions are assigned. Once a consumer has an
assignment its fetcher has a fetch in flight, which the broker holds for `fetch_max_wait`
(500 ms) when there is nothing new, and aiokafka sends a ListOffsets on the same connection
after it: asked after `assign`, `end_offsets` took 0.50 s on an idle topic, and 0.10 s
before it (issue 20; the enrichment restored four partitions in 2 s at every start).

"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Callable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.protocol.metadata import MetadataRequest

from streams.kafka.connection import client_kwargs, start_client

if TYPE_CHECKING:
    from streams.settings import Settings


def reader(settings: "Settings", fetch_max_wait_ms: int = 500) -> AIOKafkaConsumer:
    """A consumer with no group (it never moves anyone's offsets) that sees committed records
    only: for the operator tools, replay and restores. A reader that moves between
    partitions many times (`tagstream explain`'s session) waits out its last fetch at each
    move, so it asks for a shorter `fetch_max_wait_ms`."""
    return AIOKafkaConsumer(**client_kwargs(settings), group_id=None,
                            enable_auto_commit=False, isolation_level="read_committed",
                            max_partition_fetch_bytes=4 * 1024 * 1024, fetch_max_wait_ms=fetch_max_wait_ms)


async def partitions_of(consumer: AIOKafkaConsumer, topic: str) -> list[int]:
    """The topic's partition numbers (empty if it does not exist, or may not be described),
    from fresh metadata of that topic alone, never creating it. (Metadata of every topic
    took 50 ms on a broker of 1,600 topics, and tagstream explain asked it seven times.)"""
    client = consumer._client                                    # noqa: SLF001 (no public call returns it)
    response = await client.send(client.get_random_node(), MetadataRequest([topic], allow_auto_topic_creation=False))
    for described in response.topics:              # (error_code, name, [is_internal,] partitions)
        if described[1] == topic and described[0] == 0:
            # the client tracks it from now: its first offsets question would otherwise find
            # no leader, refresh and sleep retry_backoff_ms (100 ms per topic) before asking
            await client.add_topic(topic)
            return sorted(partition[1] for partition in described[-1])
    return []


async def read_whole(consumer: AIOKafkaConsumer, topic: str, on_record) -> None:
    """Every record of `topic` from its start to its current end."""
    await read_to_end(consumer, [TopicPartition(topic, p) for p in await partitions_of(consumer, topic)], on_record)


async def read_compacted(settings: "Settings", topic: str) -> dict[str, bytes]:
    """A compacted topic as compaction keeps it: the latest value per key, tombstoned keys
    left out; read from its start to its end as of the call."""
    values: dict[str, bytes] = {}

    def keep(record) -> None:
        key = record.key.decode()
        if record.value is None:
            values.pop(key, None)
        else:
            values[key] = record.value
    consumer = reader(settings)
    await start_client(consumer)
    try:
        await read_whole(consumer, topic, keep)
    finally:
        await consumer.stop()
    return values


async def read_to_end(consumer: AIOKafkaConsumer, tps: list[TopicPartition], on_record: Callable,
                      max_records: int = 10_000) -> None:
    """Every record of `tps`, from their start to their end as of the call, to `on_record`,
    in offset order per partition. The consumer's assignment becomes the partitions of
    `tps` that hold records: both ends are asked before it, and an empty partition is never
    fetched (`seek_to_beginning` after `assign` waited out a fetch per call: a rules topic
    of 12 partitions, 20 records in a few of them, took 2.0 s to read, 0.1 s after this)."""
    if not tps:
        return
    ends = await consumer.end_offsets(tps)
    starts = await consumer.beginning_offsets(tps)
    todo = {tp for tp in tps if ends[tp] > starts[tp]}
    if not todo:
        return
    consumer.assign(sorted(todo))
    for tp in todo:
        consumer.seek(tp, starts[tp])
    while todo:
        batches = await consumer.getmany(*todo, timeout_ms=500, max_records=max_records)
        for batch in batches.values():
            for record in batch:
                on_record(record)
        for tp in list(todo):
            if await consumer.position(tp) >= ends[tp]:
                todo.discard(tp)


async def records_left(consumer: AIOKafkaConsumer, since: dict[TopicPartition, int],
                       ends: dict[TopicPartition, int], timeout_s: float = 5.0) -> set[TopicPartition]:
    """The partitions that hold a record (as `consumer`'s isolation level sees it) between
    `since` and `ends`. A partition written in transactions ends in a commit marker, which
    no consumer is handed, so a group that consumed everything commits the marker's offset,
    one below the end: this tells that from records still to come. The consumer's
    assignment becomes `since`'s partitions."""
    consumer.assign(list(since))
    for tp, offset in since.items():
        consumer.seek(tp, offset)
    todo, found = {tp for tp in since if since[tp] < ends[tp]}, set()
    deadline = asyncio.get_running_loop().time() + timeout_s
    while todo:
        batches = await consumer.getmany(*todo, timeout_ms=200)
        for tp, batch in batches.items():
            if any(record.offset < ends[tp] for record in batch):
                found.add(tp)
                todo.discard(tp)
        for tp in list(todo):
            if await consumer.position(tp) >= ends[tp]:
                todo.discard(tp)
        if todo and asyncio.get_running_loop().time() > deadline:
            return found | todo                    # not known: count them as left
    return found
