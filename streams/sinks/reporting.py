"""The reporting sink: delivers conversion reports from the outbound topic to a target.

Targets:
- `api`: the Marketing API `user_actions/add` (SPEC §5), once per `outer_action_id`;
- `file:PATH` (NDJSON, one report per line) and `stdout`: the embedded default and dry runs.

How `api` delivers each report once. The sink works in rounds: read up to `sink_round`
reports (waiting at most `sink_linger` for them), drop those already delivered, deliver
the rest, and commit the round's offsets only when every report in it is acknowledged by
the API or dead-lettered to `report-failures`. So a crash re-reads, never skips.

The record of what was delivered is the compacted topic `delivered-reports`, keyed by
`outer_action_id`, written to the same partition number as the report it covers (so the
sink owning report partition N reads exactly record partition N, whatever the partitioner).
Each id moves through `sending` (written before the request) to `acked` or `failed`
(written after the answer, before the commit). On (re)assignment the sink reads its
partitions of the record from the start: `acked` ids are never sent again (after a crash,
a rebalance or a replay); `sending` ids are *in doubt* (the sink died while the request was
out) and are sent again, counted in `tagstream_sink_reports_total{outcome="in_doubt_resent"}`.
No protocol can close that last window without the API's help: the API documents
`outer_action_id` as its own dedupe key, which makes an in-doubt resend harmless there.

What the sink reads is validated like the worker's input (`decode_conversion_report`): any
producer can write to the outbound topic (`tagstream replay` does, and so can an operator),
and one bad record must not stop delivery. A record that is not a report (garbage bytes, a
tombstone, JSON that is not a report, a report under another key) goes to `report-failures`
in the dead-letter format (SPEC §3.5: the reason, where it came from, its bytes), is
counted (`tagstream_sink_reports_total{outcome="invalid"}`), and the offsets move past it,
for every target.

Why the record stays bounded: compaction keeps one record per `outer_action_id`, and an id
is the hash of (corp, customer, standard type), so there are at most six per customer:
the same order as the worker's own per-customer state. In memory the sink holds only the
ids of the partitions assigned to it.
"""
from __future__ import annotations

import asyncio
import logging
import os
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import IO, Optional

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError

from schemas.validation import Rejection, decode_conversion_report
from streams.observability import metrics
from streams.sinks.marketing_api import (
    Batch, MarketingApiClient, Outcome, RateLimiter, classify, pack, token_from_settings)
from streams.settings import ConfigError, Settings

log = logging.getLogger(__name__)

SENDING, ACKED, FAILED = b"sending", b"acked", b"failed"


def open_target(target: str) -> IO[bytes]:
    if target == "stdout":
        return sys.stdout.buffer
    if target.startswith("file:") and len(target) > 5:
        path = target[5:]
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return open(path, "ab")
    raise ConfigError(f"--target {target!r}: use api, file:PATH (NDJSON) or stdout")


def _reports_consumer(settings: Settings, listener: Optional[ConsumerRebalanceListener] = None) -> AIOKafkaConsumer:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers, group_id=f"{settings.app_id}-sink",
        enable_auto_commit=False, auto_offset_reset="earliest", isolation_level="read_committed",
        session_timeout_ms=settings.session_timeout, heartbeat_interval_ms=max(settings.session_timeout // 3, 500))
    consumer.subscribe([settings.topic("conversion_reports_topic")], listener=listener)
    return consumer


def _producer(settings: Settings) -> AIOKafkaProducer:
    return AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all",
                            enable_idempotence=True, linger_ms=2)


def split_reports(batches: dict) -> tuple[list, list]:
    """A round's records: ([(tp, record, report)], [(tp, record, why it is not a report)])."""
    reports, invalid = [], []
    for tp, records in batches.items():
        for record in records:
            decoded = decode_conversion_report(record.key, record.value)
            if isinstance(decoded, Rejection):
                invalid.append((tp, record, decoded))
            else:
                reports.append((tp, record, decoded))
    return reports, invalid


