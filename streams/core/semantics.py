"""The reporting semantics of SPEC §4, as plain Python: customer state, partition clocks,
and the functions that move them forward.

    engine = ReportingEngine(store, rule_as_of, policy)
    result = engine.on_event(partition, event, now_ms)     # one valid event
    result = engine.on_idle(partition, wall_ms, now_ms)    # live mode: idle-grace releases
    result = engine.flush(partition, now_ms)               # end of a replay: resolve every hold

This module is the only place where tagstream decides whether a tag becomes a report. It
imports neither Faust nor Kafka. State lives behind the small `StateStore` interface: the
worker backs it with changelogged Faust tables, replay and the tests with dicts. Outputs are
returned, never sent: the agents in `agents/` send them.

How time works (SPEC §4): each partition number has a stream time, the greatest `ts` of the
events seen on it. An event first advances stream time, which releases every hold due at or
before it (in deadline, customer, type order), then is applied. Holds are indexed by
deadline in buckets per partition, so releasing never scans all customers.

How event ids are remembered (rule 1), at a cost per event that does not grow with the
customer's history (issue 18: one customer tagged 100,000 times in a week must not slow its
partition). A customer's first `INLINE_IDS` unexpired ids live inside its record (`seen`),
which is where a typical customer's dozen ids stay: one record, one read, one write. Past
that, an applied event's id is kept under its own key, (customer, event_id) -> ts, so the
customer record stays bounded however many events came before, and so does the work of
reading and writing it. Each id under its own key also gets an entry in its partition's
*remembered-id queue*, numbered in the order applied (`seen_head` .. `seen_next` in the
`PartitionClock`), so forgetting is a walk from the head, never a scan.

- An event is a duplicate iff its id is remembered for its customer, inline or under its own
  key, with `ts >= stream_time - dedupe_horizon`. The comparison, not the deletion, decides,
  so the rule is exact whatever the deletion lags: no cap forgets an id early (a full inline
  set sends the next id to its own key; it never drops one).
- Inline ids past the horizon are dropped whenever the customer remembers a new id, so the
  inline set never holds more than `INLINE_IDS` (a record written before issue 18, with
  every id inline, moves the excess to own keys on the customer's next new id).
- Forgetting own keys is lazy and bounded: each event forgets at most `FORGET_PER_EVENT`
  head entries whose `ts` is below the horizon. An event adds at most one entry, so the
  queue keeps up, and a jump of stream time (a quiet week) is paid off a few entries per
  event, not in one step.
- An entry forgets its id only if the id still holds the entry's `ts`: an id re-applied after
  its horizon has a newer remembrance of its own.
- Entries are forgotten in arrival order, so an id can outlive its horizon while an entry ahead
  of it has not expired. Every entry ahead arrived earlier, with a `ts` at most the stream time
  then, so an id is kept at most `dedupe_horizon` past the stream time it arrived at (plus the
  lazy backlog): the state stays bounded by the ids of one horizon.

Which events never touch the customer (issue 24). A tag `add` whose rule as of its `ts` is
absent or null (rule 2: unmapped) is decided from the event and the rule book alone: it
advances stream time and releases what is due, like every event, and then it is counted
`unmapped` and done. The customer record is not read or written and its id is not
remembered. This gives the same reports as applying it, because applying an unmapped add
changes nothing but the remembered ids: it makes no report, marks no type reported (rule 3),
starts or joins no hold, and adds no tag to a hold's support, so no later remove finds it
there (rule 6); add times and identity come from contact events only (rules 5 and 7). Its id
would only matter to a later event with the same id for the same customer, and that is a
redelivery of the same add: the same tag and `ts`, so the same rule, so unmapped again, with
no effect either way. The outcome of such a redelivery is `unmapped` where it used to be
`duplicate`. Two cases are not covered by that argument, and there the fast path
applies the later event where strict rule 1 would ignore it:
- an upstream that reuses an id for a different event of the same customer, and
- a rule published between the two deliveries that maps the tag retroactively (its
  `effective_from` at or before the event's `ts`). Then the redelivery is reported, which is
  what a replay under the current rules would report.

The reference model (tests/reference_model.py) states the same rule, and the property tests
and seeded logs hold the engine to it.
"""
from __future__ import annotations

