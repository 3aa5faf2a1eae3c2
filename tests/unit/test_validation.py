"""Scenarios for the input decoders of `schemas.validation` (SPEC §3, dead letters §3.5).

Each scenario feeds the raw key and value bytes a Kafka record would carry and checks the
decoded record, or the exact dead-letter code and that the detail names the culprit field.
No Kafka needed.
"""
from __future__ import annotations

import base64
import json
from typing import Any, Callable, Optional

import pytest

from schemas.records import (
    INVALID_FIELD, KEY_MISMATCH, MAX_RECORD_BYTES, MISSING_FIELD, NOT_JSON, NOT_OBJECT, TOO_LARGE,
    ContactEvent, DeadLetter, ReportingRule, TagEvent)
from schemas.validation import (
    Rejection, RuleTombstone, decode_contact_event, decode_reporting_rule, decode_tag_event)

# --- The SPEC §3 examples, and the keys they travel under --------------------------------

TAG_EVENT = {"event_id": "e-9f1c", "corp_id": "ww51a2", "external_userid": "wmKx01",
             "userid": "zhangsan", "tag_id": "etQ7x", "op": "add", "ts": 1763884800123,
             "source": "wecom_sidebar"}
CONTACT_EVENT = {"event_id": "c-77a0", "corp_id": "ww51a2", "external_userid": "wmKx01",
                 "userid": "zhangsan", "change_type": "add_external_contact", "ts": 1763884700000,
                 "state": "ad_318", "wechat_app_id": "wx7d21", "wechat_unionid": "oU-3kd",
                 "wechat_openid": None, "click_id": "clk_81"}
RULE = {"corp_id": "ww51a2", "tag_id": "etQ7x", "tag_name": "核心", "standard_type": "VALID",
        "account_id": 2001, "user_action_set_id": 11001, "effective_from": 1763800000000,
        "version": 3, "action_type": None}
CUSTOMER_KEY = b"ww51a2:wmKx01"
RULE_KEY = b"ww51a2:etQ7x"

Decoder = Callable[[Optional[bytes], Optional[bytes]], Any]
#: (id, decoder, valid example, its key)
KINDS = [
    pytest.param(decode_tag_event, TAG_EVENT, CUSTOMER_KEY, id="tag_event"),
    pytest.param(decode_contact_event, CONTACT_EVENT, CUSTOMER_KEY, id="contact_event"),
    pytest.param(decode_reporting_rule, RULE, RULE_KEY, id="reporting_rule"),
]


def encode(body: Any) -> bytes:
    return json.dumps(body, ensure_ascii=False).encode("utf-8")


def with_(base: dict, **changes: Any) -> dict:
    return {**base, **changes}


def without(base: dict, name: str) -> dict:
    return {k: v for k, v in base.items() if k != name}


def assert_rejected(result: Any, error: str, field: Optional[str] = None) -> Rejection:
    assert isinstance(result, Rejection), f"expected {error}, got {result!r}"
    assert result.error == error, result
    if field is not None:
        assert result.detail.startswith(f"{field}:"), result.detail
    return result


# --- Valid records ------------------------------------------------------------------------

def test_spec_tag_event_decodes_to_a_tag_event():
    assert decode_tag_event(CUSTOMER_KEY, encode(TAG_EVENT)) == TagEvent(
        event_id="e-9f1c", corp_id="ww51a2", external_userid="wmKx01", userid="zhangsan",
        tag_id="etQ7x", op="add", ts=1763884800123, source="wecom_sidebar")


def test_tag_remove_without_source_decodes_with_source_none():
    event = decode_tag_event(CUSTOMER_KEY, encode(with_(without(TAG_EVENT, "source"), op="remove")))
    assert isinstance(event, TagEvent)
    assert (event.op, event.source) == ("remove", None)


