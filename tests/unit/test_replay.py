"""The replay core without a broker: whatever order the two topics' partitions are read in,
a replay gives the reference model's reports; archives are validated line by line; times
and comparisons behave as documented."""
from __future__ import annotations

import gzip
import io
import random

import orjson
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from schemas.records import DEFAULT_ACTION_TYPES
from streams.cli.progress import Progress
from streams.replay.archive import archive_line, read_archives
from streams.replay.engine import CONTACT, TAG, InputRecord, Output, Replay, ReplaySummary
from streams.replay.run import compare, parse_time
from streams.core.semantics import ReportingPolicy
from streams.settings import ConfigError
from tests.logs import generate_log, kafka_partition
from tests.reference_model import reference_reports
from tests.strategies import event_logs
from tests.unit.test_core_equals_model import canonical, decoded

POLICY = ReportingPolicy(default_action_types=dict(DEFAULT_ACTION_TYPES))
PARTITIONS = 4


class Collect(Output):
    def __init__(self):
        self.reports, self.unreportables, self.dead = [], [], []

    def report(self, wire):
        self.reports.append(wire)

    def unreportable(self, wire):
        self.unreportables.append(wire)

    def dead_letter(self, record, rejection):
        self.dead.append((record.origin, rejection.error))


def _streams(log: dict, partition_of) -> dict[tuple[str, int], list[InputRecord]]:
    """The log as Kafka would hold it: per (topic, partition), in log order, each record
    stamped with `log["record_ts"][i]` if the log has them."""
    streams: dict = {}
    for i, body in enumerate(log["events"]):
        key = f"{body['corp_id']}:{body['external_userid']}"
        source = TAG if "op" in body else CONTACT
        partition = partition_of(key)
        batch = streams.setdefault((source, partition), [])
        batch.append(InputRecord(source, partition, len(batch), key.encode(), orjson.dumps(body), f"log:{i}",
                                 log["record_ts"][i] if "record_ts" in log else None))
    return streams


def _replay(log: dict, partition_of, rng: random.Random) -> Collect:
    """Read the streams in a random interleaving (as getmany would hand them out)."""
    book, _ = decoded(log, partition_of)
    out = Collect()
    replay = Replay(book, POLICY, out, ReplaySummary())
    streams = {k: list(v) for k, v in _streams(log, partition_of).items()}
    for (source, partition) in [(s, p) for s in (TAG, CONTACT) for p in range(PARTITIONS)]:
        if (source, partition) not in streams:
            replay.source_done(source, partition)
    while streams:
        key = rng.choice(sorted(streams))
        batch = streams[key]
        taken = rng.randint(1, 40)
        for record in batch[:taken]:
            replay.offer(record)
        del batch[:taken]
        if not batch:
            del streams[key]
            replay.source_done(*key)
        replay.release(key[1])
    replay.finish()
    return out


def _model(log: dict, partition_of):
    reports, unreportable = reference_reports(log["rules"], log["events"], partition_of=partition_of)
    return canonical(reports), canonical(unreportable)


def test_replay_in_any_read_order_equals_the_reference_model_on_long_logs():
    partition_of = lambda key: kafka_partition(key, PARTITIONS)       # noqa: E731
    for seed in range(4):
        log = generate_log(seed, customers=80, events=2000)
        out = _replay(log, partition_of, random.Random(seed))
        assert (canonical(out.reports), canonical(out.unreportables)) == _model(log, partition_of)
        assert len(out.reports) > 50


def with_bad_clocks(log: dict, rng: random.Random, share: float) -> tuple[dict, set[int]]:
    """The log with each record stamped with its event's `ts`, and a share of the tag events
    given a `ts` years ahead (a bad clock upstream; the record timestamps stay honest)."""
    events, bad = [], set()
    for i, body in enumerate(log["events"]):
        if "op" in body and rng.random() < share:
            body = {**body, "ts": body["ts"] + rng.choice([2 * 60 * 60_000, 10 * 365 * 86_400_000])}
            bad.add(i)
        events.append(body)
    return {**log, "events": events, "record_ts": [b["ts"] for b in log["events"]]}, bad


def test_a_bad_clock_is_dead_lettered_and_changes_nothing_else():
    """Issue 18: an event with `ts` far ahead of its record timestamp would move stream time
    and release every hold of its partition at once. It is dead-lettered (`ts_in_future`),
    and the reports are exactly those of the log without it: holds are released when they
    would have been, and the model (which drops such events) agrees."""
    partition_of = lambda key: kafka_partition(key, PARTITIONS)       # noqa: E731
    for seed in range(3):
        log = generate_log(seed, customers=60, events=1500)
        skewed, bad = with_bad_clocks(log, random.Random(seed), share=0.03)
        assert bad
        out = _replay(skewed, partition_of, random.Random(seed))
        assert sorted(origin for origin, error in out.dead if error == "ts_in_future") == sorted(f"log:{i}" for i in bad)
        without = {**log, "events": [e for i, e in enumerate(log["events"]) if i not in bad]}
        clean = _replay(without, partition_of, random.Random(seed))
        assert canonical(out.reports) == canonical(clean.reports)
        assert canonical(out.unreportables) == canonical(clean.unreportables)
        reports, unreportable = reference_reports(skewed["rules"], skewed["events"], partition_of=partition_of,
                                                  record_timestamps=skewed["record_ts"])
        assert (canonical(out.reports), canonical(out.unreportables)) == (canonical(reports), canonical(unreportable))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event_logs(), st.integers(0, 2 ** 32), st.floats(0.0, 0.3))
