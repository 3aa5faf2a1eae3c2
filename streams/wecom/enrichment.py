"""From WeCom's callbacks to SPEC §3's events: the pure part of the enrichment (SPEC §7).

WeCom says *that* a customer changed, not what: an `edit_external_contact` callback carries
no tag diff. The enrichment fetches the customer (`externalcontact/get`) and compares each
follow user's corp tags (types 1 and 3; personal tags have no id) with the last snapshot of
that relationship (corp, customer, staff member). Every difference is a tag event.

**Ids that a retry cannot change.** A tag event's id is a hash of corp, customer, staff
member, tag, op and the snapshot version the diff moves *from*. WeCom's retries (identical
or re-signed) and tagstream's own restarts recompute the same diff from the same version,
so they give the same ids, which the worker drops as duplicates (SPEC rule 1); a later,
different change moves from a newer version and gets new ids. A contact event's id is a
hash of corp, customer, staff member, change type and its `ts`.

Plain Python: no Kafka, no HTTP. `streams.wecom.enrich` feeds it callbacks and API answers
and makes its outputs durable.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Optional

from streams.wecom.messages import Callback

CORP_TAG_TYPES = frozenset({1, 3})        # corp tags and rule-group tags; 2 is personal
ADDS = frozenset({"add_external_contact", "add_half_external_contact"})
DELETES = frozenset({"del_external_contact", "del_follow_user"})


@dataclass(frozen=True)
class Snapshot:
    """A relationship's corp tags as last seen, and how many changes brought it there."""
    version: int
    tags: tuple[str, ...]              # sorted tag ids

    def to_wire(self) -> dict:
        return {"v": self.version, "tags": list(self.tags)}

    @classmethod
    def from_wire(cls, value: dict) -> "Snapshot":
        return cls(int(value["v"]), tuple(value["tags"]))


EMPTY = Snapshot(0, ())


def snapshot_key(corp_id: str, external_userid: str, userid: str) -> str:
    return f"{corp_id}:{external_userid}:{userid}"


def _digest(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:40]


def tag_event_id(corp_id: str, external_userid: str, userid: str, tag_id: str, op: str, from_version: int) -> str:
    return "w-" + _digest(corp_id, external_userid, userid, tag_id, op, from_version)


def corp_tags(follow_user: dict) -> tuple[str, ...]:
    """The corp tag ids on one follow user of an `externalcontact/get` answer."""
    return tuple(sorted({t["tag_id"] for t in follow_user.get("tags") or []
                         if t.get("type") in CORP_TAG_TYPES and t.get("tag_id")}))


def diff_tags(corp_id: str, external_userid: str, userid: str, before: Optional[Snapshot],
              now_tags: Iterable[str], ts: int, source: str) -> tuple[Snapshot, list[dict]]:
    """The snapshot after `now_tags`, and a tag event per difference (adds, then removes,
    each sorted by tag id, so the order is reproducible)."""
    before = before or EMPTY
    now = tuple(sorted(set(now_tags)))
    added = sorted(set(now) - set(before.tags))
    removed = sorted(set(before.tags) - set(now))
    if not added and not removed:
        return before, []
    events = [{"event_id": tag_event_id(corp_id, external_userid, userid, tag, op, before.version),
               "corp_id": corp_id, "external_userid": external_userid, "userid": userid,
               "tag_id": tag, "op": op, "ts": ts, "source": source}
              for op, tags in (("add", added), ("remove", removed)) for tag in tags]
    return Snapshot(before.version + 1, now), events


def follow_user_of(contact: dict, userid: str) -> Optional[dict]:
    return next((f for f in contact.get("follow_user") or [] if f.get("userid") == userid), None)


def contact_event(callback: Callback, wechat_app_id: Optional[str], contact: Optional[dict],
                  click_id: Optional[str], as_add: bool = False) -> dict:
    """The contact event of an add or delete callback (SPEC §7): for an add, `ts` is the
    follow user's `createtime` and the identity comes from the contact; for a delete, `ts` is
    the callback's `CreateTime`. `as_add`: the add of a relationship first seen through a
    later callback (its add callback was lost); the same event, the same id."""
    fields = callback.fields
    userid, customer = fields.get("UserID", ""), callback.external_userid
    adding = as_add or callback.change_type in ADDS
    change_type = "add_external_contact" if adding else callback.change_type
    ts = callback.create_time_ms or callback.received_at
    state, unionid = (fields.get("State") or None) if adding else None, None
    if adding and contact is not None:
        follow = follow_user_of(contact, userid) or {}
        if follow.get("createtime"):
            ts = int(follow["createtime"]) * 1000
        state = state or follow.get("state") or None
        unionid = (contact.get("external_contact") or {}).get("unionid")
    event = {"event_id": "c-" + _digest(callback.corp_id, customer, userid, change_type, ts),
             "corp_id": callback.corp_id, "external_userid": customer, "userid": userid,
             "change_type": change_type, "ts": ts, "state": state}
    if adding:
        event.update(wechat_app_id=wechat_app_id, wechat_unionid=unionid,
                     wechat_openid=None, click_id=click_id)
    return event