def test_spec_contact_event_decodes_to_a_contact_event():
    assert decode_contact_event(CUSTOMER_KEY, encode(CONTACT_EVENT)) == ContactEvent(
        event_id="c-77a0", corp_id="ww51a2", external_userid="wmKx01", userid="zhangsan",
        change_type="add_external_contact", ts=1763884700000, state="ad_318",
        wechat_app_id="wx7d21", wechat_unionid="oU-3kd", wechat_openid=None, click_id="clk_81")


def test_contact_event_without_identity_fields_decodes():
    minimal = {k: CONTACT_EVENT[k] for k in
               ("event_id", "corp_id", "external_userid", "userid", "change_type", "ts")}
    event = decode_contact_event(CUSTOMER_KEY, encode(with_(minimal, change_type="del_follow_user")))
    assert event == ContactEvent(event_id="c-77a0", corp_id="ww51a2", external_userid="wmKx01",
                                 userid="zhangsan", change_type="del_follow_user", ts=1763884700000)


def test_spec_reporting_rule_decodes_to_a_reporting_rule():
    assert decode_reporting_rule(RULE_KEY, encode(RULE)) == ReportingRule(
        corp_id="ww51a2", tag_id="etQ7x", tag_name="核心", standard_type="VALID", account_id=2001,
        user_action_set_id=11001, effective_from=1763800000000, version=3, action_type=None)


def test_unmapping_rule_needs_no_account():
    body = {"corp_id": "ww51a2", "tag_id": "etQ7x", "standard_type": None,
            "effective_from": 1763900000000, "version": -1}
    assert decode_reporting_rule(RULE_KEY, encode(body)) == ReportingRule(
        corp_id="ww51a2", tag_id="etQ7x", standard_type=None, effective_from=1763900000000,
        version=-1)


def test_rule_action_type_override_is_kept():
    rule = decode_reporting_rule(RULE_KEY, encode(with_(RULE, action_type="CUSTOM")))
    assert isinstance(rule, ReportingRule) and rule.action_type == "CUSTOM"


@pytest.mark.parametrize("decoder, body, key", KINDS)
def test_unknown_fields_are_ignored(decoder: Decoder, body: dict, key: bytes):
    plain = decoder(key, encode(body))
    extended = decoder(key, encode({**body, "schema_version": 2, "extra": {"nested": [1, None]},
                                    "ts_seconds": "not checked"}))
    assert extended == plain
    assert not isinstance(extended, Rejection)


@pytest.mark.parametrize("decoder, body, key", KINDS)
@pytest.mark.parametrize("value", [
    pytest.param("x" * 128, id="128-char id"),
    pytest.param("核" * 128, id="128 non-ASCII chars (more than 128 bytes)"),
    pytest.param("a", id="1-char id"),
])
def test_identifier_length_boundaries_are_accepted(decoder: Decoder, body: dict, key: bytes,
                                                   value: str):
    # corp_id is in every record and in every key.
    result = decoder(f"{value}:{key.decode().split(':', 1)[1]}".encode(),
                     encode(with_(body, corp_id=value)))
    assert not isinstance(result, Rejection), result
    assert result.corp_id == value


def test_free_text_fields_accept_up_to_1024_chars_and_empty():
    assert decode_tag_event(CUSTOMER_KEY, encode(with_(TAG_EVENT, source="s" * 1024))).source == "s" * 1024
    assert decode_tag_event(CUSTOMER_KEY, encode(with_(TAG_EVENT, source=""))).source == ""
    assert decode_contact_event(CUSTOMER_KEY, encode(with_(CONTACT_EVENT, state="s" * 1024))).state == "s" * 1024
    assert decode_reporting_rule(RULE_KEY, encode(with_(RULE, tag_name="名" * 1024))).tag_name == "名" * 1024


def test_ts_zero_is_accepted():
    assert decode_tag_event(CUSTOMER_KEY, encode(with_(TAG_EVENT, ts=0))).ts == 0


# --- Rule tombstones ------------------------------------------------------------------------

def test_rule_tombstone_decodes_to_rule_tombstone():
    assert decode_reporting_rule(RULE_KEY, None) == RuleTombstone(corp_id="ww51a2", tag_id="etQ7x")


