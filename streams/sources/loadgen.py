"""A realistic generated stream of WeCom tag traffic, for demos, tests and benchmarks.

Shape of the traffic (what a real advertiser's customer service looks like):
- many corps, each with a few dozen custom tags; only a handful of tags are mapped by a
  reporting rule, and some rules get a second version later (remapped or unmapped);
- every customer arrives with an `add_external_contact` carrying its ad identity (most
  with app id + unionid, some with only a click id, a few with nothing), before any tag;
- staff then tag the customer over time: mostly unmapped tags and repeats, now and then a
  mapped one, occasionally a remove; many customers are tagged at the same time;
- until `active_customers` are being tagged at once, half of the events bring a new customer
  and half tag the ones already there, so a small load has the full event mix too (with a
  warm-up of contacts first, a 20,000-event load of a 20,000-customer shape had no tag at all);
- with `undo_share`, staff sometimes take back a delayed type's tag (LONG_TERM, INVALID) a
  few minutes after adding it, before its hold ends: the hold is cancelled (SPEC §4 rule 6).

The generator is deterministic for a given seed and clock, so a run can be reproduced.
"""
from __future__ import annotations

import heapq
import random
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from schemas.records import STANDARD_TYPES, customer_key, rule_key

TAG_NAMES = {
    "CONSULT": "开口咨询", "LEAD": "已留资", "VALID": "核心", "ORDER": "已下单-小课",
    "LONG_TERM": "到店", "INVALID": "骚扰",
}
UNMAPPED_TAG_NAMES = ("新客", "老客", "北京", "上海", "广州", "意向一般", "待回访", "已加群",
                      "学生", "宝妈", "价格敏感", "已发资料", "周末可约", "复购")
#: How often a tagging event picks a mapped tag of each type (the rest are unmapped).
TYPE_WEIGHTS = {"CONSULT": 10, "LEAD": 6, "VALID": 5, "ORDER": 3, "LONG_TERM": 2, "INVALID": 1}


@dataclass(frozen=True)
class GeneratedRecord:
    topic: str            # "tag_events", "contact_events" or "tag_mappings"
    key: str
    value: dict


@dataclass
class LoadShape:
    corps: int = 20
    active_customers: int = 2000   # customers being tagged at the same time
    events_per_customer: int = 12  # on average, before the customer goes quiet
    mapped_share: float = 0.18     # share of tag adds that use a mapped tag
    remove_share: float = 0.05
    no_identity_share: float = 0.05
    click_only_share: float = 0.15
    mean_gap_ms: int = 40          # simulated time between two events (all customers)
    undo_share: float = 0.0        # share of delayed-type tag adds removed again within minutes
    undo_after_ms: tuple = (60_000, 20 * 60_000)   # how long after the add the undo comes


