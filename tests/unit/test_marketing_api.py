"""The sink's pure parts: requests within the API's limits, and what each answer means."""
import orjson
import pytest

from streams.sinks.marketing_api import MAX_BODY_BYTES, Outcome, TokenSource, action_of, classify, pack


def _report(i: int, account: int = 1, action_set: int = 10, padding: int = 0) -> dict:
    return {"outer_action_id": f"{i:064x}", "account_id": account, "user_action_set_id": action_set,
            "action_type": "CUSTOM" if i % 2 else "RESERVATION",
            "custom_action": "LONG_TERM_CONVERSION" if i % 2 else None, "action_time": 1763884800,
            "user_id": {"wechat_app_id": "wx", "wechat_unionid": "u" + "x" * padding}, "trace": {},
            "standard_type": "LEAD", "corp_id": "ww", "external_userid": "wm", "emitted_at": 1}


@pytest.mark.parametrize("status, answer, outcome", [
    (200, {"code": 0, "message": ""}, Outcome.DELIVERED),
    (200, {"code": 10000}, Outcome.RETRY),
    (200, {"code": 11017}, Outcome.RETRY),
    (200, {"code": 11000}, Outcome.RELOAD_TOKEN),
    (200, {"code": 11002}, Outcome.RELOAD_TOKEN),
    (200, {"code": 31001}, Outcome.PERMANENT),
    (500, None, Outcome.RETRY),
    (503, None, Outcome.RETRY),
    (429, None, Outcome.RETRY),
    (None, None, Outcome.RETRY),                 # timeout or dropped connection
    (400, None, Outcome.PERMANENT),
    (200, "not an object", Outcome.PERMANENT),
])
def test_each_answer_is_classified_as_spec_section_5_says(status, answer, outcome):
    assert classify(status, answer) is outcome


def test_an_action_carries_only_what_the_api_takes():
    action = action_of(_report(1))
    assert set(action) == {"outer_action_id", "action_time", "action_type", "custom_action", "user_id"}
    assert "custom_action" not in action_of(_report(2))          # only for CUSTOM
    assert action_of({**_report(2), "user_id": {}, "trace": {"click_id": "c"}})["trace"] == {"click_id": "c"}


def test_requests_never_mix_accounts_or_action_sets_and_hold_at_most_50_actions():
    reports = [_report(i, account=1 + i % 3, action_set=10 + i % 2) for i in range(400)]
    batches = pack(reports)
    assert sum(len(b.reports) for b in batches) == 400
    for batch in batches:
        assert 1 <= len(batch.reports) <= 50
        assert {(r["account_id"], r["user_action_set_id"]) for r in batch.reports} == \
            {(batch.account_id, batch.user_action_set_id)}
        assert orjson.loads(batch.body())["actions"] == [action_of(r) for r in batch.reports]


def test_requests_stay_within_50_kb():
    reports = [_report(i, padding=3000) for i in range(60)]      # ~3 KB each
    batches = pack(reports)
    assert all(len(b.body()) <= MAX_BODY_BYTES for b in batches)
    assert len(batches) > 2 and sum(len(b.reports) for b in batches) == 60


def test_order_within_an_account_is_kept():
    reports = [_report(i) for i in range(120)]
    assert [r["outer_action_id"] for b in pack(reports) for r in b.reports] == [r["outer_action_id"] for r in reports]


def test_a_token_file_is_reread_and_the_token_redacted(tmp_path):
    path = tmp_path / "token"
    path.write_text("first-token\n")
    source = TokenSource(path=str(path))
    assert source.token == "first-token" and source.reload() is False
    path.write_text("second-token")
    assert source.reload() is True and source.token == "second-token"
    assert source.redact("bad access_token=second-token") == "bad access_token=<token>"
