"""Scenario tests of the reference model itself (tests/reference_model.py), one group per
SPEC §4 rule, plus property tests of the event-log strategies (tests/strategies.py).

The model is the oracle the production core is compared against, so these tests pin its
behaviour with hand-written logs: given these rules and events, expect exactly these reports.
"""
from __future__ import annotations

import hashlib
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.reference_model import REPORT_FIELDS, reference_reports
from tests.strategies import crc_partition, event_logs

CORP = "ww51a2"
T0 = 1_763_800_000_123
SEC = 1_000
MIN = 60_000
DAY = 86_400_000
HOLD = 30 * MIN
WECHAT = {"wechat_app_id": "wx7d21", "wechat_unionid": "oU-3kd"}


# ---------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------

def rule(tag_id, standard_type, *, effective_from=T0 - DAY, version=1, account_id=2001,
         user_action_set_id=11001, action_type=None, corp_id=CORP):
    value = {"corp_id": corp_id, "tag_id": tag_id, "tag_name": None, "standard_type": standard_type,
             "effective_from": effective_from, "version": version, "action_type": action_type}
    if standard_type is not None:
        value["account_id"] = account_id
        value["user_action_set_id"] = user_action_set_id
    return (f"{corp_id}:{tag_id}", value)


def tombstone(tag_id, corp_id=CORP):
    return (f"{corp_id}:{tag_id}", None)


def contact(event_id, ext, ts, *, userid="zhangsan", change_type="add_external_contact", corp_id=CORP,
            **identity):
    return {"event_id": event_id, "corp_id": corp_id, "external_userid": ext, "userid": userid,
            "change_type": change_type, "ts": ts, "state": "ad_318", **identity}


def add(event_id, ext, tag_id, ts, *, userid="zhangsan", corp_id=CORP):
    return {"event_id": event_id, "corp_id": corp_id, "external_userid": ext, "userid": userid,
            "tag_id": tag_id, "op": "add", "ts": ts, "source": "wecom_sidebar"}


def remove(event_id, ext, tag_id, ts, *, userid="zhangsan", corp_id=CORP):
    return {"event_id": event_id, "corp_id": corp_id, "external_userid": ext, "userid": userid,
            "tag_id": tag_id, "op": "remove", "ts": ts}


def one_partition(key):
    return 0


def run(rules, events, **kwargs):
    kwargs.setdefault("partition_of", one_partition)
    return reference_reports(rules, events, **kwargs)


def brief(reports):
    """(external_userid, standard_type, mode, reason, source_event_id, event_ts) per report."""
    return [(r["external_userid"], r["standard_type"], r["mode"], r["reason"], r["source_event_id"],
             r["event_ts"]) for r in reports]


def sha(corp_id, ext, standard_type):
    return hashlib.sha256(f"{corp_id}|{ext}|{standard_type}".encode()).hexdigest()


RULES = [
    rule("t_consult", "CONSULT"),
    rule("t_lead", "LEAD"),
    rule("t_valid", "VALID"),
    rule("t_valid2", "VALID", account_id=2002),
    rule("t_order", "ORDER"),
    rule("t_long", "LONG_TERM"),
    rule("t_long2", "LONG_TERM", account_id=2002, user_action_set_id=11002),
    rule("t_invalid", "INVALID"),
]


# ---------------------------------------------------------------------------------------------
# Real-time types (rule 4) and the wire format (§3.4)
# ---------------------------------------------------------------------------------------------

def test_realtime_report_has_every_wire_field():
    events = [
        contact("c1", "wmA", T0, click_id="clk_81", **WECHAT),
        add("e1", "wmA", "t_valid", T0 + 5 * SEC),
    ]
    reports, unreportable = run(RULES, events)
    assert unreportable == []
    assert reports == [{
        "outer_action_id": sha(CORP, "wmA", "VALID"),
        "account_id": 2001,
        "user_action_set_id": 11001,
        "action_type": "CONFIRM_EFFECTIVE_LEADS",
        "custom_action": None,
        "action_time": (T0 + 5 * SEC) // 1000,
        "user_id": {"wechat_app_id": "wx7d21", "wechat_unionid": "oU-3kd"},
        "trace": {"click_id": "clk_81"},
        "standard_type": "VALID",
        "mode": "realtime",
        "reason": None,
        "corp_id": CORP,
        "external_userid": "wmA",
        "tag_id": "t_valid",
        "source_event_id": "e1",
        "event_ts": T0 + 5 * SEC,
    }]
    assert tuple(reports[0]) == REPORT_FIELDS