@pytest.mark.parametrize("key", [None, b"", b"ww51a2", b"ww51a2:", b":etQ7x"])
def test_rule_tombstone_with_unusable_key_is_key_mismatch(key: Optional[bytes]):
    assert_rejected(decode_reporting_rule(key, None), KEY_MISMATCH)


def test_json_null_text_on_rules_topic_is_not_a_tombstone():
    # A tombstone is a record without a value; the four bytes `null` are a JSON value.
    assert_rejected(decode_reporting_rule(RULE_KEY, b"null"), NOT_OBJECT)


# --- not_json ----------------------------------------------------------------------------

@pytest.mark.parametrize("decoder, body, key", KINDS)
@pytest.mark.parametrize("value", [
    pytest.param(b"", id="empty"),
    pytest.param(b"{\"event_id\": ", id="truncated"),
    pytest.param(b"{'corp_id': 'ww51a2'}", id="single quotes"),
    pytest.param(b"NaN", id="NaN"),
    pytest.param("{\"corp_id\": \"ww51a2\"}".encode("utf-16"), id="UTF-16"),
])
def test_not_json(decoder: Decoder, body: dict, key: bytes, value: bytes):
    assert_rejected(decoder(key, value), NOT_JSON)


@pytest.mark.parametrize("decoder, body, key", KINDS)
def test_non_utf8_bytes_inside_a_string_are_not_json(decoder: Decoder, body: dict, key: bytes):
    # A producer that wrote Latin-1: the record parses everywhere except in one string.
    value = encode(with_(body, corp_id="ww51a2-MARKER")).replace(b"-MARKER", b"\xe9\xff")
    assert_rejected(decoder(key, value), NOT_JSON)


@pytest.mark.parametrize("decoder", [decode_tag_event, decode_contact_event])
def test_null_value_on_an_event_topic_is_not_json(decoder: Decoder):
    rejection = assert_rejected(decoder(CUSTOMER_KEY, None), NOT_JSON)
    assert "null" in rejection.detail


# --- not_object ----------------------------------------------------------------------------

@pytest.mark.parametrize("decoder, body, key", KINDS)
@pytest.mark.parametrize("value", [b"[]", b"[{\"corp_id\": \"ww51a2\"}]", b"\"ww51a2\"", b"42",
                                   b"true", b"null"])
def test_not_object(decoder: Decoder, body: dict, key: bytes, value: bytes):
    assert_rejected(decoder(key, value), NOT_OBJECT)


# --- too_large ---------------------------------------------------------------------------

def padded_to(body: dict, size: int) -> bytes:
    """A valid record grown to exactly `size` bytes with an unknown field."""
    base = encode({**body, "padding": ""})
    value = encode({**body, "padding": "p" * (size - len(base))})
    assert len(value) == size
    return value


@pytest.mark.parametrize("decoder, body, key", KINDS)
def test_over_64_kib_is_too_large(decoder: Decoder, body: dict, key: bytes):
    rejection = assert_rejected(decoder(key, padded_to(body, MAX_RECORD_BYTES + 1)), TOO_LARGE)
    assert str(MAX_RECORD_BYTES + 1) in rejection.detail


@pytest.mark.parametrize("decoder, body, key", KINDS)
def test_exactly_64_kib_is_accepted(decoder: Decoder, body: dict, key: bytes):
    assert not isinstance(decoder(key, padded_to(body, MAX_RECORD_BYTES)), Rejection)


def test_too_large_is_checked_before_parsing():
    assert_rejected(decode_tag_event(CUSTOMER_KEY, b"\xff" * (MAX_RECORD_BYTES + 1)), TOO_LARGE)


# --- missing_field --------------------------------------------------------------------------

