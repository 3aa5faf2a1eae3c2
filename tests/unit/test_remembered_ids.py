"""Rule 1's memory of event ids (issue 18): a few ids inline in the customer record, the rest
under their own keys with a per-partition queue that forgets them lazily, and a customer
record whose size does not grow with its history.

The property tests run the core against the independent reference model with a short dedupe
horizon, the laziest forgetting (one entry per event) and an inline set of 0 or 2 ids, so ids
spill to own keys, cross the horizon, are re-applied, and outlive it in the queue, in every
generated log.
"""
from __future__ import annotations

import orjson
import pytest
from hypothesis import HealthCheck, given, settings

from schemas.records import DEFAULT_ACTION_TYPES, TagEvent
from streams.core import semantics
from streams.core.rulebook import RuleBook
from streams.core.semantics import (
    DUPLICATE, TAG_REMOVED, CustomerState, MemoryStore, ReportingEngine, ReportingPolicy, run_log)
from tests.reference_model import reference_reports
from tests.strategies import crc_partition, event_logs
from tests.unit.test_core_equals_model import canonical, decoded

MIN, HOUR, DAY = 60_000, 3_600_000, 86_400_000
T0 = 1_763_884_800_000
SHORT = ReportingPolicy(default_action_types=dict(DEFAULT_ACTION_TYPES), dedupe_horizon=45 * MIN)


def _core_and_model(log: dict) -> tuple:
    book, events = decoded(log, crc_partition)
    reports, unreportable = run_log(events, book.rule_as_of, SHORT)
    core = canonical(r.as_wire() for r in reports), canonical(r.as_wire() for r in unreportable)
    model_r, model_u = reference_reports(log["rules"], log["events"], partition_of=crc_partition,
                                         dedupe_horizon_ms=SHORT.dedupe_horizon)
    return core, (canonical(model_r), canonical(model_u))


@pytest.mark.parametrize("inline_ids", [0, 2])
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(log=event_logs())
def test_a_short_horizon_with_the_laziest_forgetting_equals_the_reference_model(monkeypatch, inline_ids, log):
    monkeypatch.setattr(semantics, "FORGET_PER_EVENT", 1)
    monkeypatch.setattr(semantics, "INLINE_IDS", inline_ids)
    core, model = _core_and_model(log)
    assert core == model


def untagged(customer: str, n: int, ts: int) -> TagEvent:
    """A remove that cancels nothing: applied, so its id is remembered (an unmapped add's is
    not: test_semantics.py, the fast path)."""
    return TagEvent(f"e-{customer}-{n}", "ww1", customer, "staff1", "t_gone", "remove", ts)


def test_the_customer_record_does_not_grow_with_its_history():
    store = MemoryStore()
    engine = ReportingEngine(store, RuleBook().rule_as_of, SHORT)
    sizes = {}
    for n in range(10_001):
        assert engine.on_event(0, untagged("wmHot", n, T0 + n), 0).outcome == TAG_REMOVED
        if n in (100, 10_000):
            sizes[n] = len(store.customer("ww1:wmHot").encode())
    assert sizes[100] == sizes[10_000] < 1_000
    assert len(store.customer("ww1:wmHot").seen) == semantics.INLINE_IDS
    # and every id is still remembered: the horizon (45 min) spans all 10,001 events
    for n in (0, semantics.INLINE_IDS, 10_000):
        assert engine.on_event(0, untagged("wmHot", n, T0 + 10_001), 0).outcome == DUPLICATE
    assert len(store.seen) == len(store.seen_entries) == 10_001 - semantics.INLINE_IDS


def test_a_typical_customer_keeps_its_ids_in_its_record():
    store = MemoryStore()
    engine = ReportingEngine(store, RuleBook().rule_as_of, SHORT)
    for n in range(12):
        engine.on_event(0, untagged("wmA", n, T0 + n * MIN), 0)
    assert len(store.customer("ww1:wmA").seen) == 12
    assert store.seen == {} and store.seen_entries == {}


