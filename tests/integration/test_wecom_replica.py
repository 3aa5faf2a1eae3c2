"""The enrichment's replicas of compacted topics (`ad-clicks`, `wecom-tags`) on the real broker.

An add whose `state` has no click id yet waits for the clicks replica to reach the topic's
end (streams/wecom/enrich.py). Issue 20's bench measured that wait at 500 ms per add: the end
offsets were asked on the follower's own connection, behind the fetch the broker holds for
`fetch_max_wait`. They are now asked over a second client, and adds that wait at once share
its requests. These tests check what that must keep: a record written before `caught_up`
is in the replica when it returns, and a burst of waiting adds sends a request or two, not
one each.
"""
from __future__ import annotations

import asyncio
import uuid

import orjson
from aiokafka import AIOKafkaProducer

from streams.kafka import connection
from streams.kafka.admin import ensure_topics
from streams.settings import Settings
from streams.kafka.replica import CompactedReplica
from tests import kafka_io


def test_a_click_written_before_caught_up_is_in_the_replica_when_it_returns(kafka_broker):
    prefix = f"it-replica-{uuid.uuid4().hex[:8]}."
    settings = Settings(topic_prefix=prefix, partitions=4)

    async def scenario() -> None:
        await ensure_topics(settings)
        topic = settings.topic("ad_clicks_topic")
        replica = CompactedReplica(settings, topic)
        producer = AIOKafkaProducer(**connection.producer_kwargs(settings))
        await replica.start()
        await producer.start()
        try:
            assert await replica.caught_up(5.0)          # an empty topic is caught up at once
            for i in range(30):                          # one click at a time, each read before the next
                key = f"wwcorp:state-{i}"
                await producer.send_and_wait(topic, key=key.encode(), value=orjson.dumps({"click_id": f"c{i}"}))
                assert await replica.caught_up(5.0)
                assert orjson.loads(replica.values[key]) == {"click_id": f"c{i}"}
            await producer.send_and_wait(topic, key=b"wwcorp:state-0", value=None)     # a tombstone
            assert await replica.caught_up(5.0)
            assert "wwcorp:state-0" not in replica.values

            # a batch of 50 adds whose clicks were all written just before they wait
            for i in range(50):
                await producer.send(topic, key=f"wwcorp:burst-{i}".encode(), value=b'{"click_id":"b"}')
            await producer.flush()
            before = replica.probes_started
            assert all(await asyncio.gather(*(replica.caught_up(5.0) for _ in range(50))))
            assert all(f"wwcorp:burst-{i}" in replica.values for i in range(50))
            assert replica.probes_started - before <= 2, replica.probes_started - before
        finally:
            await producer.stop()
            await replica.stop()

    try:
        asyncio.run(scenario())
    finally:
        kafka_io.delete_topics_with_prefix(prefix)