@pytest.mark.parametrize("tag_id, standard_type, action_type", [
    ("t_consult", "CONSULT", "WECOM_CONSULT"),
    ("t_lead", "LEAD", "RESERVATION"),
    ("t_valid", "VALID", "CONFIRM_EFFECTIVE_LEADS"),
    ("t_order", "ORDER", "COMPLETE_ORDER"),
])
def test_each_realtime_type_goes_out_at_once_with_its_default_action_type(tag_id, standard_type, action_type):
    events = [contact("c1", "wmA", T0, **WECHAT), add("e1", "wmA", tag_id, T0 + MIN)]
    reports, unreportable = run(RULES, events, flush_at_end=False)
    assert unreportable == []
    assert brief(reports) == [("wmA", standard_type, "realtime", None, "e1", T0 + MIN)]
    assert reports[0]["action_type"] == action_type
    assert reports[0]["custom_action"] is None


@pytest.mark.parametrize("identity, user_id, trace, ok", [
    ({"click_id": "clk"}, {}, {"click_id": "clk"}, True),
    ({"wechat_app_id": "wx", "wechat_openid": "oO"}, {"wechat_app_id": "wx", "wechat_openid": "oO"}, {}, True),
    ({"wechat_app_id": "wx", "wechat_unionid": "oU", "wechat_openid": "oO"},
     {"wechat_app_id": "wx", "wechat_unionid": "oU", "wechat_openid": "oO"}, {}, True),
    ({"wechat_app_id": "wx"}, {"wechat_app_id": "wx"}, {}, False),
    ({"wechat_unionid": "oU", "wechat_openid": "oO"}, {"wechat_unionid": "oU", "wechat_openid": "oO"}, {}, False),
    ({"wechat_app_id": None, "click_id": None}, {}, {}, False),
    ({}, {}, {}, False),
])
def test_identity_rule(identity, user_id, trace, ok):
    events = [contact("c1", "wmA", T0, **identity), add("e1", "wmA", "t_lead", T0 + MIN)]
    reports, unreportable = run(RULES, events)
    produced = reports if ok else unreportable
    assert (len(reports), len(unreportable)) == ((1, 0) if ok else (0, 1))
    assert produced[0]["user_id"] == user_id
    assert produced[0]["trace"] == trace
    assert produced[0]["reason"] == (None if ok else "no_user_identity")


def test_unreportable_does_not_count_for_once_per_type():
    events = [
        contact("c1", "wmA", T0, wechat_app_id="wx"),
        add("e1", "wmA", "t_valid", T0 + MIN),
        contact("c2", "wmA", T0 + 2 * MIN, change_type="edit_external_contact", wechat_openid="oO"),
        add("e2", "wmA", "t_valid2", T0 + 3 * MIN),
        add("e3", "wmA", "t_valid", T0 + 4 * MIN),
    ]
    reports, unreportable = run(RULES, events)
    assert brief(unreportable) == [("wmA", "VALID", "realtime", "no_user_identity", "e1", T0 + MIN)]
    assert brief(reports) == [("wmA", "VALID", "realtime", None, "e2", T0 + 3 * MIN)]
    assert reports[0]["account_id"] == 2002
    assert reports[0]["user_id"] == {"wechat_app_id": "wx", "wechat_openid": "oO"}


def test_newest_non_null_identity_wins_and_null_erases_nothing():
    events = [
        contact("c1", "wmA", T0, click_id="clk_old", **WECHAT),
        contact("c2", "wmA", T0 + 1, change_type="edit_external_contact", click_id="clk_new",
                wechat_app_id=None, wechat_unionid=None),
        contact("c3", "wmA", T0 + 2, change_type="del_external_contact", wechat_openid="oO"),
        add("e1", "wmA", "t_consult", T0 + 3),
    ]
    reports, _ = run(RULES, events)
    assert reports[0]["user_id"] == {"wechat_app_id": "wx7d21", "wechat_unionid": "oU-3kd", "wechat_openid": "oO"}
    assert reports[0]["trace"] == {"click_id": "clk_new"}


# ---------------------------------------------------------------------------------------------
# Mapping (rule 2) and versioned rules (§3.3)
# ---------------------------------------------------------------------------------------------

def test_unmapped_tags_give_nothing():
    rules = [
        rule("t_null", None),
        rule("t_future", "VALID", effective_from=T0 + DAY),
        rule("t_other_corp", "CONSULT", corp_id="wwOther"),
    ]
    events = [
        contact("c1", "wmA", T0, **WECHAT),
        add("e1", "wmA", "t_unknown", T0 + 1),
        add("e2", "wmA", "t_null", T0 + 2),
        add("e3", "wmA", "t_future", T0 + 3),
        add("e4", "wmA", "t_other_corp", T0 + 4),
    ]
    assert run(rules, events) == ([], [])


def test_rule_version_in_force_at_event_ts():
    rules = [
        rule("t", "VALID", effective_from=T0 - DAY, version=1, account_id=1),
        rule("t", "VALID", effective_from=T0 + HOLD, version=2, account_id=2),
        rule("t", None, effective_from=T0 + DAY, version=3),
        rule("u", "VALID", effective_from=T0 - DAY, version=1, account_id=1),
        rule("u", "VALID", effective_from=T0 + HOLD, version=2, account_id=2),
    ]
    cust = [contact(f"c{n}", f"wm{n}", T0, **WECHAT) for n in range(4)]
    events = cust + [
        add("e0", "wm0", "t", T0 + HOLD - 1),
        add("e1", "wm1", "t", T0 + HOLD),
        add("e2", "wm2", "t", T0 + DAY),      # unmapped from effective_from on
        add("e3", "wm3", "u", T0 + DAY),
    ]
    reports, _ = run(rules, events)
    assert [(r["external_userid"], r["account_id"]) for r in reports] == [("wm0", 1), ("wm1", 2), ("wm3", 2)]


