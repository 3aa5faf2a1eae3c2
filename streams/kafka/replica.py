"""A compacted topic followed into memory: the enrichment's click ids and tag catalogue, and
the provider's authorisations (streams/wecom/provider.py)."""
from __future__ import annotations

import asyncio
import time
from typing import Optional

from aiokafka import AIOKafkaConsumer, TopicPartition

from streams.kafka import connection
from streams.kafka.admin import topic_partitions
from streams.settings import Settings


class CompactedReplica:
    """A compacted topic read from the start and followed: key -> value (None removes).

    `caught_up` asks the end offsets over a second client (`prober`, no assignment): on the
    follower's own connection a ListOffsets queues behind the fetch the broker holds for
    `fetch_max_wait` (500 ms), and every add without a known click paid that wait (the
    tag-to-report p50 of 3.5-4 s in docs/ingest.md before this). Callers that arrive while a
    request is in flight share the next one, so a batch of adds sends one or two requests."""

    def __init__(self, settings: Settings, topic: str, client_id: str = "tagstream-replica",
                 values: Optional[dict] = None):
        """`values`: the mapping to fill (one a reader such as `AuthBook` already holds)."""
        self.settings, self.topic, self.client_id = settings, topic, client_id
        self.values: dict[str, bytes] = {} if values is None else values
        self.consumer: Optional[AIOKafkaConsumer] = None
        self.prober: Optional[AIOKafkaConsumer] = None
        self.task: Optional[asyncio.Task] = None
        self.probe_lock = asyncio.Lock()
        self.probes_started = self.probes_answered = 0
        self.last_ends: dict[TopicPartition, int] = {}

    async def start(self) -> None:
        kwargs = dict(**connection.client_kwargs(self.settings), group_id=None, enable_auto_commit=False,
                      isolation_level="read_committed")
        self.consumer = AIOKafkaConsumer(**kwargs, client_id=self.client_id)
        self.prober = AIOKafkaConsumer(**kwargs, client_id=f"{self.client_id}-probe")
        await connection.start_client(self.consumer)
        await connection.start_client(self.prober)
        tps = [TopicPartition(self.topic, p) for p in await topic_partitions(self.settings, self.topic)]
        self.consumer.assign(tps)
        await self.consumer.seek_to_beginning(*tps)
        self.task = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        while True:
            for records in (await self.consumer.getmany(timeout_ms=200)).values():
                for record in records:
                    key = record.key.decode()
                    if record.value is None:
                        self.values.pop(key, None)
                    else:
                        self.values[key] = record.value

    async def end_offsets(self) -> dict[TopicPartition, int]:
        """The topic's end offsets from a request sent after this call began (one in flight
        at a time; the callers waiting for it share the answer)."""
        wanted = self.probes_started + 1
        async with self.probe_lock:
            if self.probes_answered >= wanted:
                return self.last_ends
            self.probes_started += 1
            started = self.probes_started
            self.last_ends = await self.prober.end_offsets(list(self.consumer.assignment()))
            self.probes_answered = started
            return self.last_ends

    async def caught_up(self, timeout_s: float) -> bool:
        """Wait until everything written to the topic before this call has been read."""
        deadline = time.monotonic() + timeout_s
        try:
            ends = await asyncio.wait_for(self.end_offsets(), timeout_s)
        except asyncio.TimeoutError:
            return False
        while True:
            if all([await self.consumer.position(tp) >= end for tp, end in ends.items()]):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
        for client in (self.consumer, self.prober):
            if client:
                await client.stop()
