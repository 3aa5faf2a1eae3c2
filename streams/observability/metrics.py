"""Every Prometheus metric tagstream exports, defined once.

Names follow Prometheus conventions: a `tagstream_` prefix, `_total` on counters, base units
(`_seconds`, `_bytes`). Labels are bounded sets (topics, partitions, standard types,
outcomes, error codes): customer ids, union ids and tokens are never labels.
"""
from __future__ import annotations

import asyncio
import gc
import threading
import time
from typing import Optional
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

EVENTS = Counter(
    "tagstream_events_total",
    "Input events by topic and outcome (reported, unmapped, already_reported, ...)",
    ["topic", "outcome"])
REPORTS = Counter(
    "tagstream_reports_total",
    "Conversion reports emitted, by standard type and mode",
    ["standard_type", "mode"])
UNREPORTABLE = Counter(
    "tagstream_unreportable_total",
    "Reports sent to the unreportable topic, by standard type and reason",
    ["standard_type", "reason"])
DEAD_LETTERS = Counter(
    "tagstream_dead_letters_total",
    "Input records sent to the dead-letter topic, by topic and error code",
    ["topic", "error"])
RULE_VERSIONS = Gauge(
    "tagstream_rule_versions",
    "Reporting-rule versions held in this worker's rule book")
RULE_BOOK_READY = Gauge(
    "tagstream_rule_book_ready",
    "1 once this worker's rule book has caught up with the rule history at startup")
TAGGING_DELAY = Histogram(
    "tagstream_tagging_delay_seconds",
    "Event time of the tag minus the customer's add time, per reported standard type",
    ["standard_type"],
    buckets=(60, 300, 900, 3600, 4 * 3600, 12 * 3600, 86400, 3 * 86400, 7 * 86400, 30 * 86400))
MERGE_WAIT_SECONDS = Histogram(
    "tagstream_merge_wait_seconds",
    "How long an input event waited in the event-time merge for the other event topic's partition "
    "(events that could not be applied the moment they arrived; _count is how often the merge waited)",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 30))
MERGE_FORCED = Counter(
    "tagstream_merge_forced_total",
    "Input events applied before the other event topic's partition was known to be caught up "
    "(possibly out of ts order), by cause: max_wait (the broker did not answer within merge_wait), "
    "max_buffered (the buffer was full)",
    ["cause"])
for _cause in ("max_wait", "max_buffered"):      # exported as 0 from the start: rate() works
    MERGE_FORCED.labels(_cause)
MERGE_END_OFFSET_PROBES = Counter(
    "tagstream_merge_end_offset_probes_total",
    "ListOffsets requests the event-time merge sent to learn the other event topic's end offset, by outcome",
    ["outcome"])
INPUT_STALLS = Counter(
    "tagstream_input_stalls_total",
    "Times the worker's consumer found input records waiting while it had handed none over for "
    "20 s with the rule book ready (each also logged as a warning with the consumer's state)",
)
MERGE_BACKPRESSURE = Counter(
    "tagstream_merge_backpressure_pauses_total",
    "Input partitions paused because the event-time merge buffered 2,000 of their events while "
    "the other topic's partition was behind (resumed once drained; nothing is reordered)",
)
INPUT_STALLS_REPAIRED = Counter(
    "tagstream_input_stalls_repaired_total",
    "Stalls the consumer repaired itself: input partitions left paused after a rebalance, resumed",
)
STALE_BATCHES = Counter(
    "tagstream_input_stale_batches_total",
    "Fetched batches dropped because a rebalance began while they waited to be applied (fetched again)",
)
INPUT_REFETCHES = Counter(
    "tagstream_input_refetches_total",
    "Input partitions sought back because records before a fetched batch were dropped on the way "
    "(around rebalances); the records were fetched again, none was skipped",
    ["topic"])
HOT_CUSTOMER_SHARE = Gauge(
    "tagstream_hot_customer_share",
    "Share of a partition's input events in the last sampling interval that came from its busiest customer "
    "(a lower bound; the customer is named in the worker's log when the share is high)",
    ["partition"])
