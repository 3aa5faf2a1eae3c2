"""Fast validation of the input wire formats (SPEC §3), with orjson.

`decode_tag_event`, `decode_contact_event` and `decode_reporting_rule` take the raw key and
value bytes of a Kafka record and return either a record or a `Rejection` carrying one of
the SPEC's dead-letter codes; `decode_conversion_report` does the same for what the sink
reads from the outbound topic, which any producer can write to. They never raise on bad input: errors are values here, so one
bad record can never stop a partition. The JSON Schema files in `schemas/json/` describe the
same formats for other tools; a test keeps the two in agreement.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import orjson

from schemas.records import (
    CONTACT_CHANGE_TYPES, INVALID_FIELD, KEY_MISMATCH, MAX_IDENTIFIER_CHARS, MAX_RECORD_BYTES,
    MISSING_FIELD, NOT_JSON, NOT_OBJECT, STANDARD_TYPES, TAG_OPS, TOO_LARGE, TS_IN_FUTURE, ContactEvent,
    DeadLetter, ReportingRule, TagEvent, customer_key, rule_key)


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a record was not accepted: a SPEC §3.5 error code and a human-readable detail."""
    error: str
    detail: str

    def dead_letter(self, *, topic: str, partition: Optional[int], offset: Optional[int],
                    key: Optional[bytes], value: Optional[bytes], at: int) -> DeadLetter:
        return DeadLetter(
            error=self.error, detail=self.detail, topic=topic, partition=partition,
            offset=offset, key=_key_text(key),
            value_b64=base64.b64encode(value or b"").decode("ascii"), at=at)


def _key_text(key: Optional[bytes]) -> Optional[str]:
    if key is None:
        return None
    return key.decode("utf-8", errors="backslashreplace")


# A field check returns None when the value is fine, else what was expected.
FieldCheck = Callable[[Any], Optional[str]]


def _identifier(value: Any) -> Optional[str]:
    if type(value) is str and 0 < len(value) <= MAX_IDENTIFIER_CHARS:
        return None
    return f"expected a non-empty string of at most {MAX_IDENTIFIER_CHARS} characters"


def _integer(value: Any) -> Optional[str]:
    # bool is a subclass of int in Python, but `true` is not an integer on the wire.
    return None if type(value) is int else "expected integer"


def _non_negative_integer(value: Any) -> Optional[str]:
    return None if type(value) is int and value >= 0 else "expected a non-negative integer"


def _text(value: Any) -> Optional[str]:
    return None if type(value) is str and len(value) <= 1024 else "expected a string"


def _one_of(choices: tuple[str, ...]) -> FieldCheck:
    expected = "expected one of " + ", ".join(choices)
    return lambda value: None if value in choices and type(value) is str else expected


# (field, check, required, nullable)
FieldSpec = tuple[str, FieldCheck, bool, bool]

TAG_EVENT_FIELDS: tuple[FieldSpec, ...] = (
    ("event_id", _identifier, True, False),
    ("corp_id", _identifier, True, False),
    ("external_userid", _identifier, True, False),
    ("userid", _identifier, True, False),
    ("tag_id", _identifier, True, False),
    ("op", _one_of(TAG_OPS), True, False),
    ("ts", _non_negative_integer, True, False),
    ("source", _text, False, True),
)

CONTACT_EVENT_FIELDS: tuple[FieldSpec, ...] = (
    ("event_id", _identifier, True, False),
    ("corp_id", _identifier, True, False),
    ("external_userid", _identifier, True, False),
    ("userid", _identifier, True, False),
    ("change_type", _one_of(CONTACT_CHANGE_TYPES), True, False),
    ("ts", _non_negative_integer, True, False),
    ("state", _text, False, True),
    ("wechat_app_id", _identifier, False, True),
    ("wechat_unionid", _identifier, False, True),
    ("wechat_openid", _identifier, False, True),
    ("click_id", _identifier, False, True),
)

