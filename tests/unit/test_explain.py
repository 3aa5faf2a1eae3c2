"""`tagstream explain`'s core without a broker (streams/explain/timeline.py): for customers
of generated logs, its per-event outcomes and its reports equal the reference model's; a
customer built to hit each outcome of SPEC §4 gets the right reason for each; a customer
with no events is one line."""
from __future__ import annotations

import random

import orjson

from schemas.records import DEFAULT_ACTION_TYPES
from streams.core.rulebook import RuleBook
from streams.core.semantics import ReportingPolicy
from streams.explain.timeline import Explainer, render
from streams.replay.engine import CONTACT, TAG, InputRecord, Replay, ReplaySummary
from tests.logs import generate_log, kafka_partition
from tests.reference_model import reference_reports
from tests.unit.test_core_equals_model import canonical, decoded

POLICY = ReportingPolicy(default_action_types=dict(DEFAULT_ACTION_TYPES))
PARTITIONS = 4
DAY, MIN = 86_400_000, 60_000


def explain(book: RuleBook, events: list[dict], corp: str, user: str, idle_at: int, follow: bool = True):
    """The explanation of one customer from the events of its partition, as `run` feeds them
    (following the customer: other customers' events only move stream time); with
    `follow=False`, every event of the partition is applied."""
    explainer = Explainer(corp, user, book, POLICY, 0, idle_at)
    partition = kafka_partition(f"{corp}:{user}", PARTITIONS)
    replay = Replay(book, POLICY, explainer, ReplaySummary(), observer=explainer.observe,
                    follow=explainer.key if follow else None)
    offsets = {TAG: 0, CONTACT: 0}
    for body in events:
        key = f"{body['corp_id']}:{body['external_userid']}"
        if kafka_partition(key, PARTITIONS) != partition:
            continue
        source = TAG if "op" in body else CONTACT
        replay.offer(InputRecord(source, partition, offsets[source], key.encode(), orjson.dumps(body), "t"))
        offsets[source] += 1
    for source in (TAG, CONTACT):
        replay.source_done(source, partition)
    replay.finish(idle_at=idle_at)
    return explainer.explanation(partition)


def test_outcomes_and_reports_equal_the_reference_models_for_every_customer_looked_at():
    partition_of = lambda key: kafka_partition(key, PARTITIONS)       # noqa: E731
    rng = random.Random(4)
    for seed in range(3):
        log = generate_log(seed, customers=40, events=3000)
        book, _ = decoded(log, partition_of)
        # the model sees the log in the order the worker applies it: per partition by ts, contacts first
        ordered = sorted(log["events"], key=lambda e: (e["ts"], "op" in e))
        outcomes: list = []
        reports, unreportable = reference_reports(log["rules"], ordered, partition_of=partition_of, outcomes=outcomes)
        customers = sorted({e["external_userid"] for e in log["events"]})
        for user in rng.sample(customers, 10):
            e = explain(book, log["events"], "wwP", user, idle_at=2 ** 50)    # idle long after: every hold let go
            mine = {ev["event_id"] for ev in ordered if ev["external_userid"] == user}
            by_id = [(eid, outcome) for eid, outcome in outcomes if eid in mine]
            assert [(s.event_id, s.outcome) for s in e.steps] == by_id, user
            without_delivery = ({k: v for k, v in r.items() if k != "delivery"} for r in e.reports())
            assert canonical(without_delivery) == canonical(r for r in reports if r["external_userid"] == user)
            assert canonical(e.unreportable) == canonical(r for r in unreportable if r["external_userid"] == user)


def test_following_one_customer_explains_it_as_applying_every_event_does():
    """Other customers' events only move stream time (ReportingEngine.on_time): at every
    idle moment, including one that leaves holds open, the followed customer's steps,
    reports and open holds equal those of applying every event of the partition."""
    partition_of = lambda key: kafka_partition(key, PARTITIONS)       # noqa: E731
    for seed in range(3):
        log = generate_log(seed + 10, customers=60, events=4000)
        book, _ = decoded(log, partition_of)
        first, last = min(e["ts"] for e in log["events"]), max(e["ts"] for e in log["events"])
        for user in random.Random(seed).sample(sorted({e["external_userid"] for e in log["events"]}), 15):
            # idle at the first event: the wall clock lets nothing go, stream time alone does
            for idle_at in (first, last + 10 * MIN, last + 30 * DAY):
                followed = explain(book, log["events"], "wwP", user, idle_at).as_dict()
                applied = explain(book, log["events"], "wwP", user, idle_at, follow=False).as_dict()
                assert followed["events"] and without_emitted_at(followed) == without_emitted_at(applied), \
                    (seed, user, idle_at)


def without_emitted_at(value):
    """`emitted_at` is the wall clock of the call; everything else must be equal."""
    if isinstance(value, dict):
        return {k: without_emitted_at(v) for k, v in value.items() if k != "emitted_at"}
    if isinstance(value, list):
        return [without_emitted_at(v) for v in value]
    return value


