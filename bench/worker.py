"""The worker benchmark: tagstream beside a raw-aiokafka passthrough, in the same run.

    .venv/bin/python -m bench.worker                  # full size (make bench)
    .venv/bin/python -m bench.worker --events 20000 --latency-seconds 5   # CI size

1. **Load.** The product's generator (`streams/sources/loadgen.py`) with many corps (thousands of
   rule versions), contacts ahead of tags, mostly unmapped tags and repeats. Rules first,
   then `--events` events go onto fresh topics (4 partitions) as a backlog.
2. **Ceiling: passthrough.** A raw aiokafka loop over the same two topics: `getmany`, parse
   with orjson, one dict lookup (the rule), serialize, produce in batches to an output topic
   with the same partitions, `acks=all`, committing every 2.8 s (Faust's default commit
   interval). Throughput is events per second from its first to its last record.
   *Context, not the ceiling:* the same loop plus the least state a worker that reports
   once per customer must keep: each customer's seen event ids, read from and written to
   RocksDB and sent to a changelog topic (`CustomerIds`).
3. **An idiomatic Faust app** (`bench/faust_baseline.py`): the job as Faust's documentation
   teaches it (per-record agents, a Table, a GlobalTable, a timer), draining the same
   backlog. Its realtime reports are compared with tagstream's: it is fast or slow, and
   also wrong in the ways its docstring lists.
4. **tagstream.** A real `tagstream worker` drains the same backlog (its own group).
   Throughput as above, from its /metrics. CPU per event and peak RSS from /proc.
   With `--against REF` (repeatable), tagstream as of each commit REF (a git worktree) drains
   the same backlog too, in its own group, next: one lever's A/B in one run.
5. **Latency.** With the worker caught up, events arrive at fixed rates (25%, 50% and 80% of
   the throughput just measured) for `--latency-seconds` each. Latency of each real-time
   report is the time from its event's `ts` (stamped when produced) to the report's arrival
   at a consumer of the outbound topic: p50, p99 and max.

Prints a table with the headline figure (tagstream ÷ passthrough) and writes a PNG plot.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from rocksdict import Options, Rdict, WriteBatch, WriteOptions

from streams.kafka.admin import ensure_topics
from streams.sources.loadgen import LoadShape, TagTraffic
from tests.integration.conftest import KAFKA_SH, REPO, Pipeline, WorkerProcess, free_port
from tests.logs import kafka_partition

PARTITIONS = 4
SHAPE = LoadShape(corps=400, active_customers=20_000, events_per_customer=12)


@dataclass
class Result:
    events: int
    passthrough_rate: float = 0.0
    stateful_passthrough_rate: float = 0.0
    worker_rate: float = 0.0
    worker_cpu_us_per_event: float = 0.0
    worker_peak_rss_mb: float = 0.0
    # the broker shares the two cores: what each side costs it, per event
    passthrough_broker_cpu_us: float = 0.0
    worker_broker_cpu_us: float = 0.0
    rules: int = 0
    faust_rate: float = 0.0
    faust_peak_rss_mb: float = 0.0
    # realtime reports of the backlog: tagstream's, the Faust app's, and how they differ
    realtime_reports: int = 0
    faust_realtime_reports: int = 0
    faust_missing: int = 0          # tagstream reported it, the Faust app did not
    against: list = field(default_factory=list)   # (ref, events/s, CPU µs per event) of --against
    faust_extra: int = 0            # the Faust app reported it, tagstream did not
    # (share, offered events/s, n, p50 ms, p99 ms, max ms, p99 ms of event ts to the worker's emission)
    latency: list = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.worker_rate / self.passthrough_rate if self.passthrough_rate else float("nan")


# -- load -------------------------------------------------------------------------------------

def backlog(events: int, seed: int) -> tuple[TagTraffic, list, list]:
    start = int(time.time() * 1000) - events * SHAPE.mean_gap_ms - 3_600_000
    traffic = TagTraffic(seed, start_ms=start, shape=SHAPE, run_tag=f"b{seed}")
    rules = traffic.rules()
    stream = traffic.events()
    return traffic, rules, [next(stream) for _ in range(events)]


def produce(pipeline: Pipeline, records: list) -> None:
    pipeline.send(*[(r.topic, r.key, r.value, r.value.get("ts")) for r in records])


# -- the passthrough ceiling --------------------------------------------------------------------

def passthrough(pipeline: Pipeline, rules: list, events: int, stateful: bool = False) -> float:
    """The ceiling, in a fresh process of its own, as the worker is: the bench process holds
    the whole pre-generated load, and its garbage collections (seconds of them over a run)
    would otherwise slow the baseline and flatter the ratio."""
    import multiprocessing
    book = {r.key: r.value for r in rules}
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_passthrough_process, (pipeline.settings, book, events, stateful))


def _passthrough_process(settings, book: dict, events: int, stateful: bool) -> float:
    if not stateful:
        return asyncio.run(_passthrough(settings, book, events))
    with tempfile.TemporaryDirectory(prefix="tagstream-bench-state-") as state_dir:
        return asyncio.run(_passthrough(settings, book, events, CustomerIds(Path(state_dir))))


class CustomerIds:
    """The least state a worker that reports once per customer must keep (a context line in
    the table, not the ceiling): per customer, the event ids seen, in RocksDB (WAL off, as
    tagstream's store) and in a changelog topic (producer record batches, as tagstream's
    store), written once per fetched batch."""

    def __init__(self, path: Path):
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        self.db = Rdict(str(path), options)
        self.write_options = WriteOptions()
        self.write_options.disable_wal = True

    def update(self, key: bytes, event: dict, writes: dict) -> bytes:
        stored = writes.get(key)
        if stored is None:
            stored = self.db.get(key)
        seen = orjson.loads(stored) if stored is not None else {}
        seen[event["event_id"]] = event["ts"]
        return orjson.dumps(seen)

    async def write(self, producer: AIOKafkaProducer, changelog: str, partition: int, writes: dict) -> list:
        """One fetched batch's writes: to the changelog in producer record batches, and to
        RocksDB in one write batch. Returns the deliveries to await."""
        deliveries = []
        batch = producer.create_batch()
        for key, value in writes.items():
            if batch.append(key=key, value=value, timestamp=None) is None:
                deliveries.append(await producer.send_batch(batch, changelog, partition=partition))
                batch = producer.create_batch()
                batch.append(key=key, value=value, timestamp=None)
        deliveries.append(await producer.send_batch(batch, changelog, partition=partition))
        local = WriteBatch(raw_mode=True)
        for key, value in writes.items():
            local.put(key, value)
        self.db.write(local, self.write_options)
        return deliveries


async def _create_topics(s, names: list[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=s.bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, PARTITIONS, 1) for name in names])
    finally:
        await admin.close()


async def _passthrough(s, book: dict, events: int, state: Optional[CustomerIds] = None) -> float:
    """Raw aiokafka: consume, parse, one lookup, serialize, produce in batches; events/s.
    With `state`, each event also updates its customer's state (`CustomerIds`), which goes
    to a changelog topic with the output."""
    out_topic = s.topic_prefix + ("stateful-passthrough-out" if state else "passthrough-out")
    changelog = out_topic + "-changelog"
    await _create_topics(s, [out_topic, changelog] if state else [out_topic])
    consumer = AIOKafkaConsumer(s.topic("tag_events_topic"), s.topic("contact_events_topic"),
                                bootstrap_servers=s.bootstrap_servers,
                                group_id=f"{s.app_id}-{'stateful-' if state else ''}passthrough",
                                enable_auto_commit=False, auto_offset_reset="earliest")
    producer = AIOKafkaProducer(bootstrap_servers=s.bootstrap_servers, acks="all", linger_ms=1)
    await consumer.start()
    await producer.start()
    done, first, last_commit = 0, None, time.monotonic()
    try:
        while done < events:
            batches = await consumer.getmany(timeout_ms=500, max_records=5000)
            if first is None and batches:
                first = time.monotonic()
            futures = []
            for tp, records in batches.items():
                writes = {}
                for record in records:
                    event = orjson.loads(record.value)
                    rule = book.get(f"{event['corp_id']}:{event.get('tag_id', '')}")
                    out = orjson.dumps({"event_id": event["event_id"], "mapped": rule is not None})
                    futures.append(await producer.send(out_topic, key=record.key, value=out, partition=tp.partition))
                    if state is not None:
                        writes[record.key] = state.update(record.key, event, writes)
                    done += 1
                if writes:
                    futures += await state.write(producer, changelog, tp.partition, writes)
            if futures:
                await asyncio.gather(*futures)
            if time.monotonic() - last_commit >= 2.8:
                await consumer.commit()
                last_commit = time.monotonic()
        await consumer.commit()
        return events / (time.monotonic() - first)
    finally:
        await consumer.stop()
        await producer.stop()


# -- the idiomatic Faust app ---------------------------------------------------------------------

def faust_baseline(pipeline: Pipeline, events: int, work: Path, timeout: float = 1800) -> tuple[float, float]:
    """`bench/faust_baseline.py` in a process of its own, draining the backlog; returns
    (events/s from its first to its last event, peak RSS in MiB)."""
    stats = work / "faust-baseline-stats.json"
    s = pipeline.settings
    asyncio.run(_create_topics(s, [s.topic_prefix + "faust-baseline-reports"]))   # it only sends there
    env = {**os.environ, "BASELINE_BROKER": f"kafka://{s.bootstrap_servers}", "BASELINE_PREFIX": s.topic_prefix,
           "BASELINE_APP_ID": f"{s.app_id}-faust-baseline", "BASELINE_STATS": str(stats),
           "BASELINE_DATADIR": str(work / "faust-baseline-data"), "BASELINE_PARTITIONS": str(PARTITIONS),
           "BASELINE_PARENT": str(os.getpid())}
    log = open(work / "faust-baseline.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "bench.faust_baseline", "worker"], env=env,
                               stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parent.parent)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the Faust app exited: {(work / 'faust-baseline.log').read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("the Faust app did not drain the backlog")
            done = orjson.loads(stats.read_bytes()) if stats.exists() else {"count": 0}
            if done["count"] >= events:
                return done["count"] / (done["last"] - done["first"]), _proc(process.pid)[1]
            time.sleep(0.5)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


async def _read_to_end(s, topic: str) -> list:
    """Every record of `topic` up to its end offsets as of now."""
    consumer = AIOKafkaConsumer(bootstrap_servers=s.bootstrap_servers, group_id=None, enable_auto_commit=False,
                                isolation_level="read_committed")
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]     # both topics were made with PARTITIONS
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        records: list = []
        async def behind() -> bool:
            return any([await consumer.position(tp) < ends[tp] for tp in tps])
        while await behind():
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                records.extend(batch)
        return records
    finally:
        await consumer.stop()


def realtime_ids(s, topic: str) -> set[str]:
    return {report["outer_action_id"] for report in (orjson.loads(r.value) for r in asyncio.run(_read_to_end(s, topic)))
            if report.get("mode") == "realtime"}


# -- tagstream as of another commit (--against) ------------------------------------------------------

def drain_as_of(pipeline: Pipeline, ref: str, events: int, work: Path) -> tuple[float, float]:
    """tagstream's worker as of commit `ref` (a git worktree) drains the backlog in its own
    group, writing to topics of its own; returns (events/s, CPU µs per event)."""
    commit = subprocess.run(["git", "rev-parse", "--short", f"{ref}^{{commit}}"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout.strip()
    source = work / f"as-of-{commit}"
    subprocess.run(["git", "worktree", "add", "--detach", str(source), ref], cwd=REPO, check=True, capture_output=True)
    try:
        found = subprocess.run([sys.executable, "-c", "import streams; print(streams.__file__)"], cwd=source,
                               check=True, capture_output=True, text=True).stdout
        assert found.startswith(str(source)), f"the worker would not run {ref}'s code: {found}"
        tag = f"as-of-{commit}"                 # a topic name may not hold "~" or "^"
        settings = dataclasses.replace(
            pipeline.settings, app_id=f"{pipeline.settings.app_id}-{tag}", data_dir=str(source / ".bench-data"),
            metrics_port=free_port(), conversion_reports_topic=f"conversion-reports-{tag}",
            unreportable_topic=f"unreportable-{tag}")
        worker = WorkerProcess(settings, work / f"worker-{tag}.log").start(source=source)
        try:
            worker.wait_for_rules(1, timeout=120)
            rate, cpu = drain(worker, events)
            return rate, cpu / events * 1e6
        finally:
            worker.stop()
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(source)], cwd=REPO, capture_output=True)


# -- tagstream ---------------------------------------------------------------------------------

def _proc(pid: int) -> tuple[float, float]:
    """(CPU seconds used, peak RSS in MB) of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    peak = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith("VmHWM:"))
    return cpu, peak / 1024


