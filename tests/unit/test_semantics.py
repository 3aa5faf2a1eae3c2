"""SPEC §4 as scenarios on the pure core: given these events, expect these reports.

No Faust, no Kafka: `streams.semantics.apply_event` is called directly.
"""
import hashlib

from schemas.records import DEFAULT_ACTION_TYPES, ContactEvent, ReportingRule, TagEvent
from streams.rulebook import RuleBook
from streams.semantics import CustomerState, ReportingPolicy, apply_event

T0 = 1_763_884_800_000
POLICY = ReportingPolicy(default_action_types=dict(DEFAULT_ACTION_TYPES))
NOW = T0 + 999


def book(*rules):
    b = RuleBook()
    for tag_id, standard_type, *rest in rules:
        effective_from, version = rest if rest else (0, 1)
        b.add(ReportingRule("ww1", tag_id, standard_type, effective_from, version,
                            account_id=2001, user_action_set_id=11001))
    return b


def contact(ts=T0 - 60_000, userid="staff1", change_type="add_external_contact", **identity):
    return ContactEvent(f"c{ts}{userid}", "ww1", "wm1", userid, change_type, ts, **identity)


def tag(tag_id, ts, op="add", userid="staff1", event_id=None):
    return TagEvent(event_id or f"e{ts}{tag_id}{op}", "ww1", "wm1", userid, tag_id, op, ts)


def run(rules, events):
    """Fold the events of one customer; return (outcomes, reports, unreportable)."""
    state, outcomes, reports, unreportable = CustomerState(), [], [], []
    for event in events:
        state, result = apply_event(state, event, rules.rule_as_of, POLICY, NOW)
        state = CustomerState.decode(state.encode())       # what the table would persist
        outcomes.append(result.outcome)
        reports += result.reports
        unreportable += result.unreportable
    return outcomes, reports, unreportable


UNION = {"wechat_app_id": "wx1", "wechat_unionid": "u1"}


def test_each_realtime_type_is_reported_at_once_with_its_default_action_type():
    rules = book(("a", "CONSULT"), ("b", "LEAD"), ("c", "VALID"), ("d", "ORDER"))
    _, reports, _ = run(rules, [contact(**UNION), tag("a", T0), tag("b", T0 + 1), tag("c", T0 + 2), tag("d", T0 + 3)])
    assert [(r.standard_type, r.action_type, r.mode, r.reason) for r in reports] == [
        ("CONSULT", "WECOM_CONSULT", "realtime", None), ("LEAD", "RESERVATION", "realtime", None),
        ("VALID", "CONFIRM_EFFECTIVE_LEADS", "realtime", None), ("ORDER", "COMPLETE_ORDER", "realtime", None)]
    first = reports[0]
    assert first.outer_action_id == hashlib.sha256(b"ww1|wm1|CONSULT").hexdigest()
    assert first.action_time == T0 // 1000 and first.event_ts == T0 and first.emitted_at == NOW
    assert first.user_id == UNION and first.trace == {}
    assert (first.account_id, first.user_action_set_id, first.tag_id) == (2001, 11001, "a")


def test_unmapped_and_null_mapped_tags_report_nothing():
    outcomes, reports, _ = run(book(("n", None)), [contact(**UNION), tag("n", T0), tag("unknown", T0)])
    assert reports == [] and outcomes[1:] == ["unmapped", "unmapped"]


def test_a_rule_change_takes_effect_at_effective_from():
    rules = book(("s", "LEAD", T0, 1), ("s", "VALID", T0 + 100, 2))
    _, before, _ = run(rules, [contact(**UNION), tag("s", T0 + 99)])
    _, after, _ = run(rules, [contact(**UNION), tag("s", T0 + 100)])
    assert [r.standard_type for r in before] == ["LEAD"]
    assert [r.standard_type for r in after] == ["VALID"]


def test_once_per_customer_and_type_from_the_first_add():
    rules = book(("core", "VALID"), ("vip", "VALID"))
    outcomes, reports, _ = run(rules, [contact(**UNION), tag("core", T0), tag("vip", T0 + 1),
                                       tag("core", T0 + 2, op="remove"), tag("core", T0 + 3)])
    assert [(r.tag_id, r.event_ts) for r in reports] == [("core", T0)]
    assert outcomes[2:] == ["already_reported", "tag_removed", "already_reported"]


def test_no_identity_means_unreportable_and_it_does_not_count():
    rules = book(("b", "LEAD"))
    outcomes, reports, unreportable = run(rules, [
        tag("b", T0),                                        # no contact yet
        contact(ts=T0 + 1, wechat_app_id="wx1"),             # app id alone is not enough
        tag("b", T0 + 2),
        contact(ts=T0 + 3, wechat_openid="o1"),              # app id + openid is
        tag("b", T0 + 4)])
    assert [(r.reason, r.event_ts) for r in unreportable] == [("no_user_identity", T0), ("no_user_identity", T0 + 2)]
    assert [(r.event_ts, r.user_id) for r in reports] == [(T0 + 4, {"wechat_app_id": "wx1", "wechat_openid": "o1"})]


def test_a_click_id_alone_is_an_identity_and_goes_in_the_trace():
    _, reports, _ = run(book(("a", "CONSULT")), [contact(click_id="clk"), tag("a", T0)])
    assert [(r.user_id, r.trace) for r in reports] == [({}, {"click_id": "clk"})]


def test_rule_action_type_overrides_the_default():
    rules = RuleBook()
    rules.add(ReportingRule("ww1", "x", "LEAD", 0, 1, account_id=1, user_action_set_id=2, action_type="CUSTOM"))
    _, reports, _ = run(rules, [contact(click_id="c"), tag("x", T0)])
    assert (reports[0].action_type, reports[0].custom_action) == ("CUSTOM", "LEAD")


def test_tagging_delay_is_measured_from_the_tagging_staff_members_add_time():
    rules = book(("a", "CONSULT"), ("b", "LEAD"))
    _, reports, _ = run(rules, [
        contact(ts=T0 - 5000, userid="early", click_id="c"),
        contact(ts=T0 - 1000, userid="tagger"),
        tag("a", T0, userid="tagger"),           # the tagging staff member's own add time
        tag("b", T0, userid="nobody")])          # else the customer's earliest
    assert [r.tagging_delay_ms for r in reports] == [1000, 5000]


def test_delayed_types_are_not_reported_in_real_time():
    outcomes, reports, _ = run(book(("x", "LONG_TERM"), ("y", "INVALID")), [contact(click_id="c"), tag("x", T0), tag("y", T0)])
    assert reports == [] and outcomes[1:] == ["delayed_pending", "delayed_pending"]