HELD_REPORTS = Gauge(
    "tagstream_held_reports",
    "Delayed reports (LONG_TERM, INVALID) waiting for their deadline, per assigned partition (from the state table)",
    ["partition"])
TABLE_KEYS = Gauge(
    "tagstream_table_keys",
    "Keys in a local state table, per assigned partition (RocksDB's estimate)",
    ["table", "partition"])
REBALANCES = Counter(
    "tagstream_rebalances_total",
    "Consumer-group rebalances this worker took part in (partitions assigned)")
ASSIGNED_PARTITIONS = Gauge(
    "tagstream_assigned_partitions",
    "Input partitions assigned to this worker, by topic",
    ["topic"])
REBALANCING = Gauge(
    "tagstream_rebalancing",
    "1 while this worker is in a rebalance")
RECOVERING = Gauge(
    "tagstream_table_recovery_in_progress",
    "1 while this worker restores tables from their changelogs (processing is paused)")

# -- consumer lag (streams/observability/lag.py), exported by every tagstream process ---------------------
CONSUMER_LAG = Gauge(
    "tagstream_consumer_group_lag",
    "Log-end offset minus committed offset, in messages (as kafka-consumer-groups shows it)",
    ["group", "topic", "partition"])
CONSUMER_LAG_SECONDS = Gauge(
    "tagstream_consumer_group_lag_seconds",
    "Age of the oldest unprocessed record (the record at the committed offset); 0 with no lag",
    ["group", "topic", "partition"])
COMMITTED_OFFSET = Gauge(
    "tagstream_consumer_group_committed_offset",
    "The group's committed offset (the log start if it never committed)",
    ["group", "topic", "partition"])
LOG_END_OFFSET = Gauge(
    "tagstream_topic_log_end_offset",
    "Log-end offset of a partition (its rate is the produce rate)",
    ["topic", "partition"])
LAG_SAMPLE_TIME = Gauge(
    "tagstream_lag_sample_timestamp_seconds",
    "Unix time of the last successful lag sample")
LAG_SAMPLE_ERRORS = Counter(
    "tagstream_lag_sample_errors_total",
    "Lag samples that failed (broker unreachable, ...)")
EVENT_TO_REPORT = Histogram(
    "tagstream_event_to_report_seconds",
    "Wall-clock time from an event's ts to the emission of its report, per standard type",
    ["standard_type"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))

GC_PAUSE = Histogram(
    "tagstream_gc_pause_seconds",
    "Time the cyclic garbage collector stopped this process, per generation (2: a full "
    "collection); a full collection stops the event loop and shows in real-time latency",
    ["generation"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))


# -- the reporting sink (SPEC §5) ---------------------------------------------------------
SINK_REQUESTS = Counter(
    "tagstream_sink_requests_total",
    "Marketing API requests by outcome (delivered, retry, reload_token, permanent)",
    ["outcome"])
SINK_RETRIES = Counter(
    "tagstream_sink_retries_total",
    "Requests sent again, by reason (http_5xx, http_429, timeout, api_code, token)",
    ["reason"])
SINK_REPORTS = Counter(
    "tagstream_sink_reports_total",
    "Reports read by the sink, by outcome (delivered, already_delivered, failed, in_doubt_resent; invalid: not a "
    "report, parked on report-failures; parked: moved to the retry topic after retryable answers, reparked: "
    "refused again on retry; already_parked: read again while parked; stale_retry_copy: a retry-topic copy "
    "the delivered record does not name, skipped)",
    ["outcome"])
SINK_BATCH_ACTIONS = Histogram(
    "tagstream_sink_batch_actions",
    "Actions per Marketing API request",
    buckets=(1, 2, 5, 10, 20, 30, 40, 50))
