"""Test-side Kafka I/O against the real local broker: produce raw records, read topics back.

Synchronous wrappers (one asyncio.run per call) keep the scenario tests readable.
"""
from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import faust
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

BOOTSTRAP = "127.0.0.1:9092"
#: The local broker's client arguments; a test on the secured cluster passes its own
#: (streams.kafka.connection.client_kwargs of its settings) as `connection`.
LOCAL = {"bootstrap_servers": BOOTSTRAP}
Connection = Optional[dict]
KAFKA_SH = Path(__file__).resolve().parents[1] / "deploy" / "kafka" / "kafka.sh"
CLUSTER_SH = KAFKA_SH.with_name("cluster.sh")
CLUSTER_BOOTSTRAP = "127.0.0.1:19092,127.0.0.1:19192,127.0.0.1:19292"
CLUSTER_ADMIN = KAFKA_SH.parents[2] / ".state" / "cluster" / "secrets" / "admin.properties"
#: Faust's consumer client id (its `broker_client_id` default): every worker's fetches.
WORKER_CLIENT_ID = f"faust-{faust.__version__}"


def throttle_fetches(byte_rate: Optional[int], client_id: str = WORKER_CLIENT_ID, cluster: bool = False) -> None:
    """Set (or, with None, remove) a broker quota on `client_id`'s fetches: a real Kafka
    client quota (`consumer_byte_rate`), set with the broker's own ConfigCommand. It makes a
    backlog last, and makes fetch responses arrive slowly and unevenly across partitions."""
    set_client_quota(client_id, "consumer_byte_rate", byte_rate, cluster)


def set_client_quota(client_id: str, quota: str, byte_rate: Optional[int], cluster: bool = False) -> None:
    """Set (or, with None, remove) the broker quota `quota` (`consumer_byte_rate` or
    `producer_byte_rate`) of `client_id`, on the local broker or (`cluster`) the secured
    cluster, as its admin user."""
    change = ["--add-config", f"{quota}={byte_rate}"] if byte_rate else ["--delete-config", quota]
    where = ([str(CLUSTER_SH), "tool", "kafka.admin.ConfigCommand", "--bootstrap-server", CLUSTER_BOOTSTRAP,
              "--command-config", str(CLUSTER_ADMIN)] if cluster else
             [str(KAFKA_SH), "tool", "kafka.admin.ConfigCommand", "--bootstrap-server", BOOTSTRAP])
    subprocess.run([*where, "--alter", *change, "--entity-type", "clients", "--entity-name", client_id],
                   check=byte_rate is not None, capture_output=True)


def produce(records: Iterable[tuple], connection: Connection = None) -> None:
    """Send (topic, key, value) records in order and wait for every ack. A record may carry a
    fourth element, its timestamp in ms (default: now)."""
    async def run() -> None:
        producer = AIOKafkaProducer(**(connection or LOCAL), acks="all", enable_idempotence=True)
        await producer.start()
        try:
            futures = [await producer.send(topic, key=key, value=value, timestamp_ms=rest[0] if rest else None)
                       for topic, key, value, *rest in records]
            await asyncio.gather(*futures)
        finally:
            await producer.stop()
    asyncio.run(run())


def json_record(topic: str, key: str, value: Optional[dict]) -> tuple[str, bytes, Optional[bytes]]:
    return topic, key.encode(), None if value is None else orjson.dumps(value)


def read_topic(topic: str, partitions: int, until: Callable[[list], bool] = lambda records: False,
               timeout: float = 30.0, settle: float = 0.0, connection: Connection = None) -> list:
    """Every committed record of `topic` from the beginning, read until `until(records)` holds
    (then `settle` seconds more, to catch anything that should NOT be there) or `timeout`."""
    async def run() -> list:
        consumer = AIOKafkaConsumer(**(connection or LOCAL), group_id=None,
                                    enable_auto_commit=False, isolation_level="read_committed")
        await consumer.start()
        try:
            while topic not in await consumer.topics():
                await asyncio.sleep(0.2)
            tps = [TopicPartition(topic, p) for p in range(partitions)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            records: list = []
            deadline = time.monotonic() + timeout
            settle_until = None
            while time.monotonic() < deadline:
                batches = await consumer.getmany(timeout_ms=200)
                for batch in batches.values():
                    records.extend(batch)
                if settle_until is None and until(records):
                    settle_until = time.monotonic() + settle
                if settle_until is not None and time.monotonic() >= settle_until:
                    break
            return records
        finally:
            await consumer.stop()
    return asyncio.run(run())



def delete_topics_with_prefix(prefix: str, connection: Connection = None) -> None:
    """Delete every topic whose name starts with `prefix` (a test's own topics). Every
    client that refreshes full cluster metadata pays for each topic left behind."""
    async def run() -> None:
        admin = AIOKafkaAdminClient(**(connection or LOCAL))
        await admin.start()
        try:
            doomed = [t for t in await admin.list_topics() if t.startswith(prefix)]
            if doomed:
                await admin.delete_topics(doomed)
        finally:
            await admin.close()
    asyncio.run(run())



def group_offsets(group: str, tps: list[TopicPartition], request_timeout_ms: int = 30_000,
                  connection: Connection = None) -> dict[TopicPartition, tuple[int, int]]:
    """{tp: (committed offset of `group`, log end)}; a partition with no committed offset
    counts from 0."""
    async def run() -> dict:
        admin = AIOKafkaAdminClient(**(connection or LOCAL), request_timeout_ms=request_timeout_ms)
        consumer = AIOKafkaConsumer(**(connection or LOCAL), request_timeout_ms=request_timeout_ms)
        await admin.start()
        await consumer.start()
        try:
            committed = await admin.list_consumer_group_offsets(group, partitions=tps)
            ends = await consumer.end_offsets(tps)
            return {tp: (committed[tp].offset if tp in committed and committed[tp].offset >= 0 else 0, ends[tp])
                    for tp in tps}
        finally:
            await consumer.stop()
            await admin.close()
    return asyncio.run(asyncio.wait_for(run(), request_timeout_ms / 1000 * 3))


def group_lag(group: str, topic: str, partitions: int) -> int:
    """Records of `topic` that `group` has not committed past, summed over its partitions."""
    offsets = group_offsets(group, [TopicPartition(topic, p) for p in range(partitions)])
    return sum(end - committed for committed, end in offsets.values())