def _broker_cpu() -> float:
    """CPU seconds the local broker has used so far."""
    state = Path(os.environ.get("TAGSTREAM_KAFKA_STATE", KAFKA_SH.parent.parent.parent / ".state" / "kafka"))
    return _proc(int((state / "kafka.pid").read_text()))[0]


def drain(worker, events: int, timeout: float = 1800) -> tuple[float, float]:
    """Wait until the worker applied `events`; returns (events/s, CPU seconds used).

    Every look is a /metrics scrape, which costs the worker CPU, so the harness looks every
    second while the end is far and every 0.1 s near it (predicted from the rate so far)."""
    first = None
    cpu_before = _proc(worker.process.pid)[0]
    deadline = time.monotonic() + timeout
    while True:
        assert worker.process.poll() is None, worker.log_tail()
        assert time.monotonic() < deadline, "the worker did not drain the backlog"
        applied = worker.events_applied()
        now = time.monotonic()
        if applied > 0 and first is None:
            first, first_applied = now, applied
        if applied >= events:
            elapsed = now - first
            return (applied - first_applied) / max(elapsed, 1e-9), _proc(worker.process.pid)[0] - cpu_before
        pause = 0.1
        if first is not None and applied > first_applied and now > first:
            rate = (applied - first_applied) / (now - first)
            pause = min(1.0, max(0.1, (events - applied) / rate - 1.0))
        time.sleep(pause)


