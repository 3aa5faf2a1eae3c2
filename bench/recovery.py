"""Recovery and memory with a large state: a worker with no local state restores N customers
from the changelog.

    .venv/bin/python -m bench.recovery --customers 1000000

The `reporting_state` changelog is seeded directly with N customer states shaped like the
load generator's (identity, one add time, a dozen event ids seen, one reported type), each
on the partition its customer's events use. Then a worker starts with an empty data
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

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2

from bench.worker import SHAPE, _proc, backlog, drain, produce
from streams.kafka.admin import ensure_topics
from streams.observability.observe import total
from streams.core.semantics import CustomerState
from tests.integration.conftest import KAFKA_SH, Pipeline

PARTITIONS = 4


def customer_state(n: int, now_ms: int) -> CustomerState:
    return CustomerState(
        add_times={f"staff{n % 50:02d}": now_ms - 86_400_000},
        identity={"wechat_app_id": "wx7d21", "wechat_unionid": f"oU-{n:x}"},
        reported=["CONSULT"] if n % 3 == 0 else [],
        seen={f"e-b{n:x}-{i}": now_ms - 3_600_000 + i for i in range(12)})


async def seed_changelog(pipeline: Pipeline, customers: int) -> float:
    """Produce the states; returns the seconds it took."""
    s = pipeline.settings
    topic = f"{s.app_id}-reporting_state-changelog"
    producer = AIOKafkaProducer(bootstrap_servers=s.bootstrap_servers, acks="all", linger_ms=20,
                                max_batch_size=512 * 1024)
    await producer.start()
    started = time.monotonic()
    now_ms = int(time.time() * 1000)
    try:
        pending = []
        for n in range(customers):
            key = f"ww{n % 400:03d}:wm{n:08d}"
            partition = (murmur2(key.encode()) & 0x7FFFFFFF) % PARTITIONS
            pending.append(await producer.send(topic, key=b"c:" + key.encode(),
                                               value=customer_state(n, now_ms).encode(), partition=partition))
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending.clear()
                print(f"\rseeded {n + 1:,}/{customers:,}", end="", file=sys.stderr, flush=True)
        await asyncio.gather(*pending)
        print(file=sys.stderr)
    finally:
        await producer.stop()
    return time.monotonic() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, default=1_000_000, help="customers in state (default 1000000)")
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
        seeded = asyncio.run(seed_changelog(pipeline, args.customers))
        started = time.monotonic()
        worker = pipeline.start_worker()
        try:
            while True:
                assert worker.process.poll() is None, worker.log_tail()
                samples = worker.metrics()
                keys = total(samples, "tagstream_table_keys", table="reporting_state")
                assigned = total(samples, "tagstream_assigned_partitions")
                if samples and assigned >= 2 * PARTITIONS and total(samples, "tagstream_table_recovery_in_progress") == 0 \
                        and keys >= 0.9 * args.customers:
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
          f"| seeding the changelog | {seeded:.1f} s |\n| worker start to recovered (empty local state) | "
          f"{recovered:.1f} s |\n| keys restored (RocksDB estimate) | {keys:,.0f} |\n| worker peak RSS | {rss:,.0f} MiB |")
    if loaded_rate is not None:
        print(f"| then {args.events:,} events ({SHAPE.active_customers:,} active customers): throughput | "
              f"{loaded_rate:,.0f} events/s |\n| worker peak RSS after them | {loaded_rss:,.0f} MiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
