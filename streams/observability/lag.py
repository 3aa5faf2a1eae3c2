"""Consumer lag of tagstream's consumer groups, in messages and in seconds.

What kafka_exporter, Burrow and Kafka Lag Exporter give, built in, so that platform teams
need no extra exporter:

- **lag in messages** per (group, topic, partition): log-end offset minus the committed
  offset, exactly what `kafka-consumer-groups --describe` prints in its LAG column. A
  partition the group never committed counts from the log start (the worker reads from the
  earliest offset).
- **lag in seconds**: the age of the oldest unprocessed record, the record at the committed
  offset, read back from the broker (`now - record.timestamp`); 0 when there is no lag.
  This is exact, where interpolating offsets over time (Kafka Lag Exporter's method) is an
  estimate, and cheap: one small fetch per lagging partition per sample.

Every tagstream process (worker and sink) runs a `LagMonitor` over *both* groups, with no
group of its own. So lag stays visible while any one process is up, including the lag of a
worker that hangs; dashboards take `max by (group, topic, partition)` across processes.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from streams.observability import metrics
from streams.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PartitionLag:
    group: str
    topic: str
    partition: int
    committed: Optional[int]      # None: the group has no committed offset here
    log_start: int
    log_end: int
    oldest_unprocessed_ms: Optional[int] = None   # timestamp of the record at the position

    @property
    def position(self) -> int:
        """Where the group resumes: its committed offset, else the log start."""
        return self.committed if self.committed is not None else self.log_start

    @property
    def lag(self) -> int:
        return max(0, self.log_end - self.position)

    def lag_seconds(self, now_ms: int) -> float:
        if self.lag == 0 or self.oldest_unprocessed_ms is None:
            return 0.0
        return max(0.0, (now_ms - self.oldest_unprocessed_ms) / 1000)


def monitored_groups(settings: Settings) -> dict[str, list[str]]:
    """tagstream's consumer groups and the topics each commits offsets for."""
    return {
        settings.app_id: [settings.topic("tag_events_topic"), settings.topic("contact_events_topic"),
                          settings.topic("tag_mappings_topic")],
        f"{settings.app_id}-sink": [settings.topic("conversion_reports_topic")],
        # the WeCom enrichment (streams/wecom/enrich.py): its lag is the enrichment lag
        f"{settings.app_id}-enrich": [settings.topic("wecom_callbacks_topic")],
    }