def test_forgotten_ids_leave_the_store_as_stream_time_moves_on():
    store = MemoryStore()
    engine = ReportingEngine(store, RuleBook().rule_as_of, SHORT)
    for n in range(1_000):                      # a burst: 1,000 ids within one minute
        engine.on_event(0, untagged("wmHot", n, T0 + n * 60), 0)
    spilled = 1_000 - semantics.INLINE_IDS
    assert len(store.seen) == spilled
    # A day later, other customers' events walk the queue: each forgets up to FORGET_PER_EVENT
    # (their own ids stay inline, so they add nothing to the queue).
    later = T0 + DAY
    walkers = -(-spilled // semantics.FORGET_PER_EVENT)
    for n in range(walkers):
        engine.on_event(0, untagged(f"wm{n}", 0, later + n), 0)
    assert store.seen == {} and store.seen_entries == {}
    clock = store.clock(0)
    assert clock.seen_head == clock.seen_next == spilled and clock.seen_head_ts is None
    # the hot customer's expired inline ids go the next time it remembers one
    engine.on_event(0, untagged("wmHot", 1_000, later + walkers), 0)
    assert store.customer("ww1:wmHot").seen == {"e-wmHot-1000": later + walkers}


@pytest.mark.parametrize("inline_ids", [0, 16])
def test_an_id_re_applied_after_its_horizon_is_remembered_again(monkeypatch, inline_ids):
    monkeypatch.setattr(semantics, "INLINE_IDS", inline_ids)
    store = MemoryStore()
    engine = ReportingEngine(store, RuleBook().rule_as_of, SHORT)
    engine.on_event(0, untagged("wmA", 1, T0), 0)
    engine.on_event(0, untagged("wmB", 1, T0 + HOUR), 0)
    # the re-send is applied again (past its horizon) and remembered with its new ts
    assert engine.on_event(0, untagged("wmA", 1, T0 + HOUR), 0).outcome == TAG_REMOVED
    assert engine.on_event(0, untagged("wmA", 1, T0 + HOUR), 0).outcome == DUPLICATE


def test_an_old_entry_does_not_forget_an_id_re_applied_before_the_entry_was_walked(monkeypatch):
    monkeypatch.setattr(semantics, "INLINE_IDS", 0)          # every id under its own key
    store = MemoryStore()
    engine = ReportingEngine(store, RuleBook().rule_as_of, SHORT)
    monkeypatch.setattr(semantics, "FORGET_PER_EVENT", 0)    # nothing is forgotten for now
    engine.on_event(0, untagged("wmA", 1, T0), 0)
    engine.on_event(0, untagged("wmB", 1, T0 + HOUR), 0)
    # expired but still stored: the comparison decides, and the event is applied again
    assert store.seen_ts("ww1:wmA", "e-wmA-1") == T0
    assert engine.on_event(0, untagged("wmA", 1, T0 + HOUR), 0).outcome == TAG_REMOVED
    monkeypatch.setattr(semantics, "FORGET_PER_EVENT", 4)
    # now the old entry (ts T0) is walked: it must not forget the id's newer remembrance
    engine.on_event(0, untagged("wmC", 1, T0 + HOUR), 0)
    assert store.seen_entries.get((0, 0)) is None
    assert store.seen_ts("ww1:wmA", "e-wmA-1") == T0 + HOUR
    assert engine.on_event(0, untagged("wmA", 1, T0 + HOUR), 0).outcome == DUPLICATE


def test_a_record_from_before_issue_18_moves_its_excess_ids_to_own_keys():
    store = MemoryStore()
    engine = ReportingEngine(store, RuleBook().rule_as_of, SHORT)
    inline = {f"e-old-{n}": T0 + n for n in range(40)} | {"e-older": T0 - DAY}
    store.put_customer("ww1:wmA", CustomerState.decode(orjson.dumps(
        {"a": {}, "i": {}, "r": [], "h": [], "s": inline})))
    engine.on_event(0, untagged("wmA", 9, T0 + MIN), 0)
    record = store.customer("ww1:wmA")
    assert len(record.seen) == semantics.INLINE_IDS
    assert len(store.seen) == 40 - semantics.INLINE_IDS + 1      # the excess, and the new id
    for event_id in [*inline, "e-wmA-9"]:
        dup = TagEvent(event_id, "ww1", "wmA", "staff1", "t_gone", "remove", T0 + 2 * MIN)
        expected = TAG_REMOVED if event_id == "e-older" else DUPLICATE   # past the horizon: forgotten
        assert engine.on_event(0, dup, 0).outcome == expected, event_id
