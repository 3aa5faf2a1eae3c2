"""The WeCom ingest: callbacks answered per second with their answer times, and the time from
a sidebar tag to its report on the outbound topic (issue 20).

    .venv/bin/python -m bench.ingest                      # make bench-ingest
    .venv/bin/python -m bench.ingest --seconds 10 --offered 2000 --pipeline-rates 100,250,500

Everything runs on this machine, on the local broker, and the load generator shares the
two cores with what it measures.

1. **Answers.** `tagstream ingest` for eight corps, loaded by `hey` (Debian's Go HTTP load
   generator, so the client costs little of the two cores) with one callback signed and
   encrypted before the clock starts, POSTed again and again (as WeCom's identical retries
   are): `--offered` callbacks/s for `--seconds` (64 workers, each rate-limited), then as
   fast as answered. Baseline, in the same run with the same client: a bare aiohttp server
   that answers 200 without checking, decrypting or writing anything (the ceiling of one
   Python HTTP server process on this machine).
2. **The lever**: two replicas, each loaded by its own `hey` at half the load (what a load
   balancer in front of replicas does). (A producer linger of 5 ms, to batch callbacks into
   fewer writes, was measured in two runs at 3,652 and 3,742 answers/s against 3,794 and
   3,676 without: no gain, and it adds to every answer, so it is not a setting.)
3. **The ingest's own steps** (XML, signature, decryption, the record), CPU per callback by
   `timeit`, beside the stdlib's C XML parser: what a faster step could save.
4. **Tag to report**, at each of `--pipeline-rates`: the whole path. The fake WeCom's staff
   (`tests/fake_wecom`, its API and its sidebar in their own process, as the demo runs it)
   tag customers of eight corps; the ingest, the enrichment (which fetches every customer
   from the fake WeCom API) and a worker. For each real-time report on `conversion-reports`:
   its `emitted_at` minus the moment the staff member's callback was first sent, split at
   the enrichment's tag event (its record's timestamp).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import subprocess
import tempfile
import sys
import time
import timeit
import urllib.parse
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from xml.etree import ElementTree

import orjson
from aiohttp import web

from streams.kafka.admin import ensure_topics
from streams.observability.observe import scrape, total
from streams.wecom.crypto import CallbackCrypto
from streams.wecom.messages import Callback, Envelope, parse_flat
from tests.fake_wecom.callbacks import sign_callback
from tests.fake_wecom.sidebar import USERID, Action
from tests.integration.conftest import KAFKA_SH, REPO, IngestProcess, Pipeline, free_port
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


def stage_costs(repeat: int = 20_000) -> None:
    """CPU per callback of each step of the ingest's answer that is ours (not aiohttp's, not
    the Kafka client's), in this process, one at a time: what a faster step could save."""
    corp, (token, key, _, _) = sorted(CORPS.items())[0]
    crypto = CallbackCrypto(token, key)
    fields = {"ToUserName": corp, "FromUserName": "sys", "CreateTime": int(time.time()), "MsgType": "event",
              "Event": "change_external_contact", "ChangeType": "edit_external_contact", "UserID": USERID,
              "ExternalUserID": "wm00000001"}
    signed = sign_callback(CallbackCrypto(token, key), corp, fields)
    query, envelope = signed.params, Envelope.parse(signed.body)
    message = crypto.decrypt(envelope.encrypted, corp)
    callback = Callback(corp, parse_flat(message, "message"), 0)
    steps = (("envelope XML (defusedxml)", lambda: Envelope.parse(signed.body)),
             ("signature (SHA-1)", lambda: crypto.verify(query["msg_signature"], query["timestamp"], query["nonce"],
                                                         envelope.encrypted)),
             ("decryption (AES-256-CBC, cryptography)", lambda: crypto.decrypt(envelope.encrypted, corp)),
             ("message XML (defusedxml)", lambda: parse_flat(message, "message")),
             ("record: content id (SHA-256) and orjson", callback.to_wire),
             ("for comparison: the message by the stdlib's C ElementTree (no DTD guard)",
              lambda: ElementTree.fromstring(message)))
    print(f"the ingest's own steps, CPU per callback (timeit, {repeat:,} each)")
    print("| step | µs |")
    print("|---|---:|")
    for name, step in steps:
        print(f"| {name} | {timeit.timeit(step, number=repeat) / repeat * 1e6:.1f} |", flush=True)


def replicas(urls: list[str], body: Path, seconds: float, rate: float) -> tuple[float, list[float], int]:
    """`hey` against each of `urls` (one server, or replicas) at once, the rate split evenly,
    as a load balancer would spread WeCom's callbacks: answers/s summed, answer times pooled."""
    with ThreadPoolExecutor(len(urls)) as pool:
        results = list(pool.map(lambda url: hey(url, body, seconds, rate / len(urls)), urls))
    return (sum(r[0] for r in results), [t for r in results for t in r[1]], sum(r[2] for r in results))


