"""A seeded generator of event logs that exercise every rule of SPEC §4, shaped so that the
real pipeline applies them in log order: `ts` strictly increases along the log, so the
worker's event-time merge of the two topics reproduces the log order exactly.

Covers: interleaved customers, rule versions (remaps and unmappings), removes before and
after hold deadlines, ORDER tags inside and outside the 7-day window, customers without
contact events or identity, and duplicate event ids (re-sent with a later ts, as a retried
webhook would be).
"""
from __future__ import annotations

import random

from aiokafka.partitioner import murmur2

MIN, HOUR, DAY = 60_000, 3_600_000, 86_400_000
BASE_TS = 1_763_800_000_000
TYPES = ("CONSULT", "LEAD", "VALID", "ORDER", "LONG_TERM", "INVALID")


def kafka_partition(key: str, partitions: int) -> int:
    """The partition the Kafka producers' default partitioner picks for a key."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def same_partition_customers(corp: str, n: int, partitions: int, first: str = "wm-a") -> list[str]:
    """`first` and n - 1 more external user ids whose keys land on `first`'s partition."""
    target = kafka_partition(f"{corp}:{first}", partitions)
    found = [first]
    i = 0
    while len(found) < n:
        if kafka_partition(f"{corp}:wm-{i}", partitions) == target:
            found.append(f"wm-{i}")
        i += 1
    return found


def generate_log(seed: int, customers: int = 60, events: int = 1500, corp: str = "wwP") -> dict:
    rng = random.Random(seed)
    rules = []
    tags = []
    for i, standard_type in enumerate(TYPES * 2):
        tag_id = f"t{i}-{standard_type.lower()}"
        tags.append(tag_id)
        first = {"corp_id": corp, "tag_id": tag_id, "tag_name": tag_id, "standard_type": standard_type,
                 "account_id": 3000 + i % 2, "user_action_set_id": 12000 + i % 2,
                 "effective_from": BASE_TS - DAY, "version": 1, "action_type": None}
        rules.append((f"{corp}:{tag_id}", first))
        roll = rng.random()
        if roll < 0.25:      # remapped later
            rules.append((f"{corp}:{tag_id}", {**first, "version": 2, "standard_type": rng.choice(TYPES),
                                                 "effective_from": BASE_TS + rng.randrange(1, 8) * DAY}))
        elif roll < 0.35:    # unmapped later
            rules.append((f"{corp}:{tag_id}", {**first, "version": 2, "standard_type": None,
                                                 "account_id": None, "user_action_set_id": None,
                                                 "effective_from": BASE_TS + rng.randrange(1, 8) * DAY}))
    tags += ["u-new", "u-old", "u-vip"]          # never mapped

    people = [f"wm{seed}-{n:04d}" for n in range(customers)]
    state = {p: {"tags": [], "contacted": False} for p in people}
    log = []
    ts = BASE_TS
    seq = 0

    def next_id(prefix):
        nonlocal seq
        seq += 1
        return f"{prefix}{seed}-{seq}"

    while len(log) < events:
        # mostly small steps; sometimes across hold deadlines, days, or the order window
        ts += rng.choice([1, 1000, 10 * MIN, 10 * MIN, 29 * MIN, 31 * MIN, HOUR, DAY, 3 * DAY]) \
            if rng.random() < 0.03 else rng.randrange(1, 2000)
        person = rng.choice(people)
        s = state[person]
        roll = rng.random()
        if not s["contacted"] and rng.random() < 0.85:
            s["contacted"] = True
            identity = rng.choice([
                {"wechat_app_id": "wx1", "wechat_unionid": f"u-{person}"},
                {"wechat_app_id": "wx1", "wechat_openid": f"o-{person}"},
                {"click_id": f"clk-{person}"},
                {},                                  # no identity at all
                {"wechat_app_id": "wx1"},            # not enough
            ])
            log.append({"event_id": next_id("c"), "corp_id": corp, "external_userid": person,
                        "userid": rng.choice(["s1", "s2"]), "change_type": "add_external_contact",
                        "ts": ts, "state": "ad_1", "wechat_app_id": None, "wechat_unionid": None,
                        "wechat_openid": None, "click_id": None, **identity})
        elif roll < 0.05 and s["contacted"]:
            log.append({"event_id": next_id("c"), "corp_id": corp, "external_userid": person,
                        "userid": "s3", "change_type": "edit_external_contact", "ts": ts,
                        "click_id": f"clk2-{person}"})
        elif roll < 0.10 and log:
            earlier = rng.choice(log)               # a retried delivery: same id, later ts
            log.append({**earlier, "ts": ts})
        elif roll < 0.25 and s["tags"]:
            tag_id = s["tags"].pop(rng.randrange(len(s["tags"])))
            log.append({"event_id": next_id("e"), "corp_id": corp, "external_userid": person,
                        "userid": rng.choice(["s1", "s2"]), "tag_id": tag_id, "op": "remove", "ts": ts})
        else:
            tag_id = rng.choice(tags)
            s["tags"].append(tag_id)
            log.append({"event_id": next_id("e"), "corp_id": corp, "external_userid": person,
                        "userid": rng.choice(["s1", "s2"]), "tag_id": tag_id, "op": "add", "ts": ts})
    return {"rules": rules, "events": log}
