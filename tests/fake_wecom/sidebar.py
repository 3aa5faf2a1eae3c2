"""Staff at work in the WeCom sidebar, at a fixed offered load: the driver behind the demo's
WeCom mode (`tagstream run --via-wecom`) and `make bench-ingest`.

Each step is one change a staff member makes, chosen at random: a new customer added (80%
with a unionid, so their reports carry an identity), a corp tag added (mostly tags no rule
maps, as in a real corp), or a tag taken back. Each change updates the fake WeCom's state
(`Staff`) and sends the callback WeCom would send (`CallbackSender`, with WeCom's retries),
without waiting for the answer of the one before: the load is offered at `rate` callbacks/s
whatever the ingest does (open loop), with at most `max_in_flight` unanswered.

One customer changes at most once per `customer_gap_s` (the one changed longest ago is
next; while none is due, a new customer comes), so each change is its own callback's diff
(WeCom's CreateTime has a one-second grain), as with people at keyboards.
Every change is kept in `actions` with the moment its callback was first sent, and every
answer's time in `answer_times_s`.
"""
from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from tests.fake_wecom.api import FakeWeComApi, Staff
from tests.fake_wecom.callbacks import CallbackSender

USERID = "staff1"


@dataclass
class Action:
    corp_id: str
    external_userid: str
    kind: str                   # add_customer, add_tag, remove_tag
    tag_id: Optional[str]
    sent_at: float              # time.time() of the callback's first attempt
    delivered: bool = False


@dataclass
class Sidebar:
    api: FakeWeComApi
    sender: CallbackSender
    tags: list[str]                       # every corp tag the staff may use
    seed: int = 1
    new_customer_share: float = 0.25
    remove_share: float = 0.2
    customer_gap_s: float = 1.1
    max_in_flight: int = 256
    actions: list[Action] = field(default_factory=list)
    answer_times_s: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.random = random.Random(self.seed)
        self.staff = Staff(self.api)
        self.customers: dict[str, list[str]] = {corp: [] for corp in self.api.corps}
        self.ready: dict[str, deque] = {corp: deque() for corp in self.api.corps}   # (last change, customer)
        self.in_flight: set = set()

    def _step(self) -> Optional[tuple[str, dict, Action]]:
        corp = self.random.choice(sorted(self.api.corps))
        known, ready = self.customers[corp], self.ready[corp]
        now = time.time()
        # the customer changed longest ago, if that was at least customer_gap_s ago; else a new one
        if not ready or now - ready[0][0] < self.customer_gap_s or self.random.random() < self.new_customer_share:
            n = len(known)
            customer = f"wm{corp[-4:]}{n:07d}"
            known.append(customer)
            ready.append((now, customer))
            unionid = f"oU{corp[-4:]}{n:07d}" if self.random.random() < 0.8 else None
            callback = self.staff.add_customer(corp, customer, USERID, state=f"ad_{n % 50}", unionid=unionid)
            return corp, callback, Action(corp, customer, "add_customer", None, now)
        _, customer = ready.popleft()
        ready.append((now, customer))
        owned = self.api.corps[corp].customers[customer].follows[USERID].tags
        if owned and self.random.random() < self.remove_share:
            tag = self.random.choice(sorted(owned))
            return corp, self.staff.tag(corp, customer, USERID, remove=[tag]), Action(corp, customer, "remove_tag",
                                                                                       tag, now)
        free = [t for t in self.tags if t not in owned]
        if not free:
            return None
        tag = self.random.choice(free)
        return corp, self.staff.tag(corp, customer, USERID, add=[tag]), Action(corp, customer, "add_tag", tag, now)

    async def _send(self, corp: str, callback: dict, action: Action) -> None:
        started = time.perf_counter()
        action.delivered = await self.sender.send(corp, callback)
        self.answer_times_s.append(time.perf_counter() - started)

    async def run(self, callbacks: int, rate: float, progress=None) -> None:
        """Offer `callbacks` callbacks at `rate` per second; returns once all are answered."""
        started = time.monotonic()
        sent = 0
        while sent < callbacks:
            step = self._step()
            if step is None:
                continue
            corp, callback, action = step
            self.actions.append(action)
            while len(self.in_flight) >= self.max_in_flight:
                await asyncio.wait(self.in_flight, return_when=asyncio.FIRST_COMPLETED)
            task = asyncio.create_task(self._send(corp, callback, action))
            self.in_flight.add(task)
            task.add_done_callback(self.in_flight.discard)
            sent += 1
            if progress is not None:
                progress(sent)
            ahead = sent / rate - (time.monotonic() - started)
            if ahead > 0:
                await asyncio.sleep(ahead)
        if self.in_flight:
            await asyncio.wait(self.in_flight)
