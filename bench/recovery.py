"""Recovery and memory with a large state: a worker with no local state restores N customers
from the changelog.

    .venv/bin/python -m bench.recovery --customers 1000000

The `reporting_state` changelog is seeded directly with N customers shaped like the load
generator's, each on the partition its customer's events use: a customer record (identity,
one add time, one reported type) and `--ids` remembered event ids (default 12), kept as the
worker keeps them (streams/core/semantics.py): the first 16 inline, any more each a key of its
own with its remembered-id queue entry, plus each partition's clock spanning its queue. Then a worker starts with an empty data
directory, as after a crash (`streams/state/local.py` wipes unclean state the same way). The
harness reports the time from process start until table recovery has finished and every
partition is assigned, the keys restored (RocksDB's estimate), and the worker's peak RSS.

Then `--events` events of the load generator (bench/worker.py's shape) go through that worker
as a backlog, so the last rows are throughput and peak RSS with the million customers in
state and more arriving.
"""
from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2

from bench.worker import SHAPE, _proc, backlog, drain, produce
from streams.kafka.admin import ensure_topics
from streams.observability.observe import total
from streams.core.semantics import INLINE_IDS, CustomerState, PartitionClock
from tests.integration.conftest import KAFKA_SH, Pipeline

PARTITIONS = 4


def customer_state(n: int, now_ms: int, seen: dict[str, int]) -> CustomerState:
    return CustomerState(
        add_times={f"staff{n % 50:02d}": now_ms - 86_400_000},
        identity={"wechat_app_id": "wx7d21", "wechat_unionid": f"oU-{n:x}"},
        reported=["CONSULT"] if n % 3 == 0 else [],
        seen=seen)


def customer_records(n: int, key: str, partition: int, ids: int, queue: PartitionClock, now_ms: int):
    """The changelog records of customer `n`: its record, and the remembered ids past the
    inline ones with their queue entries, numbered on from `queue.seen_next` (advanced)."""
    seen = {f"e-b{n:x}-{i}": now_ms - 3_600_000 + i for i in range(ids)}
    inline = dict(list(seen.items())[:INLINE_IDS])
    yield b"c:" + key.encode(), customer_state(n, now_ms, inline).encode()
    encoded = key.encode()
    for event_id, ts in list(seen.items())[INLINE_IDS:]:
        yield b"e:%d:%s:%s" % (len(encoded), encoded, event_id.encode()), b"%d" % ts
        yield b"x:%d:%d" % (partition, queue.seen_next), orjson.dumps((ts, key, event_id))
        if queue.seen_head_ts is None:
            queue.seen_head_ts = ts
        queue.seen_next += 1


async def seed_changelog(pipeline: Pipeline, customers: int, ids: int) -> tuple[float, int]:
    """Produce the states; returns the seconds it took and the records written."""
    s = pipeline.settings
    topic = f"{s.app_id}-reporting_state-changelog"
    producer = AIOKafkaProducer(bootstrap_servers=s.bootstrap_servers, acks="all", linger_ms=20,
                                max_batch_size=512 * 1024)
    await producer.start()
    started = time.monotonic()
    now_ms = int(time.time() * 1000)
    clocks = {p: PartitionClock(stream_time=now_ms) for p in range(PARTITIONS)}
    written = 0
    try:
        pending = []
        for n in range(customers):
            key = f"ww{n % 400:03d}:wm{n:08d}"
            partition = (murmur2(key.encode()) & 0x7FFFFFFF) % PARTITIONS
            for state_key, value in customer_records(n, key, partition, ids, clocks[partition], now_ms):
                pending.append(await producer.send(topic, key=state_key, value=value, partition=partition))
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                written += len(pending)
                pending.clear()
                print(f"\rseeded {n + 1:,}/{customers:,} customers", end="", file=sys.stderr, flush=True)
        for partition, clock in clocks.items():
            pending.append(await producer.send(topic, key=b"k:%d" % partition, value=clock.encode(),
                                               partition=partition))
        await asyncio.gather(*pending)
        written += len(pending)
        print(file=sys.stderr)
    finally:
        await producer.stop()
    return time.monotonic() - started, written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, default=1_000_000, help="customers in state (default 1000000)")
    parser.add_argument("--ids", type=int, default=12, help="remembered event ids per customer (default 12)")
    parser.add_argument("--events", type=int, default=100_000, help="events to apply after recovery (default 100000; 0: none)")
    parser.add_argument("--timeout", type=float, default=1800, help="give up after this many seconds (default 1800)")
    parser.add_argument("--log-level", default="warning", help="the worker's log level (default warning)")
    args = parser.parse_args(argv)
    subprocess.run([str(KAFKA_SH), "start"], check=True, capture_output=True)
    with tempfile.TemporaryDirectory(prefix="tagstream-recovery-") as work:
        pipeline = Pipeline(Path(work), partitions=PARTITIONS, log_level=args.log_level)
        asyncio.run(ensure_topics(pipeline.settings))
        _, rules, log = backlog(args.events, seed=1)
        pipeline.send(*[(r.topic, r.key, r.value) for r in rules])
        seeded, records = asyncio.run(seed_changelog(pipeline, args.customers, args.ids))
        started = time.monotonic()
        worker = pipeline.start_worker()
        try:
            while True:
                assert worker.process.poll() is None, worker.log_tail()
                samples = worker.metrics()
                keys = total(samples, "tagstream_table_keys", table="reporting_state")
                assigned = total(samples, "tagstream_assigned_partitions")
                if samples and assigned >= 2 * PARTITIONS and total(samples, "tagstream_table_recovery_in_progress") == 0 \
                        and keys >= 0.9 * records:
                    break
                assert time.monotonic() - started < args.timeout, (
                    f"recovery did not finish in {args.timeout:.0f} s: keys {keys:,.0f}, assigned {assigned:.0f}, "
                    f"recovering {total(samples, 'tagstream_table_recovery_in_progress'):.0f}\n{worker.log_tail(400)}")
                time.sleep(0.2)
            recovered = time.monotonic() - started
            rss = _proc(worker.process.pid)[1]
            loaded_rate = loaded_rss = None
            if args.events:
                produce(pipeline, log)
                loaded_rate, _ = drain(worker, args.events)
                loaded_rss = _proc(worker.process.pid)[1]
        finally:
            pipeline.stop(delete_topics=True)
    print(f"\n| measure | value |\n|---|---:|\n| customers in the changelog | {args.customers:,} |\n"
          f"| remembered ids per customer | {args.ids} |\n"
          f"| changelog records | {records:,} |\n| seeding the changelog | {seeded:.1f} s |\n| worker start to recovered (empty local state) | "
          f"{recovered:.1f} s |\n| keys restored (RocksDB estimate) | {keys:,.0f} |\n| worker peak RSS | {rss:,.0f} MiB |")
    if loaded_rate is not None:
        print(f"| then {args.events:,} events ({SHAPE.active_customers:,} active customers): throughput | "
              f"{loaded_rate:,.0f} events/s |\n| worker peak RSS after them | {loaded_rss:,.0f} MiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
