"""`tagstream explain` over a long history: one customer's day out of N events over D days.

    .venv/bin/python -m bench.explain --events 10000000 --days 30      # make bench-explain

1. Fresh topics with retention off (the history is older than the broker's default of 7
   days), and N events over the last D days: one contact event per customer when it first
   appears, then tag events, record timestamps = event time, in time order, produced in
   batches. The rules map some of the tags.
2. For `--customers` customers picked at random: `tagstream explain CUSTOMER --from DAY
   --to DAY+1 --json`, the command an operator runs (Python start-up included), timed
   from start to exit; and the in-process call (`streams.explain.run.explain`), timed alone.
3. Baseline, in the same run on the same topics: the same customer found the way a tool
   without offsets_for_times would, by reading its partition of both topics from the
   start to the end and keeping its key.

Every run prints its own table; nothing is averaged across runs.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
from aiokafka import AIOKafkaProducer, TopicPartition

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from streams.explain.run import explain, partition_of
from streams.kafka.admin import ensure_topics, topic_configs
from streams.kafka.connection import client_kwargs, start_client
from streams.kafka.reads import reader
from streams.replay.engine import format_time
from tests.integration.conftest import KAFKA_SH, REPO, Pipeline

PARTITIONS = 4
DAY = 86_400_000
TAGS = [f"et{n:02d}" for n in range(20)]
TYPES = ["VALID", "LEAD", "CONSULT", "ORDER", "INVALID", None]


async def produce_history(pipeline: Pipeline, events: int, days: int, customers: int, seed: int) -> int:
    """The rules and `events` events over `days` days ending now; returns the first ts.
    Records go out in batches built per partition (`create_batch`, the partition the
    default partitioner would pick): 10 million one `send` at a time would take most of an
    hour in Python."""
    s = pipeline.settings
    rng = random.Random(seed)
    end = int(time.time() * 1000) - 60_000
    start = end - days * DAY
    producer = AIOKafkaProducer(**client_kwargs(s), linger_ms=20, max_batch_size=1024 * 1024, acks=1,
                                max_request_size=2 * 1024 * 1024)
    await start_client(producer)
    try:
        for n, tag in enumerate(TAGS):
            value = {"corp_id": "wwB", "tag_id": tag, "tag_name": tag, "standard_type": TYPES[n % len(TYPES)],
                     "account_id": 7000, "user_action_set_id": 17000, "effective_from": start - DAY, "version": 1,
                     "action_type": None}
            await producer.send(s.topic("tag_mappings_topic"), key=f"wwB:{tag}".encode(), value=orjson.dumps(value))
        contacts, tags = s.topic("contact_events_topic"), s.topic("tag_events_topic")
        batches: dict[tuple[str, int], object] = {}
        sent: list = []

        async def flush(topic: str, partition: int) -> None:
            sent.append(await producer.send_batch(batches.pop((topic, partition)), topic, partition=partition))
            if len(sent) >= 64:
                await asyncio.gather(*sent)
                sent.clear()

        seen: set[int] = set()
        step = (end - start) / events
        for i in range(events):
            ts = int(start + i * step)
            who = rng.randrange(customers)
            user = f"wm{who:07d}"
            key = f"wwB:{user}".encode()
            if who not in seen:
                seen.add(who)
                topic, value = contacts, {
                    "event_id": f"c{i}", "corp_id": "wwB", "external_userid": user, "userid": "s1",
                    "change_type": "add_external_contact", "ts": ts, "wechat_app_id": "wx1", "wechat_unionid": f"u{who}"}
            else:
                topic, value = tags, {
                    "event_id": f"e{i}", "corp_id": "wwB", "external_userid": user, "userid": "s1",
                    "tag_id": rng.choice(TAGS), "op": "add" if rng.random() < 0.8 else "remove", "ts": ts}
            partition = partition_of(key.decode(), PARTITIONS)
            batch = batches.get((topic, partition))
            if batch is None:
                batch = batches[(topic, partition)] = producer.create_batch()
            if batch.append(timestamp=ts, key=key, value=orjson.dumps(value)) is None:     # full
                await flush(topic, partition)
                batch = batches[(topic, partition)] = producer.create_batch()
                batch.append(timestamp=ts, key=key, value=orjson.dumps(value))
            if i % 1_000_000 == 999_999:
                print(f"  produced {i + 1:,} of {events:,}", file=sys.stderr, flush=True)
        for topic, partition in list(batches):
            await flush(topic, partition)
        await asyncio.gather(*sent)
    finally:
        await producer.stop()
    return start


async def create_event_topics_without_retention(pipeline: Pipeline) -> None:
    """The two event topics as tagstream creates them, but kept forever: a history older
    than the broker's 7-day default would be deleted as it is written."""
    s = pipeline.settings
    admin = AIOKafkaAdminClient(**client_kwargs(s))
    await admin.start()
    try:
        await admin.create_topics([NewTopic(s.topic(name), PARTITIONS, 1, topic_configs=
                                            {**topic_configs(name, s), "retention.ms": "-1"})
                                   for name in ("tag_events_topic", "contact_events_topic")])
    finally:
        await admin.close()


