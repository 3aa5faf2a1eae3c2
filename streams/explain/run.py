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
from aiokafka.partitioner import murmur2

from streams.core.semantics import ReportingPolicy
from streams.explain.timeline import Explainer, Explanation, render
from streams.kafka.connection import start_client
from streams.kafka.reads import partitions_of, reader
from streams.replay.engine import Replay, ReplaySummary
from streams.replay.run import load_erased_corps, load_rule_book, plan_range, replay_topics
from streams.replay.engine import format_time
from streams.settings import ConfigError, Settings
from streams.sinks.parking import ACKED, FAILED, SENDING, Parked, parse_state


def partition_of(key: str, partitions: int) -> int:
    """The partition Kafka's default partitioner gives `key` (as every tagstream producer uses)."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


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


async def _latest(consumer, topic: str, keys: set[str], since_ms: int) -> dict[str, Optional[bytes]]:
    """The newest value of each of `keys` on `topic`, reading only their partitions, from
    `since_ms` to the end as of now."""
    count = len(await partitions_of(consumer, topic))
    if not count or not keys:
        return {}
    tps = sorted({TopicPartition(topic, partition_of(k, count)) for k in keys})
    ends = await consumer.end_offsets(tps)
    starts = await consumer.offsets_for_times({tp: since_ms for tp in tps})
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


async def explain(settings: Settings, corp_id: str, external_userid: str, from_ms: int, to_ms: int) -> Explanation:
    erased = await load_erased_corps(settings)
    if corp_id in erased:
        raise ConfigError(f"corp {corp_id} cancelled its authorisation and was erased at {format_time(erased[corp_id])}: "
                          "tagstream keeps nothing of it to explain")
    book, _ = await load_rule_book(settings)
    policy = ReportingPolicy.from_settings(settings)
    consumer = reader(settings)
    await start_client(consumer)
    try:
        count = len(await partitions_of(consumer, settings.topic("tag_events_topic")))
        if not count:
            raise ConfigError(f"topic {settings.topic('tag_events_topic')} does not exist (check --topic-prefix)")
        partition = partition_of(f"{corp_id}:{external_userid}", count)
        plan = await plan_range(consumer, settings, from_ms, to_ms, only={partition})
        explainer = Explainer(corp_id, external_userid, book, policy, from_ms, to_ms)
        replay = Replay(book, policy, explainer, ReplaySummary(), max_future_skew_ms=settings.max_future_skew,
                        observer=explainer.observe)
        await replay_topics(settings, replay, plan, consumer, from_ms, to_ms)
        replay.finish(idle_at=int(time.time() * 1000))      # what a live worker, idle now, has let go
        oids = {r["outer_action_id"] for r in explainer.reports_in_order()}
        states = await _latest(consumer, settings.topic("delivered_reports_topic"), oids, from_ms)
        failed = {oid for oid, value in states.items() if parse_state(value) == FAILED}
        failures = await _latest(consumer, settings.topic("report_failures_topic"), failed, from_ms)
    finally:
        await consumer.stop()
    delivery = {oid: delivery_words(states.get(oid), orjson.loads(failures[oid]) if failures.get(oid) else None)
                for oid in oids}
    return explainer.explanation(partition, delivery)


async def run_explain(settings: Settings, target: str, from_ms: int, to_ms: int, as_json: bool) -> int:
    corp_id, sep, external_userid = target.partition(":")
    if not (corp_id and sep and external_userid):
        raise ConfigError(f"{target!r}: give the customer as CORP:EXTERNAL_USERID, e.g. ww51a2:wmKx01")
    if from_ms >= to_ms:
        raise ConfigError(f"--from {format_time(from_ms)} is not before --to {format_time(to_ms)}")
    explanation = await explain(settings, corp_id, external_userid, from_ms, to_ms)
    print(orjson.dumps(explanation.as_dict(), option=orjson.OPT_INDENT_2).decode() if as_json else render(explanation))
    return 0
