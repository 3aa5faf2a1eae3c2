"""Hot customers: how much of a partition's traffic its busiest customer sends.

One customer's automated tagging loop (a CRM sync, a bot) can flood its partition, and every
other customer there waits behind it (issue 18). Operators need to see that without a
customer id in a metric label (labels must stay bounded), so the worker exports the
busiest customer's *share* of each partition's events per sampling interval
(`tagstream_hot_customer_share{partition}`) and logs the customer's key, at most once a
minute per partition, when the share is high.

Counting every key exactly would keep one counter per customer seen in the interval. The
Misra–Gries summary keeps at most `capacity` counters instead: any key with more than
1/`capacity` of the events is guaranteed to be among them, and its count is under-estimated
by at most events/`capacity`. So the share reported is a lower bound, exact to within
1/`capacity` (1.6% with the default 64), which is what a hot-key alarm needs. Plain Python,
no Kafka: `tests/unit/test_hot_keys.py`.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Hashable, Optional

log = logging.getLogger(__name__)

#: Counters per partition in the summary.
CAPACITY = 64
#: A share this high over at least `LOG_MIN_EVENTS` events names the customer in the log.
LOG_SHARE = 0.25
LOG_MIN_EVENTS = 1_000
LOG_EVERY_S = 60.0


class HeavyHitters:
    """The Misra–Gries summary of one stream of keys."""

    def __init__(self, capacity: int = CAPACITY):
        self.capacity = capacity
        self.counters: dict[Hashable, int] = {}
        self.total = 0

    def add(self, key: Hashable) -> None:
        self.total += 1
        counters = self.counters
        if key in counters:
            counters[key] += 1
        elif len(counters) < self.capacity:
            counters[key] = 1
        else:                         # every counter pays for the newcomer; the empty ones go
            for other in list(counters):
                if counters[other] == 1:
                    del counters[other]
                else:
                    counters[other] -= 1

    def busiest(self) -> tuple[Optional[Hashable], int]:
        """(key, a lower bound of its count), or (None, 0) if nothing was added."""
        if not self.counters:
            return None, 0
        key = max(self.counters, key=self.counters.__getitem__)
        return key, self.counters[key]


@dataclass
class HotKeys:
    """Per-partition summaries, taken and reset once per sampling interval."""
    capacity: int = CAPACITY
    clock: Callable[[], float] = time.monotonic
    summaries: dict[int, HeavyHitters] = field(default_factory=dict)
    logged: dict[int, float] = field(default_factory=dict)      # partition -> when its key was last logged

    def add(self, partition: int, key: Hashable) -> None:
        summary = self.summaries.get(partition)
        if summary is None:
            summary = self.summaries[partition] = HeavyHitters(self.capacity)
        summary.add(key)

    def take(self) -> dict[int, float]:
        """{partition: the busiest customer's share of its events} since the last call; logs
        the customer's key when the share is high (at most once a minute per partition)."""
        shares = {}
        now = self.clock()
        for partition, summary in self.summaries.items():
            key, count = summary.busiest()
            share = count / summary.total if summary.total else 0.0
            shares[partition] = share
            if (share >= LOG_SHARE and summary.total >= LOG_MIN_EVENTS
                    and now - self.logged.get(partition, float("-inf")) >= LOG_EVERY_S):
                self.logged[partition] = now
                log.warning("partition %d: customer %s sent at least %.0f%% of its %d events since the last "
                            "sample (tagstream_hot_customer_share); the others there wait behind it",
                            partition, _text(key), 100 * share, summary.total)
        self.summaries = {}
        return shares


def _text(key: Hashable) -> str:
    return key.decode("utf-8", "backslashreplace") if isinstance(key, bytes) else str(key)
