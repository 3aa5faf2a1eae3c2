"""What a crash can leave behind, and how the worker repairs it, without a broker.

- A commit's changelog records can be cut anywhere: restoring them and committing the
  journal again completes the commit (streams/state/store.py).
- Local Faust state is trusted only after a clean shutdown; tagstream's own store, written
  only after its changelog, is always kept (streams/state/local.py).
"""
import pytest
from hypothesis import given, strategies as st

from streams.kafka import faust_consumer
from streams.state.local import MARKER, mark_clean, open_local_state
from streams.core.semantics import CustomerState, PartitionClock
from streams.settings import Settings
from streams.state.store import (
    JOURNAL_KEY, apply_records, commit_records, journal_writes)
from streams.topology import build_topology

BEFORE = {b"c:ww:c1": CustomerState().encode(), b"h:0:1": b'[[1,"ww:c0","INVALID"]]', b"o:tag-events:0": b"40"}
# One commit touching a clock, two hold buckets (one emptied), a customer and the marker.
COMMIT = {
    b"k:0": PartitionClock(stream_time=100, low_bucket=1, high_bucket=2).encode(),
    b"h:0:1": None,
    b"h:0:2": b'[[120001,"ww:c1","INVALID"]]',
    b"c:ww:c1": CustomerState(reported=["CONSULT"]).encode(),
    b"o:tag-events:0": b"41",
}


def _restore(changelog: list) -> dict:
    """What `ChangeloggedStore.restore` does with a changelog: apply it, then commit the
    journal it ends with again. Returns the application's keys."""
    image: dict = {}
    apply_records(image, changelog)
    apply_records(image, journal_writes(image.get(JOURNAL_KEY)))
    return {k: v for k, v in image.items() if k != JOURNAL_KEY}


def _after() -> dict:
    image = dict(BEFORE)
    apply_records(image, COMMIT.items())
    return image


@given(st.integers(min_value=0, max_value=len(COMMIT) + 1))
def test_a_commit_cut_anywhere_restores_to_before_or_after_it_never_a_mix(cut):
    # given the changelog of the state so far, and a crash after `cut` records of a commit
    changelog = list(BEFORE.items()) + commit_records(COMMIT)[:cut]
    # when a worker restores the partition from it
    restored = _restore(changelog)
    # then the state is the whole commit once its journal made it, the previous state before
    assert restored == (_after() if cut >= 1 else BEFORE)


def test_the_journal_holds_every_write_including_deletes():
    records = commit_records(COMMIT)
    assert records[0][0] == JOURNAL_KEY and records[1:] == list(COMMIT.items())
    assert journal_writes(records[0][1]) == list(COMMIT.items())


def test_committing_a_restored_journal_again_changes_nothing():
    changelog = list(BEFORE.items()) + commit_records(COMMIT)
    once = _restore(changelog)
    twice = _restore(changelog + commit_records(dict(journal_writes(commit_records(COMMIT)[0][1]))))
    assert once == twice == _after()


def test_local_state_left_by_a_crash_is_wiped(tmp_path):
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "000001.sst").write_bytes(b"x")
    assert open_local_state(str(tmp_path)) is True
    assert list(tmp_path.iterdir()) == []


def test_local_state_closed_cleanly_is_kept_and_the_marker_consumed(tmp_path):
    (tmp_path / "tables").mkdir()
    mark_clean(str(tmp_path))
    assert open_local_state(str(tmp_path)) is False
    assert (tmp_path / "tables").exists() and not (tmp_path / MARKER).exists()
    # the worker now runs; if it is killed, the next start finds no marker and wipes
    assert open_local_state(str(tmp_path)) is True


def test_tagstreams_own_store_survives_a_crash_and_faust_tables_do_not(tmp_path):
    (tmp_path / "reporting_state" / "partition-0").mkdir(parents=True)
    (tmp_path / "rule_versions").mkdir()
    assert open_local_state(str(tmp_path)) is True
    assert [p.name for p in tmp_path.iterdir()] == ["reporting_state"]


def test_the_worker_uses_the_rewinding_batching_consumer(tmp_path):
    topology = build_topology(Settings.load(overrides={"data_dir": str(tmp_path)}, environ={}))
    consumer = topology.app.consumer
    assert isinstance(consumer, faust_consumer.BatchingConsumer)
    assert isinstance(consumer, faust_consumer.RewindingConsumer)
    assert consumer.batch_topics == {topology.sources["tag_events"], topology.sources["contact_events"]}


def test_a_failpoint_spec_is_checked_with_a_one_line_fix():
    from streams.state.failpoints import _parse
    assert _parse(None) is None and _parse("changelog-sent:3") == ("changelog-sent", 3)
    for wrong in ("changelog-sent", "nowhere:2", "state-durable:0"):
        with pytest.raises(SystemExit, match="use NAME:N with NAME one of"):
            _parse(wrong)