from bisect import bisect_right, insort
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Optional, Protocol, Union

import orjson

from schemas.records import (
    ADD_EXTERNAL_CONTACT, DEFAULT_CUSTOM_ACTIONS, DELAYED_TYPES, LONG_TERM, ORDER,
    REASON_ADD_TIME_UNKNOWN, REASON_NO_USER_IDENTITY, REASON_ORDER_AFTER_WINDOW, REALTIME_TYPES,
    ContactEvent, ConversionReport, ReportingRule, TagEvent, customer_key, outer_action_id)

RuleAsOf = Callable[[str, str, int], Optional[ReportingRule]]
Event = Union[TagEvent, ContactEvent]
IDENTITY_FIELDS = ("wechat_app_id", "wechat_unionid", "wechat_openid", "click_id")
USER_ID_FIELDS = ("wechat_app_id", "wechat_unionid", "wechat_openid")

# What happened to an event: one per event, the `outcome` label of tagstream_events_total.
REPORTED = "reported"
UNREPORTABLE = "unreportable"
UNMAPPED = "unmapped"
ALREADY_REPORTED = "already_reported"
HELD = "held"                  # started a delayed hold
HOLD_JOINED = "hold_joined"    # another supporting tag for a hold already running
CANCELLED = "cancelled"        # a remove that cancelled a hold
TAG_REMOVED = "tag_removed"    # a remove that cancelled nothing
CONTACT_APPLIED = "contact_applied"
DUPLICATE = "duplicate"
EVENT_OUTCOMES = (REPORTED, UNREPORTABLE, UNMAPPED, ALREADY_REPORTED, HELD, HOLD_JOINED,
                  CANCELLED, TAG_REMOVED, CONTACT_APPLIED, DUPLICATE)

#: How many expired ids one event may forget (module docstring: forgetting is lazy).
FORGET_PER_EVENT = 4
#: How many unexpired ids a customer record keeps inline before new ids go to their own keys.
INLINE_IDS = 16

#: Width of one deadline bucket of the hold index. Small enough that a bucket holds few
#: entries, large enough that a 30-minute hold spans only 30 of them.
HOLD_BUCKET_MS = 60_000


@dataclass(frozen=True)
class ReportingPolicy:
    """The settings the semantics depend on (a slice of `streams.settings.Settings`)."""
    default_action_types: dict[str, str]
    order_window: int = 7 * 86_400_000
    delay_hold: int = 30 * 60_000
    idle_grace: int = 5 * 60_000
    dedupe_horizon: int = 7 * 86_400_000

    @classmethod
    def from_settings(cls, settings) -> "ReportingPolicy":
        return cls(default_action_types=settings.default_action_types,
                   order_window=settings.order_window, delay_hold=settings.delay_hold,
                   idle_grace=settings.idle_grace, dedupe_horizon=settings.dedupe_horizon)


# -- state ------------------------------------------------------------------------------

@dataclass
class Hold:
    """A delayed report waiting for its deadline (SPEC §4 rule 6)."""
    standard_type: str
    deadline: int
    event: dict            # the first supporting add: event_id, tag_id, userid, ts
    rule: dict             # the rule that add used (account, action set, action type)
    reason: Optional[str]
    support: list[str]     # tag ids whose removal would cancel the hold
    add_time: Optional[int]

    def encode(self) -> list:
        return [self.standard_type, self.deadline, self.event, self.rule, self.reason,
                self.support, self.add_time]

    @classmethod
    def decode(cls, fields: list) -> "Hold":
        return cls(*fields)


