"""tagstream's clients on the local secured cluster (issue 19, SPEC §8): three KRaft nodes,
SASL_SSL with SCRAM, TLS between the brokers, ACLs (deploy/kafka/cluster.sh).

- `ensure_topics` creates every topic with replication factor 3 and min.insync.replicas 2,
  as the `tagstream` user, through the same connection function every client uses;
- a record produced with `producer_kwargs` (acks=all, idempotent) is read back with
  `client_kwargs`, over SASL_SSL;
- a second principal, `intruder`, authenticates but is refused the topics (no ACL);
- a wrong password fails authentication (and is not logged);
- a wrong password, an untrusted CA, a missing ACL and an unreachable bootstrap each end the
  worker, the sink and replay within 30 s with one line that names what to fix, no
  traceback and no password.
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError

from streams.kafka.admin import ensure_topics
from streams.kafka.connection import client_kwargs, producer_kwargs
from streams.settings import Settings
from tests.integration.conftest import assert_no_secret_exposed, free_port, wait_until
from tests.integration.test_semantics_pipeline import run_log_through_pipeline

def cluster_settings(cluster: dict[str, str], **overrides) -> Settings:
    tag = uuid.uuid4().hex[:8]
    return Settings.load({"app_id": f"it-{tag}", "topic_prefix": f"it-{tag}.", **cluster, **overrides}, environ={})


async def _topic_facts(settings: Settings, topic: str) -> tuple[int, str]:
    admin = AIOKafkaAdminClient(**client_kwargs(settings))
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
        replicas = {len(p["replicas"]) for p in described[0]["partitions"]}
        configs = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
        entries = {entry[0]: entry[1] for entry in configs[0].resources[0][4]}
        return replicas.pop() if len(replicas) == 1 else -1, entries["min.insync.replicas"]
    finally:
        await admin.close()


async def _round_trip(settings: Settings, topic: str) -> bytes:
    producer = AIOKafkaProducer(**producer_kwargs(settings))
    await producer.start()
    try:
        await producer.send_and_wait(topic, key=b"k", value=b"over SASL_SSL", partition=0)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(**client_kwargs(settings), group_id=None, auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, 0)])
        batch = await consumer.getmany(timeout_ms=10_000)
        return next(record.value for records in batch.values() for record in records)
    finally:
        await consumer.stop()


def test_topics_are_created_replicated_and_a_record_goes_round_over_sasl_ssl(secured_cluster):
    settings = cluster_settings(secured_cluster)
    created = asyncio.run(ensure_topics(settings))
    assert settings.topic("tag_events_topic") in created
    for name in ("tag_events_topic", "delivered_reports_topic"):
        assert asyncio.run(_topic_facts(settings, settings.topic(name))) == (3, "2")
    for internal in ("reporting_state-changelog", "rule_versions-changelog", "__assignor-__leader"):
        assert asyncio.run(_topic_facts(settings, f"{settings.app_id}-{internal}")) == (3, "2")
    assert asyncio.run(_round_trip(settings, settings.topic("tag_events_topic"))) == b"over SASL_SSL"


async def _send_once(settings: Settings, topic: str) -> None:
    producer = AIOKafkaProducer(**producer_kwargs(settings), request_timeout_ms=10_000,
                                metadata_max_age_ms=1_000)
    try:
        await asyncio.wait_for(producer.start(), 20)
        await asyncio.wait_for(producer.send_and_wait(topic, b"x"), 20)
    finally:
        await producer.stop()


def test_another_principal_is_refused_the_topics(secured_cluster):
    settings = cluster_settings(secured_cluster)
    asyncio.run(ensure_topics(settings))
    password_file = secured_cluster["sasl_password_file"].replace("tagstream.password", "intruder.password")
    intruder = settings.replace(sasl_username="intruder", sasl_password_file=password_file)
    with pytest.raises(KafkaError) as refused:
        asyncio.run(_send_once(intruder, settings.topic("tag_events_topic")))
    # no ACL at all: not even the idempotent producer's id (Write on some topic) is granted
    assert type(refused.value).__name__.endswith("AuthorizationFailedError"), repr(refused.value)


def test_a_wrong_password_fails_authentication(secured_cluster, tmp_path, caplog):
    """aiokafka reports it as "Unable to bootstrap" and logs the broker's answer; the
    one-line error that names the setting is the commands' job."""
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-the-password")
    settings = cluster_settings(secured_cluster).replace(sasl_password_file=str(wrong))
    with pytest.raises(KafkaError):
        asyncio.run(_send_once(settings, settings.topic("tag_events_topic")))
    assert any("SaslAuthenticationFailed" in r.getMessage() for r in caplog.records), caplog.text
    assert "not-the-password" not in caplog.text


