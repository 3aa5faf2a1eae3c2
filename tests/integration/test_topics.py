"""Topic creation on the real broker (streams.kafka.admin.ensure_topics)."""
import asyncio

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from streams.kafka.admin import CHANGELOG_TABLES, TOPIC_SETTINGS, ensure_topics
from streams.settings import ConfigError
from tests import kafka_io
from tests.integration.conftest import Pipeline


async def _partition_counts(topics: list[str]) -> dict[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_io.BOOTSTRAP)
    await admin.start()
    try:
        return {d["topic"]: len(d["partitions"]) for d in await admin.describe_topics(topics)}
    finally:
        await admin.close()


def test_every_topic_is_usable_when_ensure_topics_returns(kafka_broker, tmp_path):
    # CI found a describe right after CreateTopics showing a new topic with 0 partitions,
    # which ensure_topics then reported as "not co-partitioned". Several fresh deployments in
    # a row, each checked the moment ensure_topics returns. On a freshly started broker the
    # code before the fix failed this in 2 of 4 tries (most sensitive when run first).
    prefixes = []
    try:
        for i in range(5):
            pipeline = Pipeline(tmp_path / str(i), partitions=3)
            prefixes.append(pipeline.settings.app_id)
            created = asyncio.run(ensure_topics(pipeline.settings))
            wanted = [pipeline.settings.topic(name) for name in TOPIC_SETTINGS] + [
                f"{pipeline.settings.app_id}-{table}-changelog" for table in CHANGELOG_TABLES]
            leader = f"{pipeline.settings.app_id}-__assignor-__leader"     # Faust's, one partition
            assert sorted(created) == sorted(wanted + [leader])
            assert asyncio.run(_partition_counts(wanted + [leader])) == {**{t: 3 for t in wanted}, leader: 1}
            assert asyncio.run(ensure_topics(pipeline.settings)) == []  # a second call creates nothing
    finally:
        for prefix in prefixes:
            kafka_io.delete_topics_with_prefix(prefix)


def test_event_topics_with_different_partition_counts_are_refused(kafka_broker, tmp_path):
    pipeline = Pipeline(tmp_path, partitions=4)
    settings = pipeline.settings

    async def create_contact_events_with_two_partitions() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_io.BOOTSTRAP)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(settings.topic("contact_events_topic"), 2, 1)])
        finally:
            await admin.close()

    try:
        asyncio.run(create_contact_events_with_two_partitions())
        with pytest.raises(ConfigError, match=r"not co-partitioned: .*contact-events': 2.*TAGSTREAM_PARTITIONS"):
            asyncio.run(ensure_topics(settings))
    finally:
        kafka_io.delete_topics_with_prefix(settings.app_id)
