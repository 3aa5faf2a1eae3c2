"""SPEC §4 as scenarios on the pure core: given these events, expect these reports.

No Faust, no Kafka: `streams.core.semantics.ReportingEngine` over an in-memory store.
"""
import hashlib

from schemas.records import DEFAULT_ACTION_TYPES, ContactEvent, ReportingRule, TagEvent
from streams.core.rulebook import RuleBook
from streams.core.semantics import CustomerState, MemoryStore, ReportingEngine, ReportingPolicy

T0 = 1_763_884_800_000
SEC, MIN, HOUR, DAY = 1000, 60_000, 3_600_000, 86_400_000
POLICY = ReportingPolicy(default_action_types=dict(DEFAULT_ACTION_TYPES))
NOW = T0 + 999
UNION = {"wechat_app_id": "wx1", "wechat_unionid": "u1"}


def book(*rules):
    b = RuleBook()
    for tag_id, standard_type, *rest in rules:
        effective_from, version = rest if rest else (0, 1)
        b.add(ReportingRule("ww1", tag_id, standard_type, effective_from, version,
                            account_id=2001, user_action_set_id=11001))
    return b


_ids = iter(range(10**9))


def contact(ts=T0 - MIN, userid="staff1", change_type="add_external_contact", customer="wm1", **identity):
    return ContactEvent(f"c{next(_ids)}", "ww1", customer, userid, change_type, ts, **identity)


def tag(tag_id, ts, op="add", userid="staff1", customer="wm1", event_id=None):
    return TagEvent(event_id or f"e{next(_ids)}", "ww1", customer, userid, tag_id, op, ts)


class Scenario:
    """Feed events through one engine (one partition unless told) and collect everything."""

    def __init__(self, rules, policy=POLICY):
        self.store = MemoryStore()
        self.engine = ReportingEngine(self.store, rules.rule_as_of, policy)
        self.outcomes, self.reports, self.unreportable = [], [], []

    def send(self, *events, partition=0):
        for event in events:
            result = self.engine.on_event(partition, event, NOW)
            self._collect(result)
            self.outcomes.append(result.outcome)
            # what the table would persist
            for key, state in list(self.store.customers.items()):
                self.store.customers[key] = CustomerState.decode(state.encode())
        return self

    def idle(self, wall_ms, partition=0):
        self._collect(self.engine.on_idle(partition, wall_ms, NOW))
        return self

    def flush(self, partition=0):
        self._collect(self.engine.flush(partition, NOW))
        return self

    def _collect(self, result):
        self.reports += result.reports
        self.unreportable += result.unreportable

    def summary(self):
        return [(r.standard_type, r.mode, r.reason, r.tag_id, r.event_ts) for r in self.reports]


# -- rule 2, 4: mapping and real-time types ---------------------------------------------

def test_each_realtime_type_is_reported_at_once_with_its_default_action_type():
    s = Scenario(book(("a", "CONSULT"), ("b", "LEAD"), ("c", "VALID"), ("d", "ORDER")))
    s.send(contact(**UNION), tag("a", T0), tag("b", T0 + 1), tag("c", T0 + 2), tag("d", T0 + 3))
    assert [(r.standard_type, r.action_type, r.mode, r.reason) for r in s.reports] == [
        ("CONSULT", "WECOM_CONSULT", "realtime", None), ("LEAD", "RESERVATION", "realtime", None),
        ("VALID", "CONFIRM_EFFECTIVE_LEADS", "realtime", None), ("ORDER", "COMPLETE_ORDER", "realtime", None)]
    first = s.reports[0]
    assert first.outer_action_id == hashlib.sha256(b"ww1|wm1|CONSULT").hexdigest()
    assert first.action_time == T0 // 1000 and first.event_ts == T0 and first.emitted_at == NOW
    assert first.user_id == UNION and first.trace == {}
    assert (first.account_id, first.user_action_set_id, first.tag_id) == (2001, 11001, "a")


def test_unmapped_and_null_mapped_tags_report_nothing():
    s = Scenario(book(("n", None))).send(contact(**UNION), tag("n", T0), tag("unknown", T0))
    assert s.reports == [] and s.outcomes[1:] == ["unmapped", "unmapped"]


class CountingStore(MemoryStore):
    """A MemoryStore that counts reads and writes of customer records."""

    def __init__(self):
        super().__init__()
        self.customer_reads = self.customer_writes = 0

    def customer(self, key):
        self.customer_reads += 1
        return super().customer(key)

    def put_customer(self, key, state):
        self.customer_writes += 1
        super().put_customer(key, state)


