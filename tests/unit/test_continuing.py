"""`faust_consumer.continuing`: the batching consumer hands each partition's records over as
one contiguous sequence, although batches are dropped on the way (issue 16: after an
assignment Faust resumed the partitions before its seek, a batch was dropped, and the
records after it were handed over as if nothing was missing)."""
from __future__ import annotations

import bisect
import random
from collections import namedtuple

from hypothesis import given, settings, strategies as st

from streams.kafka.faust_consumer import continuing

Record = namedtuple("Record", "offset")
TP = ("tag-events", 0)


def batch(*offsets):
    return [Record(o) for o in offsets]


def test_a_batch_that_continues_is_handed_over():
    handed, seek_back, refetching = continuing({TP: batch(5, 6, 7)}, {TP: 5}, frozenset())
    assert [r.offset for r in handed[TP]] == [5, 6, 7] and seek_back == {} and refetching == frozenset()


def test_a_batch_after_dropped_records_is_not_handed_over_and_the_partition_is_sought_back():
    # the chaos run's case: 3892-3987 dropped before the seek, then 3988- fetched
    handed, seek_back, refetching = continuing({TP: batch(3988, 3989)}, {TP: 3892}, frozenset())
    assert handed == {} and seek_back == {TP: 3892} and refetching == {TP}


def test_right_after_the_seek_back_a_later_start_is_a_gap_in_the_log():
    # transaction markers or compaction: the fetch from 10 starts at 11
    handed, seek_back, refetching = continuing({TP: batch(11, 12)}, {TP: 10}, frozenset({TP}))
    assert [r.offset for r in handed[TP]] == [11, 12] and seek_back == {} and refetching == frozenset()


def test_records_before_the_next_offset_are_cut_off():
    handed, _, _ = continuing({TP: batch(3, 4, 5, 6)}, {TP: 5}, frozenset())
    assert [r.offset for r in handed[TP]] == [5, 6]
    handed, seek_back, _ = continuing({TP: batch(3, 4)}, {TP: 5}, frozenset())
    assert handed == {} and seek_back == {}


def test_a_partition_not_positioned_in_this_generation_is_dropped():
    handed, seek_back, _ = continuing({TP: batch(0, 1)}, {}, frozenset())
    assert handed == {} and seek_back == {}


def hand_over_everything(batches, next_offsets, refetching):
    """The consumer before the fix: every batch that reached it went to the handler."""
    return dict(batches), {}, refetching


def simulate(seed: int, drop_share: float, gap_share: float, seen_drops: bool,
             decide=continuing) -> tuple[list, list]:
    """A simulated fetcher over a growing log with gaps (transaction markers). Each fetch
    returns up to k records from the position and moves it, like aiokafka; a share of the
    batches is dropped before `continuing` sees them, like Faust does around a rebalance.
    With `seen_drops`, the consumer seeks a dropped batch's partition back (the drops in
    `BatchingConsumer`'s own hands); without, nothing does (a drop nobody saw)."""
    rng = random.Random(seed)
    log: list[int] = []
    position, next_offsets, refetching, received = 0, {TP: 0}, frozenset(), []
    for step in range(3_000):
        if step < 2_000 and rng.random() < 0.3:       # records arrive while the worker runs
            log += [o for o in range(log[-1] + 1 if log else 0, (log[-1] if log else 0) + 4)
                    if rng.random() >= gap_share] or [(log[-1] if log else -1) + 1]
        start = bisect.bisect_left(log, position)
        records = [Record(o) for o in log[start:start + rng.randint(1, 12)]]
        if not records:
            continue
        position = records[-1].offset + 1
        if rng.random() < drop_share:
            refetching -= {TP}
            if seen_drops:
                position, refetching = next_offsets[TP], refetching | {TP}
            continue
        handed, seek_back, refetching = decide({TP: records}, next_offsets, refetching)
        if TP in seek_back:
            position = seek_back[TP]
        if TP in handed:
            received += [r.offset for r in handed[TP]]
            next_offsets[TP] = handed[TP][-1].offset + 1
    return log, received


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), drop_share=st.floats(0, 0.6), gap_share=st.floats(0, 0.3))
def test_every_record_reaches_the_handler_once_in_order_however_batches_are_dropped(seed, drop_share, gap_share):
    log, received = simulate(seed, drop_share, gap_share, seen_drops=True)
    assert received == log


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), drop_share=st.floats(0, 0.6), gap_share=st.floats(0, 0.3))
def test_a_drop_nobody_saw_never_skips_a_record_and_the_next_records_repair_it(seed, drop_share, gap_share):
    """Without the seek, a dropped batch at the end of the log waits for the next record
    (whose batch starts past it); what reaches the handler is still the log's prefix."""
    log, received = simulate(seed, drop_share, gap_share, seen_drops=False)
    assert received == log[:len(received)]


def test_the_simulation_catches_the_consumer_before_the_fix():
    log, received = simulate(seed=7, drop_share=0.2, gap_share=0.1, seen_drops=False, decide=hand_over_everything)
    assert received != log[:len(received)]
