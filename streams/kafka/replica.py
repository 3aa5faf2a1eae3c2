"""A compacted topic followed into memory: the enrichment's click ids and tag catalogue, and
the provider's authorisations (streams/wecom/provider.py); and the erasure requests every
component follows (`ErasureRequests`)."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Optional

from aiokafka import AIOKafkaConsumer, TopicPartition

from streams.core.erasure import fold_requests
from streams.kafka import connection
from streams.kafka.admin import topic_partitions
from streams.settings import Settings

log = logging.getLogger(__name__)


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
                    self.apply(record.key.decode(), record.value)

    def apply(self, key: str, value: Optional[bytes]) -> None:
        if value is None:
            self.values.pop(key, None)
        else:
            self.values[key] = value

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


class ErasureRequests(CompactedReplica):
    """The erasures topic followed from its start: `erased` holds each corp whose erasure was
    requested (and not reinstated since), with the request's time (streams/core/erasure.py).
    `version` counts the changes, so a component can tell when to look again."""

    def __init__(self, settings: Settings, client_id: str):
        super().__init__(settings, settings.topic("wecom_erasures_topic"), client_id)
        self.erased: dict[str, int] = {}
        self.erased_bytes: set[bytes] = set()     # the same corps as bytes, for record keys
        self.version = 0
        self.unapplied: dict[str, int] = {}     # requests learned since the component last applied all
        self.ready = asyncio.Event()
        self.deadline_s = settings.erasure_deadline / 1000
        self.overdue_logged_at = 0.0

    async def follow(self, timeout_s: float = 60.0) -> None:
        """Start, and set `ready` once every request written before is known (a component
        must not take a record of an erased corp for one of a live corp)."""
        await self.start()
        if not await self.caught_up(timeout_s):
            raise RuntimeError(f"the erasures topic {self.topic} could not be read to its end in {timeout_s:.0f} s")
        self.ready.set()

    def apply(self, key: str, value: Optional[bytes]) -> None:
        corp = fold_requests(self.erased, value)
        if corp is None:
            return
        self.version += 1
        if corp in self.erased:
            self.erased_bytes.add(corp.encode())
            self.unapplied[corp] = self.erased[corp]
        else:
            self.erased_bytes.discard(corp.encode())
            self.unapplied.pop(corp, None)

    def applied(self, version: int) -> None:
        """The component has applied every request up to `version`."""
        if version == self.version:
            self.unapplied.clear()

    def pending_seconds(self) -> float:
        """Age of the oldest request learned and not applied yet (by the request's time)."""
        times = list(self.unapplied.values())      # also read from the metrics server's thread
        return max(0.0, time.time() - min(times) / 1000) if times else 0.0

    def check_deadline(self, component: str) -> None:
        """Log an error (once a minute) while a request is older than `erasure_deadline`."""
        pending = self.pending_seconds()
        if pending > self.deadline_s and time.monotonic() - self.overdue_logged_at > 60:
            self.overdue_logged_at = time.monotonic()
            log.error("%s: the erasure of %d corps is overdue: requested %.0f s ago, erasure_deadline is %.0f s",
                      component, len(self.unapplied), pending, self.deadline_s)
