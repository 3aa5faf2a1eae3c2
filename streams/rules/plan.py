"""`tagstream rules`, the pure part (SPEC §9): read a rules file, check every line, resolve
tag names through the catalogue, and plan the versions an import would publish. No Kafka:
`streams.rules.run` reads the rule book and the catalogue and publishes the plan.

**The file.** CSV (what an advertiser exports from a spreadsheet) or YAML (a list of
mappings, or `{"rules": [...]}`), with the columns

    corp_id, tag, standard_type, account_id, user_action_set_id, action_type, effective_from

`tag` is a tag id or a tag name; a `tag_id` or `tag_name` column says which. A name is
resolved through the corp's catalogue (`wecom-tags`, kept by the ingest); an id is taken as
it is. `action_type` may be empty (the type's default). `effective_from` is an ISO-8601
time (naive means UTC), epoch milliseconds, or `now`.

**All or nothing.** Any bad line refuses the whole file, and every bad line is listed with
its reason: a malformed value, an unknown standard type, an unknown or ambiguous tag name,
two mappings of one tag, a missing account or action set, an `effective_from` in the past.
The last needs `--retroactive`, because live processing has already passed that moment:
events before now were reported by the old version, and only a replay of the range from
`effective_from` applies the new one to them (the plan says which range).

**Versions.** Every change is a new version (`version` = the key's highest + 1); none is
ever rewritten. A line equal to a version the key already has (same `effective_from`, type,
account, action set and action type) publishes nothing, so importing a file twice is
harmless.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Iterable, Mapping, Optional

import orjson
import yaml

from schemas.records import STANDARD_TYPES, ReportingRule
from streams.core.rulebook import RuleBook
from streams.replay.engine import format_time

COLUMNS = ("corp_id", "tag", "standard_type", "account_id", "user_action_set_id", "action_type", "effective_from")
#: an `effective_from` this far before the plan's `now` still counts as now (a file written
#: with `now`, or a clock a little off)
PAST_GRACE_MS = 60_000


class RulesFileError(ValueError):
    """The file cannot be read at all (one line of explanation)."""


@dataclass(frozen=True)
class Row:
    line: int                      # 1-based: the CSV line, or the YAML item's first line
    fields: Mapping[str, object]


@dataclass(frozen=True)
class LineError:
    line: int
    reason: str


@dataclass
class Plan:
    versions: list[ReportingRule] = field(default_factory=list)     # to publish, in file order
    errors: list[LineError] = field(default_factory=list)
    unchanged: int = 0                  # lines equal to a version already there
    retroactive_from: Optional[int] = None    # the earliest past effective_from (with --retroactive)

    @property
    def ok(self) -> bool:
        return not self.errors


# -- reading ------------------------------------------------------------------------------

def read_rows(text: str, name: str) -> list[Row]:
    """The rows of a rules file: YAML if `name` ends in .yaml/.yml, else CSV."""
    if name.lower().endswith((".yaml", ".yml")):
        return _yaml_rows(text)
    return _csv_rows(text)


def _normalise(fields: Mapping) -> dict[str, object]:
    return {str(k).strip().lower(): v.strip() if isinstance(v, str) else v for k, v in fields.items() if k is not None}


def _csv_rows(text: str) -> list[Row]:
    reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff")))      # a spreadsheet's BOM
    header = [h.strip().lower() for h in reader.fieldnames or []]
    if "corp_id" not in header or not {"tag", "tag_id", "tag_name"} & set(header):
        raise RulesFileError(f"the header {','.join(header) or '(none)'} lacks corp_id and tag (or tag_id, "
                             f"tag_name); the columns are {', '.join(COLUMNS)}")
    return [Row(reader.line_num, _normalise(fields)) for fields in reader if any((v or "").strip()
                                                                                  for v in fields.values() if isinstance(v, str))]


def _yaml_rows(text: str) -> list[Row]:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return []
        if isinstance(node, yaml.MappingNode):       # {"rules": [...]}
            node = next((v for k, v in node.value if getattr(k, "value", None) == "rules"), None)
        if not isinstance(node, yaml.SequenceNode):
            raise RulesFileError("a YAML rules file is a list of rules (or a mapping with a `rules:` list)")
        rows = []
        for item in node.value:
            value = loader.construct_object(item, deep=True)
            rows.append(Row(item.start_mark.line + 1, _normalise(value) if isinstance(value, dict) else {"": value}))
        return rows
    except yaml.YAMLError as exc:
        raise RulesFileError(f"not valid YAML: {str(exc).splitlines()[0]}") from None
    finally:
        loader.dispose()


# -- the catalogue ------------------------------------------------------------------------

@dataclass
class Catalogue:
    """The corps' tags as `wecom-tags` holds them: ids, names, and the ids of each name."""
    names: dict[tuple[str, str], str] = field(default_factory=dict)          # (corp, tag id) -> name
    by_name: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # (corp, name) -> tag ids

    @classmethod
    def from_values(cls, values: Mapping[str, bytes]) -> "Catalogue":
        catalogue = cls()
        for key, value in values.items():
            corp_id, _, tag_id = key.partition(":")
            try:
                name = orjson.loads(value).get("tag_name")
            except (orjson.JSONDecodeError, AttributeError):
                continue
            catalogue.add(corp_id, tag_id, name)
        return catalogue

    def add(self, corp_id: str, tag_id: str, name: Optional[str]) -> None:
        self.names[(corp_id, tag_id)] = name
        if name:
            self.by_name.setdefault((corp_id, name), []).append(tag_id)

    def tags_of(self, corp_id: str) -> int:
        return sum(1 for corp, _ in self.names if corp == corp_id)


