"""The chaos run: the whole system on the real broker, with faults, against the reference model.

    .venv/bin/python -m tests.chaos                       # full size (make chaos)
    .venv/bin/python -m tests.chaos --events 20000 --worker-kills 3   # what CI runs

What runs: the local Kafka broker, two `tagstream worker`s (a third joins and leaves), a
`tagstream sink --target api`, and the local Marketing API server (tests/marketing_api_server.py).

1. **Log.** `tests/logs.generate_log` (every rule of SPEC §4: rule versions, removes around
   hold deadlines, the order window, customers without identity, retried event ids), shifted
   so that it ends a day ago, plus 5% poison (`tests/chaos/poison.py`: every dead-letter class,
   random bytes, deep nesting, huge strings, wrong types, invalid UTF-8, no key).
   - The first `1 - live_share` of it goes onto the topics before a worker starts (a
     backlog: a fresh group catching up).
   - The rest arrives while the workers run (`live_share`, default half), paced over the
     fault schedule and written as the real sources write (tests/live.py): in log order, a
     record for the other event topic only once everything before it is acknowledged. So
     workers at the head of their topics see contact and tag events arriving milliseconds
     apart, through every fault (issue 16: the merge's live race).
   Either way the workers' event-time merge must reproduce the log order, which is what
   the reference model applies.
   - A hot customer (issue 18: a CRM sync tagging one customer in a loop) sends `hot_events`
     tag removes with distinct ids (applied and remembered: an unmapped add would skip the
     customer, issue 24), a few of them re-sent, spread over the live part.
     They are in the log the model applies, so their dedupe is checked like any other
     event's, and the verdict reports the real-time latency (from the live write of the
     tagging event to the API's acceptance) on the hot customer's partition beside the
     others'. The model has no wall clock, so the workers run with the
   wall-clock hold flush (`idle_grace`) out of reach until the log is drained; then both are
   restarted with the default, which releases the holds still open, as the model's final
   flush does.
2. **Pace.** A Kafka client quota (`consumer_byte_rate` on the workers' client id, set with
   the broker's own ConfigCommand) slows the workers' fetches so that the backlog lasts
   through the faults. Restores read the changelog under another client id, unthrottled.
3. **Faults**, in a seeded random order, one at a time, each followed by a wait for recovery:
   SIGKILL of a worker at a random moment (some restarts arm a failpoint, so the worker also
   dies inside its commit path; some restart on a wiped data directory), a third worker
   joining and then leaving, the sink SIGKILLed and restarted, the broker stopped and
   started, and bursts of API failures (retryable answers, dropped connections, slow answers).
   Recovery time is from the fault until every input partition that had work has committed
   progress again (worker and broker faults), or until the API accepts actions again (sink
   and API faults).
4. **Verdict.** With the quota lifted and everything drained: the actions the API server
   accepted equal the reference model's reports (ids, action type, action time), none was
   lost or extra, duplicate deliveries are counted, the unreportable topic holds the
   model's unreportable reports, and every poison record has its dead letter with the
   expected reason.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import orjson
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from streams.observability.observe import total
from streams.settings import Settings
from tests import kafka_io
from tests.chaos.poison import Poison, poison_records
from tests.integration.conftest import KAFKA_SH, Pipeline, SinkProcess, WorkerProcess, free_port
from tests.live import LiveWriter
from agents.customers import PROBE_TIMEOUT_MS
from tests.logs import DAY, generate_log, kafka_partition
from tests.marketing_api_server import Faults, MarketingApiServer, ServerThread
from tests.reference_model import reference_reports

#: The workers' `idle_grace` until the log is drained: a century, so the wall-clock hold flush
#: (which the reference model does not have) cannot fire on a partition that idles between
#: live records of a log that ended a day ago.
NO_WALL_CLOCK_FLUSH_MS = 100 * 365 * DAY
PROBE_TIMEOUT_S = PROBE_TIMEOUT_MS / 1000
FAILPOINT_STEPS = ("reports-acked", "changelog-sent", "changelog-acked", "state-durable")
TOKEN = "chaos-token-7d1e"


@dataclass
class Plan:
    events: int = 300_000
    poison_share: float = 0.05
    live_share: float = 0.5                       # of the log, written while the workers run
    worker_kills: int = 10
    failpoint_restarts: int = 3        # of the kill restarts, how many arm a failpoint
    wiped_restarts: int = 2            # of the kill restarts, how many start on an empty data dir
    join_leave: int = 1
    sink_kills: int = 2
    api_bursts: int = 3
    broker_restarts: int = 1
    hot_events: int = 50_000                      # one customer's tag adds, in the live part
    cluster: bool = False                         # on the secured three-broker cluster
    seed: int = 1
    partitions: int = 4
    gap_s: tuple[float, float] = (2.0, 6.0)       # random pause before each fault
    burst_s: float = 6.0
    recovery_timeout_s: float = 240.0
    seconds_per_fault: float = 16.0               # to size the quota: the backlog outlasts the faults

    def faults(self) -> list[str]:
        """The fault kinds in a seeded order, the broker restart in the middle."""
        kinds = (["worker_kill"] * self.worker_kills + ["join_leave"] * self.join_leave
                 + ["sink_kill"] * self.sink_kills + ["api_burst"] * self.api_bursts)
        random.Random(self.seed).shuffle(kinds)
        broker = (["leader_kill", "controller_kill", "rolling_restart"] if self.cluster
                  else ["broker_restart"] * self.broker_restarts)
        for n, kind in enumerate(broker):
            kinds.insert(len(kinds) * (n + 1) // (len(broker) + 1) + n, kind)
        return kinds


@dataclass
class Fault:
    kind: str
    at_s: float                   # since the first worker started
    detail: str = ""
    recovery_s: Optional[float] = None     # None: did not recover in time

    def recovery_text(self) -> str:
        return f"recovered in {self.recovery_s:.1f} s" if self.recovery_s is not None else "NOT RECOVERED"


@dataclass
class Result:
    events: int = 0
    poison: int = 0
    live_records: int = 0                 # written while the workers ran
    live_error: str = ""
    faults: list[Fault] = field(default_factory=list)
    expected: int = 0
    accepted: int = 0
    lost: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    wrong_content: list[str] = field(default_factory=list)
    duplicate_deliveries: int = 0
    in_doubt_resent: int = 0
    unreportable_expected: int = 0
    unreportable_missing: list[str] = field(default_factory=list)
    unreportable_extra: list[str] = field(default_factory=list)
    dead_letters: int = 0                 # records on the topic (a crash may repeat one)
    poison_missing: list[str] = field(default_factory=list)
    poison_wrong_reason: list[str] = field(default_factory=list)
    unexpected_dead_letters: int = 0
    unexpected_exits: list[str] = field(default_factory=list)
    forced_merge_releases: int = 0        # outside broker outages: each one is a problem
    forced_in_outages: int = 0            # while the broker was down (merge_wait's purpose)
    details: list[str] = field(default_factory=list)    # what the first differences look like
    poison_shapes: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    hot_events: int = 0
    hot_partition: Optional[int] = None
    #: partition -> real-time latencies (s) of reports whose tagging event was written live
    latency: dict[int, list[float]] = field(default_factory=dict)

    def latency_quantiles(self) -> dict[int, tuple[float, float]]:
        """partition -> (p50, p99) of its real-time latencies."""
        out = {}
        for partition, values in self.latency.items():
            values = sorted(values)
            out[partition] = values[len(values) // 2], values[min(len(values) - 1, int(len(values) * 0.99))]
        return out

    def hot_partition_slowed(self) -> Optional[str]:
        """The hot customer's partition is slower than the run's usual bounds: its p50 or p99
        over 1.5× the slowest other partition's, plus 2 s (faults hit partitions unevenly)."""
        quantiles = self.latency_quantiles()
        hot = quantiles.get(self.hot_partition)
        others = [q for p, q in quantiles.items() if p != self.hot_partition]
        if hot is None or not others:
            return None if not self.hot_events else "no real-time reports to measure the hot partition by"
        for i, name in ((0, "p50"), (1, "p99")):
            bound = 1.5 * max(q[i] for q in others) + 2
            if hot[i] > bound:
                return f"the hot customer's partition has real-time {name} {hot[i]:.1f} s, over {bound:.1f} s"
        return None

    def latency_lines(self) -> list[str]:
        out = []
        for partition, (p50, p99) in sorted(self.latency_quantiles().items()):
            values = self.latency[partition]
            hot = "  <- the hot customer's partition" if partition == self.hot_partition else ""
            out.append(f"  partition {partition}: {len(values):,} real-time reports, p50 {p50:.1f} s, "
                       f"p99 {p99:.1f} s{hot}")
        return out

    def problems(self) -> list[str]:
        checks = [
            (self.lost, "reports lost"), (self.extra, "reports the model does not have"),
            (self.wrong_content, "accepted actions that differ from the model's"),
            (self.unreportable_missing, "unreportable reports missing"),
            (self.unreportable_extra, "unreportable reports the model does not have"),
            (self.poison_missing, "poison records without a dead letter"),
            (self.poison_wrong_reason, "dead letters with the wrong reason"),
            (self.unexpected_exits, "processes that exited by themselves"),
        ]
        out = [f"{len(items)} {what}: {items[:5]}" for items, what in checks if items]
        if self.live_error:
            out.append(f"the live writer failed: {self.live_error}")
        if self.duplicate_deliveries > self.in_doubt_resent:
            out.append(f"{self.duplicate_deliveries} duplicate deliveries, more than the "
                       f"{self.in_doubt_resent} in-doubt resends")
        if self.forced_merge_releases:
            out.append(f"{self.forced_merge_releases} merge releases forced out of ts order")
        if self.unexpected_dead_letters:
            out.append(f"{self.unexpected_dead_letters} dead letters for valid records")
        slowed = self.hot_partition_slowed()
        if slowed:
            out.append(slowed)
        out += [f"{f.kind} at {f.at_s:.0f}s ({f.detail}) did not recover" for f in self.faults if f.recovery_s is None]
        return out

    def summary(self) -> str:
        kinds = Counter(f.kind for f in self.faults)
        recovered = [f for f in self.faults if f.recovery_s is not None]
        worst = max(recovered, key=lambda f: f.recovery_s, default=None)
        lines = [
            f"chaos run: {self.events:,} events + {self.poison:,} poison records, {self.seconds:.0f} s; "
            f"{self.live_records:,} of the records written while the workers ran",
            f"faults injected: {len(self.faults)} ({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))})",
            f"reports expected (reference model): {self.expected:,}",
            f"accepted by the API: {self.accepted:,}",
            f"duplicates accepted: 0 by construction of the server; duplicate deliveries: {self.duplicate_deliveries} "
            f"(in-doubt resends after a sink kill: {self.in_doubt_resent})",
            f"lost: {len(self.lost)}   extra: {len(self.extra)}   differing: {len(self.wrong_content)}",
            f"unreportable: {self.unreportable_expected:,} expected, {len(self.unreportable_missing)} missing, "
            f"{len(self.unreportable_extra)} extra",
            f"dead letters: {self.dead_letters:,} records for {self.poison:,} poison ({len(self.poison_missing)} "
            f"missing, {len(self.poison_wrong_reason)} wrong reason, {self.unexpected_dead_letters} unexpected)",
            f"poison shapes: {', '.join(f'{k} {n}' for k, n in sorted(self.poison_shapes.items()))}",
            f"hot customer: {self.hot_events:,} events on partition {self.hot_partition}; real-time latency "
            f"from live write to acceptance (throttled workers, faults included):",
            *self.latency_lines(),
            "recovery times:",
            *(f"  {f.at_s:6.0f}s  {f.kind:15} {f.detail:38} "
              f"{'NOT RECOVERED' if f.recovery_s is None else f'{f.recovery_s:5.1f} s'}"
              for f in sorted(self.faults, key=lambda f: f.at_s)),
            f"worst recovery: {worst.recovery_s:.1f} s ({worst.kind}, {worst.detail})" if worst else "worst recovery: n/a",
        ]
        lines.append(f"merge releases forced out of ts order: {self.forced_merge_releases} "
                     f"(and {self.forced_in_outages} while the broker was down)")
        problems = self.problems()
        lines += [f"  {d}" for d in self.details[:20]]
        lines.append("verdict: " + ("PASS" if not problems else "FAIL\n  " + "\n  ".join(problems)))
        return "\n".join(lines)


