"""The real-time path end to end on the real broker: rules, contacts and tags in, exact
reports out of `conversion-reports`, `unreportable` and `dead-letters`.

Given a set of reporting rules and customers, each test sends events to the real input
topics of one isolated pipeline (its own topics and worker process) and reads back exactly
what the worker wrote.
"""
from __future__ import annotations

import base64
import hashlib

import orjson
import pytest

from tests.integration.conftest import Pipeline

T0 = 1763884800000          # 2025-11-23T08:00:00Z
MIN, HOUR, DAY = 60_000, 3_600_000, 86_400_000
CORP = "wwA01"
ACCOUNT, ACTION_SET = 2001, 11001


def rule(tag_id, standard_type, effective_from=T0 - DAY, version=1, action_type=None):
    return ("tag_mappings", f"{CORP}:{tag_id}", {
        "corp_id": CORP, "tag_id": tag_id, "tag_name": tag_id, "standard_type": standard_type,
        "account_id": ACCOUNT, "user_action_set_id": ACTION_SET,
        "effective_from": effective_from, "version": version, "action_type": action_type})


RULES = [
    rule("t-consult", "CONSULT"), rule("t-lead", "LEAD"), rule("t-valid", "VALID"),
    rule("t-order", "ORDER"), rule("t-core", "VALID"), rule("t-null", None),
    # versioned: LEAD from T0, VALID from T0+1h, unmapped from T0+2h
    rule("t-switch", "LEAD", T0, 1), rule("t-switch", "VALID", T0 + HOUR, 2),
    rule("t-switch", None, T0 + 2 * HOUR, 3),
    # same effective_from: the greater version wins
    rule("t-tie", "CONSULT", T0, 1), rule("t-tie", "LEAD", T0, 2),
    # a rule-level action type override
    rule("t-custom-lead", "LEAD", action_type="CUSTOM_RESERVATION"),
]

_seq = iter(range(1, 10**6))


def contact(ext, ts=T0 - 10 * MIN, userid="zhangsan", **identity):
    fields = {"wechat_app_id": None, "wechat_unionid": None, "wechat_openid": None, "click_id": None}
    fields.update(identity)
    return ("contact_events", f"{CORP}:{ext}", {
        "event_id": f"c-{next(_seq)}", "corp_id": CORP, "external_userid": ext, "userid": userid,
        "change_type": "add_external_contact", "ts": ts, "state": "ad_318", **fields})


def tag(ext, tag_id, ts, op="add", userid="zhangsan", event_id=None):
    return ("tag_events", f"{CORP}:{ext}", {
        "event_id": event_id or f"e-{next(_seq)}", "corp_id": CORP, "external_userid": ext,
        "userid": userid, "tag_id": tag_id, "op": op, "ts": ts, "source": "wecom_sidebar"})


def expected(ext, standard_type, action_type, tag_id, event, user_id, trace, custom_action=None):
    """A report as SPEC §3.4 defines it, computed here independently of the code."""
    return {
        "outer_action_id": hashlib.sha256(f"{CORP}|{ext}|{standard_type}".encode()).hexdigest(),
        "account_id": ACCOUNT, "user_action_set_id": ACTION_SET, "action_type": action_type,
        "custom_action": custom_action, "action_time": event[2]["ts"] // 1000,
        "user_id": user_id, "trace": trace, "standard_type": standard_type, "mode": "realtime",
        "reason": None, "corp_id": CORP, "external_userid": ext, "tag_id": tag_id,
        "source_event_id": event[2]["event_id"], "event_ts": event[2]["ts"]}


def without_emitted_at(reports):
    out = []
    for report in reports:
        assert isinstance(report.pop("emitted_at"), int)
        out.append(report)
    return sorted(out, key=lambda r: (r["external_userid"], r["standard_type"]))


@pytest.fixture(scope="module")
def pipeline(kafka_broker, tmp_path_factory):
    p = Pipeline(tmp_path_factory.mktemp("realtime"))
    worker = p.start_worker()
    p.send(*RULES)
    worker.wait_for_rules(len(RULES))
    yield p
    p.stop()


def reports_of(pipeline, customers, count, settle=2.0):
    """All reports of `customers`, once `count` of them are there (plus `settle` seconds for
    any that should not be)."""
    def mine(records):
        return [r for r in (orjson.loads(x.value) for x in records) if r["external_userid"] in customers]
    records = pipeline.read("conversion_reports", until=lambda rs: len(mine(rs)) >= count, settle=settle)
    return without_emitted_at(mine(records))