async def answers(tmp: Path, seconds: float, offered: float) -> None:
    pipeline = Pipeline(tmp)
    await ensure_topics(pipeline.settings)
    ingest = IngestProcess(pipeline, CORPS, tmp / "ingest.log").start()
    second = IngestProcess(pipeline, CORPS, tmp / "ingest-b.log").start()
    bare = ServerThread(BareServer()).start()
    try:
        path, body = signed_body(tmp)
        print(f"answers: hey, {CONNECTIONS} connections, {seconds:g} s at {offered:,.0f} callbacks/s offered, then "
              f"{seconds:g} s as fast as answered; the bare server first, with the same client", flush=True)
        print("| server | load | answered/s | p50 ms | p99 ms | max ms | failed |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for name, servers in (("bare aiohttp (baseline)", [bare]), ("tagstream ingest", [ingest]),
                              ("tagstream ingest, two replicas", [ingest, second])):
            urls = [server.base_url + path for server in servers]
            for load, rate in ((f"{offered:,.0f}/s offered", offered), ("as fast as answered", 0)):
                result = await asyncio.get_running_loop().run_in_executor(None, replicas, urls, body, seconds, rate)
                print(row(name, load, result), flush=True)
        accepted = sum(total(scrape(replica.port), "tagstream_wecom_callbacks_total", outcome="accepted")
                       for replica in (ingest, second))
        print(f"the ingest accepted {accepted:,.0f} callbacks, each written to wecom-callbacks (acks=all) "
              "before its answer")
    finally:
        for process in (ingest, second):
            process.stop()
        bare.stop()
        await asyncio.get_running_loop().run_in_executor(None, lambda: pipeline.stop(delete_topics=True))


def rules(now_ms: int) -> list[tuple[str, str, dict]]:
    return [("tag_mappings", f"{corp}:{tag}", {
        "corp_id": corp, "tag_id": tag, "tag_name": tag, "standard_type": standard_type, "account_id": 5000 + i,
        "user_action_set_id": 15000 + i, "effective_from": now_ms - 86_400_000, "version": 1, "action_type": None})
        for i, corp in enumerate(sorted(CORPS)) for tag, standard_type in TAGS.items() if standard_type]


