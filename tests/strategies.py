"""Hypothesis strategies for tagstream event logs (SPEC §3.1–§3.3).

``event_logs()`` draws a whole scenario: the reporting rules in force plus an ordered log of
tag and contact events, shaped to hit the interesting corners of SPEC §4 (30-minute hold
deadlines, the 7-day order window, the 7-day dedupe horizon, identity arriving late,
duplicates, rule versions and tombstones). Only the standard library and hypothesis are used.
"""
from __future__ import annotations

import zlib
from typing import Callable, Optional

from hypothesis import strategies as st

TS_BASE = 1_763_800_000_000
SECOND_MS = 1_000
MINUTE_MS = 60_000
DAY_MS = 86_400_000

STANDARD_TYPES = ("CONSULT", "LEAD", "VALID", "ORDER", "LONG_TERM", "INVALID")
CHANGE_TYPES = ("add_external_contact", "edit_external_contact", "del_external_contact", "del_follow_user")

# Gaps between consecutive steps of one customer: land on both sides of the 30-minute hold
# deadline and of the 7-day order window / dedupe horizon.
GAPS_MS = (0, 1 * SECOND_MS, 10 * MINUTE_MS, 29 * MINUTE_MS, 30 * MINUTE_MS, 31 * MINUTE_MS,
           DAY_MS, 6 * DAY_MS, 7 * DAY_MS, 8 * DAY_MS)

# Identifier pools. None contains ':' or '|' (the key and outer_action_id separators); a few
# are long or non-ASCII to keep the "non-empty, at most 128 characters" contract honest.
CORP_IDS = ("ww51a2", "wwB7", "corp-" + "x" * 123, "企业甲")
STAFF_IDS = ("zhangsan", "lisi", "wangwu", "s" * 128)
TAG_IDS = ("etQ7x", "etA1", "etB2", "etC3", "et_D4", "etE5", "标签6", "t" * 128)
ACTION_TYPE_OVERRIDES = ("CUSTOM", "WECOM_CONSULT_V2", "PURCHASE", "CONFIRM_EFFECTIVE_LEADS")

MAX_EVENTS = 149


def crc_partition(key: str, partitions: int = 4) -> int:
    """A simple, stable default ``partition_of``: CRC-32 of the UTF-8 key modulo ``partitions``."""
    return zlib.crc32(key.encode("utf-8")) % partitions


# ---------------------------------------------------------------------------------------------
# Rules (SPEC §3.3)
# ---------------------------------------------------------------------------------------------

def _rule_value(draw, corp_id: str, tag_id: str, effective_from: int, version: int) -> dict:
    standard_type = draw(st.sampled_from(STANDARD_TYPES + (None,)))
    rule = {
        "corp_id": corp_id,
        "tag_id": tag_id,
        "standard_type": standard_type,
        "effective_from": effective_from,
        "version": version,
    }
    if draw(st.booleans()):
        rule["tag_name"] = draw(st.sampled_from(("核心", "已下单-小课", "骚扰", None)))
    if standard_type is not None:
        rule["account_id"] = draw(st.sampled_from((2001, 2002, 3001)))
        rule["user_action_set_id"] = draw(st.sampled_from((11001, 11002, 12001)))
    elif draw(st.booleans()):
        rule["account_id"] = None
        rule["user_action_set_id"] = None
    action_type_choice = draw(st.integers(0, 5))
    if action_type_choice == 0:
        rule["action_type"] = draw(st.sampled_from(ACTION_TYPE_OVERRIDES))
    elif action_type_choice <= 2:
        rule["action_type"] = None
    # else: the field is absent.
    return rule


