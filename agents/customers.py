"""Per-customer processing: tag events and contact events of one customer, in partition
order, against that customer's state in the changelogged `customers` table.

Both event topics are keyed by `corp_id:external_userid` and have the same partition count,
so partition N of each lands on the same worker, and one agent reading both topics sees
every event of a customer in order.
"""
from __future__ import annotations

import time

import orjson

from agents.dead_letters import park
from agents.rules import RuleReplica
from schemas.validation import Rejection, decode_contact_event, decode_tag_event
from streams import metrics
from streams.semantics import CustomerState, ReportingPolicy, apply_event


def apply_customer_events(*, customers, replica: RuleReplica, policy: ReportingPolicy,
                          tag_events_topic: str, conversion_reports, unreportable, dead_letters):
    """Agent body over tag-events + contact-events."""
    rule_as_of = replica.book.rule_as_of

    async def apply(stream):
        # Rules must be loaded before the first lookup, or early events would look unmapped.
        await replica.ready.wait()
        async for event in stream.events():
            message = event.message
            decode = decode_tag_event if message.topic == tag_events_topic else decode_contact_event
            decoded = decode(message.key, message.value)
            if isinstance(decoded, Rejection):
                await park(dead_letters, message, decoded)
                continue
            now_ms = int(time.time() * 1000)
            state = CustomerState.decode(customers.get(message.key))
            state, result = apply_event(state, decoded, rule_as_of, policy, now_ms)
            customers[message.key] = state.encode()
            metrics.EVENTS.labels(message.topic, result.outcome).inc()
            for report in result.reports:
                # force=True sends now instead of at the next commit (latency). Faust flushes
                # the producer before committing offsets, so a report is on the broker before
                # its event counts as processed.
                await conversion_reports.send(
                    key=report.outer_action_id.encode(), value=orjson.dumps(report.as_wire()), force=True)
                metrics.REPORTS.labels(report.standard_type, report.mode).inc()
                metrics.EVENT_TO_REPORT.labels(report.standard_type).observe(
                    max(0.0, (now_ms - report.event_ts) / 1000))
                if report.tagging_delay_ms is not None:
                    metrics.TAGGING_DELAY.labels(report.standard_type).observe(report.tagging_delay_ms / 1000)
            for report in result.unreportable:
                await unreportable.send(
                    key=report.outer_action_id.encode(), value=orjson.dumps(report.as_wire()), force=True)
                metrics.UNREPORTABLE.labels(report.standard_type, report.reason).inc()
    return apply