# -- the broker ------------------------------------------------------------------------------

def _kafka(*args: str, cluster: bool = False) -> str:
    """Run kafka.sh (the one broker) or cluster.sh (the secured cluster); returns its output."""
    script = kafka_io.CLUSTER_SH if cluster else KAFKA_SH
    return subprocess.run([str(script), *args], check=True, capture_output=True, text=True).stdout


def cluster_overrides() -> dict[str, str]:
    """Settings that connect to the secured cluster (started if it is not running)."""
    _kafka("start", cluster=True)
    env = _kafka("env", cluster=True)
    return {name.removeprefix("TAGSTREAM_").lower(): value
            for name, value in (line.split("=", 1) for line in env.splitlines() if "=" in line)}


async def _leaders(connection: dict, topics: list[str]) -> Counter:
    """How many partitions of `topics` each broker leads."""
    admin = AIOKafkaAdminClient(**connection, request_timeout_ms=10_000)
    await admin.start()
    try:
        return Counter(p["leader"] for t in await admin.describe_topics(topics) for p in t["partitions"])
    finally:
        await admin.close()


async def _produce(records: list[tuple[str, Optional[bytes], Optional[bytes], Optional[int]]],
                   connection: dict) -> list:
    """Send in order, acks=all; returns each record's RecordMetadata."""
    producer = AIOKafkaProducer(**connection, acks="all", enable_idempotence=True,
                                max_request_size=4 * 1024 * 1024, linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, key=key, value=value, timestamp_ms=ts)
                   for topic, key, value, ts in records]
        return list(await asyncio.gather(*futures))
    finally:
        await producer.stop()