def test_an_unmapped_add_never_touches_the_customer_and_its_redelivery_is_unmapped_again():
    store = CountingStore()
    engine = ReportingEngine(store, book(("n", None), ("v", "VALID")).rule_as_of, POLICY)
    engine.on_event(0, contact(**UNION), NOW)
    reads, writes = store.customer_reads, store.customer_writes
    unmapped = [tag("n", T0, event_id="u1"), tag("unknown", T0 + 1), tag("n", T0 + 2, event_id="u1")]
    assert [engine.on_event(0, e, NOW).outcome for e in unmapped] == ["unmapped"] * 3
    assert (store.customer_reads, store.customer_writes) == (reads, writes)
    assert store.clock(0).stream_time == T0 + 2          # stream time still moved
    # a mapped add reads and writes it as before
    assert engine.on_event(0, tag("v", T0 + 3), NOW).outcome == "reported"
    assert (store.customer_reads, store.customer_writes) == (reads + 1, writes + 1)


def test_an_id_reused_after_an_unmapped_add_is_applied():
    """The fast path's one departure from strict rule 1 (streams/core/semantics.py): an
    upstream that reuses an unmapped add's id for another event gets that event applied."""
    s = Scenario(book(("b", "LEAD")))
    s.send(contact(click_id="c"), tag("x", T0, event_id="e1"), tag("b", T0 + 1, event_id="e1"))
    assert s.outcomes[1:] == ["unmapped", "reported"]


def test_an_unmapped_add_still_releases_the_holds_it_makes_due():
    s = Scenario(book(("inv", "INVALID")))
    s.send(contact(**UNION), tag("inv", T0), tag("unknown", T0 + 30 * MIN, customer="wm2"))
    assert s.summary() == [("INVALID", "delayed", None, "inv", T0)]
    assert s.outcomes[-1] == "unmapped"


def test_a_rule_change_takes_effect_at_effective_from():
    rules = book(("s", "LEAD", T0, 1), ("s", "VALID", T0 + 100, 2))
    before = Scenario(rules).send(contact(**UNION), tag("s", T0 + 99))
    after = Scenario(rules).send(contact(**UNION), tag("s", T0 + 100))
    assert [r.standard_type for r in before.reports] == ["LEAD"]
    assert [r.standard_type for r in after.reports] == ["VALID"]


def test_rule_action_type_overrides_the_default():
    rules = RuleBook()
    rules.add(ReportingRule("ww1", "x", "LEAD", 0, 1, account_id=1, user_action_set_id=2, action_type="CUSTOM"))
    s = Scenario(rules).send(contact(click_id="c"), tag("x", T0))
    assert (s.reports[0].action_type, s.reports[0].custom_action) == ("CUSTOM", "LEAD")


# -- rule 3: once per customer and type ----------------------------------------------------

def test_once_per_customer_and_type_from_the_first_add():
    s = Scenario(book(("core", "VALID"), ("vip", "VALID")))
    s.send(contact(**UNION), tag("core", T0), tag("vip", T0 + 1), tag("core", T0 + 2, op="remove"), tag("core", T0 + 3))
    assert [(r.tag_id, r.event_ts) for r in s.reports] == [("core", T0)]
    assert s.outcomes[2:] == ["already_reported", "tag_removed", "already_reported"]


# -- rule 1: at-most-once input --------------------------------------------------------------

def test_a_repeated_event_id_is_ignored():
    s = Scenario(book(("a", "CONSULT"), ("b", "LEAD")))
    first = tag("a", T0, event_id="dup")
    s.send(contact(click_id="c"), first, tag("b", T0 + 1, event_id="dup"))
    assert s.summary() == [("CONSULT", "realtime", None, "a", T0)]
    assert s.outcomes[-1] == "duplicate"


def test_event_ids_are_forgotten_after_the_dedupe_horizon_of_stream_time():
    policy = ReportingPolicy(default_action_types=dict(DEFAULT_ACTION_TYPES), dedupe_horizon=HOUR)
    s = Scenario(book(("b", "LEAD")), policy)
    s.send(contact(click_id="c", ts=T0), tag("x", T0, op="remove", event_id="e1"))
    s.send(tag("other", T0 + HOUR, customer="wm2"))            # stream time T0+1h: still remembered
    s.send(tag("b", T0 + HOUR, event_id="e1"))
    s.send(tag("other", T0 + HOUR + 1, customer="wm2"))        # now more than the horizon later
    s.send(tag("b", T0 + HOUR + 1, event_id="e1"))
    assert s.outcomes[2:] == ["unmapped", "duplicate", "unmapped", "reported"]


# -- rule 5: the ORDER window ------------------------------------------------------------------

def test_an_order_within_the_window_is_an_order():
    s = Scenario(book(("o", "ORDER"))).send(contact(ts=T0, click_id="c"), tag("o", T0 + 7 * DAY))
    assert s.summary() == [("ORDER", "realtime", None, "o", T0 + 7 * DAY)]


