"""`tagstream enrich`: WeCom's callbacks become tag and contact events, exactly once (SPEC §7).

Its own process and consumer group (`<app id>-enrich`) on `wecom-callbacks`, not an agent
of the worker: it waits on WeCom's API (tokens, rate limits, 45009 blocks of 60 s), and a
worker partition waiting on a WeCom call would hold back every customer on it. Here a corp
that WeCom refuses delays only its own callbacks (below), and the worker never waits on
WeCom.

**Exactly once.** Each partition of `wecom-callbacks` has its own transactional producer
(`transactional_id = <app id>-enrich-<partition>`, so a new owner of the partition fences the
old one, zombie included). A batch of the partition's callbacks is fetched; the API is
called for each (outside the transaction: reads only); then one transaction writes the
resulting events to `tag-events` / `contact-events`, the changed snapshots to
`wecom-snapshots` (compacted, same partition number, the snapshot table's changelog), the
catalogue to `wecom-tags`, dead letters, and the consumer offsets. A crash anywhere before
the commit aborts all of it; the next owner restores the snapshots and computes the same
diffs from the same versions, so the same event ids (streams/wecom/enrichment.py). The
worker reads its input `read_committed`, so it never sees an aborted event.

**One corp never stops the others.** A callback whose corp WeCom keeps refusing after the
client's retries (`WeComUnavailable`) is *deferred*: it and every later callback of that
corp on the partition wait in the corp's queue, in order, while the others go on. The
corp's queue is retried after a pause (2 s, doubling to a minute). The committed offset
stays at the oldest deferred callback, so a restart reads the deferred callbacks again;
the callbacks after it that were enriched find their snapshot moved and write nothing new
(an add's contact event comes out with its same id, which the worker drops). A partition
holding more than `MAX_DEFERRED` deferred callbacks stops fetching until they drain (a
memory bound, logged).

Permanent API errors (e.g. 84061, no such contact) send the callback to `dead-letters`
with the errcode.

**Provider mode** (streams/wecom/provider.py): the suite's commands are acted on here, in
order on their partition, and their results written to `wecom-auth`, which this process
follows. A corp's events are enriched only while its authorisation is active; those of a
corp that has cancelled, or is inactive, are refused (counted, and dropped: a dead letter
would keep an erased corp's data). Those of a corp not authorised yet wait like a corp WeCom
refuses (its `create_auth` is keyed by the suite, so it may be applied on another partition
a moment later), for at most `UNKNOWN_CORP_WAIT_S`, and are refused after that. A permanent code WeCom refuses (40084) makes the corp
inactive. Click ids come from `ad-clicks` (a replica of the compacted topic, read to
its end before an add is enriched), and the tag catalogue is kept in `wecom-tags` from
`get_corp_tag_list` after each `change_external_tag`.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import defaultdict, deque
from typing import Optional

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition

from schemas.validation import Rejection
from streams.kafka import connection
from streams.kafka.admin import topic_partitions
from streams.kafka.reads import read_to_end
from streams.kafka.replica import CompactedReplica
from streams.observability import metrics
from streams.settings import Settings
from streams.state.failpoints import failpoint
from streams.wecom.api import CODE_REFUSED, RETRY_BUDGET_S, WeComClient, WeComError, WeComUnavailable
from streams.wecom.corps import Corp
from streams.core.erasure import audit_record, corp_hash, reinstated_record, request_record
from streams.wecom.provider import ACTIVE, CANCELLED, COMMANDS, INACTIVE, Authorisation, agent_id_of, open_command
from streams.wecom.enrichment import (ADDS, DELETES, Snapshot, contact_event, corp_tags, diff_tags,
                                      follow_user_of, snapshot_key)
from streams.wecom.messages import Callback

log = logging.getLogger(__name__)

#: how long a corp's deferred callbacks wait before the first retry (doubling to a minute)
RETRY_PAUSE_S = 2.0
#: the retry budget of a deferred corp's retry: one quick look while the others wait
RETRY_LOOK_S = 1.0
#: deferred callbacks a partition may hold in memory before its fetching pauses
MAX_DEFERRED = 50_000
#: how long an add waits for the ad-clicks replica to reach the topic's end
CLICKS_WAIT_S = 5.0
#: provider mode: how long the callbacks of a corp with no authorisation wait for its
#: create_auth (keyed by the suite, so maybe on another partition) before they are refused;
#: an auth code is valid for 10 minutes
UNKNOWN_CORP_WAIT_S = 600.0


async def read_snapshots(settings: Settings, partitions: Optional[list[int]] = None) -> dict[str, Snapshot]:
    """The snapshots of `partitions` (default: all) from the compacted `wecom-snapshots`, read
    to its end as of the call: an enrichment restoring a partition, or `tagstream reconcile`."""
    topic = settings.topic("wecom_snapshots_topic")
    consumer = AIOKafkaConsumer(**connection.client_kwargs(settings), group_id=None, enable_auto_commit=False,
                                isolation_level="read_committed", client_id="tagstream-snapshots")
    await connection.start_client(consumer)
    try:
        numbers = partitions if partitions is not None else await topic_partitions(settings, topic)
        snapshots: dict[str, Snapshot] = {}

        def on_record(record) -> None:
            key = record.key.decode()
            if record.value is None:
                snapshots.pop(key, None)
            else:
                snapshots[key] = Snapshot.from_wire(orjson.loads(record.value))
        await read_to_end(consumer, [TopicPartition(topic, p) for p in numbers], on_record)
        return snapshots
    finally:
        await consumer.stop()


def _corp_of(record) -> str:
    """The corp of a wecom-callbacks record, from its key (corp_id:external_userid or corp_id)."""
    return record.key.decode().split(":", 1)[0]


class _Outputs:
    """What one partition's batch writes, in one transaction."""

    def __init__(self):
        self.records: list[tuple[str, bytes, Optional[bytes], Optional[int]]] = []   # topic, key, value, partition

    def add(self, topic: str, key: str, value: Optional[bytes], partition: Optional[int] = None) -> None:
        self.records.append((topic, key.encode(), value, partition))


