"""`tagstream run` (the README's first command) rides out a broker restart.

The chaos run restarts the broker under the worker and the sink; this is the demo's own
watcher. It samples consumer lag from the broker every two seconds, and a failed sample
used to end the whole run with a traceback. Now it says the broker is not answering and
keeps watching, and the run still finishes with every event processed.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

from tests.integration.conftest import KAFKA_SH, REPO, Pipeline, free_port, wait_until

EVENTS = 3000


def test_tagstream_run_finishes_across_a_broker_restart(kafka_broker, tmp_path):
    pipeline = Pipeline(tmp_path, sink_metrics_port=free_port())
    out = tmp_path / "run.out"
    run = subprocess.Popen(
        [sys.executable, "-m", "streams.cli", "run", "--events", str(EVENTS), "--rate", "150",
         "--reports-file", str(tmp_path / "run" / "reports.ndjson")],
        env={**os.environ, **pipeline.settings.to_environ()}, cwd=REPO,
        stdout=open(out, "wb"), stderr=subprocess.STDOUT, start_new_session=True)

    def processed() -> int:
        counts = re.findall(r"processed\s+([\d,]+)", out.read_text(errors="replace"))
        return int(counts[-1].replace(",", "")) if counts else 0

    try:
        wait_until(lambda: processed() > 300 or run.poll() is not None, 120, "the run to process events")
        assert run.poll() is None, out.read_text()
        subprocess.run([str(KAFKA_SH), "stop"], check=True)
        time.sleep(5)                       # longer than two progress samples
        subprocess.run([str(KAFKA_SH), "start"], check=True)
        assert run.wait(240) == 0, out.read_text()[-4000:]
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        pipeline.stop(delete_topics=True)
    text = out.read_text()
    assert "broker not answering" in text, text[-4000:]
    assert re.search(rf"events processed\s+{EVENTS:,} in", text), text[-4000:]


def test_the_readme_run_shows_all_six_types_delayed_and_cancelled(kafka_broker, tmp_path):
    """`make run EVENTS=20000` as the README gives it: six hours of event time as a backlog,
    so delayed reports are released and some holds are cancelled within the run."""
    pipeline = Pipeline(tmp_path, sink_metrics_port=free_port())
    reports_file = tmp_path / "run" / "reports.ndjson"
    reports_file.parent.mkdir()
    reports_file.write_text('{"left over": "from an earlier run"}\n')
    try:
        run = subprocess.run(
            [sys.executable, "-m", "streams.cli", "run", "--events", "20000", "--seed", "7",
             "--reports-file", str(reports_file)],
            env={**os.environ, **pipeline.settings.to_environ()}, cwd=REPO,
            capture_output=True, text=True, timeout=300)
    finally:
        pipeline.stop(delete_topics=True)
    text = run.stdout
    assert run.returncode == 0, text[-4000:] + run.stderr[-2000:]
    summary = text[text.index("\nsummary"):]
    counts = {name: int(n.replace(",", "")) for name, n in re.findall(r"\b([A-Z_]+) ([\d,]+)", summary)}
    for standard_type in ("CONSULT", "LEAD", "VALID", "ORDER", "LONG_TERM", "INVALID"):
        assert counts.get(standard_type, 0) > 0, (standard_type, summary)
    cancelled = int(re.search(r"cancelled holds\s+([\d,]+)", summary).group(1).replace(",", ""))
    assert cancelled > 0, summary
    assert re.search(r"still held\s+[\d,]+", summary) and "unreportable" in summary, summary
    # the reports file holds this run's reports only, one per report counted
    lines = reports_file.read_text().splitlines()
    assert len(lines) == sum(counts[t] for t in ("CONSULT", "LEAD", "VALID", "ORDER", "LONG_TERM", "INVALID"))
    assert all('"outer_action_id"' in line for line in lines)
