"""Integration fixtures: the real local Kafka broker (started once per test session) and
tagstream workers as real child processes, each test module on its own topics."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Optional

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from streams.kafka.admin import ensure_topics
from streams.kafka.connection import client_kwargs
from streams.observability.observe import scrape, total
from streams.settings import Settings
from tests import kafka_io

REPO = Path(__file__).resolve().parents[2]
KAFKA_SH = REPO / "deploy" / "kafka" / "kafka.sh"


def pytest_collection_modifyitems(items):
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def kafka_broker():
    """A real single-node KRaft broker on 127.0.0.1:9092. Started if it is not running, and
    stopped at the end only if this session started it."""
    was_running = subprocess.run([str(KAFKA_SH), "status"], capture_output=True).returncode == 0
    subprocess.run([str(KAFKA_SH), "start"], check=True)
    yield kafka_io.BOOTSTRAP
    if not was_running:
        subprocess.run([str(KAFKA_SH), "stop"], check=False)


CLUSTER_SH = REPO / "deploy" / "kafka" / "cluster.sh"


@pytest.fixture(scope="module")
def secured_cluster() -> dict[str, str]:
    """The local secured cluster (deploy/kafka/cluster.sh: three KRaft nodes, SASL_SSL,
    SCRAM, TLS, ACLs), as Settings overrides that connect to it with replication factor 3.
    Started if it is not running, and stopped after the module only if it started it (three
    idle brokers would take CPU from the timed tests that follow)."""
    was_running = subprocess.run([str(CLUSTER_SH), "status"], capture_output=True).returncode == 0
    subprocess.run([str(CLUSTER_SH), "start"], check=True)
    env = subprocess.run([str(CLUSTER_SH), "env"], check=True, capture_output=True, text=True).stdout
    yield {name.removeprefix("TAGSTREAM_").lower(): value
           for name, value in (line.split("=", 1) for line in env.splitlines() if "=" in line)}
    if not was_running:
        subprocess.run([str(CLUSTER_SH), "stop"], check=False)


def wait_until(condition, timeout: float, what: str, *processes) -> None:
    """Poll `condition` until it holds; fail if it times out or one of `processes` (objects
    with a `.process` Popen) exits first."""
    deadline = time.monotonic() + timeout
    while not condition():
        for p in processes:
            assert p.process.poll() is None, f"{what}: a process exited"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def exported_lag(port: int, group: str) -> dict[tuple[str, int], int]:
    """tagstream_consumer_group_lag of `group` per (topic, partition), from a process's /metrics."""
    samples = scrape(port) or {}
    return {(dict(labels)["topic"], int(dict(labels)["partition"])): int(value)
            for labels, value in samples.get("tagstream_consumer_group_lag", {}).items()
            if dict(labels)["group"] == group}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerProcess:
    """`tagstream worker` in a child process, observed through its /metrics endpoint."""

    def __init__(self, settings: Settings, log_path: Path):
        self.settings = settings
        self.log_path = log_path
        self.process: Optional[subprocess.Popen] = None

    def start(self, env: Optional[dict] = None, source: Path = REPO) -> "WorkerProcess":
        """`source`: the checkout whose code runs (bench/worker.py's --against: another commit's)."""
        env = {**os.environ, **self.settings.to_environ(), **(env or {})}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "streams.cli", "worker"], env=env, cwd=source,
            stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def metrics(self) -> Optional[dict]:
        return scrape(self.settings.metrics_port)

    def events_applied(self) -> float:
        """Tag and contact events this worker has taken in (every outcome), from /metrics."""
        samples = self.metrics() or {}
        return sum(v for labels, v in samples.get("tagstream_events_total", {}).items()
                   if "events" in dict(labels).get("topic", ""))

    def wait_for_rules(self, versions: int, timeout: float = 60.0) -> None:
        """Block until the worker's rule book is ready and holds `versions` versions."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"worker exited:\n{self.log_tail()}"
            samples = self.metrics()
            if total(samples, "tagstream_rule_book_ready") == 1 and \
                    total(samples, "tagstream_rule_versions") >= versions:
                return
            time.sleep(0.2)
        raise AssertionError(f"worker did not load {versions} rule versions in {timeout}s:\n{self.log_tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class Pipeline:
    """One isolated tagstream deployment on the shared broker: its own topics, consumer
    group, state directory and metrics port."""

    def __init__(self, tmp_dir: Path, partitions: int = 4, **overrides):
        tag = uuid.uuid4().hex[:8]
        self.settings = Settings.load(overrides={
            "app_id": f"it-{tag}", "topic_prefix": f"it-{tag}.", "partitions": partitions,
            "data_dir": str(tmp_dir / "worker-data"), "metrics_port": free_port(),
            "log_level": "info", **overrides}, environ={})
        self.tmp_dir = tmp_dir
        self.workers: list[WorkerProcess] = []

    def topic(self, name: str) -> str:
        return self.settings.topic(name + "_topic")

    def start_worker(self, env: Optional[dict] = None) -> WorkerProcess:
        """A worker on this pipeline's settings; `env` adds variables (e.g. TAGSTREAM_FAILPOINT)."""
        worker = WorkerProcess(self.settings, self.tmp_dir / f"worker-{len(self.workers)}.log").start(env)
        self.workers.append(worker)
        return worker

    def create_topics(self) -> None:
        """The pipeline's topics, as a worker would create them (to write input before one starts)."""
        asyncio.run(ensure_topics(self.settings))

    @property
    def connection(self) -> dict:
        """The client arguments of this pipeline's broker (the local one, or the cluster)."""
        return client_kwargs(self.settings)

    def send(self, *records: tuple[str, str, Optional[dict]]) -> None:
        """Send (topic short name, key, JSON value[, timestamp ms]) records in order."""
        kafka_io.produce(((*kafka_io.json_record(self.topic(t), k, v), *rest) for t, k, v, *rest in records),
                         self.connection)

    def send_raw(self, *records: tuple[str, Optional[bytes], Optional[bytes]]) -> None:
        kafka_io.produce(((self.topic(t), k, v) for t, k, v in records), self.connection)

    def read(self, topic: str, until=lambda records: False, timeout: float = 30.0, settle: float = 0.0) -> list:
        return kafka_io.read_topic(self.topic(topic), self.settings.partitions, until, timeout, settle,
                                   self.connection)

    def consumer_groups(self) -> tuple[set[str], dict[str, dict]]:
        """Every consumer group id on the broker, and the committed offsets of this
        pipeline's groups: an operator tool must change neither."""
        async def ask() -> tuple[set[str], dict[str, dict]]:
            admin = AIOKafkaAdminClient(**self.connection)
            await admin.start()
            try:
                ids = {group_id for group_id, *_ in await admin.list_consumer_groups()}
                return ids, {g: {(tp.topic, tp.partition): meta.offset
                                 for tp, meta in (await admin.list_consumer_group_offsets(g)).items()}
                             for g in sorted(ids) if g.startswith(self.settings.app_id)}
            finally:
                await admin.close()
        return asyncio.run(ask())

    def stop(self, delete_topics: bool = False) -> None:
        """Stop the workers; `delete_topics` also deletes this pipeline's topics (benchmarks:
        every client that refreshes full cluster metadata pays for each topic left behind)."""
        for worker in self.workers:
            worker.stop()
        if delete_topics:
            kafka_io.delete_topics_with_prefix(self.settings.app_id, self.connection)


