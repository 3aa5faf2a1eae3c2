"""Writing input events while workers run, the way the real sources write them.

The ingest (SPEC §7) writes a customer's contact event and then, milliseconds later, the tag
events of that customer's first tag diff, while other staff keep tagging other customers on
the same partitions. Kafka orders each topic partition, not the two topics against each
other; what a source can promise is that an event it wrote earlier is *acknowledged* before
it writes a later event to the other topic. `LiveWriter` keeps that promise: in log order,
and whenever the next record goes to the other event topic than the one before it, it first
waits for every earlier record's ack. (Back to back on one producer, without that wait, is
not ordered: docs/architecture.md, "Ordering across the two event topics".)
"""
from __future__ import annotations

import asyncio
from typing import Optional

from aiokafka import AIOKafkaProducer

from tests import kafka_io


class LiveWriter:
    def __init__(self, connection: kafka_io.Connection = None, **producer_settings):
        self.producer = AIOKafkaProducer(**{
            **(connection or kafka_io.LOCAL), "acks": "all", "enable_idempotence": True, "linger_ms": 1,
            "client_id": "tagstream-live-writer", **producer_settings})
        self.pending: list = []
        self.last_topic: Optional[str] = None

    async def __aenter__(self) -> "LiveWriter":
        await self.producer.start()
        return self

    async def __aexit__(self, *exc) -> None:
        try:
            await self.flush()
        finally:
            await self.producer.stop()

    async def write(self, topic: str, key: bytes, value: Optional[bytes],
                    timestamp_ms: Optional[int] = None) -> asyncio.Future:
        """Queue one record; returns the future of its RecordMetadata."""
        if self.last_topic is not None and topic != self.last_topic:
            await self.flush()
        delivery = await self.producer.send(topic, key=key, value=value, timestamp_ms=timestamp_ms)
        self.pending.append(delivery)
        self.last_topic = topic
        return delivery

    async def flush(self) -> list:
        """Wait for every record written so far; returns their RecordMetadata."""
        pending, self.pending = self.pending, []
        return list(await asyncio.gather(*pending))