def test_equal_effective_from_greatest_version_wins_whatever_the_list_order():
    rules = [
        rule("t", "VALID", effective_from=T0, version=7, account_id=7),
        rule("t", "VALID", effective_from=T0, version=3, account_id=3),
        rule("t", "VALID", effective_from=T0 - DAY, version=9, account_id=9),
    ]
    events = [contact("c1", "wmA", T0, **WECHAT), add("e1", "wmA", "t", T0)]
    reports, _ = run(rules, events)
    assert reports[0]["account_id"] == 7


def test_tombstone_deletes_every_version_seen_so_far():
    rules = [
        rule("t", "VALID", version=1, account_id=1),
        rule("t", "VALID", version=2, account_id=2),
        tombstone("t"),
        rule("u", "VALID", version=1, account_id=1),
        tombstone("u"),
        rule("u", "CONSULT", effective_from=T0 + DAY, version=5, account_id=5),
    ]
    events = [
        contact("c1", "wmA", T0, **WECHAT),
        add("e1", "wmA", "t", T0),
        add("e2", "wmA", "u", T0),             # the pre-tombstone version is gone
        add("e3", "wmA", "u", T0 + DAY),
    ]
    reports, _ = run(rules, events)
    assert [(r["standard_type"], r["account_id"], r["source_event_id"]) for r in reports] == [("CONSULT", 5, "e3")]


def test_rules_are_per_corp():
    rules = [rule("t", "VALID", corp_id="wwA", account_id=1), rule("t", "LEAD", corp_id="wwB", account_id=2)]
    events = [
        contact("c1", "wm1", T0, corp_id="wwA", click_id="k1"),
        contact("c2", "wm1", T0, corp_id="wwB", click_id="k2"),
        add("e1", "wm1", "t", T0 + 1, corp_id="wwA"),
        add("e2", "wm1", "t", T0 + 1, corp_id="wwB"),
    ]
    reports, _ = run(rules, events)
    assert [(r["corp_id"], r["standard_type"], r["account_id"], r["outer_action_id"]) for r in reports] == [
        ("wwA", "VALID", 1, sha("wwA", "wm1", "VALID")),
        ("wwB", "LEAD", 2, sha("wwB", "wm1", "LEAD")),
    ]


def test_action_type_override():
    rules = [
        rule("t_valid", "VALID", action_type="PURCHASE"),
        rule("t_lead", "LEAD", action_type="CUSTOM"),
        rule("t_long", "LONG_TERM", action_type="STORE_VISIT"),
        rule("t_order", "ORDER", action_type="PAY"),
    ]
    events = [
        contact("c1", "wmA", T0, **WECHAT),
        add("e1", "wmA", "t_valid", T0 + 1),
        add("e2", "wmA", "t_lead", T0 + 2),
        add("e3", "wmA", "t_long", T0 + 3),
        contact("c2", "wmB", T0, **WECHAT),
        add("e4", "wmB", "t_order", T0 + 8 * DAY),   # becomes LONG_TERM: the ORDER override does not apply
    ]
    reports, _ = run(rules, events)
    assert [(r["external_userid"], r["standard_type"], r["action_type"], r["custom_action"]) for r in reports] == [
        ("wmA", "VALID", "PURCHASE", None),
        ("wmA", "LEAD", "CUSTOM", "LEAD"),
        ("wmA", "LONG_TERM", "STORE_VISIT", None),
        ("wmB", "LONG_TERM", "CUSTOM", "LONG_TERM_CONVERSION"),
    ]


# ---------------------------------------------------------------------------------------------
# Once per customer and type (rule 3)
# ---------------------------------------------------------------------------------------------

def test_once_per_customer_and_type_from_the_first_add():
    events = [
        contact("c1", "wmA", T0, **WECHAT),
        contact("c2", "wmB", T0, click_id="k"),
        add("e1", "wmA", "t_valid", T0 + 1),
        add("e2", "wmA", "t_valid2", T0 + 2),
        add("e3", "wmA", "t_valid", T0 + 3),
        remove("e4", "wmA", "t_valid", T0 + 4),
        add("e5", "wmA", "t_valid", T0 + 5),
        add("e6", "wmB", "t_valid2", T0 + 6),
        add("e7", "wmA", "t_long", T0 + 7),
        add("e8", "wmA", "t_long", T0 + DAY),
    ]
    reports, unreportable = run(RULES, events)
    assert unreportable == []
    assert brief(reports) == [
        ("wmA", "VALID", "realtime", None, "e1", T0 + 1),
        ("wmB", "VALID", "realtime", None, "e6", T0 + 6),
        ("wmA", "LONG_TERM", "delayed", None, "e7", T0 + 7),   # released by e8's stream time
    ]