async def latency_run(pipeline: Pipeline, traffic: TagTraffic, rate: float, seconds: float) -> list[tuple]:
    """Offer `rate` events/s (ts = now) for `seconds`. For each real-time report: (event ts to
    arrival at a consumer of the outbound topic, event ts to the worker's emission) in ms.

    The load is generated before the clock starts and produced in record batches, one per
    partition every 2 ms, so the harness itself costs a few µs per event: on two cores its
    CPU would otherwise be taken from the worker it measures."""
    s = pipeline.settings
    reports = AIOKafkaConsumer(s.topic("conversion_reports_topic"), bootstrap_servers=s.bootstrap_servers,
                               group_id=None, auto_offset_reset="latest")
    producer = AIOKafkaProducer(bootstrap_servers=s.bootstrap_servers, acks="all", linger_ms=0)
    await reports.start()
    await producer.start()
    await reports.getmany(timeout_ms=500)             # position at the end before offering load
    traffic.clock = lambda: int(time.time() * 1000)
    stream = traffic.events()
    load = []
    for _ in range(int(rate * seconds)):
        record = next(stream)
        key = record.key.encode()
        load.append((s.topic(record.topic + "_topic"), kafka_partition(record.key, PARTITIONS), key, record.value))
    latencies: list[tuple] = []
    stop = asyncio.Event()

    async def collect() -> None:
        while not stop.is_set():
            batches = await reports.getmany(timeout_ms=100)
            now = time.time() * 1000
            for records in batches.values():
                for record in records:
                    report = orjson.loads(record.value)
                    if report["mode"] == "realtime":
                        latencies.append((now - report["event_ts"], report["emitted_at"] - report["event_ts"]))
    collector = asyncio.create_task(collect())
    started = time.monotonic()
    sent = 0
    try:
        while sent < len(load):
            due = min(len(load), int((time.monotonic() - started) * rate))
            batches: dict = {}
            now_ms = int(time.time() * 1000)
            for topic, partition, key, value in load[sent:due]:
                value["ts"] = now_ms
                batch = batches.get((topic, partition))
                if batch is None:
                    batch = batches[(topic, partition)] = producer.create_batch()
                if batch.append(key=key, value=orjson.dumps(value), timestamp=None) is None:
                    await producer.send_batch(batch, topic, partition=partition)
                    batch = batches[(topic, partition)] = producer.create_batch()
                    batch.append(key=key, value=orjson.dumps(value), timestamp=None)
            sent = max(sent, due)
            for (topic, partition), batch in batches.items():
                await producer.send_batch(batch, topic, partition=partition)
            await asyncio.sleep(0.002)
        await producer.flush()
        await asyncio.sleep(2)                        # the last reports arrive
    finally:
        stop.set()
        await collector
        await reports.stop()
        await producer.stop()
    return latencies


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(events: int, latency_seconds: float, work: Path, seed: int = 7, against: tuple = ()) -> Result:
    subprocess.run([str(KAFKA_SH), "start"], check=True, capture_output=True)
    traffic, rules, log = backlog(events, seed)
    gc.freeze()       # the pre-generated load is kept to the end: keep it out of every collection
    pipeline = Pipeline(work, partitions=PARTITIONS, log_level="warning")
    asyncio.run(ensure_topics(pipeline.settings))
    result = Result(events=len(log), rules=len(rules))
    produce(pipeline, rules)
    produce(pipeline, log)
    print(f"bench: {len(log):,} events and {len(rules):,} rule versions on the topics", file=sys.stderr, flush=True)
    broker_before = _broker_cpu()
    result.passthrough_rate = passthrough(pipeline, rules, len(log))
    result.passthrough_broker_cpu_us = (_broker_cpu() - broker_before) / len(log) * 1e6
    print(f"bench: passthrough {result.passthrough_rate:,.0f} events/s", file=sys.stderr, flush=True)
    result.stateful_passthrough_rate = passthrough(pipeline, rules, len(log), stateful=True)
    print(f"bench: stateful passthrough {result.stateful_passthrough_rate:,.0f} events/s", file=sys.stderr, flush=True)
    result.faust_rate, result.faust_peak_rss_mb = faust_baseline(pipeline, len(log), work)
    print(f"bench: idiomatic Faust app {result.faust_rate:,.0f} events/s", file=sys.stderr, flush=True)
    worker = pipeline.start_worker()
    try:
        worker.wait_for_rules(len(rules), timeout=120)
        broker_before = _broker_cpu()
        result.worker_rate, cpu = drain(worker, len(log))
        result.worker_broker_cpu_us = (_broker_cpu() - broker_before) / len(log) * 1e6
        result.worker_cpu_us_per_event = cpu / len(log) * 1e6
        print(f"bench: tagstream {result.worker_rate:,.0f} events/s", file=sys.stderr, flush=True)
        ours = realtime_ids(pipeline.settings, pipeline.topic("conversion_reports"))
        theirs = realtime_ids(pipeline.settings, pipeline.settings.topic_prefix + "faust-baseline-reports")
        result.realtime_reports, result.faust_realtime_reports = len(ours), len(theirs)
        result.faust_missing, result.faust_extra = len(ours - theirs), len(theirs - ours)
        for ref in against:
            rate, cpu_us = drain_as_of(pipeline, ref, len(log), work)
            result.against.append((ref, rate, cpu_us))
            print(f"bench: tagstream as of {ref} {rate:,.0f} events/s", file=sys.stderr, flush=True)
        # Warm-up, not recorded: right after the backlog the worker's RocksDB is compacting
        # what it just wrote, and the first seconds measured that instead of steady state.
        asyncio.run(latency_run(pipeline, traffic, 0.25 * result.worker_rate, min(5.0, latency_seconds)))
        for share in (0.25, 0.5, 0.8):
            rate = share * result.worker_rate
            measured = asyncio.run(latency_run(pipeline, traffic, rate, latency_seconds))
            latencies = [total for total, _ in measured]
            in_worker = [emitted for _, emitted in measured]
            result.latency.append((share, rate, len(latencies), _percentile(latencies, 0.5),
                                   _percentile(latencies, 0.99), max(latencies, default=float("nan")),
                                   _percentile(in_worker, 0.99)))
            print(f"bench: {share:.0%} load ({rate:,.0f}/s): p99 {result.latency[-1][4]:.0f} ms",
                  file=sys.stderr, flush=True)
        result.worker_peak_rss_mb = _proc(worker.process.pid)[1]
    finally:
        pipeline.stop(delete_topics=True)
    return result


