"""`tagstream reconcile`: find what WeCom never called back about, and repair it (SPEC §7).

For each corp, every staff member with the customer-contact permission
(`get_follow_user_list`) and, 100 at a time, their customers (`batch/get_by_user`, cursor
paging). Each relationship is compared with the enrichment's snapshot (`wecom-snapshots`):

- no snapshot: the add was never enriched (its callback was lost): a synthetic add, whose
  contact event gets the id the lost callback would have given;
- different corp tags: a synthetic edit; the enrichment fetches the customer and emits the
  diff, with the ids a callback would have given.

Synthetic callbacks go through `wecom-callbacks` and the enrichment like real ones
(streams/wecom/tagging.py), so reconciling while callbacks flow is safe, and so is running it
twice: before comparing, it waits until the enrichment has handled everything already on
`wecom-callbacks`, so the second run finds the snapshots the first run's callbacks moved, and
writes nothing.

Resumable: after each page it records (staff batch, cursor) per corp in `state_dir`; a
restarted run continues from there (what it repeats is harmless: the comparison is redone).
Rate-limited by the API client's per-corp buckets.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from streams.kafka import connection
from streams.kafka.admin import topic_partitions
from streams.settings import Settings
from streams.wecom.api import WeComClient
from streams.wecom.enrich import read_snapshots
from streams.wecom.enrichment import snapshot_key
from streams.wecom.tagging import synthetic_add, synthetic_edit, write_callback

log = logging.getLogger(__name__)

STAFF_PER_CALL = 100


@dataclass
class ReconcileSummary:
    relationships: int = 0
    missing_adds: int = 0
    differing_tags: int = 0
    by_corp: dict = field(default_factory=dict)

    @property
    def written(self) -> int:
        return self.missing_adds + self.differing_tags

    def render(self) -> str:
        lines = [f"reconciled {self.relationships:,} relationships: {self.missing_adds:,} adds never enriched, "
                 f"{self.differing_tags:,} with tags that differ from their snapshot; "
                 f"{self.written:,} synthetic callbacks written"]
        lines += [f"  {corp}: {n['relationships']:,} relationships, {n['missing_adds']:,} missing adds, "
                  f"{n['differing_tags']:,} differing" for corp, n in sorted(self.by_corp.items())]
        return "\n".join(lines)


async def wait_for_enrichment(settings: Settings, timeout_s: float = 120.0) -> bool:
    """Until the enrichment group has committed wecom-callbacks up to its end as of now."""
    topic, group = settings.topic("wecom_callbacks_topic"), f"{settings.app_id}-enrich"
    admin = AIOKafkaAdminClient(**connection.client_kwargs(settings))
    consumer = AIOKafkaConsumer(**connection.client_kwargs(settings), group_id=None, isolation_level="read_committed")
    await connection.start_client(admin)
    try:
        await connection.start_client(consumer)
        tps = [TopicPartition(topic, p) for p in await topic_partitions(settings, topic)]
        ends = await consumer.end_offsets(tps)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            committed = await admin.list_consumer_group_offsets(group, partitions=tps)
            if all((committed.get(tp).offset if committed.get(tp) else 0) >= end for tp, end in ends.items()):
                return True
            await asyncio.sleep(0.5)
        return False
    finally:
        await consumer.stop()
        await admin.close()


class Progress:
    """Per corp: the staff batch and cursor reached, in a small JSON file."""

    def __init__(self, state_dir: Path):
        self.path = state_dir / "reconcile-progress.json"
        self.done: dict = json.loads(self.path.read_text()) if self.path.exists() else {}

    def position(self, corp_id: str) -> tuple[int, str]:
        entry = self.done.get(corp_id) or {}
        return int(entry.get("batch", 0)), entry.get("cursor", "")

    def save(self, corp_id: str, batch: int, cursor: str) -> None:
        self.done[corp_id] = {"batch": batch, "cursor": cursor}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.done))
        tmp.replace(self.path)

    def finish(self, corp_id: str) -> None:
        self.done.pop(corp_id, None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.done))


async def reconcile(settings: Settings, client: WeComClient, corp_ids: list[str], *, state_dir: Path,
                    since_s: Optional[int] = None, progress_bar=None) -> ReconcileSummary:
    if not await wait_for_enrichment(settings):
        log.warning("reconcile: the enrichment has not caught up with wecom-callbacks in 120 s; "
                    "comparing with older snapshots (what it writes is harmless, maybe redundant)")
    snapshots = await read_snapshots(settings)
    producer = AIOKafkaProducer(**connection.producer_kwargs(settings, linger_ms=5), client_id="tagstream-reconcile")
    await connection.start_client(producer)
    summary = ReconcileSummary()
    progress = Progress(state_dir)
    try:
        for corp_id in corp_ids:
            counts = summary.by_corp.setdefault(corp_id, {"relationships": 0, "missing_adds": 0, "differing_tags": 0})
            staff = sorted(await client.follow_user_list(corp_id))
            first_batch, cursor = progress.position(corp_id)
            for batch in range(first_batch, (len(staff) + STAFF_PER_CALL - 1) // STAFF_PER_CALL):
                userids = staff[batch * STAFF_PER_CALL:(batch + 1) * STAFF_PER_CALL]
                while True:
                    page = await client.batch_get_by_user(corp_id, userids, cursor)
                    for entry in page.get("external_contact_list") or []:
                        await _compare(settings, producer, snapshots, corp_id, entry, since_s, summary, counts)
                        if progress_bar is not None:
                            progress_bar.update(1)
                    cursor = page.get("next_cursor") or ""
                    progress.save(corp_id, batch if cursor else batch + 1, cursor)
                    if not cursor:
                        break
            progress.finish(corp_id)
        await producer.flush()
    finally:
        await producer.stop()
    return summary


async def _compare(settings: Settings, producer: AIOKafkaProducer, snapshots: dict, corp_id: str, entry: dict,
                   since_s: Optional[int], summary: ReconcileSummary, counts: dict) -> None:
    customer = (entry.get("external_contact") or {}).get("external_userid")
    follow = entry.get("follow_info") or {}
    userid = follow.get("userid")
    if not customer or not userid or (since_s is not None and int(follow.get("createtime") or 0) < since_s):
        return
    summary.relationships += 1
    counts["relationships"] += 1
    snapshot = snapshots.get(snapshot_key(corp_id, customer, userid))
    if snapshot is None:
        summary.missing_adds += 1
        counts["missing_adds"] += 1
        await write_callback(producer, settings, synthetic_add(corp_id, userid, customer,
                                                               int(follow.get("createtime") or time.time()),
                                                               follow.get("state") or None))
    elif set(snapshot.tags) != set(follow.get("tag_id") or []):
        summary.differing_tags += 1
        counts["differing_tags"] += 1
        await write_callback(producer, settings, synthetic_edit(corp_id, userid, customer, "tagstream_reconcile"))