async def tag_to_report(tmp: Path, seconds: float, rate: float) -> None:
    """The whole path at `rate` callbacks/s; the fake WeCom (its API and its staff) in its own
    process, as the demo runs it. Each real-time report's latency, and where it went: from the
    staff's callback to the enrichment's tag event (its record's timestamp: ingest, answer,
    enrichment, one API call), and from there to the report's `emitted_at` (the worker)."""
    pipeline = Pipeline(tmp, delay_hold=3_600_000)
    await ensure_topics(pipeline.settings)
    the_rules = rules(int(time.time() * 1000))
    await asyncio.get_running_loop().run_in_executor(None, lambda: pipeline.send(*the_rules))
    api_port = free_port()
    overrides = {"wecom_api_base": f"http://127.0.0.1:{api_port}/cgi-bin/"}
    worker = pipeline.start_worker()
    worker.wait_for_rules(len(the_rules))
    ingest = IngestProcess(pipeline, CORPS, tmp / "ingest2.log", **overrides).start()
    enrich = IngestProcess(pipeline, CORPS, tmp / "enrich.log", command="enrich", **overrides).start()
    count = int(seconds * rate)
    done = tmp / f"staff-{rate:g}.json"
    fake = subprocess.Popen([sys.executable, "-m", "tests.fake_wecom", "--corps-file", str(tmp / "wecom-corps.yaml"),
                             "--tags", ",".join(TAGS), "--ingest", ingest.base_url, "--api-port", str(api_port),
                             "--callbacks", str(count), "--rate", str(rate), "--seed", "5", "--done-file", str(done)],
                            cwd=REPO, stdout=open(tmp / "fake-wecom.log", "ab"), stderr=subprocess.STDOUT)
    try:
        print(f"\ntag to report: {count:,} sidebar changes at {rate:,.0f} callbacks/s over {len(CORPS)} corps "
              "(the fake WeCom's API and staff in their own process; ingest, enrichment, worker)", flush=True)
        deadline = time.monotonic() + seconds * 4 + 60
        while not done.exists() and fake.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        staff = orjson.loads(done.read_bytes())
        actions = [Action(*a) for a in staff["actions"]]
        realtime = {st for st in TAGS.values() if st not in (None, "LONG_TERM", "INVALID")}
        first_add = {}
        for action in actions:
            if action.kind == "add_tag" and TAGS[action.tag_id] in realtime:
                first_add.setdefault((action.corp_id, action.external_userid, TAGS[action.tag_id]), action)
        expected = len([a for a in first_add.values() if a.delivered])
        # every answered customer's first real-time tag ends as a report, or as an unreportable
        # one without identity: wait for both (waiting for reports alone sat out the timeout)
        def read_all(topic: str) -> list:
            return pipeline.read(topic, timeout=10, settle=1, until=lambda rs: True)
        wait_until = time.monotonic() + 120
        while True:
            reports = await asyncio.get_running_loop().run_in_executor(None, read_all, "conversion_reports")
            parked = await asyncio.get_running_loop().run_in_executor(None, read_all, "unreportable")
            if len(reports) + len(parked) >= 0.95 * expected or time.monotonic() > wait_until:
                break
            await asyncio.sleep(1)
        tag_events = await asyncio.get_running_loop().run_in_executor(None, lambda: pipeline.read(
            "tag_events", timeout=5))
        callbacks = await asyncio.get_running_loop().run_in_executor(None, lambda: pipeline.read(
            "wecom_callbacks", timeout=5))
        received = defaultdict(list)      # (corp, customer) -> when the ingest wrote each callback
        for record in callbacks:
            callback = orjson.loads(record.value)
            received[(callback["corp_id"], callback["fields"].get("ExternalUserID", ""))].append(record.timestamp / 1000)
        written = {}                      # (corp, customer, tag) -> when the enrichment wrote its first add
        for record in tag_events:
            event = orjson.loads(record.value)
            if event["op"] == "add":
                written.setdefault((event["corp_id"], event["external_userid"], event["tag_id"]), record.timestamp / 1000)
        total_s, ingest_s, enrich_s, worker_s = [], [], [], []
        for record in reports:
            report = orjson.loads(record.value)
            action = first_add.get((report["corp_id"], report["external_userid"], report["standard_type"]))
            if report["mode"] == "realtime" and action is not None and action.tag_id == report["tag_id"]:
                total_s.append(report["emitted_at"] / 1000 - action.sent_at)
                at = written.get((action.corp_id, action.external_userid, action.tag_id))
                # the first write of this customer's callbacks at or after the action was sent
                wrote = min((t for t in received[(action.corp_id, action.external_userid)] if t >= action.sent_at - 0.005),
                            default=None)
                if at is not None and wrote is not None:
                    ingest_s.append(wrote - action.sent_at)
                    enrich_s.append(at - wrote)
                    worker_s.append(report["emitted_at"] / 1000 - at)
        answers_ms = [t * 1000 for t in staff["answer_times_s"]]
        print(f"{staff['answered']:,} of {staff['callbacks']:,} callbacks answered, p50 "
              f"{percentile(answers_ms, 0.5):.1f} ms, p99 {percentile(answers_ms, 0.99):.1f} ms; "
              f"{len(total_s):,} real-time reports of {expected:,} customers whose first real-time tag was answered "
              "(reports without identity go to unreportable)")
        print("| from | to | p50 ms | p99 ms | max ms |")
        print("|---|---|---:|---:|---:|")
        for start_at, end_at, values in (("callback sent", "report emitted", total_s),
                                         ("callback sent", "callback written to wecom-callbacks (ingest)", ingest_s),
                                         ("callback written", "tag event written (enrichment)", enrich_s),
                                         ("tag event written", "report emitted (worker)", worker_s)):
            if values:
                print(f"| {start_at} | {end_at} | {percentile(values, 0.5) * 1000:,.0f} | "
                      f"{percentile(values, 0.99) * 1000:,.0f} | {max(values) * 1000:,.0f} |", flush=True)
    finally:
        fake.terminate()
        fake.wait(10)
        for process in (enrich, ingest):
            process.stop()
        await asyncio.get_running_loop().run_in_executor(None, lambda: pipeline.stop(delete_topics=True))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each offered load (default 10)")
    parser.add_argument("--offered", type=float, default=2000.0, help="callbacks/s offered to the ingest alone")
    parser.add_argument("--pipeline-rates", default="100,250,500",
                        help="callbacks/s through the whole path, one run each (default 100,250,500)")
    args = parser.parse_args(argv)
    subprocess.run([str(KAFKA_SH), "start"], check=True, capture_output=True)
    stage_costs()
    with tempfile.TemporaryDirectory(prefix="bench-ingest-", ) as tmp:
        asyncio.run(answers(Path(tmp), args.seconds, args.offered))
    for rate in (float(r) for r in args.pipeline_rates.split(",")):
        with tempfile.TemporaryDirectory(prefix="bench-ingest-", ) as tmp:
            asyncio.run(tag_to_report(Path(tmp), args.seconds * 3, rate))


if __name__ == "__main__":
    main()
