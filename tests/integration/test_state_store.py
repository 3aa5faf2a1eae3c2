"""The worker's changelogged store (streams/state/store.py) on the real broker: commits
survive into a fresh store, a kept store reads only what came after its offset, and a
commit cut short in the changelog is completed by the next restore."""
from __future__ import annotations

import asyncio
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from streams.state.store import JOURNAL_KEY, ChangeloggedStore, commit_records
from tests.kafka_io import BOOTSTRAP

PARTITIONS = 4


async def _changelog() -> str:
    topic = f"it-store-{uuid.uuid4().hex[:8]}-changelog"
    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, PARTITIONS, 1, topic_configs={"cleanup.policy": "compact"})])
    finally:
        await admin.close()
    return topic


def _contents(store: ChangeloggedStore, partition: int) -> dict:
    return {k: v for k, v in store._db(partition).items() if not k.startswith(b"\x00")}


def _run(scenario) -> None:
    async def main() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, acks="all", enable_idempotence=True)
        await producer.start()
        try:
            await scenario(producer, await _changelog())
        finally:
            await producer.stop()
    asyncio.run(main())


def test_committed_state_is_restored_whole_into_fresh_stores_every_time(kafka_broker, tmp_path):
    async def scenario(producer, topic):
        writer = ChangeloggedStore(str(tmp_path / "writer"), topic, {"bootstrap_servers": BOOTSTRAP}, producer)
        for n in range(2_000):
            writer.stage(n % PARTITIONS, b"c:%d" % n, b"state-%d" % n)
        writer.stage(1, b"c:1", None)                               # a delete
        assert await writer.commit() == PARTITIONS
        expected = {p: _contents(writer, p) for p in range(PARTITIONS)}
        assert sum(map(len, expected.values())) == 1_999
        # Repeated, because a restore once lost a whole partition about half the time: the
        # consumer's own position reset raced the seek (fixed in ChangeloggedStore.restore).
        for attempt in range(6):
            fresh = ChangeloggedStore(str(tmp_path / f"fresh-{attempt}"), topic, {"bootstrap_servers": BOOTSTRAP}, producer)
            assert await fresh.restore(range(PARTITIONS)) == 2_000   # one batch per partition: no journal
            assert {p: _contents(fresh, p) for p in range(PARTITIONS)} == expected
            fresh.close()
    _run(scenario)


def test_a_kept_store_reads_only_what_follows_its_offset(kafka_broker, tmp_path):
    async def scenario(producer, topic):
        owner = ChangeloggedStore(str(tmp_path / "owner"), topic, {"bootstrap_servers": BOOTSTRAP}, producer)
        owner.stage(0, b"c:a", b"1")
        await owner.commit()
        other = ChangeloggedStore(str(tmp_path / "other"), topic, {"bootstrap_servers": BOOTSTRAP}, producer)
        assert await other.restore([0]) == 1
        # the partition moves back to the owner, after `other` committed two more keys
        other.stage(0, b"c:b", b"2")
        other.stage(0, b"c:a", b"3")
        await other.commit()
        assert await owner.restore([0]) == 2                       # the two writes, no more
        assert _contents(owner, 0) == {b"c:a": b"3", b"c:b": b"2"}
        assert await owner.restore([0]) == 0
    _run(scenario)


def test_a_commit_cut_short_in_the_changelog_is_completed_by_the_next_restore(kafka_broker, tmp_path):
    async def scenario(producer, topic):
        before = ChangeloggedStore(str(tmp_path / "before"), topic, {"bootstrap_servers": BOOTSTRAP}, producer)
        before.stage(2, b"c:x", b"old")
        before.stage(2, b"h:2:7", b"[[1,\"x\",\"INVALID\"]]")
        await before.commit()
        # a worker dies after the journal and one write of its next commit reached the broker
        commit = {b"c:x": b"new", b"h:2:7": None, b"k:2": b"clock"}
        for key, value in commit_records(commit)[:2]:
            await (await producer.send(topic, key=key, value=value, partition=2))
        restored = ChangeloggedStore(str(tmp_path / "restored"), topic, {"bootstrap_servers": BOOTSTRAP}, producer)
        await restored.restore([2])
        assert _contents(restored, 2) == {b"c:x": b"new", b"k:2": b"clock"}
        # and the completion went to the changelog too: a later restore from scratch agrees
        again = ChangeloggedStore(str(tmp_path / "again"), topic, {"bootstrap_servers": BOOTSTRAP}, producer)
        await again.restore([2])
        assert _contents(again, 2) == _contents(restored, 2)
    _run(scenario)


