"""The event-time merge of the two co-partitioned event topics (streams.core.merge).

`caught_up(source, since)` stands for what the agent knows about the other topic's
partition: True (received everything that was in it at `since`), False (records known to
be waiting), ASKED (not known yet, the broker's answer is on its way) or None (not known,
and the broker is not answering)."""
from streams.core.merge import ASKED, CoPartitionMerge

CONTACTS, TAGS = "contacts", "tags"


def merge(max_wait_ms=500, max_buffered=100):
    return CoPartitionMerge((CONTACTS, TAGS), max_wait_ms=max_wait_ms, max_buffered=max_buffered)


def always(answer):
    return lambda source, since: answer


def test_heads_are_released_in_ts_order_when_both_topics_have_data():
    m = merge()
    m.offer(0, TAGS, 20, "tag@20", now_ms=0)
    m.offer(0, TAGS, 40, "tag@40", now_ms=0)
    assert list(m.release(0, always(False), lambda: 0)) == []      # contacts may still come
    m.offer(0, CONTACTS, 30, "contact@30", now_ms=0)
    # tag@20 goes, then contact@30; tag@40 must wait for the next contact
    assert list(m.release(0, always(False), lambda: 0)) == ["tag@20", "contact@30"]


def test_a_caught_up_topic_does_not_hold_the_other_back():
    m = merge()
    m.offer(0, TAGS, 20, "tag@20", now_ms=0)
    assert list(m.release(0, lambda s, since: s == CONTACTS, lambda: 0)) == ["tag@20"]


def test_caught_up_is_asked_as_of_the_head_s_arrival():
    """The tag that arrived at 1000 needs the contact partition's state as of 1000: knowledge
    learned at 900 (a fetch response older than the tag) does not let it go."""
    learned_at = {CONTACTS: 900}
    asked = []

    def caught_up(source, since):
        asked.append((source, since))
        return True if learned_at[source] >= since else None

    m = merge()
    m.offer(0, TAGS, 20, "tag@20", now_ms=1000)
    assert list(m.release(0, caught_up, lambda: 1001)) == []
    assert asked == [(CONTACTS, 1000)]
    learned_at[CONTACTS] = 1002              # a probe sent after the tag arrived
    assert list(m.release(0, caught_up, lambda: 1003)) == ["tag@20"]
    assert m.forced == {"max_wait": 0, "max_buffered": 0}


def test_contacts_win_ties():
    m = merge()
    m.offer(0, TAGS, 20, "tag@20", now_ms=0)
    m.offer(0, CONTACTS, 20, "contact@20", now_ms=0)
    assert list(m.release(0, always(True), lambda: 0)) == ["contact@20", "tag@20"]


def test_each_topic_keeps_its_own_offset_order_even_if_ts_goes_back():
    m = merge()
    m.offer(0, TAGS, 50, "tag@50", now_ms=0)
    m.offer(0, TAGS, 10, "tag@10", now_ms=0)
    assert list(m.release(0, always(True), lambda: 0)) == ["tag@50", "tag@10"]


def test_a_head_waits_at_most_max_wait_when_the_other_topic_is_unknown():
    m = merge(max_wait_ms=500)
    m.offer(0, TAGS, 20, "tag@20", now_ms=1000)
    assert list(m.release(0, always(None), lambda: 1000)) == []
    assert list(m.release(0, always(None), lambda: 1499)) == []
    assert list(m.release(0, always(None), lambda: 1500)) == ["tag@20"]
    assert m.forced == {"max_wait": 1, "max_buffered": 0}


def test_a_slow_answer_is_awaited_and_max_wait_runs_only_once_the_broker_stops_answering():
    """Found by the cluster chaos run (issue 19): probes slower than `merge_wait` on a loaded
    secured cluster forced thousands of heads out of ts order. While a probe is on its way
    the head waits; `max_wait` starts when the answer is known to be unavailable."""
    answer = {CONTACTS: ASKED}
    caught_up = lambda source, since: answer[source]
    m = merge(max_wait_ms=500)
    m.offer(0, TAGS, 20, "tag@20", now_ms=1000)
    assert list(m.release(0, caught_up, lambda: 1000)) == []
    assert list(m.release(0, caught_up, lambda: 5000)) == []        # long past max_wait: still asked
    answer[CONTACTS] = None                                          # the probe failed
    assert list(m.release(0, caught_up, lambda: 5001)) == []
    assert list(m.release(0, caught_up, lambda: 5500)) == []
    assert list(m.release(0, caught_up, lambda: 5501)) == ["tag@20"]
    assert m.forced == {"max_wait": 1, "max_buffered": 0}