def test_each_realtime_type_is_reported_once_with_the_spec_fields(pipeline):
    ids = {"wechat_app_id": "wx7d21", "wechat_unionid": "oU-3kd"}
    consult, lead = tag("c1", "t-consult", T0 + 1000), tag("c1", "t-lead", T0 + 2000)
    valid, order = tag("c1", "t-valid", T0 + 3000), tag("c1", "t-order", T0 + 4000)
    pipeline.send(
        contact("c1", **ids, click_id="clk_81"),
        consult, lead, valid, order,
        tag("c1", "t-core", T0 + 5000),            # a second VALID tag: no second report
        tag("c1", "t-valid", T0 + 6000),           # the same tag again: no second report
        tag("c1", "t-valid", T0 + 7000, op="remove"))
    trace = {"click_id": "clk_81"}
    assert reports_of(pipeline, {"c1"}, 4) == [
        expected("c1", "CONSULT", "WECOM_CONSULT", "t-consult", consult, ids, trace),
        expected("c1", "LEAD", "RESERVATION", "t-lead", lead, ids, trace),
        expected("c1", "ORDER", "COMPLETE_ORDER", "t-order", order, ids, trace),
        expected("c1", "VALID", "CONFIRM_EFFECTIVE_LEADS", "t-valid", valid, ids, trace),
    ]


def test_unmapped_tags_report_nothing(pipeline):
    sentinel = tag("c2", "t-consult", T0 + 3000)
    pipeline.send(
        contact("c2", click_id="clk_2"),
        tag("c2", "t-no-rule", T0 + 1000),          # no rule at all
        tag("c2", "t-null", T0 + 2000),             # rule with standard_type null
        sentinel)                                   # same partition, so processed after them
    assert reports_of(pipeline, {"c2"}, 1) == [
        expected("c2", "CONSULT", "WECOM_CONSULT", "t-consult", sentinel, {}, {"click_id": "clk_2"})]


def test_rules_are_looked_up_as_of_event_time(pipeline):
    ids = {"wechat_app_id": "wx7d21", "wechat_openid": "o-open"}
    before_v2 = tag("c3", "t-switch", T0 + 30 * MIN)        # v1: LEAD
    after_v2 = tag("c4", "t-switch", T0 + 90 * MIN)         # v2: VALID
    after_v3 = tag("c5", "t-switch", T0 + 3 * HOUR)         # v3: unmapped
    sentinel = tag("c5", "t-consult", T0 + 3 * HOUR + 1)
    tie = tag("c6", "t-tie", T0 + 1)                        # same effective_from: version 2, LEAD
    pipeline.send(contact("c3", **ids), contact("c4", **ids), contact("c5", **ids), contact("c6", **ids),
                  before_v2, after_v2, after_v3, sentinel, tie)
    assert reports_of(pipeline, {"c3", "c4", "c5", "c6"}, 4) == [
        expected("c3", "LEAD", "RESERVATION", "t-switch", before_v2, ids, {}),
        expected("c4", "VALID", "CONFIRM_EFFECTIVE_LEADS", "t-switch", after_v2, ids, {}),
        expected("c5", "CONSULT", "WECOM_CONSULT", "t-consult", sentinel, ids, {}),
        expected("c6", "LEAD", "RESERVATION", "t-tie", tie, ids, {}),
    ]


def test_rule_action_type_overrides_the_default(pipeline):
    event = tag("c10", "t-custom-lead", T0 + 1000)
    pipeline.send(contact("c10", click_id="clk_10"), event)
    assert reports_of(pipeline, {"c10"}, 1) == [
        expected("c10", "LEAD", "CUSTOM_RESERVATION", "t-custom-lead", event, {}, {"click_id": "clk_10"})]


def test_a_report_without_identity_is_unreportable_and_does_not_count(pipeline):
    first = tag("c7", "t-lead", T0 + 1000)
    pipeline.send(first)                                     # no contact event yet
    unreportable = pipeline.read(
        "unreportable", until=lambda rs: any(orjson.loads(r.value)["external_userid"] == "c7" for r in rs))
    parked = [orjson.loads(r.value) for r in unreportable if orjson.loads(r.value)["external_userid"] == "c7"]
    assert len(parked) == 1
    assert parked[0]["reason"] == "no_user_identity"
    assert parked[0]["source_event_id"] == first[2]["event_id"]
    assert unreportable[0].key.decode() == parked[0]["outer_action_id"]

    # Identity arrives; the next LEAD tag is reported, because the first one did not count.
    ids = {"wechat_app_id": "wx7d21", "wechat_openid": "o-7"}
    second = tag("c7", "t-lead", T0 + 2000)
    pipeline.send(contact("c7", ts=T0 + 1500, **ids), second)
    assert reports_of(pipeline, {"c7"}, 1) == [
        expected("c7", "LEAD", "RESERVATION", "t-lead", second, ids, {})]