# -- checking and planning ----------------------------------------------------------------

def parse_time_ms(text: object, now_ms: int) -> int:
    """`now`, epoch milliseconds, or ISO-8601 (naive means UTC)."""
    if isinstance(text, bool):
        raise ValueError(text)
    if isinstance(text, int):
        return text
    if isinstance(text, datetime):
        moment = text
    else:
        value = str(text).strip()
        if value.lower() == "now":
            return now_ms
        if value.isdigit():
            return int(value)
        moment = datetime.fromisoformat(value.replace("Z", "+00:00") if value.endswith("Z") else value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp() * 1000)


def _text(fields: Mapping[str, object], name: str) -> str:
    value = fields.get(name)
    return "" if value is None else str(value).strip()


def _positive_int(fields: Mapping[str, object], name: str, errors: list[str]) -> Optional[int]:
    text = _text(fields, name)
    if not text:
        errors.append(f"missing {name}")
        return None
    try:
        number = int(text)
    except ValueError:
        errors.append(f"{name} {text!r} is not a number")
        return None
    if number <= 0:
        errors.append(f"{name} {number} is not positive")
        return None
    return number


def resolve_tag(fields: Mapping[str, object], corp_id: str, catalogue: Catalogue) -> tuple[Optional[str], Optional[str]]:
    """(tag id, None) or (None, why not). A `tag_id` is taken as it is; a `tag_name` must be
    in the catalogue once; a `tag` is an id the catalogue knows, else a name."""
    tag_id, tag_name, tag = _text(fields, "tag_id"), _text(fields, "tag_name"), _text(fields, "tag")
    if tag_id:
        return tag_id, None
    if not (tag_name or tag):
        return None, "missing tag (a tag id or a tag name)"
    if tag and not tag_name and (corp_id, tag) in catalogue.names:
        return tag, None
    name = tag_name or tag
    ids = catalogue.by_name.get((corp_id, name), [])
    if len(ids) == 1:
        return ids[0], None
    if ids:
        return None, f"ambiguous tag name {name!r} in corp {corp_id}: tag ids {', '.join(sorted(ids))} (give the id)"
    return None, (f"unknown tag name {name!r} in corp {corp_id} (its catalogue in wecom-tags has "
                  f"{catalogue.tags_of(corp_id)} tags; a tag id is taken as it is in a tag_id column)")


def _same(a: ReportingRule, b: ReportingRule) -> bool:
    return (a.effective_from, a.standard_type, a.account_id, a.user_action_set_id, a.action_type) == \
        (b.effective_from, b.standard_type, b.account_id, b.user_action_set_id, b.action_type)