async def park_invalid(producer: AIOKafkaProducer, settings: Settings, invalid: list) -> None:
    """Records of the outbound topic that are not reports, to `report-failures` in the
    dead-letter format, acknowledged before the round's offsets are committed."""
    if not invalid:
        return
    topic, at = settings.topic("report_failures_topic"), int(time.time() * 1000)
    futures = []
    for tp, record, rejection in invalid:
        letter = rejection.dead_letter(topic=tp.topic, partition=tp.partition, offset=record.offset,
                                       key=record.key, value=record.value, at=at)
        futures.append(await producer.send(topic, key=record.key, value=orjson.dumps(letter.as_wire())))
    await asyncio.gather(*futures)
    metrics.SINK_REPORTS.labels("invalid").inc(len(invalid))
    codes = sorted({rejection.error for _, _, rejection in invalid})
    log.warning("%d records of the outbound topic are not reports (%s); parked on %s", len(invalid),
                ", ".join(codes), topic)


async def run_file_sink(settings: Settings, target: str, stop: asyncio.Event) -> int:
    """Copy reports to the target until `stop` is set; returns how many were written."""
    out = open_target(target)
    producer = _producer(settings)
    await producer.start()
    consumer = _reports_consumer(settings)
    await consumer.start()
    written = 0
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=200, max_records=2000)
            if not batches:
                continue
            reports, invalid = split_reports(batches)
            for _, record, _ in reports:
                out.write(record.value + b"\n")           # as it is on the topic
            written += len(reports)
            out.flush()
            if out is not sys.stdout.buffer:
                # Durable before the offsets move: a crash here re-writes, never loses.
                await asyncio.get_running_loop().run_in_executor(None, os.fsync, out.fileno())
            await park_invalid(producer, settings, invalid)
            await consumer.commit()
    finally:
        await consumer.stop()
        await producer.stop()
        if out is not sys.stdout.buffer:
            out.close()
    return written


# -- the Marketing API target ------------------------------------------------------------

class DeliveredRecord(ConsumerRebalanceListener):
    """The sink's durable record of delivered ids, for its assigned partitions."""

    def __init__(self, settings: Settings, producer: AIOKafkaProducer):
        self.settings = settings
        self.topic = settings.topic("delivered_reports_topic")
        self.producer = producer
        self.acked: dict[int, set[str]] = {}
        self.in_doubt: dict[int, set[str]] = {}
        self.loading = asyncio.Lock()

    async def on_partitions_revoked(self, revoked) -> None:
        for tp in revoked:
            self.acked.pop(tp.partition, None)
            self.in_doubt.pop(tp.partition, None)
        self._gauge()

    async def on_partitions_assigned(self, assigned) -> None:
        await self.ensure_loaded({tp.partition for tp in assigned})

    async def ensure_loaded(self, partitions) -> None:
        """Load the partitions not loaded yet. aiokafka may hand out records of a new
        assignment while this listener is still loading, so the sink calls this too."""
        async with self.loading:
            missing = sorted(p for p in partitions if p not in self.acked)
            if missing:
                await self._load(missing)

    async def _load(self, partitions: list[int]) -> None:
        """Read the record's partitions from the start to their current end."""
        reader = AIOKafkaConsumer(bootstrap_servers=self.settings.bootstrap_servers, group_id=None,
                                  enable_auto_commit=False, isolation_level="read_committed")
        await reader.start()
        try:
            tps = [TopicPartition(self.topic, p) for p in partitions]
            reader.assign(tps)
            await reader.seek_to_beginning(*tps)
            end = await reader.end_offsets(tps)
            state: dict[int, dict[str, bytes]] = {p: {} for p in partitions}
            async def behind() -> bool:
                return any([await reader.position(tp) < end[tp] for tp in tps])
            while await behind():
                for tp, records in (await reader.getmany(timeout_ms=500, max_records=50_000)).items():
                    ids = state[tp.partition]
                    for record in records:
                        ids[record.key.decode()] = record.value
            for p, ids in state.items():
                self.acked[p] = {i for i, v in ids.items() if v == ACKED}
                self.in_doubt[p] = {i for i, v in ids.items() if v == SENDING}
        finally:
            await reader.stop()
        self._gauge()
        log.info("delivered record: partitions %s loaded, %d ids acknowledged, %d in doubt", partitions,
                 sum(len(self.acked[p]) for p in partitions), sum(len(self.in_doubt[p]) for p in partitions))

    def delivered(self, partition: int, outer_action_id: str) -> bool:
        # A partition whose record did not load raises (KeyError) rather than answer
        # "not delivered": the sink stops instead of sending something twice.
        return outer_action_id in self.acked[partition]

    async def mark(self, entries: list[tuple[int, str]], state: bytes) -> None:
        """Write `state` for (partition, id) entries and wait until the broker has them all."""
        futures = [await self.producer.send(self.topic, key=i.encode(), value=state, partition=p)
                   for p, i in entries]
        if futures:
            await asyncio.gather(*futures)
        for p, i in entries:
            if state == ACKED:
                self.acked.setdefault(p, set()).add(i)
            if state != SENDING:
                self.in_doubt.get(p, set()).discard(i)
        self._gauge()

    def _gauge(self) -> None:
        metrics.SINK_DELIVERED_IDS.set(sum(len(s) for s in self.acked.values()))