REQUIRED = [
    *[pytest.param(decode_tag_event, TAG_EVENT, CUSTOMER_KEY, name, id=f"tag_event-{name}")
      for name in ("event_id", "corp_id", "external_userid", "userid", "tag_id", "op", "ts")],
    *[pytest.param(decode_contact_event, CONTACT_EVENT, CUSTOMER_KEY, name, id=f"contact_event-{name}")
      for name in ("event_id", "corp_id", "external_userid", "userid", "change_type", "ts")],
    *[pytest.param(decode_reporting_rule, RULE, RULE_KEY, name, id=f"reporting_rule-{name}")
      for name in ("corp_id", "tag_id", "standard_type", "effective_from", "version")],
]


@pytest.mark.parametrize("decoder, body, key, name", REQUIRED)
def test_missing_required_field(decoder: Decoder, body: dict, key: bytes, name: str):
    assert_rejected(decoder(key, encode(without(body, name))), MISSING_FIELD, name)


def test_empty_object_names_the_first_required_field():
    assert_rejected(decode_tag_event(CUSTOMER_KEY, b"{}"), MISSING_FIELD, "event_id")


@pytest.mark.parametrize("name", ["account_id", "user_action_set_id"])
def test_mapped_rule_needs_an_account_and_action_set(name: str):
    assert_rejected(decode_reporting_rule(RULE_KEY, encode(without(RULE, name))), MISSING_FIELD, name)
    assert_rejected(decode_reporting_rule(RULE_KEY, encode(with_(RULE, **{name: None}))),
                    MISSING_FIELD, name)


@pytest.mark.parametrize("name", ["source"])
def test_optional_tag_event_field_may_be_missing_or_null(name: str):
    assert isinstance(decode_tag_event(CUSTOMER_KEY, encode(with_(TAG_EVENT, **{name: None}))), TagEvent)


@pytest.mark.parametrize("name", ["state", "wechat_app_id", "wechat_unionid", "wechat_openid", "click_id"])
def test_optional_contact_event_fields_may_be_missing_or_null(name: str):
    for body in (without(CONTACT_EVENT, name), with_(CONTACT_EVENT, **{name: None})):
        event = decode_contact_event(CUSTOMER_KEY, encode(body))
        assert isinstance(event, ContactEvent) and getattr(event, name) is None


# --- invalid_field --------------------------------------------------------------------------

