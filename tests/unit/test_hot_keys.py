"""The hot-customer summary: a bounded Misra–Gries count that never misses a key with more
than 1/capacity of the events, and the share it reports."""
from __future__ import annotations

import logging
import random
from collections import Counter

from hypothesis import given, settings, strategies as st

from streams.observability.hot_keys import HeavyHitters, HotKeys


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 300), max_size=3_000), st.integers(2, 64))
def test_misra_gries_bounds(keys, capacity):
    summary = HeavyHitters(capacity)
    for key in keys:
        summary.add(key)
    exact = Counter(keys)
    assert len(summary.counters) <= capacity and summary.total == len(keys)
    for key, count in exact.items():
        estimate = summary.counters.get(key, 0)
        assert count - len(keys) / capacity <= estimate <= count       # under-estimate, bounded
        if count > len(keys) / capacity:
            assert key in summary.counters                             # heavy keys are never missed


def test_one_hot_customer_among_many_shows_as_its_share_and_is_logged_once_a_minute(caplog):
    now = [0.0]
    hot = HotKeys(clock=lambda: now[0])
    rng = random.Random(1)
    for i in range(20_000):
        hot.add(3, b"wwP:bot" if i % 2 else f"wwP:wm{rng.randrange(50_000)}".encode())
        hot.add(1, f"wwP:wm{rng.randrange(50_000)}".encode())
    with caplog.at_level(logging.WARNING):
        shares = hot.take()
    assert 0.48 <= shares[3] <= 0.5 and shares[1] < 0.02
    assert [r.getMessage() for r in caplog.records if "wwP:bot" in r.getMessage()] != []
    for _ in range(2000):
        hot.add(3, b"wwP:bot")
    now[0] = 30.0
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert hot.take()[3] == 1.0
    assert not caplog.records                       # within the minute: not logged again
    assert hot.take() == {}                         # taken and reset
