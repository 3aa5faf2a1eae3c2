"""The benchmark harnesses run end to end at a small size, so they cannot rot. No timing is
asserted: the numbers belong in the docs, measured by `make bench`, `make bench-sink` and
`make bench-ingest`."""
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


def test_worker_benchmark_runs_both_sides_and_prints_the_ratio(kafka_broker, tmp_path):
    run = subprocess.run([sys.executable, "-m", "bench.worker", "--events", "3000", "--latency-seconds", "2",
                          "--plot", str(tmp_path / "bench.png"), "--against", "HEAD"], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = {line.split(" | ")[0].strip("| *"): line for line in run.stdout.splitlines() if line.startswith("| ")}
    for name in ("passthrough ceiling (raw aiokafka)", "tagstream worker", "tagstream ÷ passthrough",
                 "context: passthrough + per-customer event ids in RocksDB and a changelog",
                 "idiomatic Faust app (bench/faust_baseline.py)", "tagstream as of HEAD (--against)",
                 "realtime reports of the backlog: tagstream / the Faust app",
                 "worker CPU per event", "peak RSS: tagstream / the Faust app", "25% of max", "50% of max", "80% of max"):
        assert name in rows, run.stdout
    assert "plot skipped" in run.stdout or (tmp_path / "bench.png").stat().st_size > 0


def test_recovery_benchmark_restores_every_seeded_customer(kafka_broker):
    run = subprocess.run([sys.executable, "-m", "bench.recovery", "--customers", "5000", "--events", "3000"], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1].strip(" |") for line in run.stdout.splitlines()
            if line.startswith("| ") and " | " in line}
    assert rows["customers in the changelog"] == "5,000"
    assert int(rows["keys restored (RocksDB estimate)"].replace(",", "")) >= 4_500
    assert any(name.startswith("then 3,000 events") for name in rows), run.stdout
    assert "worker peak RSS after them" in rows, run.stdout


def test_hot_customer_benchmark_prints_a_row_per_checkpoint(kafka_broker):
    run = subprocess.run([sys.executable, "-m", "bench.hot_customer", "--events", "3000"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [line.split(" | ")[0].strip("| ") for line in run.stdout.splitlines() if line.startswith("| ")]
    assert rows[1:] == ["1,000", "3,000"], run.stdout
    largest = int(run.stdout.rsplit("largest state value written: ", 1)[1].split()[0].replace(",", ""))
    assert 0 < largest < 1_000, run.stdout


def test_ingest_benchmark_answers_callbacks_and_times_tag_to_report(kafka_broker):
    run = subprocess.run([sys.executable, "-m", "bench.ingest", "--seconds", "1", "--offered", "100",
                          "--pipeline-rates", "20"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [line.split(" | ") for line in run.stdout.splitlines() if line.startswith("| ")]
    servers = {row[0].strip("| ") for row in rows if len(row) == 7 and row[1] != "load" and "---" not in row[0]}
    assert servers == {"bare aiohttp (baseline)", "tagstream ingest", "tagstream ingest, two replicas"}, run.stdout
    assert all(int(row[6].strip(" |").replace(",", "")) == 0 for row in rows if row[0].strip("| ") in servers)
    steps = {row[0].strip("| ") for row in rows if len(row) == 2}
    assert {"envelope XML (defusedxml)", "decryption (AES-256-CBC, cryptography)"} <= steps, run.stdout
    stages = {(row[0].strip("| "), row[1]) for row in rows if len(row) == 5 and row[0] != "| from"}
    assert ("callback sent", "report emitted") in stages and ("tag event written", "report emitted (worker)") in stages, \
        run.stdout


def test_explain_benchmark_explains_customers_beside_the_whole_partition_baseline(kafka_broker):
    run = subprocess.run([sys.executable, "-m", "bench.explain", "--events", "20000", "--days", "3",
                          "--customers", "2", "--population", "2000"], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [line.split(" | ") for line in run.stdout.splitlines() if line.startswith("| wwB:")]
    assert len(rows) == 2
    for row in rows:
        day, whole = int(row[1]), int(row[2])
        assert whole >= day and whole > 0, row       # a customer of 2,000 in 20,000 events has some


def test_scale_benchmark_prints_a_row_per_corpus_size():
    run = subprocess.run([sys.executable, "-m", "bench.scale", "--corps", "5", "20", "--tags", "10"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [line.split(" | ") for line in run.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row[0].strip("| ") for row in rows[1:]] == ["5", "20"], run.stdout
    # each tag t of corp c has 1 + (c + t) % 3 versions
    assert [int(row[1].replace(",", "")) for row in rows[1:]] == [
        sum(1 + (c + t) % 3 for c in range(corps) for t in range(10)) for corps in (5, 20)], run.stdout
