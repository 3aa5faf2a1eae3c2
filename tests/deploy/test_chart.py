"""`make deploy-test`: the Helm chart, checked and run on this machine.

- `helm lint` passes, and `helm template` renders objects that `kubernetes-validate --strict`
  accepts for Kubernetes 1.30 and 1.37 (the custom resources have no schema there: the
  PrometheusRule is compared with the shipped alert rules instead, and KEDA's cap with the
  partition count).
- The rendered worker and sink run under `podman kube play` against the local broker and a
  local Marketing API. They deliver a live load exactly as the reference model says, each
  report once, though the worker's pod is restarted (SIGTERM: it drains, commits and
  leaves the group) in the middle of it.
  podman 4.3 plays Pods and Deployments, not StatefulSets, and cannot map ports on the host
  network; `playable` makes those two changes and nothing else (the pod templates, probes,
  settings and secrets are the chart's).
"""
from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import uuid

import orjson
import pytest
import yaml

from tests.deploy.helpers import REPO, applied_order, get, read_topics, rules_folded, sh, wait_until
from tests.integration.conftest import free_port
from tests.logs import kafka_partition
from tests.marketing_api_server import MarketingApiServer, ServerThread
from tests.reference_model import reference_reports

pytestmark = pytest.mark.deploy

CHART = REPO / "deploy" / "helm" / "tagstream"
HELM = os.environ.get("HELM", str(REPO / ".state" / "bin" / "helm"))      # make deploy-test builds it
EVERYTHING = ["--set", "monitoring.serviceMonitor=true", "--set", "monitoring.prometheusRule=true",
              "--set", "keda.enabled=true", "--set", "ingest.enabled=true", "--set", "ingest.corpsConfigMap=corps",
              "--set", "secrets.values.marketing-api-token=t0ken", "--set", "secrets.values.sasl-password=s3cret"]


def render(*flags: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(sh(HELM, "template", "t", str(CHART), *flags)) if doc]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def test_the_chart_lints_and_renders_what_kubernetes_accepts(tmp_path):
    sh(HELM, "lint", "--strict", str(CHART))
    for flags in ([], EVERYTHING):
        rendered = tmp_path / "rendered.yaml"
        rendered.write_text(sh(HELM, "template", "t", str(CHART), *flags))
        for version in ("1.30.0", "1.37.0"):
            out = sh(str(REPO / ".venv" / "bin" / "kubernetes-validate"), "--strict", "-k", version, str(rendered))
            assert "passed for resource statefulset/t-tagstream-worker" in out, out

    docs = render(*EVERYTHING)
    worker = by_kind(docs, "StatefulSet")[0]
    assert worker["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "state"
    pod = worker["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"]["memory"] == "768Mi"
    assert pod["securityContext"]["runAsNonRoot"] is True
    headless = [s for s in by_kind(docs, "Service") if s["metadata"]["name"] == "t-tagstream-worker"][0]
    assert headless["spec"]["clusterIP"] == "None"
    assert by_kind(docs, "PodDisruptionBudget")[0]["spec"]["maxUnavailable"] == 1
    # every setting in the ConfigMap; no secret value anywhere but the Secret
    settings = by_kind(docs, "ConfigMap")[0]["data"]
    assert settings["TAGSTREAM_METRICS_HOST"] == "0.0.0.0" and settings["TAGSTREAM_PARTITIONS"] == "12"
    outside_secret = yaml.safe_dump([d for d in docs if d["kind"] != "Secret"])
    assert "t0ken" not in outside_secret and "s3cret" not in outside_secret
    # each component mounts only the secrets it reads
    mounted = {d["metadata"]["name"]: sorted(item["key"] for v in d["spec"]["template"]["spec"]["volumes"]
                                             if "secret" in v for item in v["secret"]["items"])
               for d in by_kind(docs, "Deployment") + by_kind(docs, "StatefulSet")}
    assert mounted["t-tagstream-worker"] == ["sasl-password"]
    assert mounted["t-tagstream-sink"] == ["marketing-api-token", "sasl-password"]
    # the PrometheusRule is the shipped rules file, and promtool accepts it
    rule = by_kind(docs, "PrometheusRule")[0]["spec"]
    assert rule == yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yml").read_text())
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(yaml.safe_dump(rule))
    sh("promtool", "check", "rules", str(rules_file))
    # KEDA scales the StatefulSet on lag, never past the partitions; asking more is an error
    scaled = by_kind(docs, "ScaledObject")[0]["spec"]
    assert scaled["scaleTargetRef"]["kind"] == "StatefulSet" and scaled["maxReplicaCount"] == 12
    too_many = subprocess.run([HELM, "template", "t", str(CHART), "--set", "keda.enabled=true",
                               "--set", "keda.maxReplicas=13"], capture_output=True, text=True)
    assert too_many.returncode != 0 and "keda.maxReplicas 13 is over settings.partitions 12" in too_many.stderr


def events_taken(port: int) -> float:
    """Tag and contact events the worker on `port` took in, from its /metrics."""
    body = get(f"http://127.0.0.1:{port}/metrics") or b""
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
               if line.startswith("tagstream_events_total{") and "-events" in line)


