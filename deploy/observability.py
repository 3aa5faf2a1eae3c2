"""tagstream's Grafana dashboard and Prometheus alert rules, generated from one place.

    .venv/bin/python deploy/observability.py           # rewrite the two files below
    .venv/bin/python deploy/observability.py --check   # exit 1 if they are out of date

- `deploy/grafana/tagstream.json`: the dashboard, built with grafana-foundation-sdk (Grafana
  11.6 schema). Import it in Grafana; pick the Prometheus datasource in its variable.
- `deploy/prometheus/alerts.yml`: the alert rules, loaded by `deploy/prometheus/prometheus.yml`,
  and the same rules in `deploy/helm/tagstream/files/alerts.yml` for the chart's PrometheusRule.

Every alert is `(signal) OP threshold`. The signal is also a dashboard panel with the
threshold drawn on it, so what pages someone is what they see first. Panels and alerts are
plain data below (`ROWS`, `ALERTS`); the tests evaluate every query against a real
Prometheus scraping a real worker and sink (tests/integration/test_observability.py).

Lag series are exported by every tagstream process (streams/observability/lag.py), so panels take
`max by (group, topic, partition)` across processes before summing.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from grafana_foundation_sdk.builders.dashboard import (
    Dashboard, DatasourceVariable, QueryVariable, Row, ThresholdsConfig)
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.builders.timeseries import Panel as Timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.builders.common import GraphThresholdsStyleConfig
from grafana_foundation_sdk.models.common import GraphThresholdsStyleMode
from grafana_foundation_sdk.models.dashboard import (
    DataSourceRef, Threshold, ThresholdsMode, VariableOption, VariableRefresh, VariableSort)

HERE = Path(__file__).resolve().parent
DASHBOARD_PATH = HERE / "grafana" / "tagstream.json"
ALERTS_PATH = HERE / "prometheus" / "alerts.yml"
#: the same rules for the Helm chart's PrometheusRule (a chart reads no file outside itself)
CHART_ALERTS_PATH = HERE / "helm" / "tagstream" / "files" / "alerts.yml"

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"
TOPIC = 'topic=~"$topic"'
PARTITION = 'partition=~"$partition"'

#: A real-time report should reach the Marketing API well inside a minute; the worker's own
#: target is p99 ≤ 100 ms at half load. Lag older than this means reports are late.
REALTIME_TARGET_S = 60
LAG = f"max by (group, topic, partition) (tagstream_consumer_group_lag{{{TOPIC}, {PARTITION}}})"
LAG_SECONDS = f"max by (group, topic, partition) (tagstream_consumer_group_lag_seconds{{{TOPIC}, {PARTITION}}})"


@dataclass(frozen=True)
class Alert:
    name: str
    signal: str            # what is graphed; the alert fires when `(signal) op threshold`
    op: str
    threshold: float
    for_: str
    severity: str
    summary: str
    description: str
    unit: str = "short"

    @property
    def expr(self) -> str:
        return f"({prometheus_expr(self.signal)}) {self.op} {self.threshold:g}"


def prometheus_expr(query: str) -> str:
    """A panel query with the dashboard's variables at their 'All' values: the form
    Prometheus itself evaluates (alert rules, tests)."""
    return (query.replace('topic=~"$topic"', 'topic=~".*"').replace('partition=~"$partition"', 'partition=~".*"')
            .replace("$__rate_interval", "5m"))


#: erasure_deadline's default (streams/settings.py), in seconds
ERASURE_DEADLINE_S = 600

ALERTS = [
    Alert("TagstreamConsumerLagGrowing",
          "sum by (group, topic) (max by (group, topic, partition) "
          "(deriv(tagstream_consumer_group_lag[10m])))",
          ">", 0, "15m", "warning",
          "{{ $labels.group }} is falling behind on {{ $labels.topic }}",
          "Lag of group {{ $labels.group }} on {{ $labels.topic }} has grown for 15 minutes "
          "({{ $value | humanize }} messages/s). Add workers (up to the partition count) or find "
          "the slow step on the dashboard.", "short"),
    Alert("TagstreamLagOverRealtimeTarget",
          "max by (group, topic) (tagstream_consumer_group_lag_seconds)",
          ">", REALTIME_TARGET_S, "2m", "critical",
          "{{ $labels.group }} is {{ $value | humanizeDuration }} behind on {{ $labels.topic }}",
          f"The oldest unprocessed record on {{{{ $labels.topic }}}} is older than the real-time "
          f"target of {REALTIME_TARGET_S} s: real-time conversions are late.", "s"),
    Alert("TagstreamDeadLetterRate",
          "sum by (topic) (rate(tagstream_dead_letters_total[5m])) "
          "/ sum by (topic) (rate(tagstream_events_total[5m]))",
          ">", 0.01, "10m", "warning",
          "{{ $value | humanizePercentage }} of {{ $labels.topic }} goes to dead letters",
          "More than 1% of input records are malformed. `tagstream.dead-letters` holds each one "
          "with its reason; the producer of {{ $labels.topic }} is the place to fix it.", "percentunit"),
    Alert("TagstreamSinkFailures",
          'sum(rate(tagstream_sink_reports_total{outcome="failed"}[5m]))',
          ">", 0, "5m", "warning",
          "The Marketing API is rejecting reports",
          "Reports rejected for good are on `tagstream.report-failures` with the API's answer. "
          "A steady rate means a rule maps to a wrong account or action set.", "short"),
    Alert("TagstreamWeComCallbacksRefused",
          'sum by (outcome) (rate(tagstream_wecom_callbacks_total{outcome!="accepted"}[5m])) '
          "/ ignoring (outcome) group_left sum(rate(tagstream_wecom_callbacks_total[5m]))",
          ">", 0.2, "5m", "critical",
          "{{ $value | humanizePercentage }} of WeCom's callbacks are refused: {{ $labels.outcome }}",
          "The ingest refuses callbacks WeCom sends, and WeCom gives up on them after its retries: "
          "those tag changes are lost until `tagstream reconcile` runs. bad_signature or "
          "bad_ciphertext after a deploy means a wrong token or EncodingAESKey in the corp's secret; "
          "stale_timestamp, a clock that is off; unknown_corp, a corp missing from the corps file.",
          "percentunit"),
    Alert("TagstreamNoProgress",
          "sum by (group, topic, partition) ("
          "(max by (group, topic, partition) (tagstream_consumer_group_lag) > 0) "
          "unless on (group, topic, partition) "
          "(max by (group, topic, partition) (changes(tagstream_consumer_group_committed_offset[10m])) > 0))",
          ">", 0, "10m", "critical",
          "{{ $labels.group }} makes no progress on {{ $labels.topic }}/{{ $labels.partition }}",
          "Records are waiting but the committed offset has not moved for 10 minutes: the worker "
          "owning the partition is stuck or gone, or the group is stuck in a rebalance.", "short"),
    Alert("TagstreamErasureOverdue",
          "max by (component) (tagstream_erasure_pending_seconds)",
          ">", ERASURE_DEADLINE_S, "1m", "critical",
          "The {{ $labels.component }} has not erased a corp that left for {{ $value | humanizeDuration }}",
          f"A corp cancelled its authorisation and its erasure is older than the erasure deadline "
          f"({ERASURE_DEADLINE_S} s, the default of erasure_deadline): WeCom requires its data deleted. "
          "The component's log names the corps; a worker or sink that cannot read the erasures topic, "
          "or cannot commit, is the usual cause (docs/provider.md).", "s"),
]


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class PanelSpec:
    title: str
    description: str
    queries: list[Query]
    unit: str = "short"
    threshold: float | None = None
    width: int = 8


@dataclass
class RowSpec:
    title: str
    panels: list[PanelSpec] = field(default_factory=list)


def _histogram(metric: str, by: str, q: float) -> str:
    return f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket[{RATE}])))"


ROWS = [
    RowSpec("Throughput", [
        PanelSpec("Events processed by outcome", "Input records applied per second, by what happened to them.",
                  [Query(f"sum by (outcome) (rate(tagstream_events_total{{{TOPIC}}}[{RATE}]))", "{{outcome}}")],
                  "ops"),
        PanelSpec("Reports emitted by type", "Conversion reports per second, by standard type and mode.",
                  [Query(f"sum by (standard_type, mode) (rate(tagstream_reports_total[{RATE}]))",
                         "{{standard_type}} {{mode}}")], "ops"),
        PanelSpec("Records produced to each topic", "Growth of each topic's log end: the offered load.",
                  [Query(f"sum by (topic) (max by (topic, partition) "
                         f"(rate(tagstream_topic_log_end_offset{{{TOPIC}}}[{RATE}])))", "{{topic}}")], "ops"),
    ]),
    RowSpec("Consumer lag", [
        PanelSpec("Lag in messages", "Log-end offset minus committed offset, per group, topic and partition "
                  "(what kafka-consumer-groups --describe shows).",
                  [Query(LAG, "{{group}} {{topic}}/{{partition}}")], "short", width=12),
        PanelSpec("Lag in seconds", "Age of the oldest unprocessed record, per partition. The red line is "
                  "the real-time target the TagstreamLagOverRealtimeTarget alert uses.",
                  [Query(LAG_SECONDS, "{{group}} {{topic}}/{{partition}}")], "s",
                  threshold=REALTIME_TARGET_S, width=12),
    ]),
    RowSpec("Freshness and tagging", [
        PanelSpec("Event to report latency (p50, p99)", "Wall-clock time from an event's ts to its report, per "
                  "standard type. Delayed types include their hold.",
                  [Query(_histogram("tagstream_event_to_report_seconds", "standard_type", 0.99), "p99 {{standard_type}}"),
                   Query(_histogram("tagstream_event_to_report_seconds", "standard_type", 0.5), "p50 {{standard_type}}")],
                  "s", width=6),
        PanelSpec("Tagging delay (p50)", "How long after adding a customer staff tag them, per standard type.",
                  [Query(_histogram("tagstream_tagging_delay_seconds", "standard_type", 0.5), "{{standard_type}}")],
                  "s", width=6),
        PanelSpec("Held delayed reports", "LONG_TERM and INVALID reports waiting for their hold to end.",
                  [Query(f"sum by (partition) (tagstream_held_reports{{{PARTITION}}})", "partition {{partition}}")],
                  "short", width=6),
        PanelSpec("Time stopped by the garbage collector", "Share of each worker's time its event loop was "
                  "stopped by collections, per generation (2: full collections; the histogram "
                  "tagstream_gc_pause_seconds has each pause). A pause delays every real-time report behind it.",
                  [Query(f"max by (generation) (rate(tagstream_gc_pause_seconds_sum[{RATE}]))",
                         "generation {{generation}}")],
                  "percentunit", width=6),
    ]),
    RowSpec("Event-time merge", [
        PanelSpec("Merge hold time (p50, p99)", "How long the merge held a partition's next event back until the "
                  "other event topic was known to be read far enough (usually one end-offset probe, a few ms).",
                  [Query(f"histogram_quantile(0.99, sum by (le) (rate(tagstream_merge_wait_seconds_bucket[{RATE}])))",
                         "p99"),
                   Query(f"histogram_quantile(0.5, sum by (le) (rate(tagstream_merge_wait_seconds_bucket[{RATE}])))",
                         "p50")], "s", width=12),
        PanelSpec("Merge holds and forced releases", "Holds per second, and events applied without knowing that the "
                  "other event topic was caught up (forced: after merge_wait with the broker not answering, or a "
                  "full buffer). Forced releases may apply events out of ts order: 0 outside broker outages.",
                  [Query(f"sum(rate(tagstream_merge_wait_seconds_count[{RATE}]))", "holds"),
                   Query(f"sum by (cause) (rate(tagstream_merge_forced_total[{RATE}]))", "forced {{cause}}")],
                  "ops", width=12),
    ]),
    RowSpec("Bad input", [
        PanelSpec("Dead letters by reason", "Malformed input records parked on tagstream.dead-letters.",
                  [Query(f"sum by (topic, error) (rate(tagstream_dead_letters_total{{{TOPIC}}}[{RATE}]))",
                         "{{topic}} {{error}}")], "ops", width=8),
        PanelSpec("Unreportable conversions", "Conversions without a user identity, parked on the unreportable topic.",
                  [Query(f"sum by (standard_type, reason) (rate(tagstream_unreportable_total[{RATE}]))",
                         "{{standard_type}} {{reason}}")], "ops", width=8),
        PanelSpec("Hot customer share", "Share of each partition's input events that came from its busiest "
                  "customer (per sampling interval). One customer near 1.0 (a tagging bot, a CRM sync loop) "
                  "makes every other customer on that partition wait; the worker's log names it.",
                  [Query(f"max by (partition) (tagstream_hot_customer_share{{{PARTITION}}})", "partition {{partition}}")],
                  "percentunit", width=8),
    ]),
    RowSpec("Sink (Marketing API)", [
        PanelSpec("API requests by outcome", "user_actions/add requests per second.",
                  [Query(f"sum by (outcome) (rate(tagstream_sink_requests_total[{RATE}]))", "{{outcome}}")], "reqps"),
        PanelSpec("Reports by sink outcome", "Delivered, already delivered (skipped), failed, in doubt and resent; "
                  "parked on the retry topic (an account the API keeps refusing) and parked again on retry.",
                  [Query(f"sum by (outcome) (rate(tagstream_sink_reports_total[{RATE}]))", "{{outcome}}")], "ops"),
        PanelSpec("Retries by reason", "Requests sent again: 5xx, 429, timeouts, API busy codes, token reloads.",
                  [Query(f"sum by (reason) (rate(tagstream_sink_retries_total[{RATE}]))", "{{reason}}")], "reqps"),
        PanelSpec("API request latency (p99)", "Including the rate limiter's wait.",
                  [Query(f"histogram_quantile(0.99, sum by (le) (rate(tagstream_sink_request_duration_seconds_bucket[{RATE}])))",
                         "p99")], "s"),
        PanelSpec("Oldest unacknowledged report", "Age of the oldest report the sink holds that the API has not "
                  "acknowledged yet, reports parked on the retry topic included (a stuck account shows here while "
                  "the others flow), with how many are parked and for how many accounts.",
                  [Query("max(tagstream_sink_oldest_unacknowledged_report_age_seconds)", "age"),
                   Query("sum(tagstream_sink_requests_in_flight)", "requests in flight"),
                   Query("sum(tagstream_sink_parked_reports)", "parked reports"),
                   Query("sum(tagstream_sink_accounts_parked)", "accounts parked at once")], "s"),
        PanelSpec("Actions per request", "Mean batch size; 50 is the API's maximum.",
                  [Query(f"sum(rate(tagstream_sink_batch_actions_sum[{RATE}])) "
                         f"/ sum(rate(tagstream_sink_batch_actions_count[{RATE}]))", "actions/request")], "short"),
    ]),
    RowSpec("WeCom ingest", [
        PanelSpec("Callbacks by kind and outcome", "WeCom callbacks per second: accepted (written to wecom-callbacks "
                  "before the answer), or refused with the reason (bad_signature, stale_timestamp, unknown_corp, ...).",
                  [Query(f"sum by (kind, outcome) (rate(tagstream_wecom_callbacks_total[{RATE}]))",
                         "{{kind}} {{outcome}}")], "ops", width=8),
        PanelSpec("Callback answer time (p50, p99)", "From a callback's arrival to the ingest's answer, the acks=all "
                  "write included. WeCom waits 5 s, and retries what is not answered by then.",
                  [Query(_histogram("tagstream_wecom_callback_answer_seconds", "method", 0.99), "p99 {{method}}"),
                   Query(_histogram("tagstream_wecom_callback_answer_seconds", "method", 0.5), "p50 {{method}}")],
                  "s", width=8),
        PanelSpec("Enrichment lag", "Callbacks on wecom-callbacks not yet enriched (the enrichment group's lag), "
                  "and callbacks deferred because WeCom keeps refusing their corp.",
                  [Query('max by (partition) (tagstream_consumer_group_lag{group=~".*-enrich"})',
                         "partition {{partition}}"),
                   Query("sum(tagstream_wecom_deferred_callbacks)", "deferred")], "short", width=8),
        PanelSpec("WeCom API calls by errcode", "Calls per second by API and errcode: 0 is success; -1, 45009 "
                  "and 45033 are retried; 40014/42001 refresh the token; others are permanent (dead letters).",
                  [Query(f"sum by (api, errcode) (rate(tagstream_wecom_api_calls_total[{RATE}]))",
                         "{{api}} {{errcode}}")], "reqps", width=8),
        PanelSpec("Token refreshes", "Access tokens fetched, by reason: first, expiry, or the errcode that "
                  "refused the old one.",
                  [Query(f"sum by (reason) (increase(tagstream_wecom_token_refreshes_total[{RATE}]))",
                         "{{reason}}")], "short", width=8),
        PanelSpec("Callbacks enriched by outcome", "committed (events written), deferred, dead_lettered (a "
                  "permanent errcode) or ignored; and the tag events derived from snapshot diffs.",
                  [Query(f"sum by (outcome) (rate(tagstream_wecom_callbacks_enriched_total[{RATE}]))", "{{outcome}}"),
                   Query(f"sum(rate(tagstream_wecom_tag_events_total[{RATE}]))", "tag events")], "ops", width=8),
    ]),
    RowSpec("Workers, rebalances and state", [
        PanelSpec("Rebalances", "Partition assignments per worker; a steady climb means workers keep leaving.",
                  [Query(f"sum by (instance) (increase(tagstream_rebalances_total[{RATE}]))", "{{instance}}"),
                   Query("max(tagstream_rebalancing) + max(tagstream_table_recovery_in_progress)",
                         "rebalancing + recovering")], "short"),
        PanelSpec("Assigned partitions", "Input partitions per worker.",
                  [Query(f"sum by (instance, topic) (tagstream_assigned_partitions{{{TOPIC}}})",
                         "{{instance}} {{topic}}")], "short"),
        PanelSpec("State table keys", "Keys in the local RocksDB tables (estimate): customers, clocks, holds.",
                  [Query(f"sum by (table) (tagstream_table_keys{{{PARTITION}}})", "{{table}}")], "short"),
        PanelSpec("Resident memory", "Per process.",
                  [Query('process_resident_memory_bytes{job=~"tagstream.*"}', "{{job}} {{instance}}")], "bytes"),
        PanelSpec("CPU", "Cores used per process.",
                  [Query(f'rate(process_cpu_seconds_total{{job=~"tagstream.*"}}[{RATE}])', "{{job}} {{instance}}")],
                  "short"),
    ]),
    RowSpec("Alert signals", [
        PanelSpec(alert.name, f"{alert.summary.split('{{')[0].strip() or alert.name}: the signal of this alert; "
                  f"it fires above the red line for {alert.for_}.",
                  [Query(alert.signal, "{{group}} {{topic}} {{partition}}")], alert.unit,
                  threshold=alert.threshold, width=8)
        for alert in ALERTS
    ]),
]


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL as Grafana sends it) for every target of the dashboard."""
    return [(p.title, q.expr) for row in ROWS for p in row.panels for q in p.queries]