def test_a_bad_clock_changes_nothing_but_its_dead_letter_on_any_log(log, seed, share):
    partition_of = lambda key: kafka_partition(key, PARTITIONS)       # noqa: E731
    skewed, bad = with_bad_clocks(log, random.Random(seed), share)
    out = _replay(skewed, partition_of, random.Random(seed))
    without = {**log, "events": [e for i, e in enumerate(log["events"]) if i not in bad]}
    clean = _replay(without, partition_of, random.Random(seed))
    assert sorted(o for o, error in out.dead if error == "ts_in_future") == sorted(f"log:{i}" for i in bad)
    assert canonical(out.reports) == canonical(clean.reports)
    assert canonical(out.unreportables) == canonical(clean.unreportables)


def test_without_the_check_a_bad_clock_releases_holds_early():
    """The same logs, with the check switched off (an absurd skew limit): the far-future
    events move stream time, and the reports differ. So the test above can fail."""
    partition_of = lambda key: kafka_partition(key, PARTITIONS)       # noqa: E731
    log = generate_log(0, customers=60, events=1500)
    skewed, _ = with_bad_clocks(log, random.Random(0), share=0.03)
    unchecked = reference_reports(skewed["rules"], skewed["events"], partition_of=partition_of,
                                  record_timestamps=skewed["record_ts"], max_future_skew_ms=2 ** 62)
    checked = reference_reports(skewed["rules"], skewed["events"], partition_of=partition_of,
                                record_timestamps=skewed["record_ts"])
    assert canonical(unchecked[0]) + canonical(unchecked[1]) != canonical(checked[0]) + canonical(checked[1])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event_logs(), st.integers(0, 2 ** 32))
def test_replay_does_not_depend_on_the_order_partitions_are_read_in(log, seed):
    """Hypothesis logs have ts going backwards across topics, where the event-time merge
    reorders them (so they cannot be compared with the log-order model); what must hold is
    that two replays reading the partitions in different interleavings give the same reports
    (in the same order within each partition; partitions are independent)."""
    partition_of = lambda key: kafka_partition(key, PARTITIONS)       # noqa: E731
    first = _replay(log, partition_of, random.Random(seed))
    second = _replay(log, partition_of, random.Random(seed + 1))

    def per_partition(reports):
        out: dict = {}
        for r in reports:
            key = f"{r['corp_id']}:{r['external_userid']}"
            out.setdefault(partition_of(key), []).append({k: v for k, v in r.items() if k != "emitted_at"})
        return out
    assert per_partition(first.reports) == per_partition(second.reports)
    assert per_partition(first.unreportables) == per_partition(second.unreportables)


def test_bad_records_are_dead_letters_and_counted_and_the_run_goes_on():
    log = generate_log(1, customers=10, events=200)
    partition_of = lambda key: kafka_partition(key, PARTITIONS)       # noqa: E731
    book, _ = decoded(log, partition_of)
    out, summary = Collect(), ReplaySummary()
    replay = Replay(book, POLICY, out, summary)
    replay.offer(InputRecord(TAG, 0, 0, b"wwP:x", b"{not json", "t/0@0"))
    replay.offer(InputRecord(CONTACT, 0, 0, b"wwP:x", b"\xff", "c/0@0"))
    for batch in _streams(log, partition_of).values():
        for record in batch:
            replay.offer(record)
    replay.finish()
    assert [origin for origin, _ in out.dead] == ["t/0@0", "c/0@0"]
    assert sum(summary.dead_letters.values()) == 2 and summary.outcomes["dead_lettered"] == 2
    assert summary.events == len(log["events"]) + 2
    assert canonical(out.reports) == _model(log, partition_of)[0]


def test_an_erased_corps_records_are_skipped_and_the_other_corp_replays_as_alone():
    gone, stay = generate_log(2, customers=10, events=300, corp="wwGone"), generate_log(3, customers=10, events=300)
    partition_of = lambda key: kafka_partition(key, PARTITIONS)       # noqa: E731
    both = {"rules": gone["rules"] + stay["rules"], "events": stay["events"] + gone["events"]}
    book, _ = decoded(both, partition_of)
    out, summary = Collect(), ReplaySummary()
    replay = Replay(book, POLICY, out, summary, erased={"wwGone": 1})
    replay.offer(InputRecord(TAG, 0, 0, b"wwGone:x", b"{not json", "t/0@0"))    # not even a dead letter
    for batch in _streams(both, partition_of).values():
        for record in batch:
            replay.offer(record)
    replay.finish()
    assert out.dead == [] and summary.outcomes["erased"] == len(gone["events"]) + 1
    assert not [r for r in out.reports + out.unreportables if r["corp_id"] == "wwGone"]
    assert canonical(out.reports) == _model(stay, partition_of)[0] and out.reports