def test_bad_input_goes_to_dead_letters_and_the_partition_keeps_going(pipeline):
    key = f"{CORP}:c9".encode()
    good_tag = tag("c9", "t-consult", T0)[2]
    good_contact = contact("c9")[2]
    good_rule = rule("t-zzz", "LEAD")[2]
    bad = [
        ("tag_events", key, b'{"event_id": "e-1", ', "not_json"),
        ("tag_events", key, b"\xff\xfe not utf-8", "not_json"),
        ("tag_events", key, b"[1, 2, 3]", "not_object"),
        ("tag_events", key, orjson.dumps({**good_tag, "source": "x" * 70_000}), "too_large"),
        ("tag_events", key, orjson.dumps({k: v for k, v in good_tag.items() if k != "ts"}), "missing_field"),
        ("tag_events", key, orjson.dumps({**good_tag, "ts": "yesterday"}), "invalid_field"),
        ("tag_events", key, orjson.dumps({**good_tag, "op": "toggle"}), "invalid_field"),
        ("tag_events", b"wwA01:someone-else", orjson.dumps(good_tag), "key_mismatch"),
        ("tag_events", None, orjson.dumps(good_tag), "key_mismatch"),
        ("contact_events", key, b"null", "not_object"),
        ("contact_events", key, orjson.dumps({**good_contact, "change_type": "poke"}), "invalid_field"),
        ("contact_events", key, orjson.dumps({**good_contact, "external_userid": ""}), "invalid_field"),
        ("tag_mappings", f"{CORP}:t-zzz".encode(), orjson.dumps({**good_rule, "standard_type": "FOO"}), "invalid_field"),
        ("tag_mappings", f"{CORP}:t-zzz".encode(), orjson.dumps({k: v for k, v in good_rule.items() if k != "version"}), "missing_field"),
        ("tag_mappings", b"wwA01:other-tag", orjson.dumps(good_rule), "key_mismatch"),
    ]
    pipeline.send_raw(*[(t, k, v) for t, k, v, _ in bad])
    after = tag("c9", "t-consult", T0 + 1000)
    pipeline.send(contact("c9", click_id="clk_9"), after)

    letters = [orjson.loads(r.value) for r in pipeline.read("dead_letters", until=lambda rs: len(rs) >= len(bad), settle=2.0)]
    assert sorted((l["topic"], l["error"], base64.b64decode(l["value_b64"])) for l in letters) == \
        sorted((pipeline.topic(t), code, v) for t, _, v, code in bad)
    for letter in letters:
        assert letter["detail"] and isinstance(letter["offset"], int) and isinstance(letter["at"], int)
    # every code of SPEC §3.5 is exercised
    assert {l["error"] for l in letters} == {
        "not_json", "not_object", "too_large", "missing_field", "invalid_field", "key_mismatch"}
    # the partition that saw all the bad records still reports the next good event
    assert reports_of(pipeline, {"c9"}, 1) == [
        expected("c9", "CONSULT", "WECOM_CONSULT", "t-consult", after, {}, {"click_id": "clk_9"})]


def test_no_second_report_after_a_worker_restart(pipeline):
    ids = {"wechat_app_id": "wx7d21", "wechat_unionid": "oU-11"}
    first = tag("c11", "t-lead", T0 + 1000)
    pipeline.send(contact("c11", **ids), first)
    assert len(reports_of(pipeline, {"c11"}, 1, settle=0)) == 1

    for worker in pipeline.workers:
        worker.stop()                                        # graceful: SIGTERM
    restarted = pipeline.start_worker()
    restarted.wait_for_rules(len(RULES))

    again = tag("c11", "t-lead", T0 + 2000)                  # LEAD again: already reported
    other_tag_same_type = tag("c11", "t-switch", T0 + 30 * MIN)  # maps to LEAD too
    new_type = tag("c11", "t-consult", T0 + 40 * MIN)        # proves the new worker is processing
    pipeline.send(again, other_tag_same_type, new_type)
    assert reports_of(pipeline, {"c11"}, 2) == [
        expected("c11", "CONSULT", "WECOM_CONSULT", "t-consult", new_type, ids, {}),
        expected("c11", "LEAD", "RESERVATION", "t-lead", first, ids, {}),
    ]
