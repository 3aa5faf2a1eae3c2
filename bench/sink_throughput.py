"""Sink delivery throughput against the local Marketing API server, with its ceiling measured
in the same run.

    .venv/bin/python -m bench.sink_throughput --reports 50000

Phases, each against a fresh local API server (`tests/marketing_api_server.py`, its own
process, no faults):

1. **HTTP ceiling**: the reports packed exactly as the sink packs them (≤ 50 actions and
   50 KB per (account, action set)) and posted straight from memory by the sink's own API
   client, with the sink's concurrency and no rate limit. No Kafka: this is the most the
   local server and the HTTP path can take on this machine.
2. **tagstream sink** at each `--rate-limits` value (requests per minute): the reports are
   put on a fresh outbound topic, then `tagstream sink --target api` is started as a child
   process and timed until the server has accepted every report. It pays for everything
   the guarantee costs: Kafka reads, the `sending`/`acked` records, the commit.

Throughput is reports accepted per second between the first and the last accepted report
(steady state; the sink's start-up and group join are reported separately).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from streams.kafka.admin import ensure_topics
from streams.sinks.marketing_api import MarketingApiClient, RateLimiter, TokenSource, pack
from streams.settings import Settings
from tests import kafka_io
from tests.integration.conftest import KAFKA_SH, REPO, Pipeline, SinkProcess, free_port
from tests.report_samples import sample_reports

TOKEN = "bench-token"


@dataclass
class Phase:
    name: str
    reports: int
    requests: int
    startup_s: float
    steady_s: float

    @property
    def rate(self) -> float:
        return self.reports / self.steady_s if self.steady_s > 0 else float("nan")


class LocalApi:
    """The local Marketing API server in its own process (so it never shares a GIL with
    what it measures)."""

    def __init__(self):
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.marketing_api_server", "--port", str(self.port), "--token", TOKEN],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while self.stats() is None:
            if time.monotonic() > deadline:
                raise SystemExit("bench: the local Marketing API server did not start")
            time.sleep(0.1)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stats(self):
        try:
            with urllib.request.urlopen(self.base_url + "/stats", timeout=2) as answer:
                return json.loads(answer.read())
        except OSError:
            return None

    def wait_for(self, n: int, timeout: float, alive=lambda: True) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if stats and stats["accepted"] >= n:
                return stats
            if time.monotonic() > deadline or not alive():
                raise SystemExit(f"bench: server accepted {stats and stats['accepted']} of {n} reports")
            time.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def http_ceiling(reports: list[dict], concurrency: int) -> Phase:
    api = LocalApi()
    try:
        batches = pack(reports)

        async def post_all() -> None:
            slots = asyncio.Semaphore(concurrency)
            async with MarketingApiClient(api.base_url, TokenSource(value=TOKEN),
                                          RateLimiter(10 ** 9), timeout_s=30) as client:
                async def post(body: bytes) -> None:
                    async with slots:
                        status, answer, text = await client.post(body)
                        assert status == 200 and answer["code"] == 0, text
                await asyncio.gather(*(post(b.body()) for b in batches))

        asyncio.run(post_all())
        stats = api.wait_for(len(reports), 10)
    finally:
        api.stop()
    return Phase("HTTP ceiling (no Kafka)", len(reports), stats["requests"], 0.0,
                 stats["last_accepted_at"] - stats["first_accepted_at"])


def sink_run(reports: list[dict], rate_limit: int, work: Path) -> Phase:
    pipeline = Pipeline(work / f"rate-{rate_limit}")
    pipeline.tmp_dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(ensure_topics(pipeline.settings))
    kafka_io.produce(kafka_io.json_record(pipeline.topic("conversion_reports"), r["outer_action_id"], r)
                     for r in reports)
    api = LocalApi()
    token_file = work / "token"
    token_file.write_text(TOKEN)
    sink = SinkProcess(pipeline, api.base_url, token_file, pipeline.tmp_dir / "sink.log")
    sink.env["TAGSTREAM_SINK_RATE_LIMIT"] = str(rate_limit)
    started = time.time()
    sink.start()
    try:
        stats = api.wait_for(len(reports), 900, alive=lambda: sink.process.poll() is None)
    finally:
        sink.stop()
        api.stop()
    return Phase(f"tagstream sink, rate limit {rate_limit}/min", len(reports), stats["requests"],
                 stats["first_accepted_at"] - started, stats["last_accepted_at"] - stats["first_accepted_at"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reports", type=int, default=100_000, help="reports per phase (default 100000)")
    parser.add_argument("--rate-limits", default=f"{Settings.sink_rate_limit},1000000",
                        help="sink rate limits to run, requests per minute, comma-separated "
                             "(default: the shipped default and effectively unlimited)")
    args = parser.parse_args(argv)
    rate_limits = [int(x) for x in args.rate_limits.split(",") if x]
    subprocess.run([str(KAFKA_SH), "start"], check=True)
    reports = sample_reports(args.reports, seed=1)
    concurrency = Settings.sink_concurrency
    print(f"sink throughput: {args.reports} reports per phase, sink concurrency {concurrency}", flush=True)
    phases = [http_ceiling(reports, concurrency)]
    print(f"  {phases[0].name}: {phases[0].rate:,.0f} reports/s", flush=True)
    with tempfile.TemporaryDirectory(prefix="tagstream-bench-") as work:
        for limit in rate_limits:
            phases.append(sink_run(reports, limit, Path(work)))
            print(f"  {phases[-1].name}: {phases[-1].rate:,.0f} reports/s", flush=True)
    ceiling = phases[0].rate
    print()
    print("| phase | reports | requests | start-up s | steady s | reports/s | ÷ HTTP ceiling |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for p in phases:
        print(f"| {p.name} | {p.reports:,} | {p.requests:,} | {p.startup_s:.1f} | {p.steady_s:.1f} "
              f"| {p.rate:,.0f} | {p.rate / ceiling:.2f} |")


if __name__ == "__main__":
    main()
