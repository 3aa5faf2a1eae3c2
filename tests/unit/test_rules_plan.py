"""Planning a rules import without a broker (streams/rules/plan.py): names resolve through
the catalogue, ids are taken as they are, every bad line is listed with its reason and then
nothing is planned, the past needs --retroactive and names the replay range, versions only
grow, and a second import of the same file plans nothing."""
from __future__ import annotations

import orjson
import pytest

from schemas.records import ReportingRule
from streams.core.rulebook import RuleBook
from streams.replay.engine import format_time
from streams.rules.plan import (Catalogue, RulesFileError, plan_import, plan_unmap, read_rows,
                                rules_as_of)

NOW = 1_796_000_000_000          # 2026-11-30
DAY = 86_400_000


def catalogue() -> Catalogue:
    return Catalogue.from_values({
        "ww1:etA": orjson.dumps({"tag_name": "核心"}), "ww1:etB": orjson.dumps({"tag_name": "高意向"}),
        "ww1:etC": orjson.dumps({"tag_name": "已加群"}), "ww1:etD": orjson.dumps({"tag_name": "重复"}),
        "ww1:etE": orjson.dumps({"tag_name": "重复"}), "ww2:etA": orjson.dumps({"tag_name": "核心"})})


def book(*rules: ReportingRule) -> RuleBook:
    b = RuleBook()
    for rule in rules:
        b.add(rule)
    return b


CSV = """corp_id,tag,standard_type,account_id,user_action_set_id,action_type,effective_from
ww1,核心,VALID,2001,11001,,2026-12-01T00:00:00+08:00
ww1,高意向,valid,2001,11001,,2026-12-01T00:00:00+08:00
ww1,etC,ORDER,2001,11001,COMPLETE_ORDER,now
ww2,核心,LEAD,3001,12001,,1796100000000
"""


def test_names_and_ids_resolve_and_each_line_becomes_a_new_version():
    existing = ReportingRule("ww1", "etA", "CONSULT", NOW - 10 * DAY, 4, 2001, 11001, "核心")
    plan = plan_import(read_rows(CSV, "rules.csv"), catalogue(), book(existing), NOW)
    assert plan.ok and plan.unchanged == 0
    got = [(r.corp_id, r.tag_id, r.standard_type, r.version, r.tag_name, r.action_type) for r in plan.versions]
    assert got == [("ww1", "etA", "VALID", 5, "核心", None), ("ww1", "etB", "VALID", 1, "高意向", None),
                   ("ww1", "etC", "ORDER", 1, "已加群", "COMPLETE_ORDER"), ("ww2", "etA", "LEAD", 1, "核心", None)]
    assert format_time(plan.versions[0].effective_from) == "2026-11-30T16:00:00Z" and plan.versions[2].effective_from == NOW


def test_importing_the_same_file_again_plans_nothing():
    first = plan_import(read_rows(CSV, "rules.csv"), catalogue(), book(), NOW)
    again = plan_import(read_rows(CSV, "rules.csv"), catalogue(), book(*first.versions), NOW)
    assert again.ok and again.versions == [] and again.unchanged == 4


def test_every_bad_line_is_listed_with_its_reason_and_nothing_is_planned():
    text = """corp_id,tag,standard_type,account_id,user_action_set_id,action_type,effective_from
ww1,核心,VALID,2001,11001,,now
ww1,核心,LEAD,2001,11001,,now
ww1,重复,VALID,2001,11001,,now
ww1,不存在,VALID,2001,11001,,now
ww1,etB,GOOD,2001,11001,,now
ww1,etC,VALID,,11001,,now
ww1,etE,VALID,2001,x,,tomorrow
ww1,etD,VALID,2001,11001,,2026-01-01
,etD,VALID,2001,11001,,now
"""
    plan = plan_import(read_rows(text, "bad.csv"), catalogue(), book(), NOW)
    assert plan.versions == []
    reasons = {line: reason for line, reason in ((e.line, e.reason) for e in plan.errors)}
    lines = sorted({e.line for e in plan.errors})
    assert lines == [3, 4, 5, 6, 7, 8, 9, 10]
    assert "mapped twice in this file (also line 2)" in reasons[3]
    assert "ambiguous tag name '重复' in corp ww1: tag ids etD, etE" in reasons[4]
    assert "unknown tag name '不存在'" in reasons[5]
    assert "unknown standard type 'GOOD'" in reasons[6]
    assert reasons[7] == "missing account_id"
    assert {e.reason for e in plan.errors if e.line == 8} >= {"user_action_set_id 'x' is not a number"}
    assert any("is not a time" in e.reason for e in plan.errors if e.line == 8)
    assert "--retroactive" in reasons[9] and "tagstream replay --from 2026-01-01T00:00:00Z" in reasons[9]
    assert reasons[10] == "missing corp_id"


def test_the_past_is_allowed_with_retroactive_and_the_plan_names_the_earliest_moment():
    text = "corp_id,tag_id,standard_type,account_id,user_action_set_id,effective_from\n" \
           "ww9,etZ,VALID,1,2,2026-01-01\nww9,etY,VALID,1,2,2026-02-01\n"
    plan = plan_import(read_rows(text, "r.csv"), catalogue(), book(), NOW, retroactive=True)
    assert plan.ok and [r.tag_id for r in plan.versions] == ["etZ", "etY"]     # ids as they are
    assert format_time(plan.retroactive_from) == "2026-01-01T00:00:00Z"


def test_yaml_rows_carry_their_line_numbers():
    text = """rules:
  - {corp_id: ww1, tag: 核心, standard_type: VALID, account_id: 2001, user_action_set_id: 11001, effective_from: now}
  - corp_id: ww1
    tag: nope
    standard_type: VALID
    account_id: 2001
    user_action_set_id: 11001
    effective_from: now
"""
    plan = plan_import(read_rows(text, "r.yaml"), catalogue(), book(), NOW)
    assert [(e.line, e.reason.split(" (")[0]) for e in plan.errors] == [(3, "unknown tag name 'nope' in corp ww1")]


def test_unreadable_files_are_one_line_errors():
    with pytest.raises(RulesFileError, match="lacks corp_id and tag"):
        read_rows("a,b\n1,2\n", "r.csv")
    with pytest.raises(RulesFileError, match="not valid YAML"):
        read_rows("- [unclosed", "r.yaml")
    with pytest.raises(RulesFileError, match="a list of rules"):
        read_rows("just: text", "r.yml")


def test_unmap_is_a_new_version_without_a_type_and_rules_as_of_sees_it():
    mapped = ReportingRule("ww1", "etC", "VALID", NOW - 30 * DAY, 2, 2001, 11001, "已加群")
    plan = plan_unmap("ww1", "etC", NOW + DAY, catalogue(), book(mapped), NOW)
    assert plan.ok and [(r.standard_type, r.version, r.effective_from) for r in plan.versions] == [(None, 3, NOW + DAY)]
    after = book(mapped, *plan.versions)
    assert [r.standard_type for r in rules_as_of(after, NOW)] == ["VALID"]
    assert [r.standard_type for r in rules_as_of(after, NOW + 2 * DAY)] == [None]
    assert not plan_unmap("ww1", "etC", NOW - DAY, catalogue(), book(mapped), NOW).ok
    assert "has no rule" in plan_unmap("ww1", "etQ", NOW, catalogue(), book(), NOW).errors[0].reason
