"""`tagstream explain`, the pure part (SPEC §9): one customer's timeline, and why each
standard type was reported or not.

The customer's partition of both event topics, for the time range, goes through the
replay (`streams.replay.engine.Replay`): the worker's own merge and engine, the worker's
rule book. Every customer of the partition is applied, because stream time is the
partition's: another customer's event can release this customer's hold. `Explainer` is the
replay's observer and output; it keeps only this customer's steps and reports, and puts
into words why each step came out as it did (SPEC §4). At the end it lets go what a live
worker, idle at that moment, has let go (`idle_grace` past the deadline), so it shows what
the worker emitted, not what a replay's flush would.

**What it cannot see.** Nothing before `--from` is read. A type reported earlier, an
identity or add time learned earlier, or an event id seen earlier within the dedupe horizon
would change outcomes in the range; the explanation says so where it matters, and
`blind_spot` says it once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from schemas.records import DELAYED_TYPES, LONG_TERM, ORDER, STANDARD_TYPES, ContactEvent, customer_key
from streams.core import semantics as sem
from streams.core.rulebook import RuleBook
from streams.core.semantics import Event, ReportingPolicy, StepResult
from streams.replay.engine import Output, format_time


def _duration(ms: int) -> str:
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("min", 60_000), ("s", 1000)):
        if ms >= size and ms % size == 0 or unit == "s":
            return f"{ms / size:g} {unit}"
    return f"{ms} ms"


def _elapsed(ms: int) -> str:
    """A measured time span to the minute, for reading: `7 d 23 h 40 min`, `2 h`, `40 s`."""
    if ms < 60_000:
        return f"{ms // 1000} s"
    minutes = ms // 60_000
    parts = [(minutes // 1440, "d"), (minutes // 60 % 24, "h"), (minutes % 60, "min")]
    return " ".join(f"{n} {unit}" for n, unit in parts if n)


@dataclass
class Step:
    """One event of the customer, as the worker applied it."""
    ts: int
    event_id: str
    kind: str                         # "contact" or "tag"
    what: str                         # "add_external_contact", "add etQ7x", "remove etQ7x"
    rule: Optional[dict]              # the version the tag event met (tag events)
    outcome: str
    standard_type: Optional[str]
    reason: str
    reports: list[dict] = field(default_factory=list)      # reports this step emitted for the customer

    def as_dict(self) -> dict:
        return {"ts": self.ts, "time": format_time(self.ts), "event_id": self.event_id, "kind": self.kind,
                "what": self.what, "rule": self.rule, "outcome": self.outcome,
                "standard_type": self.standard_type, "reason": self.reason, "reports": self.reports}


@dataclass
class Explanation:
    customer: str
    partition: int
    from_ms: int
    to_ms: int
    steps: list[Step]
    released: list[dict]              # delayed reports let go by another customer's step or by idle time
    pending: list[dict]               # holds still running at the end
    unreportable: list[dict]
    why: dict[str, str]               # standard type -> why (not)
    blind_spot: str

    def reports(self) -> list[dict]:
        return [r for s in self.steps for r in s.reports] + self.released

    def as_dict(self) -> dict:
        return {"customer": self.customer, "partition": self.partition, "from": format_time(self.from_ms),
                "to": format_time(self.to_ms), "events": [s.as_dict() for s in self.steps],
                "released": self.released, "pending_holds": self.pending, "unreportable": self.unreportable,
                "why": self.why, "blind_spot": self.blind_spot}


class Explainer(Output):
    """The replay's observer and output for one customer (module docstring)."""

    def __init__(self, corp_id: str, external_userid: str, book: RuleBook, policy: ReportingPolicy,
                 from_ms: int, to_ms: int):
        self.key = customer_key(corp_id, external_userid)
        self.corp_id, self.external_userid = corp_id, external_userid
        self.book, self.policy = book, policy
        self.from_ms, self.to_ms = from_ms, to_ms
        self.partition = -1
        self.steps: list[Step] = []
        self.current: Optional[Step] = None      # the customer's step whose reports come next
        self.released: list[dict] = []
        self.unreportable_reports: list[dict] = []
        self.seen_ids: dict[str, int] = {}       # event id -> ts of its first application in range
        self.holds: dict[str, dict] = {}         # type -> the hold running: {since, deadline, tags, step}
        self.add_times: dict[str, int] = {}      # staff -> add time seen in range
        self.identity = False

    # -- the replay's observer -------------------------------------------------------------
    def observe(self, partition: int, event: Event, result: StepResult) -> None:
        if customer_key(event.corp_id, event.external_userid) != self.key:
            self.current = None
            return
        self.partition = partition
        step = self._step(event, result)
        self.steps.append(step)
        self.current = step

    # -- the replay's output ----------------------------------------------------------------
    def report(self, wire: dict) -> None:
        if (wire["corp_id"], wire["external_userid"]) != (self.corp_id, self.external_userid):
            return
        if wire["mode"] == "delayed":
            self.holds.pop(wire["standard_type"], None)
            self.released.append(wire)
        elif self.current is not None:
            self.current.reports.append(wire)

    def unreportable(self, wire: dict) -> None:
        if (wire["corp_id"], wire["external_userid"]) == (self.corp_id, self.external_userid):
            self.unreportable_reports.append(wire)
            self.holds.pop(wire["standard_type"], None)

    def dead_letter(self, record, rejection) -> None:
        pass                                   # the worker dead-lettered it too; not the customer's story

    # -- words ------------------------------------------------------------------------------
    def _step(self, event: Event, result: StepResult) -> Step:
        outcome, standard_type = result.outcome, result.standard_type
        if isinstance(event, ContactEvent):
            what, rule = event.change_type, None
            fields = [name for name in sem.IDENTITY_FIELDS if getattr(event, name) is not None]
            if outcome == sem.CONTACT_APPLIED:
                if event.change_type == sem.ADD_EXTERNAL_CONTACT:
                    self.add_times.setdefault(event.userid, event.ts)
                if any(name in fields for name in ("wechat_unionid", "wechat_openid")) and "wechat_app_id" in fields:
                    self.identity = True
                reason = (f"contact: {event.change_type} by staff {event.userid}"
                          + (f"; identity recorded ({', '.join(fields)})" if fields else "; no identity in it"))
            else:
                reason = self._duplicate(event)
            self.seen_ids.setdefault(event.event_id, event.ts)
            return Step(event.ts, event.event_id, "contact", what, rule, outcome, standard_type, reason)
        found = self.book.rule_as_of(event.corp_id, event.tag_id, event.ts)
        rule = found.as_wire() if found is not None else None
        what = f"{event.op} {event.tag_id}"
        reason = self._tag_reason(event, outcome, standard_type, found)
        self.seen_ids.setdefault(event.event_id, event.ts)
        return Step(event.ts, event.event_id, "tag", what, rule, outcome, standard_type, reason)

    def _duplicate(self, event: Event) -> str:
        first = self.seen_ids.get(event.event_id)
        where = f"first applied at {format_time(first)}" if first is not None else \
            f"first applied before this range ({format_time(self.from_ms)})"
        return (f"duplicate: event id {event.event_id} was {where}, within the dedupe horizon "
                f"({_duration(self.policy.dedupe_horizon)}); applied once")

    def _tag_reason(self, event, outcome: str, standard_type: Optional[str], rule) -> str:
        tag = event.tag_id
        if outcome == sem.DUPLICATE:
            return self._duplicate(event)
        if outcome == sem.UNMAPPED:
            if rule is None:
                return f"unmapped: tag {tag} had no rule at {format_time(event.ts)}"
            return (f"unmapped: rule version {rule.version} of tag {tag} (effective "
                    f"{format_time(rule.effective_from)}) maps it to no type")
        mapped = f"rule version {rule.version} maps tag {tag} to {rule.standard_type}" if rule else ""
        if outcome == sem.REPORTED:
            return f"reported: {mapped}; the first {standard_type} of this customer, sent at once"
        if outcome == sem.UNREPORTABLE:
            return (f"not reported: {mapped}, but the customer has no user identity (a wechat_unionid or "
                    f"wechat_openid with the app id) yet; it went to the unreportable topic")
        if outcome == sem.ALREADY_REPORTED:
            earlier = next((s for s in self.steps if s.standard_type == standard_type and s.outcome == sem.REPORTED), None)
            when = (f"by event {earlier.event_id} at {format_time(earlier.ts)}" if earlier else
                    f"before this range ({format_time(self.from_ms)}): widen --from to see when")
            return f"not reported again: {mapped}; {standard_type} was already reported {when} (once per type)"
        if outcome == sem.HELD:
            deadline = event.ts + self.policy.delay_hold
            self.holds[standard_type] = {"standard_type": standard_type, "since": event.ts, "deadline": deadline,
                                         "event_id": event.event_id}
            window = ""
            if rule and rule.standard_type == ORDER and standard_type == LONG_TERM:
                add = self.add_times.get(event.userid)
                window = (f"; the ORDER came {_elapsed(event.ts - add)} after the add time, past the "
                          f"{_duration(self.policy.order_window)} window, so it is LONG_TERM" if add is not None
                          else "; the ORDER came past the window after an add time before this range: LONG_TERM")
            return (f"held: {mapped}{window}; {standard_type} is reported at {format_time(deadline)} "
                    f"({_duration(self.policy.delay_hold)} later) unless every supporting tag is removed first")
        if outcome == sem.HOLD_JOINED:
            return f"joined the running {standard_type} hold: {mapped}; it now has one more supporting tag"
        if outcome == sem.CANCELLED:
            self.holds.pop(standard_type, None)
            return f"cancelled: removing tag {tag} left the held {standard_type} with no supporting tag"
        if outcome == sem.TAG_REMOVED:
            return f"removed tag {tag}: no running hold depended on it (a report already sent is never withdrawn)"
        return outcome

    # -- the end ------------------------------------------------------------------------------
    def explanation(self, partition: int, delivery: Optional[dict[str, dict]] = None) -> Explanation:
        """The timeline, with each report's delivery state (`delivery`: outer_action_id ->
        {"state", ...}; missing: not yet sent)."""
        delivery = delivery or {}
        for report in [r for s in self.steps for r in s.reports] + self.released:
            report["delivery"] = delivery.get(report["outer_action_id"], {"state": "not yet sent"})
        pending = [{**hold, "time": format_time(hold["deadline"])} for hold in self.holds.values()]
        return Explanation(f"{self.corp_id}:{self.external_userid}", partition if self.partition < 0 else self.partition,
                           self.from_ms, self.to_ms, self.steps, self.released, pending, self.unreportable_reports,
                           self._why(), self._blind_spot())

    def _blind_spot(self) -> str:
        return (f"Events before {format_time(self.from_ms)} were not read: a type reported earlier, an identity or "
                f"add time learned earlier, or an event id seen earlier (within {_duration(self.policy.dedupe_horizon)}) "
                "would change these outcomes. Widen --from to include them.")

    def _why(self) -> dict[str, str]:
        why: dict[str, str] = {}
        for standard_type in STANDARD_TYPES:
            steps = [s for s in self.steps if s.standard_type == standard_type]
            report = next((r for r in self.reports_in_order() if r["standard_type"] == standard_type), None)
            if report is not None:
                state = report.get("delivery", {}).get("state", "not yet sent")
                why[standard_type] = (f"reported ({report['mode']}) for tag {report['tag_id']} at "
                                      f"{format_time(report['event_ts'])}, event {report['source_event_id']}; "
                                      f"delivery: {state}")
            elif standard_type in self.holds:
                hold = self.holds[standard_type]
                why[standard_type] = f"held since {format_time(hold['since'])}; due at {format_time(hold['deadline'])}"
            elif any(r["standard_type"] == standard_type for r in self.unreportable_reports):
                why[standard_type] = "not reported: the customer had no user identity when it came (unreportable)"
            elif any(s.outcome == sem.CANCELLED for s in steps):
                cancel = next(s for s in steps if s.outcome == sem.CANCELLED)
                why[standard_type] = f"held, then cancelled at {format_time(cancel.ts)} ({cancel.what})"
            elif any(s.outcome == sem.ALREADY_REPORTED for s in steps):
                why[standard_type] = "reported before this range; not again (once per type)"
            elif standard_type in DELAYED_TYPES and any(s.outcome in (sem.HELD, sem.HOLD_JOINED) for s in steps):
                why[standard_type] = "held in this range; not released by the end of it"
            elif standard_type == ORDER and (late := [s for s in self.steps if s.standard_type == LONG_TERM
                                                      and (s.rule or {}).get("standard_type") == ORDER]):
                why[standard_type] = (f"{late[0].what} at {format_time(late[0].ts)} maps to ORDER, but came past the "
                                      f"{_duration(self.policy.order_window)} window after the add time, so it "
                                      "counts as LONG_TERM (see LONG_TERM)")
            else:
                unmapped = [s for s in self.steps if s.outcome == sem.UNMAPPED]
                why[standard_type] = "no tag mapped to it was added in this range" + (
                    f" ({len(unmapped)} tag(s) added with no mapping at the time)" if unmapped else "")
        return why

    def reports_in_order(self) -> list[dict]:
        return sorted([r for s in self.steps for r in s.reports] + self.released, key=lambda r: r["event_ts"])