# ---------------------------------------------------------------------------------------------
# Dedupe (rule 1)
# ---------------------------------------------------------------------------------------------

def test_duplicate_event_is_ignored():
    events = [
        add("e1", "wmA", "t_long", T0),
        remove("e2", "wmA", "t_long", T0 + MIN),       # cancels the hold
        add("e1", "wmA", "t_long", T0),                # re-send: ignored, no new hold
        contact("c1", "wmA", T0 + 2 * MIN, **WECHAT),
        contact("c1", "wmA", T0 + 2 * MIN, **WECHAT),  # duplicate contact: harmless
    ]
    assert run(RULES, events) == ([], [])


def test_duplicate_tag_add_after_identity_arrives_is_still_ignored():
    events = [
        add("e1", "wmA", "t_valid", T0),
        contact("c1", "wmA", T0 + MIN, **WECHAT),
        add("e1", "wmA", "t_valid", T0),
    ]
    reports, unreportable = run(RULES, events)
    assert reports == []
    assert brief(unreportable) == [("wmA", "VALID", "realtime", "no_user_identity", "e1", T0)]


def test_dedupe_is_per_customer():
    events = [
        contact("c1", "wmA", T0, **WECHAT),
        contact("c1", "wmB", T0, **WECHAT),
        add("e1", "wmA", "t_valid", T0 + 1),
        add("e1", "wmB", "t_valid", T0 + 1),
    ]
    reports, _ = run(RULES, events)
    assert [r["external_userid"] for r in reports] == ["wmA", "wmB"]


def test_duplicate_with_newer_ts_still_advances_stream_time():
    events = [
        add("e1", "wmA", "t_long", T0),
        contact("c1", "wmB", T0, **WECHAT),
        {**contact("c1", "wmB", T0, **WECHAT), "ts": T0 + HOLD},   # same id, later ts: a duplicate
        remove("e2", "wmA", "t_long", T0 + HOLD),
    ]
    reports, unreportable = run(RULES, events, flush_at_end=False)
    assert reports == []
    assert brief(unreportable) == [("wmA", "LONG_TERM", "delayed", "no_user_identity", "e1", T0)]


def test_ids_are_forgotten_after_the_horizon_of_stream_time():
    def log(b_ts):
        return [
            add("e1", "wmA", "t_valid", T0),                   # no identity yet: unreportable
            contact("c1", "wmA", T0 + MIN, **WECHAT),
            add("eB", "wmB", "t_unmapped", b_ts),             # advances the partition's stream time
            add("e1", "wmA", "t_valid", T0),                   # the re-send
        ]
    # stream time T0 + 7 days + 1 ms: T0 < stream_time - horizon, so e1 is forgotten and re-applied.
    reports, _ = run(RULES, log(T0 + 7 * DAY + 1))
    assert brief(reports) == [("wmA", "VALID", "realtime", None, "e1", T0)]
    # exactly at the horizon, e1 is still remembered.
    assert run(RULES, log(T0 + 7 * DAY))[0] == []
    # on another partition, wmB does not advance wmA's stream time.
    parts = {f"{CORP}:wmA": 0, f"{CORP}:wmB": 1}
    assert run(RULES, log(T0 + 8 * DAY), partition_of=parts.__getitem__)[0] == []
    # a shorter horizon forgets sooner.
    assert len(run(RULES, log(T0 + DAY), dedupe_horizon_ms=HOLD)[0]) == 1


def test_forgotten_delayed_add_replays_with_its_old_ts():
    events = [
        contact("c1", "wmA", T0, **WECHAT),
        add("e1", "wmA", "t_long", T0 + MIN),
        remove("e2", "wmA", "t_long", T0 + 2 * MIN),   # cancelled
        add("e3", "wmA", "t_unmapped", T0 + 9 * DAY),
        add("e1", "wmA", "t_long", T0 + MIN),          # forgotten: applied again, deadline already past
        add("e4", "wmA", "t_unmapped", T0 + 9 * DAY),  # releases it before applying itself
    ]
    reports, _ = run(RULES, events, flush_at_end=False)
    assert brief(reports) == [("wmA", "LONG_TERM", "delayed", None, "e1", T0 + MIN)]


