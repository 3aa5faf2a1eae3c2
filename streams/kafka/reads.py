"""Reading partitions from their start to their end: a restore, a replica's first load, replay.

The end offsets are asked *before* the partitions are assigned. Once a consumer has an
assignment its fetcher has a fetch in flight, which the broker holds for `fetch_max_wait`
(500 ms) when there is nothing new, and aiokafka sends a ListOffsets on the same connection
after it: asked after `assign`, `end_offsets` took 0.50 s on an idle topic, and 0.10 s
before it (issue 20; the enrichment restored four partitions in 2 s at every start).

"""
from __future__ import annotations

from typing import Callable

from aiokafka import AIOKafkaConsumer, TopicPartition


async def read_to_end(consumer: AIOKafkaConsumer, tps: list[TopicPartition], on_record: Callable,
                      max_records: int = 10_000) -> None:
    """Every record of `tps`, from their start to their end as of the call, to `on_record`,
    in offset order per partition. The consumer's assignment becomes `tps`."""
    if not tps:
        return
    ends = await consumer.end_offsets(tps)
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    todo = {tp for tp in tps if ends[tp] > 0}
    while todo:
        batches = await consumer.getmany(*todo, timeout_ms=500, max_records=max_records)
        for batch in batches.values():
            for record in batch:
                on_record(record)
        for tp in list(todo):
            if await consumer.position(tp) >= ends[tp]:
                todo.discard(tp)
