"""The whole tagstream flow, wired in one place.

    tag-mappings ──▶ fold_rule_versions ──▶ [rule_versions] ──changelog──▶ RuleReplica
                                                                    (every worker)
                                                                         │ rule_as_of(key, ts)
    tag-events ─────┐  fetched batches                                   ▼
                    ├─ merged by ts ─▶ apply_customer_events ◀──▶ [reporting_state]
    contact-events ─┘                        │                     (streams/state/store.py)
                                             ├──▶ conversion-reports
                                             ├──▶ unreportable
    bad input (any source) ──────────────────┴──▶ dead-letters
    wecom-erasures ──▶ ErasureRequests (every worker) ──▶ a corp's records refused, its keys
                                                          erased from [reporting_state]

`tagstream topology` prints this with the real topic names. All records are raw bytes at
the Faust layer (`raw` codecs everywhere) and are encoded and decoded with orjson by
tagstream itself, so no Faust codec runs on the hot path.

Faust runs the group (co-partitioned assignment, rebalances, offset commits), the rules
agent and its table, and the timers. The hot path skips Faust's per-record machinery: the
consumer hands `apply_customer_events` whole fetched batches (streams/kafka/faust_consumer.py),
and `reporting_state` is committed and restored in batches (streams/state/store.py);
docs/performance.md has the profiles behind this.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from functools import partial
from typing import Awaitable, Callable
from pathlib import Path

import faust

from agents.customers import CustomerEvents
from agents.health import WorkerHealth, faust_table_keys
from agents.rules import RuleReplica, fold_rule_versions
from streams.kafka import faust_consumer
from streams.kafka.connection import client_kwargs, faust_kwargs, idempotent_faust_producer
from streams.kafka.replica import ErasureRequests
from streams.observability import metrics
from streams.observability.lag import monitored_groups, run_in_thread as run_lag_monitor
from streams.core.semantics import ReportingPolicy
from streams.settings import Settings
from streams.state.store import ChangeloggedStore

log = logging.getLogger(__name__)
RAW = {"key_serializer": "raw", "value_serializer": "raw"}
REPORTING_STATE = "reporting_state"


@dataclass
class Topology:
    app: faust.App
    settings: Settings
    replica: RuleReplica
    sources: dict
    tables: dict
    sinks: dict
    before_stop: Callable[[], Awaitable[None]]    # run on SIGTERM/SIGINT, before Faust stops

    def describe(self) -> str:
        s = self.settings
        lines = [f"tagstream topology (app id {s.app_id}, broker {s.broker})", "sources:"]
        lines += [f"  {name:<16} {t}" for name, t in self.sources.items()]
        lines.append("state stores (changelogged, RocksDB):")
        lines += [f"  {name:<16} changelog {changelog}" for name, changelog in self.tables.items()]
        lines.append("processors:")
        lines += [
            f"  fold_rule_versions     {self.sources['tag_mappings']} -> rule_versions",
            "  RuleReplica            rule_versions changelog (all partitions, no group) -> rule book",
            f"  ErasureRequests        {self.sources['erasures']} (all partitions, no group) -> corps refused and erased",
            f"  apply_customer_events  {self.sources['tag_events']} + {self.sources['contact_events']}"
            f" (fetched batches, merged by ts) -> reporting_state,"
            f" {self.sinks['conversion_reports']}, {self.sinks['unreportable']}",
            "  WorkerHealth           rebalances, recovery, table sizes, held reports -> /metrics",
            "  LagMonitor             committed offsets of the worker and sink groups (no group) -> /metrics",
        ]
        lines.append("sinks:")
        lines += [f"  {name:<16} {t}" for name, t in self.sinks.items()]
        return "\n".join(lines)


def build_topology(settings: Settings) -> Topology:
    s = settings
    Path(s.data_dir).mkdir(parents=True, exist_ok=True)
    app = faust.App(
        s.app_id,
        store="rocksdb://",
        datadir=s.data_dir,
        topic_partitions=s.partitions,
        topic_allow_declare=True,     # Faust declares its own changelog topics
        table_standby_replicas=0,     # one node; standbys would only double the work
        key_serializer="raw",
        value_serializer="raw",
        consumer_auto_offset_reset="earliest",
        consumer_max_fetch_size=s.partition_fetch_bytes,
        producer_acks=-1,
        producer_linger_ms=1,
        processing_guarantee=s.processing_guarantee,
        # A crashed worker's partitions are reassigned once its session expires; Faust's
        # 60 s default would stall processing for a minute after every crash.
        broker_session_timeout=s.session_timeout / 1000,
        broker_heartbeat_interval=max(s.session_timeout / 3000, 0.5),
        web_enabled=False,            # metrics are served by prometheus_client instead
        **faust_kwargs(s),            # credentials, TLS, topic_replication_factor (SPEC §8)
    )
    idempotent_faust_producer(app)
    connection = client_kwargs(s)
    # -- sources -------------------------------------------------------------------------
    names = {key: s.topic(key + "_topic") for key in (
        "tag_mappings", "tag_events", "contact_events",
        "conversion_reports", "unreportable", "dead_letters")}
    tag_mappings = app.topic(names["tag_mappings"], **RAW)
    customer_events = app.topic(names["tag_events"], names["contact_events"], **RAW)

    # -- state stores --------------------------------------------------------------------
    rule_versions = app.Table("rule_versions", partitions=s.partitions, key_type=bytes, value_type=bytes)
    # customers, partition clocks and the hold index, under prefixed keys (agents/customers.py),
    # in a store written and restored in batches (streams/state/store.py)
    reporting_state = ChangeloggedStore(
        str(Path(s.data_dir) / REPORTING_STATE), f"{s.app_id}-{REPORTING_STATE}-changelog",
        connection, producer=None)         # the agent's, created on the worker's loop

    # -- processors ----------------------------------------------------------------------
    replica = RuleReplica(connection, rule_versions.changelog_topic.get_topic_name(), s.partitions,
                          rules_topic=names["tag_mappings"], group_id=s.app_id)
    app.task(replica.run)
    # erasure requests of corps that left (streams/core/erasure.py), followed from the start
    erasures = ErasureRequests(s, "tagstream-worker-erasures")

    async def follow_erasures() -> None:       # (app.task would pass the app to follow())
        await erasures.follow()
    app.task(follow_erasures)
    metrics.ERASURE_PENDING.labels("worker").set_function(erasures.pending_seconds)
    app.agent(tag_mappings, name="fold_rule_versions")(
        fold_rule_versions(rule_versions, app.topic(names["dead_letters"], **RAW)))
    per_customer = CustomerEvents(
        app, store=reporting_state, connection=connection, replica=replica, erasures=erasures,
        policy=ReportingPolicy.from_settings(s),
        tag_events_topic=names["tag_events"], contact_events_topic=names["contact_events"],
        merge_wait_ms=s.merge_wait, max_future_skew_ms=s.max_future_skew,
        batch_max=s.batch_max, batch_linger_ms=s.batch_linger,
        conversion_reports_topic=names["conversion_reports"], unreportable_topic=names["unreportable"],
        dead_letters_topic=names["dead_letters"])
    # apply_customer_events: the consumer hands it whole fetched batches of both event topics
    app.topics.add(customer_events)
    faust_consumer.install(app, batch_topics=customer_events.topics, batch_handler=per_customer.on_records,
                           batch_ready=lambda: replica.ready.is_set() and erasures.ready.is_set(), committable=per_customer.committable)
    app.timer(max(s.merge_wait, 20) / 2000)(per_customer.tick)

    @app.on_partitions_revoked.connect
    async def forget_revoked(app, revoked, **kwargs):
        await per_customer.on_partitions_revoked(revoked)

    # -- observability (metrics on settings.metrics_port) ----------------------------------
    health = WorkerHealth(
        app, {"reporting_state": per_customer.state_keys, "rule_versions": partial(faust_table_keys, rule_versions)},
        per_customer.held_reports, [names["tag_events"], names["contact_events"]],
        restoring=lambda: reporting_state.restoring, hot_customer_shares=per_customer.hot_keys.take)
    app.timer(s.metrics_interval / 1000)(_sync(health.refresh))

    @app.on_partitions_assigned.connect
    async def on_assigned(app, assigned, **kwargs):
        per_customer.on_partitions_assigned(assigned)
        health.on_assigned()

    async def export_consumer_lag() -> None:
        run_lag_monitor(connection, monitored_groups(s), s.metrics_interval / 1000)
    app.task(export_consumer_lag)

    return Topology(
        app=app, settings=s, replica=replica,
        sources={**{k: names[k] for k in ("tag_mappings", "tag_events", "contact_events")},
                 "erasures": erasures.topic},
        tables={"rule_versions": rule_versions.changelog_topic.get_topic_name(),
                REPORTING_STATE: reporting_state.changelog_topic},
        sinks={k: names[k] for k in ("conversion_reports", "unreportable", "dead_letters")},
        before_stop=per_customer.drain)


def _sync(function):
    """A coroutine around a plain function, for `app.timer`."""
    async def run() -> None:
        function()
    run.__name__ = function.__name__
    return run


class DrainingWorker(faust.Worker):
    """faust.Worker that lets the topology finish its open batch before a signal stops it,
    and has no terminal spinner.

    Faust's spinner is a trap at log level warning or above: to spin on every log record it
    sets the *root logger* to DEBUG, so every `log.debug` in aiokafka and Faust (one per
    produced record, among others) builds a LogRecord that the handlers then drop. That was
    4.5% of a worker's samples at `--log-level warning` (docs/performance.md).
    """

    def __init__(self, app, before_stop, **kwargs):
        super().__init__(app, **kwargs)
        self.before_stop = before_stop
        self.spinner = None

    def _on_sigterm(self) -> None:
        self._drain_then(super()._on_sigterm)

    def _on_sigint(self) -> None:
        self._drain_then(super()._on_sigint)

    def _drain_then(self, stop) -> None:
        async def drain() -> None:
            try:
                await asyncio.wait_for(self.before_stop(), timeout=10)
                log.info("stopping: the open batch is drained (its reports acknowledged, its state durable); "
                         "committing the offsets and leaving the consumer group")
            except Exception as exc:           # stopping must not hang on a broken broker
                log.warning("drain before stop failed: %r", exc)
            stop()
        asyncio.ensure_future(drain())
