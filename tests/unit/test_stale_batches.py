"""A batch handed over just as a rebalance begins must not be applied after the revocation
(agents/customers.py, `on_records`): it waits for the agent's lock while the revocation
forgets what the merge held, and taken afterwards it would mark its offsets seen, so the
refetch from the committed offset would skip them and the forgotten records."""
import asyncio
from types import SimpleNamespace

import pytest
from faust.types import TP

from agents.customers import CustomerEvents
from schemas.records import DEFAULT_ACTION_TYPES
from streams.core.rulebook import RuleBook
from streams.core.semantics import ReportingPolicy
from streams.observability import metrics

TAGS, CONTACTS = "t.tag-events", "t.contact-events"


class Applied(Exception):
    """Raised where the agent would start applying the batch."""


def agent(generation: int) -> CustomerEvents:
    app = SimpleNamespace(consumer_generation_id=generation)
    events = CustomerEvents(
        app, store=None, connection={}, replica=SimpleNamespace(book=RuleBook()), erasures=None,
        policy=ReportingPolicy(default_action_types=dict(DEFAULT_ACTION_TYPES)),
        tag_events_topic=TAGS, contact_events_topic=CONTACTS, merge_wait_ms=100,
        conversion_reports_topic="r", unreportable_topic="u", dead_letters_topic="d")
    events.assigned = {3}

    async def applying():
        raise Applied
    events._ready = applying
    return events


def batch() -> dict:
    return {TP(TAGS, 3): [SimpleNamespace(offset=n, key=b"ww1:wm1", value=b"{}", timestamp=0) for n in (10, 11)]}


@pytest.mark.parametrize("revocation", ["new generation", "partition revoked"])
def test_a_batch_that_waited_through_a_revocation_is_dropped(revocation):
    events = agent(generation=5)
    before = metrics.STALE_BATCHES._value.get()

    async def race():
        await events.lock.acquire()                  # the revocation holds the lock ...
        handed = asyncio.ensure_future(events.on_records(batch()))
        await asyncio.sleep(0)                       # ... while the batch waits for it
        if revocation == "new generation":
            events.app.consumer_generation_id = 6
        else:
            events.assigned -= {3}
        events.lock.release()
        await handed
    asyncio.run(race())
    assert events.seen == {}
    assert metrics.STALE_BATCHES._value.get() == before + 1


def test_a_batch_of_the_current_generation_is_applied():
    events = agent(generation=5)
    with pytest.raises(Applied):
        asyncio.run(events.on_records(batch()))
