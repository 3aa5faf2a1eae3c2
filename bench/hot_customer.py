"""Per-event cost for one hot customer, against a fresh customer's in the same run (issue 18).

    .venv/bin/python -m bench.hot_customer                    # make bench-hot-customer
    .venv/bin/python -m bench.hot_customer --events 100000

What runs: the worker's own state path, with nothing in between: the reporting engine over
`agents.customers.ReportingState` on a `ChangeloggedStore` (RocksDB), committed to a real
changelog topic on the local broker in batches of 500 events, as the agent commits.

One customer receives tag removes with distinct ids (a CRM sync in a loop; removes, because
they are applied and their ids remembered, where unmapped adds skip the customer since issue 24). When it has
1,000, 10,000 and `--events` of them remembered, the bench times blocks of 500 more of its
events, alternating with blocks of 500 events of customers never seen before (the baseline).
It reports microseconds per event for both, their ratio, and the largest state value written.
"""
from __future__ import annotations

import argparse
import asyncio
import subprocess
import tempfile
import time
import uuid

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from agents.customers import PRODUCER_BATCH_BYTES, ReportingState
from schemas.records import DEFAULT_ACTION_TYPES, TagEvent
from streams.core.rulebook import RuleBook
from streams.core.semantics import ReportingEngine, ReportingPolicy
from streams.state.store import ChangeloggedStore
from tests import kafka_io
from tests.integration.conftest import KAFKA_SH

BLOCK = 500
BLOCKS = 10          # of each kind, per checkpoint
T0 = 1_763_884_800_000


class Bench:
    def __init__(self, store: ChangeloggedStore):
        self.state = ReportingState(store)
        self.engine = ReportingEngine(self.state, RuleBook().rule_as_of,
                                      ReportingPolicy(default_action_types=dict(DEFAULT_ACTION_TYPES)))
        self.hot_sent = 0
        self.fresh_sent = 0
        self.largest = 0
        self.ts = T0

    def _event(self, customer: str, event_id: str) -> TagEvent:
        self.ts += 1
        return TagEvent(event_id, "wwB", customer, "s1", "t-region", "remove", self.ts)

    async def block(self, hot: bool) -> float:
        """Apply and commit one block; returns its seconds."""
        started = time.perf_counter()
        for _ in range(BLOCK):
            if hot:
                event = self._event("wm-hot", f"crm-{self.hot_sent}")
                self.hot_sent += 1
            else:
                event = self._event(f"wm-{self.fresh_sent}", "e-1")
                self.fresh_sent += 1
            self.engine.on_event(0, event, 0)
        self.state.stage_cached()
        commit = self.state.store.seal()
        self.largest = max([self.largest, *(len(v or b"") for writes in commit.values() for v in writes.values())])
        await self.state.store.make_durable(commit)
        return time.perf_counter() - started


async def run(events: int) -> None:
    topic = f"bench-hot-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_io.BOOTSTRAP)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 1, 1, topic_configs={"cleanup.policy": "compact"})])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=kafka_io.BOOTSTRAP, acks="all", enable_idempotence=True,
                                linger_ms=1, max_batch_size=PRODUCER_BATCH_BYTES,
                                max_request_size=2 * PRODUCER_BATCH_BYTES)
    await producer.start()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-hot-") as data:
            bench = Bench(ChangeloggedStore(data, topic, {"bootstrap_servers": kafka_io.BOOTSTRAP}, producer))
            print("| hot customer's remembered ids | hot µs/event | fresh µs/event | ratio |")
            print("|---:|---:|---:|---:|")
            for checkpoint in sorted({min(1_000, events), min(10_000, events), events}):
                while bench.hot_sent < checkpoint:
                    await bench.block(hot=True)
                hot = fresh = 0.0
                for _ in range(BLOCKS):
                    hot += await bench.block(hot=True)
                    fresh += await bench.block(hot=False)
                per = 1e6 / (BLOCKS * BLOCK)
                print(f"| {checkpoint:,} | {hot * per:.1f} | {fresh * per:.1f} | {hot / fresh:.2f} |", flush=True)
            bench.state.store.close()
            print(f"largest state value written: {bench.largest:,} bytes")
    finally:
        await producer.stop()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000,
                        help="the hot customer's remembered ids at the last checkpoint (default 100000)")
    args = parser.parse_args(argv)
    subprocess.run([str(KAFKA_SH), "start"], check=True, capture_output=True)
    asyncio.run(run(args.events))
    kafka_io.delete_topics_with_prefix("bench-hot-")


if __name__ == "__main__":
    main()
