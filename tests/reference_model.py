"""An independent, deliberately naive reference model of tagstream's reporting semantics.

This module is the *test oracle* for SPEC §4. It shares no code and no structure with the
production core (``streams/``, ``agents/``) and uses only the standard library. It is written
as one direct fold over a whole, finite event log:

1. compute, for every position in the log, the stream time of that event's partition
   (the greatest ``ts`` seen so far on that partition, duplicates included);
2. walk the log in order with a handful of plain dicts, calling small helpers that are
   named after the SPEC rules they implement.

Speed is irrelevant (logs are small); every step should be obviously right when read next to
SPEC §3/§4. Choices that the SPEC leaves open are pinned down in the docstring of
:func:`reference_reports`.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Iterable, Optional

DAY_MS = 86_400_000
MINUTE_MS = 60_000

REALTIME_TYPES = ("CONSULT", "LEAD", "VALID", "ORDER")
DELAYED_TYPES = ("LONG_TERM", "INVALID")

# SPEC §3.4 "Default action types".
DEFAULT_ACTION_TYPE = {
    "CONSULT": "WECOM_CONSULT",
    "LEAD": "RESERVATION",
    "VALID": "CONFIRM_EFFECTIVE_LEADS",
    "ORDER": "COMPLETE_ORDER",
    "LONG_TERM": "CUSTOM",
    "INVALID": "INEFFECTIVE_LEADS",
}

# SPEC §3.2: identity fields of a contact event, in the order they are copied.
IDENTITY_FIELDS = ("wechat_app_id", "wechat_unionid", "wechat_openid", "click_id")
USER_ID_FIELDS = ("wechat_app_id", "wechat_unionid", "wechat_openid")

# SPEC §3.4 wire format, minus the wall-clock ``emitted_at``.
REPORT_FIELDS = (
    "outer_action_id", "account_id", "user_action_set_id", "action_type", "custom_action",
    "action_time", "user_id", "trace", "standard_type", "mode", "reason", "corp_id",
    "external_userid", "tag_id", "source_event_id", "event_ts",
)

NO_USER_IDENTITY = "no_user_identity"
ORDER_AFTER_WINDOW = "order_after_window"
ADD_TIME_UNKNOWN = "add_time_unknown"


# ---------------------------------------------------------------------------------------------
# Small helpers, each named after the SPEC rule it implements.
# ---------------------------------------------------------------------------------------------

def ts_in_future(event: dict, record_ts: Optional[int], max_future_skew_ms: int) -> bool:
    """SPEC §3.5: the event's clock is further ahead of its Kafka record's than allowed."""
    return record_ts is not None and event["ts"] - record_ts > max_future_skew_ms


def customer_key(event: dict) -> str:
    """SPEC §2: the record key of both event topics, ``corp_id:external_userid``."""
    return f"{event['corp_id']}:{event['external_userid']}"


def is_contact_event(event: dict) -> bool:
    """SPEC §3.2 events carry ``change_type``; SPEC §3.1 tag events carry ``op``."""
    return "change_type" in event


def stream_time_at_each_position(events: list[dict], partition_of: Callable[[str], int]) -> list[int]:
    """SPEC §4 "Time": stream time of the event's partition right after it advanced it.

    The result has one entry per event: the max ``ts`` of all events at or before that position
    that share its partition number (tag and contact events alike, duplicates included).
    """
    result = []
    greatest_ts_so_far: dict[int, int] = {}      # partition -> max ts at or before this position
    for event in events:
        partition = partition_of(customer_key(event))
        greatest_ts_so_far[partition] = max(greatest_ts_so_far.get(partition, event["ts"]), event["ts"])
        result.append(greatest_ts_so_far[partition])
    return result


def rule_versions_after_applying(rules: Iterable[tuple[str, Optional[dict]]]) -> dict[str, list[dict]]:
    """SPEC §3.3: every version of every key; a null value deletes all versions seen so far."""
    versions: dict[str, list[dict]] = {}
    for key, value in rules:
        if value is None:
            versions.pop(key, None)
        else:
            versions.setdefault(key, []).append(value)
    return versions


def rule_in_force(versions: dict[str, list[dict]], corp_id: str, tag_id: str, ts: int) -> Optional[dict]:
    """SPEC §3.3: the version with the greatest ``effective_from <= ts``; ties: greatest version.

    Two versions with equal ``(effective_from, version)``: the later one in the list wins.
    """
    best = None
    for rule in versions.get(f"{corp_id}:{tag_id}", []):
        if rule["effective_from"] > ts:
            continue
        if best is None or (rule["effective_from"], rule["version"]) >= (best["effective_from"], best["version"]):
            best = rule
    return best


def outer_action_id(corp_id: str, external_userid: str, standard_type: str) -> str:
    """SPEC §3.4: lowercase hex SHA-256 of ``corp_id|external_userid|standard_type``."""
    return hashlib.sha256(f"{corp_id}|{external_userid}|{standard_type}".encode("utf-8")).hexdigest()


def action_type_for(rule: dict, standard_type: str) -> str:
    """SPEC §3.3/§3.4: the rule's own ``action_type`` overrides the default, but only for the
    type the rule itself maps to (an ORDER rule's override does not apply to the LONG_TERM
    report it turns into after the order window)."""
    override = rule.get("action_type")
    if rule.get("standard_type") == standard_type and override is not None:
        return override
    return DEFAULT_ACTION_TYPE[standard_type]


def custom_action_for(action_type: str, standard_type: str) -> Optional[str]:
    """SPEC §3.4: ``custom_action`` only accompanies ``CUSTOM``."""
    if action_type != "CUSTOM":
        return None
    return "LONG_TERM_CONVERSION" if standard_type == "LONG_TERM" else standard_type


def has_user_identity(identity: dict) -> bool:
    """SPEC §4 rule 7: app id plus unionid or openid, or a click id."""
    wechat = bool(identity.get("wechat_app_id")) and bool(
        identity.get("wechat_unionid") or identity.get("wechat_openid"))
    return wechat or bool(identity.get("click_id"))


def user_id_of(identity: dict) -> dict:
    return {field: identity[field] for field in USER_ID_FIELDS if identity.get(field) is not None}


def trace_of(identity: dict) -> dict:
    return {"click_id": identity["click_id"]} if identity.get("click_id") is not None else {}


def add_time_for_tagging(add_times_of_customer: dict[str, int], staff_userid: str) -> Optional[int]:
    """SPEC §4 rule 5: the tagging staff member's add time, else the customer's earliest one."""
    if staff_userid in add_times_of_customer:
        return add_times_of_customer[staff_userid]
    if add_times_of_customer:
        return min(add_times_of_customer.values())
    return None


def order_window_outcome(event_ts: int, add_time: Optional[int], order_window_ms: int) -> tuple[str, Optional[str]]:
    """SPEC §4 rule 5: what an ORDER candidate becomes -> (standard_type, reason)."""
    if add_time is None:
        return "ORDER", ADD_TIME_UNKNOWN
    if event_ts - add_time > order_window_ms:
        return "LONG_TERM", ORDER_AFTER_WINDOW
    return "ORDER", None


def build_report(*, rule: dict, standard_type: str, mode: str, reason: Optional[str],
                 tag_event: dict, identity: dict) -> dict:
    """SPEC §3.4: the wire report (without ``emitted_at``) for one tag add."""
    action_type = action_type_for(rule, standard_type)
    report = {
        "outer_action_id": outer_action_id(tag_event["corp_id"], tag_event["external_userid"], standard_type),
        "account_id": rule["account_id"],
        "user_action_set_id": rule["user_action_set_id"],
        "action_type": action_type,
        "custom_action": custom_action_for(action_type, standard_type),
        "action_time": tag_event["ts"] // 1000,
        "user_id": user_id_of(identity),
        "trace": trace_of(identity),
        "standard_type": standard_type,
        "mode": mode,
        "reason": reason,
        "corp_id": tag_event["corp_id"],
        "external_userid": tag_event["external_userid"],
        "tag_id": tag_event["tag_id"],
        "source_event_id": tag_event["event_id"],
        "event_ts": tag_event["ts"],
    }
    assert tuple(report) == REPORT_FIELDS
    return report


def deliver_or_mark_unreportable(report: dict, identity: dict, *, reports: list, unreportable: list,
                                 reported: set) -> None:
    """SPEC §4 rules 3 and 7: with identity the report counts as the one report of its
    (customer, type); without, a copy with reason ``no_user_identity`` goes to unreportable and
    does not count."""
    if has_user_identity(identity):
        reports.append(report)
        reported.add((f"{report['corp_id']}:{report['external_userid']}", report["standard_type"]))
    else:
        unreportable.append(dict(report, reason=NO_USER_IDENTITY))


# ---------------------------------------------------------------------------------------------
# The fold.
# ---------------------------------------------------------------------------------------------

def reference_reports(
    rules: list[tuple[str, Optional[dict]]],
    events: list[dict],
    *,
    partition_of: Callable[[str], int],
    order_window_ms: int = 7 * DAY_MS,
    delay_hold_ms: int = 30 * MINUTE_MS,
    dedupe_horizon_ms: int = 7 * DAY_MS,
    flush_at_end: bool = True,
    record_timestamps: Optional[list[Optional[int]]] = None,
    max_future_skew_ms: int = 60 * MINUTE_MS,
    outcomes: Optional[list[tuple[str, str]]] = None,
) -> tuple[list[dict], list[dict]]:
    """Reports and unreportable reports for ``events`` applied in order under ``rules``.

    Returns ``(reports, unreportable)`` in the order they are produced. The semantics:

    * SPEC §3.5 ``ts_in_future``: with ``record_timestamps`` (the Kafka record timestamp of
      each event, or None), an event whose ``ts`` is more than ``max_future_skew_ms`` ahead
      of its record's timestamp is a dead letter: it is not applied and does not count for
      stream time. It is as if it was not in the log.

    * Stream time is per partition number (``partition_of(customer_key)``): the max ``ts`` of
      every event seen so far on that partition, duplicates included. Each event (a) advances
      it, (b) releases every hold of that partition with ``deadline <= stream time`` in order
      of ``(deadline, customer_key, standard_type)``, (c) is applied.
    * Dedupe is per customer, across tag and contact events: an applied event's id is
      remembered with its ``ts``; before checking, ids of this customer whose ``ts`` is below
      ``stream_time - dedupe_horizon_ms`` are forgotten. A duplicate has no other effect.
      An unmapped ``add`` (rule 2) is not applied and its id is not remembered: its
      redelivery is ``unmapped`` again (the argument is in streams/core/semantics.py).
    * Contact events copy every non-null identity field (newest non-null wins);
      ``add_external_contact`` sets ``add_time[userid] = min(existing, ts)``.
    * Tag ``remove`` drops the tag from the support set of every active hold of the customer;
      a hold left without support is cancelled. It never produces a report.
    * Tag ``add``: rule as of ``ts``; ORDER is subject to the order window; a type already
      reported is skipped; realtime types report now; LONG_TERM/INVALID join an active hold
      of that type or start one with ``deadline = ts + delay_hold_ms``.
    * A released hold reports its first add (``mode: delayed``), identity as at release.
    * ``flush_at_end``: after the last event every remaining hold is released, ordered by
      ``(deadline, customer_key, standard_type)`` across all partitions.
    * ``outcomes``: if given, gets ``(event_id, outcome)`` per event applied, in order, in the
      engine's words (``duplicate``, ``contact_applied``, ``cancelled``, ``tag_removed``,
      ``unmapped``, ``already_reported``, ``reported``, ``unreportable``, ``held``,
      ``hold_joined``): what `tagstream explain` must say.

    Choices beyond the SPEC: a rule list entry with the same ``(effective_from, version)`` as an
    earlier one of the same key wins over it; a rule is looked up by the record key
    ``corp_id:tag_id`` of the rules list, never by the rule body.
    """
    if record_timestamps is not None:
        events = [event for event, record_ts in zip(events, record_timestamps)
                  if not ts_in_future(event, record_ts, max_future_skew_ms)]
    rule_versions = rule_versions_after_applying(rules)
    stream_times = stream_time_at_each_position(events, partition_of)

    # Plain per-customer state, keyed by "corp_id:external_userid".
    remembered_ids: dict[str, dict[str, int]] = {}     # event_id -> ts of the applied event
    identities: dict[str, dict[str, str]] = {}         # identity field -> newest non-null value
    add_times: dict[str, dict[str, int]] = {}          # staff userid -> earliest add_external_contact ts
    reported: set[tuple[str, str]] = set()             # (customer_key, standard_type) on `reports`
    holds: dict[tuple[str, str], dict[str, Any]] = {}  # (customer_key, standard_type) -> hold

    reports: list[dict] = []
    unreportable: list[dict] = []

    def release(hold_key: tuple[str, str]) -> None:
        """SPEC §4 rule 6: a due hold reports its first supporting add, identity as of now."""
        hold = holds.pop(hold_key)
        who, standard_type = hold_key
        if (who, standard_type) in reported:
            return
        identity = identities.get(who, {})
        report = build_report(rule=hold["rule"], standard_type=standard_type, mode="delayed",
                              reason=hold["reason"], tag_event=hold["first_add"], identity=identity)
        deliver_or_mark_unreportable(report, identity, reports=reports, unreportable=unreportable,
                                     reported=reported)

    def release_order(hold_key: tuple[str, str]) -> tuple[int, str, str]:
        return (holds[hold_key]["deadline"], hold_key[0], hold_key[1])

    def note(outcome: str) -> None:
        if outcomes is not None:
            outcomes.append((event["event_id"], outcome))

    for position, event in enumerate(events):
        who = customer_key(event)
        partition = partition_of(who)
        now = stream_times[position]

        # (b) Release every hold of this partition that is due at the new stream time.
        due = [key for key, hold in holds.items() if hold["partition"] == partition and hold["deadline"] <= now]
        for hold_key in sorted(due, key=release_order):
            release(hold_key)

        # Rule 2 first for adds: an unmapped add changes nothing, so its id is not remembered
        # and a redelivery of it is unmapped again (streams/core/semantics.py has the argument).
        if not is_contact_event(event) and event["op"] == "add":
            rule = rule_in_force(rule_versions, event["corp_id"], event["tag_id"], event["ts"])
            if rule is None or rule.get("standard_type") is None:
                note("unmapped")
                continue

        # Rule 1: ordered, at-most-once input (per customer, bounded by the dedupe horizon).
        seen = remembered_ids.setdefault(who, {})
        for old_id in [eid for eid, ts in seen.items() if ts < now - dedupe_horizon_ms]:
            del seen[old_id]
        if event["event_id"] in seen:
            note("duplicate")
            continue
        seen[event["event_id"]] = event["ts"]

        # (c) Apply.
        if is_contact_event(event):
            identity = identities.setdefault(who, {})
            for field in IDENTITY_FIELDS:
                if event.get(field) is not None:
                    identity[field] = event[field]
            if event["change_type"] == "add_external_contact":
                staff_add_times = add_times.setdefault(who, {})
                staff_add_times[event["userid"]] = min(staff_add_times.get(event["userid"], event["ts"]), event["ts"])
            note("contact_applied")
            continue

        if event["op"] == "remove":
            # Rule 6: removing every supporting tag before the deadline cancels the hold.
            cancelled = False
            for hold_key in [key for key in holds if key[0] == who]:
                holds[hold_key]["support"].discard(event["tag_id"])
                if not holds[hold_key]["support"]:
                    del holds[hold_key]
                    cancelled = True
            note("cancelled" if cancelled else "tag_removed")
            continue

        # op == "add", mapped (rule 2 above)
        standard_type, reason = rule["standard_type"], None

        # Rule 5: order window.
        if standard_type == "ORDER":
            add_time = add_time_for_tagging(add_times.get(who, {}), event["userid"])
            standard_type, reason = order_window_outcome(event["ts"], add_time, order_window_ms)

        # Rule 3: once per customer and type.
        if (who, standard_type) in reported:
            note("already_reported")
            continue

        if standard_type in REALTIME_TYPES:
            # Rule 4: real-time types go out at once.
            identity = identities.get(who, {})
            report = build_report(rule=rule, standard_type=standard_type, mode="realtime", reason=reason,
                                  tag_event=event, identity=identity)
            deliver_or_mark_unreportable(report, identity, reports=reports, unreportable=unreportable,
                                         reported=reported)
            note("reported" if has_user_identity(identity) else "unreportable")
        else:
            # Rule 6: delayed types are held from their first supporting add.
            hold_key = (who, standard_type)
            if hold_key in holds:
                holds[hold_key]["support"].add(event["tag_id"])
                note("hold_joined")
            else:
                note("held")
                holds[hold_key] = {
                    "deadline": event["ts"] + delay_hold_ms,
                    "partition": partition,
                    "first_add": event,
                    "rule": rule,
                    "reason": reason,
                    "support": {event["tag_id"]},
                }

    if flush_at_end:
        for hold_key in sorted(holds, key=release_order):
            release(hold_key)

    return reports, unreportable