class SinkProcess:
    """`tagstream sink --target api` in a child process, on a pipeline's topics, delivering to
    `base_url` with the token read from `token_file` (or another `target`, e.g. file:PATH)."""

    def __init__(self, pipeline: Pipeline, base_url: str, token_file: Path, log_path: Path, target: str = "api"):
        self.target = target
        self.env = {**os.environ, **pipeline.settings.to_environ(),
                    "TAGSTREAM_MARKETING_API_BASE": base_url, "TAGSTREAM_ACCESS_TOKEN_FILE": str(token_file),
                    "TAGSTREAM_SINK_METRICS_PORT": str(free_port())}
        self.port = int(self.env["TAGSTREAM_SINK_METRICS_PORT"])
        self.log_path = log_path
        self.process = None

    def start(self) -> "SinkProcess":
        self.process = subprocess.Popen([sys.executable, "-m", "streams.cli", "sink", "--target", self.target],
                                        env=self.env, cwd=REPO, stdout=open(self.log_path, "ab"),
                                        stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(60)


class IngestProcess:
    """`tagstream ingest` (or, with `command="enrich"`, `tagstream enrich`) in a child process,
    on a pipeline's topics, for `corps` ({corp_id: (token, encoding_aes_key, contact_secret,
    wechat_app_id)}), whose secrets it reads from files written here (the corps file names
    them, never holds them)."""

    def __init__(self, pipeline: Pipeline, corps: dict[str, tuple], log_path: Path, command: str = "ingest",
                 suite: Optional[tuple] = None, **overrides: str):
        """`suite`: provider mode, (suite_id, token, encoding_aes_key, suite_secret,
        wechat_app_id, vault_key)."""
        self.command = command
        secrets = pipeline.tmp_dir / "secrets"
        secrets.mkdir(exist_ok=True)
        lines = ["corps:" if corps else "corps: []"]
        for corp_id, (token, aes_key, contact_secret, app_id) in corps.items():
            for name, value in (("token", token), ("encoding_aes_key", aes_key), ("contact_secret", contact_secret)):
                (secrets / f"{corp_id}.{name}").write_text(value)
            lines += [f"  - corp_id: {corp_id}", f"    wechat_app_id: {app_id}"]
            lines += [f"    {name}_file: {secrets / f'{corp_id}.{name}'}"
                      for name in ("token", "encoding_aes_key", "contact_secret")]
        if suite is not None:
            suite_id, token, aes_key, suite_secret, app_id, vault_key = suite
            for name, value in (("token", token), ("encoding_aes_key", aes_key), ("suite_secret", suite_secret),
                                ("vault_key", vault_key)):
                (secrets / f"{suite_id}.{name}").write_text(value)
            lines += ["suite:", f"  suite_id: {suite_id}", f"  wechat_app_id: {app_id}"]
            lines += [f"  {name}_file: {secrets / f'{suite_id}.{name}'}"
                      for name in ("token", "encoding_aes_key", "suite_secret")]
            overrides.setdefault("wecom_vault_key_file", str(secrets / f"{suite_id}.vault_key"))
        corps_file = pipeline.tmp_dir / "wecom-corps.yaml"
        corps_file.write_text("\n".join(lines) + "\n")
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **pipeline.settings.to_environ(), "TAGSTREAM_WECOM_CORPS_FILE": str(corps_file),
                    "TAGSTREAM_INGEST_LISTEN": f"127.0.0.1:{self.port}", "TAGSTREAM_ENRICH_METRICS_PORT": str(free_port()),
                    **{"TAGSTREAM_" + k.upper(): v for k, v in overrides.items()}}
        self.log_path = log_path
        self.process: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 60.0) -> "IngestProcess":
        import urllib.request
        self.process = subprocess.Popen([sys.executable, "-m", "streams.cli", self.command], env=self.env, cwd=REPO,
                                        stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT,
                                        start_new_session=True)
        if self.command != "ingest":
            return self

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(self.base_url + "/healthz", timeout=1) as response:
                    return response.status == 200
            except OSError:
                return False
        wait_until(healthy, timeout, "the ingest to answer /healthz", self)
        return self

    def metrics(self) -> Optional[dict]:
        return scrape(self.port)           # the ingest serves /metrics on its own port

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def assert_no_secret_exposed(pipeline: "Pipeline", metrics_ports: list[int], secrets: list[str]) -> None:
    """No secret in any of the processes' /metrics text, nor in any dead letter (SPEC §8:
    passwords and tokens never reach logs, metrics or dead letters; tests/conftest.py greps
    the logs)."""
    import urllib.request
    secrets = [s for s in secrets if s]
    for port in metrics_ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
        assert text and not [s for s in secrets if s in text], f"a secret in the metrics on port {port}"
    for record in pipeline.read("dead_letters", timeout=1):
        raw = (record.key or b"") + (record.value or b"")
        assert not [s for s in secrets if s.encode() in raw], "a secret in a dead letter"
