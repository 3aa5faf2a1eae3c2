"""One bucket of the hold index, stored in bounded chunks (issue 18: a bulk tag must not
write a state value near Kafka's message limit).

A bucket holds the hold-index entries `(deadline, customer key, type)` whose deadline falls in
one minute of one partition. Staff can tag 20,000 customers INVALID within that minute (a bulk
action in the admin console); as one list that bucket is 820 KB, rewritten by every commit
that touches it, and a few thousand more entries pass the broker's 1 MB limit and stop the
worker. So a bucket is a sorted sequence of *chunks*, like the leaves of a B-tree:

- `h:partition:bucket` holds the bucket's table of contents: for each chunk in order, its id
  and its first deadline, and the next free id (a few bytes per chunk);
- `h:partition:bucket:id` holds one chunk: at most `CHUNK_MAX` entries, sorted; every entry of
  a chunk sorts at or after every entry of the chunks before it.

Adding an entry loads and rewrites one chunk (split in two when it passes `CHUNK_MAX`);
taking the due entries loads the chunks from the front, deletes the ones wholly due and
rewrites at most one. So a commit writes the chunks its events touched, never the bucket,
and a value stays under `CHUNK_MAX` entries (about 25 KB) however many holds share a minute.

A bucket written before this change (`h:partition:bucket` holding the entry list itself) is
read as it is and rewritten in chunks the first time it changes.

This module does no I/O: `ChunkedBucket` is given a function that reads a stored value, and
hands back the writes (`writes()`), which the caller stages.
"""
from __future__ import annotations

from bisect import bisect_right, insort
from typing import Callable, Optional

import orjson

from streams.core.semantics import HoldEntry

#: A chunk is split in two when it has more entries than this.
CHUNK_MAX = 512

Read = Callable[[bytes], Optional[bytes]]


class ChunkedBucket:
    """The hold-index bucket stored under `key` (`h:partition:bucket`)."""

    def __init__(self, key: bytes, read: Read):
        self.key = key
        self._read = read
        self.toc: list[list] = []                  # [[chunk id, first deadline], ...] in order
        self.next_id = 0
        self.chunks: dict[int, list[HoldEntry]] = {}   # loaded chunks, by id
        self.dirty: set[int] = set()                # chunk ids to write
        self.deleted: set[int] = set()              # chunk ids to delete
        self.toc_dirty = False
        stored = read(key)
        if stored is None:
            return
        decoded = orjson.loads(stored)
        if isinstance(decoded, dict):
            self.toc, self.next_id = decoded["c"], decoded["n"]
        else:                                       # written before chunks: the entry list itself
            for entry in sorted(tuple(e) for e in decoded):
                self.add(entry)

    def __bool__(self) -> bool:
        return bool(self.toc)

    def _chunk(self, position: int) -> list[HoldEntry]:
        chunk_id = self.toc[position][0]
        chunk = self.chunks.get(chunk_id)
        if chunk is None:
            stored = self._read(b"%s:%d" % (self.key, chunk_id))
            chunk = self.chunks[chunk_id] = [tuple(e) for e in orjson.loads(stored)] if stored else []
        return chunk

    def _changed(self, chunk_id: int) -> None:
        self.dirty.add(chunk_id)

    def add(self, entry: HoldEntry) -> int:
        """Insert `entry` in order; returns the entries now in the chunk it went to (the
        caller's upper bound of what the next commit writes for it)."""
        if not self.toc:
            self.toc.append([self.next_id, entry[0]])
            self.chunks[self.next_id] = []
            self.next_id += 1
        position = max(0, bisect_right([first for _, first in self.toc], entry[0]) - 1)
        chunk = self._chunk(position)
        insort(chunk, entry)
        chunk_id = self.toc[position][0]
        self._changed(chunk_id)
        if chunk[0][0] != self.toc[position][1]:
            self.toc[position][1] = chunk[0][0]
        self.toc_dirty = True
        if len(chunk) > CHUNK_MAX:
            half = len(chunk) // 2
            new_id, self.next_id = self.next_id, self.next_id + 1
            self.chunks[new_id], self.chunks[chunk_id] = chunk[half:], chunk[:half]
            self.toc.insert(position + 1, [new_id, self.chunks[new_id][0][0]])
            self._changed(new_id)
            return half
        return len(chunk)

    def take_due(self, up_to: int) -> list[HoldEntry]:
        """Remove and return, in order, every entry with deadline <= up_to."""
        due: list[HoldEntry] = []
        while self.toc and self.toc[0][1] <= up_to:
            chunk = self._chunk(0)
            n = bisect_right(chunk, up_to, key=lambda e: e[0])
            due += chunk[:n]
            chunk_id = self.toc[0][0]
            self.toc_dirty = True
            if n == len(chunk):
                del self.chunks[chunk_id], self.toc[0]
                self.dirty.discard(chunk_id)
                self.deleted.add(chunk_id)
                continue
            self.chunks[chunk_id] = chunk[n:]
            self.toc[0][1] = chunk[n][0]
            self._changed(chunk_id)
            break
        return due

    def pending_bytes(self) -> int:
        """An upper bound of the bytes `writes()` would stage now."""
        return 48 * sum(len(self.chunks[c]) for c in self.dirty) + 24 * (len(self.toc) + len(self.deleted)) + 32

    def writes(self) -> list[tuple[bytes, Optional[bytes]]]:
        """The (key, value or None to delete) writes that store this bucket's changes."""
        out: list[tuple[bytes, Optional[bytes]]] = [
            (b"%s:%d" % (self.key, chunk_id), None) for chunk_id in sorted(self.deleted)]
        out += [(b"%s:%d" % (self.key, chunk_id), orjson.dumps(self.chunks[chunk_id]))
                for chunk_id in sorted(self.dirty)]
        if self.toc_dirty or self.deleted or self.dirty:
            out.append((self.key, orjson.dumps({"c": self.toc, "n": self.next_id}) if self.toc else None))
        return out