def test_an_order_after_the_window_becomes_a_held_long_term_conversion():
    s = Scenario(book(("o", "ORDER"))).send(contact(ts=T0, click_id="c"), tag("o", T0 + 7 * DAY + 1))
    assert s.reports == [] and s.outcomes[-1] == "held"
    s.send(tag("x", T0 + 7 * DAY + 1 + 30 * MIN, customer="someone-else"))
    assert s.summary() == [("LONG_TERM", "delayed", "order_after_window", "o", T0 + 7 * DAY + 1)]
    assert (s.reports[0].action_type, s.reports[0].custom_action) == ("CUSTOM", "LONG_TERM_CONVERSION")


def test_the_window_runs_from_the_tagging_staff_members_add_else_the_earliest():
    rules = book(("o", "ORDER"))
    s = Scenario(rules).send(contact(ts=T0, userid="early", click_id="c"), contact(ts=T0 + DAY, userid="tagger"),
                             tag("o", T0 + 7 * DAY + 1, userid="tagger"))
    assert [r.standard_type for r in s.reports] == ["ORDER"]
    s = Scenario(rules).send(contact(ts=T0, userid="early", click_id="c"), tag("o", T0 + 7 * DAY + 1, userid="nobody"))
    assert s.reports == [] and s.outcomes[-1] == "held"


def test_an_order_without_any_add_time_goes_out_at_once_flagged():
    s = Scenario(book(("o", "ORDER"))).send(contact(change_type="edit_external_contact", click_id="c"), tag("o", T0))
    assert s.summary() == [("ORDER", "realtime", "add_time_unknown", "o", T0)]


# -- rule 6: delayed types ---------------------------------------------------------------------

def test_delayed_types_are_held_then_released_by_stream_time_with_the_first_adds_time():
    s = Scenario(book(("lt", "LONG_TERM"), ("lt2", "LONG_TERM"), ("bad", "INVALID")))
    s.send(contact(click_id="c"), tag("lt", T0), tag("lt2", T0 + MIN), tag("bad", T0 + 2 * MIN))
    assert s.reports == [] and s.outcomes[1:] == ["held", "hold_joined", "held"]
    s.send(tag("x", T0 + 30 * MIN - 1, customer="other"))                  # not yet due
    assert s.reports == []
    s.send(tag("x", T0 + 30 * MIN, customer="other"))                      # due at its deadline
    assert s.summary() == [("LONG_TERM", "delayed", None, "lt", T0)]
    s.send(tag("x", T0 + 40 * MIN, customer="other"))
    assert s.summary()[1] == ("INVALID", "delayed", None, "bad", T0 + 2 * MIN)
    assert s.reports[1].action_type == "INEFFECTIVE_LEADS" and s.reports[1].action_time == (T0 + 2 * MIN) // 1000


def test_removing_every_supporting_tag_before_the_deadline_cancels_the_hold():
    s = Scenario(book(("lt", "LONG_TERM"), ("lt2", "LONG_TERM")))
    s.send(contact(click_id="c"), tag("lt", T0), tag("lt2", T0 + 1),
           tag("lt", T0 + 10 * MIN, op="remove"), tag("lt2", T0 + 29 * MIN, op="remove"))
    assert s.outcomes[-2:] == ["tag_removed", "cancelled"]
    s.send(tag("x", T0 + DAY, customer="other"))
    assert s.reports == []


def test_a_remove_at_or_after_the_deadline_is_too_late():
    s = Scenario(book(("lt", "LONG_TERM")))
    s.send(contact(click_id="c"), tag("lt", T0), tag("lt", T0 + 30 * MIN, op="remove"))
    assert s.summary() == [("LONG_TERM", "delayed", None, "lt", T0)]


def test_a_later_add_after_a_cancellation_starts_a_new_hold():
    s = Scenario(book(("lt", "LONG_TERM")))
    s.send(contact(click_id="c"), tag("lt", T0), tag("lt", T0 + MIN, op="remove"), tag("lt", T0 + HOUR))
    s.send(tag("x", T0 + HOUR + 29 * MIN, customer="other"))
    assert s.reports == []
    s.send(tag("x", T0 + HOUR + 30 * MIN, customer="other"))
    assert s.summary() == [("LONG_TERM", "delayed", None, "lt", T0 + HOUR)]


def test_identity_is_checked_when_the_hold_is_released():
    s = Scenario(book(("bad", "INVALID")))
    s.send(tag("bad", T0), contact(ts=T0 + MIN, click_id="late"))       # no identity at the add
    s.flush()
    assert [(r.standard_type, r.trace) for r in s.reports] == [("INVALID", {"click_id": "late"})]


