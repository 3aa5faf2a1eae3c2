"""`tagstream explain CORP:EXTERNAL_USERID`: the Kafka side (SPEC §9).

Bounded, read-only, no consumer group: the rule book (as replay reads it), the customer's
one partition of both event topics for the range (`offsets_for_times`, never the whole
topic), and, for the reports found, their partitions of the delivered record and of
`report-failures` from the start of the range on (a delivery is recorded after its report,
and a report after its event). The timeline itself is `streams.explain.timeline`.
"""
from __future__ import annotations

import time
from typing import Optional

import orjson
from aiokafka import TopicPartition
from streams.kafka.partitioner import kafka_partition

from streams.core.semantics import ReportingPolicy
from streams.explain.timeline import Explainer, Explanation, render
from streams.kafka.connection import start_client
from streams.kafka.reads import partitions_of, reader
from streams.replay.engine import Replay, ReplaySummary, format_time
from streams.replay.run import load_erased_corps, load_rule_book, plan_range, replay_topics
from streams.settings import ConfigError, Settings
from streams.sinks.parking import ACKED, FAILED, SENDING, Parked, parse_state


def partition_of(key: str, partitions: int) -> int:
    """The partition Kafka's default partitioner gives `key` (as every tagstream producer uses)."""
    return kafka_partition(key.encode(), partitions)


def delivery_words(value: Optional[bytes], failure: Optional[dict]) -> dict:
    state = parse_state(value)
    if state == ACKED:
        return {"state": "acked"}
    if state == FAILED:
        answer = (failure or {}).get("api_response")
        return {"state": "failed", "answer": orjson.dumps(answer).decode() if answer else None}
    if state == SENDING:
        return {"state": "in doubt (a request was out when the sink stopped; it is sent again)"}
    if isinstance(state, Parked):
        return {"state": "in doubt (retrying)" if state.retrying else
                "parked: the API kept refusing the account; retried from the retry topic"}
    return {"state": "not yet sent"}


async def _latest(offsets, consumer, topic: str, count: int, keys: set[str], since_ms: int) -> dict[str, Optional[bytes]]:
    """The newest value of each of `keys` on `topic` (of `count` partitions), reading only
    their partitions, from `since_ms` to the end as of now (offsets asked of `offsets`,
    records read by `consumer`)."""
    if not count or not keys:
        return {}
    tps = sorted({TopicPartition(topic, partition_of(k, count)) for k in keys})
    ends = await offsets.end_offsets(tps)
    starts = await offsets.offsets_for_times({tp: since_ms for tp in tps})
    found: dict[str, Optional[bytes]] = {}
    todo = {tp for tp in tps if starts[tp] is not None and starts[tp].offset < ends[tp]}
    consumer.assign(tps)
    for tp in todo:
        consumer.seek(tp, starts[tp].offset)
    while todo:
        for tp, records in (await consumer.getmany(*todo, timeout_ms=500, max_records=20_000)).items():
            for record in records:
                key = record.key.decode() if record.key else ""
                if key in keys and record.offset < ends[tp]:
                    found[key] = record.value
        for tp in list(todo):
            if await consumer.position(tp) >= ends[tp]:
                todo.discard(tp)
    return found


class Explaining:
    """What every explanation needs, read once: the erased corps, the rule book (as replay
    reads it) and two readers. One only asks offsets and metadata, so no fetch of the other
    is ever in flight ahead of those questions on its connection (each would wait out the
    broker's fetch wait: 5-7 s per customer when one consumer did both). `tagstream
    explain` uses one for one customer; a test or a support tool asks it for many (each
    then costs one partition's range, not a client's start and the rules' read). Rules
    published after it opened are not seen: open another.

        async with Explaining(settings) as session:
            explanation = await session.explain("ww51a2", "wmKx01", from_ms, to_ms)
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.policy = ReportingPolicy.from_settings(settings)
        self.known: dict[str, list[int]] = {}     # topic -> its partitions, asked once (35 ms each)

    async def partitions(self, topic: str) -> list[int]:
        if not self.known.get(topic):
            self.known[topic] = await partitions_of(self.offsets, topic)
        return self.known[topic]

    async def __aenter__(self) -> "Explaining":
        self.erased = await load_erased_corps(self.settings)
        self.book, _ = await load_rule_book(self.settings)
        self.offsets = reader(self.settings)
        await start_client(self.offsets)
        self.consumer = reader(self.settings, fetch_max_wait_ms=50)
        await start_client(self.consumer)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.consumer.stop()
        await self.offsets.stop()

    async def explain(self, corp_id: str, external_userid: str, from_ms: int, to_ms: int) -> Explanation:
        settings, offsets, consumer = self.settings, self.offsets, self.consumer
        if corp_id in self.erased:
            raise ConfigError(f"corp {corp_id} cancelled its authorisation and was erased at "
                              f"{format_time(self.erased[corp_id])}: tagstream keeps nothing of it to explain")
        count = len(await self.partitions(settings.topic("tag_events_topic")))
        if not count:
            raise ConfigError(f"topic {settings.topic('tag_events_topic')} does not exist (check --topic-prefix)")
        partition = partition_of(f"{corp_id}:{external_userid}", count)
        await self.partitions(settings.topic("contact_events_topic"))
        plan = await plan_range(offsets, settings, from_ms, to_ms, only={partition}, known=self.known)
        explainer = Explainer(corp_id, external_userid, self.book, self.policy, from_ms, to_ms)
        replay = Replay(self.book, self.policy, explainer, ReplaySummary(), max_future_skew_ms=settings.max_future_skew,
                        observer=explainer.observe, follow=explainer.key)
        await replay_topics(settings, replay, plan, consumer, from_ms, to_ms)
        replay.finish(idle_at=int(time.time() * 1000))      # what a live worker, idle now, has let go
        oids = {r["outer_action_id"] for r in explainer.reports_in_order()}
        delivered, failures_topic = settings.topic("delivered_reports_topic"), settings.topic("report_failures_topic")
        states = await _latest(offsets, consumer, delivered, len(await self.partitions(delivered)), oids, from_ms)
        failed = {oid for oid, value in states.items() if parse_state(value) == FAILED}
        failures = await _latest(offsets, consumer, failures_topic, len(await self.partitions(failures_topic)),
                                 failed, from_ms)
        delivery = {oid: delivery_words(states.get(oid), orjson.loads(failures[oid]) if failures.get(oid) else None)
                    for oid in oids}
        return explainer.explanation(partition, delivery)


async def explain(settings: Settings, corp_id: str, external_userid: str, from_ms: int, to_ms: int) -> Explanation:
    """One customer's explanation (a session of its own)."""
    async with Explaining(settings) as session:
        return await session.explain(corp_id, external_userid, from_ms, to_ms)


async def run_explain(settings: Settings, target: str, from_ms: int, to_ms: int, as_json: bool) -> int:
    corp_id, sep, external_userid = target.partition(":")
    if not (corp_id and sep and external_userid):
        raise ConfigError(f"{target!r}: give the customer as CORP:EXTERNAL_USERID, e.g. ww51a2:wmKx01")
    if from_ms >= to_ms:
        raise ConfigError(f"--from {format_time(from_ms)} is not before --to {format_time(to_ms)}")
    explanation = await explain(settings, corp_id, external_userid, from_ms, to_ms)
    print(orjson.dumps(explanation.as_dict(), option=orjson.OPT_INDENT_2).decode() if as_json else render(explanation))
    return 0
