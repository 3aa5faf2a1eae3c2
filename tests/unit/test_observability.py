"""The dashboard, alert rules and scrape config in deploy/ are generated, consistent with the
metrics tagstream really exports, and valid for Prometheus's own tools. (Whether every query
returns data from a real run is tests/integration/test_observability.py.)"""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.metrics import MetricWrapperBase

from streams.observability import metrics

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"


def load_observability():
    """deploy/observability.py as a module (deploy/ is not a package)."""
    if "observability" not in sys.modules:
        spec = importlib.util.spec_from_file_location("observability", REPO / "deploy" / "observability.py")
        module = sys.modules["observability"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["observability"]


observability = load_observability()


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: run deploy/setup-system.sh --with-prometheus (make test does)")
    return path


def _metric_objects() -> list:
    """Every metric defined in streams/observability/metrics.py (the one place metrics are defined)."""
    return [m for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)]


def _tagstream_metrics() -> dict[str, set[str]]:
    """Every tagstream_* sample name the process can export, with its label names."""
    names: dict[str, set[str]] = {}
    for metric in _metric_objects():
        base = metric._name                                            # noqa: SLF001
        suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count", "_created"],
                    }.get(metric._type, [""])                          # noqa: SLF001
        for suffix in suffixes:
            names[base + suffix] = set(metric._labelnames) | ({"le"} if suffix == "_bucket" else set())  # noqa: SLF001
    return names


def test_the_committed_dashboard_and_rules_are_what_the_builder_makes():
    assert observability.main(["--check"]) == 0, "run .venv/bin/python deploy/observability.py"


def test_every_query_names_only_metrics_and_labels_tagstream_exports():
    exported = _tagstream_metrics()
    queries = [q for _, q in observability.panel_queries()] + [a.expr for a in observability.ALERTS]
    for query in queries:
        for name in set(re.findall(r"\btagstream_[a-z_]+", query)):
            assert name in exported, f"{name} in {query!r} is not an exported metric"
        for name, selector in re.findall(r"\b(tagstream_[a-z_]+)\{([^}]*)\}", query):
            for label in re.findall(r"(\w+)\s*=~?", selector):
                assert label in exported[name], f"{name} has no label {label!r} ({query!r})"


def test_labels_stay_bounded_no_customer_ids_or_tokens():
    unbounded = {"external_userid", "customer", "unionid", "wechat_unionid", "openid", "click_id",
                 "outer_action_id", "event_id", "token", "access_token", "userid", "tag_id", "corp_id"}
    for name, labels in _tagstream_metrics().items():
        assert not labels & unbounded, f"{name} has unbounded labels {labels & unbounded}"


def test_metric_names_follow_prometheus_conventions():
    for name in _tagstream_metrics():
        family = re.sub(r"_(bucket|sum|count|created)$", "", name)
        assert re.fullmatch(r"tagstream_[a-z][a-z0-9_]*", family), name
        assert not re.search(r"_(ms|milliseconds|minutes|kb|mb)$", family), f"{name}: use base units"
    for metric in _metric_objects():
        assert metric._name.startswith("tagstream_")                   # noqa: SLF001
        if metric._type == "histogram" and "time" in metric._documentation.lower():  # noqa: SLF001
            assert metric._name.endswith("_seconds"), metric._name     # noqa: SLF001


def test_dashboard_has_the_variables_and_panels_platform_teams_need():
    dashboard = json.loads((REPO / "deploy" / "grafana" / "tagstream.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("topic", "partition"):
        assert variables[name]["type"] == "query" and variables[name]["includeAll"] and variables[name]["multi"]
    panels = [p for p in dashboard["panels"] if p["type"] == "timeseries"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    assert all(p["datasource"]["uid"] == "${datasource}" and p["targets"] for p in panels)
    text = json.dumps(dashboard)
    for metric in ("tagstream_events_total", "tagstream_consumer_group_lag{", "tagstream_consumer_group_lag_seconds",
                   "tagstream_event_to_report_seconds_bucket", "tagstream_tagging_delay_seconds_bucket",
                   "tagstream_dead_letters_total", "tagstream_sink_requests_total", "tagstream_rebalances_total",
                   "tagstream_held_reports", "tagstream_table_keys"):
        assert metric in text, metric
    assert '$topic' in text and '$partition' in text
    # each alert's signal is a panel with the alert's threshold drawn on it
    by_title = {p["title"]: p for p in panels}
    for alert in observability.ALERTS:
        panel = by_title[alert.name]
        assert panel["targets"][0]["expr"] == alert.signal
        steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
        assert steps[-1]["value"] == alert.threshold


def test_promtool_accepts_the_rules_and_the_scrape_config():
    promtool = _promtool()
    for args in (["check", "rules", str(PROMETHEUS_DIR / "alerts.yml")],
                 ["check", "config", str(PROMETHEUS_DIR / "prometheus.yml")]):
        run = subprocess.run([promtool, *args], capture_output=True, text=True)
        assert run.returncode == 0, run.stdout + run.stderr


def test_each_alert_fires_on_its_failure_and_stays_silent_when_healthy():
    """deploy/prometheus/alerts_test.yml: promtool's own rule unit tests, one per alert."""
    run = subprocess.run([_promtool(), "test", "rules", str(PROMETHEUS_DIR / "alerts_test.yml")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    tested = set(re.findall(r"alertname: (\w+)", (PROMETHEUS_DIR / "alerts_test.yml").read_text()))
    assert tested == {a.name for a in observability.ALERTS}


def test_gc_pauses_are_timed_per_generation_once():
    import gc

    from prometheus_client import REGISTRY

    from streams.observability import metrics

    def full_collections() -> float:
        return REGISTRY.get_sample_value("tagstream_gc_pause_seconds_count", {"generation": "2"}) or 0.0

    metrics.watch_gc_pauses()
    metrics.watch_gc_pauses()                     # a second call adds no second callback
    try:
        assert gc.callbacks.count(metrics._on_gc) == 1      # noqa: SLF001
        before = full_collections()
        gc.collect()
        assert full_collections() == before + 1
        assert REGISTRY.get_sample_value("tagstream_gc_pause_seconds_sum", {"generation": "2"}) > 0
    finally:
        gc.callbacks.remove(metrics._on_gc)               # noqa: SLF001