async def scan_partition(pipeline: Pipeline, customer: str) -> int:
    """The baseline: the customer's partition of both topics read whole, its records kept."""
    s = pipeline.settings
    key = customer.encode()
    consumer = reader(s)
    await start_client(consumer)
    try:
        partition = partition_of(customer, PARTITIONS)
        tps = [TopicPartition(s.topic(t), partition) for t in ("tag_events_topic", "contact_events_topic")]
        ends = await consumer.end_offsets(tps)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        found, todo = 0, set(tps)
        while todo:
            for tp, records in (await consumer.getmany(*todo, timeout_ms=500, max_records=50_000)).items():
                found += sum(1 for r in records if r.key == key)
            for tp in list(todo):
                if await consumer.position(tp) >= ends[tp]:
                    todo.discard(tp)
        return found
    finally:
        await consumer.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--customers", type=int, default=5, help="customers explained (default 5)")
    parser.add_argument("--population", type=int, default=200_000, help="distinct customers in the history")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    subprocess.run([str(KAFKA_SH), "start"], check=True)
    with tempfile.TemporaryDirectory(prefix="tagstream-explain-") as work:
        pipeline = Pipeline(Path(work), partitions=PARTITIONS)
        asyncio.run(create_event_topics_without_retention(pipeline))
        asyncio.run(ensure_topics(pipeline.settings))
        started = time.monotonic()
        first = asyncio.run(produce_history(pipeline, args.events, args.days, args.population, args.seed))
        produced_s = time.monotonic() - started
        day_from = first + (args.days // 2) * DAY
        rng = random.Random(args.seed + 1)
        env = {**os.environ, **pipeline.settings.to_environ()}
        rows = []
        for _ in range(args.customers):
            customer = f"wwB:wm{rng.randrange(args.population):07d}"
            flags = ["--from", format_time(day_from), "--to", format_time(day_from + DAY), "--json"]
            t0 = time.monotonic()
            run = subprocess.run([sys.executable, "-m", "streams.cli", "explain", customer, *flags], env=env,
                                 cwd=REPO, capture_output=True, text=True, timeout=600)
            cli_s = time.monotonic() - t0
            if run.returncode != 0:
                raise SystemExit(run.stderr)
            events = len(orjson.loads(run.stdout)["events"])
            t0 = time.monotonic()
            corp, _, user = customer.partition(":")
            asyncio.run(explain(pipeline.settings, corp, user, day_from, day_from + DAY))
            call_s = time.monotonic() - t0
            t0 = time.monotonic()
            whole = asyncio.run(scan_partition(pipeline, customer))
            scan_s = time.monotonic() - t0
            rows.append((customer, events, whole, cli_s, call_s, scan_s))
        pipeline.stop(delete_topics=True)
    print(f"\nexplain, one day of {args.events:,} events over {args.days} days, {PARTITIONS} partitions, "
          f"{args.population:,} customers (produced in {produced_s:.0f} s)")
    print("| customer | events that day | its events, all days | `tagstream explain` (s) | explain call (s) "
          "| baseline: its partition read whole (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for customer, events, whole, cli_s, call_s, scan_s in rows:
        print(f"| {customer} | {events} | {whole} | {cli_s:.2f} | {call_s:.2f} | {scan_s:.2f} |")
    print(f"\nmedian: tagstream explain {statistics.median(r[3] for r in rows):.2f} s, the call "
          f"{statistics.median(r[4] for r in rows):.2f} s, the baseline {statistics.median(r[5] for r in rows):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
