"""/healthz, the probe of every pod (deploy/helm): healthy only while the event loop beats.
A process whose loop is stuck still answers /metrics from the server's thread, so the
liveness probe must ask something the loop itself keeps fresh."""
from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request

from streams.observability import metrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_healthz_is_503_until_the_first_beat_200_while_beating_and_503_once_stale():
    port = _free_port()
    metrics.HEALTH.last_beat = None
    metrics.serve(port, "127.0.0.1", stale_after=0.3)
    status, body = _get(port, "/healthz")
    assert (status, body) == (503, "starting: the event loop has not beaten yet\n")
    metrics.beat()
    assert _get(port, "/healthz") == (200, "ok\n")
    time.sleep(0.5)
    status, body = _get(port, "/healthz")
    assert status == 503 and body.startswith("stuck: the event loop last beat"), body
    metrics.beat()
    assert _get(port, "/healthz")[0] == 200
    # /metrics is served beside it, in the exposition format
    status, body = _get(port, "/metrics")
    assert status == 200 and "# TYPE tagstream_events_total counter" in body


def test_port_zero_serves_nothing():
    servers = lambda: sum(1 for t in threading.enumerate() if t.name == "tagstream-metrics")
    before, stale_after = servers(), metrics.HEALTH.stale_after
    metrics.serve(0, "127.0.0.1", stale_after=99.0)
    assert servers() == before and metrics.HEALTH.stale_after == stale_after