# ---------------------------------------------------------------------------------------------
# Order window (rule 5)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("after, expected", [
    (0, ("ORDER", "realtime", None)),
    (6 * DAY, ("ORDER", "realtime", None)),
    (7 * DAY, ("ORDER", "realtime", None)),
    (7 * DAY + 1, ("LONG_TERM", "delayed", "order_after_window")),
    (30 * DAY, ("LONG_TERM", "delayed", "order_after_window")),
])
def test_order_window(after, expected):
    events = [contact("c1", "wmA", T0, **WECHAT), add("e1", "wmA", "t_order", T0 + after)]
    reports, unreportable = run(RULES, events)
    assert unreportable == []
    assert brief(reports) == [("wmA", *expected, "e1", T0 + after)]
    if expected[0] == "LONG_TERM":
        assert (reports[0]["action_type"], reports[0]["custom_action"]) == ("CUSTOM", "LONG_TERM_CONVERSION")
        assert reports[0]["outer_action_id"] == sha(CORP, "wmA", "LONG_TERM")


def test_order_with_unknown_add_time_goes_out_at_once():
    events = [
        contact("c1", "wmA", T0, change_type="edit_external_contact", click_id="k"),  # no add time
        add("e1", "wmA", "t_order", T0 + 30 * DAY),
        add("e2", "wmB", "t_order", T0 + 30 * DAY),                                    # nothing at all
    ]
    reports, unreportable = run(RULES, events)
    assert brief(reports) == [("wmA", "ORDER", "realtime", "add_time_unknown", "e1", T0 + 30 * DAY)]
    assert brief(unreportable) == [("wmB", "ORDER", "realtime", "no_user_identity", "e2", T0 + 30 * DAY)]


def test_order_window_uses_the_tagging_staff_members_add_time_else_the_earliest():
    def order_by(userid, ext):
        return [
            contact("c1", ext, T0 + 2 * DAY, userid="zhangsan", click_id="k"),
            contact("c2", ext, T0 + 5 * DAY, userid="lisi"),
            contact("c3", ext, T0 + 6 * DAY, userid="lisi"),          # a later re-add keeps the earliest
            contact("c4", ext, T0, userid="zhangsan"),               # an earlier one lowers it
            contact("c5", ext, T0 - DAY, userid="wangwu", change_type="del_follow_user"),  # no add time
            add("e1", ext, "t_order", T0 + 10 * DAY, userid=userid),
        ]
    assert brief(run(RULES, order_by("lisi", "wmA"))[0]) == [
        ("wmA", "ORDER", "realtime", None, "e1", T0 + 10 * DAY)]
    assert brief(run(RULES, order_by("zhangsan", "wmA"))[0]) == [
        ("wmA", "LONG_TERM", "delayed", "order_after_window", "e1", T0 + 10 * DAY)]
    assert brief(run(RULES, order_by("wangwu", "wmA"))[0]) == [
        ("wmA", "LONG_TERM", "delayed", "order_after_window", "e1", T0 + 10 * DAY)]


def test_add_time_is_the_earliest_add_external_contact_of_that_staff_member():
    def order_after(contacts):
        events = contacts + [add("e1", "wmA", "t_order", T0 + 10 * DAY, userid="lisi")]
        return brief(run(RULES, events)[0])[0][1]
    assert order_after([contact("c1", "wmA", T0 + 4 * DAY, userid="lisi", click_id="k")]) == "ORDER"
    assert order_after([contact("c1", "wmA", T0 + 2 * DAY, userid="lisi", click_id="k"),
                        contact("c2", "wmA", T0 + 4 * DAY, userid="lisi")]) == "LONG_TERM"
    assert order_after([contact("c1", "wmA", T0 + 4 * DAY, userid="lisi", click_id="k"),
                        contact("c2", "wmA", T0 + 2 * DAY, userid="lisi")]) == "LONG_TERM"
    # edits and deletions never set an add time
    assert order_after([contact("c1", "wmA", T0 + 4 * DAY, userid="lisi", click_id="k"),
                        contact("c2", "wmA", T0, userid="lisi", change_type="edit_external_contact"),
                        contact("c3", "wmA", T0, userid="lisi", change_type="del_external_contact"),
                        contact("c4", "wmA", T0, userid="lisi", change_type="del_follow_user")]) == "ORDER"


def test_late_order_joins_an_active_long_term_hold_and_respects_once_per_type():
    events = [
        contact("c1", "wmA", T0, **WECHAT),
        add("e1", "wmA", "t_long", T0 + 8 * DAY),
        add("e2", "wmA", "t_order", T0 + 8 * DAY + MIN),    # supports the same LONG_TERM hold
        remove("e3", "wmA", "t_long", T0 + 8 * DAY + 2 * MIN),  # hold survives on t_order
        add("e4", "wmA", "t_order", T0 + 9 * DAY),          # LONG_TERM already reported: nothing
    ]
    reports, _ = run(RULES, events)
    assert brief(reports) == [("wmA", "LONG_TERM", "delayed", None, "e1", T0 + 8 * DAY)]


def test_order_window_is_configurable():
    events = [contact("c1", "wmA", T0, **WECHAT), add("e1", "wmA", "t_order", T0 + DAY + 1)]
    reports, _ = run(RULES, events, order_window_ms=DAY)
    assert brief(reports) == [("wmA", "LONG_TERM", "delayed", "order_after_window", "e1", T0 + DAY + 1)]


