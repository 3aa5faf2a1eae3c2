"""Per-customer processing: tag events and contact events of one customer, merged in event
time, applied to that customer's state in the changelogged `customers` table.

Both event topics are keyed by `corp_id:external_userid` and have the same partition count,
so partition N of each lands on the same worker. Kafka orders each topic partition but not
the two topics against each other, so arriving events go through `streams.merge` first and
are applied in `ts` order (contacts first on ties). The stream runs without automatic acks:
an event is acked only once it has been applied, so a buffered event is never committed
past, and a crash or rebalance re-delivers it.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from typing import Iterator

import orjson
from faust.streams import _current_event  # the context Faust's tables read the partition from
from faust.types import TP

from agents.dead_letters import park
from agents.rules import RuleReplica
from schemas.validation import Rejection, decode_contact_event, decode_tag_event
from streams import metrics
from streams.merge import CoPartitionMerge
from streams.semantics import CustomerState, ReportingPolicy, apply_event


def _now_ms() -> int:
    return int(time.time() * 1000)


@contextlib.contextmanager
def applying(event) -> Iterator[None]:
    """Make `event` Faust's current event while it is applied, so table writes go to the
    changelog partition of the event's own partition even when it is released later, by a
    different arrival or by the idle timer."""
    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)


class CustomerEvents:
    """The agent over tag-events + contact-events, and the timer that releases waiting events."""

    def __init__(self, app, *, customers, replica: RuleReplica, policy: ReportingPolicy,
                 tag_events_topic: str, contact_events_topic: str, merge_wait_ms: int,
                 conversion_reports, unreportable, dead_letters):
        self.app = app
        self.customers = customers
        self.replica = replica
        self.policy = policy
        self.decoders = {tag_events_topic: decode_tag_event, contact_events_topic: decode_contact_event}
        self.merge: CoPartitionMerge = CoPartitionMerge(
            (contact_events_topic, tag_events_topic), max_wait_ms=merge_wait_ms)
        self.conversion_reports = conversion_reports
        self.unreportable = unreportable
        self.dead_letters = dead_letters
        self.seen: dict[TP, int] = {}       # last offset received per input partition
        self.lock = asyncio.Lock()          # the agent and the timer take turns
        self.stream = None

    # -- Faust entry points --------------------------------------------------------------
    async def agent(self, stream) -> None:
        # Rules must be loaded before the first lookup, or early events would look unmapped.
        await self.replica.ready.wait()
        self.stream = stream.noack()
        async for event in self.stream.events():
            message = event.message
            async with self.lock:
                self.seen[message.tp] = message.offset
                decoded = self.decoders[message.topic](message.key, message.value)
                if isinstance(decoded, Rejection):
                    await park(self.dead_letters, message, decoded)
                    await self.stream.ack(event)
                    continue
                self.merge.offer(message.partition, message.topic, decoded.ts, (event, decoded), _now_ms())
                await self._release(message.partition)

    async def release_waiting(self) -> None:
        """Timer: apply events that waited `merge_wait` for the other topic."""
        if self.stream is None:
            return
        async with self.lock:
            for partition in self.merge.waiting_partitions():
                await self._release(partition)

    async def on_partitions_revoked(self, revoked) -> None:
        async with self.lock:
            for tp in revoked:
                self.seen.pop(tp, None)
                self.merge.forget(tp.partition)

    # -- internals -----------------------------------------------------------------------
    async def _release(self, partition: int) -> None:
        def caught_up(source: str) -> bool:
            return self._caught_up(TP(source, partition))
        for event, decoded in list(self.merge.release(partition, caught_up, _now_ms())):
            with applying(event):
                await self._apply(event.message.topic, event.message.key, decoded)
            await self.stream.ack(event)

    def _caught_up(self, tp: TP) -> bool:
        """True if this worker has received every record of `tp` up to its log end."""
        consumer = self.app.consumer
        log_end = consumer.highwater(tp)
        if log_end is None:
            return False
        seen = self.seen.get(tp)
        if seen is None:
            # Nothing received since assignment: we start at the committed offset (Faust
            # records it when it seeks after an assignment), or at 0 for a new group.
            committed = consumer._committed_offset.get(tp)  # noqa: SLF001
            seen = (committed or 0) - 1
        return seen + 1 >= log_end

    async def _apply(self, topic: str, key: bytes, decoded) -> None:
        now_ms = _now_ms()
        state = CustomerState.decode(self.customers.get(key))
        state, result = apply_event(state, decoded, self.replica.book.rule_as_of, self.policy, now_ms)
        self.customers[key] = state.encode()
        metrics.EVENTS.labels(topic, result.outcome).inc()
        for report in result.reports:
            # force=True sends now instead of at the next commit (latency). Faust flushes the
            # producer before committing offsets, so a report is on the broker before its
            # event counts as processed.
            await self.conversion_reports.send(
                key=report.outer_action_id.encode(), value=orjson.dumps(report.as_wire()), force=True)
            metrics.REPORTS.labels(report.standard_type, report.mode).inc()
            metrics.EVENT_TO_REPORT.labels(report.standard_type).observe(
                max(0.0, (now_ms - report.event_ts) / 1000))
            if report.tagging_delay_ms is not None:
                metrics.TAGGING_DELAY.labels(report.standard_type).observe(report.tagging_delay_ms / 1000)
        for report in result.unreportable:
            await self.unreportable.send(
                key=report.outer_action_id.encode(), value=orjson.dumps(report.as_wire()), force=True)
            metrics.UNREPORTABLE.labels(report.standard_type, report.reason).inc()