LONG_ID = "x" * 129
INVALID = [
    # tag events
    pytest.param(decode_tag_event, TAG_EVENT, CUSTOMER_KEY, "ts", "1763884800123", id="ts as string"),
    pytest.param(decode_tag_event, TAG_EVENT, CUSTOMER_KEY, "ts", True, id="ts as bool"),
    pytest.param(decode_tag_event, TAG_EVENT, CUSTOMER_KEY, "ts", 1763884800.5, id="ts as float"),
    pytest.param(decode_tag_event, TAG_EVENT, CUSTOMER_KEY, "ts", 1763884800123.0,
                 id="ts as integral float"),
    pytest.param(decode_tag_event, TAG_EVENT, CUSTOMER_KEY, "ts", -1, id="negative ts"),
    pytest.param(decode_tag_event, TAG_EVENT, CUSTOMER_KEY, "ts", 2**64, id="ts beyond 64 bits"),
    pytest.param(decode_tag_event, TAG_EVENT, CUSTOMER_KEY, "ts", None, id="null ts"),
    pytest.param(decode_tag_event, TAG_EVENT, CUSTOMER_KEY, "event_id", "", id="empty event_id"),
    pytest.param(decode_tag_event, TAG_EVENT, CUSTOMER_KEY, "event_id", LONG_ID, id="129-char event_id"),
    pytest.param(decode_tag_event, TAG_EVENT, CUSTOMER_KEY, "userid", 42, id="numeric userid"),
    pytest.param(decode_tag_event, TAG_EVENT, CUSTOMER_KEY, "tag_id", ["etQ7x"], id="tag_id as list"),
    pytest.param(decode_tag_event, TAG_EVENT, CUSTOMER_KEY, "tag_id", None, id="null tag_id"),
    pytest.param(decode_tag_event, TAG_EVENT, CUSTOMER_KEY, "op", "ADD", id="op in capitals"),
    pytest.param(decode_tag_event, TAG_EVENT, CUSTOMER_KEY, "op", "delete", id="unknown op"),
    pytest.param(decode_tag_event, TAG_EVENT, CUSTOMER_KEY, "op", 1, id="op as number"),
    pytest.param(decode_tag_event, TAG_EVENT, CUSTOMER_KEY, "source", "s" * 1025, id="1025-char source"),
    pytest.param(decode_tag_event, TAG_EVENT, CUSTOMER_KEY, "source", {"app": "sidebar"}, id="source as object"),
    # contact events
    pytest.param(decode_contact_event, CONTACT_EVENT, CUSTOMER_KEY, "change_type", "add",
                 id="unknown change_type"),
    pytest.param(decode_contact_event, CONTACT_EVENT, CUSTOMER_KEY, "change_type", None,
                 id="null change_type"),
    pytest.param(decode_contact_event, CONTACT_EVENT, CUSTOMER_KEY, "ts", False, id="contact ts as bool"),
    pytest.param(decode_contact_event, CONTACT_EVENT, CUSTOMER_KEY, "external_userid", "",
                 id="empty external_userid"),
    pytest.param(decode_contact_event, CONTACT_EVENT, CUSTOMER_KEY, "wechat_unionid", "",
                 id="empty wechat_unionid"),
    pytest.param(decode_contact_event, CONTACT_EVENT, CUSTOMER_KEY, "click_id", LONG_ID,
                 id="129-char click_id"),
    pytest.param(decode_contact_event, CONTACT_EVENT, CUSTOMER_KEY, "wechat_openid", 12345,
                 id="numeric wechat_openid"),
    pytest.param(decode_contact_event, CONTACT_EVENT, CUSTOMER_KEY, "state", "s" * 1025,
                 id="1025-char state"),
    # reporting rules
    pytest.param(decode_reporting_rule, RULE, RULE_KEY, "standard_type", "valid",
                 id="standard_type in lower case"),
    pytest.param(decode_reporting_rule, RULE, RULE_KEY, "standard_type", "PURCHASE",
                 id="unknown standard_type"),
    pytest.param(decode_reporting_rule, RULE, RULE_KEY, "effective_from", -1,
                 id="negative effective_from"),
    pytest.param(decode_reporting_rule, RULE, RULE_KEY, "effective_from", "1763800000000",
                 id="effective_from as string"),
    pytest.param(decode_reporting_rule, RULE, RULE_KEY, "version", "3", id="version as string"),
    pytest.param(decode_reporting_rule, RULE, RULE_KEY, "version", True, id="version as bool"),
    pytest.param(decode_reporting_rule, RULE, RULE_KEY, "version", None, id="null version"),
    pytest.param(decode_reporting_rule, RULE, RULE_KEY, "account_id", "2001", id="account_id as string"),
    pytest.param(decode_reporting_rule, RULE, RULE_KEY, "user_action_set_id", 1.5,
                 id="user_action_set_id as float"),
    pytest.param(decode_reporting_rule, RULE, RULE_KEY, "tag_name", 7, id="numeric tag_name"),
    pytest.param(decode_reporting_rule, RULE, RULE_KEY, "action_type", "", id="empty action_type"),
    pytest.param(decode_reporting_rule, RULE, RULE_KEY, "tag_id", LONG_ID, id="129-char tag_id"),
]


@pytest.mark.parametrize("decoder, body, key, name, bad", INVALID)
def test_invalid_field(decoder: Decoder, body: dict, key: bytes, name: str, bad: Any):
    assert_rejected(decoder(key, encode(with_(body, **{name: bad}))), INVALID_FIELD, name)


def test_first_bad_field_in_field_order_is_reported():
    body = with_(TAG_EVENT, op="delete", ts=-5)
    assert_rejected(decode_tag_event(CUSTOMER_KEY, encode(body)), INVALID_FIELD, "op")


# --- key_mismatch ---------------------------------------------------------------------------