@dataclass
class CustomerState:
    """Everything tagstream remembers about one customer of one corp."""
    #: staff userid -> earliest add_external_contact ts by that staff member
    add_times: dict[str, int] = field(default_factory=dict)
    #: newest non-null value of each identity field seen on the customer's contact events
    identity: dict[str, str] = field(default_factory=dict)
    #: standard types already reported for this customer (rule 3)
    reported: list[str] = field(default_factory=list)
    #: standard type -> running delayed hold
    holds: dict[str, Hold] = field(default_factory=dict)
    #: event_id -> ts of up to INLINE_IDS remembered ids (rule 1; the rest have own keys)
    seen: dict[str, int] = field(default_factory=dict)

    def add_time_for(self, userid: str) -> Optional[int]:
        """The tagging staff member's add time, else the customer's earliest (rule 5)."""
        if userid in self.add_times:
            return self.add_times[userid]
        return min(self.add_times.values()) if self.add_times else None

    def has_identity(self) -> bool:
        """Rule 7: app id plus unionid or openid, or a click id."""
        ident = self.identity
        return bool(("wechat_app_id" in ident and ("wechat_unionid" in ident or "wechat_openid" in ident))
                    or "click_id" in ident)

    def encode(self) -> bytes:
        return orjson.dumps({"a": self.add_times, "i": self.identity, "r": self.reported,
                             "h": [h.encode() for h in self.holds.values()], "s": self.seen})

    @classmethod
    def decode(cls, payload: Optional[bytes]) -> "CustomerState":
        if payload is None:
            return cls()
        stored = orjson.loads(payload)
        holds = {h[0]: Hold.decode(h) for h in stored.get("h", ())}
        return cls(add_times=stored["a"], identity=stored["i"], reported=stored["r"],
                   holds=holds, seen=stored.get("s") or {})


@dataclass
class PartitionClock:
    """Stream time of one partition number, the range of its hold index in use, how many
    holds are running (for the `tagstream_held_reports` gauge), and the span of its
    remembered-id queue."""
    stream_time: int = -1
    low_bucket: Optional[int] = None    # no due entry lives below this bucket
    high_bucket: Optional[int] = None   # no entry at all lives above this bucket
    held: int = 0
    seen_head: int = 0                  # number of the oldest remembered-id entry
    seen_next: int = 0                  # number the next entry gets (head == next: empty)
    seen_head_ts: Optional[int] = None  # ts of the head entry (None when empty)

    def encode(self) -> bytes:
        return orjson.dumps([self.stream_time, self.low_bucket, self.high_bucket, self.held,
                             self.seen_head, self.seen_next, self.seen_head_ts])

    @classmethod
    def decode(cls, payload: Optional[bytes]) -> "PartitionClock":
        return cls(*orjson.loads(payload)) if payload is not None else cls()


#: One hold-index entry: (deadline, customer key, standard type).
HoldEntry = tuple[int, str, str]
#: One remembered-id queue entry: (ts, customer key, event_id).
SeenEntry = tuple[int, str, str]


class StateStore(Protocol):
    """Where the engine keeps state. Keys are strings; values are the objects above."""
    def customer(self, key: str) -> CustomerState: ...
    def put_customer(self, key: str, state: CustomerState) -> None: ...
    def clock(self, partition: int) -> PartitionClock: ...
    def put_clock(self, partition: int, clock: PartitionClock) -> None: ...
    def index_hold(self, partition: int, bucket: int, entry: HoldEntry) -> None: ...
    def take_due(self, partition: int, bucket: int, up_to: int) -> list[HoldEntry]: ...  # removes them
    def has_holds(self, partition: int, bucket: int) -> bool: ...
    def seen_ts(self, key: str, event_id: str) -> Optional[int]: ...
    def put_seen_ts(self, key: str, event_id: str, ts: Optional[int]) -> None: ...     # None forgets
    def seen_entry(self, partition: int, number: int) -> Optional[SeenEntry]: ...
    def put_seen_entry(self, partition: int, number: int, entry: Optional[SeenEntry]) -> None: ...


