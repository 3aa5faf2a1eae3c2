"""Reading a running worker from outside: its Prometheus endpoint, summed the way the
demo, the tests and operators want it."""
from __future__ import annotations

import asyncio
import urllib.request
from collections import defaultdict
from typing import Optional

from prometheus_client.parser import text_string_to_metric_families


def scrape(port: int, host: str = "127.0.0.1", timeout: float = 2.0) -> Optional[dict]:
    """{metric sample name: {frozenset(labels.items()): value}}, or None if not reachable."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout) as response:
            text = response.read().decode()
    except OSError:
        return None
    samples: dict = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name][frozenset(sample.labels.items())] = sample.value
    return samples


async def scrape_async(port: int) -> Optional[dict]:
    return await asyncio.get_running_loop().run_in_executor(None, scrape, port)


def total(samples: Optional[dict], name: str, **match: str) -> float:
    """Sum of a metric's samples whose labels include `match`."""
    if not samples:
        return 0.0
    return sum(value for labels, value in samples.get(name, {}).items()
               if all((k, v) in labels for k, v in match.items()))


def by_label(samples: Optional[dict], name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for labels, value in (samples or {}).get(name, {}).items():
        out[dict(labels).get(label, "")] += value
    return dict(out)


def by_labels(samples: Optional[dict], name: str, *labels: str) -> dict[tuple, float]:
    """A metric's samples summed by the values of several labels: {(v1, v2, ...): sum}."""
    out: dict[tuple, float] = defaultdict(float)
    for sample_labels, value in (samples or {}).get(name, {}).items():
        as_dict = dict(sample_labels)
        out[tuple(as_dict.get(label, "") for label in labels)] += value
    return dict(out)