@st.composite
def _rules_of_corp(draw, corp_id: str, tag_ids: list[str]) -> list[list[tuple[str, Optional[dict]]]]:
    """Per tag, an ordered list of (key, value) entries: 1-3 versions, sometimes a tombstone
    (usually followed by a fresh version), sometimes nothing at all (no rule)."""
    effective_froms = (TS_BASE - DAY_MS, TS_BASE - DAY_MS, TS_BASE, TS_BASE + 10 * MINUTE_MS,
                       TS_BASE + DAY_MS, TS_BASE + 7 * DAY_MS)
    per_tag = []
    for tag_id in tag_ids:
        key = f"{corp_id}:{tag_id}"
        entries: list[tuple[str, Optional[dict]]] = []
        if draw(st.integers(0, 9)) == 0:
            per_tag.append(entries)  # no rule for this tag: unmapped
            continue
        version = draw(st.integers(1, 5))
        n_versions = draw(st.integers(1, 3))
        # The first version usually covers the whole log.
        effective_from = TS_BASE - DAY_MS if draw(st.integers(0, 3)) else draw(st.sampled_from(effective_froms))
        for _ in range(n_versions):
            entries.append((key, _rule_value(draw, corp_id, tag_id, effective_from, version)))
            version += draw(st.integers(1, 2))
            if draw(st.integers(0, 2)) == 0:
                pass  # same effective_from, greater version: the tie rule decides
            else:
                effective_from = draw(st.sampled_from(effective_froms))
        tombstone = draw(st.integers(0, 5))
        if tombstone == 0:
            entries.append((key, None))
            entries.append((key, _rule_value(draw, corp_id, tag_id, draw(st.sampled_from(effective_froms)),
                                             version)))
        elif tombstone == 1:
            entries.append((key, None))
        per_tag.append(entries)
    return per_tag


def _interleave_keeping_order(draw, sequences: list[list]) -> list:
    """Merge sequences in a drawn order while keeping each sequence's own order."""
    remaining = [list(seq) for seq in sequences if seq]
    merged = []
    while remaining:
        i = draw(st.integers(0, len(remaining) - 1))
        merged.append(remaining[i].pop(0))
        if not remaining[i]:
            remaining.pop(i)
    return merged


# ---------------------------------------------------------------------------------------------
# Per-customer timelines (SPEC §3.1, §3.2)
# ---------------------------------------------------------------------------------------------

IDENTITY_PLANS = ("none", "app_only", "click_only", "app_union", "app_open", "full")


def _identity_fields(draw, plan: str, suffix: str) -> dict:
    """Identity fields of a contact event; absent and null both mean "not carried"."""
    values = {
        "wechat_app_id": "wx7d21" if suffix.endswith("0") else f"wx-{suffix}",
        "wechat_unionid": f"oU-{suffix}",
        "wechat_openid": f"oO-{suffix}",
        "click_id": f"clk_{suffix}",
    }
    carried = {
        "none": (),
        "app_only": ("wechat_app_id",),
        "click_only": ("click_id",),
        "app_union": ("wechat_app_id", "wechat_unionid"),
        "app_open": ("wechat_app_id", "wechat_openid"),
        "full": ("wechat_app_id", "wechat_unionid", "wechat_openid", "click_id"),
    }[plan]
    fields = {}
    for name, value in values.items():
        if name in carried:
            fields[name] = value
        else:
            how = draw(st.integers(0, 2))
            if how == 0:
                fields[name] = None
            # else: absent
    return fields