REPORTING_RULE_FIELDS: tuple[FieldSpec, ...] = (
    ("corp_id", _identifier, True, False),
    ("tag_id", _identifier, True, False),
    ("standard_type", _one_of(STANDARD_TYPES), True, True),
    ("effective_from", _non_negative_integer, True, False),
    ("version", _integer, True, False),
    ("account_id", _integer, False, True),
    ("user_action_set_id", _integer, False, True),
    ("tag_name", _text, False, True),
    ("action_type", _identifier, False, True),
)

REPORT_MODES = ("realtime", "delayed")
CUSTOM = "CUSTOM"


def _hex64(value: Any) -> Optional[str]:
    ok = type(value) is str and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
    return None if ok else "expected 64 lowercase hex characters"


def _string_map(value: Any) -> Optional[str]:
    ok = type(value) is dict and all(type(v) is str and 0 < len(v) <= MAX_IDENTIFIER_CHARS for v in value.values())
    return None if ok else "expected an object of non-empty strings"


CONVERSION_REPORT_FIELDS: tuple[FieldSpec, ...] = (
    ("outer_action_id", _hex64, True, False),
    ("account_id", _integer, True, False),
    ("user_action_set_id", _integer, True, False),
    ("action_type", _identifier, True, False),
    ("custom_action", _identifier, True, True),
    ("action_time", _non_negative_integer, True, False),
    ("user_id", _string_map, True, False),
    ("trace", _string_map, True, False),
    ("standard_type", _one_of(STANDARD_TYPES), True, False),
    ("mode", _one_of(REPORT_MODES), True, False),
    ("reason", _text, True, True),
    ("corp_id", _identifier, True, False),
    ("external_userid", _identifier, True, False),
    ("tag_id", _identifier, True, False),
    ("source_event_id", _identifier, True, False),
    ("event_ts", _non_negative_integer, True, False),
    ("emitted_at", _non_negative_integer, True, False),
)

Parsed = Union[dict, Rejection]


def _parse_object(value: Optional[bytes], fields: tuple[FieldSpec, ...]) -> Parsed:
    """Bytes -> dict holding exactly the known fields, or the first problem found."""
    if value is None:
        return Rejection(NOT_JSON, "value is null")
    if len(value) > MAX_RECORD_BYTES:
        return Rejection(TOO_LARGE, f"value is {len(value)} bytes; the limit is {MAX_RECORD_BYTES}")
    try:
        body = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        return Rejection(NOT_JSON, str(exc)[:200])
    if type(body) is not dict:
        return Rejection(NOT_OBJECT, f"expected a JSON object, got {type(body).__name__}")
    known: dict[str, Any] = {}
    for name, check, required, nullable in fields:
        if name not in body:
            if required:
                return Rejection(MISSING_FIELD, f"{name}: required")
            continue
        field_value = body[name]
        if field_value is None:
            if not nullable:
                return Rejection(INVALID_FIELD, f"{name}: must not be null")
        else:
            problem = check(field_value)
            if problem is not None:
                return Rejection(INVALID_FIELD, f"{name}: {problem}")
        known[name] = field_value
    return known


def _check_key(key: Optional[bytes], expected: str, shape: str) -> Optional[Rejection]:
    if key is None:
        return Rejection(KEY_MISMATCH, f"record has no key; expected {shape} {expected!r}")
    if key != expected.encode():
        return Rejection(KEY_MISMATCH, f"key {_key_text(key)!r} is not {shape} {expected!r}")
    return None


def decode_tag_event(key: Optional[bytes], value: Optional[bytes]) -> Union[TagEvent, Rejection]:
    body = _parse_object(value, TAG_EVENT_FIELDS)
    if isinstance(body, Rejection):
        return body
    mismatch = _check_key(key, customer_key(body["corp_id"], body["external_userid"]),
                          "corp_id:external_userid")
    return mismatch or TagEvent(**body)


def decode_contact_event(key: Optional[bytes], value: Optional[bytes]) -> Union[ContactEvent, Rejection]:
    body = _parse_object(value, CONTACT_EVENT_FIELDS)
    if isinstance(body, Rejection):
        return body
    mismatch = _check_key(key, customer_key(body["corp_id"], body["external_userid"]),
                          "corp_id:external_userid")
    return mismatch or ContactEvent(**body)


