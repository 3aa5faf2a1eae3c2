"""Creating tagstream's topics, with aiokafka's admin client. Topic layout is decided here
once: every topic gets `settings.partitions` partitions (the event topics must match for
co-partitioning, and so must the sink's retry topic and `conversion-reports`: a parked report
keeps its partition number), the rules topic and the delivered-report record are compacted.

The event topics keep their record timestamps honest: the broker refuses a record whose
timestamp is more than `max_future_skew` ahead of its own clock
(`message.timestamp.after.max.ms`, Kafka 3.6+). The worker trusts an event's `ts` only as
far as that record timestamp (`schemas.validation.trusted_time`), so a bad clock upstream
can move neither.
"""
from __future__ import annotations

import asyncio
import time

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka import errors
from aiokafka.errors import TopicAlreadyExistsError

from streams.kafka import connection
from streams.kafka.connection import client_kwargs
from streams.settings import ConfigError, Settings

TOPIC_SETTINGS = (
    "tag_events_topic", "contact_events_topic", "tag_mappings_topic",
    "conversion_reports_topic", "unreportable_topic", "dead_letters_topic",
    "report_failures_topic", "delivered_reports_topic", "retry_reports_topic",
    "wecom_callbacks_topic", "wecom_snapshots_topic", "wecom_tags_topic", "ad_clicks_topic", "wecom_auth_topic",
    "wecom_erasures_topic")
COMPACTED = {"tag_mappings_topic", "delivered_reports_topic", "wecom_snapshots_topic", "wecom_tags_topic",
             "ad_clicks_topic", "wecom_auth_topic"}
EVENT_TOPICS = {"tag_events_topic", "contact_events_topic"}


def topic_configs(name: str, settings: Settings) -> dict[str, str]:
    """The configs a topic of tagstream's is created with (min.insync.replicas included)."""
    if name in COMPACTED:
        return connection.topic_configs(settings, **{"cleanup.policy": "compact"})
    if name == "wecom_erasures_topic":            # the audit, and what keeps a corp that left refused
        return connection.topic_configs(settings, **{"retention.ms": "-1"})
    if name in EVENT_TOPICS:
        return connection.topic_configs(settings, **{"message.timestamp.after.max.ms": str(settings.max_future_skew)})
    return connection.topic_configs(settings)
#: Faust's table changelogs (`{app_id}-{table}-changelog`). Created here, before the worker
#: starts, because a changelog Faust creates itself on a fresh broker can be missing from
#: its consumer's metadata at the first table write, which crashes the agent with
#: PartitionsMismatch ("... has 0 partitions").
CHANGELOG_TABLES = ("rule_versions", "reporting_state")
#: How long a topic just created may stay missing from the broker's metadata. On a fresh
#: KRaft broker a CreateTopics answer can come before the metadata of every new topic is
#: published, so a describe right after it can show a topic with 0 partitions.
METADATA_WAIT_S = 30.0


def partition_counts(described: list[dict]) -> dict[str, int] | None:
    """Partition count per topic from a DescribeTopics answer, or None while any topic is
    still unknown to the broker's metadata (an error code, or no partitions yet)."""
    if any(d["error_code"] != 0 or not d["partitions"] for d in described):
        return None
    return {d["topic"]: len(d["partitions"]) for d in described}


def _created(response, name: str) -> bool:
    """Whether a CreateTopics answer created `name`: False if it already existed; any other
    error (a missing ACL, a replication factor above the broker count) is raised."""
    for topic, code, *rest in response.topic_errors:
        if topic != name or code == 0:
            continue
        if code == TopicAlreadyExistsError.errno:
            return False
        message = next((m for m in rest if isinstance(m, str) and m), "")
        raise errors.for_code(code)(f"creating topic {name}: {message}".rstrip(": "))
    return True


#: How long a process starting while a broker is down keeps asking another one. Found by
#: the cluster chaos run: a sink restarted during the rolling restart asked the node being
#: restarted for metadata and exited (NodeNotReadyError), again and again.
UNAVAILABLE_RETRY_S = 60.0


async def ensure_topics(settings: Settings) -> list[str]:
    """Create any missing topic; returns the names created. Fails with a ConfigError if the
    two event topics exist with different partition counts (they must be co-partitioned).
    A broker that is down (the cluster is restarting one) is retried for a minute."""
    deadline = time.monotonic() + UNAVAILABLE_RETRY_S
    while True:
        try:
            return await _ensure_topics(settings)
        # only a known broker that is down: an unreachable bootstrap is a configuration error,
        # reported at once (streams/kafka/diagnose.py)
        except errors.NodeNotReadyError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(1.0)


async def _ensure_topics(settings: Settings) -> list[str]:
    admin = AIOKafkaAdminClient(**client_kwargs(settings), request_timeout_ms=30000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = []
        for name in TOPIC_SETTINGS:
            topic = settings.topic(name)
            if topic in existing:
                continue
            wanted.append(NewTopic(topic, settings.partitions, settings.replication_factor,
                                   topic_configs=topic_configs(name, settings)))
        for table in CHANGELOG_TABLES:
            topic = f"{settings.app_id}-{table}-changelog"
            if topic not in existing:
                wanted.append(NewTopic(topic, settings.partitions, settings.replication_factor,
                                       topic_configs=connection.topic_configs(settings, **{"cleanup.policy": "compact"})))
        leader = f"{settings.app_id}-__assignor-__leader"     # Faust's own, one partition
        if leader not in existing:
            wanted.append(NewTopic(leader, 1, settings.replication_factor, topic_configs=connection.topic_configs(settings)))
        created = []
        for new_topic in wanted:
            try:
                response = await admin.create_topics([new_topic])
            except TopicAlreadyExistsError:
                continue
            if _created(response, new_topic.name):
                created.append(new_topic.name)
        event_topics = [settings.topic("tag_events_topic"), settings.topic("contact_events_topic")]
        counts = await _wait_for_metadata(admin, sorted(set(event_topics) | set(created)))
        if len({counts[t] for t in event_topics}) != 1:
            found = {t: counts[t] for t in event_topics}
            raise ConfigError(
                f"event topics are not co-partitioned: {found}; recreate them with the same "
                f"partition count (TAGSTREAM_PARTITIONS)")
        return created
    finally:
        await admin.close()


async def _wait_for_metadata(admin: AIOKafkaAdminClient, topics: list[str]) -> dict[str, int]:
    """Partition count of each topic, once the broker's metadata has every one of them."""
    deadline = time.monotonic() + METADATA_WAIT_S
    while True:
        counts = partition_counts(await admin.describe_topics(topics))
        if counts is not None:
            return counts
        if time.monotonic() > deadline:
            raise ConfigError(
                f"topics {topics} are still missing from the broker's metadata after "
                f"{METADATA_WAIT_S:.0f} s; check the broker's log (deploy/kafka/kafka.sh status)")
        await asyncio.sleep(0.1)


async def topic_partitions(settings: Settings, topic: str) -> list[int]:
    """The partition numbers of `topic` as the broker describes it (a consumer's own
    `partitions_for_topic` knows only topics it has subscribed to or fetched)."""
    admin = AIOKafkaAdminClient(**client_kwargs(settings), request_timeout_ms=30000)
    await connection.start_client(admin)
    try:
        return list(range((await _wait_for_metadata(admin, [topic]))[topic]))
    finally:
        await admin.close()
