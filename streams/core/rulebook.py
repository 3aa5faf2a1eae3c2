"""Versioned reporting rules, looked up as of event time (SPEC §3.3).

The rules topic is compacted by `corp_id:tag_id`, so Kafka keeps only the newest record per
key. An event must still see the version that was in force at its own `ts`, so the worker
folds every record into the full version history of its key (`with_rule`) and keeps that
history in a changelogged table. `RuleBook` is the in-memory index over those histories
that each worker consults; `rule_as_of` is a function of (key, ts) and nothing else, which
is what makes a replay give the same answer as the live run.

Plain Python: no Faust, no Kafka.
"""
from __future__ import annotations

import bisect
from typing import Iterable, Iterator, Optional

import orjson

from schemas.records import ReportingRule


def _order(rule: ReportingRule) -> tuple[int, int]:
    return (rule.effective_from, rule.version)


def with_rule(history: Iterable[ReportingRule], rule: ReportingRule) -> list[ReportingRule]:
    """The version history of one key after `rule` arrives, sorted by (effective_from,
    version). A redelivered record replaces its own earlier copy, so folding is idempotent."""
    kept = [r for r in history if _order(r) != _order(rule)]
    kept.append(rule)
    kept.sort(key=_order)
    return kept


def encode_history(history: list[ReportingRule]) -> bytes:
    return orjson.dumps([r.as_wire() for r in history])


def decode_history(payload: bytes) -> list[ReportingRule]:
    return [ReportingRule(**fields) for fields in orjson.loads(payload)]


class RuleBook:
    """Every key's version history, indexed for as-of lookups."""

    __slots__ = ("_histories", "_starts", "versions")

    def __init__(self) -> None:
        self._histories: dict[tuple[str, str], list[ReportingRule]] = {}
        self._starts: dict[tuple[str, str], list[tuple[int, int]]] = {}
        self.versions = 0

    def put_history(self, corp_id: str, tag_id: str, history: list[ReportingRule]) -> None:
        key = (corp_id, tag_id)
        self.versions -= len(self._histories.get(key, ()))
        if history:
            ordered = sorted(history, key=_order)
            self._histories[key] = ordered
            self._starts[key] = [_order(r) for r in ordered]
            self.versions += len(ordered)
        else:
            self._histories.pop(key, None)
            self._starts.pop(key, None)

    def apply_changelog(self, key: bytes, value: Optional[bytes]) -> None:
        """One record of the `rule_versions` changelog: `corp_id:tag_id` -> the key's whole
        encoded history, or a tombstone."""
        corp_id, _, tag_id = key.decode().partition(":")
        self.put_history(corp_id, tag_id, decode_history(value) if value is not None else [])

    def delete(self, corp_id: str, tag_id: str) -> None:
        """A tombstone: every version of the key is gone."""
        self.put_history(corp_id, tag_id, [])

    def add(self, rule: ReportingRule) -> None:
        self.put_history(rule.corp_id, rule.tag_id,
                         with_rule(self._histories.get((rule.corp_id, rule.tag_id), ()), rule))

    def rule_as_of(self, corp_id: str, tag_id: str, ts: int) -> Optional[ReportingRule]:
        """The version with the greatest effective_from <= ts (ties: greatest version)."""
        starts = self._starts.get((corp_id, tag_id))
        if not starts:
            return None
        # (ts, +inf) sorts after every version that starts at ts.
        index = bisect.bisect_right(starts, (ts, float("inf"))) - 1
        return self._histories[(corp_id, tag_id)][index] if index >= 0 else None

    def history(self, corp_id: str, tag_id: str) -> list[ReportingRule]:
        """Every version of one key, in (effective_from, version) order."""
        return list(self._histories.get((corp_id, tag_id), ()))

    def all_rules(self) -> Iterator[ReportingRule]:
        """Every version of every key (for archives)."""
        for history in self._histories.values():
            yield from history

    def __len__(self) -> int:
        return len(self._histories)
