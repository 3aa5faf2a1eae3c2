"""`tagstream run`: the whole pipeline on the local broker, with a generated load.

Starts a worker and a file sink as child processes, loads the sample reporting rules,
feeds a realistic generated stream (`streams.sources.loadgen`) and prints progress every two
seconds: events/s, reports by type, lag. Ends after `--events` are processed (printing a
summary with the end-to-end throughput) or on Ctrl-C, stopping the children cleanly.

**Event time.** With `--events N` the stream is the last `HISTORY` (6 hours) of a busy
day's traffic, ending now: a backlog of history, as when a worker starts behind. Delayed
types are held for `delay_hold` (30 minutes) of *event* time, so over six hours of it the
run shows them released, and, because staff now and then take back a LONG_TERM or INVALID
tag within minutes, cancelled. Without `--events` the stream is live: event time is the
wall clock, and the first delayed report comes after 30 real minutes.

**Through WeCom** (`--via-wecom`): the load enters the way it does in production. The fake
WeCom (`python -m tests.fake_wecom`, a source checkout's) serves WeCom's API for two demo corps
and its staff tag customers in the sidebar; its signed, encrypted callbacks reach `tagstream
ingest`, `tagstream enrich` fetches the customers and writes the tag and contact events, and
the worker and sink go on as above: sidebar -> callback -> ingest -> enrichment -> worker ->
sink. Event time is live, so delayed reports stay held. The corps' secrets are generated for
the run and written to files beside the reports, as a deployment mounts them.
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import itertools
import json
import os
import secrets
import socket
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from aiokafka.errors import KafkaError

from schemas.records import STANDARD_TYPES
from streams.kafka.admin import ensure_topics
from streams.kafka.connection import client_kwargs
from streams.observability.lag import LagMonitor, monitored_groups
from streams.sources.loadgen import GeneratedRecord, LoadShape, TagTraffic
from streams.observability.observe import by_label, by_labels, scrape_async, total
from streams.kafka.producer import input_producer, produce
from schemas.records import rule_key
from streams.settings import Settings

PROGRESS_EVERY_S = 2.0
#: How much event time a `--events` run covers, ending now.
HISTORY_MS = 6 * 3_600_000
#: Of the delayed types' tag adds, how many staff take back within minutes (cancelled holds).
UNDO_SHARE = 0.3
DELAYED_TYPES = ("LONG_TERM", "INVALID")
#: WeCom mode: the demo corps, their corp tags and what the demo's rules map each to (None: unmapped)
WECOM_CORPS = ("wwdemo0000000a01", "wwdemo0000000b02")
WECOM_TAGS = {"etConsult": "CONSULT", "etLead": "LEAD", "etValid": "VALID", "etOrder": "ORDER",
              "etLongTerm": "LONG_TERM", "etInvalid": "INVALID", "etBeijing": None, "etShanghai": None,
              "etNewCustomer": None, "etCallBack": None}


def write_demo_corps(directory: Path) -> Path:
    """The demo corps' corps file in `directory`, with freshly generated secrets in files
    beside it (0600) that the file names: what the ingest, the enrichment and the fake WeCom
    read. Returns the corps file's path."""
    (directory / "secrets").mkdir(parents=True, exist_ok=True)
    lines = ["corps:"]
    for corp_id in WECOM_CORPS:
        values = {"token": secrets.token_hex(16),
                  "encoding_aes_key": base64.b64encode(secrets.token_bytes(32)).decode().rstrip("="),
                  "contact_secret": secrets.token_urlsafe(32)}
        lines += [f"  - corp_id: {corp_id}", f"    wechat_app_id: wx{corp_id[-4:]}demo"]
        for name, value in values.items():
            path = directory / "secrets" / f"{corp_id}.{name}"
            path.write_text(value)
            path.chmod(0o600)
            lines.append(f"    {name}_file: {path}")
    corps_file = directory / "wecom-corps.yaml"
    corps_file.write_text("\n".join(lines) + "\n")
    return corps_file


def demo_wecom_rules() -> list[GeneratedRecord]:
    """The demo corps' reporting rules (WECOM_TAGS), in effect since a day ago."""
    effective_from = int(time.time() * 1000) - 86_400_000
    return [GeneratedRecord("tag_mappings", rule_key(corp, tag), {
        "corp_id": corp, "tag_id": tag, "tag_name": tag, "standard_type": standard_type,
        "account_id": 4000 + i, "user_action_set_id": 14000 + i, "effective_from": effective_from,
        "version": 1, "action_type": None})
        for i, corp in enumerate(WECOM_CORPS) for tag, standard_type in WECOM_TAGS.items() if standard_type]


