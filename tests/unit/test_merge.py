"""The event-time merge of the two co-partitioned event topics (streams.merge)."""
from streams.merge import CoPartitionMerge

CONTACTS, TAGS = "contacts", "tags"


def merge(max_wait_ms=500, max_buffered=100):
    return CoPartitionMerge((CONTACTS, TAGS), max_wait_ms=max_wait_ms, max_buffered=max_buffered)


def test_heads_are_released_in_ts_order_when_both_topics_have_data():
    m = merge()
    m.offer(0, TAGS, 20, "tag@20", now_ms=0)
    m.offer(0, TAGS, 40, "tag@40", now_ms=0)
    assert list(m.release(0, lambda s: False, now_ms=0)) == []      # contacts may still come
    m.offer(0, CONTACTS, 30, "contact@30", now_ms=0)
    # tag@20 goes, then contact@30; tag@40 must wait for the next contact
    assert list(m.release(0, lambda s: False, now_ms=0)) == ["tag@20", "contact@30"]


def test_a_caught_up_topic_does_not_hold_the_other_back():
    m = merge()
    m.offer(0, TAGS, 20, "tag@20", now_ms=0)
    assert list(m.release(0, lambda s: s == CONTACTS, now_ms=0)) == ["tag@20"]


def test_contacts_win_ties():
    m = merge()
    m.offer(0, TAGS, 20, "tag@20", now_ms=0)
    m.offer(0, CONTACTS, 20, "contact@20", now_ms=0)
    assert list(m.release(0, lambda s: True, now_ms=0)) == ["contact@20", "tag@20"]


def test_each_topic_keeps_its_own_offset_order_even_if_ts_goes_back():
    m = merge()
    m.offer(0, TAGS, 50, "tag@50", now_ms=0)
    m.offer(0, TAGS, 10, "tag@10", now_ms=0)
    assert list(m.release(0, lambda s: True, now_ms=0)) == ["tag@50", "tag@10"]


def test_a_head_waits_at_most_max_wait_when_the_other_topic_is_unknown():
    m = merge(max_wait_ms=500)
    m.offer(0, TAGS, 20, "tag@20", now_ms=1000)
    assert list(m.release(0, lambda s: None, now_ms=1499)) == []
    assert list(m.release(0, lambda s: None, now_ms=1500)) == ["tag@20"]
    assert m.forced == {"max_wait": 1, "max_buffered": 0}


def test_a_head_waits_for_records_known_to_be_on_their_way_however_long():
    m = merge(max_wait_ms=500)
    m.offer(0, TAGS, 20, "tag@20", now_ms=1000)
    assert list(m.release(0, lambda s: False, now_ms=60_000)) == []
    assert m.forced == {"max_wait": 0, "max_buffered": 0}


def test_a_full_buffer_is_drained():
    m = merge(max_buffered=2)
    for ts in (1, 2, 3):
        m.offer(0, TAGS, ts, f"tag@{ts}", now_ms=0)
    assert list(m.release(0, lambda s: False, now_ms=0)) == ["tag@1"]
    assert m.forced == {"max_wait": 0, "max_buffered": 1}


def test_partitions_are_independent_and_forgettable():
    m = merge()
    m.offer(0, TAGS, 20, "p0", now_ms=0)
    m.offer(1, TAGS, 10, "p1", now_ms=0)
    assert sorted(m.waiting_partitions()) == [0, 1]
    assert m.forget(0) == ["p0"]
    assert list(m.release(1, lambda s: True, now_ms=0)) == ["p1"]
    assert m.waiting_partitions() == []