def table(result: Result) -> str:
    lines = [f"worker benchmark: {result.events:,} events, {result.rules:,} rule versions, {PARTITIONS} partitions, "
             f"broker on the same machine ({os.cpu_count()} cores)",
             "",
             "| measure | value |", "|---|---:|",
             f"| passthrough ceiling (raw aiokafka) | {result.passthrough_rate:,.0f} events/s |",
             f"| tagstream worker | {result.worker_rate:,.0f} events/s |",
             f"| **tagstream ÷ passthrough** | **{result.ratio:.2f}** |",
             f"| context: passthrough + per-customer event ids in RocksDB and a changelog | "
             f"{result.stateful_passthrough_rate:,.0f} events/s ({result.stateful_passthrough_rate / result.passthrough_rate:.2f}× "
             f"the passthrough; tagstream is {result.worker_rate / result.stateful_passthrough_rate:.2f}× it) |",
             f"| idiomatic Faust app (bench/faust_baseline.py) | {result.faust_rate:,.0f} events/s "
             f"({result.faust_rate / result.passthrough_rate:.2f}× the passthrough; tagstream is "
             f"{result.worker_rate / result.faust_rate:.1f}× it) |",
             f"| realtime reports of the backlog: tagstream / the Faust app | {result.realtime_reports:,} / "
             f"{result.faust_realtime_reports:,} ({result.faust_missing:,} of tagstream's missing, "
             f"{result.faust_extra:,} others) |",
             *[f"| tagstream as of {ref} (--against) | {rate:,.0f} events/s ({rate / result.passthrough_rate:.2f}× "
               f"the passthrough; {cpu_us:,.0f} µs CPU per event) |" for ref, rate, cpu_us in result.against],
             f"| worker CPU per event | {result.worker_cpu_us_per_event:,.0f} µs |",
             f"| broker CPU per event: passthrough / tagstream | {result.passthrough_broker_cpu_us:,.0f} µs / "
             f"{result.worker_broker_cpu_us:,.0f} µs |",
             f"| peak RSS: tagstream / the Faust app | {result.worker_peak_rss_mb:,.0f} MiB / "
             f"{result.faust_peak_rss_mb:,.0f} MiB |",
             "",
             "| offered load | events/s | real-time reports | p50 ms | p99 ms | max ms | p99 ms to emission |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for share, rate, n, p50, p99, top, emitted in result.latency:
        lines.append(f"| {share:.0%} of max | {rate:,.0f} | {n:,} | {p50:.1f} | {p99:.1f} | {top:.1f} | {emitted:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=300_000, help="backlog size (default 300000)")
    parser.add_argument("--latency-seconds", type=float, default=20, help="seconds per offered load (default 20)")
    parser.add_argument("--plot", default="docs/bench.png", help="PNG plot to write (default docs/bench.png)")
    parser.add_argument("--against", action="append", default=[], metavar="REF",
                        help="also drain the backlog with tagstream as of commit REF (repeatable): a lever's A/B "
                             "in one run, e.g. --against HEAD~1")
    args = parser.parse_args(argv)
    for ref in args.against:
        if subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], cwd=REPO,
                          capture_output=True).returncode != 0:
            parser.error(f"--against {ref}: not a commit of this repository (try HEAD~1 or a hash from git log)")
    with tempfile.TemporaryDirectory(prefix="tagstream-bench-") as work:
        result = run(args.events, args.latency_seconds, Path(work), against=tuple(args.against))
    print(table(result))
    if args.plot:
        from bench.plot import bench_png
        bench_png(result, Path(args.plot))
        print(f"\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