_COMMIT_THEN_DIE = """
import asyncio, os, signal, sys
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from streams.state.store import ChangeloggedStore

async def main(path, topic, bootstrap):
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    store = ChangeloggedStore(path, topic, {"bootstrap_servers": bootstrap}, producer)
    store.stage(0, b"c:a", b"first")
    store.stage(0, b"c:b", b"first")
    await store.commit()
    store._db(0).flush()                     # as RocksDB would when a memtable fills
    store.stage(0, b"c:a", b"second")
    store.stage(0, b"c:c", b"second")
    await store.commit()                     # acknowledged, in the memtable only
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main(*sys.argv[1:]))
"""


def test_a_store_killed_with_writes_only_in_its_memtable_reopens_at_a_prefix_and_catches_up(kafka_broker, tmp_path):
    """RocksDB's WAL is off (the changelog is the log): a SIGKILL loses the memtable, and the
    database must come back as an older prefix, with its own offset, that a restore completes."""
    import subprocess
    import sys
    topic = asyncio.run(_changelog())
    path = str(tmp_path / "killed")
    died = subprocess.run([sys.executable, "-c", _COMMIT_THEN_DIE, path, topic, BOOTSTRAP], timeout=60)
    assert died.returncode == -9

    async def scenario(producer, _unused_topic):
        reopened = ChangeloggedStore(path, topic, {"bootstrap_servers": BOOTSTRAP}, producer)
        # the flushed first commit is there (offsets 0-1), the second is not
        assert reopened.changelog_offset(0) == 1
        assert _contents(reopened, 0) == {b"c:a": b"first", b"c:b": b"first"}
        assert await reopened.restore([0]) == 2                    # the second commit
        assert _contents(reopened, 0) == {b"c:a": b"second", b"c:b": b"first", b"c:c": b"second"}
        reopened.close()
        # a clean close flushes: reopened again, nothing is read twice
        again = ChangeloggedStore(path, topic, {"bootstrap_servers": BOOTSTRAP}, producer)
        assert await again.restore([0]) == 0
        assert _contents(again, 0) == {b"c:a": b"second", b"c:b": b"first", b"c:c": b"second"}
    _run(scenario)


def test_a_commit_too_large_for_one_record_batch_goes_out_with_its_journal_first(kafka_broker, tmp_path):
    """One record batch is appended whole, so only a commit spanning several needs a journal
    (the test producer's batches are aiokafka's default 16 KiB)."""
    async def scenario(producer, topic):
        store = ChangeloggedStore(str(tmp_path / "big"), topic, {"bootstrap_servers": BOOTSTRAP}, producer)
        small = {b"c:s": b"x" * 100}
        large = {b"c:%d" % n: b"y" * 1000 for n in range(40)}           # about 40 KiB
        for key, value in small.items():
            store.stage(0, key, value)
        for key, value in large.items():
            store.stage(1, key, value)
        await store.commit()
        reader = AIOKafkaConsumer(bootstrap_servers=BOOTSTRAP, auto_offset_reset="earliest", enable_auto_commit=False)
        await reader.start()
        try:
            keys = {}
            for partition, expected in ((0, 1), (1, 41)):
                tp = TopicPartition(topic, partition)
                reader.assign([tp])
                records = []
                while len(records) < expected:
                    records += (await reader.getmany(tp, timeout_ms=2000)).get(tp, [])
                keys[partition] = [r.key for r in records]
        finally:
            await reader.stop()
        assert keys[0] == [b"c:s"]
        assert keys[1][0] == JOURNAL_KEY and keys[1][1:] == list(large)
        fresh = ChangeloggedStore(str(tmp_path / "fresh"), topic, {"bootstrap_servers": BOOTSTRAP}, producer)
        await fresh.restore([0, 1])
        assert _contents(fresh, 0) == small and _contents(fresh, 1) == large
    _run(scenario)