def test_a_hold_released_without_identity_is_unreportable_and_does_not_count():
    s = Scenario(book(("bad", "INVALID")))
    s.send(tag("bad", T0), tag("x", T0 + 30 * MIN, customer="other"))
    assert [(r.standard_type, r.reason) for r in s.unreportable] == [("INVALID", "no_user_identity")]
    s.send(contact(ts=T0 + 31 * MIN, click_id="c"), tag("bad", T0 + 32 * MIN)).flush()
    assert s.summary() == [("INVALID", "delayed", None, "bad", T0 + 32 * MIN)]


def test_in_live_mode_an_idle_partition_releases_after_the_idle_grace():
    s = Scenario(book(("lt", "LONG_TERM")))
    s.send(contact(click_id="c"), tag("lt", T0))
    s.idle(wall_ms=T0 + 30 * MIN + 5 * MIN - 1)
    assert s.reports == []
    s.idle(wall_ms=T0 + 30 * MIN + 5 * MIN)
    assert s.summary() == [("LONG_TERM", "delayed", None, "lt", T0)]


def test_stream_time_is_per_partition():
    s = Scenario(book(("lt", "LONG_TERM")))
    s.send(contact(click_id="c"), tag("lt", T0), partition=0)
    s.send(tag("x", T0 + DAY, customer="far"), partition=1)            # another partition's time
    assert s.reports == []
    s.send(tag("x", T0 + DAY, customer="near"), partition=0)
    assert [r.standard_type for r in s.reports] == ["LONG_TERM"]


# -- rule 7, 9 -------------------------------------------------------------------------------

def test_no_identity_means_unreportable_and_it_does_not_count():
    s = Scenario(book(("b", "LEAD")))
    s.send(tag("b", T0), contact(ts=T0 + 1, wechat_app_id="wx1"), tag("b", T0 + 2),
           contact(ts=T0 + 3, wechat_openid="o1"), tag("b", T0 + 4))
    assert [(r.reason, r.event_ts) for r in s.unreportable] == [("no_user_identity", T0), ("no_user_identity", T0 + 2)]
    assert [(r.event_ts, r.user_id) for r in s.reports] == [(T0 + 4, {"wechat_app_id": "wx1", "wechat_openid": "o1"})]


def test_a_click_id_alone_is_an_identity_and_goes_in_the_trace():
    s = Scenario(book(("a", "CONSULT"))).send(contact(click_id="clk"), tag("a", T0))
    assert [(r.user_id, r.trace) for r in s.reports] == [({}, {"click_id": "clk"})]


def test_tagging_delay_is_measured_from_the_tagging_staff_members_add_time():
    s = Scenario(book(("a", "CONSULT"), ("b", "LEAD"), ("lt", "LONG_TERM")))
    s.send(contact(ts=T0 - 5000, userid="early", click_id="c"), contact(ts=T0 - 1000, userid="tagger"),
           tag("a", T0, userid="tagger"), tag("b", T0, userid="nobody"), tag("lt", T0, userid="tagger"))
    s.flush()
    assert [(r.standard_type, r.tagging_delay_ms) for r in s.reports] == [("CONSULT", 1000), ("LEAD", 5000), ("LONG_TERM", 1000)]


def test_ids_containing_colons_keep_their_identity_in_reports():
    rules = RuleBook()
    rules.add(ReportingRule("ww:1", "lt", "LONG_TERM", 0, 1, account_id=1, user_action_set_id=2))
    engine = ReportingEngine(MemoryStore(), rules.rule_as_of, POLICY)
    engine.on_event(0, ContactEvent("c", "ww:1", "wm:2", "s", "add_external_contact", T0, click_id="k"), NOW)
    engine.on_event(0, TagEvent("e", "ww:1", "wm:2", "s", "lt", "add", T0), NOW)
    (report,) = engine.flush(0, NOW).reports
    assert (report.corp_id, report.external_userid) == ("ww:1", "wm:2")
    assert report.outer_action_id == hashlib.sha256(b"ww:1|wm:2|LONG_TERM").hexdigest()


def test_a_late_add_whose_hold_is_already_due_is_released_at_the_next_event():
    """Found by the core-vs-model property: a hold indexed below the partition's scan range."""
    s = Scenario(book(("lt", "LONG_TERM"), ("lt0", "LONG_TERM")))
    s.send(contact(customer="a", click_id="k"), tag("lt0", T0 + HOUR, customer="a"),
           tag("lt0", T0 + HOUR, customer="a", op="remove"))          # leaves an index entry at T0+1.5h
    s.send(contact(customer="b", ts=T0 - MIN, click_id="k2"), tag("lt", T0, customer="b"))  # due at T0+30m < stream time
    assert s.reports == []
    s.send(tag("lt", T0, customer="b", op="remove"))                   # too late: released first
    assert [(r.external_userid, r.standard_type, r.mode) for r in s.reports] == [("b", "LONG_TERM", "delayed")]