@dataclass
class RoundResult:
    delivered: list[tuple[int, dict]] = field(default_factory=list)
    failed: list[tuple[int, dict, dict]] = field(default_factory=list)   # (partition, report, failure)


class ApiSink:
    """Rounds of read, deliver, record, commit (see the module docstring)."""

    def __init__(self, settings: Settings, client: MarketingApiClient, record: DeliveredRecord,
                 producer: AIOKafkaProducer):
        self.settings = settings
        self.client = client
        self.record = record
        self.producer = producer
        self.slots = asyncio.Semaphore(settings.sink_concurrency)
        self.totals: dict[str, int] = defaultdict(int)

    async def run(self, consumer: AIOKafkaConsumer, stop: asyncio.Event) -> dict:
        s = self.settings
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=s.sink_linger, max_records=s.sink_round)
            if not batches:
                metrics.SINK_OLDEST_UNACKED.set(0)
                continue
            await self.deliver_round(batches)
            try:
                await consumer.commit({tp: records[-1].offset + 1 for tp, records in batches.items()})
            except (CommitFailedError, IllegalStateError) as exc:
                # A rebalance took partitions away mid-round: their new owner re-reads the
                # round and finds what was delivered in the record.
                log.warning("commit after a rebalance failed (%s); the new owner re-reads", type(exc).__name__)
        return dict(self.totals)

    async def deliver_round(self, batches: dict) -> None:
        oldest = min(r.timestamp for records in batches.values() for r in records)
        metrics.SINK_OLDEST_UNACKED.set(max(0.0, time.time() - oldest / 1000))
        await self.record.ensure_loaded({tp.partition for tp in batches})
        todo: list[tuple[int, dict]] = []
        seen: set[str] = set()
        reports, invalid = split_reports(batches)
        await park_invalid(self.producer, self.settings, invalid)
        self.totals["invalid"] += len(invalid)
        for tp, _, report in reports:
            oid = report["outer_action_id"]
            if self.record.delivered(tp.partition, oid) or oid in seen:
                self._count("already_delivered")
                continue
            seen.add(oid)
            if oid in self.record.in_doubt.get(tp.partition, ()):
                self._count("in_doubt_resent")
            todo.append((tp.partition, report))
        if not todo:
            return
        await self.record.mark([(p, r["outer_action_id"]) for p, r in todo], SENDING)
        partition_of = {r["outer_action_id"]: p for p, r in todo}
        result = RoundResult()
        by_account: dict[int, list[Batch]] = defaultdict(list)
        for batch in pack([r for _, r in todo]):
            by_account[batch.account_id].append(batch)
        # One task per account keeps each account's requests in order; accounts run side
        # by side, at most `sink_concurrency` requests at a time.
        await asyncio.gather(*(self._deliver_account(batches_, result, partition_of)
                               for batches_ in by_account.values()))
        await self._send_failures(result.failed)
        await self.record.mark([(p, r["outer_action_id"]) for p, r in result.delivered], ACKED)
        await self.record.mark([(p, r["outer_action_id"]) for p, r, _ in result.failed], FAILED)
        self._count("delivered", len(result.delivered))
        self._count("failed", len(result.failed))

    async def _deliver_account(self, batches: list[Batch], result: RoundResult, partition_of: dict) -> None:
        for batch in batches:
            await self._deliver_batch(batch, result, partition_of)

    async def _deliver_batch(self, batch: Batch, result: RoundResult, partition_of: dict) -> None:
        outcome, status, answer, text = await self._post_until_answered(batch)
        if outcome is Outcome.DELIVERED:
            result.delivered += [(partition_of[r["outer_action_id"]], r) for r in batch.reports]
            return
        if len(batch.reports) > 1:
            # The API rejects a whole request for one bad action: bisect, so only the bad
            # ones fail, at about 2·log2(50) extra requests per bad action.
            half = len(batch.reports) // 2
            for part in (slice(None, half), slice(half, None)):
                await self._deliver_batch(Batch(batch.account_id, batch.user_action_set_id,
                                                batch.reports[part], batch.actions[part]),
                                          result, partition_of)
            return
        report = batch.reports[0]
        failure = {"http_status": status, "response": answer if answer is not None else text}
        result.failed.append((partition_of[report["outer_action_id"]], report, failure))

    async def _post_until_answered(self, batch: Batch):
        """Post until the API gives a final answer: delivered or permanent. Retryable
        answers and errors back off exponentially with full jitter; token errors reload the
        token first."""
        body = batch.body()
        attempt = 0
        while True:
            async with self.slots:
                metrics.SINK_IN_FLIGHT.inc()
                started = time.monotonic()
                try:
                    status, answer, text = await self.client.post(body)
                finally:
                    metrics.SINK_IN_FLIGHT.dec()
                    metrics.SINK_REQUEST_SECONDS.observe(time.monotonic() - started)
            outcome = classify(status, answer)
            metrics.SINK_REQUESTS.labels(outcome.value).inc()
            if outcome is Outcome.DELIVERED:
                metrics.SINK_BATCH_ACTIONS.observe(len(batch.actions))
            if outcome in (Outcome.DELIVERED, Outcome.PERMANENT):
                return outcome, status, answer, text
            if outcome is Outcome.RELOAD_TOKEN:
                changed = self.client.token.reload()
                metrics.SINK_RETRIES.labels("token").inc()
                log.warning("Marketing API answered %s: token reloaded (%s)", answer.get("code"),
                            "changed" if changed else "unchanged; backing off")
                if changed:
                    continue
            else:
                metrics.SINK_RETRIES.labels(_retry_reason(status)).inc()
            attempt += 1
            cap = min(self.settings.sink_max_backoff, 50 * 2 ** min(attempt, 16))
            await asyncio.sleep(random.uniform(0, cap) / 1000)

    async def _send_failures(self, failed: list[tuple[int, dict, dict]]) -> None:
        topic = self.settings.topic("report_failures_topic")
        futures = []
        for _, report, failure in failed:
            value = orjson.dumps({**report, "api_response": failure, "failed_at": int(time.time() * 1000)})
            futures.append(await self.producer.send(topic, key=report["outer_action_id"].encode(), value=value))
        if futures:
            await asyncio.gather(*futures)

    def _count(self, outcome: str, n: int = 1) -> None:
        if n:
            metrics.SINK_REPORTS.labels(outcome).inc(n)
            self.totals[outcome] += n


