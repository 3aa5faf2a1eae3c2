"""A bad clock upstream must not release every hold (issue 18, SPEC §3.5 `ts_in_future`).

On one partition: customer A is tagged INVALID, and the staff take the tag back a minute
later, which cancels the hold. In between, customer B's tag arrives with a `ts` ten years
ahead of its Kafka record's timestamp. Taken as it is, that `ts` would move the partition's
stream time ten years ahead and release A's hold at once, before the untag: an INVALID
report Tencent cannot take back. Customer D's INVALID hold, not taken back, is released
when stream time really passes its deadline. The worker and a replay of the range must
agree: B's event is a dead letter with `ts_in_future`, A gets nothing, D gets a delayed
INVALID.
"""
from __future__ import annotations

import os
import subprocess
import sys

import orjson

from tests.integration.conftest import REPO, Pipeline
from tests.logs import same_partition_customers

T0 = 1763884800000          # 2025-11-23T08:00:00Z
MIN, DAY, YEAR = 60_000, 86_400_000, 365 * 86_400_000
CORP = "wwT01"
PARTITIONS = 4


def rule(tag_id, standard_type):
    return ("tag_mappings", f"{CORP}:{tag_id}", {
        "corp_id": CORP, "tag_id": tag_id, "tag_name": tag_id, "standard_type": standard_type,
        "account_id": 2001, "user_action_set_id": 11001, "effective_from": T0 - DAY, "version": 1,
        "action_type": None})


def contact(ext, ts):
    return ("contact_events", f"{CORP}:{ext}", {
        "event_id": f"c-{ext}", "corp_id": CORP, "external_userid": ext, "userid": "s1",
        "change_type": "add_external_contact", "ts": ts, "wechat_app_id": "wx1",
        "wechat_unionid": f"u-{ext}"}, ts)


def tag(ext, tag_id, ts, op="add", record_ts=None):
    """A tag event; its Kafka record timestamp is `record_ts` (by default its own `ts`)."""
    return ("tag_events", f"{CORP}:{ext}", {
        "event_id": f"e-{ext}-{tag_id}-{op}-{ts}", "corp_id": CORP, "external_userid": ext, "userid": "s1",
        "tag_id": tag_id, "op": op, "ts": ts}, ts if record_ts is None else record_ts)


def test_a_far_future_ts_is_dead_lettered_and_releases_nothing(kafka_broker, tmp_path):
    a, b, c, d = same_partition_customers(CORP, 4, PARTITIONS)
    pipeline = Pipeline(tmp_path, partitions=PARTITIONS)
    pipeline.create_topics()
    rules = [rule("t-invalid", "INVALID"), rule("t-region", None)]
    far = tag(b, "t-region", T0 + 10 * YEAR, record_ts=T0 + 30_000)
    events = [
        contact(a, T0 - 10 * MIN), contact(d, T0 - 10 * MIN),
        tag(a, "t-invalid", T0),                       # A's hold: deadline T0 + 30 min
        tag(d, "t-invalid", T0 + 2 * MIN),             # D's hold: deadline T0 + 32 min
        far,                                           # a bad clock: would release both at once
        tag(a, "t-invalid", T0 + MIN + 30_000, op="remove"),   # the staff take A's tag back: cancelled
        tag(c, "t-region", T0 + 40 * MIN),             # stream time really passes D's deadline
    ]
    try:
        worker = pipeline.start_worker()
        pipeline.send(*rules)
        worker.wait_for_rules(len(rules))
        pipeline.send(*events)
        letters = pipeline.read("dead_letters", until=lambda rs: len(rs) >= 1, timeout=60, settle=2.0)
        reports = pipeline.read("conversion_reports", until=lambda rs: len(rs) >= 1, timeout=60, settle=3.0)
        replay = subprocess.run(
            [sys.executable, "-m", "streams.cli", "replay", "--from", "2025-11-23T07:00:00Z",
             "--to", "2025-11-23T09:00:00Z", "--dry-run", "--out", str(tmp_path / "replayed.ndjson"),
             "--dead-letters", str(tmp_path / "replay-dead.ndjson")],
            cwd=REPO, env={**os.environ, **pipeline.settings.to_environ()}, capture_output=True, text=True,
            timeout=120)
    finally:
        pipeline.stop(delete_topics=True)
    # live: the far-future event is a dead letter with the new code, and nothing else is
    assert [orjson.loads(r.value)["error"] for r in letters] == ["ts_in_future"], letters
    letter = orjson.loads(letters[0].value)
    assert letter["key"] == f"{CORP}:{b}" and "max_future_skew" in letter["detail"]
    # A's hold was cancelled by the untag; D's was released when stream time passed it
    live = [orjson.loads(r.value) for r in reports]
    assert [(r["external_userid"], r["standard_type"], r["mode"]) for r in live] == [(d, "INVALID", "delayed")]
    # the replay decides exactly as the live run did
    assert replay.returncode == 0, replay.stdout + replay.stderr
    replayed = [orjson.loads(line) for line in (tmp_path / "replayed.ndjson").read_bytes().splitlines()]
    assert [(r["external_userid"], r["standard_type"], r["mode"]) for r in replayed] == [(d, "INVALID", "delayed")]
    assert replayed[0]["outer_action_id"] == live[0]["outer_action_id"]
    replay_dead = [orjson.loads(line) for line in (tmp_path / "replay-dead.ndjson").read_bytes().splitlines()]
    assert [x["error"] for x in replay_dead] == ["ts_in_future"]