def test_archive_lines_round_trip_and_bad_lines_are_reported_not_raised(tmp_path):
    good_tag = {"event_id": "e1", "corp_id": "ww1", "external_userid": "wm1", "userid": "s", "tag_id": "t",
                "op": "add", "ts": 1_763_800_000_000}
    rule = {"corp_id": "ww1", "tag_id": "t", "standard_type": "CONSULT", "effective_from": 0, "version": 1,
            "account_id": 1, "user_action_set_id": 2, "action_type": None}
    path = tmp_path / "a.ndjson.gz"
    with gzip.open(path, "wb") as f:
        f.write(archive_line("rule", b"ww1:t", orjson.dumps(rule), 0, 0, 0))
        f.write(archive_line("tag", b"ww1:wm1", orjson.dumps(good_tag), 2, 7, 1_763_800_000_000))
        f.write(archive_line("tag", b"ww1:wm1", b"\xff\xfenot json", 2, 8, 1_763_800_000_001))
        f.write(b"{broken\n")
        f.write(b'{"kind": "order", "key": "k", "value": {}}\n')
        f.write(b'{"kind": "tag", "key": "k", "value": {}, "partition": -1}\n')
        f.write(b'{"kind": "tag", "key": "k"}\n')
        f.write(b"\n")
    contents = read_archives([str(path)], PARTITIONS, None, None)
    assert contents.rules == 1 and contents.book.rule_as_of("ww1", "t", 1).standard_type == "CONSULT"
    records = contents.records[("tag", 2)]
    assert [r.offset for r in records] == [7, 8]
    assert orjson.loads(records[0].value) == good_tag and records[1].value == b"\xff\xfenot json"
    reasons = [reason for _, reason, _ in contents.bad_lines]
    assert [origin for origin, _, _ in contents.bad_lines] == ["a.ndjson.gz:4", "a.ndjson.gz:5", "a.ndjson.gz:6",
                                                                "a.ndjson.gz:7"]
    assert reasons[0].startswith("not JSON") and reasons[1].startswith("kind:") and \
        reasons[2].startswith("partition:") and reasons[3].startswith("value:")
    # the range filter uses the record timestamp
    assert [r.offset for r in read_archives([str(path)], PARTITIONS, 1_763_800_000_001, None).records[("tag", 2)]] == [8]


def test_archive_lines_without_partition_use_kafkas_partitioner(tmp_path):
    path = tmp_path / "plain.ndjson"
    path.write_bytes(b'{"kind": "contact", "key": "ww1:wm9", "value": {"a": 1}}\n')
    contents = read_archives([str(path)], PARTITIONS, None, None)
    assert list(contents.records) == [("contact", kafka_partition("ww1:wm9", PARTITIONS))]


def test_unreadable_archives_stop_with_one_clear_line(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        read_archives([str(tmp_path / "missing.ndjson")], PARTITIONS, None, None)
    fake = tmp_path / "fake.ndjson.gz"
    fake.write_bytes(b"plain text, not gzip")
    with pytest.raises(ConfigError, match="cannot read it as gzip"):
        read_archives([str(fake)], PARTITIONS, None, None)


def test_times_are_iso_8601_and_naive_means_utc():
    assert parse_time("--from", "2026-11-01T00:00:00Z") == 1_793_491_200_000
    assert parse_time("--from", "2026-11-01T08:00:00+08:00") == 1_793_491_200_000
    assert parse_time("--from", "2026-11-01T00:00:00") == 1_793_491_200_000
    with pytest.raises(ConfigError, match="not an ISO-8601 time; e.g. --to 2026"):
        parse_time("--to", "yesterday")


def test_comparison_with_what_was_delivered():
    replayed = [{"outer_action_id": i, "account_id": 1, "emitted_at": 5} for i in ("a", "b", "c", "d")]
    delivered = {"a": b"acked", "b": b"acked", "c": b"failed"}
    sent = {"a": {"outer_action_id": "a", "account_id": 1, "emitted_at": 1},
            "b": {"outer_action_id": "b", "account_id": 2, "emitted_at": 1}}
    counts, changes = compare(replayed, delivered, sent)
    assert counts == {"already_delivered": 1, "would_change": 1, "previously_failed": 1, "new": 1}
    assert changes[0]["outer_action_id"] == "b" and changes[0]["fields"] == ["account_id"]


def test_progress_without_a_terminal_writes_whole_lines_with_rate_and_eta():
    out = io.StringIO()
    progress = Progress(1000, "replay", out)
    progress.advance(250)              # within LOG_INTERVAL_S of the start: no line of its own
    progress.finish()
    assert "\r" not in out.getvalue()
    first, last = out.getvalue().splitlines()
    assert "0.0% 0/1,000 events" in first
    assert "25.0% 250/1,000 events" in last and "ev/s ETA" in last and "100.0%" not in last