class TagTraffic:
    """Rules first (`rules()`), then an endless interleaved event stream (`events()`)."""

    def __init__(self, seed: int, start_ms: int, shape: Optional[LoadShape] = None,
                 clock: Optional[Callable[[], int]] = None, run_tag: str = ""):
        self.rng = random.Random(seed)
        self.shape = shape or LoadShape()
        self.start_ms = start_ms
        self.now = start_ms
        self.clock = clock      # wall-clock mode: ts comes from here instead of simulation
        self.run_tag = run_tag  # makes customer ids unique per demo run
        self.corps = [f"ww{seed % 1000:03d}{i:03d}" for i in range(self.shape.corps)]
        self.mapped: dict[str, dict[str, str]] = {}   # corp -> standard type -> tag id
        self.delayed: dict[str, set[str]] = {}         # corp -> tag ids of LONG_TERM and INVALID
        self.unmapped: dict[str, list[str]] = {}
        self._customer_seq = 0
        self._event_seq = 0
        self._active: list[dict] = []
        self._undos: list[tuple[int, int, dict, str]] = []   # heap: (due ms, seq, customer, tag id)

    # -- reporting rules -------------------------------------------------------------------
    def rules(self) -> list[GeneratedRecord]:
        rules = []
        for ci, corp in enumerate(self.corps):
            account_id = 2000 + ci
            self.mapped[corp] = {}
            for st in STANDARD_TYPES:
                tag_id = f"et{ci:03d}{st[:3]}"
                self.mapped[corp][st] = tag_id
                base = {"corp_id": corp, "tag_id": tag_id, "tag_name": TAG_NAMES[st],
                        "standard_type": st, "account_id": account_id,
                        "user_action_set_id": 11000 + ci, "effective_from": self.start_ms - 86_400_000,
                        "version": 1, "action_type": None}
                rules.append(GeneratedRecord("tag_mappings", rule_key(corp, tag_id), base))
                # A later version for some rules: a re-map to VALID or an unmapping.
                if self.rng.random() < 0.2:
                    later = dict(base, version=2,
                                 effective_from=self.start_ms + self.rng.randint(60_000, 3_600_000),
                                 standard_type=self.rng.choice([None, "VALID"]))
                    rules.append(GeneratedRecord("tag_mappings", rule_key(corp, tag_id), later))
            self.unmapped[corp] = [f"eu{ci:03d}{i:02d}" for i in range(len(UNMAPPED_TAG_NAMES))]
            self.delayed[corp] = {self.mapped[corp]["LONG_TERM"], self.mapped[corp]["INVALID"]}
        return rules

    # -- events ----------------------------------------------------------------------------
    def events(self) -> Iterator[GeneratedRecord]:
        if not self.mapped:
            self.rules()
        shape, rng = self.shape, self.rng
        while True:
            self._tick()
            if self._undos and self._undos[0][0] <= self.now:
                _, _, customer, tag_id = heapq.heappop(self._undos)
                if tag_id in customer["tags"]:
                    customer["tags"].remove(tag_id)
                    yield self._tag_record(customer, tag_id, "remove")
                    continue
            filling = len(self._active) < shape.active_customers
            if not self._active or rng.random() < (0.5 if filling else 1 / shape.events_per_customer):
                yield self._new_customer()
                continue
            customer = self._active[rng.randrange(len(self._active))]
            yield self._tag_event(customer)
            customer["left"] -= 1
            if customer["left"] <= 0:
                self._active.remove(customer)

    def _tick(self) -> None:
        if self.clock is not None:
            self.now = max(self.now, self.clock())
        else:
            self.now += self.rng.randint(0, 2 * self.shape.mean_gap_ms)

    def _event_id(self, prefix: str) -> str:
        self._event_seq += 1
        return f"{prefix}-{self.run_tag}{self._event_seq:x}"

    def _new_customer(self) -> GeneratedRecord:
        rng, shape = self.rng, self.shape
        self._customer_seq += 1
        corp = rng.choice(self.corps)
        external_userid = f"wm{self.run_tag}{self._customer_seq:07d}"
        staff = f"staff{rng.randrange(50):02d}"
        identity = {"wechat_app_id": None, "wechat_unionid": None, "wechat_openid": None, "click_id": None}
        roll = rng.random()
        if roll >= shape.no_identity_share:
            if roll < shape.no_identity_share + shape.click_only_share:
                identity["click_id"] = f"clk_{self._customer_seq:x}"
            else:
                identity["wechat_app_id"] = "wx7d21"
                identity["wechat_unionid"] = f"oU-{self._customer_seq:x}"
                identity["click_id"] = f"clk_{self._customer_seq:x}" if rng.random() < 0.5 else None
        self._active.append({"corp": corp, "ext": external_userid, "staff": staff,
                             "left": max(1, int(rng.expovariate(1 / shape.events_per_customer))),
                             "tags": []})
        value = {"event_id": self._event_id("c"), "corp_id": corp, "external_userid": external_userid,
                 "userid": staff, "change_type": "add_external_contact", "ts": self.now,
                 "state": f"ad_{rng.randrange(1000)}", **identity}
        return GeneratedRecord("contact_events", customer_key(corp, external_userid), value)

    def _tag_event(self, customer: dict) -> GeneratedRecord:
        rng, shape = self.rng, self.shape
        corp = customer["corp"]
        if customer["tags"] and rng.random() < shape.remove_share:
            op, tag_id = "remove", customer["tags"].pop(rng.randrange(len(customer["tags"])))
        else:
            op = "add"
            if rng.random() < shape.mapped_share:
                st = rng.choices(list(TYPE_WEIGHTS), weights=list(TYPE_WEIGHTS.values()))[0]
                tag_id = self.mapped[corp][st]
            else:
                tag_id = rng.choice(self.unmapped[corp])
            customer["tags"].append(tag_id)
            if tag_id in self.delayed[corp] and rng.random() < shape.undo_share:
                self._event_seq += 1
                heapq.heappush(self._undos, (self.now + rng.randint(*shape.undo_after_ms), self._event_seq,
                                             customer, tag_id))
        return self._tag_record(customer, tag_id, op)

    def _tag_record(self, customer: dict, tag_id: str, op: str) -> GeneratedRecord:
        corp = customer["corp"]
        value = {"event_id": self._event_id("e"), "corp_id": corp, "external_userid": customer["ext"],
                 "userid": customer["staff"], "tag_id": tag_id, "op": op, "ts": self.now,
                 "source": "wecom_sidebar"}
        return GeneratedRecord("tag_events", customer_key(corp, customer["ext"]), value)