def test_each_outcome_gets_its_reason_in_words():
    t0 = 1_796_000_000_000
    book = RuleBook()
    rules = {"etV": "VALID", "etO": "ORDER", "etI": "INVALID"}
    for tag, standard_type in rules.items():
        book.add(decoded({"rules": [(f"ww1:{tag}", {"corp_id": "ww1", "tag_id": tag, "standard_type": standard_type,
                                                    "account_id": 1, "user_action_set_id": 2,
                                                    "effective_from": t0 - DAY, "version": 3})],
                          "events": []}, lambda k: 0)[0].rule_as_of("ww1", tag, t0))

    def tag(n, tag_id, op="add", ts=None, event_id=None):
        return {"event_id": event_id or f"e{n}", "corp_id": "ww1", "external_userid": "wmA", "userid": "s1",
                "tag_id": tag_id, "op": op, "ts": ts or t0 + n * MIN}
    contact = {"event_id": "c2", "corp_id": "ww1", "external_userid": "wmA", "userid": "s1",
               "change_type": "add_external_contact", "ts": t0 + 2 * MIN, "wechat_app_id": "wx1",
               "wechat_unionid": "u1"}
    events = [tag(1, "etV"), contact, tag(3, "etU"), tag(4, "etI"), tag(5, "etI", "remove"), tag(6, "etV"),
              tag(7, "etV"), tag(8, "etV", event_id="e7"), tag(9, "etO", ts=t0 + 8 * DAY)]
    e = explain(book, events, "ww1", "wmA", idle_at=t0 + 8 * DAY + 31 * MIN + POLICY.idle_grace)
    reasons = {s.event_id + ("-dup" if s.outcome == "duplicate" else ""): (s.outcome, s.reason) for s in e.steps}
    assert reasons["e1"][0] == "unreportable" and "no user identity" in reasons["e1"][1]
    assert reasons["c2"][0] == "contact_applied" and "identity recorded" in reasons["c2"][1]
    assert reasons["e3"] == ("unmapped", f"unmapped: tag etU had no rule at {e.steps[2].as_dict()['time']}")
    assert reasons["e4"][0] == "held" and "INVALID is reported at" in reasons["e4"][1]
    assert reasons["e5"][0] == "cancelled" and "left the held INVALID with no supporting tag" in reasons["e5"][1]
    assert reasons["e6"][0] == "reported" and "rule version 3 maps tag etV to VALID" in reasons["e6"][1]
    assert reasons["e7"][0] == "already_reported" and "already reported by event e6" in reasons["e7"][1]
    assert reasons["e7-dup"][0] == "duplicate" and "was first applied at" in reasons["e7-dup"][1]
    assert reasons["e9"][0] == "held" and "past the 7 d window, so it is LONG_TERM" in reasons["e9"][1]
    assert [(r["standard_type"], r["mode"], r["reason"]) for r in e.released] == \
        [("LONG_TERM", "delayed", "order_after_window")]
    assert e.why["VALID"].startswith("reported (realtime) for tag etV") and "not yet sent" in e.why["VALID"]
    assert e.why["INVALID"].startswith("held, then cancelled") and e.why["CONSULT"].startswith("no tag mapped")
    assert e.why["ORDER"].startswith("add etO at") and "past the 7 d window" in e.why["ORDER"] and \
        "counts as LONG_TERM" in e.why["ORDER"]
    text = render(e)
    assert "Why (not): CONSULT:" in text and "Events before" in text


def test_another_customers_event_releases_the_followed_customers_hold_by_stream_time():
    """wmA's INVALID is held 30 min; the next event of its partition is another customer's,
    40 min later, and the wall clock (idle_at) is before both: only stream time lets it go."""
    t0 = 1_796_000_000_000
    log = {"rules": [("ww1:etI", {"corp_id": "ww1", "tag_id": "etI", "standard_type": "INVALID", "account_id": 1,
                                  "user_action_set_id": 2, "effective_from": t0 - DAY, "version": 1})], "events": []}
    book, _ = decoded(log, lambda k: 0)
    partition = kafka_partition("ww1:wmA", PARTITIONS)
    other = next(f"wm{n}" for n in range(100) if kafka_partition(f"ww1:wm{n}", PARTITIONS) == partition)
    events = [{"event_id": "c1", "corp_id": "ww1", "external_userid": "wmA", "userid": "s1",
               "change_type": "add_external_contact", "ts": t0, "wechat_app_id": "wx1", "wechat_unionid": "u1"},
              {"event_id": "e1", "corp_id": "ww1", "external_userid": "wmA", "userid": "s1", "tag_id": "etI",
               "op": "add", "ts": t0 + MIN},
              {"event_id": "e2", "corp_id": "ww1", "external_userid": other, "userid": "s1", "tag_id": "etX",
               "op": "add", "ts": t0 + 40 * MIN}]
    for follow in (True, False):
        e = explain(book, events, "ww1", "wmA", idle_at=t0, follow=follow)
        assert [(r["standard_type"], r["mode"]) for r in e.released] == [("INVALID", "delayed")], follow
    before = explain(book, events[:2], "ww1", "wmA", idle_at=t0)
    assert before.released == [] and [hold["standard_type"] for hold in before.pending] == ["INVALID"]


def test_a_customer_with_no_events_is_one_line():
    e = explain(RuleBook(), [], "ww1", "wmNobody", idle_at=0)
    assert e.steps == [] and render(e).count("\n") == 0 and "no events" in render(e)
