"""The worker's local RocksDB state, trusted only after a clean shutdown.

Faust writes a table update to local RocksDB at once and to the changelog topic later,
through its producer buffer. A worker killed with SIGKILL (or by the OOM killer, or a
power cut) therefore leaves local state *ahead* of the changelog: writes that no other
worker will ever see, mixed with older ones restored from the changelog on restart. Kafka
Streams solves this with its `.checkpoint` file, which exists only after a clean close;
tagstream does the same: a `CLEAN` marker is written when the worker exits cleanly and
removed when it starts. A start without the marker wipes the local tables, and Faust
restores them from the changelog, the one source of truth.

tagstream's own store (`streams/state/store.py`, directory `reporting_state`) is exempt: it
writes RocksDB only after the changelog acknowledged the same writes, with the changelog
offset in the same atomic write, so whatever a crash leaves of it is a true prefix of the
changelog, and a restart reads only what follows.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

MARKER = "CLEAN"
CRASH_CONSISTENT = {"reporting_state"}


def open_local_state(data_dir: str) -> bool:
    """Prepare `data_dir` for a worker start. Returns True if local state was wiped."""
    root = Path(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    marker = root / MARKER
    tables = [p for p in root.iterdir() if p.name != MARKER and p.name not in CRASH_CONSISTENT]
    wiped = False
    if tables and not marker.exists():
        log.warning("local state in %s was not closed cleanly: wiping it; tables are restored "
                    "from their changelog topics", root)
        for path in tables:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        wiped = True
    marker.unlink(missing_ok=True)
    return wiped


def mark_clean(data_dir: str) -> None:
    """Call after the worker stopped cleanly (producer flushed, stores closed)."""
    (Path(data_dir) / MARKER).touch()
