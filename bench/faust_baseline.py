"""The same job written the way Faust's documentation teaches: the baseline `make bench`
runs beside tagstream, so "why not just write a Faust app?" has an answer with numbers.

    python -m bench.faust_baseline      # run by bench/worker.py; configured by BASELINE_* variables

One `faust.App`, as the user guide builds one: a GlobalTable of rules fed by an agent over
the rules topic, a Table of customers in RocksDB (`store="rocksdb://"`) with its changelog,
one agent per event topic processing each record as an `Event`, realtime reports sent with
`topic.send`, delayed ones released by an `@app.timer`. Nothing tagstream adds around Faust.

Where it is wrong, by construction (each is a trap tagstream's design goes around):
- Two agents over two topics are not merged by event time: on a backlog the tag agent runs
  ahead of the contact agent, so reports miss identities and order windows that arrive "later".
- The GlobalTable holds the latest rule per key, not the version in force at the event's `ts`.
- Holds are released by a wall-clock timer, so a replay releases them at other times.
- It acknowledges each record after processing (at least once), without tagstream's
  commit protocol: a crash can re-send a report or lose the customer's latest state.

It counts what it processed and writes {"count", "first", "last"} (monotonic seconds) to
BASELINE_STATS as it goes, for the harness to compute its rate.
"""
from __future__ import annotations

import os
import time

import faust
import orjson

from schemas.records import DEFAULT_ACTION_TYPES, DELAYED_TYPES, REALTIME_TYPES, outer_action_id

PREFIX = os.environ.get("BASELINE_PREFIX", "")
STATS = os.environ.get("BASELINE_STATS", "faust-baseline-stats.json")
DELAY_HOLD_S = 30 * 60

app = faust.App(
    os.environ.get("BASELINE_APP_ID", "faust-baseline"),
    broker=os.environ.get("BASELINE_BROKER", "kafka://127.0.0.1:9092"),
    store="rocksdb://",
    datadir=os.environ.get("BASELINE_DATADIR", "faust-baseline-data"),
    topic_partitions=int(os.environ.get("BASELINE_PARTITIONS", "4")),
    web_enabled=False,
)

tag_events = app.topic(PREFIX + "tag-events", value_serializer="json")
contact_events = app.topic(PREFIX + "contact-events", value_serializer="json")
rule_records = app.topic(PREFIX + "tag-mappings", value_serializer="json")
reports = app.topic(PREFIX + "faust-baseline-reports", value_serializer="json")

rules = app.GlobalTable("baseline-rules", default=None)
customers = app.Table("baseline-customers", default=dict)

processed = {"count": 0, "first": None, "last": None}


def _count() -> None:
    now = time.monotonic()
    if processed["first"] is None:
        processed["first"] = now
    processed["count"] += 1
    processed["last"] = now
    if processed["count"] % 5_000 == 0:
        _write_stats()


def _write_stats() -> None:
    with open(STATS + ".tmp", "wb") as out:
        out.write(orjson.dumps(processed))
    os.replace(STATS + ".tmp", STATS)


def _report(key: str, event: dict, rule: dict, standard_type: str, mode: str) -> dict:
    return {"outer_action_id": outer_action_id(event["corp_id"], event["external_userid"], standard_type),
            "account_id": rule["account_id"], "user_action_set_id": rule["user_action_set_id"],
            "action_type": rule.get("action_type") or DEFAULT_ACTION_TYPES[standard_type],
            "standard_type": standard_type, "mode": mode, "customer": key, "event_ts": event["ts"]}


@app.agent(rule_records)
async def fold_rules(stream):
    async for key, rule in stream.items():
        rules[key.decode() if isinstance(key, bytes) else key] = rule


def _customer_if_new(event: dict):
    """(key, record) of the event's customer if its id is new to the customer (remembered
    now), else None: a duplicate."""
    key = f"{event['corp_id']}:{event['external_userid']}"
    customer = customers[key]
    seen = customer.setdefault("seen", [])
    if event["event_id"] in seen:
        return None
    seen.append(event["event_id"])
    return key, customer


@app.agent(contact_events)
async def apply_contacts(stream):
    async for event in stream:
        new = _customer_if_new(event)
        if new is not None:
            key, customer = new
            identity = customer.setdefault("identity", {})
            for name in ("wechat_app_id", "wechat_unionid", "wechat_openid", "click_id"):
                if event.get(name) is not None:
                    identity[name] = event[name]
            if event["change_type"] == "add_external_contact":
                customer.setdefault("add_times", {}).setdefault(event["userid"], event["ts"])
            customers[key] = customer
        _count()


@app.agent(tag_events)
async def apply_tags(stream):
    async for event in stream:
        new = _customer_if_new(event)
        if new is not None:
            key, customer = new
            rule = rules.get(f"{event['corp_id']}:{event['tag_id']}")
            standard_type = rule and rule.get("standard_type")
            reported = customer.setdefault("reported", [])
            holds = customer.setdefault("holds", {})
            if event["op"] == "remove":
                holds = {t: h for t, h in holds.items() if h["tag_id"] != event["tag_id"]}
                customer["holds"] = holds
            elif standard_type in REALTIME_TYPES and standard_type not in reported:
                if customer.get("identity"):
                    reported.append(standard_type)
                    await reports.send(key=key, value=_report(key, event, rule, standard_type, "realtime"))
            elif standard_type in DELAYED_TYPES and standard_type not in reported and standard_type not in holds:
                holds[standard_type] = {"tag_id": event["tag_id"], "due": time.time() + DELAY_HOLD_S,
                                        "event": event, "rule": rule}
            customers[key] = customer
        _count()


@app.timer(interval=60.0)
async def release_holds():
    now = time.time()
    for key, customer in list(customers.items()):
        due = [t for t, hold in customer.get("holds", {}).items() if hold["due"] <= now]
        for standard_type in due:
            hold = customer["holds"].pop(standard_type)
            customer.setdefault("reported", []).append(standard_type)
            await reports.send(key=key, value=_report(key, hold["event"], hold["rule"], standard_type, "delayed"))
        if due:
            customers[key] = customer


@app.timer(interval=0.5)
async def write_stats():
    if processed["count"]:
        _write_stats()
    if os.getppid() != int(os.environ.get("BASELINE_PARENT", os.getppid())):
        os._exit(0)                    # the harness is gone: so is the bench


if __name__ == "__main__":
    faust.Worker(app, loglevel="warning", quiet=True).execute_from_commandline()
