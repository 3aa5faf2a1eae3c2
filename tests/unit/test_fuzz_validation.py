"""Fuzzing the validation layer (`schemas.validation`) with hypothesis.

Whatever bytes arrive as a record's key and value (random bytes, arbitrary JSON, near-valid
records with one field broken, deep nesting, huge strings, non-UTF-8, missing keys), the
decoders never raise. They yield either a record that the same decoder accepts again from
its own wire form, or a rejection with a SPEC §3.5 code whose dead letter carries the
original bytes.
"""
from __future__ import annotations

import base64
import dataclasses
from typing import Optional

import orjson
from hypothesis import HealthCheck, given, settings, strategies as st

from schemas.records import INVALID_FIELD, KEY_MISMATCH, MISSING_FIELD, NOT_JSON, NOT_OBJECT, TOO_LARGE
from schemas.validation import (
    Rejection, RuleTombstone, decode_contact_event, decode_reporting_rule, decode_tag_event)
from tests.unit.test_validation import CONTACT_EVENT, CUSTOMER_KEY, RULE, RULE_KEY, TAG_EVENT

CODES = {NOT_JSON, NOT_OBJECT, MISSING_FIELD, INVALID_FIELD, KEY_MISMATCH, TOO_LARGE}
DECODERS = [(decode_tag_event, TAG_EVENT, CUSTOMER_KEY), (decode_contact_event, CONTACT_EVENT, CUSTOMER_KEY),
            (decode_reporting_rule, RULE, RULE_KEY)]

INT64 = st.integers(min_value=-(2 ** 63), max_value=2 ** 64 - 1)     # what orjson can write
json_values = st.recursive(
    st.none() | st.booleans() | INT64 | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=25)
odd_values = st.one_of(
    json_values,
    st.text(min_size=1000, max_size=70_000),                          # huge strings
    st.integers(min_value=-(2 ** 63), max_value=2 ** 63),             # boundaries and signs
    st.sampled_from(["", " ", "\x00", "add", "remove", "VALID", "🙂" * 300]),
)


def _near_valid(base: dict) -> st.SearchStrategy[dict]:
    """The valid example with some fields replaced by odd values, some removed, extras added."""
    names = sorted(base)
    return st.builds(
        lambda replaced, removed, extra: {**{k: v for k, v in base.items() if k not in removed}, **replaced, **extra},
        st.dictionaries(st.sampled_from(names), odd_values, max_size=3),
        st.sets(st.sampled_from(names), max_size=2),
        st.dictionaries(st.text(max_size=8), json_values, max_size=2))


def _deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


values = st.one_of(
    st.none(),
    st.binary(max_size=300),                                          # random bytes
    json_values.map(orjson.dumps),                                    # any JSON
    st.integers(min_value=1, max_value=5000).map(_deep),              # deeply nested
    st.binary(min_size=1, max_size=8).map(lambda junk: b'{"corp_id": "' + junk + b'"}'),  # non-UTF-8 inside
    st.sampled_from([b"", b"null", b"[]", b"{}", b"\xff\xfe", b"{" * 2000]),
)


def _keys(valid: bytes) -> st.SearchStrategy[Optional[bytes]]:
    return st.one_of(st.none(), st.just(valid), st.binary(max_size=40), st.just(valid + b"\xff"))


def _check(decoder, key: Optional[bytes], value: Optional[bytes]) -> None:
    result = decoder(key, value)                                      # must not raise
    if isinstance(result, Rejection):
        assert result.error in CODES, result
        letter = orjson.loads(orjson.dumps(result.dead_letter(
            topic="t", partition=0, offset=7, key=key, value=value, at=0).as_wire()))
        assert letter["error"] == result.error and letter["detail"]
        assert base64.b64decode(letter["value_b64"]) == (value or b"")
    elif isinstance(result, RuleTombstone):
        assert value is None and decoder is decode_reporting_rule
    else:
        # an accepted record is valid: its own wire form decodes to the same record
        again = decoder(key, orjson.dumps(dataclasses.asdict(result)))
        assert again == result, (again, result)


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.data())
def test_any_bytes_yield_a_record_or_a_dead_letter(data):
    decoder, base, key = data.draw(st.sampled_from(DECODERS))
    _check(decoder, data.draw(_keys(key)), data.draw(values))


@FUZZ
@given(st.data())
def test_near_valid_records_yield_a_record_or_a_dead_letter(data):
    decoder, base, key = data.draw(st.sampled_from(DECODERS))
    body = data.draw(_near_valid(base))
    _check(decoder, data.draw(_keys(key)), orjson.dumps(body))


def test_nesting_beyond_the_parsers_limit_is_not_json():
    result = decode_tag_event(CUSTOMER_KEY, _deep(10_000))      # 20 KB, under the size limit
    assert isinstance(result, Rejection) and result.error == NOT_JSON