def test_the_semantics_pipeline_equals_the_reference_model_on_the_secured_cluster(secured_cluster, tmp_path):
    """SPEC §4's generated log through a worker on the three-broker cluster, over SASL_SSL,
    every topic with three replicas, a worker killed mid-commit: the reference model's
    reports (tests/integration/test_semantics_pipeline.py's test, on the cluster)."""
    password = Path(secured_cluster["sasl_password_file"]).read_text().strip()

    def no_password_exposed(pipeline, worker) -> None:
        # a malformed record that names the broker's user, so the dead letter is there to grep
        pipeline.send_raw(("tag_events", b"wwP:bad", b'{"sasl": "' + secured_cluster["sasl_username"].encode() + b'"'))
        wait_until(lambda: pipeline.read("dead_letters", timeout=1), 60, "the dead letter", worker)
        assert_no_secret_exposed(pipeline, [pipeline.settings.metrics_port], [password])

    run_log_through_pipeline(tmp_path, seed=11, crash="changelog-acked:4", inspect=no_password_exposed,
                             **secured_cluster)


def _run_command(command: list[str], environ: dict[str, str]) -> tuple[int, float, str]:
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "streams.cli", *command], env={**os.environ, **environ},
                         capture_output=True, text=True, timeout=60)
    return run.returncode, time.monotonic() - started, run.stdout + run.stderr


COMMANDS = {"worker": ["worker"], "sink": ["sink", "--target", "stdout"],
            "replay": ["replay", "--from", "2026-01-01", "--to", "2026-01-02", "--dry-run", "--out", os.devnull]}


@pytest.mark.parametrize("fault, setting", [
    ("wrong password", "TAGSTREAM_SASL_PASSWORD_FILE"),
    ("untrusted CA", "TAGSTREAM_SSL_CAFILE"),
    ("missing ACL", "ACLs"),
    ("unreachable bootstrap", "TAGSTREAM_BROKER"),
])
def test_a_bad_connection_ends_each_command_within_30_s_with_one_line_naming_the_setting(
        secured_cluster, tmp_path, fault, setting):
    settings = cluster_settings(secured_cluster, data_dir=str(tmp_path / "data"), metrics_port="0",
                                sink_metrics_port="0")
    asyncio.run(ensure_topics(settings))           # the topics exist: the intruder meets the ACLs
    environ = settings.to_environ()
    secrets = [Path(secured_cluster["sasl_password_file"]).read_text().strip()]
    if fault == "wrong password":
        wrong = tmp_path / "wrong.password"
        wrong.write_text("wrong-pw-5b1e")
        environ["TAGSTREAM_SASL_PASSWORD_FILE"] = str(wrong)
        secrets.append("wrong-pw-5b1e")
    elif fault == "untrusted CA":
        environ["TAGSTREAM_SSL_CAFILE"] = "/etc/ssl/certs/ca-certificates.crt"     # not the cluster's CA
    elif fault == "missing ACL":
        intruder = secured_cluster["sasl_password_file"].replace("tagstream.password", "intruder.password")
        environ.update(TAGSTREAM_SASL_USERNAME="intruder", TAGSTREAM_SASL_PASSWORD_FILE=intruder)
        secrets.append(Path(intruder).read_text().strip())
    else:
        environ["TAGSTREAM_BROKER"] = f"kafka://127.0.0.1:{free_port()}"
    for name, command in COMMANDS.items():
        code, seconds, output = _run_command(command, environ)
        last = output.strip().splitlines()[-1]
        assert code != 0 and seconds < 30, f"{name}: exit {code} after {seconds:.0f} s\n{output[-2000:]}"
        assert last.startswith("tagstream: error: ") and setting in last, f"{name}: {output[-2000:]}"
        assert "Traceback" not in output, f"{name}: {output[-3000:]}"
        assert not [s for s in secrets if s in output], f"{name} printed a password"