def render(explanation: Explanation) -> str:
    """The timeline as text, ending with the why (not) paragraph."""
    e = explanation
    if not e.steps:
        return f"{e.customer}: no events between {format_time(e.from_ms)} and {format_time(e.to_ms)} (partition {e.partition})"
    lines = [f"{e.customer} (partition {e.partition}), {format_time(e.from_ms)} to {format_time(e.to_ms)}: "
             f"{len(e.steps)} events"]
    for s in e.steps:
        rule = f" [rule v{s.rule['version']}]" if s.rule else ""
        lines.append(f"  {format_time(s.ts)}  {s.what:<28}{rule}  {s.outcome}")
        lines.append(f"      {s.reason}")
        for r in s.reports:
            lines.append(f"      -> {r['standard_type']} {r['mode']} {r['outer_action_id'][:12]}…  "
                         f"delivery: {_delivery(r)}")
    for r in e.released:
        lines.append(f"  released {r['standard_type']} (held since event {r['source_event_id']}) "
                     f"{r['outer_action_id'][:12]}…  delivery: {_delivery(r)}")
    for hold in e.pending:
        lines.append(f"  still held: {hold['standard_type']}, due {hold['time']}")
    lines.append("")
    lines.append("Why (not): " + " ".join(f"{t}: {w}." for t, w in e.why.items()))
    lines.append(e.blind_spot)
    return "\n".join(lines)


def _delivery(report: dict[str, Any]) -> str:
    d = report.get("delivery") or {}
    return d.get("state", "not yet sent") + (f" ({d['answer']})" if d.get("answer") else "")
