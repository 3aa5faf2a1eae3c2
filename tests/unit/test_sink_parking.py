"""The pure parts of the sink's non-blocking retries (streams/sinks/parking.py): what the
delivered record says about a parked report, which retry copy is live, the envelope a copy
carries, and when a stuck account gets a request."""
from __future__ import annotations

import pytest

from streams.sinks.parking import (
    ACKED, FAILED, SENDING, AccountBreaker, Parked, RetryEnvelope, is_live_copy, parse_state)


@pytest.mark.parametrize("state", [ACKED, SENDING, FAILED, Parked(0, 1763884800123), Parked(42, 7, retrying=True)])
def test_every_state_reads_back_as_written(state):
    assert parse_state(state.value() if isinstance(state, Parked) else state) == state


@pytest.mark.parametrize("value", [None, b"", b"ACKED", b"acked ", b"parked", b"parked:x:1", b"retrying:1",
                                   b"parked:1:2:3", b"\xff"])
def test_an_unknown_value_is_never_taken_for_acknowledged_or_parked(value):
    # nothing recorded: the main path sends the report; no retry copy is live for it
    assert parse_state(value) is None


def test_only_the_copy_the_record_names_is_live():
    named = Parked(17, 1000)
    assert is_live_copy(named, 17)
    assert is_live_copy(Parked(17, 1000, retrying=True), 17)      # in doubt: sent again
    assert not is_live_copy(named, 16)             # an earlier copy, written before a crash
    assert not is_live_copy(named, 18)
    for settled in (ACKED, FAILED, SENDING, None):   # settled since, or the main path holds it
        assert not is_live_copy(settled, 17)


def test_the_envelope_survives_kafka_headers():
    envelope = RetryEnvelope(3, 1_700_000_010_000, 1_700_000_000_000, "tagstream.conversion-reports/3@1842")
    headers = envelope.headers()
    assert all(isinstance(k, str) and isinstance(v, bytes) for k, v in headers)     # as aiokafka sends them
    assert RetryEnvelope.from_headers(tuple(headers), record_timestamp=5) == envelope


def test_a_record_without_the_envelope_is_due_at_once_as_a_first_attempt():
    envelope = RetryEnvelope.from_headers((("tagstream.attempt", b"two"),), record_timestamp=1234)
    assert (envelope.attempt, envelope.not_before, envelope.first_ts) == (1, 0, 1234)
    assert RetryEnvelope.from_headers(None, record_timestamp=9).first_ts == 9


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_stuck_account_costs_one_budget_then_one_probe_per_interval():
    clock = Clock()
    breaker = AccountBreaker(probe_interval_s=10, clock=clock)
    assert not breaker.is_open(7) and breaker.may_probe(7)          # unknown: sent at once
    assert breaker.trip(7) is True and breaker.trip(7) is False     # a budget ran out
    assert breaker.is_open(7) and len(breaker) == 1
    assert not breaker.is_open(8) and breaker.may_probe(8)         # other accounts unaffected
    clock.now += 9.9
    assert not breaker.may_probe(7)                                 # its copies are parked again
    clock.now += 0.2
    assert breaker.may_probe(7)                                     # the probe is due: taken ...
    assert not breaker.may_probe(7)                                 # ... once
    breaker.refused(7)                                              # refused again
    clock.now += 5
    assert not breaker.may_probe(7) and breaker.is_open(7)
    assert breaker.answered(7) is True                              # healed
    assert not breaker.is_open(7) and breaker.may_probe(7) and breaker.answered(7) is False


def test_a_refusal_on_retry_spaces_the_retries_but_does_not_divert_the_account():
    clock = Clock()
    breaker = AccountBreaker(probe_interval_s=10, clock=clock)
    breaker.refused(3)                  # one retry copy got a 5xx: a flaky moment, not a stuck account
    assert not breaker.is_open(3)       # its fresh reports still go straight to the API
    assert not breaker.may_probe(3)
    clock.now += 10
    assert breaker.may_probe(3)
    breaker.trip(4)
    breaker.clear()                     # a rebalance
    assert not breaker.is_open(4) and breaker.may_probe(4) and len(breaker) == 0
