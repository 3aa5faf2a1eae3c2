"""Versioned reporting rules looked up as of event time (SPEC §3.3)."""
from schemas.records import ReportingRule
from streams.core.rulebook import RuleBook, decode_history, encode_history, with_rule


def rule(standard_type, effective_from, version, tag_id="t1"):
    return ReportingRule(corp_id="ww1", tag_id=tag_id, standard_type=standard_type,
                         effective_from=effective_from, version=version,
                         account_id=1 if standard_type else None,
                         user_action_set_id=2 if standard_type else None)


def test_the_version_in_force_at_ts_is_used():
    book = RuleBook()
    for r in (rule("LEAD", 100, 1), rule("VALID", 200, 2), rule(None, 300, 3)):
        book.add(r)
    assert book.rule_as_of("ww1", "t1", 99) is None
    assert book.rule_as_of("ww1", "t1", 100).standard_type == "LEAD"
    assert book.rule_as_of("ww1", "t1", 199).standard_type == "LEAD"
    assert book.rule_as_of("ww1", "t1", 200).standard_type == "VALID"
    assert book.rule_as_of("ww1", "t1", 10**13).standard_type is None
    assert book.rule_as_of("ww1", "other", 250) is None


def test_ties_on_effective_from_go_to_the_greatest_version():
    book = RuleBook()
    book.add(rule("CONSULT", 100, 7))
    book.add(rule("LEAD", 100, 2))
    assert book.rule_as_of("ww1", "t1", 100).standard_type == "CONSULT"


def test_versions_may_arrive_out_of_order_and_twice():
    history = []
    for r in (rule("VALID", 200, 2), rule("LEAD", 100, 1), rule("VALID", 200, 2)):
        history = with_rule(history, r)
    assert [(r.effective_from, r.version) for r in history] == [(100, 1), (200, 2)]


def test_a_tombstone_deletes_every_version():
    book = RuleBook()
    book.add(rule("LEAD", 100, 1))
    book.add(rule("VALID", 200, 2))
    assert book.versions == 2
    book.delete("ww1", "t1")
    assert book.rule_as_of("ww1", "t1", 500) is None
    assert book.versions == 0 and len(book) == 0


def test_history_round_trips_through_its_changelog_encoding():
    history = [rule("LEAD", 100, 1), rule(None, 200, 2)]
    assert decode_history(encode_history(history)) == history
