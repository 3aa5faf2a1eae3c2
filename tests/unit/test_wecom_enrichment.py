"""The pure enrichment (streams/wecom/enrichment.py): tag diffs against snapshots, ids that a
retry or a restart repeats, contact events from add and delete callbacks."""
from hypothesis import given, strategies as st

from streams.wecom.enrichment import EMPTY, Snapshot, contact_event, corp_tags, diff_tags
from streams.wecom.messages import Callback

CORP, CUSTOMER, STAFF = "wwc", "wmK", "zhangsan"


def test_a_diff_adds_and_removes_and_moves_the_snapshot_on():
    snapshot, events = diff_tags(CORP, CUSTOMER, STAFF, Snapshot(3, ("a", "b")), ["b", "c", "d"], 5000, "wecom_callback")
    assert snapshot == Snapshot(4, ("b", "c", "d"))
    assert [(e["op"], e["tag_id"]) for e in events] == [("add", "c"), ("add", "d"), ("remove", "a")]
    assert all(e["ts"] == 5000 and e["corp_id"] == CORP and e["userid"] == STAFF for e in events)


def test_no_change_no_events_and_the_same_snapshot():
    before = Snapshot(2, ("a",))
    assert diff_tags(CORP, CUSTOMER, STAFF, before, ["a"], 1, "x") == (before, [])


def test_a_retry_of_the_same_change_repeats_the_ids_and_a_later_change_does_not():
    first = diff_tags(CORP, CUSTOMER, STAFF, Snapshot(1, ()), ["a"], 1000, "x")
    again = diff_tags(CORP, CUSTOMER, STAFF, Snapshot(1, ()), ["a"], 1000, "x")
    assert first == again
    # removed, then added back: the same tag and op, from a newer version, is a new event
    _, removed = diff_tags(CORP, CUSTOMER, STAFF, first[0], [], 2000, "x")
    _, re_added = diff_tags(CORP, CUSTOMER, STAFF, Snapshot(3, ()), ["a"], 3000, "x")
    ids = {first[1][0]["event_id"], removed[0]["event_id"], re_added[0]["event_id"]}
    assert len(ids) == 3


@given(st.lists(st.frozensets(st.sampled_from("abcdef")), min_size=1, max_size=12))
def test_replaying_the_events_of_every_diff_gives_the_last_tags(states):
    """Whatever the sequence of tag sets, applying the diffs' events in order reproduces
    the last set, and no two events share an id."""
    snapshot, applied, ids = EMPTY, set(), []
    for state in states:
        snapshot, events = diff_tags(CORP, CUSTOMER, STAFF, snapshot, state, 1, "x")
        for event in events:
            (applied.add if event["op"] == "add" else applied.discard)(event["tag_id"])
            ids.append(event["event_id"])
    assert applied == set(states[-1]) and set(snapshot.tags) == set(states[-1])
    assert len(ids) == len(set(ids))


def test_only_corp_and_rule_group_tags_count():
    follow = {"tags": [{"type": 1, "tag_id": "b"}, {"type": 3, "tag_id": "a"}, {"type": 2, "tag_name": "mine"},
                       {"type": 1, "tag_id": "b"}]}
    assert corp_tags(follow) == ("a", "b")


def add_callback(**extra) -> Callback:
    return Callback(CORP, {"Event": "change_external_contact", "ChangeType": "add_external_contact",
                           "UserID": STAFF, "ExternalUserID": CUSTOMER, "CreateTime": "1790000100", **extra}, 0)


def test_an_add_takes_its_time_and_identity_from_the_contact():
    contact = {"external_contact": {"external_userid": CUSTOMER, "unionid": "oU-1"},
               "follow_user": [{"userid": "other", "createtime": 1}, {"userid": STAFF, "createtime": 1790000000,
                                                                     "state": "ad_9"}]}
    event = contact_event(add_callback(), "wxapp", contact, "clk-9")
    assert event["ts"] == 1790000000 * 1000 and event["state"] == "ad_9"
    assert (event["wechat_app_id"], event["wechat_unionid"], event["click_id"]) == ("wxapp", "oU-1", "clk-9")
    assert event["event_id"] == contact_event(add_callback(), "wxapp", contact, "clk-9")["event_id"]


def test_a_half_add_is_an_add_and_a_delete_takes_the_callback_time():
    half = Callback(CORP, {**add_callback().fields, "ChangeType": "add_half_external_contact"}, 0)
    assert contact_event(half, "wxapp", None, None)["change_type"] == "add_external_contact"
    gone = Callback(CORP, {**add_callback().fields, "ChangeType": "del_follow_user"}, 0)
    event = contact_event(gone, "wxapp", None, None)
    assert event["change_type"] == "del_follow_user" and event["ts"] == 1790000100 * 1000
    assert "wechat_unionid" not in event