class LagMonitor:
    def __init__(self, connection: Mapping[str, Any], groups: dict[str, list[str]]):
        self.connection = connection        # streams.kafka.connection.client_kwargs
        self.groups = groups
        self.admin: Optional[AIOKafkaAdminClient] = None
        self.consumer: Optional[AIOKafkaConsumer] = None
        self.exported: set[tuple[str, str, str]] = set()

    async def start(self) -> None:
        self.admin = AIOKafkaAdminClient(**self.connection)
        # No group: this consumer only reads single records at committed positions.
        self.consumer = AIOKafkaConsumer(**self.connection, group_id=None,
                                         enable_auto_commit=False, max_partition_fetch_bytes=64 * 1024,
                                         fetch_max_bytes=1024 * 1024)
        await self.admin.start()
        await self.consumer.start()

    async def stop(self) -> None:
        if self.consumer:
            await self.consumer.stop()
        if self.admin:
            await self.admin.close()

    async def __aenter__(self) -> "LagMonitor":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def sample(self, with_age: bool = True) -> list[PartitionLag]:
        """One consistent-enough snapshot: committed offsets first, then log ends (so a
        commit racing the sample can only make lag look larger, never negative)."""
        # Metadata of the monitored topics only: a cluster's full metadata (list_topics) can
        # be thousands of topics, and parsing it every interval cost the worker real CPU.
        wanted = sorted({t for ts in self.groups.values() for t in ts})
        described = await self.admin.describe_topics(wanted)
        partitions = {d["topic"]: sorted(p["partition"] for p in d["partitions"])
                      for d in described if d["error_code"] == 0 and d["partitions"]}
        topics = sorted(partitions)
        if not topics:
            return []
        committed = {group: await self.admin.list_consumer_group_offsets(group) for group in self.groups}
        tps = [TopicPartition(t, p) for t in topics for p in partitions.get(t, [])]
        starts = await self.consumer.beginning_offsets(tps)
        ends = await self.consumer.end_offsets(tps)
        rows = []
        for group, group_topics in self.groups.items():
            for tp in tps:
                if tp.topic not in group_topics:
                    continue
                meta = committed[group].get(tp)
                offset = meta.offset if meta is not None and meta.offset >= 0 else None
                rows.append(PartitionLag(group, tp.topic, tp.partition, offset, starts[tp], ends[tp]))
        if with_age:
            rows = await self._with_ages(rows)
        return rows

    async def _with_ages(self, rows: list[PartitionLag], timeout_s: float = 3.0) -> list[PartitionLag]:
        """Fill in the timestamp of the record at each lagging partition's position."""
        wanted: dict[TopicPartition, int] = {}
        for row in rows:
            if row.lag > 0:
                wanted.setdefault(TopicPartition(row.topic, row.partition), row.position)
        if not wanted:
            return rows
        consumer = self.consumer
        consumer.assign(list(wanted))
        for tp, position in wanted.items():
            consumer.seek(tp, position)
        found: dict[TopicPartition, dict[int, int]] = {}   # tp -> {position: timestamp}
        deadline = time.monotonic() + timeout_s
        while len(found) < len(wanted) and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200, max_records=len(wanted) * 4)
            for tp, records in batches.items():
                if tp not in found and records:
                    found[tp] = records[0].timestamp
                    consumer.pause(tp)
        consumer.assign([])
        return [PartitionLag(r.group, r.topic, r.partition, r.committed, r.log_start, r.log_end,
                             found.get(TopicPartition(r.topic, r.partition)) if r.lag > 0 else None)
                for r in rows]

    def export(self, rows: list[PartitionLag]) -> None:
        """Set the Prometheus gauges; series of partitions that went away are removed."""
        now_ms = int(time.time() * 1000)
        seen = set()
        for row in rows:
            labels = (row.group, row.topic, str(row.partition))
            seen.add(labels)
            metrics.CONSUMER_LAG.labels(*labels).set(row.lag)
            metrics.CONSUMER_LAG_SECONDS.labels(*labels).set(row.lag_seconds(now_ms))
            metrics.COMMITTED_OFFSET.labels(*labels).set(row.position)
            metrics.LOG_END_OFFSET.labels(row.topic, str(row.partition)).set(row.log_end)
        for labels in self.exported - seen:
            for gauge in (metrics.CONSUMER_LAG, metrics.CONSUMER_LAG_SECONDS, metrics.COMMITTED_OFFSET):
                gauge.remove(*labels)
        self.exported = seen
        metrics.LAG_SAMPLE_TIME.set(now_ms / 1000)

    async def run(self, interval_s: float, stop: Optional[asyncio.Event] = None) -> None:
        """Sample and export every `interval_s` until `stop` is set (or cancelled)."""
        await self.start()
        try:
            while stop is None or not stop.is_set():
                try:
                    self.export(await self.sample())
                except Exception as exc:            # a broker hiccup must not kill the process
                    metrics.LAG_SAMPLE_ERRORS.inc()
                    log.warning("lag sample failed: %s: %s", type(exc).__name__, exc)
                await asyncio.sleep(interval_s)
        finally:
            await self.stop()


def run_in_thread(connection: Mapping[str, Any], groups: dict[str, list[str]], interval_s: float) -> threading.Thread:
    """Run a `LagMonitor` on its own event loop in a daemon thread. In the worker, a lag
    sample (admin requests, a fetch per lagging partition) used to hold the event loop for
    tens of milliseconds every interval, which showed in real-time latency's p99; in a
    thread it only takes GIL slices."""
    def run() -> None:
        asyncio.run(LagMonitor(connection, groups).run(interval_s))
    thread = threading.Thread(target=run, name="tagstream-lag", daemon=True)
    thread.start()
    return thread
