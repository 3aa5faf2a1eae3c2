"""Anyone can write to the outbound topic (replay does, and so can an operator), so the sink
validates what it reads (issue 18). Garbage bytes, a tombstone, JSON that is not a report and
a report without its `outer_action_id`, mixed among good reports: every good report is
delivered once, every bad record is parked on `report-failures` with its reason, and the
sink's offsets move past them, for the API and the file target alike."""
from __future__ import annotations

import base64

import orjson
import pytest

from tests import kafka_io
from tests.integration.conftest import Pipeline, SinkProcess, wait_until
from tests.marketing_api_server import Faults, MarketingApiServer, ServerThread
from tests.report_samples import sample_reports

TOKEN = "tok-bad-records-77"


def bad_records(reports: list[dict]) -> dict[bytes, tuple[bytes, str]]:
    """{value bytes (or b'' for the tombstone): (key, expected error code)}"""
    missing_id = {k: v for k, v in reports[0].items() if k != "outer_action_id"}
    return {
        b"not json at all": (b"garbage-1", "not_json"),
        b"": (reports[1]["outer_action_id"].encode(), "not_json"),          # the tombstone
        orjson.dumps({"hello": "world"}): (b"hello-1", "missing_field"),
        orjson.dumps(missing_id): (reports[0]["outer_action_id"].encode(), "missing_field"),
    }


@pytest.mark.parametrize("target", ["api", "file"])
def test_bad_records_on_the_outbound_topic_are_parked_and_delivery_goes_on(kafka_broker, tmp_path, target):
    pipeline = Pipeline(tmp_path)
    reports = sample_reports(300, seed=18)
    good, bad = reports[2:], bad_records(reports)
    topic = pipeline.topic("conversion_reports")
    records = [kafka_io.json_record(topic, r["outer_action_id"], r) for r in good]
    for n, (value, (key, _)) in enumerate(bad.items()):    # spread among the good ones
        records.insert(40 + 70 * n, (topic, key, value or None))
    pipeline.create_topics()
    kafka_io.produce(records)
    server = MarketingApiServer(TOKEN, Faults(seed=18))
    api = ServerThread(server).start()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    out = tmp_path / "reports.ndjson"
    sink = SinkProcess(pipeline, api.base_url, token_file, tmp_path / "sink.log",
                       target="api" if target == "api" else f"file:{out}").start()
    try:
        failures = pipeline.read("report_failures", until=lambda rs: len(rs) >= len(bad), timeout=120, settle=2.0)
        if target == "api":
            wait_until(lambda: len(server.accepted) >= len(good), 120, "the good reports", sink)
        else:
            wait_until(lambda: out.exists() and len(out.read_bytes().splitlines()) >= len(good), 120,
                       "the good reports", sink)
        wait_until(lambda: kafka_io.group_lag(f"{pipeline.settings.app_id}-sink", topic,
                                              pipeline.settings.partitions) == 0,
                   60, "the sink's offsets past every record", sink)
        assert sink.process.poll() is None, "the sink exited"
    finally:
        sink.stop()
        api.stop()
        pipeline.stop(delete_topics=True)
    good_ids = {r["outer_action_id"] for r in good}
    if target == "api":
        assert set(server.accepted) == good_ids and sum(server.duplicates.values()) == 0
    else:
        lines = [orjson.loads(line) for line in out.read_bytes().splitlines()]
        assert sorted(r["outer_action_id"] for r in lines) == sorted(good_ids)
    parked = [orjson.loads(r.value) for r in failures]
    assert len(parked) == len(bad)
    for letter in parked:
        value = base64.b64decode(letter["value_b64"])
        key, error = bad[value]
        assert letter["error"] == error and letter["detail"] and letter["topic"] == topic
        assert letter["key"] == key.decode()
