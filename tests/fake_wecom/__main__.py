"""The fake WeCom as a process, for the demo (`tagstream run --via-wecom`):

    python -m tests.fake_wecom --corps-file wecom-corps.yaml --tags etA,etB --ingest http://127.0.0.1:8480 \\
        --api-port 8490 --callbacks 2000 --rate 50

It serves WeCom's API (tokens, contacts, the tag catalogue) for the corps of the corps file,
whose secrets it reads the way the ingest does, and its staff work the sidebar
(`sidebar.Sidebar`): `--callbacks` callbacks at `--rate` per second to the ingest. Then it
writes a summary to `--done-file` (totals, every relationship's final tags, and each change
with the moment its callback was first sent) and keeps serving the API (the enrichment still fetches
customers) until SIGTERM.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
from pathlib import Path

from aiohttp import web

from streams.settings import Settings
from streams.wecom.corps import load_corps
from tests.fake_wecom.api import FakeWeComApi
from tests.fake_wecom.callbacks import CallbackSender
from tests.fake_wecom.sidebar import Sidebar


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.fake_wecom", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corps-file", required=True, help="the ingest's corps file (secrets from its *_file entries)")
    parser.add_argument("--tags", required=True, help="comma-separated corp tag ids the staff use")
    parser.add_argument("--ingest", required=True, help="the ingest's base URL")
    parser.add_argument("--api-port", type=int, required=True, help="port of the fake WeCom API")
    parser.add_argument("--callbacks", type=int, default=0, help="callbacks to send (0: until SIGTERM)")
    parser.add_argument("--rate", type=float, default=50.0, help="callbacks per second offered")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--done-file", help="where the summary is written once every callback was answered")
    return parser.parse_args(argv)


async def main(args: argparse.Namespace) -> None:
    corps = load_corps(Settings(wecom_corps_file=args.corps_file))
    tags = [t for t in args.tags.split(",") if t]
    api = FakeWeComApi(seed=args.seed)
    for corp in corps.values():
        api.add_corp(corp.corp_id, corp.contact_secret, {t: t for t in tags})
    runner = web.AppRunner(api.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.api_port).start()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    cryptos = {corp_id: corp.crypto for corp_id, corp in corps.items()}
    async with CallbackSender(args.ingest, cryptos, seed=args.seed) as sender:
        sidebar = Sidebar(api, sender, tags, seed=args.seed)
        staff = asyncio.create_task(sidebar.run(args.callbacks or 10**12, args.rate))
        await asyncio.wait([staff, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
        if staff.done():
            staff.result()
            if args.done_file:
                Path(args.done_file).write_text(json.dumps({
                    "callbacks": sender.stats.sent, "answered": sender.stats.answered,
                    "dropped": sender.stats.dropped, "retries": sender.stats.retries_identical
                    + sender.stats.retries_resigned,
                    # each relationship's corp tags at the end: what the enrichment's events must add up to
                    "tags": {f"{corp_id}:{customer.external_userid}": sorted(follow.tags)
                             for corp_id, corp in api.corps.items() for customer in corp.customers.values()
                             for follow in customer.follows.values()},
                    # each change, when its callback was first sent, and every answer's time (bench.ingest)
                    "actions": [[a.corp_id, a.external_userid, a.kind, a.tag_id, a.sent_at, a.delivered]
                                for a in sidebar.actions],
                    "answer_times_s": sidebar.answer_times_s}))
            await stop.wait()
        staff.cancel()
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
