"""The worker's decoded-customer cache (agents.customers.ReportingState, `customer_cache`):
the engine over the RocksDB-backed state gives the core's reports with the cache off, tiny
(evicting all the time) or large, and with every partition forgotten mid-run as a
revocation does. No broker: commits are sealed but not sent."""
from __future__ import annotations

import pytest

from agents.customers import ReportingState
from streams.semantics import CustomerState, ReportingEngine, run_log
from streams.state_store import ChangeloggedStore
from tests.logs import generate_log, kafka_partition
from tests.unit.test_core_equals_model import POLICY, canonical, decoded

PARTITIONS = 4


def fold(state: ReportingState, book, events, forget_at: int | None = None) -> tuple[list, list]:
    engine = ReportingEngine(state, book.rule_as_of, POLICY)
    reports, unreportable = [], []
    for i, (partition, event) in enumerate(events):
        state.partition = partition
        result = engine.on_event(partition, event, 0)
        reports += result.reports
        unreportable += result.unreportable
        if i % 50 == 49 or i == forget_at:
            state.stage_cached()
            state.store.seal()                 # a commit: readable from the store from now on
        if i == forget_at:
            for p in range(PARTITIONS):        # as after a revocation of everything
                state.forget(p)
            assert not state.customers
    for partition in range(PARTITIONS):
        state.partition = partition
        result = engine.flush(partition, 0)
        reports += result.reports
        unreportable += result.unreportable
    return canonical(r.as_wire() for r in reports), canonical(r.as_wire() for r in unreportable)


def rocksdb_state(tmp_path, name: str, cached: int) -> ReportingState:
    return ReportingState(ChangeloggedStore(str(tmp_path / name), "unused-changelog", "unused:9092", None), cached)


@pytest.mark.parametrize("cached", [0, 3, 100_000])
def test_the_cache_never_changes_a_report(tmp_path, cached):
    partition_of = lambda key: kafka_partition(key, PARTITIONS)
    for seed in range(2):
        book, events = decoded(generate_log(seed, customers=80, events=2000), partition_of)
        core = run_log(events, book.rule_as_of, POLICY)
        expected = (canonical(r.as_wire() for r in core[0]), canonical(r.as_wire() for r in core[1]))
        assert len(expected[0]) > 50
        state = rocksdb_state(tmp_path, f"plain-{seed}", cached)
        assert fold(state, book, events) == expected
        assert len(state.customers) == min(cached, 80)
        forgetting = rocksdb_state(tmp_path, f"forget-{seed}", cached)
        assert fold(forgetting, book, events, forget_at=len(events) // 2) == expected


def test_a_cached_customer_is_the_newest_state_and_the_store_has_it_too(tmp_path):
    state = rocksdb_state(tmp_path, "db", 2)
    state.partition = 1
    a = state.customer("ww:a")
    a.seen["e1"] = 1
    state.put_customer("ww:a", a)
    assert state.customer("ww:a") is a                      # a hit: no read, no decode
    assert CustomerState.decode(state.store.get(1, b"c:ww:a")) == a
    for key in ("ww:b", "ww:c"):                            # two more: "ww:a" is the oldest, out
        state.put_customer(key, CustomerState(seen={key: 2}))
    assert list(state.customers) == [b"c:ww:b", b"c:ww:c"]
    again = state.customer("ww:a")                          # a miss: read back from the store
    assert again is not a and again == a
    state.partition = 2
    state.put_customer("ww:d", CustomerState())
    state.forget(1)
    assert list(state.customers) == [b"c:ww:d"]
