"""The JSON Schema files in `schemas/json/` agree with the code that reads and writes the wire.

- every schema is a valid draft 2020-12 schema;
- for inputs, `schemas.validation` accepts a record iff its schema does (property test over
  near-valid records; the key always matches and records stay under 64 KiB, since the key
  check and the size limit are not the schema's business);
- reports built by `streams.core.semantics` (run_log) and dead letters built by `Rejection.dead_letter`
  validate against theirs.
"""
from __future__ import annotations

import base64
import json
from typing import Any, Callable, Iterable

import orjson
import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from schemas.json_schemas import SCHEMA_NAMES, load_schema
from schemas.records import (
    CONTACT_CHANGE_TYPES, DEAD_LETTER_CODES, DEFAULT_ACTION_TYPES, INVALID_FIELD, MAX_RECORD_BYTES,
    MISSING_FIELD, STANDARD_TYPES, TAG_OPS, ContactEvent, ConversionReport, DeadLetter,
    ReportingRule, TagEvent)
from schemas.validation import (
    CONTACT_EVENT_FIELDS, REPORTING_RULE_FIELDS, TAG_EVENT_FIELDS, Rejection,
    decode_contact_event, decode_conversion_report, decode_reporting_rule, decode_tag_event)
from streams.core.semantics import ReportingPolicy, run_log

VALIDATORS = {name: Draft202012Validator(load_schema(name)) for name in SCHEMA_NAMES}


# --- (a) the files themselves -------------------------------------------------------------

@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_schema_file_is_a_valid_draft_2020_12_schema(name: str):
    schema = load_schema(name)
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_schema_examples_validate(name: str):
    schema = load_schema(name)
    assert schema["examples"]
    for example in schema["examples"]:
        VALIDATORS[name].validate(example)


def test_load_schema_rejects_unknown_names_and_returns_fresh_dicts():
    with pytest.raises(ValueError):
        load_schema("tag_events")
    load_schema("tag_event")["title"] = "changed"
    assert load_schema("tag_event")["title"] == "Tag event"


@pytest.mark.parametrize("name, fields", [
    ("tag_event", TAG_EVENT_FIELDS), ("contact_event", CONTACT_EVENT_FIELDS),
    ("reporting_rule", REPORTING_RULE_FIELDS)])
def test_input_schema_lists_the_same_fields_as_validation(name: str, fields):
    schema = load_schema(name)
    assert set(schema["properties"]) == {f[0] for f in fields}
    assert set(schema["required"]) == {f[0] for f in fields if f[2]}
    assert schema["additionalProperties"] is True


# --- (b) decode accepts iff the schema accepts ---------------------------------------------

IDENTIFIER = st.text(min_size=1, max_size=128)
TEXT = st.text(max_size=40) | st.sampled_from(["", "s" * 1024, "名" * 1024])
EPOCH_MS = st.integers(min_value=0, max_value=2**64 - 1)
INTEGER = st.integers(min_value=-2**63, max_value=2**64 - 1)


def nullable(strategy: st.SearchStrategy) -> st.SearchStrategy:
    return st.none() | strategy


VALID_TAG_EVENTS = st.fixed_dictionaries(
    {"event_id": IDENTIFIER, "corp_id": IDENTIFIER, "external_userid": IDENTIFIER,
     "userid": IDENTIFIER, "tag_id": IDENTIFIER, "op": st.sampled_from(TAG_OPS), "ts": EPOCH_MS},
    optional={"source": nullable(TEXT)})
VALID_CONTACT_EVENTS = st.fixed_dictionaries(
    {"event_id": IDENTIFIER, "corp_id": IDENTIFIER, "external_userid": IDENTIFIER,
     "userid": IDENTIFIER, "change_type": st.sampled_from(CONTACT_CHANGE_TYPES), "ts": EPOCH_MS},
    optional={"state": nullable(TEXT), "wechat_app_id": nullable(IDENTIFIER),
              "wechat_unionid": nullable(IDENTIFIER), "wechat_openid": nullable(IDENTIFIER),
              "click_id": nullable(IDENTIFIER)})
