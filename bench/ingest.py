"""The WeCom ingest: callbacks answered per second with their answer times, and the time from
a sidebar tag to its report on the outbound topic (issue 20).

    .venv/bin/python -m bench.ingest                      # make bench-ingest
    .venv/bin/python -m bench.ingest --seconds 10 --offered 2000 --pipeline-rate 500

Everything runs on this machine, on the local broker, and the load generator shares the
two cores with what it measures.

1. **Answers.** `tagstream ingest` for eight corps, loaded by `hey` (Debian's Go HTTP load
   generator, so the client costs little of the two cores) with one callback signed and
   encrypted before the clock starts, POSTed again and again (as WeCom's identical retries
   are): `--offered` callbacks/s for `--seconds` (64 workers, each rate-limited), then as
   fast as answered. Baseline, in the same run with the same client: a bare aiohttp server
   that answers 200 without checking, decrypting or writing anything (the ceiling of one
   Python HTTP server process on this machine).
2. **Tag to report.** The whole path: the fake WeCom's staff (`tests/fake_wecom/sidebar.py`)
   tag customers of eight corps at `--pipeline-rate` callbacks/s; the ingest, the enrichment
   (which fetches every customer from the fake WeCom API) and a worker. For each real-time
   report on `conversion-reports`: its `emitted_at` minus the moment the staff member's
   callback was first sent.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import statistics
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path

import orjson
from aiohttp import web

from streams.kafka.admin import ensure_topics
from streams.wecom.crypto import CallbackCrypto
from tests.fake_wecom.api import FakeWeComApi
from streams.observability.observe import scrape, total
from tests.fake_wecom.callbacks import CallbackSender, sign_callback
from tests.fake_wecom.sidebar import USERID, Sidebar
from tests.integration.conftest import KAFKA_SH, IngestProcess, Pipeline
from tests.marketing_api_server import ServerThread

CORPS = {f"wwbench{n:09d}": (f"bench-token-{n}", base64.b64encode(bytes(range(n, n + 32))).decode().rstrip("="),
                             f"bench-contact-secret-{n}", f"wxbench{n}") for n in range(8)}
TAGS = {"etConsult": "CONSULT", "etLead": "LEAD", "etValid": "VALID", "etOrder": "ORDER", "etLongTerm": "LONG_TERM",
        "etInvalid": "INVALID", "etRegion1": None, "etRegion2": None, "etSource": None, "etInterest": None}
CONNECTIONS = 64


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def signed_body(tmp: Path) -> tuple[str, Path]:
    """One callback, signed and encrypted before the clock starts (WeCom's work, not ours):
    its query string, and its body in a file. Sent again and again, as WeCom's identical
    retries are: the ingest writes each delivery (the enrichment's ids make repeats harmless)."""
    corp, (token, key, _, _) = sorted(CORPS.items())[0]
    fields = {"ToUserName": corp, "FromUserName": "sys", "CreateTime": int(time.time()), "MsgType": "event",
              "Event": "change_external_contact", "ChangeType": "edit_external_contact", "UserID": USERID,
              "ExternalUserID": "wm00000001"}
    signed = sign_callback(CallbackCrypto(token, key), corp, fields)
    body = tmp / "callback.xml"
    body.write_bytes(signed.body)
    return f"/wecom/{corp}/callback?{urllib.parse.urlencode(signed.params)}", body


def hey(url: str, body: Path, seconds: float, rate: float) -> tuple[float, list[float], int]:
    """`hey` (Debian's Go HTTP load generator) POSTing `body` for `seconds`: at `rate`/s
    (CONNECTIONS workers, each limited to rate/CONNECTIONS per second), or as fast as the
    server answers (rate 0). (answered per second, answer times in seconds, failures)."""
    command = ["hey", "-z", f"{seconds:g}s", "-c", str(CONNECTIONS), "-m", "POST", "-D", str(body),
               "-T", "text/xml", "-o", "csv"] + (["-q", f"{rate / CONNECTIONS:g}"] if rate else []) + [url]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()
    rows = [line.split(",") for line in out[1:] if line]
    times = [float(r[0]) for r in rows if r[6] == "200"]
    elapsed = max((float(r[7]) + float(r[0]) for r in rows), default=seconds)
    return len(times) / elapsed, times, len(rows) - len(times)


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
    await ensure_topics(pipeline.settings)
    ingest = IngestProcess(pipeline, CORPS, tmp / "ingest.log").start()
    bare = ServerThread(BareServer()).start()
    try:
        path, body = signed_body(tmp)
        print(f"answers: hey, {CONNECTIONS} connections, {seconds:g} s at {offered:,.0f} callbacks/s offered, then "
              f"{seconds:g} s as fast as answered; the bare server first, with the same client", flush=True)
        print("| server | load | answered/s | p50 ms | p99 ms | max ms | failed |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for name, url in (("bare aiohttp (baseline)", bare.base_url), ("tagstream ingest", ingest.base_url)):
            for load, rate in ((f"{offered:,.0f}/s offered", offered), ("as fast as answered", 0)):
                result = await asyncio.get_running_loop().run_in_executor(None, hey, url + path, body, seconds, rate)
                print(row(name, load, result), flush=True)
        accepted = total(scrape(ingest.port), "tagstream_wecom_callbacks_total", outcome="accepted")
        print(f"the ingest accepted {accepted:,.0f} callbacks, each written to wecom-callbacks (acks=all) "
              "before its answer")
    finally:
        ingest.stop()
        bare.stop()
        await asyncio.get_running_loop().run_in_executor(None, lambda: pipeline.stop(delete_topics=True))


def rules(now_ms: int) -> list[tuple[str, str, dict]]:
    return [("tag_mappings", f"{corp}:{tag}", {
        "corp_id": corp, "tag_id": tag, "tag_name": tag, "standard_type": standard_type, "account_id": 5000 + i,
        "user_action_set_id": 15000 + i, "effective_from": now_ms - 86_400_000, "version": 1, "action_type": None})
        for i, corp in enumerate(sorted(CORPS)) for tag, standard_type in TAGS.items() if standard_type]


async def tag_to_report(tmp: Path, seconds: float, rate: float) -> None:
    pipeline = Pipeline(tmp, delay_hold=3_600_000)
    await ensure_topics(pipeline.settings)
    the_rules = rules(int(time.time() * 1000))
    await asyncio.get_running_loop().run_in_executor(None, lambda: pipeline.send(*the_rules))
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
        await asyncio.get_running_loop().run_in_executor(None, lambda: pipeline.stop(delete_topics=True))
        api.stop()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each offered load (default 10)")
    parser.add_argument("--offered", type=float, default=2000.0, help="callbacks/s offered to the ingest alone")
    parser.add_argument("--pipeline-rate", type=float, default=500.0, help="callbacks/s through the whole path")
    args = parser.parse_args(argv)
    subprocess.run([str(KAFKA_SH), "start"], check=True, capture_output=True)
    with tempfile.TemporaryDirectory(prefix="bench-ingest-", ) as tmp:
        asyncio.run(answers(Path(tmp), args.seconds, args.offered))
        asyncio.run(tag_to_report(Path(tmp), args.seconds * 3, args.pipeline_rate))


if __name__ == "__main__":
    main()
