"""`tagstream rules` on the real broker (issue 22): a 1,000-row CSV whose tags are named, not
numbered, resolves through the catalogue in `wecom-tags`, publishes one version per row,
and a worker then reports by those versions exactly as the reference model does; `diff`
shows exactly what an import would publish; a second import publishes nothing; a bad file
publishes nothing and lists every bad line; `unmap`, `list` and `history` see the versions.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import orjson

from schemas.records import REALTIME_TYPES
from streams.replay.engine import format_time
from tests.integration.conftest import REPO, Pipeline
from tests.logs import kafka_partition
from tests.reference_model import reference_reports

CORPS = [f"wwrule{n:04d}" for n in range(10)]
TAGS_PER_CORP = 100
PARTITIONS = 4


def tagstream(pipeline: Pipeline, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streams.cli", "rules", *args],
                          env={**os.environ, **pipeline.settings.to_environ()}, cwd=REPO,
                          capture_output=True, text=True, timeout=180)


def catalogue(pipeline: Pipeline) -> None:
    """What the ingest keeps in wecom-tags: 100 named tags per corp."""
    pipeline.send(*[("wecom_tags", f"{corp}:et{corp[-2:]}{n:03d}", {
        "corp_id": corp, "tag_id": f"et{corp[-2:]}{n:03d}", "tag_name": f"标签{n:03d}", "group_id": "g1",
        "group_name": "意向"}) for corp in CORPS for n in range(TAGS_PER_CORP)])


def test_a_thousand_named_rows_publish_versions_the_worker_reports_by(kafka_broker, tmp_path):
    pipeline = Pipeline(tmp_path, partitions=PARTITIONS)
    pipeline.create_topics()
    catalogue(pipeline)
    types = sorted(REALTIME_TYPES)
    effective = int(time.time() * 1000) + 120_000          # two minutes ahead: no --retroactive needed
    lines = ["corp_id,tag,standard_type,account_id,user_action_set_id,action_type,effective_from"]
    lines += [f"{corp},标签{n:03d},{types[n % len(types)].lower()},{5000 + i},{15000 + i},,{format_time(effective)}"
              for i, corp in enumerate(CORPS) for n in range(TAGS_PER_CORP)]
    mappings = tmp_path / "mappings.csv"
    mappings.write_text("\n".join(lines) + "\n", encoding="utf-8")
    worker = pipeline.start_worker()
    try:
        diff = tagstream(pipeline, "diff", str(mappings), "--json")
        assert diff.returncode == 0, diff.stderr
        planned = orjson.loads(diff.stdout)["would be published"]
        imported = tagstream(pipeline, "import", str(mappings), "--json")
        assert imported.returncode == 0, imported.stderr
        published = orjson.loads(imported.stdout)["published"]
        assert published == planned and len(published) == 1000
        assert {(r["corp_id"], r["tag_id"], r["tag_name"], r["version"]) for r in published} == {
            (corp, f"et{corp[-2:]}{n:03d}", f"标签{n:03d}", 1) for corp in CORPS for n in range(TAGS_PER_CORP)}
        on_topic = [orjson.loads(r.value) for r in pipeline.read("tag_mappings", timeout=1)]
        assert sorted(on_topic, key=lambda r: (r["corp_id"], r["tag_id"])) == \
            sorted(published, key=lambda r: (r["corp_id"], r["tag_id"]))
        again = tagstream(pipeline, "import", str(mappings), "--json")
        assert orjson.loads(again.stdout)["published"] == [] and orjson.loads(again.stdout)["unchanged"] == 1000

        # the worker reports by them: one customer per rule tags it after effective_from
        worker.wait_for_rules(1000)
        events, ts = [], effective + 1000
        for corp in CORPS:
            for n in range(TAGS_PER_CORP):
                customer = f"wm{n:03d}"
                if n % 2 == 0:              # half of them with an identity first
                    events.append({"event_id": f"c-{corp}-{n}", "corp_id": corp, "external_userid": customer,
                                   "userid": "s1", "change_type": "add_external_contact", "ts": ts,
                                   "wechat_app_id": "wx1", "wechat_unionid": f"u-{customer}"})
                events.append({"event_id": f"e-{corp}-{n}", "corp_id": corp, "external_userid": customer,
                               "userid": "s1", "tag_id": f"et{corp[-2:]}{n:03d}", "op": "add", "ts": ts + 1})
                ts += 10
        pipeline.send(*[("tag_events" if "op" in e else "contact_events",
                         f"{e['corp_id']}:{e['external_userid']}", e) for e in events])
        expected, unreportable = reference_reports([(f"{r['corp_id']}:{r['tag_id']}", r) for r in on_topic], events,
                                                   partition_of=lambda key: kafka_partition(key, PARTITIONS))
        assert len(expected) == 500 and len(unreportable) == 500
        got = pipeline.read("conversion_reports", until=lambda rs: len(rs) >= len(expected), timeout=90, settle=2)
        strip = lambda r: {k: v for k, v in r.items() if k != "emitted_at"}      # noqa: E731
        assert sorted((strip(orjson.loads(r.value)) for r in got), key=lambda r: r["outer_action_id"]) == \
            sorted((strip(r) for r in expected), key=lambda r: r["outer_action_id"])

        # unmap, list and history see the versions
        key = f"{CORPS[0]}:et{CORPS[0][-2:]}000"
        unmapped = tagstream(pipeline, "unmap", key, "--from", format_time(effective + 3_600_000), "--json")
        assert unmapped.returncode == 0, unmapped.stderr
        assert [(r["standard_type"], r["version"]) for r in orjson.loads(unmapped.stdout)["published"]] == [(None, 2)]
        group_ids = pipeline.consumer_groups()[0]
        history = orjson.loads(tagstream(pipeline, "history", key, "--json").stdout)
        assert [(r["version"], r["standard_type"]) for r in history] == [(1, types[0]), (2, None)]
        listed = orjson.loads(tagstream(pipeline, "list", "--corp", CORPS[0], "--as-of",
                                        format_time(effective + 7_200_000), "--json").stdout)
        assert len(listed) == TAGS_PER_CORP and [r["standard_type"] for r in listed if r["tag_id"].endswith("000")] == [None]
        table = tagstream(pipeline, "history", key)
        assert table.returncode == 0 and "unmapped" in table.stdout and "标签000" in table.stdout
        assert pipeline.consumer_groups()[0] == group_ids        # the read-only commands joined no group
    finally:
        pipeline.stop()


def test_a_bad_file_publishes_nothing_and_lists_every_bad_line(kafka_broker, tmp_path):
    pipeline = Pipeline(tmp_path, partitions=PARTITIONS)
    pipeline.create_topics()
    catalogue(pipeline)
    corp = CORPS[0]
    pipeline.send(("wecom_tags", f"{corp}:etDUP", {"corp_id": corp, "tag_id": "etDUP", "tag_name": "标签001"}))
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"""rules:
  - {{corp_id: {corp}, tag: 标签000, standard_type: VALID, account_id: 1, user_action_set_id: 2, effective_from: now}}
  - {{corp_id: {corp}, tag: 标签001, standard_type: VALID, account_id: 1, user_action_set_id: 2, effective_from: now}}
  - {{corp_id: {corp}, tag: 无此标签, standard_type: VALID, account_id: 1, user_action_set_id: 2, effective_from: now}}
  - {{corp_id: {corp}, tag: 标签002, standard_type: SALE, account_id: 1, user_action_set_id: 2, effective_from: now}}
  - {{corp_id: {corp}, tag: 标签003, standard_type: LEAD, user_action_set_id: 2, effective_from: now}}
  - {{corp_id: {corp}, tag: 标签000, standard_type: LEAD, account_id: 1, user_action_set_id: 2, effective_from: now}}
  - {{corp_id: {corp}, tag: 标签004, standard_type: LEAD, account_id: 1, user_action_set_id: 2, effective_from: 2026-01-01}}
""", encoding="utf-8")
    refused = tagstream(pipeline, "import", str(bad))
    assert refused.returncode == 1
    errors = refused.stderr.strip().splitlines()
    assert errors[-1] == "tagstream rules: refused (6 bad lines); nothing was published"
    by_line = {int(e.split("line ")[1].split(":")[0]): e for e in errors[:-1]}
    assert sorted(by_line) == [3, 4, 5, 6, 7, 8]
    assert "ambiguous tag name '标签001'" in by_line[3] and "unknown tag name '无此标签'" in by_line[4]
    assert "unknown standard type 'SALE'" in by_line[5] and "missing account_id" in by_line[6]
    assert "mapped twice in this file (also line 2)" in by_line[7]
    assert "--retroactive" in by_line[8] and "tagstream replay --from 2026-01-01T00:00:00Z" in by_line[8]
    assert pipeline.read("tag_mappings", timeout=1) == []
    diff = tagstream(pipeline, "diff", str(bad), "--json")
    assert diff.returncode == 1 and len(orjson.loads(diff.stdout)["errors"]) == 6