@st.composite
def _customer_timeline(draw, corp_id: str, external_userid: str, tag_ids: list[str],
                       id_prefix: str, allow_backwards: bool) -> list[dict]:
    """One customer's events in their own order, with ``ts`` already set."""
    staff = draw(st.lists(st.sampled_from(STAFF_IDS), min_size=1, max_size=3, unique=True))
    ts = TS_BASE + draw(st.sampled_from((0, 1, SECOND_MS, 10 * MINUTE_MS, 31 * MINUTE_MS, DAY_MS, 3 * DAY_MS)))
    events: list[dict] = []
    counter = 0

    def next_id(kind: str) -> str:
        nonlocal counter
        counter += 1
        return f"{kind}-{id_prefix}-{counter}"

    def contact(change_type: str, userid: str, plan: str, at: int) -> dict:
        event = {"event_id": next_id("c"), "corp_id": corp_id, "external_userid": external_userid,
                 "userid": userid, "change_type": change_type, "ts": at}
        if draw(st.booleans()):
            event["state"] = draw(st.sampled_from(("ad_318", "", None)))
        event.update(_identity_fields(draw, plan, f"{id_prefix}{draw(st.integers(0, 1))}"))
        return event

    def advance() -> int:
        nonlocal ts
        gap = draw(st.sampled_from(GAPS_MS))
        if draw(st.integers(0, 4)) == 0:
            gap += draw(st.integers(0, 999))  # jitter off the round numbers
        if allow_backwards and draw(st.integers(0, 9)) == 0:
            gap = -draw(st.sampled_from((1, SECOND_MS, 10 * MINUTE_MS, 31 * MINUTE_MS)))  # a late event
        ts = max(0, ts + gap)
        return ts

    # Usually an add_external_contact first; sometimes none at all, or only an edit that carries
    # identity but no add time (ORDER then goes out with reason add_time_unknown).
    first_contact = draw(st.integers(0, 11))
    if first_contact == 1:
        events.append(contact("edit_external_contact", staff[0], draw(st.sampled_from(IDENTITY_PLANS)), ts))
    elif first_contact > 1:
        events.append(contact("add_external_contact", staff[0], draw(st.sampled_from(IDENTITY_PLANS)), ts))
    n_steps = draw(st.integers(1, 17))
    added: list[str] = []
    contacts_left = 2
    for _ in range(n_steps):
        at = advance()
        kind = draw(st.integers(0, 19))
        if kind == 0 and contacts_left:
            # A second staff member adds the customer (own add time), maybe with identity.
            contacts_left -= 1
            events.append(contact("add_external_contact", draw(st.sampled_from(staff)),
                                  draw(st.sampled_from(IDENTITY_PLANS)), at))
        elif kind == 1 and contacts_left:
            # Identity arriving (or not) later: checked when a hold is released.
            contacts_left -= 1
            change_type = draw(st.sampled_from(CHANGE_TYPES[1:]))
            events.append(contact(change_type, draw(st.sampled_from(staff)),
                                  draw(st.sampled_from(IDENTITY_PLANS)), at))
        elif kind <= 6 and added:
            # Remove: mostly a tag that was added before.
            which = draw(st.integers(0, 5))
            if which <= 2:
                tag_id = added[-1]  # the latest add: cancels a fresh hold if before its deadline
            elif which <= 4:
                tag_id = draw(st.sampled_from(added))
            else:
                tag_id = draw(st.sampled_from(tag_ids))
            events.append({"event_id": next_id("e"), "corp_id": corp_id, "external_userid": external_userid,
                           "userid": draw(st.sampled_from(staff)), "tag_id": tag_id, "op": "remove", "ts": at})
        else:
            tag_id = draw(st.sampled_from(tag_ids))
            added.append(tag_id)
            event = {"event_id": next_id("e"), "corp_id": corp_id, "external_userid": external_userid,
                     "userid": draw(st.sampled_from(staff)), "tag_id": tag_id, "op": "add", "ts": at}
            if draw(st.booleans()):
                event["source"] = draw(st.sampled_from(("wecom_sidebar", "api", None)))
            events.append(event)
    return events


# ---------------------------------------------------------------------------------------------
# Whole logs
# ---------------------------------------------------------------------------------------------

def _merge_by_ts(draw, timelines: list[list[dict]]) -> list[dict]:
    """Merge timelines by the ``ts`` of their next event (ties drawn), keeping each own order."""
    remaining = [list(t) for t in timelines if t]
    merged = []
    while remaining:
        smallest = min(t[0]["ts"] for t in remaining)
        candidates = [i for i, t in enumerate(remaining) if t[0]["ts"] == smallest]
        i = candidates[draw(st.integers(0, len(candidates) - 1))]
        merged.append(remaining[i].pop(0))
        if not remaining[i]:
            remaining.pop(i)
    return merged


def _with_duplicates(draw, log: list[dict], budget: int) -> list[tuple[dict, bool]]:
    """Entries ``(event, is_duplicate)``: each duplicate re-sends (the same dict object as) an
    earlier original event at a later position in the log."""
    entries: list[tuple[dict, bool]] = [(event, False) for event in log]
    n_duplicates = min(budget, draw(st.integers(0, 8)))
    for _ in range(n_duplicates):
        originals = [i for i, (_, is_duplicate) in enumerate(entries) if not is_duplicate]
        if not originals:
            break
        original = draw(st.sampled_from(originals))
        where = draw(st.integers(original + 1, len(entries)))
        entries.insert(where, (entries[original][0], True))
    return entries