def playable(docs: list[dict]) -> list[dict]:
    """The chart's objects as podman 4.3 plays them: each StatefulSet as a Deployment with a
    PersistentVolumeClaim per claim template; no port mappings (host network), so probes
    name the port by number; a Secret as a ConfigMap of the same keys, mounted at the
    same path (podman 4.3 writes a Secret's `data` to the files without decoding it); Services, the PDB and custom resources left out."""
    out = []
    for doc in docs:
        if doc["kind"] == "StatefulSet":
            spec, name = doc["spec"], doc["metadata"]["name"]
            for claim in spec.pop("volumeClaimTemplates"):
                claim_name = f"{claim['metadata']['name']}-{name}"
                out.append({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim_name},
                            "spec": claim["spec"]})
                spec["template"]["spec"]["volumes"].append(
                    {"name": claim["metadata"]["name"], "persistentVolumeClaim": {"claimName": claim_name}})
            for field in ("serviceName", "podManagementPolicy", "updateStrategy"):
                spec.pop(field, None)
            doc = {**doc, "kind": "Deployment"}
        if doc["kind"] == "Deployment":
            for container in doc["spec"]["template"]["spec"]["containers"]:
                ports = {port["name"]: port["containerPort"] for port in container.pop("ports", [])}
                for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                    if probe in container:
                        container[probe]["httpGet"]["port"] = ports[container[probe]["httpGet"]["port"]]
        if doc["kind"] == "Secret":          # podman 4.3 writes `data` to the files undecoded
            doc = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"],
                   "data": {key: base64.b64decode(value).decode() for key, value in doc["data"].items()}}
        if doc["kind"] == "Deployment":
            for volume in doc["spec"]["template"]["spec"]["volumes"]:
                if "secret" in volume:
                    secret = volume.pop("secret")
                    volume["configMap"] = {"name": secret["secretName"], "items": secret["items"]}
        if doc["kind"] in ("ConfigMap", "Secret", "Deployment", "PersistentVolumeClaim"):
            out.append(doc)
    return out


