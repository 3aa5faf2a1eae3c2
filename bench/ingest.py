"""The WeCom ingest: callbacks answered per second with their answer times, and the time from
a sidebar tag to its report on the outbound topic (issue 20).

    .venv/bin/python -m bench.ingest                      # make bench-ingest
    .venv/bin/python -m bench.ingest --seconds 10 --offered 2000 --pipeline-rate 500

Everything runs on this machine, on the local broker, and the load generator shares the
two cores with what it measures.

1. **Answers.** `tagstream ingest` for eight corps. The callbacks are signed and encrypted
   before the clock starts (WeCom's work, not ours). Offered open-loop at `--offered`/s for
   `--seconds`: each answer time is measured from when its callback was due, so a stalled
   server is charged for the callbacks waiting behind it (no coordinated omission). Then
   closed-loop with 64 connections, for the most the ingest answers. Baseline, in the same
   run and with the same client: a bare aiohttp server that answers 200 without checking,
   decrypting or writing anything (the ceiling of this client and HTTP on this machine).
2. **Tag to report.** The whole path: the fake WeCom's staff (`tests/fake_wecom/sidebar.py`)
   tag customers of eight corps at `--pipeline-rate` callbacks/s; the ingest, the enrichment
   (which fetches every customer from the fake WeCom API) and a worker. For each real-time
   report on `conversion-reports`: its `emitted_at` minus the moment the staff member's
   callback was first sent.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web

from streams.wecom.crypto import CallbackCrypto
from tests.fake_wecom.api import FakeWeComApi
from tests.fake_wecom.callbacks import CallbackSender, SignedCallback, sign_callback
from tests.fake_wecom.sidebar import USERID, Sidebar
from tests.integration.conftest import KAFKA_SH, IngestProcess, Pipeline
from tests.marketing_api_server import ServerThread

CORPS = {f"wwbench{n:09d}": (f"bench-token-{n}", f"{n:02d}" + "abcdefghijklmnopqrstuvwxyz0123456789ABCDE"[2:],
                             f"bench-contact-secret-{n}", f"wxbench{n}") for n in range(8)}
TAGS = {"etConsult": "CONSULT", "etLead": "LEAD", "etValid": "VALID", "etOrder": "ORDER", "etLongTerm": "LONG_TERM",
        "etInvalid": "INVALID", "etRegion1": None, "etRegion2": None, "etSource": None, "etInterest": None}
CONNECTIONS = 64


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def presigned(count: int, seed: int) -> list[tuple[str, SignedCallback]]:
    rng = random.Random(seed)
    cryptos = {corp: CallbackCrypto(token, key) for corp, (token, key, _, _) in CORPS.items()}
    out = []
    for n in range(count):
        corp = rng.choice(sorted(CORPS))
        fields = {"ToUserName": corp, "FromUserName": "sys", "CreateTime": int(time.time()), "MsgType": "event",
                  "Event": "change_external_contact", "ChangeType": "edit_external_contact", "UserID": USERID,
                  "ExternalUserID": f"wm{n:08d}"}
        out.append((corp, sign_callback(cryptos[corp], corp, fields)))
    return out


async def offer(base_url: str, callbacks: list, rate: float) -> tuple[float, list[float], int]:
    """Open loop: callback i is due at i/rate; (answered per second, answer times from due, failures)."""
    times: list[float] = []
    failures = 0
    connector = aiohttp.TCPConnector(limit=512)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()

        async def one(i: int, corp: str, signed: SignedCallback) -> None:
            nonlocal failures
            due = started + i / rate
            try:
                async with session.post(f"{base_url}/wecom/{corp}/callback", params=signed.params,
                                        data=signed.body, timeout=aiohttp.ClientTimeout(total=10)) as response:
                    await response.read()
                    ok = response.status == 200
            except (aiohttp.ClientError, asyncio.TimeoutError):
                ok = False
            if ok:
                times.append(time.perf_counter() - due)
            else:
                failures += 1

        tasks = []
        for i, (corp, signed) in enumerate(callbacks):
            wait = started + i / rate - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.create_task(one(i, corp, signed)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
    return len(times) / elapsed, times, failures


async def saturate(base_url: str, callbacks: list) -> tuple[float, list[float], int]:
    """Closed loop with CONNECTIONS connections: as fast as the server answers."""
    times: list[float] = []
    failures = 0
    queue = list(reversed(callbacks))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONNECTIONS)) as session:
        async def worker() -> None:
            nonlocal failures
            while queue:
                corp, signed = queue.pop()
                t0 = time.perf_counter()
                try:
                    async with session.post(f"{base_url}/wecom/{corp}/callback", params=signed.params,
                                            data=signed.body) as response:
                        await response.read()
                        ok = response.status == 200
                except aiohttp.ClientError:
                    ok = False
                if ok:
                    times.append(time.perf_counter() - t0)
                else:
                    failures += 1
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONNECTIONS)))
        elapsed = time.perf_counter() - started
    return len(times) / elapsed, times, failures


class BareServer:
    """The baseline: 200 to every POST, after reading the body; nothing else."""

    def app(self) -> web.Application:
        async def ok(request: web.Request) -> web.Response:
            await request.read()
            return web.Response(text="")
        app = web.Application()
        app.add_routes([web.post("/wecom/{corp}/callback", ok)])
        return app


def row(name: str, load: str, result: tuple[float, list[float], int]) -> str:
    rate, times, failures = result
    return (f"| {name} | {load} | {rate:,.0f} | {percentile(times, 0.5) * 1000:.1f} | {percentile(times, 0.99) * 1000:.1f} | "
            f"{max(times) * 1000 if times else float('nan'):.1f} | {failures:,} |")


async def answers(tmp: Path, seconds: float, offered: float) -> None:
    pipeline = Pipeline(tmp)
    pipeline.create_topics()
    ingest = IngestProcess(pipeline, CORPS, tmp / "ingest.log").start()
    bare = ServerThread(BareServer()).start()
    try:
        count = int(seconds * offered)
        print(f"answers: {count:,} callbacks offered at {offered:,.0f}/s, then {count:,} closed-loop "
              f"({CONNECTIONS} connections); the same client against the bare server first", flush=True)
        print("| server | load | answered/s | p50 ms | p99 ms | max ms | failed |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for name, url in (("bare aiohttp (baseline)", bare.base_url), ("tagstream ingest", ingest.base_url)):
            print(row(name, f"open loop {offered:,.0f}/s", await offer(url, presigned(count, 1), offered)), flush=True)
            print(row(name, f"closed loop, {CONNECTIONS} connections", await saturate(url, presigned(count, 2))),
                  flush=True)
        written = len(pipeline.read("wecom_callbacks", timeout=5, until=lambda rs: len(rs) >= 2 * count, settle=1))
        print(f"records on wecom-callbacks: {written:,} (every answered callback is on the topic first)")
    finally:
        ingest.stop()
        bare.stop()
        pipeline.stop(delete_topics=True)


def rules(now_ms: int) -> list[tuple[str, str, dict]]:
    return [("tag_mappings", f"{corp}:{tag}", {
        "corp_id": corp, "tag_id": tag, "tag_name": tag, "standard_type": standard_type, "account_id": 5000 + i,
        "user_action_set_id": 15000 + i, "effective_from": now_ms - 86_400_000, "version": 1, "action_type": None})
        for i, corp in enumerate(sorted(CORPS)) for tag, standard_type in TAGS.items() if standard_type]


async def tag_to_report(tmp: Path, seconds: float, rate: float) -> None:
    pipeline = Pipeline(tmp, delay_hold=3_600_000)
    pipeline.create_topics()
    the_rules = rules(int(time.time() * 1000))
    pipeline.send(*the_rules)
    fake = FakeWeComApi(seed=3)
    for corp, (_, _, secret, _) in CORPS.items():
        fake.add_corp(corp, secret, {t: t for t in TAGS})
    api = ServerThread(fake).start()
    overrides = {"wecom_api_base": f"{api.base_url}/cgi-bin/"}
    worker = pipeline.start_worker()
    worker.wait_for_rules(len(the_rules))
    ingest = IngestProcess(pipeline, CORPS, tmp / "ingest2.log", **overrides).start()
    enrich = IngestProcess(pipeline, CORPS, tmp / "enrich.log", command="enrich", **overrides).start()
    try:
        await asyncio.sleep(5)               # the enrichment joins its group
        cryptos = {corp: CallbackCrypto(token, key) for corp, (token, key, _, _) in CORPS.items()}
        async with CallbackSender(ingest.base_url, cryptos, seed=4) as sender:
            sidebar = Sidebar(fake, sender, list(TAGS), seed=5)
            count = int(seconds * rate)
            print(f"\ntag to report: {count:,} sidebar changes at {rate:,.0f} callbacks/s over {len(CORPS)} corps "
                  "(ingest, enrichment with the fake WeCom API, worker)", flush=True)
            started = time.monotonic()
            await sidebar.run(count, rate)
            sent_for = time.monotonic() - started
        realtime = {st for st in TAGS.values() if st not in (None, "LONG_TERM", "INVALID")}
        first_add = {}
        for action in sidebar.actions:
            if action.kind == "add_tag" and TAGS[action.tag_id] in realtime:
                first_add.setdefault((action.corp_id, action.external_userid, TAGS[action.tag_id]), action)
        reports = await asyncio.get_running_loop().run_in_executor(None, lambda: pipeline.read(
            "conversion_reports", timeout=120, settle=3,
            until=lambda rs: len(rs) >= 0.95 * len([a for a in first_add.values() if a.delivered])))
        latencies = []
        for record in reports:
            report = orjson.loads(record.value)
            action = first_add.get((report["corp_id"], report["external_userid"], report["standard_type"]))
            if report["mode"] == "realtime" and action is not None and action.tag_id == report["tag_id"]:
                latencies.append(report["emitted_at"] / 1000 - action.sent_at)
        answers_ms = [t * 1000 for t in sidebar.answer_times_s]
        print(f"offered {count / sent_for:,.0f} callbacks/s; answered p50 {percentile(answers_ms, 0.5):.1f} ms, "
              f"p99 {percentile(answers_ms, 0.99):.1f} ms; {sum(a.delivered for a in sidebar.actions):,} answered")
        print("| real-time reports | tag to report p50 ms | p99 ms | max ms | mean ms |")
        print("|---:|---:|---:|---:|---:|")
        if latencies:
            print(f"| {len(latencies):,} | {percentile(latencies, 0.5) * 1000:.0f} | "
                  f"{percentile(latencies, 0.99) * 1000:.0f} | {max(latencies) * 1000:.0f} | "
                  f"{statistics.mean(latencies) * 1000:.0f} |")
        print(f"(customers whose first real-time tag was answered: {len([a for a in first_add.values() if a.delivered]):,}; "
              f"reports without identity go to unreportable, not counted here)")
    finally:
        for process in (enrich, ingest):
            process.stop()
        pipeline.stop(delete_topics=True)
        api.stop()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each offered load (default 10)")
    parser.add_argument("--offered", type=float, default=2000.0, help="callbacks/s offered to the ingest alone")
    parser.add_argument("--pipeline-rate", type=float, default=500.0, help="callbacks/s through the whole path")
    args = parser.parse_args(argv)
    import subprocess
    subprocess.run([str(KAFKA_SH), "start"], check=True, capture_output=True)
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        asyncio.run(answers(Path(tmp), args.seconds, args.offered))
        asyncio.run(tag_to_report(Path(tmp), args.seconds * 3, args.pipeline_rate))


if __name__ == "__main__":
    main()