def _make_monotonic_per_partition(entries: list[tuple[dict, bool]],
                                  partition_of: Callable[[str], int]) -> list[dict]:
    """Rewrite ``ts`` (never the order) so that, per partition, ts is non-decreasing in log order
    and, at equal ts, a contact event never follows a tag event of the same partition.

    An original event keeps its ts when it already fits, else it is raised to the smallest ts
    that fits. A duplicate is a copy of its original *as rewritten*, with its ts raised the same
    way (a re-send carries a fresh broker timestamp; only the event id has to match).
    """
    last_ts: dict[int, int] = {}
    tag_seen_at_last_ts: dict[int, bool] = {}
    rewritten: dict[int, dict] = {}  # id(original dict) -> rewritten original
    log = []
    for event, is_duplicate in entries:
        source = rewritten[id(event)] if is_duplicate else event
        out = dict(source)
        partition = partition_of(f"{out['corp_id']}:{out['external_userid']}")
        floor = last_ts.get(partition, 0)
        ts = max(out["ts"], floor)
        is_contact = "change_type" in out
        if is_contact and ts == floor and tag_seen_at_last_ts.get(partition, False):
            ts = floor + 1
        out["ts"] = ts
        if ts != last_ts.get(partition):
            tag_seen_at_last_ts[partition] = False
        last_ts[partition] = ts
        if not is_contact:
            tag_seen_at_last_ts[partition] = True
        if not is_duplicate:
            rewritten[id(event)] = out
        log.append(out)
    return log


@st.composite
def event_logs(draw, partitions: int = 4, partition_of: Optional[Callable[[str], int]] = None,
               monotonic_per_partition: bool = False) -> dict:
    """A scenario ``{"rules": [(key, value-or-None), ...], "events": [event, ...]}``.

    - 1-2 corps, 2-6 customers, 4-8 tag ids per corp (tag ids are shared between corps, so the
      corp part of a rule key matters);
    - rules: per tag usually 1-3 versions, some sharing ``effective_from``, some unmapped
      (null ``standard_type``), occasional tombstones (usually followed by a new version);
    - events: per customer usually an ``add_external_contact`` first, then tag adds/removes and
      occasional contact changes, customers interleaved (by ts, or freely), verbatim duplicates
      re-sent later in the log; fewer than 150 events; event ids unique apart from duplicates.

    ``monotonic_per_partition=True`` keeps the order but rewrites ts so that, per
    ``partition_of`` value, ts never decreases in log order and, at equal ts, contact events
    never follow tag events of that partition (duplicates then carry the ts of their re-send).
    """
    if partition_of is None:
        def partition_of(key: str) -> int:
            return crc_partition(key, partitions)

    n_corps = draw(st.integers(1, 2))
    corp_ids = draw(st.lists(st.sampled_from(CORP_IDS), min_size=n_corps, max_size=n_corps, unique=True))
    tags_by_corp = {
        corp_id: draw(st.lists(st.sampled_from(TAG_IDS), min_size=4, max_size=8, unique=True))
        for corp_id in corp_ids
    }

    per_key_entries = []
    for corp_id in corp_ids:
        per_key_entries.extend(draw(_rules_of_corp(corp_id, tags_by_corp[corp_id])))
    rules = _interleave_keeping_order(draw, per_key_entries)

    n_customers = draw(st.integers(2, 6))
    customers = []
    for i in range(n_customers):
        corp_id = corp_ids[0] if i == 0 else draw(st.sampled_from(corp_ids))
        long_id = draw(st.integers(0, 9)) == 0
        external_userid = ("wm" + str(i) * 126) if long_id else f"wmKx{i:02d}"
        customers.append((corp_id, external_userid))

    timelines = [
        draw(_customer_timeline(corp_id, external_userid, tags_by_corp[corp_id], id_prefix=f"{i}",
                                allow_backwards=not monotonic_per_partition))
        for i, (corp_id, external_userid) in enumerate(customers)
    ]
    if draw(st.integers(0, 3)):
        log = _merge_by_ts(draw, timelines)
    else:
        log = _interleave_keeping_order(draw, timelines)
    log = log[: MAX_EVENTS - 8]

    entries = _with_duplicates(draw, log, budget=MAX_EVENTS - len(log))
    if monotonic_per_partition:
        events = _make_monotonic_per_partition(entries, partition_of)
    else:
        events = [dict(event) for event, _ in entries]
    return {"rules": rules, "events": events}
