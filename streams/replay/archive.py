"""NDJSON archives of the input topics, plain or gzip, as `tagstream archive` writes them:

    {"kind": "tag"|"contact"|"rule", "key": "corp:user", "value": {...}, "partition": 0,
     "offset": 17, "timestamp": 1763800000000}

`partition`, `offset` and `timestamp` are optional (the partition is then the one Kafka's
default partitioner picks for the key); `value_b64` replaces `value` for bytes that are not
JSON. Lines that fail validation are returned with their reason, never raised.
"""
from __future__ import annotations

import base64
import gzip
import os
from dataclasses import dataclass
from typing import IO, Iterable, Optional

import orjson
from streams.kafka.partitioner import kafka_partition

from schemas.validation import Rejection, RuleTombstone, decode_reporting_rule
from streams.core.rulebook import RuleBook
from streams.replay.engine import CONTACT, RULE, TAG, InputRecord
from streams.settings import ConfigError

def open_archive(path: str, mode: str = "rb") -> IO[bytes]:
    try:
        if path.endswith(".gz"):
            handle = gzip.open(path, mode)
            if "r" in mode:
                handle.peek(1)          # fail now, with a clear message, if it is not gzip
            return handle
        return open(path, mode)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, EOFError) as exc:
        raise ConfigError(f"{path}: cannot read it as {'gzip' if path.endswith('.gz') else 'NDJSON'} ({exc})") from None


def archive_line(kind: str, key: Optional[bytes], value: Optional[bytes], partition: int, offset: int,
                 timestamp: int) -> bytes:
    line = {"kind": kind, "key": None if key is None else key.decode("utf-8", "replace"),
            "partition": partition, "offset": offset, "timestamp": timestamp}
    try:
        line["value"] = None if value is None else orjson.loads(value)
    except orjson.JSONDecodeError:
        line["value_b64"] = base64.b64encode(value).decode()
    return orjson.dumps(line) + b"\n"


@dataclass
class ArchiveContents:
    book: RuleBook
    rules: int
    records: dict                    # (source, partition) -> [InputRecord] in offset order
    bad_lines: list                  # (origin, reason, raw line)


def read_archives(paths: Iterable[str], partitions: int, from_ms: Optional[int], to_ms: Optional[int]) -> ArchiveContents:
    """Every valid line of the archives; bad lines are returned, not raised."""
    book, rules = RuleBook(), 0
    records: dict[tuple[str, int], list] = {}
    bad: list = []
    sequence = 0
    for path in paths:
        with open_archive(path) as handle:
            for number, raw in enumerate(handle, 1):
                origin = f"{os.path.basename(path)}:{number}"
                if not raw.strip():
                    continue
                try:
                    line = orjson.loads(raw)
                except orjson.JSONDecodeError as exc:
                    bad.append((origin, f"not JSON: {exc}", raw))
                    continue
                problem = _line_problem(line)
                if problem:
                    bad.append((origin, problem, raw))
                    continue
                key = None if line.get("key") is None else line["key"].encode()
                value = (base64.b64decode(line["value_b64"]) if "value_b64" in line
                         else None if line.get("value") is None else orjson.dumps(line["value"]))
                if line["kind"] == RULE:
                    rule = decode_reporting_rule(key, value)
                    if isinstance(rule, Rejection):
                        bad.append((origin, f"{rule.error}: {rule.detail}", raw))
                    elif isinstance(rule, RuleTombstone):
                        book.delete(rule.corp_id, rule.tag_id)
                    else:
                        book.add(rule)
                        rules += 1
                    continue
                timestamp = line.get("timestamp")
                if timestamp is not None and ((from_ms is not None and timestamp < from_ms)
                                              or (to_ms is not None and timestamp >= to_ms)):
                    continue
                partition = line.get("partition")
                if partition is None:
                    partition = kafka_partition(key, partitions) if key else 0
                sequence += 1
                offset = line.get("offset", sequence)
                records.setdefault((line["kind"], partition), []).append(
                    InputRecord(line["kind"], partition, offset, key, value, origin, timestamp))
    for batch in records.values():
        batch.sort(key=lambda r: r.offset)
    return ArchiveContents(book, rules, records, bad)


def _line_problem(line) -> Optional[str]:
    if not isinstance(line, dict):
        return "not a JSON object"
    if line.get("kind") not in (TAG, CONTACT, RULE):
        return f"kind: expected tag, contact or rule, got {line.get('kind')!r}"
    if line.get("key") is not None and not isinstance(line["key"], str):
        return "key: expected a string"
    for name in ("partition", "offset", "timestamp"):
        if line.get(name) is not None and (not isinstance(line[name], int) or isinstance(line[name], bool)
                                           or line[name] < 0):
            return f"{name}: expected a non-negative integer"
    if "value_b64" in line:
        try:
            base64.b64decode(line["value_b64"], validate=True)
        except (ValueError, TypeError):
            return "value_b64: not base64"
    elif "value" not in line:
        return "value: missing (use null for a tombstone)"
    return None


