"""Sending rejected input to the dead-letter topic (SPEC §3.5, §4 rule 8).

Bad input is counted and parked with its reason and original bytes; the partition moves on.
"""
from __future__ import annotations

import time
from typing import Optional

import orjson

from schemas.validation import Rejection
from streams.observability import metrics


def dead_letter_value(rejection: Rejection, *, topic: str, partition: int, offset: int,
                      key: Optional[bytes], value: Optional[bytes]) -> bytes:
    """The dead-letter record's value: the reason, where the record came from, its bytes."""
    return orjson.dumps(rejection.dead_letter(
        topic=topic, partition=partition, offset=offset, key=key, value=value,
        at=int(time.time() * 1000)).as_wire())


def count(topic: str, rejection: Rejection) -> None:
    metrics.DEAD_LETTERS.labels(topic, rejection.error).inc()
    metrics.EVENTS.labels(topic, "dead_lettered").inc()


async def park(dead_letters_topic, message, rejection: Rejection) -> None:
    """Send `message` (a Faust ConsumerMessage) to the dead-letter topic with the reason."""
    value = dead_letter_value(rejection, topic=message.topic, partition=message.partition,
                              offset=message.offset, key=message.key, value=message.value)
    # force=True: out at once, not at the next commit. Faust flushes the producer before it
    # commits offsets, so the letter is on the broker before the bad record counts as done.
    await dead_letters_topic.send(key=message.key, value=value, force=True)
    count(message.topic, rejection)
