"""Reporting rules: folding the compacted rules topic into a versioned history, and giving
every worker a complete, current copy of that history.

Why not a Faust GlobalTable: its recovery with several workers is fragile (standby
bookkeeping on every partition, known to stall or skip after rebalances). Instead:

1. `fold_rule_versions` is an ordinary partitioned agent. It folds each rule record into
   the full version history of its key and stores it in the changelogged `rule_versions`
   table. Compaction of the input topic may drop old versions; the history keeps them.
2. `RuleReplica` runs in every worker: a plain aiokafka consumer, with no consumer group,
   assigned every partition of that table's changelog, reading from the beginning and then
   following it. No group means no rebalance can take rules away from a worker, and a
   restart simply reads the (compacted, small) changelog again.

**Ready.** Events wait until the book holds every rule that was on the rules topic when the
worker started. Reading the changelog to its end is not enough: the fold may not have
caught up yet (on a fresh deployment the changelog is still empty while the rules topic is
full), and events applied then find no rule as of their time: their reports are silently
lost. (The chaos run found this: with the events already on the topics when the workers
started, the first few percent of the log was applied with a partial book.) So the replica
first waits until the app's consumer group has *committed* the rules topic up to its
startup end (Faust flushes the changelog writes before it commits the offsets they cover),
and then reads the changelog up to its end as it stood after that.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Mapping, Optional

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from agents.dead_letters import park
from schemas.records import rule_key
from schemas.validation import Rejection, RuleTombstone, decode_reporting_rule
from streams.kafka.reads import records_left
from streams.observability import metrics
from streams.core.rulebook import RuleBook, decode_history, encode_history, with_rule

log = logging.getLogger(__name__)


def fold_rule_versions(rule_versions, dead_letters_topic):
    """Agent body over the rules topic: record -> updated version history in the table."""
    async def fold(stream):
        async for event in stream.events():
            message = event.message
            decoded = decode_reporting_rule(message.key, message.value)
            if isinstance(decoded, Rejection):
                await park(dead_letters_topic, message, decoded)
                continue
            key = rule_key(decoded.corp_id, decoded.tag_id).encode()
            if isinstance(decoded, RuleTombstone):
                if key in rule_versions:
                    del rule_versions[key]
                metrics.EVENTS.labels(message.topic, "rule_deleted").inc()
                continue
            stored = rule_versions.get(key)
            history = decode_history(stored) if stored is not None else []
            rule_versions[key] = encode_history(with_rule(history, decoded))
            metrics.EVENTS.labels(message.topic, "rule_applied").inc()
    return fold


class RuleReplica:
    """This worker's full copy of every rule history, read from the table's changelog."""

    def __init__(self, connection: Mapping[str, Any], changelog_topic: str, partitions: int, *,
                 rules_topic: str, group_id: str, book: Optional[RuleBook] = None):
        self.connection = connection            # streams.kafka.connection.client_kwargs
        self.changelog_topic = changelog_topic
        self.partitions = partitions             # of the changelog, and of the rules topic it folds
        self.rules_topic = rules_topic
        self.group_id = group_id                 # the app's group, which runs the fold
        self.book = book or RuleBook()
        self.ready = asyncio.Event()

    async def run(self) -> None:
        """Follow the changelog forever; a broker error restarts the read from scratch."""
        while True:
            try:
                await self._follow()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("rule replica: read failed; starting over in 1 s")
                await asyncio.sleep(1)

    async def _follow(self) -> None:
        consumer = AIOKafkaConsumer(
            **self.connection, group_id=None, enable_auto_commit=False,
            isolation_level="read_committed", auto_offset_reset="earliest")
        await consumer.start()
        try:
            partitions = await self._wait_for_partitions(consumer, self.changelog_topic)
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            if not self.ready.is_set():
                await self._wait_until_folded(consumer)
            # Taken after the fold's commit: this end covers every rule on the topic at startup.
            startup_end = await consumer.end_offsets(partitions)
            while True:
                batches = await consumer.getmany(timeout_ms=200, max_records=5000)
                for records in batches.values():
                    for record in records:
                        self.book.apply_changelog(record.key, record.value)
                metrics.RULE_VERSIONS.set(self.book.versions)
                if not self.ready.is_set() and await self._caught_up(consumer, startup_end):
                    log.info("rule replica: ready, %d keys, %d versions", len(self.book), self.book.versions)
                    metrics.RULE_BOOK_READY.set(1)
                    self.ready.set()
        finally:
            await consumer.stop()

    async def _wait_until_folded(self, consumer: AIOKafkaConsumer) -> None:
        """Until the app's group has committed every rules partition up to its end as it
        stands now (so the fold has written those rules to the changelog)."""
        rules = await self._wait_for_partitions(consumer, self.rules_topic)
        start, end = await consumer.beginning_offsets(rules), await consumer.end_offsets(rules)
        unfolded = {tp: offset for tp, offset in end.items() if offset > start[tp]}
        log.info("rule replica: waiting until %s is folded up to %s", self.rules_topic,
                 {tp.partition: offset for tp, offset in unfolded.items()})
        if not unfolded:
            return
        admin = AIOKafkaAdminClient(**self.connection)
        await admin.start()
        probe = AIOKafkaConsumer(**self.connection, group_id=None, enable_auto_commit=False,
                                 isolation_level="read_committed")
        await probe.start()
        try:
            while True:
                committed = await admin.list_consumer_group_offsets(self.group_id, partitions=list(unfolded))
                done = {tp: committed[tp].offset for tp in unfolded
                        if committed.get(tp) is not None and committed[tp].offset >= 0}
                lagging = {tp: max(done.get(tp, start[tp]), start[tp]) for tp, offset in unfolded.items()
                           if done.get(tp, -1) < offset}
                # the enrichment erases a corp's rules in transactions: a partition can end in a
                # commit marker the fold never sees, so "committed up to the end" never comes
                if not lagging or not await records_left(probe, lagging, unfolded):
                    return
                await asyncio.sleep(0.5)
        finally:
            await probe.stop()
            await admin.close()

    async def _wait_for_partitions(self, consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
        """Every partition of `topic`, once it exists (Faust declares the changelog when the
        worker starts; the topology gives it the rules topic's partition count)."""
        while topic not in await consumer.topics():
            await asyncio.sleep(0.2)
        return [TopicPartition(topic, p) for p in range(self.partitions)]

    @staticmethod
    async def _caught_up(consumer: AIOKafkaConsumer, end: dict) -> bool:
        for tp, offset in end.items():
            if await consumer.position(tp) < offset:
                return False
        return True
