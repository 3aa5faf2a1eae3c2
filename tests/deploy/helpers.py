"""What the deploy tests share: running commands, waiting, reading a stack's topics, and the
order in which a worker applies what it reads."""
from __future__ import annotations

import heapq
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from streams.kafka.reads import partitions_of, read_to_end

REPO = Path(__file__).resolve().parents[2]


def sh(*args: str, env: dict | None = None, timeout: float = 600) -> str:
    run = subprocess.run(args, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                         timeout=timeout)
    assert run.returncode == 0, f"{' '.join(args)}: {run.stdout[-2000:]}{run.stderr[-3000:]}"
    return run.stdout


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def get(url: str) -> bytes | None:
    """The body of a 200 answer, or None (not listening, or any other status)."""
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.read()
    except OSError:
        return None


def rules_folded(port: int) -> float:
    """Rule versions the worker on `port` folded into its table (tagstream_events_total)."""
    body = get(f"http://127.0.0.1:{port}/metrics") or b""
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
               if line.startswith("tagstream_events_total{") and 'outcome="rule_applied"' in line)


def project_leftovers(project: str) -> str:
    """The containers and volumes podman-compose made for `project` that are still there."""
    containers = sh("podman", "ps", "-a", "--filter", f"label=io.podman.compose.project={project}",
                    "--format", "{{.Names}}")
    volumes = sh("podman", "volume", "ls", "--filter", f"label=io.podman.compose.project={project}",
                 "--format", "{{.Name}}")
    return (containers + volumes).strip()


async def read_topics(broker: str, prefix: str, names: list[str]) -> dict[str, list]:
    """Every committed record of the topics `prefix + name` on `broker`."""
    consumer = AIOKafkaConsumer(bootstrap_servers=broker, group_id=None, enable_auto_commit=False,
                                isolation_level="read_committed")     # the enrichment writes in transactions
    await consumer.start()
    try:
        out: dict[str, list] = {name: [] for name in names}
        for name in names:
            tps = [TopicPartition(prefix + name, p) for p in await partitions_of(consumer, prefix + name)]
            await read_to_end(consumer, tps, out[name].append)
        return out
    finally:
        await consumer.stop()


def applied_order(contacts: list, tags: list, partitions: int) -> list[dict]:
    """The events in the order the worker applies them: per partition, the two topics merged
    by `ts` (contacts first on a tie), each read in offset order. (The loads are paced, with
    event time = the wall clock: unpaced, each runs 20 minutes of event time ahead, the next
    overlaps it, a partition is not in ts order, and what the worker applies depends on
    how far it had read when the next load came: the compose test saw both outcomes.)"""
    ordered = []
    for partition in range(partitions):
        mine = lambda records: [orjson.loads(r.value) for r in records if r.partition == partition]  # noqa: E731
        ordered += heapq.merge(mine(contacts), mine(tags), key=lambda e: (e["ts"], "op" in e))
    return ordered
