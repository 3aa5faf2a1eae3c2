"""How the worker's rule book grows with a provider's corps (issue 24), first part.

    .venv/bin/python -m bench.scale                      # make bench-scale
    .venv/bin/python -m bench.scale --corps 300 3000

For each corpus size, in a fresh process: `--tags` tags per corp (default 100), each with
1 to 3 versions (about 2 on average: 30,000 corps make about 6M versions), folded into the
worker's in-memory `RuleBook` the way its rule replica folds the changelog. It reports the
versions, the resident memory they add (from /proc, after a full collection), bytes per
version, and the time to build the book. Then as many as-of lookups as there are versions,
at random keys and times, and their cost per lookup.

Not yet measured here: startup through a broker, events/s and state restore with 10M
customers (docs/performance.md, "A provider's size").
"""
from __future__ import annotations

import argparse
import gc
import multiprocessing
import random
import sys
import time

from schemas.records import STANDARD_TYPES, ReportingRule
from streams.core.rulebook import RuleBook

T0 = 1_700_000_000_000
DAY = 86_400_000


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def measure(corps: int, tags: int) -> dict:
    """Build the book for `corps` × `tags` keys in this process; what it cost."""
    gc.collect()
    before = _rss_mib()
    started = time.monotonic()
    book = RuleBook()
    types = (*STANDARD_TYPES, None)
    for c in range(corps):
        corp = f"ww{c:08d}"
        for t in range(tags):
            for v in range(1 + (c + t) % 3):
                book.add(ReportingRule(corp, f"et{t:06d}", types[(c + t + v) % len(types)], T0 + v * DAY, v + 1,
                                       account_id=1000 + c, user_action_set_id=5000 + c, tag_name=f"标签{t}"))
    built = time.monotonic() - started
    gc.collect()
    added = _rss_mib() - before
    rng = random.Random(corps)
    probes = [(f"ww{rng.randrange(corps):08d}", f"et{rng.randrange(tags):06d}", T0 + rng.randrange(3 * DAY))
              for _ in range(min(book.versions, 1_000_000))]
    started = time.monotonic()
    for corp, tag, ts in probes:
        book.rule_as_of(corp, tag, ts)
    lookup_us = (time.monotonic() - started) / len(probes) * 1e6
    return {"corps": corps, "versions": book.versions, "rss_mib": added,
            "bytes_per_version": added * 1024 * 1024 / book.versions, "build_s": built, "lookup_us": lookup_us}


def table(rows: list[dict], tags: int) -> str:
    lines = [f"rule book in memory: {tags} tags per corp, 1-3 versions each, one fresh process per size", "",
             "| corps | rule versions | memory added | per version | build | as-of lookup |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['corps']:,} | {r['versions']:,} | {r['rss_mib']:,.0f} MiB | {r['bytes_per_version']:,.0f} B | "
                     f"{r['build_s']:.1f} s | {r['lookup_us']:.2f} µs |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corps", type=int, nargs="+", default=[300, 3_000, 30_000],
                        help="corpus sizes to measure (default 300 3000 30000: the last is about 6M versions, "
                             "and needs about 4 GiB)")
    parser.add_argument("--tags", type=int, default=100, help="tags per corp (default 100)")
    args = parser.parse_args(argv)
    if any(n <= 0 for n in args.corps) or args.tags <= 0:
        parser.error("--corps and --tags must be positive")
    rows = []
    for corps in args.corps:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            rows.append(pool.apply(measure, (corps, args.tags)))
        print(f"bench-scale: {corps:,} corps measured", file=sys.stderr, flush=True)
    print(table(rows, args.tags))
    return 0


if __name__ == "__main__":
    sys.exit(main())
