"""`make deploy-test`: the images and the compose stack, for real, on this machine's podman.

- The images build from the checkout on a base made here by mmdebstrap; `tagstream --help`
  runs in the image as a non-root user.
- `podman-compose up` brings up the broker, two workers, the sink and Prometheus. The
  rules of three loads go in first; then the loads, one after another, and the workers
  are restarted one at a time while the second and third are processed (`podman-compose restart`: SIGTERM, then a new
  container on the same state volume). The reports file then holds exactly the real-time
  reports the reference model computes from the input topics: none lost, none twice.
  Prometheus in the stack has a non-empty `tagstream_consumer_group_lag`.
- `down -v` leaves no container and no volume of the project.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections import Counter

import orjson
import pytest

from tests.deploy.helpers import REPO, applied_order, get, project_leftovers, read_topics, rules_folded, sh, wait_until
from tests.logs import kafka_partition
from tests.reference_model import reference_reports

pytestmark = pytest.mark.deploy

COMPOSE = [str(REPO / ".venv" / "bin" / "podman-compose"), "-f", str(REPO / "deploy" / "compose.yaml")]
BROKER, PREFIX, PROMETHEUS = "127.0.0.1:29092", "compose.", "http://127.0.0.1:29090"
WORKERS = {"worker-1": 29464, "worker-2": 29474}


def test_the_image_runs_tagstream_as_a_non_root_user(images):
    assert "usage: tagstream" in sh("podman", "run", "--rm", "--pull=never", "localhost/tagstream:latest", "--help")
    assert sh("podman", "run", "--rm", "--pull=never", "--entrypoint", "id", "localhost/tagstream:latest",
              "-u").strip() == "10001"
    labels = json.loads(sh("podman", "image", "inspect", "localhost/tagstream:latest"))[0]["Labels"]
    assert labels["org.opencontainers.image.title"] == "tagstream"
    tools = sh("podman", "run", "--rm", "--pull=never", "--entrypoint", "sh", "localhost/tagstream:latest", "-c",
               "command -v gcc cc pip || true")
    assert tools.strip() == "", f"the final stage has build tools: {tools}"


def test_the_stack_reports_what_the_model_expects_through_a_rolling_restart(images, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    token = tmp_path / "token"
    token.write_text("unused: the file sink is the default\n")
    env = {"TAGSTREAM_COMPOSE_OUT": str(out), "TAGSTREAM_API_TOKEN_FILE": str(token)}
    sh(*COMPOSE, "down", "-v", env=env)
    try:
        sh(*COMPOSE, "up", "-d", env=env)
        for port in WORKERS.values():
            wait_until(lambda: get(f"http://127.0.0.1:{port}/metrics") is not None, 180, f"the worker on {port}")

        def load(seed: int, events: int, *flags: str) -> subprocess.Popen:
            return subprocess.Popen([*COMPOSE, "--profile", "load", "run", "--rm", "load",
                                     "load", "--events", str(events), "--seed", str(seed), *flags],
                                    cwd=REPO, env={**os.environ, **env}, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)

        def finished(process: subprocess.Popen) -> None:
            assert process.wait(300) == 0, process.stdout.read()

        # the rules of all three loads first, folded by the workers before any event: a rule
        # must be known before the events it maps (`tagstream rules import` refuses a past
        # effective_from without --retroactive; the load generator's rules are in the past)
        for seed in (1, 2, 3):
            finished(load(seed, 0))
        rules = len(asyncio.run(read_topics(BROKER, PREFIX, ["tag-mappings"]))["tag-mappings"])
        wait_until(lambda: sum(rules_folded(port) for port in WORKERS.values()) >= rules, 120,
                   f"the workers to fold {rules} rule versions")
        # live traffic, paced (event time = the wall clock): each topic partition in ts order
        loads = [load(1, 20_000, "--no-rules", "--rate", "2000")]
        finished(loads[0])
        for seed, worker in ((2, "worker-1"), (3, "worker-2")):        # one at a time, mid-load
            loads.append(load(seed, 30_000, "--no-rules", "--rate", "2000"))
            time.sleep(5)
            sh(*COMPOSE, "restart", worker, env=env)
            wait_until(lambda: get(f"http://127.0.0.1:{WORKERS[worker]}/metrics") is not None, 180,
                       f"{worker} back")
        for running in loads[1:]:
            finished(running)

        topics = asyncio.run(read_topics(BROKER, PREFIX, ["tag-mappings", "tag-events", "contact-events"]))
        rules = [(r.key.decode(), orjson.loads(r.value)) for r in topics["tag-mappings"]]
        ordered = applied_order(topics["contact-events"], topics["tag-events"], 4)
        assert len(ordered) == 80_000
        expected, _ = reference_reports(rules, ordered, partition_of=lambda key: kafka_partition(key, 4),
                                        flush_at_end=False)
        reports_file = out / "reports.ndjson"

        def delivered() -> list[str]:
            text = reports_file.read_text() if reports_file.exists() else ""
            return [orjson.loads(line)["outer_action_id"] for line in text.splitlines()]
        def diagnosis() -> str:
            """Where the missing reports went, for the failure message."""
            missing = {r["outer_action_id"]: r for r in expected if r["outer_action_id"] not in set(delivered())}
            unreportable = {(u["corp_id"], u["external_userid"], u["standard_type"]) for u in
                            (orjson.loads(r.value) for r in asyncio.run(read_topics(BROKER, PREFIX, ["unreportable"]))["unreportable"])}
            went = sum(1 for r in missing.values()
                       if (r["corp_id"], r["external_userid"], r["standard_type"]) in unreportable)
            return f"{len(missing)} missing, {went} of them on the unreportable topic: {list(missing.values())[:2]}"
        try:
            wait_until(lambda: len(delivered()) >= len(expected), 300, f"{len(expected)} reports in the file")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; {diagnosis()}") from None
        time.sleep(5)                                   # anything sent twice would arrive by now
        got = delivered()
        assert len(got) == len(set(got)), f"{len(got) - len(set(got))} reports sent twice"
        missing = [r for r in expected if r["outer_action_id"] not in set(got)]
        extra = set(got) - {r["outer_action_id"] for r in expected}
        assert not missing and not extra, (
            f"{len(missing)} missing, by corp and type: "
            f"{Counter((r['corp_id'], r['standard_type']) for r in missing).most_common(8)}; {len(extra)} extra")

        def lag_series() -> list:
            body = get(f"{PROMETHEUS}/api/v1/query?query=tagstream_consumer_group_lag")
            return json.loads(body)["data"]["result"] if body else []
        wait_until(lambda: len(lag_series()) > 0, 60, "tagstream_consumer_group_lag in Prometheus")
        print(f"compose: {len(ordered)} events, {len(got)} reports, each once, through restarts of both workers")
    finally:
        if not os.environ.get("TAGSTREAM_DEPLOY_KEEP"):    # set, the stack stays up to be looked into
            sh(*COMPOSE, "down", "-v", env=env)
    if not os.environ.get("TAGSTREAM_DEPLOY_KEEP"):
        assert project_leftovers("tagstream") == "", project_leftovers("tagstream")


def test_the_wecom_profile_turns_callbacks_into_the_reports_the_model_expects(images, tmp_path):
    """`--profile wecom`: the fake WeCom's staff tag customers of two demo corps; their signed,
    encrypted callbacks go through the ingest and the enrichment (in containers) to the
    workers, and the sink writes what the reference model computes from the events the
    enrichment committed."""
    out = tmp_path / "out"
    out.mkdir()
    token = tmp_path / "token"
    token.write_text("unused: the file sink is the default\n")
    callbacks = 300
    env = {"TAGSTREAM_COMPOSE_OUT": str(out), "TAGSTREAM_API_TOKEN_FILE": str(token),
           "WECOM_CALLBACKS": str(callbacks), "WECOM_RATE": "30"}
    wecom = [*COMPOSE, "--profile", "wecom"]
    sh(*wecom, "down", "-v", env=env)
    try:
        sh(*wecom, "up", "-d", env=env)
        done = out / "staff-done.json"
        wait_until(done.exists, 240, "the fake WeCom's staff to finish")
        summary = json.loads(done.read_text())
        assert summary["callbacks"] >= callbacks and summary["dropped"] == 0, summary

        def counted(port: int, metric: str, outcome: str) -> float:
            body = get(f"http://127.0.0.1:{port}/metrics") or b""
            return sum(float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
                       if line.startswith(metric + "{") and f'outcome="{outcome}"' in line)
        assert counted(28480, "tagstream_wecom_callbacks_total", "accepted") >= callbacks
        # every callback taken by the enrichment (committed, or ignored: nothing in it for the
        # worker), none dead-lettered
        enriched = lambda outcome: counted(28466, "tagstream_wecom_callbacks_enriched_total", outcome)  # noqa: E731
        wait_until(lambda: enriched("committed") + enriched("ignored") >= callbacks, 120,
                   f"the enrichment to take {callbacks} callbacks")
        assert enriched("dead_lettered") == 0 and enriched("committed") > 0
        topics = asyncio.run(read_topics(BROKER, PREFIX, ["tag-mappings", "tag-events", "contact-events"]))
        rules = [(r.key.decode(), orjson.loads(r.value)) for r in topics["tag-mappings"]]
        ordered = applied_order(topics["contact-events"], topics["tag-events"], 4)
        expected, _ = reference_reports(rules, ordered, partition_of=lambda key: kafka_partition(key, 4),
                                        flush_at_end=False)
        assert len(expected) > 20, f"only {len(expected)} reports from {len(ordered)} events"
        reports_file = out / "reports.ndjson"

        def delivered() -> list[str]:
            text = reports_file.read_text() if reports_file.exists() else ""
            return [orjson.loads(line)["outer_action_id"] for line in text.splitlines()]
        wait_until(lambda: len(delivered()) >= len(expected), 120, f"{len(expected)} reports in the file")
        time.sleep(3)
        got = delivered()
        assert len(got) == len(set(got)), f"{len(got) - len(set(got))} reports sent twice"
        assert set(got) == {r["outer_action_id"] for r in expected}
        print(f"compose, wecom profile: {summary['callbacks']} callbacks, {len(ordered)} events, "
              f"{len(got)} reports, each once")
    finally:
        if not os.environ.get("TAGSTREAM_DEPLOY_KEEP"):
            sh(*wecom, "down", "-v", env=env)
    if not os.environ.get("TAGSTREAM_DEPLOY_KEEP"):
        assert project_leftovers("tagstream") == "", project_leftovers("tagstream")
