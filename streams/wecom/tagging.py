"""Changes WeCom never calls back about (SPEC §7): tagging through the API, and reconciling.

WeCom sends no callback for a change made through its API ("通过API进行的操作不会产生回调"),
and none for a callback whose retries all failed. Both are repaired the same way: a
*synthetic callback* on `wecom-callbacks`, keyed like a real one, which the enrichment handles
in the customer's order like any other: it fetches the customer and diffs against the
snapshot it owns. Nothing else ever writes a snapshot, so there is no second writer to race
with, and the ids are the ones a real callback would have produced.

- `tag_through_wecom`: `mark_tag`, and once WeCom accepts, a synthetic `edit_external_contact`
  (`Source: tagstream_tag`). Used by `tagstream tag` and the ingest's `POST /tags`.
- `synthetic_add` / `synthetic_edit`: what `tagstream reconcile` writes for a relationship
  whose add was never enriched, or whose tags differ from its snapshot.
"""
from __future__ import annotations

import time
from typing import Optional

from aiokafka import AIOKafkaProducer

from streams.settings import Settings
from streams.wecom.api import WeComClient
from streams.wecom.messages import Callback


def synthetic_callback(corp_id: str, change_type: str, userid: str, customer: str, create_time_s: int,
                       source: str, state: Optional[str] = None) -> Callback:
    fields = {"ToUserName": corp_id, "FromUserName": "sys", "CreateTime": str(create_time_s), "MsgType": "event",
              "Event": "change_external_contact", "ChangeType": change_type, "UserID": userid,
              "ExternalUserID": customer, "Source": source}
    if state:
        fields["State"] = state
    return Callback(corp_id, fields, int(time.time() * 1000))


def synthetic_edit(corp_id: str, userid: str, customer: str, source: str) -> Callback:
    return synthetic_callback(corp_id, "edit_external_contact", userid, customer, int(time.time()), source)


def synthetic_add(corp_id: str, userid: str, customer: str, createtime_s: int, state: Optional[str]) -> Callback:
    """The add WeCom would have called back about: its `CreateTime` is the relationship's
    `createtime`, so the contact event's id is the one the lost callback would have given."""
    return synthetic_callback(corp_id, "add_external_contact", userid, customer, createtime_s,
                              "tagstream_reconcile", state)


async def write_callback(producer: AIOKafkaProducer, settings: Settings, callback: Callback) -> None:
    """To wecom-callbacks, acknowledged by the in-sync replicas."""
    await (await producer.send(settings.topic("wecom_callbacks_topic"), key=callback.key(), value=callback.to_wire()))


async def tag_through_wecom(client: WeComClient, producer: AIOKafkaProducer, settings: Settings, corp_id: str,
                            userid: str, customer: str, add: list[str], remove: list[str]) -> Callback:
    """Tag in WeCom (`mark_tag`), then record it the way a callback would have been."""
    await client.mark_tag(corp_id, userid, customer, add, remove)
    callback = synthetic_edit(corp_id, userid, customer, "tagstream_tag")
    await write_callback(producer, settings, callback)
    return callback
