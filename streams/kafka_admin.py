"""Creating tagstream's topics, with aiokafka's admin client. Topic layout is decided here
once: every topic gets `settings.partitions` partitions (the event topics must match for
co-partitioning), the rules topic and the delivered-report record are compacted.
"""
from __future__ import annotations

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from streams.settings import ConfigError, Settings

TOPIC_SETTINGS = (
    "tag_events_topic", "contact_events_topic", "tag_mappings_topic",
    "conversion_reports_topic", "unreportable_topic", "dead_letters_topic",
    "report_failures_topic", "delivered_reports_topic")
COMPACTED = {"tag_mappings_topic", "delivered_reports_topic"}
#: Faust's table changelogs (`{app_id}-{table}-changelog`). Created here, before the worker
#: starts, because a changelog Faust creates itself on a fresh broker can be missing from
#: its consumer's metadata at the first table write, which crashes the agent with
#: PartitionsMismatch ("... has 0 partitions").
CHANGELOG_TABLES = ("rule_versions", "reporting_state")


async def ensure_topics(settings: Settings) -> list[str]:
    """Create any missing topic; returns the names created. Fails with a ConfigError if the
    two event topics exist with different partition counts (they must be co-partitioned)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers, request_timeout_ms=30000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = []
        for name in TOPIC_SETTINGS:
            topic = settings.topic(name)
            if topic in existing:
                continue
            configs = {"cleanup.policy": "compact"} if name in COMPACTED else {}
            wanted.append(NewTopic(topic, settings.partitions, 1, topic_configs=configs))
        for table in CHANGELOG_TABLES:
            topic = f"{settings.app_id}-{table}-changelog"
            if topic not in existing:
                wanted.append(NewTopic(topic, settings.partitions, 1, topic_configs={"cleanup.policy": "compact"}))
        created = []
        for new_topic in wanted:
            try:
                await admin.create_topics([new_topic])
                created.append(new_topic.name)
            except TopicAlreadyExistsError:
                pass
        described = await admin.describe_topics(
            [settings.topic("tag_events_topic"), settings.topic("contact_events_topic")])
        counts = {d["topic"]: len(d["partitions"]) for d in described}
        if len(set(counts.values())) != 1:
            raise ConfigError(
                f"event topics are not co-partitioned: {counts}; recreate them with the same "
                f"partition count (TAGSTREAM_PARTITIONS)")
        return created
    finally:
        await admin.close()