# ---------------------------------------------------------------------------------------------
# Delayed types (rule 6)
# ---------------------------------------------------------------------------------------------

def test_hold_is_released_by_a_later_events_stream_time_at_its_deadline():
    events = [
        contact("c1", "wmA", T0, **WECHAT),
        add("e1", "wmA", "t_long", T0 + 7),
        add("e2", "wmA", "t_long2", T0 + 10 * MIN),          # joins; does not move the deadline
        add("eB", "wmB", "t_unmapped", T0 + 7 + HOLD - 1),   # not yet due
    ]
    assert run(RULES, events, flush_at_end=False) == ([], [])
    events.append(add("eC", "wmC", "t_unmapped", T0 + 7 + HOLD))  # due at exactly the deadline
    reports, unreportable = run(RULES, events, flush_at_end=False)
    assert unreportable == []
    assert reports == [{
        "outer_action_id": sha(CORP, "wmA", "LONG_TERM"),
        "account_id": 2001,                 # from the first add's rule, not t_long2's
        "user_action_set_id": 11001,
        "action_type": "CUSTOM",
        "custom_action": "LONG_TERM_CONVERSION",
        "action_time": (T0 + 7) // 1000,
        "user_id": WECHAT,
        "trace": {},
        "standard_type": "LONG_TERM",
        "mode": "delayed",
        "reason": None,
        "corp_id": CORP,
        "external_userid": "wmA",
        "tag_id": "t_long",
        "source_event_id": "e1",
        "event_ts": T0 + 7,
    }]


def test_other_partitions_do_not_release_a_hold():
    parts = {f"{CORP}:wmA": 1, f"{CORP}:wmB": 2}
    events = [
        contact("c1", "wmA", T0, **WECHAT),
        add("e1", "wmA", "t_invalid", T0),
        add("eB", "wmB", "t_unmapped", T0 + DAY),
    ]
    assert run(RULES, events, partition_of=parts.__getitem__, flush_at_end=False) == ([], [])
    reports, _ = run(RULES, events, partition_of=parts.__getitem__)
    assert brief(reports) == [("wmA", "INVALID", "delayed", None, "e1", T0)]
    assert reports[0]["action_type"] == "INEFFECTIVE_LEADS"
    assert reports[0]["custom_action"] is None


def test_remove_before_the_deadline_cancels():
    events = [
        contact("c1", "wmA", T0, **WECHAT),
        add("e1", "wmA", "t_long", T0),
        remove("e2", "wmA", "t_long", T0 + HOLD - 1),
        add("eB", "wmB", "t_unmapped", T0 + DAY),
    ]
    assert run(RULES, events) == ([], [])


def test_hold_survives_while_any_supporting_tag_remains():
    events = [
        contact("c1", "wmA", T0, **WECHAT),
        add("e1", "wmA", "t_long", T0),
        add("e2", "wmA", "t_long2", T0 + MIN),
        remove("e3", "wmA", "t_long", T0 + 2 * MIN),
        remove("e4", "wmA", "t_valid", T0 + 3 * MIN),    # not a supporting tag
    ]
    reports, _ = run(RULES, events)
    assert brief(reports) == [("wmA", "LONG_TERM", "delayed", None, "e1", T0)]
    assert reports[0]["tag_id"] == "t_long"
    both_removed = events + [remove("e5", "wmA", "t_long2", T0 + 4 * MIN)]
    assert run(RULES, both_removed) == ([], [])


def test_a_remove_cuts_its_tag_from_every_hold_of_the_customer():
    rules = RULES + [
        rule("t_flip", "INVALID", effective_from=T0 - DAY, version=1),
        rule("t_flip", "LONG_TERM", effective_from=T0 + MIN, version=2),
    ]
    events = [
        contact("c1", "wmA", T0, **WECHAT),
        add("e1", "wmA", "t_flip", T0),               # INVALID hold
        add("e2", "wmA", "t_invalid", T0 + MIN),      # INVALID also supported by t_invalid
        add("e3", "wmA", "t_flip", T0 + 2 * MIN),     # LONG_TERM hold, same tag
        remove("e4", "wmA", "t_flip", T0 + 3 * MIN),  # cancels LONG_TERM, INVALID survives
    ]
    reports, _ = run(rules, events)
    assert brief(reports) == [("wmA", "INVALID", "delayed", None, "e1", T0)]
    assert reports[0]["tag_id"] == "t_flip"


def test_remove_at_or_after_the_deadline_is_too_late():
    for when in (T0 + HOLD, T0 + HOLD + 1, T0 + DAY):
        events = [
            contact("c1", "wmA", T0, **WECHAT),
            add("e1", "wmA", "t_long", T0),
            remove("e2", "wmA", "t_long", when),   # its own ts releases the hold first
        ]
        reports, _ = run(RULES, events, flush_at_end=False)
        assert brief(reports) == [("wmA", "LONG_TERM", "delayed", None, "e1", T0)]


