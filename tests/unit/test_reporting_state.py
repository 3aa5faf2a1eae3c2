"""The worker's `StateStore` (agents.customers.ReportingState) on the RocksDB-backed store:
the engine over it gives the core's reports, also with every partition forgotten mid-run as
a revocation does; applied-offset markers are staged once per batch and read back before.
No broker: commits are sealed but not sent."""
from __future__ import annotations

from faust.types import TP

from agents.customers import ReportingState
from streams.core.semantics import ReportingEngine, run_log
from streams.state.store import ChangeloggedStore
from tests.logs import generate_log, kafka_partition
from tests.unit.test_core_equals_model import POLICY, canonical, decoded

PARTITIONS = 4


def rocksdb_state(tmp_path, name: str) -> ReportingState:
    return ReportingState(ChangeloggedStore(str(tmp_path / name), "unused-changelog", {"bootstrap_servers": "unused:9092"}, None))


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
    for partition in range(PARTITIONS):
        state.partition = partition
        result = engine.flush(partition, 0)
        reports += result.reports
        unreportable += result.unreportable
    return canonical(r.as_wire() for r in reports), canonical(r.as_wire() for r in unreportable)


def test_the_engine_over_the_rocksdb_state_gives_the_cores_reports(tmp_path):
    partition_of = lambda key: kafka_partition(key, PARTITIONS)
    for seed in range(2):
        book, events = decoded(generate_log(seed, customers=80, events=2000), partition_of)
        core = run_log(events, book.rule_as_of, POLICY)
        expected = (canonical(r.as_wire() for r in core[0]), canonical(r.as_wire() for r in core[1]))
        assert len(expected[0]) > 50
        assert fold(rocksdb_state(tmp_path, f"plain-{seed}"), book, events) == expected
        assert fold(rocksdb_state(tmp_path, f"forget-{seed}"), book, events, forget_at=len(events) // 2) == expected


def test_applied_offsets_are_staged_once_per_batch_and_read_back_before(tmp_path):
    state = rocksdb_state(tmp_path, "db")
    tp = TP("tag-events", 2)
    for offset in range(10, 20):
        state.mark_applied(tp, offset)
    assert state.store.staged == {}                         # nothing staged per event
    assert state.applied_offset(tp) == 19                   # but read back at once
    state.stage_cached()
    assert state.store.staged == {2: {b"o:tag-events:2": b"19"}}
    assert state.applied_offset(tp) == 19                   # now from the staged writes
