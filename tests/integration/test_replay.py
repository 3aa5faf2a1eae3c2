"""Replay on the real broker: the same generated log processed live by a real worker, replayed
from the topics and replayed from an archive gives three identical report sets (every field
but `emitted_at`); and replaying a range whose reports were already delivered makes zero new
requests at the Marketing API.

The default suite runs 20,000 events; `make bench-replay` runs the same harness
(bench/replay_vs_live.py) at 200,000 and prints the throughput of each run.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import orjson
import pytest

from bench.replay_vs_live import canonical, run, tagstream
from streams.observability.observe import scrape, total
from tests.integration.conftest import REPO, SinkProcess, exported_lag, wait_until
from tests.marketing_api_server import MarketingApiServer, ServerThread

EVENTS = int(os.environ.get("TAGSTREAM_REPLAY_EVENTS", "20000"))
TOKEN = "tok-replay-51d0"


def test_live_topic_replay_and_archive_replay_agree_and_a_delivered_range_is_not_sent_again(kafka_broker, tmp_path):
    outcome, pipeline = run(EVENTS, tmp_path)
    live = canonical(outcome.live_reports)
    assert len(live) > EVENTS // 20 and len(canonical(outcome.live_unreportable)) > 0
    assert canonical(outcome.topic_reports) == live
    assert canonical(outcome.archive_reports) == live
    assert canonical(outcome.topic_unreportable) == canonical(outcome.live_unreportable)
    assert canonical(outcome.archive_unreportable) == canonical(outcome.live_unreportable)
    assert outcome.topic_replay["events"] == outcome.archive_replay["events"] == EVENTS
    assert {r["mode"] for r in outcome.live_reports} == {"realtime", "delayed"}
    # nothing was delivered yet, so every replayed report is new
    assert outcome.topic_replay["comparison"] == {"new": len(live)}

    # Deliver the live reports through the sink, then replay the range to the outbound topic.
    server = MarketingApiServer(TOKEN)
    api = ServerThread(server).start()
    (tmp_path / "token").write_text(TOKEN)
    sink = SinkProcess(pipeline, api.base_url, tmp_path / "token", tmp_path / "sink.log").start()
    sink_group = f"{pipeline.settings.app_id}-sink"
    try:
        wait_until(lambda: len(server.accepted) == len(live), 300, "the live reports to be delivered")
        wait_until(lambda: scrape(sink.port) is not None and not any(exported_lag(sink.port, sink_group).values()), 60, "the sink to commit")
        requests_before = server.requests

        run_ = tagstream(pipeline, "replay", *outcome.time_range, "--summary-json", str(tmp_path / "again.json"))
        summary = orjson.loads((tmp_path / "again.json").read_bytes())
        assert summary["comparison"] == {"sent_to_topic": len(live), "sink_will_skip_as_delivered": len(live)}
        assert "replayed" in run_.stdout
        # the sink reads every replayed report and skips it as delivered
        wait_until(lambda: total(scrape(sink.port), "tagstream_sink_reports_total", outcome="already_delivered")
              >= len(live), 120, "the sink to read the replayed reports")
        wait_until(lambda: not any(exported_lag(sink.port, sink_group).values()), 60, "the sink to commit the replayed reports")
        time.sleep(1)
        assert server.requests == requests_before
        assert sum(server.duplicates.values()) == 0 and len(server.accepted) == len(live)

        # a dry run now finds every report already delivered
        tagstream(pipeline, "replay", *outcome.time_range, "--dry-run", "--out", str(tmp_path / "dry.ndjson"),
                  "--summary-json", str(tmp_path / "dry.json"))
        assert orjson.loads((tmp_path / "dry.json").read_bytes())["comparison"] == {"already_delivered": len(live)}
    finally:
        sink.stop()
        api.stop()


@pytest.mark.parametrize("args, message", [
    (["--from", "2001-01-01T00:00:00Z", "--to", "2001-01-02T00:00:00Z"], "no records between 2001-01-01T00:00:00Z"),
    (["--from", "yesterday", "--to", "2001-01-02T00:00:00Z"], "--from 'yesterday': not an ISO-8601 time"),
    (["--to", "2001-01-02T00:00:00Z"], "give the range to replay: --from TIME --to TIME"),
    (["--files", "/nonexistent/archive.ndjson.gz"], "/nonexistent/archive.ndjson.gz: no such file"),
])
def test_replay_errors_are_one_clear_line(kafka_broker, tmp_path, args, message):
    from tests.integration.conftest import Pipeline
    pipeline = Pipeline(tmp_path)
    subprocess.run([sys.executable, "-m", "streams.cli", "topics"], cwd=REPO, check=True, capture_output=True,
                   env={**os.environ, **pipeline.settings.to_environ()})
    run_ = subprocess.run([sys.executable, "-m", "streams.cli", "replay", *args, "--dry-run",
                           "--out", str(tmp_path / "r.ndjson")], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **pipeline.settings.to_environ()}, timeout=120)
    assert run_.returncode == 2
    errors = [line for line in run_.stderr.splitlines() if line.startswith("tagstream: error:")]
    assert len(errors) == 1 and message in errors[0], run_.stderr
