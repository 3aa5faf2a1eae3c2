"""Failpoints: crash a process at an exact point of its commit path, for crash tests.

A SIGKILL sent from outside lands wherever the worker happens to be; a fast worker often
finishes a small log between two looks at it. A failpoint makes the crash land where it
hurts most: with reports sent but no state written, with the changelog written but local
state not, and so on. `TAGSTREAM_FAILPOINT=name:n` makes the worker SIGKILL itself the n-th
time it reaches `failpoint(name)`, which is exactly what an outside SIGKILL at that moment
would do. Unset (always, outside tests), a failpoint costs one comparison.

Names (agents/customers.py, `_make_durable`):
- `reports-acked`:   the batch's reports are on the broker; its state is not.
- `changelog-sent`:  the state's changelog records are handed to the producer, not acked.
- `changelog-acked`: the changelog has the state; local RocksDB does not.
- `state-durable`:   state is durable; Faust may not commit the offsets yet.

The WeCom ingest and enrichment (streams/wecom/):
- `callback-written`: the ingest wrote a callback to wecom-callbacks, and has not answered.
- `enrich-sent`:      the enrichment sent a batch's events and snapshots in its transaction,
                      and has not committed it.
- `permanent-code-fetched`: get_permanent_code answered; the code is not saved (the window
                      the protocol leaves open, docs/provider.md).
- `permanent-code-saved`: the sealed code is acknowledged on wecom-auth; the create_auth's
                      batch is not committed.

Erasure of a corp that left (streams/core/erasure.py):
- `erasure-staged`:   the worker staged a partition's erasure and sent its audit; nothing
                      of it is durable.
- `delivered-erased`: the sink sent a partition's tombstones on the delivered record; not
                      its audit, and the acks are not awaited.
"""
from __future__ import annotations

import os
import signal
from typing import Optional

NAMES = ("reports-acked", "changelog-sent", "changelog-acked", "state-durable", "callback-written", "enrich-sent",
         "permanent-code-fetched", "permanent-code-saved", "erasure-staged", "delivered-erased")


def _parse(spec: Optional[str]) -> Optional[tuple[str, int]]:
    if not spec:
        return None
    name, _, count = spec.partition(":")
    if name not in NAMES or not count.isdigit() or int(count) < 1:
        raise SystemExit(f"tagstream: error: TAGSTREAM_FAILPOINT={spec!r}: use NAME:N with NAME one of "
                         f"{', '.join(NAMES)} and N >= 1 (or unset it)")
    return name, int(count)


_armed = _parse(os.environ.get("TAGSTREAM_FAILPOINT"))
_hits = 0


def failpoint(name: str) -> None:
    global _hits
    if _armed is None or _armed[0] != name:
        return
    _hits += 1
    if _hits >= _armed[1]:
        os.kill(os.getpid(), signal.SIGKILL)
