"""Poison input for the chaos run: records no valid event stream contains, each labelled with
the SPEC §3.5 error its dead letter must carry.

Every dead-letter class is here (`not_json`, `not_object`, `too_large`, `missing_field`,
`invalid_field`, `key_mismatch`, `ts_in_future`), and so are the shapes that break hand-written parsers:
random bytes, JSON nested 5,000 deep, huge strings, wrong types, invalid UTF-8 inside a
string, a record with no key, and a null value. Each record is made from a valid event of
the log (so it lands on a real customer's partition, among real traffic) and carries a
unique marker, so its dead letter can be matched by its bytes.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Optional

import orjson

from schemas.records import MAX_IDENTIFIER_CHARS, MAX_RECORD_BYTES


@dataclass(frozen=True)
class Poison:
    topic: str                 # the short topic name: tag_events or contact_events
    key: Optional[bytes]
    value: Optional[bytes]
    expected_error: str
    shape: str                 # what kind of poison, for the summary


def _body(event: dict, marker: str, **changes) -> dict:
    body = {**event, "event_id": marker, **changes}
    return {k: v for k, v in body.items() if v is not _DROP}


_DROP = object()


def _random_bytes(rng: random.Random, event: dict, marker: str) -> tuple[Optional[bytes], str]:
    # a leading 0xff is never valid JSON (nor UTF-8), whatever the random tail holds
    return b"\xff" + marker.encode() + bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 300))), "not_json"


def _truncated(rng, event, marker):
    return orjson.dumps(_body(event, marker))[:-7], "not_json"


def _non_utf8(rng, event, marker):
    return orjson.dumps(_body(event, marker, userid="@@")).replace(b'"@@"', b'"s\xc3\x28x"'), "not_json"


def _nested_too_deep(rng, event, marker):
    return b'{"event_id": "' + marker.encode() + b'", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", "not_json"


def _nested_field(rng, event, marker):
    deep = {}
    for _ in range(200):
        deep = {"d": deep}
    return orjson.dumps(_body(event, marker, userid=deep)), "invalid_field"


def _array(rng, event, marker):
    return orjson.dumps([marker, event]), "not_object"


def _scalar(rng, event, marker):
    return orjson.dumps(f"{marker}: not an event"), "not_object"


def _too_large(rng, event, marker):
    return orjson.dumps(_body(event, marker, source="x" * (MAX_RECORD_BYTES + 100))), "too_large"


def _huge_identifier(rng, event, marker):
    return orjson.dumps(_body(event, marker, userid="u" * (MAX_IDENTIFIER_CHARS * 40))), "invalid_field"


def _missing_ts(rng, event, marker):
    return orjson.dumps(_body(event, marker, ts=_DROP)), "missing_field"


def _ts_as_text(rng, event, marker):
    return orjson.dumps(_body(event, marker, ts=str(event["ts"]))), "invalid_field"


def _negative_ts(rng, event, marker):
    return orjson.dumps(_body(event, marker, ts=-event["ts"])), "invalid_field"


def _id_as_number(rng, event, marker):
    return orjson.dumps(_body(event, marker, corp_id=12345)), "invalid_field"


def _null_required(rng, event, marker):
    return orjson.dumps(_body(event, marker, external_userid=None)), "invalid_field"


def _unknown_enum(rng, event, marker):
    field = "change_type" if "change_type" in event else "op"
    return orjson.dumps(_body(event, marker, **{field: "explode"})), "invalid_field"


def _null_value(rng, event, marker):
    return None, "not_json"


def _far_future_ts(rng, event, marker):
    # valid, but its clock is hours or years ahead of its record's timestamp (the event's own
    # ts, as the harness stamps every record): it must not move stream time (issue 18)
    ahead = rng.choice([2 * 3_600_000, 10 * 365 * 86_400_000])
    return orjson.dumps(_body(event, marker, ts=event["ts"] + ahead)), "ts_in_future"


#: shape -> maker(rng, valid event, unique marker) -> (value, expected error), and its share
#: of the poison. `too_large` records are 64 KiB each, so they are few.
SHAPES: dict[str, tuple[Callable, float]] = {
    "random_bytes": (_random_bytes, 3), "truncated_json": (_truncated, 1), "non_utf8": (_non_utf8, 1),
    "nested_5000_deep": (_nested_too_deep, 0.5), "nested_field": (_nested_field, 0.5),
    "json_array": (_array, 1), "json_scalar": (_scalar, 1), "too_large": (_too_large, 0.1),
    "huge_identifier": (_huge_identifier, 1), "missing_ts": (_missing_ts, 1), "ts_as_text": (_ts_as_text, 1),
    "negative_ts": (_negative_ts, 0.5), "id_as_number": (_id_as_number, 1), "null_required": (_null_required, 1),
    "unknown_enum": (_unknown_enum, 1), "null_value": (_null_value, 0.5), "far_future_ts": (_far_future_ts, 1),
    "wrong_key": (None, 1), "no_key": (None, 1),
}


def poison_records(events: list[dict], count: int, seed: int) -> list[tuple[int, Poison]]:
    """`count` poison records, each with the log position it goes in front of. Every shape
    appears at least once."""
    rng = random.Random(seed)
    names = list(SHAPES)
    weights = [SHAPES[n][1] for n in names]
    out = []
    for n in range(count):
        shape = names[n] if n < len(names) else rng.choices(names, weights)[0]
        position = rng.randrange(len(events))
        event = events[position]
        topic = "contact_events" if "change_type" in event else "tag_events"
        key = f"{event['corp_id']}:{event['external_userid']}".encode()
        marker = f"poison-{seed}-{n}"
        if shape == "wrong_key":
            value, error, key = orjson.dumps(_body(event, marker)), "key_mismatch", key + b"-other"
        elif shape == "no_key":
            value, error, key = orjson.dumps(_body(event, marker)), "key_mismatch", None
        else:
            value, error = SHAPES[shape][0](rng, event, marker)
        out.append((position, Poison(topic, key, value, error, shape)))
    return out