# -- the run ---------------------------------------------------------------------------------

class ChaosRun:
    def __init__(self, plan: Plan, work: Path, out=sys.stdout, keep_topics: bool = False):
        self.plan = plan
        self.keep_topics = keep_topics
        self.forced: dict[int, float] = {}     # worker pid -> merge releases it forced (last scrape)
        self.outage_forced = 0.0               # of those, forced while the broker was down
        self.last_scrape = 0.0
        self.work = work
        self.out = out
        self.rng = random.Random(plan.seed)
        self.pipeline = Pipeline(work, partitions=plan.partitions, **(cluster_overrides() if plan.cluster else {}))
        self.settings = self.pipeline.settings
        self.connection = self.pipeline.connection
        self.slots: list[WorkerProcess] = []
        self.armed: dict[int, str] = {}        # slot -> failpoint it was started with
        self.result = Result()
        self.written_at: dict[str, float] = {}   # event_id -> wall-clock seconds of its live write
        self.started = 0.0
        self.server: Optional[MarketingApiServer] = None
        self.sink: Optional[SinkProcess] = None
        self.writer: Optional[threading.Thread] = None

    def say(self, line: str) -> None:
        stamp = f"{time.monotonic() - self.started:6.0f}s" if self.started else "  prep"
        print(f"chaos {stamp} {line}", file=self.out, flush=True)

    def group_offsets(self, group: str, tps: list[TopicPartition]) -> Optional[dict[TopicPartition, tuple[int, int]]]:
        """Committed offsets of `group` and the log ends, {tp: (committed, end)}; None if the
        broker does not answer."""
        try:
            return kafka_io.group_offsets(group, tps, request_timeout_ms=3000, connection=self.connection)
        except Exception:          # noqa: BLE001 - the broker may be down: that is the fault being measured
            return None

    # -- set-up --------------------------------------------------------------------------
    def prepare(self) -> tuple[set[str], dict[str, tuple[str, int]], set[str], dict[tuple, Poison]]:
        plan = self.plan
        log = generate_log(plan.seed, customers=max(40, plan.events // 25), events=plan.events)
        shift = int(time.time() * 1000) - DAY - log["events"][-1]["ts"]   # the log ends a day ago
        events = [{**e, "ts": e["ts"] + shift} for e in log["events"]]
        live_from = int(len(events) * (1 - plan.live_share))
        events = self.with_hot_customer(events, live_from)
        rules = [(k, {**v, "effective_from": v["effective_from"] + shift}) for k, v in log["rules"]]
        reports, unreportable = reference_reports(
            rules, events, partition_of=lambda key: kafka_partition(key, plan.partitions))
        expected = {r["outer_action_id"]: (r["action_type"], r["action_time"]) for r in reports}
        self.model = {r["outer_action_id"]: r for r in reports + unreportable}
        self.result.events, self.result.expected = len(events), len(expected)
        self.result.unreportable_expected = len({r["outer_action_id"] for r in unreportable})

        poison = poison_records(events, int(len(events) * plan.poison_share / (1 - plan.poison_share)), plan.seed)
        self.result.poison = len(poison)
        self.result.poison_shapes = Counter(p.shape for _, p in poison)
        in_front: dict[int, list[Poison]] = {}
        for position, p in poison:
            in_front.setdefault(position, []).append(p)
        records, poison_at, split, event_ids = [], [], 0, []
        for position, event in enumerate(events):
            if position == live_from:
                split = len(records)
            for p in in_front.get(position, ()):
                poison_at.append((len(records), p))
                records.append((self.pipeline.topic(p.topic), p.key, p.value, event["ts"]))
                event_ids.append(None)
            topic = "contact_events" if "change_type" in event else "tag_events"
            records.append((self.pipeline.topic(topic), f"{event['corp_id']}:{event['external_userid']}".encode(),
                            orjson.dumps(event), event["ts"]))
            event_ids.append(event["event_id"])
        self.pipeline.create_topics()
        self.pipeline.send(*[("tag_mappings", key, value) for key, value in rules])
        self.rules = len(rules)
        self.live, self.live_event_ids = records[split:], event_ids[split:]
        self.result.live_records = len(self.live)
        self.say(f"producing {split:,} of {len(records):,} records ({len(events):,} events and {len(poison):,} "
                 f"poison) as a backlog; the rest arrives live")
        self.metadata = asyncio.run(_produce(records[:split], self.connection))
        self.poison_at = poison_at
        self.input_bytes = sum(len(k or b"") + len(v or b"") for _, k, v, _ in records)
        return set(expected), expected, {r["outer_action_id"] for r in unreportable}

    def with_hot_customer(self, events: list[dict], live_from: int) -> list[dict]:
        """`events` with the hot customer's tag removes spread over the live part (each
        at the ts of the event before it, so the log stays in ts order); every 1,000th re-sends
        an earlier id, as a sync that restarts does."""
        plan = self.plan
        if plan.hot_events <= 0:
            return events
        corp = events[0]["corp_id"]
        customer = f"wm-hot-crm-{plan.seed}"
        self.result.hot_partition = kafka_partition(f"{corp}:{customer}", plan.partitions)
        self.result.hot_events = plan.hot_events
        live = len(events) - live_from
        out = events[:live_from]
        sent = 0
        for i, event in enumerate(events[live_from:]):
            out.append(event)
            due = (i + 1) * plan.hot_events // live
            while sent < due:
                number = sent - 500 if sent % 1_000 == 999 else sent
                out.append({"event_id": f"crm-{plan.seed}-{number}", "corp_id": corp, "external_userid": customer,
                            "userid": "s-crm", "tag_id": "u-new", "op": "remove", "ts": event["ts"]})
                sent += 1
        return out

    def poison_by_offset(self) -> dict[tuple, Poison]:
        """Where each poison record landed (once the live part is written)."""
        return {(self.metadata[i].topic, self.metadata[i].partition, self.metadata[i].offset): p
                for i, p in self.poison_at}

    # -- the live part ---------------------------------------------------------------------
    def start_live_writer(self, seconds: float) -> threading.Thread:
        """Write `self.live` in a thread, paced to take about `seconds`; each record's
        RecordMetadata is appended to `self.metadata`."""
        async def write() -> None:
            # a generous timeout: the broker restart fault stops it for seconds meanwhile
            async with LiveWriter(self.connection, request_timeout_ms=180_000) as writer:
                started = time.monotonic()
                deliveries = []
                for i, (topic, key, value, ts) in enumerate(self.live):
                    if i % 20 == 0:
                        ahead = started + seconds * i / len(self.live) - time.monotonic()
                        if ahead > 0:
                            await asyncio.sleep(ahead)
                    deliveries.append(await writer.write(topic, key, value, ts))
                    if self.live_event_ids[i] is not None:
                        self.written_at.setdefault(self.live_event_ids[i], time.time())
                await writer.flush()
                self.metadata += [d.result() for d in deliveries]

        def run() -> None:
            try:
                asyncio.run(write())
            except Exception as exc:       # noqa: BLE001 - reported in the verdict
                self.result.live_error = repr(exc)
            self.say(f"live writer done: {len(self.metadata):,} records on the topics")

        thread = threading.Thread(target=run, name="live-writer", daemon=True)
        thread.start()
        return thread

    def _slot_settings(self, n: int):
        # Small fetches: under a byte-rate quota the broker throttles a client for as long as
        # its last response takes to pay off, and a default 1 MiB-per-partition fetch after a
        # rebalance bought a minute of silence, which is the quota's doing, not a recovery.
        return dataclasses.replace(self.settings, metrics_port=free_port(), partition_fetch_bytes=16 * 1024,
                                   data_dir=str(self.work / f"worker-{n}-data"), idle_grace=NO_WALL_CLOCK_FLUSH_MS)

    def start_slot(self, n: int, failpoint: Optional[str] = None, wipe: bool = False) -> None:
        while len(self.slots) <= n:
            self.slots.append(WorkerProcess(self._slot_settings(len(self.slots)),
                                            self.work / f"worker-{len(self.slots)}.log"))
        if wipe:
            shutil.rmtree(self.slots[n].settings.data_dir, ignore_errors=True)
        self.slots[n].start({"TAGSTREAM_FAILPOINT": failpoint} if failpoint else None)
        if failpoint:
            self.armed[n] = failpoint
        else:
            self.armed.pop(n, None)

    def alive(self, n: int) -> bool:
        return n < len(self.slots) and self.slots[n].process is not None and self.slots[n].process.poll() is None

    def scrape_forced(self, now: bool = False) -> float:
        """Every few seconds (or `now`): how many merge releases each live worker forced
        without knowing the other topic (possibly out of ts order: 0 unless the broker is
        down). Returns the total so far."""
        if not now and time.monotonic() - self.last_scrape < 5:
            return sum(self.forced.values())
        self.last_scrape = time.monotonic()
        for n in range(len(self.slots)):
            if self.alive(n):
                value = total(self.slots[n].metrics(), "tagstream_merge_forced_total")
                self.forced[self.slots[n].process.pid] = max(value, self.forced.get(self.slots[n].process.pid, 0))
        return sum(self.forced.values())

    def supervise(self) -> None:
        """Restart a main worker that died by itself: by an armed failpoint (an injected fault,
        recorded) or by anything else (a bug, recorded as an unexpected exit)."""
        for n in (0, 1):
            if n < len(self.slots) and self.slots[n].process is not None and not self.alive(n):
                code = self.slots[n].process.returncode
                if code == -signal.SIGKILL and n in self.armed:
                    fault = Fault("failpoint_kill", time.monotonic() - self.started, f"worker-{n} at {self.armed[n]}")
                    self.say(f"worker-{n} killed itself at failpoint {self.armed[n]}; restarting it")
                    before = self.group_offsets(self.settings.app_id, self._input_tps())
                    self.start_slot(n)          # unarmed: this wait cannot recurse again
                    fault.recovery_s = self.wait(self.group_progressed(before), self.plan.recovery_timeout_s)
                    self.result.faults.append(fault)
                    self.say(f"{fault.kind}: {fault.detail}: {fault.recovery_text()}")
                else:
                    self.result.unexpected_exits.append(f"worker-{n} exited with {code}")
                    self.say(f"worker-{n} EXITED with {code}; restarting it:\n{self.slots[n].log_tail(15)}")
                    self.start_slot(n)
        if self.sink is not None and self.sink.process.poll() is not None:
            self.result.unexpected_exits.append(f"sink exited with {self.sink.process.returncode}")
            self.say(f"the sink EXITED with {self.sink.process.returncode}; restarting it")
            self.sink.start()

    # -- waiting ---------------------------------------------------------------------------
    def _input_tps(self) -> list[TopicPartition]:
        return [TopicPartition(self.pipeline.topic(t), p) for t in ("tag_events", "contact_events")
                for p in range(self.plan.partitions)]

    def wait(self, condition: Callable[[], bool], timeout: float) -> Optional[float]:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            self.supervise()
            self.scrape_forced()
            if condition():
                return time.monotonic() - started
            time.sleep(0.5)
        return None

    def group_progressed(self, before: Optional[dict]) -> Callable[[], bool]:
        """Every input partition that had work at `before` has committed past it (or is done)."""
        def check() -> bool:
            now = self.group_offsets(self.settings.app_id, self._input_tps())
            if now is None:
                return False
            if before is None:
                return any(c > 0 for c, _ in now.values())
            return all(now[tp][0] > c or now[tp][0] >= now[tp][1] for tp, (c, end) in before.items() if c < end)
        return check

    def api_progressed(self) -> Callable[[], bool]:
        count = len(self.server.accepted)
        return lambda: len(self.server.accepted) > count or self.drained()

    def holds_flushed(self) -> bool:
        """Every partition is assigned to a live worker whose rule book is ready, and none
        holds a delayed report (the gauge is sampled every `metrics_interval`)."""
        partitions, held = set(), 0.0
        for n in (0, 1):
            samples = self.slots[n].metrics() if self.alive(n) else None
            if not samples or total(samples, "tagstream_rule_book_ready") != 1:
                return False
            for labels, value in samples.get("tagstream_held_reports", {}).items():
                partitions.add(dict(labels)["partition"])
                held += value
        return len(partitions) == self.plan.partitions and held == 0

    def drained(self) -> bool:
        """The workers committed every input record, and the sink every report (or the API
        holds every expected action already)."""
        if self.writer is not None and self.writer.is_alive():
            return False
        offsets = self.group_offsets(self.settings.app_id, self._input_tps())
        if offsets is None or any(c < end for c, end in offsets.values()):
            return False
        if set(self.server.accepted) >= self.expected_ids:
            return True
        reports = [TopicPartition(self.pipeline.topic("conversion_reports"), p) for p in range(self.plan.partitions)]
        sink = self.group_offsets(f"{self.settings.app_id}-sink", reports)
        return sink is not None and all(c >= end for c, end in sink.values())

    # -- faults ------------------------------------------------------------------------------
    def inject(self, kind: str, index: Counter) -> None:
        at = time.monotonic() - self.started
        before = self.group_offsets(self.settings.app_id, self._input_tps())
        fault = Fault(kind, at)
        if kind == "worker_kill":
            n = self.rng.choice([s for s in (0, 1) if self.alive(s)] or [0])
            k = index["worker_kill"]
            failpoint = (f"{self.rng.choice(FAILPOINT_STEPS)}:{self.rng.randint(2, 12)}"
                         if k < self.plan.failpoint_restarts else None)
            wipe = self.plan.failpoint_restarts <= k < self.plan.failpoint_restarts + self.plan.wiped_restarts
            if self.alive(n):
                self.slots[n].process.send_signal(signal.SIGKILL)
                self.slots[n].process.wait()
            self.start_slot(n, failpoint=failpoint, wipe=wipe)
            fault.detail = f"worker-{n}, restart" + (f" armed {failpoint}" if failpoint else "") + \
                (" on a wiped data dir" if wipe else "")
            fault.recovery_s = self.wait(self.group_progressed(before), self.plan.recovery_timeout_s)
        elif kind == "join_leave":
            self.start_slot(2)
            fault.detail = "worker-2 joins"
            fault.recovery_s = self.wait(self.group_progressed(before), self.plan.recovery_timeout_s)
            self.result.faults.append(fault)
            self.say(f"{fault.kind}: {fault.detail}: {fault.recovery_text()}")
            time.sleep(self.rng.uniform(*self.plan.gap_s))
            before = self.group_offsets(self.settings.app_id, self._input_tps())
            fault = Fault("join_leave", time.monotonic() - self.started, "worker-2 leaves (SIGTERM)")
            self.slots[2].stop()
            fault.recovery_s = self.wait(self.group_progressed(before), self.plan.recovery_timeout_s)
        elif kind == "sink_kill":
            self.sink.stop(signal.SIGKILL)
            self.sink.start()
            fault.detail = "SIGKILL, restart"
            fault.recovery_s = self.wait(self.api_progressed(), self.plan.recovery_timeout_s)
        elif kind == "api_burst":
            faults = self.server.faults
            faults.retryable_rate, faults.drop_rate, faults.slow_rate = 0.7, 0.1, 0.05
            time.sleep(self.plan.burst_s)
            faults.retryable_rate = faults.drop_rate = faults.slow_rate = 0.0
            fault.detail = f"{self.plan.burst_s:.0f} s of 70% retryable, 10% dropped, 5% slow"
            fault.recovery_s = self.wait(self.api_progressed(), self.plan.recovery_timeout_s)
        elif kind in ("leader_kill", "controller_kill"):
            if kind == "leader_kill":
                inputs = [self.settings.topic("tag_events_topic"), self.settings.topic("contact_events_topic")]
                node, led = asyncio.run(_leaders(self.connection, inputs)).most_common(1)[0]
                fault.detail = f"SIGKILL node {node} (leads {led} input partitions)"
            else:
                node = int(_kafka("controller", cluster=True).strip())
                fault.detail = f"SIGKILL node {node} (the active controller)"
            forced_before = self.scrape_forced(now=True)
            _kafka("kill", str(node), cluster=True)
            # recovery with the node still down: two of three brokers hold min.insync.replicas
            fault.recovery_s = self.wait(self.group_progressed(before), self.plan.recovery_timeout_s)
            _kafka("start-node", str(node), cluster=True)
            time.sleep(PROBE_TIMEOUT_S + 1)
            self.outage_forced += self.scrape_forced(now=True) - forced_before
        elif kind == "rolling_restart":
            forced_before = self.scrape_forced(now=True)
            rolling_from = time.monotonic()
            for node in (1, 2, 3):
                _kafka("stop-node", str(node), cluster=True)
                _kafka("start-node", str(node), cluster=True)
            rolled = time.monotonic() - rolling_from
            fault.detail = f"each node stopped and started in turn ({rolled:.0f} s)"
            # from the first stop until every partition with work has committed progress
            after = self.wait(self.group_progressed(before), self.plan.recovery_timeout_s)
            fault.recovery_s = None if after is None else rolled + after
            time.sleep(PROBE_TIMEOUT_S + 1)
            self.outage_forced += self.scrape_forced(now=True) - forced_before
        elif kind == "broker_restart":
            forced_before = self.scrape_forced(now=True)
            _kafka("stop")
            time.sleep(3)
            _kafka("start")
            fault.detail = "stopped, 3 s down, started"
            fault.recovery_s = self.wait(self.group_progressed(before), self.plan.recovery_timeout_s)
            time.sleep(PROBE_TIMEOUT_S + 1)    # a probe sent just before the stop fails this late
            self.outage_forced += self.scrape_forced(now=True) - forced_before
        index[kind] += 1
        self.result.faults.append(fault)
        self.say(f"{fault.kind}: {fault.detail}: {fault.recovery_text()}")

    # -- the whole run ------------------------------------------------------------------------
    def run(self) -> Result:
        _kafka("start", cluster=self.plan.cluster)
        expected_ids, expected, unreportable_ids = self.prepare()
        self.expected_ids = expected_ids
        faults = self.plan.faults()
        schedule_s = max(1, len(faults)) * self.plan.seconds_per_fault
        # The backlog lasts about the first third of the faults (the live part keeps coming
        # meanwhile); after that the workers follow the live writer.
        byte_rate = max(20_000, int(self.input_bytes * (1 - self.plan.live_share) / (schedule_s / 3)
                                    + self.input_bytes * self.plan.live_share / (1.25 * schedule_s)))
        self.say(f"{self.input_bytes / 1e6:.1f} MB of input; workers throttled to {byte_rate / 1e3:.0f} kB/s "
                 f"for {len(faults)} faults")
        kafka_io.throttle_fetches(byte_rate, cluster=self.plan.cluster)
        self.server = MarketingApiServer(TOKEN, Faults(seed=self.plan.seed))
        api = ServerThread(self.server).start()
        token_file = self.work / "token"
        token_file.write_text(TOKEN)
        try:
            self.sink = SinkProcess(self.pipeline, api.base_url, token_file, self.work / "sink.log").start()
            self.started = time.monotonic()
            self.start_slot(0)
            self.slots[0].wait_for_rules(self.rules, timeout=120)
            self.start_slot(1)
            self.say("two workers and the sink are up")
            self.writer = self.start_live_writer(1.25 * schedule_s)   # faults take longer than planned
            index: Counter = Counter()
            for kind in faults:
                time.sleep(self.rng.uniform(*self.plan.gap_s))
                self.supervise()
                self.inject(kind, index)
            kafka_io.throttle_fetches(None, cluster=self.plan.cluster)
            self.say("faults done; throttle lifted; draining")
            if self.wait(self.drained, 600) is None:
                self.say("did not drain in 600 s")
            self.say("drained; restarting the workers with the default idle_grace to flush open holds")
            for n in (0, 1):
                self.slots[n].stop()
                self.slots[n].settings = dataclasses.replace(self.slots[n].settings, idle_grace=Settings().idle_grace)
                self.start_slot(n)
            # Found by the cluster run: "drained" held at once (nothing new written yet), the
            # run stopped 5 s later, and two holds the restarted workers had not yet released
            # (restore and rebalance take longer on the cluster) were never reported. Wait
            # until the workers have every partition, no open hold, and then drain.
            if self.wait(self.holds_flushed, 300) is None:
                self.say("the restarted workers did not flush their holds in 300 s")
            if self.wait(self.drained, 300) is None:
                self.say("did not drain in 300 s after the restart")
            time.sleep(5)                     # anything sent twice arrives by now
            self.supervise()
            self.result.seconds = time.monotonic() - self.started
        finally:
            kafka_io.throttle_fetches(None, cluster=self.plan.cluster)
            for slot in self.slots:
                slot.stop()
            if self.sink is not None:
                self.sink.stop()
            api.stop()
        if self.writer is not None:
            self.writer.join()
        try:
            self.verify(expected, unreportable_ids, self.poison_by_offset())
        finally:
            self.pipeline.stop(delete_topics=not self.keep_topics)
        return self.result

    def verify(self, expected: dict, unreportable_ids: set, poison: dict) -> None:
        r = self.result
        accepted = self.server.accepted
        r.accepted = len(accepted)
        r.lost = sorted(set(expected) - set(accepted))
        r.extra = sorted(set(accepted) - set(expected))
        r.wrong_content = sorted(i for i in set(expected) & set(accepted)
                                 if (accepted[i].action.get("action_type"), accepted[i].action.get("action_time"))
                                 != expected[i])
        brief = lambda i: {k: self.model[i].get(k) for k in (
            "external_userid", "standard_type", "mode", "reason", "source_event_id", "action_time")}
        r.details += [f"lost: {brief(i)}" for i in r.lost[:5]]
        r.details += [f"differs: model {brief(i)}, API {accepted[i].action}" for i in r.wrong_content[:5]]
        r.forced_in_outages = int(self.outage_forced)
        r.forced_merge_releases = int(sum(self.forced.values()) - self.outage_forced)
        r.duplicate_deliveries = sum(self.server.duplicates.values())
        for oid, report in self.model.items():
            written = self.written_at.get(report["source_event_id"])
            if report["mode"] == "realtime" and written is not None and oid in accepted:
                partition = kafka_partition(f"{report['corp_id']}:{report['external_userid']}", self.plan.partitions)
                r.latency.setdefault(partition, []).append(accepted[oid].at - written)
        sink_log = (self.work / "sink.log").read_text(errors="replace")
        r.in_doubt_resent = sum(int(line.split(" in doubt")[0].rsplit(" ", 1)[1])
                                for line in sink_log.splitlines() if " in doubt" in line)
        unreportable = {orjson.loads(x.value)["outer_action_id"] for x in self.pipeline.read(
            "unreportable", until=lambda rs: len(rs) >= len(unreportable_ids), timeout=60, settle=1.0)}
        r.unreportable_missing = sorted(unreportable_ids - unreportable)
        r.unreportable_extra = sorted(unreportable - unreportable_ids)
        r.details += [f"unreportable missing: {brief(i)}" for i in r.unreportable_missing[:5]]
        letters = self.pipeline.read("dead_letters", until=lambda rs: len(rs) >= len(poison), timeout=60, settle=1.0)
        r.dead_letters = len(letters)
        found: dict[tuple, dict] = {}
        for record in letters:
            letter = orjson.loads(record.value)
            found[(letter["topic"], letter["partition"], letter["offset"])] = letter
        for where, p in poison.items():
            letter = found.get(where)
            if letter is None:
                r.poison_missing.append(f"{p.shape}@{where}")
            elif letter["error"] != p.expected_error or not letter.get("detail"):
                r.poison_wrong_reason.append(f"{p.shape}@{where}: {letter['error']} ({letter.get('detail')})")
        r.unexpected_dead_letters = len(set(found) - set(poison))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=Plan.events, help="valid events in the log (default 300000)")
    parser.add_argument("--worker-kills", type=int, default=Plan.worker_kills, help="worker SIGKILLs (default 10)")
    parser.add_argument("--sink-kills", type=int, default=Plan.sink_kills, help="sink SIGKILLs (default 2)")
    parser.add_argument("--api-bursts", type=int, default=Plan.api_bursts, help="API failure bursts (default 3)")
    parser.add_argument("--join-leave", type=int, default=Plan.join_leave, help="a third worker joins and leaves (default 1)")
    parser.add_argument("--broker-restarts", type=int, default=Plan.broker_restarts, help="broker stops and starts (default 1)")
    parser.add_argument("--hot-events", type=int, default=Plan.hot_events,
                        help="one hot customer's tag adds in the live part (default 50000; 0: none)")
    parser.add_argument("--cluster", action="store_true",
                        help="run on the secured three-broker cluster (make chaos CLUSTER=3), with its broker faults")
    parser.add_argument("--seed", type=int, default=Plan.seed, help="seeds the log, poison and fault order (default 1)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs) and the topics")
    args = parser.parse_args(argv)
    plan = Plan(events=args.events, worker_kills=args.worker_kills, sink_kills=args.sink_kills,
                api_bursts=args.api_bursts, seed=args.seed, hot_events=args.hot_events, cluster=args.cluster,
                join_leave=args.join_leave, broker_restarts=args.broker_restarts,
                failpoint_restarts=min(3, args.worker_kills), wiped_restarts=min(2, max(0, args.worker_kills - 3)))
    work = Path(tempfile.mkdtemp(prefix="tagstream-chaos-"))
    try:
        result = ChaosRun(plan, work, keep_topics=args.keep).run()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(result.summary())
    if args.keep:
        print(f"logs: {work}")
    return 0 if not result.problems() else 1
