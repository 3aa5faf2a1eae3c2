"""A Faust consumer that never skips records fetched during recovery.

The trap (faust-streaming 0.15.3; upstream issues #216 and #629 describe its relatives):
while a worker restores its tables after an assignment, its fetcher already runs for the
assigned input partitions, and the records it fetches land in the agents' channel queues.
Those queues are created with `clear_on_resume=True`, so when recovery ends and flow
control resumes, the records are thrown away; Faust relies on `perform_seek` to rewind
every partition to its committed offset and fetch them again. But a partition with *no*
committed offset (a new consumer group, or a worker killed before its first commit) is not
rewound at all (`seek_to_committed` skips it), so the fetcher carries on after the records
it dropped and they are never processed. In tagstream's SIGKILL test this lost whole
contact-event partitions.

`RewindingConsumer.perform_seek` rewinds such partitions to their earliest offset, which
is what `auto_offset_reset=earliest` promises for a partition with no committed offset.
"""
from __future__ import annotations

from faust.transport.drivers import aiokafka as faust_aiokafka


class RewindingConsumer(faust_aiokafka.Consumer):
    async def perform_seek(self) -> None:
        await super().perform_seek()
        changelogs = self.app.tables.changelog_topics
        uncommitted = [tp for tp in self.assignment()
                       if self._committed_offset.get(tp) is None and tp.topic not in changelogs]
        if uncommitted:
            earliest = await self._thread.earliest_offsets(*uncommitted)
            await self._thread.seek_wait(earliest)
            self.log.info("rewound %d input partitions without a committed offset to their "
                          "earliest offset", len(uncommitted))


def install(app) -> None:
    """Make `app` create a `RewindingConsumer` (call before the app's consumer exists)."""
    app.transport.Consumer = RewindingConsumer