class Child:
    """A tagstream subcommand in its own process group, logging to a file."""

    def __init__(self, name: str, args: list[str], settings: Settings, log_dir: Path, module: str = "streams.cli"):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        env = {**os.environ, **settings.to_environ()}
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, *args], env=env,
            stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> int:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def run_demo(settings: Settings, *, events: int, rate: float, seed: Optional[int], reports_file: str,
             via_wecom: bool = False) -> int:
    return asyncio.run(_Demo(settings, events, rate, seed, reports_file, via_wecom).run())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Demo:
    def __init__(self, settings: Settings, events: int, rate: float, seed: Optional[int], reports_file: str,
                 via_wecom: bool = False):
        self.settings = settings
        self.events = events
        self.rate = rate
        self.via_wecom = via_wecom
        self.seed = int(time.time()) if seed is None else seed
        self.reports_file = reports_file
        self.log_dir = Path(reports_file).parent
        self.produced = 0
        self.first_produced_at: Optional[float] = None
        self.stop = asyncio.Event()
        self.fake_done: Optional[Path] = None

    async def run(self) -> int:
        if self.via_wecom:
            self.settings = self._wecom_settings()
        s = self.settings
        self.log_dir.mkdir(parents=True, exist_ok=True)
        Path(self.reports_file).write_bytes(b"")      # this run's reports only (the sink appends)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop.set)
        await ensure_topics(s)
        print(f"tagstream run: broker {s.broker}, {s.partitions} partitions, seed {self.seed}, "
              f"{'%d events' % self.events if self.events else 'until Ctrl-C'}"
              f"{', %g events/s' % self.rate if self.rate else ', as fast as possible'}")
        worker = Child("worker", ["worker"], s, self.log_dir)
        sink = Child("sink", ["sink", "--target", "file:" + self.reports_file], s, self.log_dir)
        children = [worker, sink]
        producer = input_producer(s)
        await producer.start()
        try:
            traffic = None if self.via_wecom else self._traffic()
            rules = self._wecom_rules() if traffic is None else traffic.rules()
            await produce(producer, s, rules)
            print(f"loaded {len(rules)} reporting-rule versions for "
                  f"{len(WECOM_CORPS) if traffic is None else len(traffic.corps)} corps; "
                  f"waiting for the worker (log: {worker.log_path}) ...")
            if not await self._wait_for_rules(worker, len(rules)):
                return 1
            if traffic is None:
                children += await self._start_wecom()
                feeding = asyncio.create_task(self._count_callbacks())
            else:
                feeding = asyncio.create_task(self._feed(producer, traffic))
            finished = await self._watch(children)
            feeding.cancel()
        finally:
            await producer.stop()
            print("stopping " + ", ".join(child.name for child in children) + " ...")
            for child in reversed(children):
                child.stop()
        return 0 if finished else 1

    # -- WeCom mode ----------------------------------------------------------------------------
    def _wecom_settings(self) -> Settings:
        """Generated secrets in files, a corps file naming them, and ports for the ingest and
        the fake WeCom API."""
        corps_file = write_demo_corps(self.log_dir / "wecom")
        self.fake_done = self.log_dir / "wecom" / "staff-done.json"
        self.fake_done.unlink(missing_ok=True)
        return dataclasses.replace(self.settings, wecom_corps_file=str(corps_file),
                                   wecom_api_base=f"http://127.0.0.1:{_free_port()}/cgi-bin/",
                                   ingest_listen=f"127.0.0.1:{_free_port()}", enrich_metrics_port=_free_port())

    def _wecom_rules(self) -> list[GeneratedRecord]:
        return demo_wecom_rules()

    async def _start_wecom(self) -> list[Child]:
        s = self.settings
        ingest = Child("ingest", ["ingest"], s, self.log_dir)
        enrich = Child("enrich", ["enrich"], s, self.log_dir)
        port = int(s.ingest_listen.rsplit(":", 1)[1])
        deadline = time.monotonic() + 60
        while await scrape_async(port) is None:       # WeCom gives up on an ingest that is not up
            if not ingest.alive() or time.monotonic() > deadline:
                raise SystemExit(f"the ingest did not start; last lines of {ingest.log_path}:\n{ingest.tail()}")
            await asyncio.sleep(0.3)
        api_port = s.wecom_api_base.rsplit(":", 1)[1].split("/")[0]
        fake = Child("fake-wecom", [
            "--corps-file", s.wecom_corps_file, "--tags", ",".join(WECOM_TAGS), "--ingest", f"http://{s.ingest_listen}",
            "--api-port", api_port, "--callbacks", str(self.events), "--rate", str(self.rate or 50),
            "--seed", str(self.seed), "--done-file", str(self.fake_done)], s, self.log_dir, module="tests.fake_wecom")
        print(f"WeCom mode: the fake WeCom's staff send {self.events or 'endless'} callbacks at "
              f"{self.rate or 50:g}/s to the ingest on {s.ingest_listen} (logs in {self.log_dir})")
        return [ingest, enrich, fake]

    async def _count_callbacks(self) -> None:
        """`produced` in WeCom mode: the callbacks the ingest accepted."""
        if self.first_produced_at is None:
            self.first_produced_at = time.time()
        port = int(self.settings.ingest_listen.rsplit(":", 1)[1])
        while True:
            samples = await scrape_async(port)
            if samples:
                self.produced = int(total(samples, "tagstream_wecom_callbacks_total", outcome="accepted"))
            await asyncio.sleep(0.5)

    def _traffic(self) -> TagTraffic:
        now = int(time.time() * 1000)
        if not self.events:                 # live: event time is the wall clock
            return TagTraffic(self.seed, start_ms=now, clock=lambda: int(time.time() * 1000),
                              run_tag=f"{self.seed:x}x")
        shape = LoadShape(mean_gap_ms=max(1, HISTORY_MS // self.events), undo_share=UNDO_SHARE)
        print(f"event time: the last {HISTORY_MS / 3_600_000:g} hours of generated traffic, ending now "
              f"(delayed reports wait {self.settings.delay_hold / 60_000:g} minutes of event time)")
        return TagTraffic(self.seed, start_ms=now - HISTORY_MS, shape=shape, run_tag=f"{self.seed:x}x")

    async def _wait_for_rules(self, worker: Child, expected: int) -> bool:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not self.stop.is_set():
            if not worker.alive():
                print(f"the worker exited; last lines of {worker.log_path}:\n{worker.tail()}")
                return False
            samples = await scrape_async(self.settings.metrics_port)
            if total(samples, "tagstream_rule_book_ready") and total(samples, "tagstream_rule_versions") >= expected:
                return True
            await asyncio.sleep(0.5)
        if not self.stop.is_set():
            print(f"the worker did not load the rules within 120 s; see {worker.log_path}")
        return False

    async def _feed(self, producer, traffic: TagTraffic) -> None:
        stream = traffic.events()
        chunk = 500
        started = time.monotonic()
        self.first_produced_at = time.time()
        while not self.stop.is_set():
            want = chunk if not self.events else min(chunk, self.events - self.produced)
            if want <= 0:
                return
            self.produced += await produce(producer, self.settings, itertools.islice(stream, want))
            if self.rate:
                ahead = self.produced / self.rate - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            else:
                await asyncio.sleep(0)

    async def _watch(self, children: list[Child]) -> bool:
        async with LagMonitor(client_kwargs(self.settings), monitored_groups(self.settings)) as lag:
            return await self._watch_with(children, lag)

    def _fed(self, processed: float) -> bool:
        """Everything offered is in: every event produced and processed, or in WeCom mode,
        every callback answered (the fake's staff are done)."""
        if self.via_wecom:
            return bool(self.events) and self.fake_done is not None and self.fake_done.exists()
        return bool(self.events) and self.produced >= self.events and processed >= self.events

    async def _watch_with(self, children: list[Child], lag_monitor: LagMonitor) -> bool:
        s = self.settings
        started = time.monotonic()
        last_processed, last_t = 0.0, started
        event_topics = [s.topic("tag_events_topic"), s.topic("contact_events_topic")]
        while True:
            try:
                await asyncio.wait_for(self.stop.wait(), PROGRESS_EVERY_S)
            except asyncio.TimeoutError:
                pass
            for child in children:
                if not child.alive():
                    print(f"the {child.name} exited; last lines of {child.log_path}:\n{child.tail()}")
                    return False
            samples = await scrape_async(s.metrics_port)
            processed = sum(total(samples, "tagstream_events_total", topic=t) for t in event_topics)
            try:
                rows = await lag_monitor.sample(with_age=False)
            except KafkaError as exc:          # e.g. the broker restarting: report it, keep watching
                print(f"[{time.monotonic() - started:6.0f}s] broker not answering ({type(exc).__name__}); "
                      f"the worker and sink reconnect by themselves", flush=True)
                continue
            lag = sum(row.lag for row in rows if row.group == s.app_id and row.topic in event_topics)
            now = time.monotonic()
            reports = by_label(samples, "tagstream_reports_total", "standard_type")
            print(f"[{now - started:6.0f}s] {'callbacks' if self.via_wecom else 'produced'} {self.produced:>9,}  processed {processed:>9,.0f} "
                  f"({(processed - last_processed) / (now - last_t):>7,.0f}/s)  lag {lag:>7,}  reports "
                  + " ".join(f"{t} {reports.get(t, 0):,.0f}" for t in STANDARD_TYPES), flush=True)
            last_processed, last_t = processed, now
            # WeCom mode: the enrichment's and the worker's lags count too (their events are
            # not known in advance); the plain mode counted them in `processed`
            drained = (f"{s.app_id}-sink",) + ((f"{s.app_id}-enrich", s.app_id) if self.via_wecom else ())
            if self._fed(processed) and all(row.lag == 0 for row in rows if row.group in drained):
                finished = time.time()
                # the held-reports gauge is sampled every metrics_interval: wait for a sample
                # taken after the last event before saying what is still held
                await asyncio.sleep(s.metrics_interval / 1000 + 0.5)
                self._summary(await scrape_async(s.metrics_port) or samples, processed, finished)
                return True
            if self.stop.is_set():
                print("interrupted")
                self._summary(samples, processed, time.time())
                return True

    def _summary(self, samples: Optional[dict], processed: float, finished_at: float) -> None:
        print(render_summary(samples or {}, processed, finished_at - (self.first_produced_at or finished_at),
                             self.settings, self.reports_file))
        if self.fake_done is not None and self.fake_done.exists():
            staff = json.loads(self.fake_done.read_text())
            print(f"  WeCom callbacks    {staff['answered']:,} of {staff['callbacks']:,} answered by the ingest "
                  f"({staff['retries']:,} retried by WeCom, {staff['dropped']:,} lost); "
                  f"the enrichment turned them into the events above")


def render_summary(samples: dict, processed: float, elapsed: float, settings: Settings, reports_file: str) -> str:
    """What the run did, in the words of SPEC §4: real-time reports go out when their tag is
    applied; delayed ones after `delay_hold` of event time, unless cancelled; what is still
    held and why; what could not be reported."""
    reports = by_labels(samples, "tagstream_reports_total", "standard_type", "mode")
    outcomes = by_label(samples, "tagstream_events_total", "outcome")
    unreportable = total(samples, "tagstream_unreportable_total")
    held = total(samples, "tagstream_held_reports")
    lines = sum(1 for _ in open(reports_file, "rb")) if os.path.exists(reports_file) else 0
    hold = f"{settings.delay_hold / 60_000:g} min"

    def by_type(types, mode):
        return ", ".join(f"{t} {reports.get((t, mode), 0):,.0f}" for t in types)
    realtime_types = [t for t in STANDARD_TYPES if t not in DELAYED_TYPES]
    return "\n".join([
        "",
        "summary",
        f"  events processed   {processed:,.0f} in {elapsed:.1f}s = {processed / max(elapsed, 1e-9):,.0f} events/s "
        "end to end (first produce -> last processed)",
        f"  real-time reports  {by_type(realtime_types, 'realtime')}",
        "                     sent as soon as the tag was applied",
        f"  delayed reports    {by_type(DELAYED_TYPES, 'delayed')}",
        f"                     held {hold} of event time after the tag, then sent",
        f"  cancelled holds    {outcomes.get('cancelled', 0):,.0f}",
        f"                     staff removed the tag within {hold}: nothing is sent",
        f"  still held         {held:,.0f}",
        f"                     tagged less than {hold} before the last event; they go out once event time "
        f"passes their deadline, or {settings.idle_grace / 60_000:g} min of wall-clock time after it "
        "while the partition is idle",
        f"  unreportable       {unreportable:,.0f}",
        "                     no user identity (app id + unionid/openid, or click id): on "
        f"{settings.topic('unreportable_topic')}, not sent",
        "  event outcomes     " + ", ".join(f"{k} {v:,.0f}" for k, v in sorted(outcomes.items())),
        f"  reports file       {reports_file} ({lines:,} reports of this run)",
    ])
