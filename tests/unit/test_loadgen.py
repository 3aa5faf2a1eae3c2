"""The generated load: every size has the full event mix, and undone delayed tags come back
as removes within minutes (the demo's cancelled holds)."""
from __future__ import annotations

from collections import Counter
from itertools import islice

from streams.sources.loadgen import LoadShape, TagTraffic

BENCH_SHAPE = LoadShape(corps=400, active_customers=20_000, events_per_customer=12)


def test_a_small_load_of_a_large_shape_is_not_all_contacts():
    # bench.worker's shape at the CI smoke size: the generator used to create all 20,000
    # active customers (contact events) before the first tag
    traffic = TagTraffic(3, start_ms=0, shape=BENCH_SHAPE)
    events = list(islice(traffic.events(), 3_000))
    topics = Counter(e.topic for e in events)
    assert topics["tag_events"] >= 0.4 * len(events), topics
    mapped = {st for corp in traffic.mapped.values() for st, tag in corp.items()}
    assert mapped == {"CONSULT", "LEAD", "VALID", "ORDER", "LONG_TERM", "INVALID"}


def test_every_mapped_type_appears_at_the_demo_size():
    traffic = TagTraffic(5, start_ms=0, shape=LoadShape(mean_gap_ms=1_080, undo_share=0.3))
    events = list(islice(traffic.events(), 20_000))
    type_of = {tag: st for corp in traffic.mapped.values() for st, tag in corp.items()}
    added = Counter(type_of[e.value["tag_id"]] for e in events
                    if e.topic == "tag_events" and e.value["op"] == "add" and e.value["tag_id"] in type_of)
    assert set(added) == set(type_of.values()) and min(added.values()) >= 20, added


def test_undone_delayed_tags_are_removed_within_the_undo_window():
    shape = LoadShape(mean_gap_ms=1_000, undo_share=1.0, undo_after_ms=(60_000, 600_000))
    traffic = TagTraffic(9, start_ms=0, shape=shape)
    events = list(islice(traffic.events(), 20_000))
    delayed = {tag for tags in traffic.delayed.values() for tag in tags}
    added_at: dict = {}
    undone = 0
    for e in events:
        if e.topic != "tag_events" or e.value["tag_id"] not in delayed:
            continue
        key = (e.key, e.value["tag_id"])
        if e.value["op"] == "add":
            added_at[key] = e.value["ts"]
        elif key in added_at:
            assert 60_000 <= e.value["ts"] - added_at.pop(key) <= 600_000 + 2 * shape.mean_gap_ms
            undone += 1
    assert undone >= 50 and len(added_at) <= 20     # all but those added in the last minutes