def plan_import(rows: Iterable[Row], catalogue: Catalogue, book: RuleBook, now_ms: int,
                retroactive: bool = False) -> Plan:
    """Check every row and plan the versions to publish (module docstring)."""
    plan = Plan()
    first_line: dict[tuple[str, str], int] = {}
    for row in rows:
        errors: list[str] = []
        fields = row.fields
        corp_id = _text(fields, "corp_id")
        if "" in fields and len(fields) == 1:
            plan.errors.append(LineError(row.line, "not a mapping of columns to values"))
            continue
        if not corp_id:
            errors.append("missing corp_id")
        tag_id, why = resolve_tag(fields, corp_id, catalogue) if corp_id else (None, None)
        if why:
            errors.append(why)
        standard_type = _text(fields, "standard_type").upper()
        if not standard_type:
            errors.append("missing standard_type (to stop reporting a tag, use `tagstream rules unmap`)")
        elif standard_type not in STANDARD_TYPES:
            errors.append(f"unknown standard type {standard_type!r} (one of {', '.join(STANDARD_TYPES)})")
        account_id = _positive_int(fields, "account_id", errors)
        action_set = _positive_int(fields, "user_action_set_id", errors)
        effective_from = None
        raw_time = fields.get("effective_from")
        if raw_time is None or _text(fields, "effective_from") == "":
            errors.append("missing effective_from (a time, or `now`)")
        else:
            try:
                effective_from = parse_time_ms(raw_time, now_ms)
            except (ValueError, TypeError):
                errors.append(f"effective_from {_text(fields, 'effective_from')!r} is not a time "
                              "(ISO-8601 like 2026-12-07T00:00:00+08:00, epoch ms, or now)")
        if effective_from is not None and effective_from < now_ms - PAST_GRACE_MS:
            if retroactive:
                plan.retroactive_from = min(effective_from, plan.retroactive_from or effective_from)
            else:
                errors.append(f"effective_from {format_time(effective_from)} is in the past: live processing has "
                              f"passed it; import with --retroactive, then replay the range it changes "
                              f"(tagstream replay --from {format_time(effective_from)} --to {format_time(now_ms)})")
        if corp_id and tag_id:
            earlier = first_line.setdefault((corp_id, tag_id), row.line)
            if earlier != row.line:
                errors.append(f"tag {tag_id} of corp {corp_id} is mapped twice in this file (also line {earlier})")
        if errors:
            plan.errors += [LineError(row.line, reason) for reason in errors]
            continue
        history = book.history(corp_id, tag_id)
        rule = ReportingRule(corp_id=corp_id, tag_id=tag_id, standard_type=standard_type,
                             effective_from=effective_from, version=max((r.version for r in history), default=0) + 1,
                             account_id=account_id, user_action_set_id=action_set,
                             tag_name=catalogue.names.get((corp_id, tag_id)),
                             action_type=_text(fields, "action_type") or None)
        if any(_same(rule, existing) for existing in history):
            plan.unchanged += 1
            continue
        plan.versions.append(rule)
    if plan.errors:
        plan.versions = []
    return plan


def plan_unmap(corp_id: str, tag_id: str, from_ms: int, catalogue: Catalogue, book: RuleBook, now_ms: int,
               retroactive: bool = False) -> Plan:
    """The version that stops reporting `corp_id:tag_id` from `from_ms` on."""
    plan = Plan()
    history = book.history(corp_id, tag_id)
    if not history:
        plan.errors.append(LineError(0, f"{corp_id}:{tag_id} has no rule to unmap"))
        return plan
    if from_ms < now_ms - PAST_GRACE_MS:
        if not retroactive:
            plan.errors.append(LineError(0, f"--from {format_time(from_ms)} is in the past: live processing has passed "
                                            f"it; add --retroactive, then replay the range it changes (tagstream "
                                            f"replay --from {format_time(from_ms)} --to {format_time(now_ms)})"))
            return plan
        plan.retroactive_from = from_ms
    rule = ReportingRule(corp_id=corp_id, tag_id=tag_id, standard_type=None, effective_from=from_ms,
                         version=max(r.version for r in history) + 1,
                         tag_name=catalogue.names.get((corp_id, tag_id)) or history[-1].tag_name)
    if any(_same(rule, existing) for existing in history):
        plan.unchanged = 1
    else:
        plan.versions.append(rule)
    return plan


def rules_as_of(book: RuleBook, as_of_ms: int, corp_id: Optional[str] = None) -> list[ReportingRule]:
    """The version of each key in force at `as_of_ms` (unmapped ones included), by key."""
    keys = sorted({(r.corp_id, r.tag_id) for r in book.all_rules() if corp_id is None or r.corp_id == corp_id})
    return [rule for rule in (book.rule_as_of(c, t, as_of_ms) for c, t in keys) if rule is not None]