def test_a_later_add_after_cancellation_starts_a_new_hold():
    events = [
        contact("c1", "wmA", T0, **WECHAT),
        add("e1", "wmA", "t_long", T0),
        remove("e2", "wmA", "t_long", T0 + 10 * MIN),
        add("e3", "wmA", "t_long2", T0 + 20 * MIN),
        add("eB", "wmB", "t_unmapped", T0 + 20 * MIN + HOLD - 1),
    ]
    assert run(RULES, events, flush_at_end=False) == ([], [])
    events.append(add("eC", "wmC", "t_unmapped", T0 + 20 * MIN + HOLD))
    reports, _ = run(RULES, events, flush_at_end=False)
    assert brief(reports) == [("wmA", "LONG_TERM", "delayed", None, "e3", T0 + 20 * MIN)]
    assert (reports[0]["tag_id"], reports[0]["account_id"], reports[0]["user_action_set_id"]) == (
        "t_long2", 2002, 11002)


def test_identity_is_checked_when_the_hold_is_released():
    arrives_in_time = [
        add("e1", "wmA", "t_invalid", T0),
        contact("c1", "wmA", T0 + HOLD - 1, change_type="edit_external_contact", click_id="k"),
    ]
    reports, unreportable = run(RULES, arrives_in_time)
    assert brief(reports) == [("wmA", "INVALID", "delayed", None, "e1", T0)]
    assert reports[0]["trace"] == {"click_id": "k"}
    assert unreportable == []

    # At the deadline the release happens before the contact event is applied.
    too_late = [
        add("e1", "wmA", "t_invalid", T0),
        contact("c1", "wmA", T0 + HOLD, change_type="edit_external_contact", click_id="k"),
        add("e2", "wmA", "t_invalid", T0 + HOLD + 1),   # a new hold: the first did not count
    ]
    reports, unreportable = run(RULES, too_late)
    assert brief(unreportable) == [("wmA", "INVALID", "delayed", "no_user_identity", "e1", T0)]
    assert brief(reports) == [("wmA", "INVALID", "delayed", None, "e2", T0 + HOLD + 1)]


def test_late_event_hold_is_released_by_the_next_event_before_it_applies():
    events = [
        contact("c1", "wmA", T0, **WECHAT),
        add("eB", "wmB", "t_unmapped", T0 + DAY),
        add("e1", "wmA", "t_long", T0 + MIN),          # ts far behind stream time
        remove("e2", "wmA", "t_long", T0 + 2 * MIN),   # too late: e1's hold is already due
    ]
    reports, _ = run(RULES, events, flush_at_end=False)
    assert brief(reports) == [("wmA", "LONG_TERM", "delayed", None, "e1", T0 + MIN)]


def test_delay_hold_is_configurable():
    events = [
        contact("c1", "wmA", T0, **WECHAT),
        add("e1", "wmA", "t_long", T0),
        remove("e2", "wmA", "t_long", T0 + HOLD),
    ]
    assert run(RULES, events, delay_hold_ms=HOLD + 1) == ([], [])


# ---------------------------------------------------------------------------------------------
# Release order and flush at end
# ---------------------------------------------------------------------------------------------

def test_flush_at_end_releases_every_hold_by_deadline_then_customer_then_type():
    parts = {f"{CORP}:wmA": 0, f"{CORP}:wmB": 1, f"{CORP}:wmC": 2}
    events = [contact(f"c{x}", f"wm{x}", T0, **WECHAT) for x in "ABC"] + [
        add("e1", "wmB", "t_invalid", T0 + 5),
        add("e2", "wmA", "t_long", T0 + 5),
        add("e3", "wmA", "t_invalid", T0 + 5),
        add("e4", "wmC", "t_invalid", T0 + 1),
        add("e5", "wmC", "t_long", T0 + 9),
        add("e6", "wmB", "t_long", T0 + 5),
    ]
    reports, _ = run(RULES, events, partition_of=parts.__getitem__)
    assert [(r["external_userid"], r["standard_type"]) for r in reports] == [
        ("wmC", "INVALID"), ("wmA", "INVALID"), ("wmA", "LONG_TERM"), ("wmB", "INVALID"), ("wmB", "LONG_TERM"),
        ("wmC", "LONG_TERM")]
    assert run(RULES, events, partition_of=parts.__getitem__, flush_at_end=False) == ([], [])


def test_release_by_stream_time_uses_the_same_order_and_only_due_holds():
    events = [contact(f"c{x}", f"wm{x}", T0, **WECHAT) for x in "ABC"] + [
        add("e1", "wmB", "t_invalid", T0 + 5),
        add("e2", "wmA", "t_long", T0 + 5),
        add("e4", "wmC", "t_invalid", T0 + 1),
        add("e5", "wmC", "t_long", T0 + 9),
        add("eX", "wmD", "t_unmapped", T0 + 5 + HOLD),
    ]
    reports, _ = run(RULES, events, flush_at_end=False)
    assert [(r["external_userid"], r["standard_type"]) for r in reports] == [
        ("wmC", "INVALID"), ("wmA", "LONG_TERM"), ("wmB", "INVALID")]