class MemoryStore:
    """A `StateStore` in dicts: for replay, the tests and the reference comparisons."""

    def __init__(self) -> None:
        self.customers: dict[str, CustomerState] = {}
        self.clocks: dict[int, PartitionClock] = {}
        self.buckets: dict[tuple[int, int], list[HoldEntry]] = {}
        self.seen: dict[tuple[str, str], int] = {}
        self.seen_entries: dict[tuple[int, int], SeenEntry] = {}

    def customer(self, key: str) -> CustomerState:
        return self.customers.get(key) or CustomerState()

    def put_customer(self, key: str, state: CustomerState) -> None:
        self.customers[key] = state

    def clock(self, partition: int) -> PartitionClock:
        return self.clocks.get(partition) or PartitionClock()

    def put_clock(self, partition: int, clock: PartitionClock) -> None:
        self.clocks[partition] = clock

    def index_hold(self, partition: int, bucket: int, entry: HoldEntry) -> None:
        insort(self.buckets.setdefault((partition, bucket), []), entry)

    def take_due(self, partition: int, bucket: int, up_to: int) -> list[HoldEntry]:
        entries = self.buckets.get((partition, bucket))
        if not entries:
            return []
        n = bisect_right(entries, up_to, key=lambda e: e[0])
        due, entries[:n] = entries[:n], []
        if not entries:
            del self.buckets[(partition, bucket)]
        return due

    def has_holds(self, partition: int, bucket: int) -> bool:
        return bool(self.buckets.get((partition, bucket)))

    def seen_ts(self, key: str, event_id: str) -> Optional[int]:
        return self.seen.get((key, event_id))

    def put_seen_ts(self, key: str, event_id: str, ts: Optional[int]) -> None:
        if ts is None:
            self.seen.pop((key, event_id), None)
        else:
            self.seen[(key, event_id)] = ts

    def seen_entry(self, partition: int, number: int) -> Optional[SeenEntry]:
        return self.seen_entries.get((partition, number))

    def put_seen_entry(self, partition: int, number: int, entry: Optional[SeenEntry]) -> None:
        if entry is None:
            self.seen_entries.pop((partition, number), None)
        else:
            self.seen_entries[(partition, number)] = entry


# -- results ----------------------------------------------------------------------------

@dataclass
class StepResult:
    """What one call produced, in the order it must be sent."""
    outcome: Optional[str] = None                 # the event's own outcome (None for timers)
    standard_type: Optional[str] = None
    reports: list[ConversionReport] = field(default_factory=list)
    unreportable: list[ConversionReport] = field(default_factory=list)
    released: int = 0                             # holds released by this call
    holds_delta: int = 0                          # change in running holds


# -- the engine -------------------------------------------------------------------------