def _retry_reason(status: Optional[int]) -> str:
    if status is None:
        return "timeout_or_connection"
    if status == 429:
        return "http_429"
    if status >= 500:
        return "http_5xx"
    return "api_code"


async def run_api_sink(settings: Settings, stop: asyncio.Event) -> dict:
    """Deliver reports to the Marketing API until `stop` is set. Returns counts by outcome."""
    if not settings.marketing_api_base:
        raise ConfigError("--target api needs the API address: set TAGSTREAM_MARKETING_API_BASE "
                          "(e.g. https://api.e.qq.com)")
    token = token_from_settings(settings)
    if not token.token:
        raise ConfigError("--target api needs an access token: set TAGSTREAM_ACCESS_TOKEN_FILE "
                          "(re-read when the token expires) or TAGSTREAM_ACCESS_TOKEN")
    producer = _producer(settings)
    await producer.start()
    record = DeliveredRecord(settings, producer)
    consumer = _reports_consumer(settings, listener=record)
    await consumer.start()
    try:
        async with MarketingApiClient(settings.marketing_api_base, token,
                                      RateLimiter(settings.sink_rate_limit),
                                      settings.sink_request_timeout / 1000) as client:
            return await ApiSink(settings, client, record, producer).run(consumer, stop)
    finally:
        await consumer.stop()
        await producer.stop()
