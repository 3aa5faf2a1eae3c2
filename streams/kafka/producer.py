"""Producing generated or archived records to tagstream's input topics, in batches."""
from __future__ import annotations

import asyncio
from typing import Iterable

import orjson
from aiokafka import AIOKafkaProducer

from streams.kafka.connection import producer_kwargs
from streams.sources.loadgen import GeneratedRecord
from streams.settings import Settings


def input_producer(settings: Settings) -> AIOKafkaProducer:
    # linger + large batches: throughput; acks=all: a produced event is really there.
    return AIOKafkaProducer(**producer_kwargs(settings, linger_ms=5, max_batch_size=256 * 1024))


async def produce(producer: AIOKafkaProducer, settings: Settings,
                  records: Iterable[GeneratedRecord], window: int = 2000) -> int:
    """Send records in order; at most `window` unacknowledged at a time. Returns the count."""
    topics = {name: settings.topic(name + "_topic")
              for name in ("tag_events", "contact_events", "tag_mappings")}
    pending: list[asyncio.Future] = []
    count = 0
    for record in records:
        value = None if record.value is None else orjson.dumps(record.value)
        pending.append(await producer.send(topics[record.topic], value=value, key=record.key.encode()))
        count += 1
        if len(pending) >= window:
            await asyncio.gather(*pending)
            pending.clear()
    if pending:
        await asyncio.gather(*pending)
    return count
