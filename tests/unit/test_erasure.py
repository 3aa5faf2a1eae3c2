"""Erasing a corp from the worker's state (streams/core/erasure.py), on the RocksDB-backed
state the worker uses, without a broker: two corps share the partitions, one is erased
mid-log, and then

- no key or value of any partition's database carries the erased corp's id (its customers,
  remembered ids under own keys, remembered-id queue entries, hold-index entries);
- the partitions' held counts equal the holds left in the customers' records;
- the other corp's reports over the whole log equal the core's over a log in which the
  erased corp's later events never came (they are refused, so they move nothing);
- the erasure-requests fold keeps the newest request per corp and forgets a reinstated one.
"""
from __future__ import annotations

import orjson

from agents.customers import ReportingState
from streams.core.erasure import (audit_record, erase_partition_state, fold_requests, reinstated_record,
                                  request_record)
from streams.core.semantics import CustomerState, ReportingEngine, run_log
from streams.state.store import ChangeloggedStore
from tests.logs import generate_log, kafka_partition
from tests.unit.test_core_equals_model import POLICY, canonical, decoded

PARTITIONS = 3
ERASED, KEPT = "wwGone", "wwStay"


def settle(state: ReportingState) -> None:
    """A commit applied to RocksDB as the worker's would be once the changelog acked it."""
    state.stage_cached()
    state.store.seal()
    while state.store.in_flight:
        commit = state.store.in_flight.popleft()
        for partition, writes in commit.items():
            state.store._write_local(partition, writes.items(), 0)


def two_corps(seed: int) -> dict:
    gone = generate_log(seed, customers=12, events=1500, corp=ERASED)
    stay = generate_log(seed + 100, customers=12, events=1500, corp=KEPT)
    events = sorted(gone["events"] + stay["events"], key=lambda e: e["ts"])   # stable: ties keep their order
    return {"rules": gone["rules"] + stay["rules"], "events": events}


def holds_of(state: ReportingState, corp: str) -> bool:
    settle(state)
    return any(corp.encode() in value for p in range(PARTITIONS) for _, value in state.store.scan(p, b"h:"))


def all_items(store: ChangeloggedStore):
    for partition in range(PARTITIONS):
        yield from ((partition, key, value) for key, value in store.scan(partition, b""))


def test_an_erased_corp_leaves_nothing_in_the_state_and_the_other_corp_reports_as_if_it_never_came(tmp_path):
    partition_of = lambda key: kafka_partition(key, PARTITIONS)
    for seed in range(2):
        log = two_corps(seed)
        book, events = decoded(log, partition_of)
        state = ReportingState(ChangeloggedStore(str(tmp_path / f"db-{seed}"), "unused", {}, None))
        engine = ReportingEngine(state, book.rule_as_of, POLICY)
        reports = []
        for cut, (partition, event) in enumerate(events, start=1):
            state.partition = partition
            reports += engine.on_event(partition, event, 0).reports
            if cut % 100 == 0:
                settle(state)
            if cut >= len(events) // 2 and holds_of(state, ERASED):
                break                           # erased while it has holds running
        settle(state)
        reports_at_cut = len(reports)
        before = list(all_items(state.store))
        assert [1 for _, key, _ in before if key.startswith(b"e:") and ERASED.encode() in key], "no own-key ids"
        assert [1 for _, key, value in before if key.startswith(b"h:") and ERASED.encode() in value], "no holds"

        dropped = 0
        for partition in range(PARTITIONS):
            erasure = erase_partition_state(lambda prefix: state.store.scan(partition, prefix), partition, {ERASED})
            for key, value in erasure.writes:
                state.store.stage(partition, key, value)
            clock = state.clock(partition)
            clock.held -= erasure.holds_dropped
            state.put_clock(partition, clock)
            dropped += erasure.holds_dropped
            assert set(erasure.keys) <= {ERASED}
        settle(state)

        after = list(all_items(state.store))
        assert not [(p, k) for p, k, v in after if ERASED.encode() in k or ERASED.encode() in v]
        assert len(after) < len(before) and [1 for _, k, _ in after if k.startswith(b"c:" + KEPT.encode())]
        assert dropped > 0
        for partition in range(PARTITIONS):
            held = sum(len(CustomerState.decode(v).holds) for k, v in state.store.scan(partition, b"c:"))
            assert state.clock(partition).held == held

        for i, (partition, event) in enumerate(events[cut:]):
            if event.corp_id == ERASED:
                continue                        # refused by the worker
            state.partition = partition
            reports += engine.on_event(partition, event, 0).reports
            if i % 100 == 99:
                settle(state)
        for partition in range(PARTITIONS):
            state.partition = partition
            reports += engine.flush(partition, 0).reports
        never_came = [(p, e) for i, (p, e) in enumerate(events) if i < cut or e.corp_id != ERASED]
        expected = run_log(never_came, book.rule_as_of, POLICY)[0]
        assert len([r for r in expected if r.corp_id == KEPT]) > 20
        assert canonical(r.as_wire() for r in reports if r.corp_id == KEPT) == \
            canonical(r.as_wire() for r in expected if r.corp_id == KEPT)
        # the erased corp reported only before the cut
        assert not [r for r in reports[reports_at_cut:] if r.corp_id == ERASED]


def test_the_requests_fold_keeps_the_newest_request_and_forgets_a_reinstated_corp():
    erased: dict[str, int] = {}
    assert fold_requests(erased, request_record("wwA", 10))
    assert not fold_requests(erased, request_record("wwA", 10))          # the same request again
    assert not fold_requests(erased, audit_record("wwA", 11, "worker", "t", 0, 3))
    assert not fold_requests(erased, b"not json") and not fold_requests(erased, None)
    assert fold_requests(erased, request_record("wwB", 12)) and erased == {"wwA": 10, "wwB": 12}
    assert fold_requests(erased, reinstated_record("wwA", 20)) and erased == {"wwB": 12}
    assert fold_requests(erased, request_record("wwA", 30)) and erased == {"wwA": 30, "wwB": 12}
    assert orjson.loads(audit_record("wwA", 11, "worker", "t", 0, 3))["keys_erased"] == 3
