"""Erasing a corp that left (SPEC §7, issue 21), the pure parts: the records that ask for and
audit an erasure, the fold that tells which corps are erased, and what erasing one does to
the worker's state. No I/O: the worker, the sink and the enrichment do the reading and
writing (agents/customers.py, streams/sinks/reporting.py, streams/wecom/enrich.py).

**The protocol.** The enrichment that applies a corp's `cancel_auth` writes a *request* on
the erasures topic (`wecom-erasures`, key `corp_id`), in the same transaction as the
tombstones of the shared compacted topics. Every component follows that topic from its start
(`streams.kafka.replica.ErasureRequests`) and, for each requested corp:

- refuses the corp's records from then on (counted, dropped; a dead letter would keep them);
- deletes the corp's keys from the state it owns, tombstones included on its changelog or
  compacted topic, and writes an *audit* record (`kind: erased`): corp, time, component,
  topic, partition, number of keys; never a customer id.

A corp that authorises again gets a `reinstated` record, after which its new data is kept.
Records of one corp share a key, so they keep their order on the topic; the fold below is
last-write-wins per corp.

**The worker's state** (`reporting_state`, key layout in agents/customers.py): a customer
(`c:corp:user`) is deleted with its holds, which are dropped, not released; its remembered
ids under own keys (`e:N:corp:user:id`) are deleted; its entries in the remembered-id queue
(`x:p:n`, whose values name the customer) keep their place and `ts` but lose the customer
(the queue is walked in number order, so an entry cannot just vanish; a blank entry is
forgotten like an expired one); its hold-index entries (`h:p:bucket:chunk`) are removed from
their chunks. The partition's clock loses the dropped holds from its count.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import orjson

from streams.core.semantics import CustomerState

REQUESTED, ERASED, REINSTATED = "requested", "erased", "reinstated"

Scan = Callable[[bytes], Iterable[tuple[bytes, bytes]]]     # prefix -> (key, value), key order
Write = tuple[bytes, Optional[bytes]]


def corp_hash(corp_id: str) -> str:
    """How tagstream names a corp where its id must not be kept (SHA-256, hex)."""
    return hashlib.sha256(corp_id.encode()).hexdigest()


def request_record(corp_id: str, at_ms: int) -> bytes:
    return orjson.dumps({"kind": REQUESTED, "corp_id": corp_id, "at": at_ms})


def reinstated_record(corp_id: str, at_ms: int) -> bytes:
    return orjson.dumps({"kind": REINSTATED, "corp_id": corp_id, "at": at_ms})


def audit_record(corp_id: str, at_ms: int, component: str, topic: str, partition: Optional[int],
                 keys_erased: int) -> bytes:
    """What an erasure did, where: the corp, when, and how many keys; no personal data."""
    return orjson.dumps({"kind": ERASED, "corp_id": corp_id, "at": at_ms, "component": component,
                         "topic": topic, "partition": partition, "keys_erased": keys_erased})


def fold_requests(erased: dict[str, int], value: Optional[bytes]) -> Optional[str]:
    """Apply one erasures-topic record to `erased` (corp -> the request's time). Returns the
    corp it changed, or None: audit records and anything unreadable change nothing."""
    try:
        record = orjson.loads(value) if value else None
    except orjson.JSONDecodeError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("corp_id"), str) or not record["corp_id"]:
        return None
    corp_id, kind = record["corp_id"], record.get("kind")
    if kind == REQUESTED and erased.get(corp_id) != record.get("at"):
        erased[corp_id] = int(record.get("at") or 0)
        return corp_id
    if kind == REINSTATED and corp_id in erased:
        del erased[corp_id]
        return corp_id
    return None


def corp_of_customer(key: str) -> str:
    return key.split(":", 1)[0]


@dataclass
class StateErasure:
    """The writes that erase some corps from one partition of the worker's state."""
    writes: list[Write] = field(default_factory=list)
    keys: Counter = field(default_factory=Counter)      # corp -> keys deleted or rewritten
    holds_dropped: int = 0


def erase_partition_state(scan: Scan, partition: int, corps: set[str]) -> StateErasure:
    """Every write that removes `corps` from partition `partition` of `reporting_state`
    (module docstring). `scan(prefix)` yields the partition's stored (key, value) pairs whose
    key starts with `prefix`; the caller has nothing staged (the store is the whole state)."""
    out = StateErasure()
    for corp_id in sorted(corps):
        for key, value in scan(b"c:%s:" % corp_id.encode()):
            out.writes.append((key, None))
            out.keys[corp_id] += 1
            out.holds_dropped += len(CustomerState.decode(value).holds)
    for key, _ in scan(b"e:"):                     # e:<length>:<customer>:<event id>
        _, length, rest = key.split(b":", 2)
        corp_id = corp_of_customer(rest[:int(length)].decode())
        if corp_id in corps:
            out.writes.append((key, None))
            out.keys[corp_id] += 1
    for key, value in scan(b"x:%d:" % partition):  # (ts, customer, event id)
        ts, customer, _ = orjson.loads(value)
        corp_id = corp_of_customer(customer)
        if customer and corp_id in corps:
            out.writes.append((key, orjson.dumps([ts, "", ""])))
            out.keys[corp_id] += 1
    for key, value in scan(b"h:%d:" % partition):  # a bucket's table of contents, or a chunk
        entries = orjson.loads(value)
        if not isinstance(entries, list):
            continue
        doomed = Counter(corp_of_customer(entry[1]) for entry in entries if corp_of_customer(entry[1]) in corps)
        if doomed:
            kept = [entry for entry in entries if corp_of_customer(entry[1]) not in corps]
            out.writes.append((key, orjson.dumps(kept)))
            out.keys.update(doomed)
    return out