SINK_REQUEST_SECONDS = Histogram(
    "tagstream_sink_request_duration_seconds",
    "Marketing API request latency, including the rate limiter's wait",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
SINK_IN_FLIGHT = Gauge(
    "tagstream_sink_requests_in_flight",
    "Marketing API requests waiting for an answer")
SINK_OLDEST_UNACKED = Gauge(
    "tagstream_sink_oldest_unacknowledged_report_age_seconds",
    "Age (since its record was written to conversion-reports) of the oldest report read but not yet "
    "acknowledged or failed, parked reports included")
SINK_PARKED = Gauge(
    "tagstream_sink_parked_reports",
    "Reports parked on the retry topic, waiting for their next attempt, in the sink's assigned partitions")
SINK_BROKEN_ACCOUNTS = Gauge(
    "tagstream_sink_accounts_parked",
    "Accounts whose reports the sink parks at once (their requests ran out of retry budget; probed once "
    "per sink_retry_delay)")
SINK_DELIVERED_IDS = Gauge(
    "tagstream_sink_delivered_ids",
    "Acknowledged outer_action_ids held in memory for the sink's assigned partitions")


def _child(metric, cache: dict, *labels: str):
    """`metric.labels(*labels)`, remembered: `labels()` takes a lock and builds a key on every
    call, which the worker would otherwise pay for every report."""
    child = cache.get(labels)
    if child is None:
        child = cache[labels] = metric.labels(*labels)
    return child


_REPORTS, _EVENT_TO_REPORT, _TAGGING_DELAY = {}, {}, {}


def observe_report(report, now_ms: int) -> None:
    """Count one emitted report, its freshness and its tagging delay."""
    standard_type = report.standard_type
    _child(REPORTS, _REPORTS, standard_type, report.mode).inc()
    _child(EVENT_TO_REPORT, _EVENT_TO_REPORT, standard_type).observe(max(0.0, (now_ms - report.event_ts) / 1000))
    if report.tagging_delay_ms is not None:
        _child(TAGGING_DELAY, _TAGGING_DELAY, standard_type).observe(max(0.0, report.tagging_delay_ms / 1000))


def watch_gc_pauses() -> None:
    """Time every collection into GC_PAUSE (once per process). Python's own `python_gc_*`
    metrics count collections but not how long they stop the loop; a full collection of
    170 ms was how a decoded-customer cache showed in p99 (docs/performance.md)."""
    if _on_gc in gc.callbacks:
        return
    _on_gc.children = [GC_PAUSE.labels(str(generation)) for generation in range(3)]
    gc.callbacks.append(_on_gc)


def _on_gc(phase: str, info: dict) -> None:
    if phase == "start":
        _on_gc.started = time.perf_counter()
    elif _on_gc.started is not None:
        _on_gc.children[info["generation"]].observe(time.perf_counter() - _on_gc.started)
        _on_gc.started = None


_on_gc.started = None


# -- the WeCom ingest (SPEC §7) -------------------------------------------------------------
WECOM_CALLBACKS = Counter(
    "tagstream_wecom_callbacks_total",
    "WeCom callbacks by kind (url_verification, or the event and change type; `unknown` before "
    "decryption) and outcome (accepted, or the refusal's reason: bad_signature, stale_timestamp, ...)",
    ["kind", "outcome"])
WECOM_ANSWER_SECONDS = Histogram(
    "tagstream_wecom_callback_answer_seconds",
    "Time from a callback's arrival to the ingest's answer (the accepted ones include the "
    "acks=all write to wecom-callbacks)",
    ["method"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))


WECOM_API_CALLS = Counter(
    "tagstream_wecom_api_calls_total",
    "WeCom API calls by API and errcode (0 is success; http_5xx and exception names for "
    "transport failures)",
    ["api", "errcode"])
WECOM_TOKEN_REFRESHES = Counter(
    "tagstream_wecom_token_refreshes_total",
    "WeCom access tokens fetched, by reason: first, expiry, or the errcode that refused the old one",
    ["reason"])


WECOM_ENRICHED = Counter(
    "tagstream_wecom_callbacks_enriched_total",
    "Callbacks the enrichment took, by outcome: committed (their events are written), "
    "deferred (WeCom kept refusing their corp; retried later), dead_lettered (a permanent errcode), ignored, "
    "refused (a provider-mode corp that is not authorised, or has cancelled: dropped, not dead-lettered)",
    ["outcome"])
WECOM_AUTH_COMMANDS = Counter(
    "tagstream_wecom_auth_commands_total",
    "Provider-mode commands the enrichment acted on, by InfoType and outcome (applied, duplicate, refused)",
    ["info_type", "outcome"])
WECOM_PERMANENT_CODE_UNSAVED = Histogram(
    "tagstream_wecom_permanent_code_unsaved_seconds",
    "From get_permanent_code's answer to the broker's ack of the sealed code on wecom-auth: the window in which "
    "a crash loses a corp's authorisation (the auth code is single-use)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
WECOM_DEFERRED = Gauge(
    "tagstream_wecom_deferred_callbacks",
    "Callbacks waiting because WeCom keeps refusing their corp (the others go on)")
WECOM_TAG_EVENTS = Counter(
    "tagstream_wecom_tag_events_total",
    "Tag events the enrichment derived from snapshot diffs (an aborted transaction's are counted "
    "again when they are redone)")
ERASURES = Counter(
    "tagstream_erasures_total",
    "Erasures of a corp that left, by component: one per corp and state partition (worker), record "
    "partition (sink) or snapshot partition (enrich)",
    ["component"])
ERASURE_PENDING = Gauge(
    "tagstream_erasure_pending_seconds",
    "Age of the oldest erasure request this component has not applied yet (0: none); "
    "TagstreamErasureOverdue fires past erasure_deadline",
    ["component"])


WECOM_TAG_REQUESTS = Counter(
    "tagstream_wecom_tag_requests_total",
    "Requests to tag through WeCom's API (the ingest's POST /tags), by outcome",
    ["outcome"])


class _Health:
    """Liveness for /healthz: the process's event loop beats (`beat`), and a process whose
    loop has not beaten for `stale_after` seconds, or never has, is not healthy. A stuck
    loop still answers /metrics from the server's thread, so the probe needs this."""
    stale_after: Optional[float] = None        # None: /healthz is always 200 once served
    last_beat: Optional[float] = None

    def status(self) -> tuple[str, str]:
        if self.stale_after is None:
            return "200 OK", "ok\n"
        if self.last_beat is None:
            return "503 Service Unavailable", "starting: the event loop has not beaten yet\n"
        silent = time.monotonic() - self.last_beat
        if silent > self.stale_after:
            return "503 Service Unavailable", f"stuck: the event loop last beat {silent:.0f} s ago\n"
        return "200 OK", "ok\n"


HEALTH = _Health()


def beat() -> None:
    """The event loop is alive (called from a timer on it)."""
    HEALTH.last_beat = time.monotonic()


async def heartbeat(interval_s: float = 5.0) -> None:
    """Beat every `interval_s` for as long as the loop runs (a task of a plain asyncio process)."""
    while True:
        beat()
        await asyncio.sleep(interval_s)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):        # noqa: A002 (the base class's name): probes every few s
        pass


def serve(port: int, host: str = "127.0.0.1", stale_after: Optional[float] = None) -> None:
    """Expose /metrics, and /healthz (see `_Health`; `stale_after` None: always healthy), on
    host:port from a daemon thread (no-op for port 0). The host is 127.0.0.1 unless a
    container orchestrator scrapes and probes the pod's own address (`metrics_host`)."""
    if not port:
        return
    HEALTH.stale_after = stale_after
    metrics_app = make_wsgi_app()

    def app(environ, start_response):
        if environ.get("PATH_INFO") == "/healthz":
            status, body = HEALTH.status()
            start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
            return [body.encode()]
        return metrics_app(environ, start_response)
    server = make_server(host, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="tagstream-metrics", daemon=True).start()
