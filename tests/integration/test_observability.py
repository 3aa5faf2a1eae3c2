"""Observability against a real Prometheus (Debian's `prometheus`) scraping a real worker and
sink on the real broker.

The run gives every panel something to show: rules and events from the seeded log generator
(reports of every kind, holds, unreportable customers), malformed records (dead letters), an
API that fails 20% of requests for a while and rejects two reports for good (retries, sink
failures). Then the worker is paused mid-stream (SIGSTOP) while records keep arriving, with
record timestamps ten minutes old, and one more rule lands on a partition whose committed
offset never moved during the run: lag grows, is older than the real-time target, and makes
no progress. So every alert's expression has data too.

What it shows:
- every panel query of deploy/grafana/tagstream.json and every alert expression of
  deploy/prometheus/alerts.yml, evaluated through Prometheus's HTTP API over the run,
  returns series with real values and no error;
- with the worker paused, tagstream's lag per partition (exported by the sink's LagMonitor,
  and printed by `tagstream lag`) equals what Kafka's own kafka-consumer-groups tool prints
  for the same group at the same moment.

Set TAGSTREAM_DASHBOARD_PNG=path to also render the key panels' queries from this run to a
PNG with headless Chromium (`make dashboard-png` does, for docs/operations.md).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from streams.observability.observe import scrape, total
from tests import kafka_io
from tests.integration.conftest import KAFKA_SH, REPO, Pipeline, SinkProcess, exported_lag, free_port, wait_until
from tests.logs import generate_log, kafka_partition
from tests.marketing_api_server import Faults, MarketingApiServer, ServerThread
from tests.reference_model import reference_reports
from tests.unit.test_observability import load_observability

PARTITIONS = 4
TOKEN = "tok-observability-7c1e"


class Prometheus:
    """Debian's prometheus on a free port, scraping the given worker and sink ports every second,
    with tagstream's alert rules; its configuration is deploy/prometheus/prometheus.yml with
    only the targets and intervals changed."""

    def __init__(self, work: Path, worker_port: int, sink_port: int, **more_ports: int):
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus is missing: run deploy/setup-system.sh --with-prometheus (make test does)")
        config = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        config["rule_files"] = [str(REPO / "deploy" / "prometheus" / "alerts.yml")]
        ports = {"tagstream-worker": worker_port, "tagstream-sink": sink_port,
                 **{"tagstream-" + job: port for job, port in more_ports.items()}}
        config["scrape_configs"] = [job for job in config["scrape_configs"] if job["job_name"] in ports]
        for job in config["scrape_configs"]:
            job["static_configs"] = [{"targets": [f"127.0.0.1:{ports[job['job_name']]}"]}]
        (work / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.log = open(work / "prometheus.log", "wb")
        self.process = subprocess.Popen(
            [binary, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not self._ready():
            assert self.process.poll() is None and time.monotonic() < deadline, \
                (work / "prometheus.log").read_text()[-2000:]
            time.sleep(0.2)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as answer:
                return answer.status == 200
        except OSError:
            return False

    def api(self, path: str, **params) -> dict:
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}", timeout=30) as answer:
            body = json.loads(answer.read())
        assert body["status"] == "success", body
        return body["data"]

    def query_range(self, expr: str, start: float, end: float) -> list:
        return self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step="1")["result"]

    def wait_for_scrapes(self, jobs: set[str], more: int = 1, timeout: float = 60) -> None:
        """Until each job has been scraped successfully `more` more times from now."""
        def scrapes() -> dict[str, int]:
            result = self.api("query", query="count_over_time(up[10m]) and up == 1")["result"]
            return {r["metric"]["job"]: int(r["value"][1]) for r in result}
        target = {job: scrapes().get(job, 0) + more for job in jobs}
        deadline = time.monotonic() + timeout
        while any(scrapes().get(job, 0) < n for job, n in target.items()):
            assert time.monotonic() < deadline, f"Prometheus did not scrape {jobs}"
            time.sleep(0.5)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def _real_values(series: list) -> int:
    return sum(1 for s in series for _, v in s["values"] if not math.isnan(float(v)))


def _kafka_consumer_groups(group: str, topics: set[str]) -> dict[tuple[str, int], int]:
    """LAG per (topic, partition) of `topics` as Kafka's own kafka-consumer-groups --describe
    prints it. (It also lists the changelog partitions Faust assigns to the group's members,
    with no committed offset and LAG "-".)"""
    run = subprocess.run([str(KAFKA_SH), "tool", "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
                          "--bootstrap-server", kafka_io.BOOTSTRAP, "--describe", "--group", group],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = {}
    for line in run.stdout.splitlines():
        cols = line.split()
        if len(cols) >= 6 and cols[0] == group and cols[1] in topics and cols[2].isdigit():
            rows[(cols[1], int(cols[2]))] = int(cols[5])
    assert rows, run.stdout
    return rows


def _tagstream_lag_cli(pipeline: Pipeline, group: str) -> dict[tuple[str, int], int]:
    run = subprocess.run([sys.executable, "-m", "streams.cli", "lag", "--group", group], cwd=REPO,
                         env={**os.environ, **pipeline.settings.to_environ()}, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].split() == ["GROUP", "TOPIC", "PARTITION", "CURRENT-OFFSET", "LOG-END-OFFSET", "LAG", "LAG-SECONDS"]
    return {(c[1], int(c[2])): int(c[5]) for c in (line.split() for line in lines[1:])}


def _events(log_events: list[dict], timestamp_ms=None) -> list[tuple]:
    out = []
    for e in log_events:
        topic = "tag_events" if "op" in e else "contact_events"
        record = (topic, f"{e['corp_id']}:{e['external_userid']}", e)
        out.append(record if timestamp_ms is None else (*record, timestamp_ms))
    return out


def test_every_panel_and_alert_query_returns_data_and_lag_matches_kafka(kafka_broker, tmp_path):
    observability = load_observability()
    pipeline = Pipeline(tmp_path, partitions=PARTITIONS, metrics_interval=1000)
    topic = pipeline.topic
    log = generate_log(3, customers=60, events=1600)
    partition_of = lambda key: kafka_partition(key, PARTITIONS)
    # two reports the API rejects for good, one early and one late in phase 1
    early, _ = reference_reports(log["rules"], log["events"][:300], partition_of=partition_of)
    phase1, _ = reference_reports(log["rules"], log["events"][:1000], partition_of=partition_of)
    late = [r for r in phase1 if r["mode"] == "realtime" and r["event_ts"] > log["events"][700]["ts"]]
    rejected = {next(r for r in early if r["mode"] == "realtime")["outer_action_id"], late[0]["outer_action_id"]}
    server = MarketingApiServer(TOKEN, Faults(seed=5, retryable_rate=0.2, permanent_ids=rejected))
    api = ServerThread(server).start()
    (tmp_path / "token").write_text(TOKEN)
    worker = pipeline.start_worker()
    sink = SinkProcess(pipeline, api.base_url, tmp_path / "token", tmp_path / "sink.log").start()
    prometheus = None
    try:
        # Rules first, committed before Prometheus starts: their offsets never move in its window.
        pipeline.send(*[("tag_mappings", k, v) for k, v in log["rules"]])
        worker.wait_for_rules(len(log["rules"]))
        mappings = {(topic("tag_mappings"), p) for p in range(PARTITIONS)}
        wait_until(lambda: all(exported_lag(sink.port, pipeline.settings.app_id).get(tp) == 0 for tp in mappings),
              60, "the rules' offsets to be committed", worker, sink)
        prometheus = Prometheus(tmp_path, pipeline.settings.metrics_port, sink.port)
        started = time.time()
        prometheus.wait_for_scrapes({"tagstream-worker", "tagstream-sink"})

        # Phase 1: live traffic, some of it malformed; the sink meets retries and rejections.
        live = _events(log["events"][:1000])
        bad = [("tag_events", b"wwP:bad", b"{not json"), ("contact_events", b"wwP:bad", b"\xff\xfe")] * 10
        for i in range(0, len(live), 100):      # over about 15 s, so every rate has a slope
            pipeline.send(*live[i:i + 100])
            if i % 200 == 0:
                pipeline.send_raw(*bad[i // 100:i // 100 + 4])
            time.sleep(1.5)
        wait_until(lambda: total(worker.metrics(), "tagstream_events_total", topic=topic("tag_events"))
              + total(worker.metrics(), "tagstream_events_total", topic=topic("contact_events")) >= 1000,
              120, "phase 1 to be applied", worker, sink)
        sink_group = f"{pipeline.settings.app_id}-sink"
        wait_until(lambda: total(scrape(sink.port), "tagstream_sink_reports_total", outcome="failed") >= len(rejected)
              and not any(exported_lag(sink.port, sink_group).values()),
              120, "phase 1 to be delivered", worker, sink)
        server.faults.retryable_rate = 0.0
        prometheus.wait_for_scrapes({"tagstream-worker"}, more=3)   # the worker's final counts

        # Phase 2: the worker stops mid-stream; records keep coming, ten minutes old.
        worker.process.send_signal(signal.SIGSTOP)
        old = int(time.time() * 1000) - 10 * 60_000
        backlog = _events(log["events"][1000:], timestamp_ms=old)
        for i in range(0, len(backlog), 150):
            pipeline.send(*backlog[i:i + 150])
            time.sleep(1.5)
        key, rule = log["rules"][0]
        pipeline.send(("tag_mappings", key, {**rule, "version": 99}))
        produced_at = time.monotonic()

        # Lag per partition: tagstream's exported gauge, `tagstream lag`, and Kafka's tool agree.
        group = pipeline.settings.app_id
        ours = {}
        while time.monotonic() - produced_at < 30:
            before = exported_lag(sink.port, group)
            theirs = _kafka_consumer_groups(group, {topic(t) for t in ("tag_events", "contact_events", "tag_mappings")})
            cli = _tagstream_lag_cli(pipeline, group)
            ours = exported_lag(sink.port, group)
            if ours == before and {tp: ours.get(tp) for tp in theirs} == theirs:
                break
            time.sleep(1)
        assert {tp: ours.get(tp) for tp in theirs} == theirs
        assert {tp: cli.get(tp) for tp in theirs} == theirs
        assert set(theirs) == set(ours)                       # every partition has a committed offset
        assert sum(theirs.values()) == len(backlog) + 1       # the paused worker's backlog, exactly
        time.sleep(4)                                         # Prometheus scrapes the paused state

        # Every panel query and every alert expression returns real data over the run.
        end = time.time()
        empty = []
        for title, query in observability.panel_queries():
            if observability.of_the_ingest(query):     # test_the_wecom_ingest_panels_and_alert_have_data
                continue
            series = prometheus.query_range(observability.prometheus_expr(query), started, end)
            if not series or _real_values(series) == 0:
                empty.append(f"panel {title!r}: {query}")
        for alert in observability.ALERTS:
            if observability.of_the_ingest(alert.expr):
                continue
            if alert.name == "TagstreamErasureOverdue":
                # an erasure ten minutes overdue cannot be arranged in this run; its signal has
                # data here (its panel, all zeros), and promtool's rule test makes it fire
                # (deploy/prometheus/alerts_test.yml)
                continue
            if _real_values(prometheus.query_range(alert.expr, started, end)) == 0:
                empty.append(f"alert {alert.name}: {alert.expr}")
        assert not empty, "queries without data:\n" + "\n".join(empty)
        for variable in ("topic", "partition"):
            values = prometheus.api(f"label/{variable}/values", **{"match[]": "tagstream_consumer_group_lag"})
            assert values, variable
        # the lag seen in Prometheus is the paused backlog, and older than the real-time target
        lag_now = prometheus.api("query", query=f'sum(max by (topic, partition) '
                                 f'(tagstream_consumer_group_lag{{group="{group}"}}))')["result"]
        assert float(lag_now[0]["value"][1]) == len(backlog) + 1
        firing = prometheus.api("query", query="ALERTS")["result"]
        assert {a["metric"]["alertname"] for a in firing} >= {"TagstreamLagOverRealtimeTarget"}

        if os.environ.get("TAGSTREAM_DASHBOARD_PNG"):
            from tests.integration.dashboard_png import render
            render(prometheus.url, Path(os.environ["TAGSTREAM_DASHBOARD_PNG"]), started, end, group)
    finally:
        if worker.process.poll() is None:
            worker.process.send_signal(signal.SIGCONT)
        if prometheus:
            prometheus.stop()
        sink.stop()
        pipeline.stop()
        api.stop()


def test_the_wecom_ingest_panels_and_alert_have_data(kafka_broker, tmp_path):
    """The dashboard's WeCom row and the refused-callbacks alert, on a real Prometheus scraping
    the worker, the sink, the ingest and the enrichment while the fake WeCom's staff tag
    customers (tokens invalidated, 45009 bursts, busy answers) and then a corp's callbacks
    arrive signed with a wrong token."""
    from tests.fake_wecom.callbacks import CallbackSender
    from tests.integration.test_wecom_end_to_end import CORPS, Deployment, World
    from streams.wecom.crypto import CallbackCrypto
    import asyncio
    observability = load_observability()
    world = World(seed=21, customers_per_corp=6)
    with Deployment(tmp_path, world) as deployment:
        world.fake.busy_rate = 0.05
        prometheus = Prometheus(tmp_path, deployment.pipeline.settings.metrics_port, deployment.sink.port,
                                ingest=deployment.ingest.port,
                                enrich=int(deployment.enrich.env["TAGSTREAM_ENRICH_METRICS_PORT"]))
        try:
            started = time.time()
            prometheus.wait_for_scrapes({"tagstream-worker", "tagstream-sink", "tagstream-ingest", "tagstream-enrich"})
            deployment.staff_at_work()
            corp, (_, key, _, _) = sorted(CORPS.items())[0]
            wrong = {corp: CallbackCrypto("a-token-that-is-not-the-corp-s", key)}

            async def refused() -> None:
                async with CallbackSender(deployment.ingest.base_url, wrong, retries=0) as sender:
                    for n in range(80):
                        assert not await sender.send(corp, {
                            "ToUserName": corp, "FromUserName": "sys", "CreateTime": int(time.time()),
                            "MsgType": "event", "Event": "change_external_contact",
                            "ChangeType": "edit_external_contact", "UserID": "staff1", "ExternalUserID": f"wm-x{n}"})
                        await asyncio.sleep(0.1)
            asyncio.run(refused())
            prometheus.wait_for_scrapes({"tagstream-ingest", "tagstream-enrich", "tagstream-worker"}, more=3)
            end = time.time()
            empty = []
            for title, query in observability.panel_queries():
                if observability.of_the_ingest(query):
                    series = prometheus.query_range(observability.prometheus_expr(query), started, end)
                    if not series or _real_values(series) == 0:
                        empty.append(f"panel {title!r}: {query}")
            for alert in observability.ALERTS:
                if observability.of_the_ingest(alert.expr):
                    series = prometheus.query_range(alert.expr, started, end)
                    if _real_values(series) == 0:
                        empty.append(f"alert {alert.name}: {alert.expr}")
                    else:
                        assert {s["metric"].get("outcome") for s in series} == {"bad_signature"}, series
            assert not empty, "queries without data:\n" + "\n".join(empty)
        finally:
            prometheus.stop()
