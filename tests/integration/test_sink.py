"""The reporting sink against the local Marketing API server, on the real broker.

Given 20,000 reports on the outbound topic and an API that fails about 10% of requests in
retryable ways, rejects 1% of the reports for good and expires the token once, the sink
delivers every other report exactly once (counted by outer_action_id at the server), puts
every rejected one on `report-failures`, and never lets the token into a log line, a metric
or a dead letter. Killing the sink with SIGKILL twice mid-run changes none of that.
"""
from __future__ import annotations

import random
import signal
import time

import orjson
import pytest

from streams.observability.observe import scrape
from tests import kafka_io
from tests.integration.conftest import Pipeline, SinkProcess, wait_until
from tests.report_samples import sample_reports
from streams.sinks.marketing_api import RETRYABLE_CODES
from tests.marketing_api_server import Faults, MarketingApiServer, ServerThread

REPORTS = 20_000
OLD_TOKEN, NEW_TOKEN = "tok-old-5f1d2c", "tok-new-a93e77"


@pytest.mark.parametrize("kills", [0, 2])
def test_every_report_reaches_the_api_once_and_every_rejection_is_parked(kafka_broker, tmp_path, kills):
    pipeline = Pipeline(tmp_path)
    reports = sample_reports(REPORTS, seed=kills)
    rng = random.Random(99)
    rejected = {r["outer_action_id"] for r in rng.sample(reports, REPORTS // 100)}
    server = MarketingApiServer(OLD_TOKEN, Faults(seed=kills, retryable_rate=0.10, permanent_ids=rejected,
                                                  rotate_token_after=60, new_token=NEW_TOKEN,
                                                  slow_rate=0.002, slow_s=1.0, drop_rate=0.005))
    api = ServerThread(server).start()
    token_file = tmp_path / "token"
    token_file.write_text(OLD_TOKEN)
    pipeline.create_topics()
    kafka_io.produce(kafka_io.json_record(pipeline.topic("conversion_reports"), r["outer_action_id"], r)
                     for r in reports)
    sink = SinkProcess(pipeline, api.base_url, token_file, tmp_path / "sink.log").start()
    metrics_text = ""
    expected = {r["outer_action_id"] for r in reports} - rejected
    try:
        wait_until(lambda: len(server.accepted) > 0, 120, "the first delivery", sink)
        token_file.write_text(NEW_TOKEN)    # rotated by the operator; the sink reloads it on 11000
        for k in range(kills):
            wait_until(lambda: len(server.accepted) >= (k + 1) * REPORTS // (kills + 1), 300, "progress", sink)
            sink.stop(signal.SIGKILL)
            sink = SinkProcess(pipeline, api.base_url, token_file, tmp_path / "sink.log").start()
        wait_until(lambda: set(server.accepted) >= expected, 600, "every report", sink)
        failures = pipeline.read("report_failures", until=lambda rs: len(rs) >= len(rejected), timeout=120)
        wait_until(lambda: scrape(sink.port) is not None, 30, "metrics", sink)
        import urllib.request
        metrics_text = urllib.request.urlopen(f"http://127.0.0.1:{sink.port}/metrics").read().decode()
        time.sleep(2)                       # anything sent twice would arrive by now
    finally:
        sink.stop()
        api.stop()

    log_text = (tmp_path / "sink.log").read_text()
    in_doubt = sum(int(line.split(" in doubt")[0].rsplit(" ", 1)[1])
                   for line in log_text.splitlines() if " in doubt" in line)
    # exactly once at the API, counted by outer_action_id
    assert set(server.accepted) == expected
    assert sum(server.duplicates.values()) <= in_doubt
    if kills == 0:
        assert sum(server.duplicates.values()) == 0 and in_doubt == 0
    # every permanent failure is parked with the API's answer
    parked = {orjson.loads(r.value)["outer_action_id"]: orjson.loads(r.value) for r in failures}
    assert set(parked) == rejected
    assert all(p["api_response"]["response"]["code"] == 31001 for p in parked.values())
    # the faults really happened: retries, the token expiry and its reload
    answers = server.answers
    assert answers[11000] >= 1 and NEW_TOKEN in server.tokens_seen
    assert sum(answers[c] for c in RETRYABLE_CODES) > 0
    assert answers["http_500"] + answers["http_503"] + answers["http_429"] > 0
    # the token is nowhere: logs, metrics, dead letters
    for text in (log_text, metrics_text, *(r.value.decode() for r in failures)):
        assert OLD_TOKEN not in text and NEW_TOKEN not in text
    # the metrics the issue names
    for name in ("tagstream_sink_requests_total", "tagstream_sink_retries_total", "tagstream_sink_batch_actions",
                 "tagstream_sink_request_duration_seconds", "tagstream_sink_requests_in_flight",
                 "tagstream_sink_oldest_unacknowledged_report_age_seconds"):
        assert name in metrics_text
    # requests were batched, within the API's limits
    assert max(server.batch_sizes) <= 50 and sum(server.batch_sizes) / len(server.batch_sizes) > 5