def of_the_ingest(query: str) -> bool:
    """A query with data only where `tagstream ingest` and `tagstream enrich` run."""
    return "tagstream_wecom_" in query or "-enrich" in query


def _timeseries(spec: PanelSpec) -> Timeseries:
    panel = (Timeseries().title(spec.title).description(spec.description).unit(spec.unit)
             .datasource(DATASOURCE).span(spec.width).height(8).min(0))
    for i, query in enumerate(spec.queries):
        panel = panel.with_target(Dataquery().expr(query.expr).legend_format(query.legend)
                                  .ref_id(chr(ord("A") + i)).datasource(DATASOURCE))
    if spec.threshold is not None:
        panel = (panel.thresholds(ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps([
                    Threshold(value=None, color="green"), Threshold(value=spec.threshold, color="red")]))
                 .thresholds_style(GraphThresholdsStyleConfig().mode(GraphThresholdsStyleMode.LINE)))
    return panel


def build_dashboard() -> dict:
    all_option = VariableOption(selected=True, text="All", value="$__all")
    dashboard = (
        Dashboard("tagstream").uid("tagstream").tags(["tagstream", "kafka", "faust"])
        .description("tagstream: tag events to Marketing API conversions. Throughput, consumer lag in "
                     "messages and seconds, freshness, tagging delay, dead letters, sink health, rebalances.")
        .refresh("10s").time("now-1h", "now")
        .with_variable(DatasourceVariable("datasource").label("Datasource").type("prometheus"))
        .with_variable(QueryVariable("topic").label("Topic").datasource(DATASOURCE)
                       .query("label_values(tagstream_consumer_group_lag, topic)")
                       .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC)
                       .multi(True).include_all(True).all_value(".*").current(all_option))
        .with_variable(QueryVariable("partition").label("Partition").datasource(DATASOURCE)
                       .query('label_values(tagstream_consumer_group_lag{topic=~"$topic"}, partition)')
                       .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.NUMERICAL_ASC)
                       .multi(True).include_all(True).all_value(".*").current(all_option))
    )
    ids = iter(range(1, 1000))
    for row in ROWS:
        dashboard = dashboard.with_row(Row(row.title).id(next(ids)))
        for spec in row.panels:
            dashboard = dashboard.with_panel(_timeseries(spec).id(next(ids)))
    return json.loads(JSONEncoder(sort_keys=True, indent=2).encode(dashboard.build()))


def build_alerts() -> dict:
    return {"groups": [{"name": "tagstream", "rules": [
        {"alert": a.name, "expr": a.expr, "for": a.for_, "labels": {"severity": a.severity},
         "annotations": {"summary": a.summary, "description": a.description,
                         "dashboard": "tagstream (deploy/grafana/tagstream.json), row 'Alert signals'"}}
        for a in ALERTS]}]}


def rendered() -> dict[Path, str]:
    header = ("# Generated by deploy/observability.py: edit that file, then run it.\n"
              "# Every alert is (signal) OP threshold; the signal is a panel on the dashboard.\n")
    alerts = header + yaml.safe_dump(build_alerts(), sort_keys=False, width=100, allow_unicode=True)
    return {
        DASHBOARD_PATH: json.dumps(build_dashboard(), indent=2, sort_keys=True) + "\n",
        ALERTS_PATH: alerts,
        CHART_ALERTS_PATH: alerts,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the files differ from what this builds")
    args = parser.parse_args(argv)
    stale = []
    for path, text in rendered().items():
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(HERE.parent)}")
    if stale:
        print("out of date: " + ", ".join(str(p.relative_to(HERE.parent)) for p in stale)
              + "; run .venv/bin/python deploy/observability.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
