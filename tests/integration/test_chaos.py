"""The chaos run (tests/chaos) at the size CI affords: every kind of fault at least once, on
the real broker with two workers, the sink and the local Marketing API server, against the
reference model. `make chaos` runs the full size (300,000 events, 10 worker kills).

It takes about five minutes, so it is marked `slow`: `make test-slow` runs it, and so does
CI (.ci/run), after the default suite."""
from __future__ import annotations

import pytest

from tests.chaos.harness import ChaosRun, Plan

pytestmark = pytest.mark.slow


def test_chaos_run_loses_nothing_and_sends_nothing_twice(kafka_broker, tmp_path, capsys):
    plan = Plan(events=20_000, worker_kills=3, failpoint_restarts=1, wiped_restarts=1,
                sink_kills=1, api_bursts=1, join_leave=1, broker_restarts=1)
    result = ChaosRun(plan, tmp_path).run()
    with capsys.disabled():
        print("\n" + result.summary())
    kinds = {f.kind for f in result.faults}
    assert {"worker_kill", "join_leave", "sink_kill", "api_burst", "broker_restart"} <= kinds
    assert result.expected > 1000 and result.poison > 500
    assert result.problems() == []
    assert len(result.lost) == 0 and result.accepted == result.expected
