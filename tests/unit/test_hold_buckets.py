"""The hold index's chunked buckets (streams/state/hold_buckets.py; issue 18): the same entries
as a plain sorted list whatever the adds, takes and commits, no stored value over CHUNK_MAX
entries, and a bulk tag of 20,000 holds in one minute written chunk by chunk, not whole."""
from __future__ import annotations

from bisect import insort

import orjson
from hypothesis import given, settings, strategies as st

from schemas.records import DEFAULT_ACTION_TYPES, TagEvent, ReportingRule
from streams.core.rulebook import RuleBook
from streams.core.semantics import HOLD_BUCKET_MS, MemoryStore, ReportingEngine, ReportingPolicy
from streams.state import hold_buckets
from streams.state.hold_buckets import ChunkedBucket
from tests.unit.test_reporting_state import rocksdb_state

KEY = b"h:0:7"
T0 = 1_763_884_800_000


def commit(bucket: ChunkedBucket, stored: dict[bytes, bytes]) -> int:
    """Apply the bucket's writes to `stored`; returns the largest value written."""
    largest = 0
    for key, value in bucket.writes():
        if value is None:
            stored.pop(key, None)
        else:
            stored[key] = value
            largest = max(largest, len(value))
    return largest


operations = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(0, 60), st.sampled_from(["ww:a", "ww:b", "ww:c"]),
              st.sampled_from(["INVALID", "LONG_TERM"])),
    st.tuples(st.just("take"), st.integers(-1, 61)),
    st.tuples(st.just("commit"))), max_size=120)


@settings(max_examples=300, deadline=None)
@given(operations)
def test_a_chunked_bucket_holds_what_a_sorted_list_holds(ops):
    original, hold_buckets.CHUNK_MAX = hold_buckets.CHUNK_MAX, 4      # splits in every example
    try:
        check_against_a_sorted_list(ops)
    finally:
        hold_buckets.CHUNK_MAX = original


def check_against_a_sorted_list(ops):
    stored: dict[bytes, bytes] = {}
    bucket = ChunkedBucket(KEY, stored.get)
    model: list = []
    for op in ops:
        if op[0] == "add":
            entry = (op[1], op[2], op[3])
            bucket.add(entry)
            insort(model, entry)
        elif op[0] == "take":
            due = bucket.take_due(op[1])
            expected = [e for e in model if e[0] <= op[1]]
            model = [e for e in model if e[0] > op[1]]
            assert sorted(due) == expected
        else:
            commit(bucket, stored)
            bucket = ChunkedBucket(KEY, stored.get)         # the next batch reads it back
        assert bool(bucket) == bool(model)
    commit(bucket, stored)
    reread = ChunkedBucket(KEY, stored.get)
    assert reread.take_due(10**9) == model
    for key, value in stored.items():
        if key != KEY:
            assert len(orjson.loads(value)) <= hold_buckets.CHUNK_MAX
    if not model:
        assert KEY not in stored and not [k for k in stored if k.startswith(KEY + b":")]


def test_a_bucket_written_as_one_list_is_read_and_rewritten_in_chunks():
    old = [[T0 + 5, "ww:b", "INVALID"], [T0 + 1, "ww:a", "LONG_TERM"]]
    stored = {KEY: orjson.dumps(old)}
    bucket = ChunkedBucket(KEY, stored.get)
    assert bucket.take_due(T0 + 1) == [(T0 + 1, "ww:a", "LONG_TERM")]
    commit(bucket, stored)
    assert isinstance(orjson.loads(stored[KEY]), dict)
    assert ChunkedBucket(KEY, stored.get).take_due(T0 + 10) == [(T0 + 5, "ww:b", "INVALID")]


def bulk_tag(store, customers: int) -> tuple[ReportingEngine, list]:
    """`customers` customers tagged INVALID within 50 s on partition 0."""
    book = RuleBook()
    book.add(ReportingRule(corp_id="ww1", tag_id="t-inv", tag_name="invalid", standard_type="INVALID",
                           account_id=1, user_action_set_id=2, effective_from=0, version=1, action_type=None))
    engine = ReportingEngine(store, book.rule_as_of, ReportingPolicy(default_action_types=dict(DEFAULT_ACTION_TYPES)))
    events = [TagEvent(f"e{n}", "ww1", f"wm{n:06d}", "s1", "t-inv", "add", T0 + n * 50_000 // customers)
              for n in range(customers)]
    return engine, events


def test_a_bulk_tag_of_20000_holds_in_one_minute_writes_bounded_values(tmp_path):
    state = rocksdb_state(tmp_path, "bulk")
    engine, events = bulk_tag(state, 20_000)
    largest, written = 0, 0
    for i, event in enumerate(events):
        engine.on_event(0, event, 0)
        if i % 500 == 499:
            state.stage_cached()
            commit = state.store.seal()
            values = [len(v) for writes in commit.values() for k, v in writes.items() if v and k.startswith(b"h:")]
            largest, written = max([largest, *values]), written + sum(values)
    assert state.store.get(0, b"h:0:%d" % ((T0 + 30 * 60_000) // HOLD_BUCKET_MS)) is not None
    assert largest < 40_000, largest                  # one chunk, not the 820 KB bucket
    assert written < 4_000_000, written               # about a chunk per commit, not the whole bucket
    # and the holds are released in deadline order, as the plain store releases them
    memory_engine, _ = bulk_tag(MemoryStore(), 20_000)
    for event in events:
        memory_engine.on_event(0, event, 0)
    later = TagEvent("late", "ww1", "wm-x", "s1", "t-other", "add", T0 + 40 * 60_000)
    result, expected_result = engine.on_event(0, later, 0), memory_engine.on_event(0, later, 0)
    released = result.reports + result.unreportable
    expected = expected_result.reports + expected_result.unreportable
    assert len(released) == 20_000
    assert [r.outer_action_id for r in released] == [r.outer_action_id for r in expected]