# ---------------------------------------------------------------------------------------------
# Properties: the strategies and the model together
# ---------------------------------------------------------------------------------------------

IDENTIFIER_FIELDS = ("event_id", "corp_id", "external_userid", "userid")
STANDARD_TYPES = {"CONSULT", "LEAD", "VALID", "ORDER", "LONG_TERM", "INVALID"}


def is_identifier(value):
    return isinstance(value, str) and 1 <= len(value) <= 128


def assert_valid_log(log):
    events = log["events"]
    assert 0 < len(events) < 150
    for key, value in log["rules"]:
        if value is None:
            continue
        assert key == f"{value['corp_id']}:{value['tag_id']}"
        assert is_identifier(value["corp_id"]) and is_identifier(value["tag_id"])
        assert value["standard_type"] in STANDARD_TYPES | {None}
        assert type(value["effective_from"]) is int and value["effective_from"] >= 0
        assert type(value["version"]) is int
        if value["standard_type"] is not None:
            assert type(value["account_id"]) is int and type(value["user_action_set_id"]) is int
        assert value.get("action_type") is None or is_identifier(value["action_type"])
    by_id = {}
    for event in events:
        assert all(is_identifier(event[f]) for f in IDENTIFIER_FIELDS)
        assert type(event["ts"]) is int and event["ts"] >= 0
        assert ":" not in event["corp_id"]
        if "change_type" in event:
            assert "op" not in event
            assert event["change_type"] in {"add_external_contact", "edit_external_contact",
                                            "del_external_contact", "del_follow_user"}
            for f in ("wechat_app_id", "wechat_unionid", "wechat_openid", "click_id"):
                assert event.get(f) is None or is_identifier(event[f])
        else:
            assert event["op"] in {"add", "remove"} and is_identifier(event["tag_id"])
        same = by_id.setdefault(event["event_id"], event)
        # event ids are unique except for re-sends of the same event of the same customer
        assert {k: v for k, v in same.items() if k != "ts"} == {k: v for k, v in event.items() if k != "ts"}


def assert_model_invariants(reports, unreportable):
    seen = Counter((r["corp_id"], r["external_userid"], r["standard_type"]) for r in reports)
    assert all(n == 1 for n in seen.values()), seen
    for r in reports + unreportable:
        assert tuple(r) == REPORT_FIELDS
        assert r["outer_action_id"] == sha(r["corp_id"], r["external_userid"], r["standard_type"])
        assert r["action_time"] == r["event_ts"] // 1000
        assert r["mode"] == ("realtime" if r["standard_type"] in {"CONSULT", "LEAD", "VALID", "ORDER"} else "delayed")
        assert (r["custom_action"] is not None) == (r["action_type"] == "CUSTOM")
    for r in unreportable:
        assert r["reason"] == "no_user_identity"
    for r in reports:
        assert r["user_id"] or r["trace"]
        assert r["reason"] in {None, "order_after_window", "add_time_unknown"}


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(event_logs())
def test_model_never_raises_and_reports_each_type_at_most_once(log):
    assert_valid_log(log)
    reports, unreportable = reference_reports(log["rules"], log["events"], partition_of=crc_partition)
    assert_model_invariants(reports, unreportable)
    # Without flush_at_end the result is a prefix-compatible subset: realtime reports agree.
    held_back, _ = reference_reports(log["rules"], log["events"], partition_of=crc_partition, flush_at_end=False)
    assert held_back == reports[: len(held_back)]


@SETTINGS
@given(st.integers(1, 4).flatmap(lambda n: st.tuples(st.just(n), event_logs(
    partitions=n, monotonic_per_partition=True))))
def test_monotonic_logs_are_ordered_per_partition(drawn):
    partitions, log = drawn
    assert_valid_log(log)

    def partition_of(key):
        return crc_partition(key, partitions)

    last = {}
    for event in log["events"]:
        p = partition_of(f"{event['corp_id']}:{event['external_userid']}")
        kind = "contact" if "change_type" in event else "tag"
        if p in last:
            ts, prev_kind = last[p]
            assert event["ts"] >= ts
            assert not (event["ts"] == ts and prev_kind == "tag" and kind == "contact")
            if event["ts"] == ts and prev_kind == "tag":
                kind = "tag"   # a tag at this ts has been seen
        last[p] = (event["ts"], kind)
    reports, unreportable = reference_reports(log["rules"], log["events"], partition_of=partition_of)
    assert_model_invariants(reports, unreportable)


@SETTINGS
@given(event_logs(partition_of=lambda key: len(key) % 3, monotonic_per_partition=True))
def test_monotonic_logs_honour_a_custom_partition_of(log):
    last = {}
    for event in log["events"]:
        p = len(f"{event['corp_id']}:{event['external_userid']}") % 3
        assert event["ts"] >= last.get(p, 0)
        last[p] = event["ts"]