def test_a_slow_answer_that_comes_releases_in_order_without_forcing():
    answer = {CONTACTS: ASKED}
    m = merge(max_wait_ms=500)
    m.offer(0, TAGS, 20, "tag@20", now_ms=1000)
    assert list(m.release(0, lambda s, since: answer[s], lambda: 3000)) == []
    answer[CONTACTS] = False                          # the answer: a contact is waiting
    assert list(m.release(0, lambda s, since: answer[s], lambda: 3050)) == []
    m.offer(0, CONTACTS, 10, "contact@10", now_ms=3100)
    answer[CONTACTS] = True                           # ... and it was the last one
    assert list(m.release(0, lambda s, since: answer[s], lambda: 3100)) == ["contact@10", "tag@20"]
    assert m.forced == {"max_wait": 0, "max_buffered": 0}


def test_max_wait_runs_from_when_the_merge_first_found_the_head_blocked_not_from_arrival():
    """A worker busy with other partitions may look at a head long after it arrived; that
    delay is not the broker's, so the head still gets `max_wait` for its answer."""
    m = merge(max_wait_ms=500)
    m.offer(0, TAGS, 20, "tag@20", now_ms=1000)
    assert list(m.release(0, always(None), lambda: 5000)) == []          # first look: 4 s late
    assert list(m.release(0, always(None), lambda: 5499)) == []
    assert list(m.release(0, always(True), lambda: 5499)) == ["tag@20"]
    assert m.forced == {"max_wait": 0, "max_buffered": 0}


def test_max_wait_runs_from_when_the_answer_became_unknown_not_from_a_wait_for_records():
    m = merge(max_wait_ms=500)
    m.offer(0, TAGS, 20, "tag@20", now_ms=1000)
    assert list(m.release(0, always(False), lambda: 1000)) == []        # records on their way
    assert list(m.release(0, always(None), lambda: 9000)) == []         # they came: ask anew
    assert list(m.release(0, always(True), lambda: 9003)) == ["tag@20"]
    assert m.forced == {"max_wait": 0, "max_buffered": 0}
    assert m.stats.take_waits() == [8003]


def test_a_head_waits_for_records_known_to_be_on_their_way_however_long():
    m = merge(max_wait_ms=500)
    m.offer(0, TAGS, 20, "tag@20", now_ms=1000)
    assert list(m.release(0, always(False), lambda: 60_000)) == []
    assert m.forced == {"max_wait": 0, "max_buffered": 0}


def test_a_full_buffer_is_drained():
    m = merge(max_buffered=2)
    for ts in (1, 2, 3):
        m.offer(0, TAGS, ts, f"tag@{ts}", now_ms=0)
    assert list(m.release(0, always(False), lambda: 0)) == ["tag@1"]
    assert m.forced == {"max_wait": 0, "max_buffered": 1}


def test_each_hold_is_measured_from_the_first_blocked_look_to_its_release():
    m = merge()
    m.offer(0, TAGS, 20, "tag@20", now_ms=1000)
    assert list(m.release(0, always(True), lambda: 1002)) == ["tag@20"]     # never held
    m.offer(0, TAGS, 30, "tag@30", now_ms=2000)
    m.offer(0, TAGS, 31, "tag@31", now_ms=2000)
    assert list(m.release(0, always(None), lambda: 2001)) == []
    assert list(m.release(0, always(None), lambda: 2002)) == []
    assert list(m.release(0, always(True), lambda: 2004)) == ["tag@30", "tag@31"]
    assert m.stats.take_waits() == [3]          # one hold, of 3 ms
    assert m.stats.take_waits() == []


