"""Non-blocking retries of the API sink, the pure parts (no I/O): what the sink writes about
a parked report, and when it gives an account another try.

A report whose request keeps getting retryable answers for `sink_retry_budget` is *parked*:
copied, as it was on `conversion-reports`, to the retry topic (`conversion-reports-retry`,
same partition number) with the headers of a `RetryEnvelope`. The sink's delivered record
(`delivered-reports`) then names that copy, `parked:<offset>:<first_ts>`, so exactly one
copy of a parked report is *live*: every other copy (a second one written by a sink that
died between writing a copy and recording it, or one whose id was settled since) is stale
and skipped. `retrying:<offset>:<first_ts>` is the same copy with a request out (in doubt
after a crash). The module docstring of `streams.sinks.reporting` has the whole protocol.

`AccountBreaker` keeps an account that the API keeps refusing from costing every round its
budget again: once one of its requests ran out of budget, its next reports are parked at
once, and the retry loop sends it one request (a probe) per `sink_retry_delay`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Union

SENDING, ACKED, FAILED = b"sending", b"acked", b"failed"
PARKED, RETRYING = b"parked", b"retrying"

HEADER_ATTEMPT = "tagstream.attempt"          # 1 for the first park, +1 at each re-park
HEADER_NOT_BEFORE = "tagstream.not_before"    # epoch ms: not tried again before this
HEADER_FIRST_TS = "tagstream.first_ts"        # epoch ms: the report's record timestamp on conversion-reports
HEADER_ORIGIN = "tagstream.origin"            # "<topic>/<partition>@<offset>" of the report on conversion-reports


@dataclass(frozen=True)
class Parked:
    """The delivered record's state of a parked report: which copy on the retry topic is live."""
    offset: int           # the live copy's offset (retry topic, the report's partition number)
    first_ts: int         # the report's record timestamp on conversion-reports (ms): its age
    retrying: bool = False   # a request for it may be out

    def value(self) -> bytes:
        return b"%s:%d:%d" % (RETRYING if self.retrying else PARKED, self.offset, self.first_ts)


State = Union[bytes, Parked, None]     # SENDING, ACKED, FAILED, a Parked, or nothing recorded


def parse_state(value: Optional[bytes]) -> State:
    """A delivered-record value as the sink reads it back. Unknown values count as nothing
    recorded (the report is sent), never as acknowledged."""
    if value in (SENDING, ACKED, FAILED):
        return value
    if value and (value.startswith(PARKED + b":") or value.startswith(RETRYING + b":")):
        try:
            kind, offset, first_ts = value.split(b":", 2)
            return Parked(int(offset), int(first_ts), kind == RETRYING)
        except ValueError:
            return None
    return None


def is_live_copy(state: State, offset: int) -> bool:
    """Whether the retry-topic copy at `offset` is the one the delivered record names."""
    return isinstance(state, Parked) and state.offset == offset


@dataclass(frozen=True)
class RetryEnvelope:
    """What a copy on the retry topic carries besides the report itself (Kafka headers)."""
    attempt: int
    not_before: int       # epoch ms
    first_ts: int         # epoch ms
    origin: str

    def headers(self) -> list[tuple[str, bytes]]:
        return [(HEADER_ATTEMPT, b"%d" % self.attempt), (HEADER_NOT_BEFORE, b"%d" % self.not_before),
                (HEADER_FIRST_TS, b"%d" % self.first_ts), (HEADER_ORIGIN, self.origin.encode())]

    @classmethod
    def from_headers(cls, headers, record_timestamp: int) -> "RetryEnvelope":
        """The envelope of a record read from the retry topic. A record without (valid)
        headers was not written by a sink: it is due at once, as a first attempt."""
        found = {k: v for k, v in (headers or ())}
        try:
            return cls(int(found[HEADER_ATTEMPT]), int(found[HEADER_NOT_BEFORE]), int(found[HEADER_FIRST_TS]),
                       found.get(HEADER_ORIGIN, b"").decode("utf-8", "replace"))
        except (KeyError, ValueError):
            return cls(1, 0, record_timestamp, "")


class AccountBreaker:
    """Accounts the API keeps refusing, in memory.

    - *Open* (`trip`): a request of the account ran out of its retry budget in a round. The
      main path then parks the account's reports without a request, so a stuck account
      costs one budget, not one per round.
    - *Probes*: the retry loop sends a request for an account at most once per
      `probe_interval_s` after a retryable answer (`refused`, or the trip); until then its
      due copies are parked again without one. A request for an account the loop has no
      refusal on goes at once.
    - Any answer other than a retryable one (delivered, or a permanent rejection of an
      action: the API did look at it) closes both (`answered`).

    A restarted sink pays one budget per stuck account to learn it again; a rebalance clears
    it (the account's parked reports may be elsewhere now).
    """

    def __init__(self, probe_interval_s: float, clock=time.monotonic):
        self.interval = probe_interval_s
        self.clock = clock
        self.open: set[int] = set()
        self.next_probe: dict[int, float] = {}

    def is_open(self, account_id: int) -> bool:
        return account_id in self.open

    def trip(self, account_id: int) -> bool:
        """A request ran out of budget: open. True if it was closed."""
        was_closed = account_id not in self.open
        self.open.add(account_id)
        self.next_probe[account_id] = self.clock() + self.interval
        return was_closed

    def refused(self, account_id: int) -> None:
        """A request of the retry loop got a retryable answer: no other before the next probe."""
        self.next_probe[account_id] = self.clock() + self.interval

    def may_probe(self, account_id: int) -> bool:
        """Whether the retry loop may send a request for the account now (if the probe was
        due, it is taken: the next one is an interval on)."""
        due = self.next_probe.get(account_id)
        if due is None:
            return True
        if self.clock() < due:
            return False
        self.next_probe[account_id] = self.clock() + self.interval
        return True

    def answered(self, account_id: int) -> bool:
        """The API answered (not retryably): close. True if it was open."""
        self.next_probe.pop(account_id, None)
        if account_id in self.open:
            self.open.discard(account_id)
            return True
        return False

    def clear(self) -> None:
        self.open.clear()
        self.next_probe.clear()

    def __len__(self) -> int:
        return len(self.open)
