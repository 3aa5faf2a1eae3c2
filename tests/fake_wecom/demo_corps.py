"""The compose stack's `wecom` profile, first step: the demo corps for the ingest, the
enrichment and the fake WeCom, and their reporting rules.

    python -m tests.fake_wecom.demo_corps /wecom

writes `/wecom/wecom-corps.yaml` and its generated secrets (`streams.cli.demo.write_demo_corps`)
and publishes the demo rules to the rules topic of the broker the TAGSTREAM_* variables name.
A second run finds the corps file and changes nothing: the secrets of a running stack stay.
"""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from streams.cli.demo import demo_wecom_rules, write_demo_corps
from streams.kafka.admin import ensure_topics
from streams.kafka.producer import input_producer, produce
from streams.settings import Settings


async def publish_rules(settings: Settings) -> int:
    await ensure_topics(settings)
    producer = input_producer(settings)
    await producer.start()
    try:
        return await produce(producer, settings, demo_wecom_rules())
    finally:
        await producer.stop()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tests.fake_wecom.demo_corps DIRECTORY", file=sys.stderr)
        return 2
    directory = Path(argv[0])
    if (directory / "wecom-corps.yaml").exists():
        print(f"demo corps: {directory / 'wecom-corps.yaml'} is there already; nothing to do")
        return 0
    settings = Settings.load()
    rules = asyncio.run(publish_rules(settings))
    corps_file = write_demo_corps(directory)          # last: its presence says the rules are in
    print(f"demo corps: wrote {corps_file} and published {rules} rules to {settings.topic('tag_mappings_topic')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