class Enrichment:
    """The enrichment process: a consumer group on wecom-callbacks."""

    def __init__(self, settings: Settings, corps: dict[str, Corp], client: WeComClient):
        self.settings, self.corps, self.client = settings, corps, client
        self.group = f"{settings.app_id}-enrich"
        self.callbacks_topic = settings.topic("wecom_callbacks_topic")
        self.snapshots_topic = settings.topic("wecom_snapshots_topic")
        self.tag_events_topic = settings.topic("tag_events_topic")
        self.contact_events_topic = settings.topic("contact_events_topic")
        self.dead_letters_topic = settings.topic("dead_letters_topic")
        self.tags_topic = settings.topic("wecom_tags_topic")
        self.snapshots: dict[int, dict[str, Snapshot]] = {}
        self.producers: dict[int, AIOKafkaProducer] = {}
        # Callbacks of corps WeCom keeps refusing, per partition and corp, in offset order
        self.deferred: dict[int, dict[str, deque]] = {}
        self.retry_at: dict[tuple[int, str], float] = {}
        self.retry_pause: dict[tuple[int, str], float] = {}
        self.read_to: dict[int, int] = {}         # partition -> next offset after the last batch read
        self.lock = asyncio.Lock()
        self.consumer: Optional[AIOKafkaConsumer] = None
        self.clicks = CompactedReplica(settings, settings.topic("ad_clicks_topic"), "tagstream-enrich-clicks")
        self.catalogue = CompactedReplica(settings, self.tags_topic, "tagstream-enrich-catalogue")
        # provider mode: the authorisations the client's tokens come from, followed from wecom-auth
        self.suite, self.auth = client.suite, client.auth
        self.auth_topic = settings.topic("wecom_auth_topic")
        self.auth_replica: Optional[CompactedReplica] = None
        self.auth_producer: Optional[AIOKafkaProducer] = None
        if self.auth is not None:
            self.auth_replica = CompactedReplica(settings, self.auth_topic, "tagstream-enrich-auth", self.auth.values)
            self.rules = CompactedReplica(settings, settings.topic("tag_mappings_topic"), "tagstream-enrich-rules")
        self.erasures_topic = settings.topic("wecom_erasures_topic")
        self.erased_as_of: dict[int, frozenset] = {}    # partition -> the cancelled corps its snapshots are rid of

    # -- partitions ---------------------------------------------------------------------------
    async def on_assigned(self, assigned) -> None:
        async with self.lock:
            await asyncio.gather(*(self._take(tp.partition) for tp in assigned
                                   if tp.topic == self.callbacks_topic and tp.partition not in self.producers))

    async def _take(self, partition: int) -> None:
        """A newly assigned partition: its transactional producer, then its snapshots."""
        producer = AIOKafkaProducer(**connection.producer_kwargs(self.settings, linger_ms=1),
                                    transactional_id=f"{self.settings.app_id}-enrich-{partition}",
                                    client_id="tagstream-enrich")
        await connection.start_client(producer)     # fences the partition's previous owner
        self.producers[partition] = producer
        self.snapshots[partition] = await self._restore(partition)
        log.info("enrich: partition %d: %d snapshots restored", partition, len(self.snapshots[partition]))

    async def on_revoked(self, revoked) -> None:
        async with self.lock:
            for tp in revoked:
                producer = self.producers.pop(tp.partition, None)
                if producer is not None:
                    await producer.stop()
                self.snapshots.pop(tp.partition, None)
                self.erased_as_of.pop(tp.partition, None)
                self.deferred.pop(tp.partition, None)       # the next owner reads them again
                self.read_to.pop(tp.partition, None)
                for key in [k for k in self.retry_at if k[0] == tp.partition]:
                    self.retry_at.pop(key, None)
                    self.retry_pause.pop(key, None)

    async def _restore(self, partition: int) -> dict[str, Snapshot]:
        return await read_snapshots(self.settings, [partition])

    # -- the loop -----------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        await self.clicks.start()
        await self.catalogue.start()
        if self.auth_replica is not None:
            await self.rules.start()
            await self.auth_replica.start()
            await self.auth_replica.caught_up(30.0)       # every authorisation known before a callback
            self.auth_producer = AIOKafkaProducer(**connection.producer_kwargs(self.settings, linger_ms=0),
                                                  client_id="tagstream-enrich-auth")
            await connection.start_client(self.auth_producer)
        enrichment = self

        class Listener(ConsumerRebalanceListener):
            async def on_partitions_revoked(self, revoked):
                await enrichment.on_revoked(revoked)

            async def on_partitions_assigned(self, assigned):
                await enrichment.on_assigned(assigned)

        self.consumer = AIOKafkaConsumer(
            **connection.client_kwargs(self.settings), group_id=self.group, enable_auto_commit=False,
            auto_offset_reset="earliest", isolation_level="read_committed", client_id="tagstream-enrich",
            session_timeout_ms=self.settings.session_timeout,
            heartbeat_interval_ms=max(self.settings.session_timeout // 3, 500))
        self.consumer.subscribe([self.callbacks_topic], listener=Listener())
        await connection.start_client(self.consumer)
        try:
            while not stop.is_set():
                batches = await self.consumer.getmany(timeout_ms=200, max_records=500)
                async with self.lock:
                    # partitions are independent (own producer, snapshots and queues): one
                    # waiting on WeCom or on a commit does not hold back the others' batches
                    await asyncio.gather(*(self._enrich_batch(tp, records) for tp, records in batches.items()
                                           if tp.partition in self.producers and records))
                    await self._retry_deferred()
                    if self.auth is not None:
                        await self._erase_snapshots()
        finally:
            await self.consumer.stop()
            for producer in self.producers.values():
                await producer.stop()
            await self.clicks.stop()
            await self.catalogue.stop()
            if self.auth_replica is not None:
                await self.auth_replica.stop()
                await self.rules.stop()
            if self.auth_producer is not None:
                await self.auth_producer.stop()

    async def _enrich_batch(self, tp: TopicPartition, records: list) -> None:
        """One transaction for a partition's batch (see the module docstring). Callbacks of
        a corp that is deferred wait in its queue; keys are enriched concurrently, each in
        order."""
        deferred = self.deferred.setdefault(tp.partition, {})
        by_key: dict[bytes, list] = defaultdict(list)
        for record in records:
            corp_id = _corp_of(record)
            if corp_id in deferred:
                deferred[corp_id].append(record)
            else:
                by_key[record.key].append(record)
        staged = dict(self.snapshots[tp.partition])
        outputs = {key: _Outputs() for key in by_key}
        waiting = await asyncio.gather(*(self._enrich_key(tp.partition, recs, staged, outputs[key])
                                         for key, recs in by_key.items()))
        for rest in sorted((r for rest in waiting for r in rest), key=lambda r: r.offset):
            deferred.setdefault(_corp_of(rest), deque()).append(rest)
            self.retry_at.setdefault((tp.partition, _corp_of(rest)), time.monotonic() + RETRY_PAUSE_S)
        self.read_to[tp.partition] = records[-1].offset + 1
        await self._commit(tp, staged, [out for out in outputs.values()])
        if sum(len(queue) for queue in deferred.values()) > MAX_DEFERRED:
            self.consumer.pause(tp)           # memory bound; resumed when the queues drain
            log.warning("enrich: partition %d: more than %d callbacks deferred; fetching paused", tp.partition,
                        MAX_DEFERRED)

    async def _commit(self, tp: TopicPartition, staged: dict, outputs: list, advance: bool = True) -> None:
        """The outputs, the snapshots and the offset in one transaction. The offset is the
        oldest deferred callback's, so a restart reads every deferred callback again (and
        the callbacks after it: their snapshots moved, so they write nothing new). Without
        `advance` (an erasure between batches) the offset is left as it is."""
        producer = self.producers[tp.partition]
        async with producer.transaction():
            for out in outputs:
                for topic, key, value, partition in out.records:
                    await producer.send(topic, key=key, value=value, partition=partition)
            if advance:
                deferred = self.deferred.get(tp.partition, {})
                heads = [queue[0].offset for queue in deferred.values() if queue]
                commit_to = min(heads + [self.read_to[tp.partition]])
                await producer.send_offsets_to_transaction({tp: commit_to}, self.group)
            await producer.flush()
            failpoint("enrich-sent")
        self.snapshots[tp.partition] = staged
        metrics.WECOM_DEFERRED.set(sum(len(q) for d in self.deferred.values() for q in d.values()))

    async def _retry_deferred(self) -> None:
        """Each deferred corp whose pause is over: its queue in order, until WeCom refuses
        again (then a longer pause, up to a minute) or the queue is empty."""
        now = time.monotonic()
        for partition, deferred in list(self.deferred.items()):
            if partition not in self.producers:
                continue
            staged = dict(self.snapshots[partition])
            outputs = []
            for corp_id in [c for c in deferred if self.retry_at.get((partition, c), 0) <= now]:
                queue, out = deferred[corp_id], _Outputs()
                outputs.append(out)
                while queue:
                    budget = RETRY_BUDGET_S.set(RETRY_LOOK_S)
                    try:
                        refused = await self._enrich_key(partition, [queue[0]], staged, out)
                    finally:
                        RETRY_BUDGET_S.reset(budget)
                    if refused:
                        pause = min(60.0, 2 * self.retry_pause.get((partition, corp_id), RETRY_PAUSE_S / 2))
                        self.retry_pause[(partition, corp_id)] = pause
                        self.retry_at[(partition, corp_id)] = time.monotonic() + pause
                        break
                    queue.popleft()
                if not queue:
                    del deferred[corp_id]
                    self.retry_at.pop((partition, corp_id), None)
                    self.retry_pause.pop((partition, corp_id), None)
                    log.info("enrich: corp %s: deferred callbacks of partition %d done", corp_id, partition)
            if outputs:
                tp = TopicPartition(self.callbacks_topic, partition)
                await self._commit(tp, staged, outputs)
                if sum(len(q) for q in deferred.values()) <= MAX_DEFERRED // 2 and tp in self.consumer.paused():
                    self.consumer.resume(tp)

    async def _enrich_key(self, partition: int, records: list, staged: dict, out: _Outputs) -> list:
        """One key's callbacks in order; those that must wait (WeCom kept refusing the first
        of them: it and every later one of the key)."""
        for i, record in enumerate(records):
            callback = Callback.from_wire(record.value)
            try:
                await self._enrich(partition, callback, staged, out)
            except WeComUnavailable as exc:
                metrics.WECOM_ENRICHED.labels("deferred").inc()
                log.warning("enrich: corp %s: %s; its callbacks wait, other corps go on", callback.corp_id, exc)
                return records[i:]
            except WeComError as exc:
                if exc.errcode == CODE_REFUSED:
                    # the corp's permanent code is refused: it cancelled (its cancel_auth may
                    # still be on its way) or was reset. Refused like a cancelled corp's, not
                    # dead-lettered: a dead letter would keep the data of a corp that left.
                    self._deactivate(callback.corp_id, out)
                    metrics.WECOM_ENRICHED.labels("refused").inc()
                    continue
                metrics.WECOM_ENRICHED.labels("dead_lettered").inc()
                rejection = Rejection("wecom_errcode", f"{exc.api}: errcode {exc.errcode} {exc.errmsg}".strip())
                letter = rejection.dead_letter(topic=record.topic, partition=record.partition, offset=record.offset,
                                               key=record.key, value=record.value, at=int(time.time() * 1000))
                out.add(self.dead_letters_topic, record.key.decode(), orjson.dumps(letter.as_wire()))
            else:
                metrics.WECOM_ENRICHED.labels("committed").inc()
        return []

    async def _enrich(self, partition: int, callback: Callback, staged: dict, out: _Outputs) -> None:
        if callback.event in COMMANDS and self.suite is not None and callback.fields.get("SuiteId") == self.suite.suite_id:
            await self._command(callback, out)
            return
        corp = self.corps.get(callback.corp_id)
        if corp is None and self.suite is not None:
            authorisation = self.auth.get(callback.corp_id)
            if authorisation is None and self.auth.status(callback.corp_id) != CANCELLED and \
                    time.time() * 1000 - callback.received_at < UNKNOWN_CORP_WAIT_S * 1000:
                # its create_auth (another partition) may not be applied yet: wait, as for a busy WeCom
                raise WeComUnavailable(f"corp {callback.corp_id} has not authorised the suite (yet)")
            if authorisation is None or authorisation.status != ACTIVE:
                metrics.WECOM_ENRICHED.labels("refused").inc()
                return
            corp = self.suite.corp(callback.corp_id, authorisation.agent_id)
        if corp is None:                  # the corps file lost it since the ingest took it
            raise WeComError("config", -2, "corp not configured")
        event = callback.event
        if event == "change_external_tag":
            await self._refresh_catalogue(corp, out)
            return
        if event != "change_external_contact" or not callback.external_userid:
            metrics.WECOM_ENRICHED.labels("ignored").inc()
            return
        customer, userid = callback.external_userid, callback.fields.get("UserID", "")
        key = f"{corp.corp_id}:{customer}"
        skey = snapshot_key(corp.corp_id, customer, userid)
        if callback.change_type in DELETES:
            out.add(self.contact_events_topic, key, orjson.dumps(contact_event(callback, corp.wechat_app_id, None, None)))
            if skey in staged:            # a deleted relationship is not an untagging: no removes
                del staged[skey]
                out.add(self.snapshots_topic, skey, None, partition)
            return
        if callback.change_type not in ADDS and callback.change_type != "edit_external_contact":
            metrics.WECOM_ENRICHED.labels("ignored").inc()
            return
        contact = await self.client.get_contact(corp.corp_id, customer)
        follow = follow_user_of(contact, userid)
        # An add is also due for a relationship never seen before: its add callback was lost,
        # and this contact event carries the id that callback would have given.
        if callback.change_type in ADDS or (follow is not None and skey not in staged):
            click_id = await self._click_id(corp.corp_id, callback.fields.get("State") or (follow or {}).get("state"))
            out.add(self.contact_events_topic, key,
                    orjson.dumps(contact_event(callback, corp.wechat_app_id, contact, click_id, as_add=True)))
        if follow is None:                # the relationship is gone already: its delete will come
            return
        source = callback.fields.get("Source") or "wecom_callback"
        # a reconciled add carries the relationship's old createtime; the tags it finds are
        # stamped with when they were found
        ts = callback.received_at if source == "tagstream_reconcile" else (callback.create_time_ms or callback.received_at)
        snapshot, events = diff_tags(corp.corp_id, customer, userid, staged.get(skey), corp_tags(follow), ts, source)
        for tag_event in events:
            out.add(self.tag_events_topic, key, orjson.dumps(tag_event))
        # A snapshot is written for every change and for every add, even one without tags:
        # its presence is how `tagstream reconcile` knows an add was not lost.
        if events or skey not in staged:
            staged[skey] = snapshot
            out.add(self.snapshots_topic, skey, orjson.dumps(snapshot.to_wire()), partition)
        metrics.WECOM_TAG_EVENTS.inc(len(events))

    # -- provider mode ------------------------------------------------------------------------------
    async def _command(self, callback: Callback, out: _Outputs) -> None:
        """A suite command (streams/wecom/provider.py): its result into `wecom-auth`."""
        info_type, fields = callback.event, open_command(callback.fields, self.auth.vault)
        at = callback.create_time_ms or callback.received_at
        outcome = "applied"
        if info_type == "suite_ticket":
            record = self.auth.record_ticket(fields.get("SuiteTicket", ""), at)
            if record is None:
                outcome = "duplicate"     # an older push, retried late
            else:
                out.add(self.auth_topic, *record)
        elif info_type == "create_auth":
            outcome = await self._authorise(fields.get("AuthCode", ""), at, out)
        elif info_type == "change_auth":
            current = self.auth.get(callback.corp_id)
            if current is None or current.status != ACTIVE:
                outcome = "refused"
            else:
                answer = await self.client.get_auth_info(current.corp_id, current.permanent_code)
                out.add(self.auth_topic, *self.auth.record(Authorisation(
                    current.corp_id, ACTIVE, current.permanent_code, agent_id_of(answer) or current.agent_id, at)))
        elif info_type == "cancel_auth":
            current = self.auth.get(callback.corp_id)
            if current is None:
                outcome = "duplicate" if self.auth.status(callback.corp_id) == CANCELLED else "refused"
            else:                         # the record, and with it the permanent code, is deleted
                for key, value in self.auth.record_cancel(current.corp_id, at):
                    out.add(self.auth_topic, key, value)
                self.client.tokens.pop(current.corp_id, None)
                # every component that keeps the corp's data follows this (streams/core/erasure.py)
                out.add(self.erasures_topic, current.corp_id, request_record(current.corp_id, at))
                self._erase_shared(current.corp_id, out)
                log.info("enrich: corp %s cancelled its authorisation; its callbacks are refused from now on, "
                         "and its data erased", current.corp_id)
        metrics.WECOM_AUTH_COMMANDS.labels(info_type, outcome).inc()

    async def _authorise(self, auth_code: str, at: int, out: _Outputs) -> str:
        """create_auth: the single-use code for the corp's permanent code, saved at once (the
        module docstring of streams/wecom/provider.py names the window)."""
        code_hash = hashlib.sha256(auth_code.encode()).hexdigest()
        if any(self.auth.code_hash(corp_id) == code_hash for corp_id in self.auth.corp_ids()):
            return "duplicate"            # WeCom retried the push; the code was used and saved
        try:
            answer = await self.client.get_permanent_code(auth_code)
        except WeComError as exc:         # used or expired, and not by us: the corp must authorise again
            log.warning("enrich: create_auth: get_permanent_code refused the auth code (errcode %d); the corp "
                        "is not authorised until its admin authorises again", exc.errcode)
            return "refused"
        answered = time.perf_counter()
        failpoint("permanent-code-fetched")
        corp_id = (answer.get("auth_corp_info") or {}).get("corpid", "")
        key, value = self.auth.record(Authorisation(corp_id, ACTIVE, answer["permanent_code"], agent_id_of(answer), at),
                                      code_hash=code_hash)
        for cancel_key, tombstone in self.auth.record_uncancel(corp_id):    # it had cancelled before
            out.add(self.auth_topic, cancel_key, tombstone)
            out.add(self.erasures_topic, corp_id, reinstated_record(corp_id, at))
        await (await self.auth_producer.send(self.auth_topic, key=key.encode(), value=value))
        metrics.WECOM_PERMANENT_CODE_UNSAVED.observe(time.perf_counter() - answered)
        failpoint("permanent-code-saved")
        out.add(self.auth_topic, key, value)      # and again in the batch's transaction: the same record
        log.info("enrich: corp %s authorised the suite", corp_id)
        return "applied"

    # -- erasure of a corp that cancelled ------------------------------------------------------
    def _erase_shared(self, corp_id: str, out: _Outputs) -> None:
        """The compacted topics every partition shares (the catalogue, the click ids, the
        rules): a tombstone for each of the corp's keys, in the cancel_auth's transaction."""
        prefix = f"{corp_id}:"
        for replica, topic in ((self.catalogue, self.tags_topic), (self.clicks, self.clicks.topic),
                               (self.rules, self.rules.topic)):
            keys = sorted(k for k in replica.values if k.startswith(prefix))
            for key in keys:
                out.add(topic, key, None)
            self._audit(out, corp_id, topic, None, len(keys))

    async def _erase_snapshots(self) -> None:
        """The snapshots of every cancelled corp on this process's partitions: tombstones, one
        transaction per partition with its audit record. Checked when the set of cancelled
        corps changes and after a partition is restored (callbacks of a cancelled corp are
        refused, so no snapshot of it comes back)."""
        cancelled = self.auth.cancelled_hashes()
        for partition in list(self.producers):
            if self.erased_as_of.get(partition) == cancelled or partition not in self.snapshots:
                continue
            doomed = [key for key in self.snapshots[partition] if corp_hash(key.split(":", 1)[0]) in cancelled]
            if doomed:
                staged, out = dict(self.snapshots[partition]), _Outputs()
                erased: dict[str, int] = defaultdict(int)
                for key in doomed:
                    del staged[key]
                    out.add(self.snapshots_topic, key, None, partition)
                    erased[key.split(":", 1)[0]] += 1
                for corp_id, count in sorted(erased.items()):
                    self._audit(out, corp_id, self.snapshots_topic, partition, count)
                    log.info("enrich: corp %s: %d snapshots of partition %d erased", corp_id, count, partition)
                await self._commit(TopicPartition(self.callbacks_topic, partition), staged, [out], advance=False)
            self.erased_as_of[partition] = cancelled

    def _audit(self, out: _Outputs, corp_id: str, topic: str, partition: Optional[int], keys: int) -> None:
        """An erasure's audit record: the corp, when, where and how many keys; no personal data."""
        out.add(self.erasures_topic, corp_id,
                audit_record(corp_id, int(time.time() * 1000), "enrich", topic, partition, keys))

    def _deactivate(self, corp_id: str, out: _Outputs) -> None:
        """WeCom refused the corp's permanent code (40084): inactive until it authorises again."""
        current = self.auth.get(corp_id) if self.auth is not None else None
        if current is not None and current.status == ACTIVE:
            out.add(self.auth_topic, *self.auth.record(Authorisation(corp_id, INACTIVE, current.permanent_code,
                                                                     current.agent_id, int(time.time() * 1000))))
            log.warning("enrich: corp %s: WeCom refused its permanent code (40084); inactive until it authorises "
                        "again", corp_id)

    async def _click_id(self, corp_id: str, state: Optional[str]) -> Optional[str]:
        if not state:
            return None
        if f"{corp_id}:{state}" not in self.clicks.values and not await self.clicks.caught_up(CLICKS_WAIT_S):
            log.warning("enrich: corp %s: the ad-clicks replica did not reach the topic's end within %.0f s; "
                        "an add goes on with the click ids read so far", corp_id, CLICKS_WAIT_S)
        value = self.clicks.values.get(f"{corp_id}:{state}")
        return orjson.loads(value).get("click_id") if value else None

    async def _refresh_catalogue(self, corp: Corp, out: _Outputs) -> None:
        """The corp's whole catalogue from get_corp_tag_list into wecom-tags; tags that are
        gone or flagged deleted get tombstones."""
        groups = await self.client.get_corp_tag_list(corp.corp_id)
        await self.catalogue.caught_up(CLICKS_WAIT_S)
        prefix = f"{corp.corp_id}:"
        known = {k for k in self.catalogue.values if k.startswith(prefix)}
        seen = set()
        for group in groups:
            for tag in group.get("tag") or []:
                key = prefix + tag["id"]
                if tag.get("deleted") or group.get("deleted"):
                    # a tombstone even if the replica does not know the key yet (its entry
                    # may be in this very transaction): one for a key never written is harmless
                    out.add(self.tags_topic, key, None)
                    continue
                seen.add(key)
                out.add(self.tags_topic, key, orjson.dumps({
                    "corp_id": corp.corp_id, "tag_id": tag["id"], "tag_name": tag.get("name"),
                    "group_id": group.get("group_id"), "group_name": group.get("group_name")}))
        for key in sorted(known - seen):
            out.add(self.tags_topic, key, None)
