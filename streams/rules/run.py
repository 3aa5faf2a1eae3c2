"""`tagstream rules import|list|history|diff|unmap` (SPEC §9): the Kafka side and the output.

Reads, never writes, except `import` and `unmap`, which publish new versions to the rules
topic (`tag-mappings`) with acks=all and nothing else. No consumer group: the worker's offsets
never move. The rule book is the live worker's (`rule_versions` changelog + the rules topic,
as `tagstream replay` reads it), so the versions planned continue the worker's numbering; the
catalogue is `wecom-tags`, kept by the ingest. Both reads are bounded: each compacted topic
from its start to its end as of the call.

Output is a table on a terminal (rich) and JSON with `--json`; a refused file prints every
bad line on stderr and exits 1, having published nothing.
"""
from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Optional

import orjson
from aiokafka import AIOKafkaProducer
from rich.console import Console
from rich.table import Table

from schemas.records import ReportingRule
from streams.kafka.connection import producer_kwargs, start_client
from streams.kafka.reads import read_compacted
from streams.replay.run import load_rule_book, parse_time
from streams.replay.engine import format_time
from streams.rules.plan import (Catalogue, Plan, RulesFileError, plan_import, plan_unmap, read_rows,
                                rules_as_of)
from streams.settings import ConfigError, Settings

ACTIONS = ("import", "list", "history", "diff", "unmap")


async def load_catalogue(settings: Settings) -> Catalogue:
    return Catalogue.from_values(await read_compacted(settings, settings.topic("wecom_tags_topic")))


async def publish(settings: Settings, versions: list[ReportingRule]) -> None:
    """Each version to the rules topic, keyed `corp_id:tag_id`, acknowledged by all replicas."""
    producer = AIOKafkaProducer(**producer_kwargs(settings), client_id="tagstream-rules")
    await start_client(producer)
    try:
        futures = [await producer.send(settings.topic("tag_mappings_topic"), key=f"{r.corp_id}:{r.tag_id}".encode(),
                                       value=orjson.dumps(r.as_wire())) for r in versions]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


# -- output ---------------------------------------------------------------------------------

def _cell(value) -> str:
    return "—" if value is None else str(value)


def rules_table(title: str, rules: list[ReportingRule]) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("corp", "tag", "name", "type", "account", "action set", "action type", "effective from", "version"):
        table.add_column(column, justify="right" if column in ("account", "action set", "version") else "left")
    for r in rules:
        table.add_row(r.corp_id, r.tag_id, _cell(r.tag_name), r.standard_type or "unmapped", _cell(r.account_id),
                      _cell(r.user_action_set_id), _cell(r.action_type), format_time(r.effective_from), str(r.version))
    return table


def _wire(rules: list[ReportingRule]) -> list[dict]:
    return [r.as_wire() for r in rules]


def _refuse(plan: Plan, what: str, as_json: bool) -> int:
    if as_json:
        print(orjson.dumps({"published": [], "errors": [{"line": e.line, "reason": e.reason} for e in plan.errors]},
                           option=orjson.OPT_INDENT_2).decode())
    for error in plan.errors:
        where = f"line {error.line}: " if error.line else ""
        print(f"{what}: {where}{error.reason}", file=sys.stderr)
    lines = len({e.line for e in plan.errors})
    print(f"tagstream rules: refused ({lines} bad line{'s' * (lines != 1)}); nothing was published",
          file=sys.stderr)
    return 1


def _show_plan(plan: Plan, verb: str, as_json: bool, console: Console) -> None:
    if as_json:
        print(orjson.dumps({verb: _wire(plan.versions), "unchanged": plan.unchanged,
                            "replay_from": plan.retroactive_from}, option=orjson.OPT_INDENT_2).decode())
        return
    if plan.versions:
        console.print(rules_table(f"{len(plan.versions)} version(s) {verb}", plan.versions))
    console.print(f"{len(plan.versions)} new version(s) {verb}; {plan.unchanged} line(s) equal to a version "
                  "already there")
    if plan.retroactive_from is not None:
        console.print(f"retroactive: events since {format_time(plan.retroactive_from)} were reported by the old "
                      f"versions; to apply these to them, run\n  tagstream replay --from "
                      f"{format_time(plan.retroactive_from)} --to {format_time(int(time.time() * 1000))}")


def _key(text: Optional[str]) -> tuple[str, str]:
    corp_id, sep, tag_id = (text or "").partition(":")
    if not (corp_id and sep and tag_id):
        raise ConfigError(f"{text!r}: give the rule as CORP:TAG, e.g. ww51a2:etQ7x")
    return corp_id, tag_id


def _file(path: Optional[str]) -> tuple[str, str]:
    if not path:
        raise ConfigError("give the rules file: tagstream rules import FILE (CSV or YAML)")
    try:
        return Path(path).read_text(encoding="utf-8"), path
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None


# -- the command ----------------------------------------------------------------------------

async def run_rules(args, settings: Settings) -> int:
    # a terminal's width; piped or redirected, wide enough that no column is cut
    console = Console(soft_wrap=False, width=None if sys.stdout.isatty() else 200)
    now_ms = int(time.time() * 1000)
    book, _ = await load_rule_book(settings)
    if args.action == "list":
        as_of = parse_time("--as-of", args.as_of) if args.as_of else now_ms
        rules = rules_as_of(book, as_of, args.corp)
        if args.json:
            print(orjson.dumps(_wire(rules), option=orjson.OPT_INDENT_2).decode())
        else:
            console.print(rules_table(f"rules in force at {format_time(as_of)}: {len(rules)}", rules))
        return 0
    if args.action == "history":
        corp_id, tag_id = _key(args.target)
        history = book.history(corp_id, tag_id)
        if args.json:
            print(orjson.dumps(_wire(history), option=orjson.OPT_INDENT_2).decode())
        elif history:
            console.print(rules_table(f"{corp_id}:{tag_id}: {len(history)} version(s), in the order they apply",
                                      history))
        else:
            console.print(f"{corp_id}:{tag_id} has no rule")
        return 0
    catalogue = await load_catalogue(settings)
    if args.action == "unmap":
        corp_id, tag_id = _key(args.target)
        if not args.from_time:
            raise ConfigError("unmap needs --from TIME: from when the tag stops being reported (ISO-8601 or now)")
        from_ms = now_ms if args.from_time == "now" else parse_time("--from", args.from_time)
        plan = plan_unmap(corp_id, tag_id, from_ms, catalogue, book, now_ms, args.retroactive)
        what = f"{corp_id}:{tag_id}"
    else:
        text, name = _file(args.target)
        try:
            rows = read_rows(text, name)
        except RulesFileError as exc:
            raise ConfigError(f"{name}: {exc}") from None
        plan = plan_import(rows, catalogue, book, now_ms, args.retroactive)
        what = name
    if not plan.ok:
        return _refuse(plan, what, args.json)
    if args.action == "diff":
        _show_plan(plan, "would be published", args.json, console)
        return 0
    await publish(settings, plan.versions)
    _show_plan(plan, "published", args.json, console)
    return 0


def cmd_rules(args, settings: Settings) -> int:
    if args.action in ("import", "diff") and not args.target:
        raise ConfigError(f"give the rules file: tagstream rules {args.action} FILE (CSV or YAML)")
    return asyncio.run(run_rules(args, settings))