class ReportingEngine:
    """SPEC §4 over a `StateStore`. One instance serves every partition of a worker."""

    def __init__(self, store: StateStore, rule_as_of: RuleAsOf, policy: ReportingPolicy):
        self.store = store
        self.rule_as_of = rule_as_of
        self.policy = policy

    # entry points ----------------------------------------------------------------------
    def on_event(self, partition: int, event: Event, now_ms: int) -> StepResult:
        result = StepResult()
        clock = self.store.clock(partition)
        if event.ts > clock.stream_time:
            clock.stream_time = event.ts
        self._release_due(partition, clock, clock.stream_time, result, now_ms)
        self.store.put_clock(partition, clock)

        key = customer_key(event.corp_id, event.external_userid)
        horizon = clock.stream_time - self.policy.dedupe_horizon
        self._forget_expired(partition, clock, horizon)
        rule = None
        if not isinstance(event, ContactEvent) and event.op == "add":
            rule = self.rule_as_of(event.corp_id, event.tag_id, event.ts)
            if rule is None or rule.standard_type is None:
                # Cannot change a report: not read, not remembered (module docstring).
                result.outcome = UNMAPPED
                self._count_holds(partition, clock, result)
                return result
        state = self.store.customer(key)
        if self._is_duplicate(key, state, event.event_id, horizon):
            result.outcome = DUPLICATE
            self._count_holds(partition, clock, result)    # the release above may have changed it
            return result
        self._remember(partition, clock, key, state, event.event_id, event.ts, horizon)
        if isinstance(event, ContactEvent):
            self._apply_contact(state, event, result)
        elif event.op == "add":
            self._apply_add(partition, clock, key, state, event, rule, result, now_ms)
        else:
            self._apply_remove(state, event, result)
        self.store.put_customer(key, state)
        self._count_holds(partition, clock, result)
        return result

    def on_time(self, partition: int, ts: int, now_ms: int) -> StepResult:
        """What another customer's event at `ts` does to a reader that follows one customer
        (`tagstream explain`): it moves the partition's stream time, and releases the holds
        due by it, as `on_event` does before it applies an event; the event itself is not
        applied. The followed customer's outcomes are those of `on_event` for every event:
        nothing else of another customer's event touches them (its ids and state are its
        own), and the holds in the store are the followed customer's alone."""
        result = StepResult()
        clock = self.store.clock(partition)
        if ts > clock.stream_time:
            clock.stream_time = ts
            self._release_due(partition, clock, clock.stream_time, result, now_ms)
            clock.held += result.holds_delta
            self.store.put_clock(partition, clock)
        return result

    def on_idle(self, partition: int, wall_ms: int, now_ms: int) -> StepResult:
        """Live mode: release holds whose deadline passed `idle_grace` ago in wall-clock
        time, so an idle partition still flushes. Stream time does not move."""
        result = StepResult()
        clock = self.store.clock(partition)
        before = replace(clock)
        self._release_due(partition, clock, wall_ms - self.policy.idle_grace, result, now_ms)
        clock.held += result.holds_delta
        if clock != before:              # an idle partition writes nothing
            self.store.put_clock(partition, clock)
        return result

    def flush(self, partition: int, now_ms: int) -> StepResult:
        """End of input (replay): resolve every open hold, in deadline order."""
        result = StepResult()
        clock = self.store.clock(partition)
        if clock.high_bucket is not None:
            self._release_due(partition, clock, (clock.high_bucket + 1) * HOLD_BUCKET_MS, result, now_ms)
        clock.held += result.holds_delta
        self.store.put_clock(partition, clock)
        return result

    # remembered ids (rule 1; the module docstring has the argument) -------------------
    def _is_duplicate(self, key: str, state: CustomerState, event_id: str, horizon: int) -> bool:
        inline = state.seen.get(event_id)
        if inline is not None and inline >= horizon:
            return True
        stored = self.store.seen_ts(key, event_id)
        return stored is not None and stored >= horizon

    def _remember(self, partition: int, clock: PartitionClock, key: str, state: CustomerState,
                  event_id: str, ts: int, horizon: int) -> None:
        """Remember an applied id: inline while the record has room, else under its own key.
        The caller writes the customer record."""
        state.seen = {seen_id: seen_ts for seen_id, seen_ts in state.seen.items() if seen_ts >= horizon}
        if len(state.seen) > INLINE_IDS:        # a record from before issue 18: move the excess
            ordered = sorted(state.seen.items(), key=lambda item: item[1])
            for old_id, old_ts in ordered[:len(ordered) - INLINE_IDS]:
                self._remember_under_own_key(partition, clock, key, old_id, old_ts)
            state.seen = dict(ordered[len(ordered) - INLINE_IDS:])
        if len(state.seen) < INLINE_IDS:
            state.seen[event_id] = ts
        else:
            self._remember_under_own_key(partition, clock, key, event_id, ts)

    def _remember_under_own_key(self, partition: int, clock: PartitionClock, key: str,
                                event_id: str, ts: int) -> None:
        self.store.put_seen_ts(key, event_id, ts)
        self.store.put_seen_entry(partition, clock.seen_next, (ts, key, event_id))
        if clock.seen_head == clock.seen_next:
            clock.seen_head_ts = ts
        clock.seen_next += 1
        self.store.put_clock(partition, clock)

    def _forget_expired(self, partition: int, clock: PartitionClock, horizon: int) -> None:
        """Forget up to FORGET_PER_EVENT entries from the head of the queue whose ts is
        below the horizon."""
        forgotten = 0
        while clock.seen_head_ts is not None and clock.seen_head_ts < horizon and forgotten < FORGET_PER_EVENT:
            ts, key, event_id = self.store.seen_entry(partition, clock.seen_head)
            if self.store.seen_ts(key, event_id) == ts:     # not re-applied since
                self.store.put_seen_ts(key, event_id, None)
            self.store.put_seen_entry(partition, clock.seen_head, None)
            clock.seen_head += 1
            head = self.store.seen_entry(partition, clock.seen_head) if clock.seen_head < clock.seen_next else None
            clock.seen_head_ts = head[0] if head is not None else None
            forgotten += 1
        if forgotten:
            self.store.put_clock(partition, clock)

    def _count_holds(self, partition: int, clock: PartitionClock, result: StepResult) -> None:
        if result.holds_delta:
            clock.held += result.holds_delta
            self.store.put_clock(partition, clock)

    # rules ----------------------------------------------------------------------------
    def _apply_contact(self, state: CustomerState, event: ContactEvent, result: StepResult) -> None:
        for name in IDENTITY_FIELDS:
            value = getattr(event, name)
            if value is not None:
                state.identity[name] = value
        if event.change_type == ADD_EXTERNAL_CONTACT:
            known = state.add_times.get(event.userid)
            if known is None or event.ts < known:
                state.add_times[event.userid] = event.ts
        result.outcome = CONTACT_APPLIED

    def _apply_remove(self, state: CustomerState, event: TagEvent, result: StepResult) -> None:
        result.outcome = TAG_REMOVED
        for standard_type, hold in list(state.holds.items()):
            if event.tag_id in hold.support:
                hold.support.remove(event.tag_id)
                if not hold.support:
                    # Cancelled. Its index entry stays and is skipped when it comes due.
                    del state.holds[standard_type]
                    result.outcome, result.standard_type = CANCELLED, standard_type
                    result.holds_delta -= 1

    def _apply_add(self, partition: int, clock: PartitionClock, key: str, state: CustomerState,
                   event: TagEvent, rule: ReportingRule, result: StepResult, now_ms: int) -> None:
        """A mapped add (`rule`: its rule as of its ts, with a standard type)."""
        standard_type, reason = rule.standard_type, None
        add_time = state.add_time_for(event.userid)
        if standard_type == ORDER:
            if add_time is None:
                reason = REASON_ADD_TIME_UNKNOWN
            elif event.ts - add_time > self.policy.order_window:
                standard_type, reason = LONG_TERM, REASON_ORDER_AFTER_WINDOW
        result.standard_type = standard_type
        if standard_type in state.reported:
            result.outcome = ALREADY_REPORTED
            return
        first_add = {"event_id": event.event_id, "tag_id": event.tag_id, "userid": event.userid,
                     "ts": event.ts, "corp_id": event.corp_id, "external_userid": event.external_userid}
        if standard_type in REALTIME_TYPES:
            report = self._report(state, standard_type, first_add, rule.as_wire(), "realtime",
                                  reason, add_time, now_ms)
            result.outcome = self._deliver(state, report, result)
            return
        assert standard_type in DELAYED_TYPES
        hold = state.holds.get(standard_type)
        if hold is not None:
            if event.tag_id not in hold.support:
                hold.support.append(event.tag_id)
            result.outcome = HOLD_JOINED
            return
        deadline = event.ts + self.policy.delay_hold
        state.holds[standard_type] = Hold(standard_type, deadline, first_add, rule.as_wire(), reason,
                                          [event.tag_id], add_time)
        self._index(partition, clock, (deadline, key, standard_type))
        result.outcome = HELD
        result.holds_delta += 1

    def _deliver(self, state: CustomerState, report: ConversionReport, result: StepResult) -> str:
        """Rule 7: with identity the report goes out and counts; without, it is parked."""
        if state.has_identity():
            state.reported.append(report.standard_type)
            result.reports.append(report)
            return REPORTED
        result.unreportable.append(replace(report, reason=REASON_NO_USER_IDENTITY))
        return UNREPORTABLE

    # holds ----------------------------------------------------------------------------
    def _index(self, partition: int, clock: PartitionClock, entry: HoldEntry) -> None:
        # A late event can index a hold that is already due; lowering low_bucket makes the
        # next release (at the partition's next event) find it.
        bucket = entry[0] // HOLD_BUCKET_MS
        self.store.index_hold(partition, bucket, entry)
        clock.low_bucket = bucket if clock.low_bucket is None else min(clock.low_bucket, bucket)
        clock.high_bucket = bucket if clock.high_bucket is None else max(clock.high_bucket, bucket)
        self.store.put_clock(partition, clock)

    def _release_due(self, partition: int, clock: PartitionClock, up_to: int,
                     result: StepResult, now_ms: int) -> None:
        """Release every indexed hold of the partition with deadline <= up_to."""
        if clock.low_bucket is None or up_to < clock.low_bucket * HOLD_BUCKET_MS:
            return
        last = min(up_to // HOLD_BUCKET_MS, clock.high_bucket)
        due: list[HoldEntry] = []
        for bucket in range(clock.low_bucket, last + 1):
            due += self.store.take_due(partition, bucket, up_to)
        # Every bucket below `last` is now empty; `last` may still hold later deadlines.
        if last >= clock.high_bucket and not self.store.has_holds(partition, last):
            clock.low_bucket = clock.high_bucket = None
        else:
            clock.low_bucket = last
        for deadline, key, standard_type in sorted(due):
            self._release(key, standard_type, deadline, result, now_ms)

    def _release(self, key: str, standard_type: str, deadline: int, result: StepResult, now_ms: int) -> None:
        state = self.store.customer(key)
        hold = state.holds.get(standard_type)
        if hold is None or hold.deadline != deadline:
            return                          # cancelled (and maybe re-held) since it was indexed
        del state.holds[standard_type]
        result.holds_delta -= 1
        result.released += 1
        if standard_type not in state.reported:
            report = self._report(state, standard_type, hold.event, hold.rule, "delayed",
                                  hold.reason, hold.add_time, now_ms)
            self._deliver(state, report, result)
        self.store.put_customer(key, state)

    # reports --------------------------------------------------------------------------
    def _report(self, state: CustomerState, standard_type: str, first_add: dict,
                rule: dict, mode: str, reason: Optional[str], add_time: Optional[int],
                now_ms: int) -> ConversionReport:
        # From the event, not the customer key: ids may themselves contain ':'.
        corp_id, external_userid = first_add["corp_id"], first_add["external_userid"]
        action_type = self.policy.default_action_types[standard_type]
        if rule["standard_type"] == standard_type and rule.get("action_type"):
            action_type = rule["action_type"]
        custom_action = None
        if action_type == "CUSTOM":
            custom_action = DEFAULT_CUSTOM_ACTIONS.get(standard_type, standard_type)
        ident = state.identity
        ts = first_add["ts"]
        return ConversionReport(
            outer_action_id=outer_action_id(corp_id, external_userid, standard_type),
            account_id=rule["account_id"], user_action_set_id=rule["user_action_set_id"],
            action_type=action_type, custom_action=custom_action, action_time=ts // 1000,
            user_id={k: ident[k] for k in USER_ID_FIELDS if k in ident},
            trace={"click_id": ident["click_id"]} if "click_id" in ident else {},
            standard_type=standard_type, mode=mode, reason=reason,
            corp_id=corp_id, external_userid=external_userid, tag_id=first_add["tag_id"],
            source_event_id=first_add["event_id"], event_ts=ts, emitted_at=now_ms,
            tagging_delay_ms=None if add_time is None else ts - add_time)


def run_log(events: Iterable[tuple[int, Event]], rule_as_of: RuleAsOf, policy: ReportingPolicy,
            now_ms: int = 0, flush: bool = True) -> tuple[list[ConversionReport], list[ConversionReport]]:
    """Fold a whole log of (partition, event) through a fresh in-memory engine: the core as
    replay and the property tests use it. Returns (reports, unreportable)."""
    engine = ReportingEngine(MemoryStore(), rule_as_of, policy)
    reports: list[ConversionReport] = []
    unreportable: list[ConversionReport] = []
    partitions = set()
    for partition, event in events:
        partitions.add(partition)
        result = engine.on_event(partition, event, now_ms)
        reports += result.reports
        unreportable += result.unreportable
    if flush:
        for partition in sorted(partitions):
            result = engine.flush(partition, now_ms)
            reports += result.reports
            unreportable += result.unreportable
    return reports, unreportable
