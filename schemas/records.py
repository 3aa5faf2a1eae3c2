"""Record types for every message tagstream reads or writes (SPEC §3), and the reporting
vocabulary they use: the six standard types, their timeliness and default action types.

These are plain frozen dataclasses. Decoding bytes into them (and turning bad bytes into
dead letters) lives in `schemas.validation`; this module only says what a valid record is.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Optional

# --- The reporting vocabulary (SPEC §1, §3.4) -----------------------------------------

CONSULT, LEAD, VALID, ORDER, LONG_TERM, INVALID = (
    "CONSULT", "LEAD", "VALID", "ORDER", "LONG_TERM", "INVALID")
STANDARD_TYPES: tuple[str, ...] = (CONSULT, LEAD, VALID, ORDER, LONG_TERM, INVALID)
#: Emitted the moment their event is processed, never retracted (SPEC §4 rule 4).
REALTIME_TYPES: frozenset[str] = frozenset({CONSULT, LEAD, VALID, ORDER})
#: Held for `delay_hold` before release (SPEC §4 rule 6).
DELAYED_TYPES: frozenset[str] = frozenset({LONG_TERM, INVALID})

#: Marketing API action type per standard type, unless a rule overrides it (SPEC §3.4).
DEFAULT_ACTION_TYPES: dict[str, str] = {
    CONSULT: "WECOM_CONSULT",
    LEAD: "RESERVATION",
    VALID: "CONFIRM_EFFECTIVE_LEADS",
    ORDER: "COMPLETE_ORDER",
    LONG_TERM: "CUSTOM",
    INVALID: "INEFFECTIVE_LEADS",
}
#: `custom_action` sent with action type CUSTOM.
DEFAULT_CUSTOM_ACTIONS: dict[str, str] = {LONG_TERM: "LONG_TERM_CONVERSION"}

TAG_OPS = ("add", "remove")
ADD_EXTERNAL_CONTACT = "add_external_contact"
CONTACT_CHANGE_TYPES = (
    ADD_EXTERNAL_CONTACT, "edit_external_contact", "del_external_contact", "del_follow_user")
MODES = ("realtime", "delayed")

#: Why a report carries a non-null `reason` (SPEC §4).
REASON_ORDER_AFTER_WINDOW = "order_after_window"
REASON_ADD_TIME_UNKNOWN = "add_time_unknown"
REASON_NO_USER_IDENTITY = "no_user_identity"

#: Dead-letter codes (SPEC §3.5). `ts_in_future`: a valid event whose `ts` is further ahead
#: of its Kafka record's timestamp than `max_future_skew` (a bad clock upstream); it would
#: move its partition's stream time ahead and release every hold at once (issue 18).
NOT_JSON, NOT_OBJECT, TOO_LARGE, MISSING_FIELD, INVALID_FIELD, KEY_MISMATCH, TS_IN_FUTURE = (
    "not_json", "not_object", "too_large", "missing_field", "invalid_field", "key_mismatch", "ts_in_future")
DEAD_LETTER_CODES = (NOT_JSON, NOT_OBJECT, TOO_LARGE, MISSING_FIELD, INVALID_FIELD, KEY_MISMATCH, TS_IN_FUTURE)
MAX_RECORD_BYTES = 64 * 1024
MAX_IDENTIFIER_CHARS = 128


def customer_key(corp_id: str, external_userid: str) -> str:
    """The record key of both event topics; also the key of per-customer state."""
    return f"{corp_id}:{external_userid}"


def rule_key(corp_id: str, tag_id: str) -> str:
    """The record key of the reporting-rules topic."""
    return f"{corp_id}:{tag_id}"


def outer_action_id(corp_id: str, external_userid: str, standard_type: str) -> str:
    """The report's idempotency key at the Marketing API: one per customer and type."""
    return hashlib.sha256(f"{corp_id}|{external_userid}|{standard_type}".encode()).hexdigest()


# --- Input records ----------------------------------------------------------------------

# Input events are built for every record the worker reads, and a frozen dataclass's
# __init__ costs four times a plain one's (object.__setattr__ per field): these two are
# plain. Nothing mutates an event.
@dataclass(slots=True)
class TagEvent:
    """A staff member added or removed one custom tag on one customer (SPEC §3.1)."""
    event_id: str
    corp_id: str
    external_userid: str
    userid: str
    tag_id: str
    op: str
    ts: int
    source: Optional[str] = None


@dataclass(slots=True)
class ContactEvent:
    """A WeCom external-contact change, carrying the customer's ad identity (SPEC §3.2)."""
    event_id: str
    corp_id: str
    external_userid: str
    userid: str
    change_type: str
    ts: int
    state: Optional[str] = None
    wechat_app_id: Optional[str] = None
    wechat_unionid: Optional[str] = None
    wechat_openid: Optional[str] = None
    click_id: Optional[str] = None


@dataclass(frozen=True, slots=True)
class ReportingRule:
    """One version of the mapping of a custom tag onto a standard type (SPEC §3.3).

    A null `standard_type` unmaps the tag from `effective_from` on.
    """
    corp_id: str
    tag_id: str
    standard_type: Optional[str]
    effective_from: int
    version: int
    account_id: Optional[int] = None
    user_action_set_id: Optional[int] = None
    tag_name: Optional[str] = None
    action_type: Optional[str] = None

    def as_wire(self) -> dict[str, Any]:
        return {
            "corp_id": self.corp_id, "tag_id": self.tag_id, "tag_name": self.tag_name,
            "standard_type": self.standard_type, "account_id": self.account_id,
            "user_action_set_id": self.user_action_set_id,
            "effective_from": self.effective_from, "version": self.version,
            "action_type": self.action_type,
        }


# --- Output records ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ConversionReport:
    """One conversion for the Marketing API (SPEC §3.4)."""
    outer_action_id: str
    account_id: int
    user_action_set_id: int
    action_type: str
    custom_action: Optional[str]
    action_time: int
    user_id: dict[str, str]
    trace: dict[str, str]
    standard_type: str
    mode: str
    reason: Optional[str]
    corp_id: str
    external_userid: str
    tag_id: str
    source_event_id: str
    event_ts: int
    emitted_at: int
    #: Event ts minus the customer's add time (SPEC §4 rule 9); not on the wire.
    tagging_delay_ms: Optional[int] = field(default=None, compare=False)

    def as_wire(self) -> dict[str, Any]:
        return {
            "outer_action_id": self.outer_action_id, "account_id": self.account_id,
            "user_action_set_id": self.user_action_set_id, "action_type": self.action_type,
            "custom_action": self.custom_action, "action_time": self.action_time,
            "user_id": self.user_id, "trace": self.trace, "standard_type": self.standard_type,
            "mode": self.mode, "reason": self.reason, "corp_id": self.corp_id,
            "external_userid": self.external_userid, "tag_id": self.tag_id,
            "source_event_id": self.source_event_id, "event_ts": self.event_ts,
            "emitted_at": self.emitted_at,
        }


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Input that could not be used, with the reason and enough to find and replay it
    (SPEC §3.5). `value_b64` holds the original bytes, so nothing is lost."""
    error: str
    detail: str
    topic: str
    partition: Optional[int]
    offset: Optional[int]
    key: Optional[str]
    value_b64: str
    at: int

    def as_wire(self) -> dict[str, Any]:
        return {
            "error": self.error, "detail": self.detail, "topic": self.topic,
            "partition": self.partition, "offset": self.offset, "key": self.key,
            "value_b64": self.value_b64, "at": self.at,
        }
