"""Changelogged RocksDB state, written and restored in batches.

The worker's `reporting_state` (customers, partition clocks, the hold index, applied-offset
markers) lives here: one RocksDB database per partition under `data_dir`, and one compacted
changelog topic with a partition per state partition, the one source of truth. It replaces
Faust's `Table` for this state because Faust's table pays per key what this store pays per
batch (docs/performance.md):

- Faust publishes one changelog record per key set, each with its own future, and writes a
  persisted offset to RocksDB on every changelog acknowledgement. Here a commit appends all
  of a partition's writes to one producer record batch (`send_batch`) and writes RocksDB
  once, in a `WriteBatch`, with the changelog offset inside the same batch.
- Faust restores a table one record at a time through its event queues (about 7,000
  records/s here). `restore` reads the changelog with `getmany` and applies it in write
  batches.

**Crash consistency.** A commit first waits until the broker acknowledges the changelog
records, then writes RocksDB, changelog offset included, atomically. So local state is
always an exact image of a prefix of the changelog: a SIGKILL at any moment leaves a
database that is safe to keep, and a restart only reads what came after its offset.

That is also why RocksDB's write-ahead log is off. The changelog is this store's log. A
`WriteBatch` lands whole in one memtable, and a memtable is flushed whole, so a database
reopened after a SIGKILL holds a (possibly older) prefix of the commits, with the offset it
reaches inside it; the restore then reads the changelog from there. The WAL cost about 1.5 µs
per key written and bought nothing. A clean close flushes the memtables first.

Reads are mostly of customers not yet in state, so each database has a bloom filter (a miss
costs a filter probe, not a block read), and all partitions share one block cache.

A partition's commit normally goes out as one producer record batch, and the broker appends
a record batch whole (an idempotent producer's retry resends the same batch), so the
changelog cannot end inside it. Only a commit too large for one batch spans several, and the
changelog could then be cut inside it (the worker dies after some batches reached the
broker). Such a commit starts with one journal record that holds all its writes, so the
changelog always ends in "all of commit k, the journal of commit k+1, a prefix of commit
k+1's writes". After a restore that read anything new, the journal is committed again, which
completes commit k+1 (idempotent). This is the pure part below (`journal_record`,
`apply_records`), unit-tested without Kafka. (Every commit used to carry a journal: it
doubled the changelog's bytes, and the broker shares the worker's cores.)

Writes are staged per partition (`stage`, read back by `get`) and made durable by `commit`.
"""
from __future__ import annotations

import logging
from collections import deque
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, MutableMapping, Optional

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from rocksdict import BlockBasedOptions, Cache, Options, Rdict, WriteBatch, WriteOptions

from streams.state.failpoints import failpoint

log = logging.getLogger(__name__)

#: Keys the store keeps for itself; application keys never start with a NUL byte.
OFFSET_KEY = b"\x00changelog-offset"
JOURNAL_KEY = b"\x00journal"

#: Kafka's default largest message (`message.max.bytes`), less room for the batch header.
MAX_RECORD_BYTES = 1_000_000

Write = tuple[bytes, Optional[bytes]]          # (key, value); value None deletes the key

#: The block cache all partitions of a store share.
BLOCK_CACHE_BYTES = 64 * 1024 * 1024


# -- the pure part: journal and changelog application ------------------------------------------

def journal_record(writes: Iterable[Write]) -> bytes:
    """One changelog value holding every write of a commit."""
    return orjson.dumps([[key.decode(), None if value is None else value.decode()]
                         for key, value in writes])


def journal_writes(journal: Optional[bytes]) -> list[Write]:
    if not journal:
        return []
    return [(key.encode(), None if value is None else value.encode())
            for key, value in orjson.loads(journal)]


def apply_records(image: MutableMapping[bytes, bytes], records: Iterable[Write]) -> None:
    """Apply changelog records (in offset order) to `image`: a value sets, None deletes."""
    for key, value in records:
        if value is None:
            image.pop(key, None)
        else:
            image[key] = value


def commit_records(writes: dict[bytes, Optional[bytes]]) -> list[Write]:
    """The changelog records of one commit: its journal first, then its writes."""
    return [(JOURNAL_KEY, journal_record(writes.items())), *writes.items()]


# -- the store ---------------------------------------------------------------------------------

