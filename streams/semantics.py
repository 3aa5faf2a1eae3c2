"""The reporting semantics of SPEC §4, as a pure function over per-customer state.

    state, result = apply_event(state, event, rule_as_of, policy, now_ms)

`apply_event` is the only place where tagstream decides whether a tag becomes a report.
It imports neither Faust nor Kafka: the agents in `agents/` decode records, call it, persist
the returned state in a changelogged table and send the returned reports. Property tests
and the reference model exercise this module directly.

Rules implemented here:
- rule 2, mapping: a tag add is looked up with `rule_as_of(corp_id, tag_id, ts)`;
- rule 3, once per customer and type: `CustomerState.reported`;
- rule 4, real-time types are emitted at once, mode "realtime";
- rule 7, identity: no identity -> unreportable, which does not count for rule 3;
- rule 9, tagging delay: event ts minus the customer's add time, on every report.
Not yet here (SPEC rules 1, 5, 6 and stream time): event-id dedupe, the ORDER window and
delayed holds for LONG_TERM/INVALID. Until they land, a delayed-type add is counted as
`delayed_pending` and reports nothing, rather than being reported with the wrong timing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import orjson

from schemas.records import (
    ADD_EXTERNAL_CONTACT, DEFAULT_CUSTOM_ACTIONS, REALTIME_TYPES, REASON_NO_USER_IDENTITY,
    ContactEvent, ConversionReport, ReportingRule, TagEvent, outer_action_id)

RuleAsOf = Callable[[str, str, int], Optional[ReportingRule]]
IDENTITY_FIELDS = ("wechat_app_id", "wechat_unionid", "wechat_openid", "click_id")

# What happened to an event; one per event, the label of tagstream_events_total.
REPORTED = "reported"
UNREPORTABLE = "unreportable"
UNMAPPED = "unmapped"
ALREADY_REPORTED = "already_reported"
DELAYED_PENDING = "delayed_pending"
TAG_REMOVED = "tag_removed"
CONTACT_APPLIED = "contact_applied"
EVENT_OUTCOMES = (REPORTED, UNREPORTABLE, UNMAPPED, ALREADY_REPORTED, DELAYED_PENDING,
                  TAG_REMOVED, CONTACT_APPLIED)


@dataclass(frozen=True)
class ReportingPolicy:
    """The settings the semantics depend on (a slice of `streams.settings.Settings`)."""
    default_action_types: dict[str, str]


@dataclass
class CustomerState:
    """Everything tagstream remembers about one customer of one corp."""
    #: staff userid -> earliest add_external_contact ts by that staff member
    add_times: dict[str, int] = field(default_factory=dict)
    #: newest non-null value of each identity field seen on the customer's contact events
    identity: dict[str, str] = field(default_factory=dict)
    #: standard types already reported for this customer (SPEC §4 rule 3)
    reported: list[str] = field(default_factory=list)

    def add_time_for(self, userid: str) -> Optional[int]:
        """The tagging staff member's add time, else the customer's earliest (SPEC §4 rule 5)."""
        if userid in self.add_times:
            return self.add_times[userid]
        return min(self.add_times.values()) if self.add_times else None

    def has_identity(self) -> bool:
        """SPEC §4 rule 7: app id plus unionid or openid, or a click id."""
        ident = self.identity
        return bool(("wechat_app_id" in ident and ("wechat_unionid" in ident or "wechat_openid" in ident))
                    or "click_id" in ident)

    def encode(self) -> bytes:
        return orjson.dumps({"a": self.add_times, "i": self.identity, "r": self.reported})

    @classmethod
    def decode(cls, payload: Optional[bytes]) -> "CustomerState":
        if payload is None:
            return cls()
        stored = orjson.loads(payload)
        return cls(add_times=stored["a"], identity=stored["i"], reported=stored["r"])


@dataclass(frozen=True)
class StepResult:
    outcome: str
    reports: tuple[ConversionReport, ...] = ()
    unreportable: tuple[ConversionReport, ...] = ()
    standard_type: Optional[str] = None


def apply_event(state: CustomerState, event: Union[TagEvent, ContactEvent], rule_as_of: RuleAsOf,
                policy: ReportingPolicy, now_ms: int) -> tuple[CustomerState, StepResult]:
    """Apply one valid event of one customer. The state is updated in place and returned."""
    if isinstance(event, ContactEvent):
        return _apply_contact(state, event)
    if event.op != "add":
        return state, StepResult(TAG_REMOVED)
    rule = rule_as_of(event.corp_id, event.tag_id, event.ts)
    if rule is None or rule.standard_type is None:
        return state, StepResult(UNMAPPED)
    standard_type = rule.standard_type
    if standard_type in state.reported:
        return state, StepResult(ALREADY_REPORTED, standard_type=standard_type)
    if standard_type not in REALTIME_TYPES:
        return state, StepResult(DELAYED_PENDING, standard_type=standard_type)
    report = build_report(state, event, rule, policy, mode="realtime", reason=None, now_ms=now_ms)
    if not state.has_identity():
        return state, StepResult(UNREPORTABLE, unreportable=(_unreportable(report),),
                                 standard_type=standard_type)
    state.reported.append(standard_type)
    return state, StepResult(REPORTED, reports=(report,), standard_type=standard_type)


def _apply_contact(state: CustomerState, event: ContactEvent) -> tuple[CustomerState, StepResult]:
    for name in IDENTITY_FIELDS:
        value = getattr(event, name)
        if value is not None:
            state.identity[name] = value
    if event.change_type == ADD_EXTERNAL_CONTACT:
        known = state.add_times.get(event.userid)
        if known is None or event.ts < known:
            state.add_times[event.userid] = event.ts
    return state, StepResult(CONTACT_APPLIED)


def build_report(state: CustomerState, event: TagEvent, rule: ReportingRule,
                 policy: ReportingPolicy, *, mode: str, reason: Optional[str],
                 now_ms: int) -> ConversionReport:
    standard_type = rule.standard_type
    assert standard_type is not None
    action_type = rule.action_type or policy.default_action_types[standard_type]
    custom_action = None
    if action_type == "CUSTOM":
        custom_action = DEFAULT_CUSTOM_ACTIONS.get(standard_type, standard_type)
    ident = state.identity
    add_time = state.add_time_for(event.userid)
    return ConversionReport(
        outer_action_id=outer_action_id(event.corp_id, event.external_userid, standard_type),
        account_id=rule.account_id, user_action_set_id=rule.user_action_set_id,
        action_type=action_type, custom_action=custom_action,
        action_time=event.ts // 1000,
        user_id={k: ident[k] for k in ("wechat_app_id", "wechat_unionid", "wechat_openid") if k in ident},
        trace={"click_id": ident["click_id"]} if "click_id" in ident else {},
        standard_type=standard_type, mode=mode, reason=reason,
        corp_id=event.corp_id, external_userid=event.external_userid, tag_id=event.tag_id,
        source_event_id=event.event_id, event_ts=event.ts, emitted_at=now_ms,
        tagging_delay_ms=None if add_time is None else event.ts - add_time)


def _unreportable(report: ConversionReport) -> ConversionReport:
    from dataclasses import replace
    return replace(report, reason=REASON_NO_USER_IDENTITY)
