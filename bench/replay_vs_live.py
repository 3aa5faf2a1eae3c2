"""One generated event log, processed live and replayed twice, compared and timed.

    .venv/bin/python -m bench.replay_vs_live --events 200000

1. **Live**: rules and the whole log go onto fresh topics (record timestamps = event ts),
   then a real worker (`tagstream worker`) processes the backlog. Throughput is events
   applied per second between the first and the last applied event (read from the worker's
   /metrics every 0.2 s).
2. **Replay from the topics**: `tagstream replay --from --to --dry-run` over the log's time
   range. Throughput is the replay's own events/s (start of reading to the last event).
3. **Archive, then replay from it**: `tagstream archive` over the same range to a gzip
   NDJSON file, then `tagstream replay --files ... --dry-run`.

The three report sets (conversion reports and unreportable ones) must be identical in every
field except `emitted_at`; the harness exits 1 if they are not. Both throughputs come from
the same run on the same log.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from bench.worker import drain
from streams.sources.loadgen import LoadShape, TagTraffic
from streams.replay.run import format_time
from streams.observability.observe import total
from tests.integration.conftest import KAFKA_SH, REPO, Pipeline

PARTITIONS = 4


@dataclass
class Outcome:
    events: int
    live_seconds: float
    live_reports: list
    live_unreportable: list
    topic_replay: dict          # summary JSON of the replay from topics
    archive_replay: dict
    topic_reports: list
    topic_unreportable: list
    archive_reports: list
    archive_unreportable: list
    time_range: tuple

    @property
    def identical(self) -> bool:
        return (canonical(self.live_reports) == canonical(self.topic_reports) == canonical(self.archive_reports)
                and canonical(self.live_unreportable) == canonical(self.topic_unreportable)
                == canonical(self.archive_unreportable))


def canonical(reports: list[dict]) -> list[bytes]:
    """Distinct reports without `emitted_at`, sorted: what 'identical' means."""
    return sorted({orjson.dumps({k: v for k, v in r.items() if k != "emitted_at"}, option=orjson.OPT_SORT_KEYS)
                   for r in reports})


def generated_log(events: int, seed: int) -> tuple[list, list]:
    """(rules, events) from the product's own load generator, in the past (ts ≤ now)."""
    span_ms = events * LoadShape().mean_gap_ms
    traffic = TagTraffic(seed, start_ms=int(time.time() * 1000) - span_ms - 86_400_000, run_tag=f"r{seed}")
    rules = traffic.rules()
    stream = traffic.events()
    return rules, [next(stream) for _ in range(events)]


def run_live(pipeline: Pipeline, rules: list, events: list) -> float:
    """Process the log with a real worker; returns the steady-state seconds."""
    worker = pipeline.start_worker()
    pipeline.send(*[(r.topic, r.key, r.value) for r in rules])
    worker.wait_for_rules(len(rules))
    worker.stop()                  # the whole log is on the topics before the worker reads it
    pipeline.send(*[(e.topic, e.key, e.value, e.value["ts"]) for e in events])
    worker = pipeline.start_worker()
    rate, _ = drain(worker, len(events))
    # Idle partitions now release every hold (all deadlines are long past in wall-clock time).
    deadline = time.monotonic() + 600
    while total(worker.metrics(), "tagstream_held_reports") > 0:
        assert time.monotonic() < deadline, worker.log_tail()
        time.sleep(0.5)
    return len(events) / rate


def read_reports(pipeline: Pipeline, topic: str) -> list[dict]:
    """Every record of the topic, read until nothing new arrives for 2 s."""
    seen = {"n": -1, "at": time.monotonic()}

    def settled(records) -> bool:
        if len(records) != seen["n"]:
            seen.update(n=len(records), at=time.monotonic())
        return time.monotonic() - seen["at"] > 2
    return [orjson.loads(r.value) for r in pipeline.read(topic, until=settled, timeout=300)]


def tagstream(pipeline: Pipeline, *args: str) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, "-m", "streams.cli", *args], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, **pipeline.settings.to_environ()}, timeout=1800)
    if run.returncode != 0:
        raise SystemExit(f"tagstream {' '.join(args)} failed:\n{run.stdout}\n{run.stderr}")
    return run


def replay(pipeline: Pipeline, work: Path, name: str, *source: str) -> tuple[dict, list, list]:
    out = work / f"{name}.ndjson"
    tagstream(pipeline, "replay", *source, "--dry-run", "--out", str(out), "--summary-json", str(work / f"{name}.json"),
              "--dead-letters", str(work / f"{name}.dead.ndjson"))
    load = lambda path: [orjson.loads(line) for line in path.read_bytes().splitlines()]   # noqa: E731
    return (orjson.loads((work / f"{name}.json").read_bytes()), load(out), load(work / f"{name}.unreportable.ndjson"))


def run(events: int, work: Path, seed: int = 1) -> tuple[Outcome, Pipeline]:
    rules, log = generated_log(events, seed)
    pipeline = Pipeline(work, partitions=PARTITIONS)
    try:
        live_seconds = run_live(pipeline, rules, log)
        live_reports = read_reports(pipeline, "conversion_reports")
        live_unreportable = read_reports(pipeline, "unreportable")
    finally:
        pipeline.stop()
    first_ts = min(e.value["ts"] for e in log)
    last_ts = max(e.value["ts"] for e in log)
    time_range = ("--from", format_time(first_ts - 1000), "--to", format_time(last_ts + 2000))
    topic_summary, topic_reports, topic_unreportable = replay(pipeline, work, "topic-replay", *time_range)
    archive = work / "archive.ndjson.gz"
    tagstream(pipeline, "archive", *time_range, "--out", str(archive))
    archive_summary, archive_reports, archive_unreportable = replay(pipeline, work, "archive-replay", "--files", str(archive))
    return Outcome(len(log), live_seconds, live_reports, live_unreportable, topic_summary, archive_summary,
                   topic_reports, topic_unreportable, archive_reports, archive_unreportable, time_range), pipeline


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000, help="events in the generated log (default 200000)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    subprocess.run([str(KAFKA_SH), "start"], check=True)
    with tempfile.TemporaryDirectory(prefix="tagstream-replay-") as work:
        outcome, _ = run(args.events, Path(work), args.seed)
    live_rate = outcome.events / outcome.live_seconds
    print(f"\nreplay vs live, one generated log of {outcome.events:,} events, {PARTITIONS} partitions")
    print("| run | seconds | events/s | reports | unreportable |")
    print("|---|---:|---:|---:|---:|")
    print(f"| live worker (backlog) | {outcome.live_seconds:.1f} | {live_rate:,.0f} | "
          f"{len(canonical(outcome.live_reports)):,} | {len(canonical(outcome.live_unreportable)):,} |")
    for name, summary, reports, unreportable in (
            ("replay from topics", outcome.topic_replay, outcome.topic_reports, outcome.topic_unreportable),
            ("replay from archive", outcome.archive_replay, outcome.archive_reports, outcome.archive_unreportable)):
        print(f"| {name} | {summary['seconds']:.1f} | {summary['events_per_second']:,} | "
              f"{len(canonical(reports)):,} | {len(canonical(unreportable)):,} |")
    print(f"\nreplay from topics ÷ live: {outcome.topic_replay['events_per_second'] / live_rate:.1f}×")
    print("report sets identical (every field but emitted_at): " + ("yes" if outcome.identical else "NO"))
    return 0 if outcome.identical else 1


if __name__ == "__main__":
    sys.exit(main())