def test_the_rendered_worker_and_sink_deliver_a_live_load_under_podman_kube_play(images, kafka_broker, tmp_path):
    tag = uuid.uuid4().hex[:8]
    prefix, token = f"kp-{tag}.", f"token-{tag}"
    worker_port, sink_port = free_port(), free_port()
    api = ServerThread(MarketingApiServer(token)).start()
    values = {
        "image": {"repository": "localhost/tagstream", "tag": "latest", "pullPolicy": "Never"},
        "settings": {"broker": f"kafka://{kafka_broker}", "app_id": f"kp-{tag}", "topic_prefix": prefix,
                     "partitions": 4, "metrics_host": "127.0.0.1", "marketing_api_base": api.base_url},
        "worker": {"replicas": 1, "metricsPort": worker_port},
        "sink": {"metricsPort": sink_port},
        "secrets": {"values": {"marketing-api-token": token}},
    }
    (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
    play = tmp_path / "play.yaml"
    play.write_text(yaml.safe_dump_all(playable(render("-f", str(tmp_path / "values.yaml"))), sort_keys=False))
    env = {"TAGSTREAM_BROKER": f"kafka://{kafka_broker}", "TAGSTREAM_APP_ID": f"kp-{tag}",
           "TAGSTREAM_TOPIC_PREFIX": prefix, "TAGSTREAM_PARTITIONS": "4"}
    tagstream = str(REPO / ".venv" / "bin" / "tagstream")
    try:
        sh("podman", "kube", "play", "--network", "host", str(play))
        for port in (worker_port, sink_port):           # the probes' endpoint, as the kubelet asks it
            wait_until(lambda: get(f"http://127.0.0.1:{port}/healthz") == b"ok\n", 180, f"/healthz on {port}")
        sh(tagstream, "load", "--events", "0", "--seed", "4", env=env)          # the rules first
        rules = len(asyncio.run(read_topics(kafka_broker, prefix, ["tag-mappings"]))["tag-mappings"])
        wait_until(lambda: rules_folded(worker_port) >= rules, 120, f"the worker to fold {rules} rule versions")
        # live traffic, and the worker's pod restarted in the middle of it: SIGTERM, then a new
        # container on the same claim (what a StatefulSet's rolling update does to each pod)
        load = subprocess.Popen([tagstream, "load", "--events", "10000", "--seed", "4", "--no-rules",
                                 "--rate", "2000"], cwd=REPO, env={**os.environ, **env},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_until(lambda: rules_folded(worker_port) >= rules and events_taken(worker_port) > 1000, 30,
                   "the worker to take the load")
        sh("podman", "pod", "restart", "t-tagstream-worker-pod-0")
        assert load.wait(120) == 0, load.stdout.read()
        said = sh("podman", "logs", "t-tagstream-worker-pod-0-worker") + \
            subprocess.run(["podman", "logs", "t-tagstream-worker-pod-0-worker"], capture_output=True, text=True).stderr
        assert "stopping: the open batch is drained" in said, said[-3000:]

        topics = asyncio.run(read_topics(kafka_broker, prefix, ["tag-mappings", "tag-events", "contact-events"]))
        rules = [(r.key.decode(), orjson.loads(r.value)) for r in topics["tag-mappings"]]
        ordered = applied_order(topics["contact-events"], topics["tag-events"], 4)
        expected, _ = reference_reports(rules, ordered, partition_of=lambda key: kafka_partition(key, 4),
                                        flush_at_end=False)
        want = {r["outer_action_id"] for r in expected}
        assert len(ordered) == 10_000 and len(want) > 300
        def accepted() -> set[str]:
            with api.server.lock:
                return set(api.server.accepted)
        try:
            wait_until(lambda: accepted() >= want, 120, f"{len(want)} reports at the Marketing API")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {len(accepted() & want)} came, {len(accepted() - want)} not expected; "
                                 f"the API answered {dict(api.server.answers)}") from None
        assert accepted() == want, f"{len(accepted() - want)} reports not expected"
        assert sum(api.server.duplicates.values()) == 0, api.server.duplicates.most_common(3)
        assert api.server.tokens_seen == {token}         # the token came from the chart's Secret, as a file
        print(f"kube play: {len(ordered)} events, {len(want)} reports delivered once each")
    finally:
        if not os.environ.get("TAGSTREAM_DEPLOY_KEEP"):
            subprocess.run(["podman", "kube", "down", str(play)], capture_output=True)
            # kube down leaves the claim's volume, and one the ConfigMap of the secrets was written to
            subprocess.run(["podman", "volume", "rm", "-f", "state-t-tagstream-worker", "t-tagstream-secrets"],
                           capture_output=True)
        api.stop()