def trusted_time(event_ts: int, record_timestamp: Optional[int], max_future_skew_ms: int) -> Optional[Rejection]:
    """SPEC §3.5 `ts_in_future`: None if the event's `ts` may move stream time, else why not.

    A `ts` more than `max_future_skew_ms` ahead of the Kafka record's own timestamp is a bad
    clock upstream. Taken as it is, it would move its partition's stream time years ahead
    and release every hold there at once, before a staff's untag could cancel it. The check
    compares with the record timestamp, never the wall clock, so a replay of the same
    records decides exactly as the live run did; the broker keeps record timestamps honest
    (`message.timestamp.after.max.ms` on the input topics, `streams/kafka/admin.py`). A
    record without a timestamp (an archive line without one) is not checked."""
    if record_timestamp is None or record_timestamp < 0 or event_ts - record_timestamp <= max_future_skew_ms:
        return None
    return Rejection(TS_IN_FUTURE, f"ts {event_ts} is {event_ts - record_timestamp} ms ahead of the record's "
                                   f"timestamp {record_timestamp}; the limit is {max_future_skew_ms} ms "
                                   "(max_future_skew)")


def decode_event_record(decode: Callable, key: Optional[bytes], value: Optional[bytes],
                        record_timestamp: Optional[int], max_future_skew_ms: int
                        ) -> Union[TagEvent, ContactEvent, Rejection]:
    """An event topic's record as the worker and replay both take it: decoded by `decode`
    (`decode_tag_event` or `decode_contact_event`), then its time checked (`trusted_time`)."""
    decoded = decode(key, value)
    if isinstance(decoded, Rejection):
        return decoded
    return trusted_time(decoded.ts, record_timestamp, max_future_skew_ms) or decoded


#: A tombstone on the rules topic: every version of that key is deleted (SPEC §3.3).
@dataclass(frozen=True, slots=True)
class RuleTombstone:
    corp_id: str
    tag_id: str


def decode_reporting_rule(key: Optional[bytes], value: Optional[bytes]
                          ) -> Union[ReportingRule, RuleTombstone, Rejection]:
    if value is None:
        parts = _key_text(key).split(":", 1) if key else []
        if len(parts) != 2 or not all(parts):
            return Rejection(KEY_MISMATCH, "tombstone key is not corp_id:tag_id")
        return RuleTombstone(parts[0], parts[1])
    body = _parse_object(value, REPORTING_RULE_FIELDS)
    if isinstance(body, Rejection):
        return body
    if body["standard_type"] is not None:
        # A mapped rule must say where its conversions go.
        for name in ("account_id", "user_action_set_id"):
            if body.get(name) is None:
                return Rejection(MISSING_FIELD, f"{name}: required when standard_type is set")
    mismatch = _check_key(key, rule_key(body["corp_id"], body["tag_id"]), "corp_id:tag_id")
    return mismatch or ReportingRule(**body)


def decode_conversion_report(key: Optional[bytes], value: Optional[bytes]) -> Union[dict, Rejection]:
    """A record of the outbound topic as the sink delivers it: the report's fields (SPEC
    §3.4, `schemas/json/conversion_report.schema.json`), keyed by its `outer_action_id` (the
    key decides the partition, and the sink's record of delivered ids is per partition: a
    report under another key could be delivered twice). A tombstone or anything else is a
    `Rejection` with a SPEC §3.5 code."""
    body = _parse_object(value, CONVERSION_REPORT_FIELDS)
    if isinstance(body, Rejection):
        return body if value is not None else Rejection(NOT_JSON, "value is null (a tombstone), not a report")
    if (body["action_type"] == CUSTOM) != (body["custom_action"] is not None):
        return Rejection(INVALID_FIELD, "custom_action: set exactly when action_type is CUSTOM")
    mismatch = _check_key(key, body["outer_action_id"], "the outer_action_id")
    return mismatch or body