class ChangeloggedStore:
    """RocksDB per partition + a compacted changelog topic. Not thread-safe: one task uses it."""

    def __init__(self, path: str, changelog_topic: str, connection: Mapping[str, Any],
                 producer: AIOKafkaProducer, restore_batch: int = 20_000):
        self.path = Path(path)
        self.changelog_topic = changelog_topic
        self.connection = connection        # streams.kafka.connection.client_kwargs
        self.producer = producer
        self.restore_batch = restore_batch
        self.dbs: dict[int, Rdict] = {}
        self.block_cache = Cache(BLOCK_CACHE_BYTES)
        self.write_options = WriteOptions()
        self.write_options.disable_wal = True      # the changelog is the log (module docstring)
        self.staged: dict[int, dict[bytes, Optional[bytes]]] = {}
        self.in_flight: deque[dict[int, dict[bytes, Optional[bytes]]]] = deque()  # sealed, not yet durable
        self.staged_bytes = 0                  # upper bound of the next commit's journals
        self.restoring = False

    # -- reading and staging -------------------------------------------------------------
    def _db(self, partition: int) -> Rdict:
        db = self.dbs.get(partition)
        if db is None:
            directory = self.path / f"partition-{partition}"
            directory.mkdir(parents=True, exist_ok=True)
            options = Options(raw_mode=True)
            options.create_if_missing(True)
            table = BlockBasedOptions()
            table.set_bloom_filter(10, False)
            table.set_block_cache(self.block_cache)
            options.set_block_based_table_factory(table)
            db = self.dbs[partition] = Rdict(str(directory), options)
        return db

    def get(self, partition: int, key: bytes) -> Optional[bytes]:
        """The newest value: staged, then commits in flight (newest first), then RocksDB."""
        staged = self.staged.get(partition)
        if staged is not None and key in staged:
            return staged[key]
        for commit in reversed(self.in_flight):
            writes = commit.get(partition)
            if writes is not None and key in writes:
                return writes[key]
        return self._db(partition).get(key)

    def stage(self, partition: int, key: bytes, value: Optional[bytes]) -> None:
        staged = self.staged.get(partition)
        if staged is None:
            staged = self.staged[partition] = {}
        staged.pop(key, None)           # re-insert: a key staged again is written after the rest
        staged[key] = value
        self.staged_bytes += len(key) + (len(value) if value else 0)

    def changelog_offset(self, partition: int) -> Optional[int]:
        stored = self._db(partition).get(OFFSET_KEY)
        return int(stored) if stored is not None else None

    def scan(self, partition: int, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        """The stored (key, value) pairs of `partition` whose key starts with `prefix`, in key
        order. Only what is durable: call it with nothing staged or in flight (an erasure does,
        agents/customers.py)."""
        assert not self.staged.get(partition) and not self.in_flight, "scan with writes pending"
        it = self._db(partition).iter()
        it.seek(prefix)
        while it.valid():
            key = it.key()
            if not key.startswith(prefix):
                break
            yield key, it.value()
            it.next()

    def compact(self, partition: int) -> None:
        """Flush and compact `partition`'s database, so deleted values leave its files too
        (after an erasure)."""
        db = self._db(partition)
        db.flush()
        db.compact_range(None, None)

    def estimate_keys(self, partition: int) -> Optional[int]:
        db = self.dbs.get(partition)
        return db.property_int_value("rocksdb.estimate-num-keys") if db is not None else None

    # -- committing ----------------------------------------------------------------------
    def seal(self) -> dict[int, dict[bytes, Optional[bytes]]]:
        """Close the staged writes into a commit (still readable while in flight); pass it to
        `make_durable`, in the order sealed."""
        staged, self.staged, self.staged_bytes = self.staged, {}, 0
        commit = {p: writes for p, writes in staged.items() if writes}
        self.in_flight.append(commit)
        return commit

    async def make_durable(self, commit: dict[int, dict[bytes, Optional[bytes]]]) -> None:
        """Changelog first (acknowledged), then RocksDB. Commits must be made durable in the
        order they were sealed."""
        assert self.in_flight and self.in_flight[0] is commit, "commits are made durable in order"
        sent = []
        for partition, writes in commit.items():
            records = list(writes.items())
            deliveries = await self._send_one_batch(partition, records)
            if deliveries is None:                  # too large for one batch: journal first
                records = commit_records(writes)
                deliveries = await self._send(partition, records)
            sent.append((partition, records, deliveries))
        failpoint("changelog-sent")
        acked = []
        for partition, records, deliveries in sent:
            last_offset = -1
            for count, delivery in deliveries:
                metadata = await delivery
                last_offset = metadata.offset + count - 1
            acked.append((partition, records, last_offset))
        failpoint("changelog-acked")
        for partition, records, last_offset in acked:
            self._write_local(partition, commit[partition].items(), last_offset)
        self.in_flight.popleft()

    async def commit(self) -> int:
        """Seal and make durable at once; returns the number of partitions written."""
        assert not self.in_flight, "commit() with commits in flight"
        commit = self.seal()
        await self.make_durable(commit)
        return len(commit)

    async def _send_one_batch(self, partition: int, records: list[Write]) -> Optional[list]:
        """Send `records` as one record batch (appended atomically by the broker); None, and
        nothing sent, if they do not fit one."""
        batch = self.producer.create_batch()
        for key, value in records:
            if len(value or b"") > MAX_RECORD_BYTES or batch.append(key=key, value=value, timestamp=None) is None:
                return None                     # (`_send` explains a record over the limit)
        return [(len(records), await self.producer.send_batch(batch, self.changelog_topic, partition=partition))]

    async def _send(self, partition: int, records: list[Write]) -> list:
        """Append `records` to as few producer batches as they fit in; returns
        [(record count, delivery future)]."""
        deliveries = []
        batch, count = self.producer.create_batch(), 0
        for key, value in records:
            if len(value or b"") > MAX_RECORD_BYTES:
                raise ValueError(f"a state record of {len(value)} bytes (key {key[:40]!r}) is over Kafka's "
                                 f"1 MB message limit; commit smaller batches")
            if batch.append(key=key, value=value, timestamp=None) is None:
                if count == 0:
                    raise ValueError(f"a state record of {len(value or b'')} bytes does not fit a batch")
                deliveries.append((count, await self.producer.send_batch(batch, self.changelog_topic, partition=partition)))
                batch, count = self.producer.create_batch(), 0
                if batch.append(key=key, value=value, timestamp=None) is None:
                    raise ValueError(f"a state record of {len(value or b'')} bytes does not fit a batch")
            count += 1
        deliveries.append((count, await self.producer.send_batch(batch, self.changelog_topic, partition=partition)))
        return deliveries

    def _write_local(self, partition: int, records: Iterable[Write], last_offset: int) -> None:
        """Apply changelog records and the offset they reach in one atomic RocksDB write.
        Journals are not kept locally: a restore reads the last one from the changelog."""
        batch = WriteBatch(raw_mode=True)
        for key, value in records:
            if value is None:
                batch.delete(key)
            elif key != JOURNAL_KEY:
                batch.put(key, value)
        batch.put(OFFSET_KEY, b"%d" % last_offset)
        self._db(partition).write(batch, self.write_options)

    # -- restoring -----------------------------------------------------------------------
    async def restore(self, partitions: Iterable[int]) -> int:
        """Bring the local databases of `partitions` up to the changelog's end, then complete
        a commit the changelog holds only part of (its records are consecutive: the journal
        at offset o with n writes is complete once the changelog reaches o + n). Returns the
        records read."""
        partitions = sorted(partitions)
        if not partitions:
            return 0
        self.restoring = True
        started = time.monotonic()
        consumer = AIOKafkaConsumer(
            **self.connection, group_id=None, enable_auto_commit=False,
            auto_offset_reset="earliest", fetch_max_bytes=64 * 1024 * 1024,
            max_partition_fetch_bytes=16 * 1024 * 1024)
        await consumer.start()
        read: dict[int, int] = {}
        try:
            tps = {TopicPartition(self.changelog_topic, p): p for p in partitions}
            # Ends before the assignment: once assigned, a ListOffsets waits behind the fetch
            # the broker holds for fetch_max_wait (500 ms; streams/kafka/reads.py)
            ends = await consumer.end_offsets(list(tps))
            consumer.assign(list(tps))
            # Seek before the next await: the fetcher starts resetting positions as soon as it
            # runs (to the earliest offset, which is right for a partition never restored).
            for tp, partition in tps.items():
                stored = self.changelog_offset(partition)
                if stored is not None:
                    consumer.seek(tp, stored + 1)
            pending = {}
            for tp, partition in tps.items():
                if await consumer.position(tp) < ends[tp]:
                    pending[tp] = partition
                else:
                    consumer.pause(tp)
            journals: dict[int, tuple[int, bytes]] = {}     # the last journal read, per partition
            while pending:
                chunk = await consumer.getmany(*pending, timeout_ms=1000, max_records=self.restore_batch)
                for tp, records in chunk.items():
                    if not records:
                        continue
                    partition = tps[tp]
                    self._write_local(partition, ((r.key, r.value) for r in records), records[-1].offset)
                    read[partition] = read.get(partition, 0) + len(records)
                    for record in records:
                        if record.key == JOURNAL_KEY:
                            journals[partition] = (record.offset, record.value)
                for tp in list(pending):
                    if await consumer.position(tp) >= ends[tp]:
                        del pending[tp]
                        consumer.pause(tp)
        finally:
            await consumer.stop()
            self.restoring = False
        total = sum(read.values())
        cut = {partition: writes for partition, (offset, value) in journals.items()
               if ends[TopicPartition(self.changelog_topic, partition)] - 1 < offset + len(writes := journal_writes(value))}
        for partition, writes in cut.items():
            log.warning("partition %d: the changelog ends inside a commit; completing it from its journal", partition)
            for key, value in writes:
                self.stage(partition, key, value)
        await self.commit()
        if read:
            log.info("restored %d state records of partitions %s in %.1f s",
                     total, sorted(read), time.monotonic() - started)
        return total

    # -- lifecycle -----------------------------------------------------------------------
    def close_partition(self, partition: int) -> None:
        """After a revocation: close the database (kept on disk; a later assignment only
        reads the changelog past its offset). Staged writes must have been committed."""
        self.staged.pop(partition, None)
        db = self.dbs.pop(partition, None)
        if db is not None:
            db.flush()          # no WAL: what is only in the memtables would be read again
            db.close()

    def close(self) -> None:
        for partition in list(self.dbs):
            self.close_partition(partition)
