"""A worker catching up on a backlog applies the log in event-time order, even when its
fetches bring one topic's records long before the other's.

Found by the chaos run: with the workers' fetches throttled by a broker quota, a fresh
consumer group received tag events while the contact events that precede them were still
unfetched. The merge treated the contact partition as "unknown" (no committed offset,
nothing received yet) instead of "records waiting", released the tag events after
`merge_wait`, and ORDER, LEAD and VALID reports were lost (the tags were applied before the
customer's add time and identity). The agent now asks the consumer for its fetch position,
which it knows from the moment it resets to the log start.
"""
from __future__ import annotations


import orjson

from tests import kafka_io
from streams.observability.observe import total
from tests.integration.conftest import Pipeline
from tests.logs import generate_log, kafka_partition
from tests.reference_model import reference_reports

PARTITIONS = 4


def test_a_fresh_group_on_a_throttled_fetch_still_merges_in_event_time_order(kafka_broker, tmp_path):
    log = generate_log(5, customers=300, events=6000)
    expected, _ = reference_reports(log["rules"], log["events"],
                                    partition_of=lambda key: kafka_partition(key, PARTITIONS))
    expected_ids = {r["outer_action_id"] for r in expected}
    pipeline = Pipeline(tmp_path, partitions=PARTITIONS)
    pipeline.create_topics()
    try:
        worker = pipeline.start_worker()
        pipeline.send(*[("tag_mappings", key, value) for key, value in log["rules"]])
        worker.wait_for_rules(len(log["rules"]))
        worker.stop()              # the group has no committed offset on the event topics yet
        pipeline.send(*[("contact_events" if "change_type" in e else "tag_events",
                         f"{e['corp_id']}:{e['external_userid']}", e) for e in log["events"]])
        kafka_io.throttle_fetches(40_000)
        worker = pipeline.start_worker()
        reports = pipeline.read("conversion_reports", timeout=240, settle=3.0,
                                until=lambda rs: {orjson.loads(r.value)["outer_action_id"] for r in rs} >= expected_ids)
        forced = total(worker.metrics(), "tagstream_merge_forced_total")
    finally:
        kafka_io.throttle_fetches(None)
        pipeline.stop()
    got = {orjson.loads(r.value)["outer_action_id"] for r in reports}
    assert len(expected_ids) > 500
    assert got == expected_ids, f"{len(expected_ids - got)} missing, {len(got - expected_ids)} extra"
    assert forced == 0
