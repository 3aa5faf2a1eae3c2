"""The reporting sink: delivers conversion reports from the outbound topic to a target.

Targets: `file:PATH` (NDJSON, one report per line) and `stdout`. Offsets are committed only
after the lines are written and flushed to disk, so a crash re-delivers rather than loses.
(The Marketing API target of SPEC §5, with its acknowledged-id record, is built on this.)
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import IO

from aiokafka import AIOKafkaConsumer

from streams.settings import ConfigError, Settings

log = logging.getLogger(__name__)


def open_target(target: str) -> IO[bytes]:
    if target == "stdout":
        return sys.stdout.buffer
    if target.startswith("file:") and len(target) > 5:
        path = target[5:]
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return open(path, "ab")
    raise ConfigError(f"--target {target!r}: use file:PATH (NDJSON) or stdout")


async def run_file_sink(settings: Settings, target: str, stop: asyncio.Event) -> int:
    """Copy reports to the target until `stop` is set; returns how many were written."""
    out = open_target(target)
    consumer = AIOKafkaConsumer(
        settings.topic("conversion_reports_topic"),
        bootstrap_servers=settings.bootstrap_servers, group_id=f"{settings.app_id}-sink",
        enable_auto_commit=False, auto_offset_reset="earliest", isolation_level="read_committed")
    await consumer.start()
    written = 0
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=200, max_records=2000)
            if not batches:
                continue
            for records in batches.values():
                for record in records:
                    out.write(record.value + b"\n")
                    written += 1
            out.flush()
            if out is not sys.stdout.buffer:
                # Durable before the offsets move: a crash here re-writes, never loses.
                await asyncio.get_running_loop().run_in_executor(None, os.fsync, out.fileno())
            await consumer.commit()
    finally:
        await consumer.stop()
        if out is not sys.stdout.buffer:
            out.close()
    return written