def test_partitions_are_independent_and_forgettable():
    m = merge()
    m.offer(0, TAGS, 20, "p0", now_ms=0)
    m.offer(1, TAGS, 10, "p1", now_ms=0)
    assert sorted(m.waiting_partitions()) == [0, 1]
    assert m.forget(0) == ["p0"]
    assert list(m.release(1, always(True), lambda: 0)) == ["p1"]
    assert m.waiting_partitions() == []


def test_the_clock_is_read_when_a_head_blocks_not_when_release_starts():
    """The agent awaits sends and commits between released items, so a release can run for
    seconds: a head found blocked at its end must not count those seconds as waiting."""
    now = [1000]
    m = merge(max_wait_ms=500)
    m.offer(0, CONTACTS, 10, "contact@10", now_ms=1000)
    m.offer(0, TAGS, 20, "tag@20", now_ms=1000)
    released = m.release(0, always(None), lambda: now[0])
    assert next(released) == "contact@10"
    now[0] = 4000                              # the agent spent 3 s on contact@10's commit
    assert list(released) == []                # tag@20 now blocks: its wait starts at 4000
    now[0] = 4499
    assert list(m.release(0, always(None), lambda: now[0])) == []
    assert m.forced == {"max_wait": 0, "max_buffered": 0}


def test_a_topic_far_ahead_of_the_other_stops_fetching_until_drained_and_nothing_is_forced():
    """Back-pressure (`fetch_balance`): the tags of partition 0 keep coming while its contacts
    are behind (a leader moving). At `pause_at` buffered tags that partition's tags pause; they
    resume once the merge drained them to `resume_at`; the buffer never reaches `max_buffered`,
    so nothing leaves out of order."""
    m = merge(max_buffered=100)
    paused, paused_by_merge = set(), set()
    for ts in range(40):
        m.offer(0, TAGS, ts, f"tag@{ts}", now_ms=0)
    m.offer(1, TAGS, 0, "other", now_ms=0)
    pause, resume = m.fetch_balance(paused, paused_by_merge, pause_at=40, resume_at=10)
    assert (pause, resume) == ({(TAGS, 0)}, set())          # partition 1 and the contacts fetch on
    paused |= pause
    paused_by_merge |= pause
    assert m.fetch_balance(paused, paused_by_merge, 40, 10) == (set(), set())   # asked once
    assert list(m.release(0, always(False), lambda: 0)) == []                  # held, not forced
    for ts in range(35):                                     # the contacts arrive and drain the tags
        m.offer(0, CONTACTS, ts, f"contact@{ts}", now_ms=0)
    released = list(m.release(0, always(False), lambda: 0))
    assert released[:4] == ["contact@0", "tag@0", "contact@1", "tag@1"]
    assert len(m.partitions[0].buffers[TAGS]) == 6                 # tag@34 waits for a later contact
    assert m.fetch_balance(paused, paused_by_merge, 40, 10) == (set(), {(TAGS, 0)})
    assert m.forced == {"max_wait": 0, "max_buffered": 0}


def test_a_pair_paused_by_someone_else_is_neither_paused_again_nor_resumed_by_the_merge():
    """A rebalance (Faust) pauses partitions too: the merge resumes only what it paused, and
    a revoked partition's pause is lifted (its records go to the next owner)."""
    m = merge()
    for ts in range(5):
        m.offer(0, TAGS, ts, f"tag@{ts}", now_ms=0)
    assert m.fetch_balance({(TAGS, 0), (CONTACTS, 0)}, set(), pause_at=3, resume_at=1) == (set(), set())
    m.offer(0, CONTACTS, 10, "contact@10", now_ms=0)
    assert list(m.release(0, always(False), lambda: 0)) == [f"tag@{ts}" for ts in range(5)]
    assert m.fetch_balance({(TAGS, 0)}, set(), 3, 1) == (set(), set())         # not ours to resume
    assert m.fetch_balance(set(), {(TAGS, 7)}, 3, 1) == (set(), {(TAGS, 7)})   # partition 7 is gone
