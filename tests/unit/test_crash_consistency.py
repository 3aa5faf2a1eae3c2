"""What a crash can leave behind, and how the worker repairs it, without a broker.

- A step's writes can be cut anywhere in the changelog: replaying the step's journal
  completes them (agents/customers.py, TableStore).
- Local RocksDB state is trusted only after a clean shutdown (streams/local_state.py).
"""
from agents.customers import TableStore
from streams import faust_consumer
from streams.local_state import MARKER, mark_clean, open_local_state
from streams.semantics import CustomerState, PartitionClock
from streams.settings import Settings
from streams.topology import build_topology


class CutChangelog(dict):
    """A table whose writes stop reaching it after `survive` writes, like a changelog
    cut short by SIGKILL; restoring from it gives exactly the writes that survived."""

    def __init__(self, survive: int):
        super().__init__()
        self.survive = survive

    def __setitem__(self, key, value):
        if self.survive > 0:
            self.survive -= 1
            super().__setitem__(key, value)


def _step(store: TableStore) -> None:
    """One step touching a clock, a hold bucket, a customer and the applied marker."""
    store.put_clock(0, PartitionClock(stream_time=100, low_bucket=1, high_bucket=1))
    store.put_bucket(0, 1, [(60_001, "ww:c1", "INVALID")])
    store.put_customer("ww:c1", CustomerState(reported=["CONSULT"]))
    store.pending[b"o:tag-events:0"] = b"41"


def _complete_state() -> dict:
    whole = TableStore({})
    _step(whole)
    whole.flush(0)
    return {k: v for k, v in whole.table.items() if not k.startswith(b"j:")}


def test_a_step_cut_after_its_journal_is_completed_by_replaying_the_journal():
    # given a crash after the journal and one of the four writes reached the changelog
    table = CutChangelog(survive=2)
    store = TableStore(table)
    _step(store)
    store.flush(0)
    assert len(table) == 2                                  # the cut really happened
    # when a worker takes the partition over from that changelog
    restored = TableStore(dict(table))
    replayed = restored.replay_journal(0)
    # then the state is the whole step, never a mix
    assert replayed == 4
    assert {k: v for k, v in restored.table.items() if not k.startswith(b"j:")} == _complete_state()


def test_a_step_cut_before_its_journal_leaves_the_previous_state():
    table = CutChangelog(survive=0)
    store = TableStore(table)
    _step(store)
    store.flush(0)
    restored = TableStore(dict(table))
    assert restored.replay_journal(0) == 0 and restored.table == {}


def test_replaying_a_complete_step_changes_nothing():
    store = TableStore({})
    _step(store)
    store.flush(0)
    before = dict(store.table)
    store.replay_journal(0)
    assert store.table == before


def test_deletes_are_journalled_too():
    store = TableStore({b"h:0:1": b"[[1,\"ww:c1\",\"INVALID\"]]"})
    store.put_bucket(0, 1, [])                              # an emptied bucket is deleted
    store.flush(0)
    assert b"h:0:1" not in store.table
    store.table[b"h:0:1"] = b"stale"                        # as if the delete was cut off
    store.replay_journal(0)
    assert b"h:0:1" not in store.table


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


def test_the_worker_uses_the_rewinding_consumer(tmp_path):
    topology = build_topology(Settings.load(overrides={"data_dir": str(tmp_path)}, environ={}))
    assert isinstance(topology.app.consumer, faust_consumer.RewindingConsumer)
