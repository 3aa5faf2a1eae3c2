"""The property at the heart of tagstream: the pure core (streams.core.semantics) gives exactly
the reports of the independent reference model (tests/reference_model.py) on any event log.

Logs come from hypothesis (tests/strategies.py): interleaved customers, rule versions,
removes before and after deadlines, orders inside and outside the window, missing contacts
and duplicate event ids. At least 500 examples run in CI.
"""
from __future__ import annotations

import orjson
from hypothesis import HealthCheck, given, settings

from schemas.records import DEFAULT_ACTION_TYPES
from schemas.validation import RuleTombstone, decode_contact_event, decode_reporting_rule, decode_tag_event
from streams.core.rulebook import RuleBook
from streams.core.semantics import MemoryStore, ReportingEngine, ReportingPolicy, run_log
from tests.logs import generate_log, kafka_partition
from tests.reference_model import reference_reports
from tests.strategies import crc_partition, event_logs

POLICY = ReportingPolicy(default_action_types=dict(DEFAULT_ACTION_TYPES))


def decoded(log: dict, partition_of) -> tuple[RuleBook, list]:
    """The log's rule book and its (partition, event) list, decoded exactly as the worker does."""
    book = RuleBook()
    for key, value in log["rules"]:
        rule = decode_reporting_rule(key.encode(), None if value is None else orjson.dumps(value))
        if isinstance(rule, RuleTombstone):
            book.delete(rule.corp_id, rule.tag_id)
        else:
            book.add(rule)
    events = []
    for body in log["events"]:
        key = f"{body['corp_id']}:{body['external_userid']}"
        decode = decode_tag_event if "op" in body else decode_contact_event
        events.append((partition_of(key), decode(key.encode(), orjson.dumps(body))))
    return book, events


def core_reports(log: dict, partition_of) -> tuple[list[bytes], list[bytes]]:
    """Fold the decoded log through the core."""
    book, events = decoded(log, partition_of)
    reports, unreportable = run_log(events, book.rule_as_of, POLICY)
    return canonical(r.as_wire() for r in reports), canonical(r.as_wire() for r in unreportable)


def canonical(reports) -> list[bytes]:
    """Reports as sorted canonical JSON, without the one field allowed to differ."""
    return sorted(orjson.dumps({k: v for k, v in r.items() if k != "emitted_at"}, option=orjson.OPT_SORT_KEYS)
                  for r in reports)


def model_reports(log: dict, partition_of) -> tuple[list[bytes], list[bytes]]:
    reports, unreportable = reference_reports(log["rules"], log["events"], partition_of=partition_of)
    return canonical(reports), canonical(unreportable)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event_logs())
def test_core_equals_reference_model_on_generated_logs(log):
    assert core_reports(log, crc_partition) == model_reports(log, crc_partition)


def test_core_equals_reference_model_on_long_seeded_logs():
    """Longer logs than hypothesis makes: weeks of traffic, 2,000 events each."""
    partition_of = lambda key: kafka_partition(key, 4)
    for seed in range(5):
        log = generate_log(seed, customers=80, events=2000)
        core, model = core_reports(log, partition_of), model_reports(log, partition_of)
        assert core == model
        assert len(core[0]) > 50 and len(core[1]) > 10


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event_logs())
def test_each_partitions_held_count_is_the_number_of_running_holds(log):
    """`PartitionClock.held` (the tagstream_held_reports gauge) never drifts from the holds
    the customers of that partition actually have, after every step and after the flush."""
    book, events = decoded(log, crc_partition)
    store = MemoryStore()
    engine = ReportingEngine(store, book.rule_as_of, POLICY)

    def running_holds() -> dict[int, int]:
        counts: dict[int, int] = {}
        for key, state in store.customers.items():
            counts[crc_partition(key)] = counts.get(crc_partition(key), 0) + len(state.holds)
        return counts

    def held() -> dict[int, int]:
        return {p: c.held for p, c in store.clocks.items()}

    for partition, event in events:
        engine.on_event(partition, event, 0)
        assert {p: n for p, n in held().items() if n} == {p: n for p, n in running_holds().items() if n}
    for partition in {p for p, _ in events}:
        engine.flush(partition, 0)
    assert all(n == 0 for n in held().values()) and all(n == 0 for n in running_holds().values())
