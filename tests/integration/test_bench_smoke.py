"""The benchmark harnesses run end to end at a small size, so they cannot rot. No timing is
asserted: the numbers belong in the README, measured by `make bench-sink`."""
from __future__ import annotations

import subprocess
import sys

from tests.integration.conftest import REPO


def test_sink_benchmark_delivers_every_report_and_prints_its_table(kafka_broker):
    run = subprocess.run([sys.executable, "-m", "bench.sink_throughput", "--reports", "3000",
                          "--rate-limits", "1000000"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [line for line in run.stdout.splitlines() if line.startswith("| ") and "3,000" in line]
    assert [r.split(" | ")[0] for r in rows] == ["| HTTP ceiling (no Kafka)", "| tagstream sink, rate limit 1000000/min"]
