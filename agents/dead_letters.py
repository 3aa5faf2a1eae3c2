"""Sending rejected input to the dead-letter topic (SPEC §3.5, §4 rule 8).

Bad input is counted and parked with its reason and original bytes; the partition moves on.
"""
from __future__ import annotations

import time

import orjson

from schemas.validation import Rejection
from streams import metrics


async def park(dead_letters_topic, message, rejection: Rejection) -> None:
    """Send `message` (a Faust ConsumerMessage) to the dead-letter topic with the reason."""
    letter = rejection.dead_letter(
        topic=message.topic, partition=message.partition, offset=message.offset,
        key=message.key, value=message.value, at=int(time.time() * 1000))
    # force=True: out at once, not at the next commit. Faust flushes the producer before it
    # commits offsets, so the letter is on the broker before the bad record counts as done.
    await dead_letters_topic.send(key=message.key, value=orjson.dumps(letter.as_wire()), force=True)
    metrics.DEAD_LETTERS.labels(message.topic, rejection.error).inc()
    metrics.EVENTS.labels(message.topic, "dead_lettered").inc()