@pytest.mark.parametrize("decoder, body, key", KINDS)
@pytest.mark.parametrize("wrong_key", [
    pytest.param(b"ww51a2:someone-else", id="other customer or tag"),
    pytest.param(b"wmKx01:ww51a2", id="parts swapped"),
    pytest.param(b"ww51a2", id="corp only"),
    pytest.param(b"", id="empty key"),
    pytest.param(b"ww51a2:\xff", id="non-UTF-8 key"),
])
def test_wrong_key_is_key_mismatch(decoder: Decoder, body: dict, key: bytes, wrong_key: bytes):
    rejection = assert_rejected(decoder(wrong_key, encode(body)), KEY_MISMATCH)
    assert key.decode() in rejection.detail  # says which key was expected


@pytest.mark.parametrize("decoder, body, key", KINDS)
def test_missing_key_is_key_mismatch(decoder: Decoder, body: dict, key: bytes):
    rejection = assert_rejected(decoder(None, encode(body)), KEY_MISMATCH)
    assert "no key" in rejection.detail


@pytest.mark.parametrize("decoder, body, shape", [
    pytest.param(decode_tag_event, TAG_EVENT, "corp_id:external_userid", id="tag_event"),
    pytest.param(decode_contact_event, CONTACT_EVENT, "corp_id:external_userid", id="contact_event"),
    pytest.param(decode_reporting_rule, RULE, "corp_id:tag_id", id="reporting_rule"),
])
def test_key_mismatch_detail_names_the_key_fields(decoder: Decoder, body: dict, shape: str):
    assert shape in assert_rejected(decoder(b"nope", encode(body)), KEY_MISMATCH).detail


def test_rule_under_a_customer_key_is_key_mismatch():
    assert_rejected(decode_reporting_rule(CUSTOMER_KEY, encode(RULE)), KEY_MISMATCH)


def test_body_errors_win_over_key_errors():
    assert_rejected(decode_tag_event(b"nope", encode(without(TAG_EVENT, "ts"))), MISSING_FIELD, "ts")


# --- Rejection.dead_letter ------------------------------------------------------------------

@pytest.mark.parametrize("key, value", [
    pytest.param(CUSTOMER_KEY, encode(with_(TAG_EVENT, ts=True)), id="invalid field"),
    pytest.param(CUSTOMER_KEY, b"\x00\xff\xfe binary \x80", id="binary value"),
    pytest.param(b"ww51a2:\xffwm", b"{\"a\": 1}", id="non-UTF-8 key"),
    pytest.param(None, encode(TAG_EVENT), id="no key"),
    pytest.param(CUSTOMER_KEY, padded_to(TAG_EVENT, MAX_RECORD_BYTES + 1), id="too large"),
])
def test_dead_letter_keeps_the_original_bytes(key: Optional[bytes], value: bytes):
    rejection = decode_tag_event(key, value)
    assert isinstance(rejection, Rejection)
    letter = rejection.dead_letter(topic="tagstream.tag-events", partition=3, offset=1842,
                                   key=key, value=value, at=1763884801000)
    assert letter == DeadLetter(
        error=rejection.error, detail=rejection.detail, topic="tagstream.tag-events",
        partition=3, offset=1842, key=letter.key, value_b64=letter.value_b64, at=1763884801000)
    assert base64.b64decode(letter.value_b64, validate=True) == value
    if key is None:
        assert letter.key is None
    else:
        assert letter.key == key.decode("utf-8", errors="backslashreplace")
    wire = letter.as_wire()
    assert json.loads(json.dumps(wire)) == wire  # plain JSON, ready for the dead-letter topic


def test_dead_letter_of_a_null_value_has_empty_value_b64():
    rejection = decode_tag_event(CUSTOMER_KEY, None)
    letter = rejection.dead_letter(topic="tagstream.tag-events", partition=None, offset=None,
                                   key=CUSTOMER_KEY, value=None, at=0)
    assert (letter.error, letter.value_b64, letter.key) == (NOT_JSON, "", "ww51a2:wmKx01")