MAPPED_RULES = st.fixed_dictionaries(
    {"corp_id": IDENTIFIER, "tag_id": IDENTIFIER, "standard_type": st.sampled_from(STANDARD_TYPES),
     "effective_from": EPOCH_MS, "version": INTEGER, "account_id": INTEGER,
     "user_action_set_id": INTEGER},
    optional={"tag_name": nullable(TEXT), "action_type": nullable(IDENTIFIER)})
UNMAPPED_RULES = st.fixed_dictionaries(
    {"corp_id": IDENTIFIER, "tag_id": IDENTIFIER, "standard_type": st.none(),
     "effective_from": EPOCH_MS, "version": INTEGER},
    optional={"tag_name": nullable(TEXT), "action_type": nullable(IDENTIFIER),
              "account_id": nullable(INTEGER), "user_action_set_id": nullable(INTEGER)})
VALID_RULES = MAPPED_RULES | UNMAPPED_RULES

ENUM_LOOKALIKES = [*TAG_OPS, *CONTACT_CHANGE_TYPES, *STANDARD_TYPES, "ADD", "Remove", "valid",
                   "Long_Term", "add_contact", ""]
# What each field is, in SPEC §3 terms (kept here, not read from validation.py, so that the
# test does not share the decoder's mistakes).
FIELD_KINDS = {
    **dict.fromkeys(["event_id", "corp_id", "external_userid", "userid", "tag_id", "wechat_app_id",
                     "wechat_unionid", "wechat_openid", "click_id", "action_type"], "identifier"),
    **dict.fromkeys(["source", "state", "tag_name"], "text"),
    **dict.fromkeys(["ts", "effective_from"], "epoch_ms"),
    **dict.fromkeys(["version", "account_id", "user_action_set_id"], "integer"),
    **dict.fromkeys(["op", "change_type", "standard_type"], "enum"),
}
SMILE = "\U0001F600"  # one character, four UTF-8 bytes, two UTF-16 units
# Values just inside and just outside each kind's limits. Lengths are in characters, also
# with non-BMP ones; integers sit at the edges of what orjson decodes as integers.
EDGE_VALUES = {
    "identifier": ["", "x", "x" * 128, "x" * 129, SMILE * 128, SMILE * 129, " ", "a:b"],
    "text": ["", "x" * 1024, "x" * 1025, SMILE * 1024, SMILE * 1025],
    "epoch_ms": [0, -1, 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30, True, False, 0.5, "0"],
    "integer": [0, -1, -2**63, -2**63 - 1, 2**63, 2**64 - 1, 2**64, -10**30, True, 2.5, "3"],
    "enum": ENUM_LOOKALIKES,
}
# Values a wrong producer might put in any field. Integral floats (1.0, 1e3) are left out on
# purpose: JSON Schema counts them as integers and validation.py does not (see
# test_known_gap_integral_floats).
WRONG_VALUES = st.one_of(
    st.booleans(),
    st.integers(),
    st.floats(min_value=-1e12, max_value=1e12).map(lambda x: x + 0.5 if x.is_integer() else x),
    st.text(max_size=4),
    st.lists(st.integers() | st.text(max_size=3), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
DROP = object()  # mutation marker: remove the field


@st.composite
def mutations(draw, names: list[str]):
    """One change to one field: drop it, null it, or give it an edge or a wrong value."""
    name = draw(st.sampled_from(names))
    how = draw(st.sampled_from(["drop", "null", "edge", "edge", "wrong"]))
    if how == "drop":
        return name, DROP
    if how == "null":
        return name, None
    if how == "edge":
        return name, draw(st.sampled_from(EDGE_VALUES[FIELD_KINDS[name]]))
    return name, draw(WRONG_VALUES)


def near_valid(valid: st.SearchStrategy, fields: Iterable[str]) -> st.SearchStrategy:
    """Valid records with 0-3 fields dropped, nulled or replaced, plus unknown fields."""
    names = sorted(fields)
    unknown = st.dictionaries(st.text(max_size=8).filter(lambda k: k not in names),
                              st.none() | WRONG_VALUES, max_size=2)

    @st.composite
    def build(draw):
        body = dict(draw(valid))
        for name, value in draw(st.lists(mutations(names), max_size=3)):
            if value is DROP:
                body.pop(name, None)
            else:
                body[name] = value
        body.update(draw(unknown))
        return body
    return build()


def matching_key(body: dict, *parts: str) -> bytes:
    """The key validation.py expects, when the body has usable parts; any key otherwise
    (the body is then rejected before its key is looked at)."""
    values = [body.get(part) for part in parts]
    if all(type(v) is str for v in values):
        return ":".join(values).encode("utf-8")
    return b"irrelevant"


def implicated_fields(errors: Iterable[ValidationError]) -> set[str]:
    """Top-level fields a set of schema errors points at."""
    found: set[str] = set()
    for error in errors:
        if error.validator == "required" and isinstance(error.instance, dict):
            found.update(n for n in error.validator_value if n not in error.instance)
        elif error.absolute_path:
            found.add(str(error.absolute_path[0]))
        found |= implicated_fields(error.context or ())
    return found


INPUT_KINDS = {
    "tag_event": (VALID_TAG_EVENTS, TAG_EVENT_FIELDS, decode_tag_event,
                  ("corp_id", "external_userid"), TagEvent),
    "contact_event": (VALID_CONTACT_EVENTS, CONTACT_EVENT_FIELDS, decode_contact_event,
                      ("corp_id", "external_userid"), ContactEvent),
    "reporting_rule": (VALID_RULES, REPORTING_RULE_FIELDS, decode_reporting_rule,
                       ("corp_id", "tag_id"), ReportingRule),
}


@pytest.mark.parametrize("name", INPUT_KINDS)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_decode_accepts_exactly_what_the_schema_accepts(name: str, data: st.DataObject):
    valid, fields, decode, key_parts, record_type = INPUT_KINDS[name]
    body = data.draw(near_valid(valid, [f[0] for f in fields]), label="body")
    value = json.dumps(body, ensure_ascii=False).encode("utf-8")
    if len(value) > MAX_RECORD_BYTES:  # too_large is not the schema's business
        return
    document = json.loads(value)  # what any JSON reader sees on the wire
    decoded = decode(matching_key(body, *key_parts), value)
    errors = list(VALIDATORS[name].iter_errors(document))
    note(f"decoded: {decoded!r}")
    note(f"schema errors: {[e.message for e in errors]}")
    if isinstance(decoded, Rejection):
        event(f"rejected: {decoded.error}")
        assert errors, f"validation.py rejects ({decoded}) what the schema accepts"
        assert decoded.error in (MISSING_FIELD, INVALID_FIELD), decoded
        field = decoded.detail.split(":", 1)[0]
        assert field in implicated_fields(errors), (field, [e.message for e in errors])
    else:
        event("accepted")
        assert not errors, f"the schema rejects what validation.py accepts: {errors[0].message}"
        assert type(decoded) is record_type


# Fixed valid records for the exhaustive single-change check below.
BASES = {
    "tag_event": [{"event_id": "e-9f1c", "corp_id": "ww51a2", "external_userid": "wmKx01",
                   "userid": "zhangsan", "tag_id": "etQ7x", "op": "add", "ts": 1763884800123,
                   "source": "wecom_sidebar"}],
    "contact_event": [{"event_id": "c-77a0", "corp_id": "ww51a2", "external_userid": "wmKx01",
                       "userid": "zhangsan", "change_type": "add_external_contact",
                       "ts": 1763884700000, "state": "ad_318", "wechat_app_id": "wx7d21",
                       "wechat_unionid": "oU-3kd", "wechat_openid": None, "click_id": "clk_81"}],
    "reporting_rule": [
        {"corp_id": "ww51a2", "tag_id": "etQ7x", "tag_name": "核心", "standard_type": "VALID",
         "account_id": 2001, "user_action_set_id": 11001, "effective_from": 1763800000000,
         "version": 3, "action_type": None},
        {"corp_id": "ww51a2", "tag_id": "etQ7x", "standard_type": None,
         "effective_from": 1763900000000, "version": 4}],
}
NON_INTEGRAL_WRONG_VALUES = [None, True, False, 7, -7, 0.5, "", "7", [], ["x"], {}, {"a": 1}]


def single_changes(body: dict, names: list[str]) -> Iterable[tuple[str, dict]]:
    for name in names:
        yield f"drop {name}", {k: v for k, v in body.items() if k != name}
        for value in [*EDGE_VALUES[FIELD_KINDS[name]], *NON_INTEGRAL_WRONG_VALUES]:
            yield f"{name}={value!r:.40}", {**body, name: value}


@pytest.mark.parametrize("name", INPUT_KINDS)
def test_every_single_field_change_is_judged_alike(name: str):
    """Every field of a valid record, dropped or set to each edge and wrong value in turn:
    the boundaries the random test above only samples, checked one by one."""
    _, fields, decode, key_parts, _ = INPUT_KINDS[name]
    disagreements = []
    checked = 0
    for base in BASES[name]:
        for change, body in single_changes(base, [f[0] for f in fields]):
            value = json.dumps(body, ensure_ascii=False).encode("utf-8")
            decoded = decode(matching_key(body, *key_parts), value)
            schema_ok = VALIDATORS[name].is_valid(json.loads(value))
            checked += 1
            if isinstance(decoded, Rejection) == schema_ok:
                disagreements.append(f"{change}: decode -> {decoded!r}, schema ok: {schema_ok}")
    assert checked > 100
    assert not disagreements, "\n".join(disagreements)


@pytest.mark.parametrize("name, body", [
    ("tag_event", {"event_id": "e", "corp_id": "c", "external_userid": "u", "userid": "s",
                   "tag_id": "t", "op": "add", "ts": 1.0}),
    ("reporting_rule", {"corp_id": "c", "tag_id": "t", "standard_type": None,
                        "effective_from": 0, "version": 3.0}),
])
def test_known_gap_integral_floats(name: str, body: dict):
    """JSON Schema's `integer` matches any number with a zero fraction (1.0, 1e3); validation.py
    reads `1.0` as a float and rejects it. No JSON Schema keyword can tell 1 from 1.0, so
    this is the one place where the schema is more lenient than the decoder."""
    _, _, decode, key_parts, _ = INPUT_KINDS[name]
    value = json.dumps(body).encode()
    assert VALIDATORS[name].is_valid(json.loads(value))
    rejection = decode(matching_key(body, *key_parts), value)
    assert isinstance(rejection, Rejection) and rejection.error == INVALID_FIELD


# --- (c) what tagstream writes validates ----------------------------------------------------

POLICY = ReportingPolicy(default_action_types=dict(DEFAULT_ACTION_TYPES))
T0 = 1_763_884_800_000
DAY = 86_400_000
STAFF = st.sampled_from(["zhangsan", "lisi", "wangwu"])
TAG_IDS = ["t0", "t1", "t2", "t3"]
# No ':' in corp ids here: the engine splits the customer key `corp_id:external_userid` at
# its first ':' to rebuild corp_id and external_userid, so a corp id holding one comes back
# wrong (reported separately; SPEC §2's key format cannot tell the two apart either).
CORP_IDS = st.text(min_size=1, max_size=128).filter(lambda s: ":" not in s)


@st.composite
def customer_histories(draw):
    """A corp's rules for a few tags, and one customer's contact and tag events over ~10 days
    (so that ORDER windows, delayed holds, cancellations and missing identities all occur)."""
    corp_id, external_userid = draw(CORP_IDS), draw(IDENTIFIER)
    rules = {}
    for tag_id in TAG_IDS:
        rules[tag_id] = ReportingRule(
            corp_id=corp_id, tag_id=tag_id,
            standard_type=draw(st.none() | st.sampled_from(STANDARD_TYPES)), effective_from=0,
            version=draw(INTEGER), account_id=draw(INTEGER), user_action_set_id=draw(INTEGER),
            action_type=draw(st.none() | st.just("CUSTOM") | IDENTIFIER))
    events: list[Any] = []
    for i in range(draw(st.integers(0, 10))):
        ts = T0 + draw(st.integers(min_value=-DAY, max_value=10 * DAY))
        if draw(st.booleans()):
            events.append(ContactEvent(
                event_id=f"c-{i}", corp_id=corp_id, external_userid=external_userid,
                userid=draw(STAFF), change_type=draw(st.sampled_from(CONTACT_CHANGE_TYPES)), ts=ts,
                wechat_app_id=draw(st.none() | IDENTIFIER), wechat_unionid=draw(st.none() | IDENTIFIER),
                wechat_openid=draw(st.none() | IDENTIFIER), click_id=draw(st.none() | IDENTIFIER)))
        else:
            events.append(TagEvent(
                event_id=f"e-{i}", corp_id=corp_id, external_userid=external_userid,
                userid=draw(STAFF), tag_id=draw(st.sampled_from(TAG_IDS)),
                op=draw(st.sampled_from(TAG_OPS)), ts=ts))
    return rules, events


@settings(max_examples=300, deadline=None)
@given(customer_histories(), st.integers(min_value=0, max_value=2**53))
def test_reports_from_the_engine_validate(history, now_ms: int):
    rules, events = history
    reports, unreportable = run_log([(0, e) for e in events],
                                    lambda corp, tag, ts: rules.get(tag), POLICY, now_ms)
    for report in (*reports, *unreportable):
        event(f"{report.standard_type} {report.mode} {report.reason}")
        VALIDATORS["conversion_report"].validate(report.as_wire())
        # and the sink's decoder takes it as it is
        assert decode_conversion_report(report.outer_action_id.encode(), orjson.dumps(report.as_wire())) \
            == report.as_wire()


def sample_report(**changes: Any) -> dict:
    """The SPEC §3.4 example, as the engine builds it."""
    rule = ReportingRule(corp_id="ww51a2", tag_id="etQ7x", standard_type="VALID", account_id=2001,
                         user_action_set_id=11001, effective_from=0, version=1)
    contact = ContactEvent(event_id="c-77a0", corp_id="ww51a2", external_userid="wmKx01",
                           userid="zhangsan", change_type="add_external_contact",
                           ts=1763884700000, wechat_app_id="wx7d21", wechat_unionid="oU-3kd",
                           click_id="clk_81")
    tag = TagEvent(event_id="e-9f1c", corp_id="ww51a2", external_userid="wmKx01",
                   userid="zhangsan", tag_id="etQ7x", op="add", ts=1763884800123)
    reports, _ = run_log([(0, contact), (0, tag)], lambda *_: rule, POLICY, 1763884800410)
    assert len(reports) == 1
    return {**reports[0].as_wire(), **changes}


def test_report_schema_lists_exactly_the_wire_fields():
    schema = load_schema("conversion_report")
    wire = sample_report()
    VALIDATORS["conversion_report"].validate(wire)
    assert set(schema["properties"]) == set(schema["required"]) == set(wire)
    assert set(wire) == {f for f in ConversionReport.__dataclass_fields__ if f != "tagging_delay_ms"}


#: Reports the schema and the sink's decoder both refuse.
MALFORMED_REPORTS = [
    pytest.param({"outer_action_id": "3F9A" + "0" * 60}, id="upper-case hex"),
    pytest.param({"outer_action_id": "0" * 63}, id="63 hex chars"),
    pytest.param({"mode": "live"}, id="unknown mode"),
    pytest.param({"standard_type": "PURCHASE"}, id="unknown standard type"),
    pytest.param({"user_id": {"wechat_app_id": 7}}, id="non-string identity"),
    pytest.param({"trace": ["clk_81"]}, id="trace as list"),
    pytest.param({"custom_action": "LONG_TERM_CONVERSION"}, id="custom_action without CUSTOM"),
    pytest.param({"action_type": "CUSTOM"}, id="CUSTOM without custom_action"),
    pytest.param({"reason": 3}, id="numeric reason"),
    pytest.param({"event_ts": -1}, id="negative event_ts"),
    pytest.param({"account_id": None}, id="null account"),
]


@pytest.mark.parametrize("changes", [
    *MALFORMED_REPORTS,
    # the schema is strict to catch drift from as_wire(); readers ignore unknown fields
    pytest.param({"tagging_delay_ms": 5}, id="field not on the wire"),
])
def test_report_schema_rejects_malformed_reports(changes: dict):
    assert not VALIDATORS["conversion_report"].is_valid(sample_report(**changes))


@pytest.mark.parametrize("changes", MALFORMED_REPORTS)
def test_the_sinks_decoder_refuses_what_the_schema_refuses(changes: dict):
    report = sample_report(**changes)
    key = report["outer_action_id"].encode() if isinstance(report["outer_action_id"], str) else b"k"
    assert isinstance(decode_conversion_report(key, orjson.dumps(report)), Rejection)


def test_the_sinks_decoder_refuses_a_report_under_another_key_and_ignores_unknown_fields():
    report = sample_report()
    key = report["outer_action_id"].encode()
    assert decode_conversion_report(b"ww51a2:wmKx01", orjson.dumps(report)).error == "key_mismatch"
    assert decode_conversion_report(key, orjson.dumps({**report, "note": "from a newer writer"})) == report
    assert decode_conversion_report(key, None).error == "not_json"


@settings(max_examples=500, deadline=None)
@given(key=st.none() | st.binary(max_size=70),
       value=st.none() | st.binary(max_size=300) | st.builds(
           lambda report, drop: orjson.dumps({k: v for k, v in report.items() if k != drop}),
           st.just(None).map(lambda _: sample_report()), st.sampled_from([None, "outer_action_id", "trace", "mode"])))
def test_the_sinks_decoder_takes_any_bytes(key, value):
    decoded = decode_conversion_report(key, value)
    assert isinstance(decoded, (dict, Rejection))
    if isinstance(decoded, Rejection):
        assert decoded.error in DEAD_LETTER_CODES and decoded.detail


def test_report_schema_rejects_a_missing_field():
    report = sample_report()
    del report["emitted_at"]
    assert not VALIDATORS["conversion_report"].is_valid(report)


DECODERS = [decode_tag_event, decode_contact_event, decode_reporting_rule]


@settings(max_examples=300, deadline=None)
@given(decoder=st.sampled_from(DECODERS),
       key=st.none() | st.binary(max_size=40),
       value=st.none() | st.binary(max_size=80) | near_valid(VALID_TAG_EVENTS, [
           f[0] for f in TAG_EVENT_FIELDS]).map(lambda b: json.dumps(b).encode()),
       topic=st.sampled_from(["tagstream.tag-events", "tagstream.contact-events",
                              "tagstream.tag-mappings"]),
       partition=st.none() | st.integers(min_value=0, max_value=2**31 - 1),
       offset=st.none() | st.integers(min_value=0, max_value=2**63 - 1),
       at=st.integers(min_value=0, max_value=2**53))
def test_dead_letters_validate(decoder: Callable, key, value, topic, partition, offset, at):
    result = decoder(key, value)
    if not isinstance(result, Rejection):
        return
    event(result.error)
    letter = result.dead_letter(topic=topic, partition=partition, offset=offset, key=key,
                                value=value, at=at)
    wire = letter.as_wire()
    VALIDATORS["dead_letter"].validate(wire)
    assert base64.b64decode(wire["value_b64"], validate=True) == (value or b"")


def test_dead_letter_schema_lists_exactly_the_wire_fields_and_codes():
    schema = load_schema("dead_letter")
    letter = DeadLetter(error="not_json", detail="", topic="t", partition=None, offset=None,
                        key=None, value_b64="", at=0)
    assert set(schema["properties"]) == set(schema["required"]) == set(letter.as_wire())
    assert schema["properties"]["error"]["enum"] == list(DEAD_LETTER_CODES)


@pytest.mark.parametrize("changes", [
    pytest.param({"error": "bad_record"}, id="unknown code"),
    pytest.param({"value_b64": "not base64!"}, id="value_b64 not base64"),
    pytest.param({"partition": -1}, id="negative partition"),
    pytest.param({"key": 5}, id="numeric key"),
])
def test_dead_letter_schema_rejects_malformed_letters(changes: dict):
    wire = {"error": "invalid_field", "detail": "ts: expected integer",
            "topic": "tagstream.tag-events", "partition": 3, "offset": 1842, "key": "ww51a2:wmKx01",
            "value_b64": "eyJ0cyI6dHJ1ZX0=", "at": 1763884801000}
    assert VALIDATORS["dead_letter"].is_valid(wire)
    assert not VALIDATORS["dead_letter"].is_valid({**wire, **changes})
