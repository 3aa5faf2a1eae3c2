"""Provider mode on the real broker (issue 21): 50 corps authorise one suite one after the
other while the staff of the corps already in keep working, and three of them cancel
mid-run. The whole path runs: ingest, enrichment, worker, sink, the fake WeCom and the local
Marketing API.

The fake WeCom pushes a suite ticket, then authorises corps one after another (QR scan:
`create_auth` with a single-use code); after each, the new corp's staff and those of a few
corps already in add and tag customers, their callbacks in the provider format on the
suite's command URL, retried as WeCom retries. What must hold:

- the reports of the 47 corps that stay equal the reference model's over the events the
  enrichment wrote for them (tags mapped to VALID report at once; INVALID is held, and the
  run is shorter than the hold);
- each cancelled corp is erased within the erasure deadline, audited on `wecom-erasures` by
  the enrichment, the worker (every partition) and the sink, with counts and no customer id;
  then no key or value of any compacted topic's latest state (the enrichment's topics, the
  rules, the delivered record, the worker's changelogs) carries its id, nor does any record
  of the delivered record name it, nor does any key or value of any RocksDB store the worker
  wrote;
- a cancelled corp's later callbacks are refused and counted, and none becomes an event;
- `wecom-auth` holds each staying corp's permanent code sealed, the cancelled corps' not at
  all, and no secret (suite secret, token, key, ticket, auth code, permanent code) reaches a
  log, a metric or a dead letter.
"""
from __future__ import annotations

import asyncio
import hashlib
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
from cryptography.fernet import Fernet
from rocksdict import AccessType, Options, Rdict

from streams.observability.observe import scrape, total
from streams.wecom.crypto import CallbackCrypto
from tests.fake_wecom.api import FakeWeComApi, Staff
from tests.fake_wecom.callbacks import CallbackSender
from tests.fake_wecom.provider import FakeProvider
from streams.sinks.reporting import CORP_HEADER
from tests.integration.conftest import (REPO, IngestProcess, Pipeline, SinkProcess, WorkerProcess, assert_no_secret_exposed,
                                        wait_until)
from tests.kafka_io import read_topic
from tests.logs import kafka_partition
from tests.marketing_api_server import MarketingApiServer, ServerThread
from tests.reference_model import reference_reports

SUITE_ID = "wwsuitee2e000001"
SUITE = (SUITE_ID, "suite-callback-token", "Zm9vYmFyYmF6cXV4MDEyMzQ1Njc4OWFiY2RlZmdoaWo", "suite-secret-e2e",
         "wxsuiteapp", Fernet.generate_key().decode())
#: the suite's secrets, for the session's scan of every log the tests wrote (tests/conftest.py)
SECRETS = [SUITE[1], SUITE[2], SUITE[3], SUITE[5]]
API_TOKEN = "provider-e2e-marketing-token"
PARTITIONS = 4
CORPS = [f"wwprov{n:010d}" for n in range(50)]
#: corp -> it cancels once this many corps have authorised
CANCELLING = {CORPS[4]: 20, CORPS[11]: 32, CORPS[25]: 44}
STAYING = [c for c in CORPS if c not in CANCELLING]
TAGS = {"etA": "核心", "etB": "无效", "etC": "区域"}
TYPES = {"etA": "VALID", "etB": "INVALID", "etC": None}
USERID = "staff1"
ERASURE_DEADLINE_S = 60


def compacted(pipeline: Pipeline, topic: str, full_name: str | None = None) -> dict[str, object]:
    """A topic's latest record per key, tombstoned keys left out (what compaction keeps)."""
    latest: dict[str, object] = {}
    for record in read_topic(full_name or pipeline.topic(topic), PARTITIONS, timeout=1, connection=pipeline.connection):
        key = record.key.decode()
        if record.value is None:
            latest.pop(key, None)
        else:
            latest[key] = record
    return latest


def metric(port: int, name: str, **labels) -> float:
    return total(scrape(port) or {}, name, **labels)


def oid(corp: str, customer: str, standard_type: str) -> str:
    return hashlib.sha256(f"{corp}|{customer}|{standard_type}".encode()).hexdigest()


class Run:
    def __init__(self, pipeline, ingest, enrich, provider, staff, marketing):
        self.pipeline, self.ingest, self.enrich = pipeline, ingest, enrich
        self.provider, self.staff, self.marketing = provider, staff, marketing
        self.enrich_port = int(enrich.env["TAGSTREAM_ENRICH_METRICS_PORT"])
        self.customers: dict[str, list[str]] = {}
        self.after_cancel: dict[str, set] = {corp: set() for corp in CANCELLING}
        self.codes: list[str] = []
        self.cancelled_at: dict[str, float] = {}

    async def traffic(self, seed: int) -> None:
        rng = random.Random(seed)
        crypto = CallbackCrypto(SUITE[1], SUITE[2])
        loop = asyncio.get_running_loop()
        async with CallbackSender(self.ingest.base_url, {SUITE_ID: crypto}, suites=frozenset({SUITE_ID}),
                                  seed=seed, retry_intervals_s=(0.2, 0.4, 0.8)) as sender:
            async def send(fields: dict) -> None:
                assert await sender.send(SUITE_ID, self.provider.provider_event(fields))

            ticket = self.provider.push_ticket()
            assert await sender.send(SUITE_ID, ticket)
            self.codes.append(ticket["SuiteTicket"])
            authorised: list[str] = []
            for n, corp in enumerate(CORPS):
                command = self.provider.authorise(corp, TAGS)
                self.codes.append(command["AuthCode"])
                assert await sender.send(SUITE_ID, command)
                authorised.append(corp)
                self.customers[corp] = []
                await send(self.staff.rename_tag(corp, "etC", "区域-新"))
                # the new corp's first customer, tagged VALID and INVALID (a running hold), and
                # a few corps already in: a new customer or a tag change each, interleaved
                busy = [corp] + rng.sample(authorised[:-1], k=min(6, len(authorised) - 1))
                for c in busy:
                    if c == corp or not self.customers[c] or rng.random() < 0.4:
                        customer = f"wm{c[-3:]}{len(self.customers[c]):03d}"
                        self.customers[c].append(customer)
                        unionid = f"un-{customer}" if c == corp or rng.random() < 0.7 else None   # else unreportable
                        await send(self.staff.add_customer(c, customer, USERID, state=f"ad_{n}", unionid=unionid))
                        add, remove = ["etA", "etB"] if c == corp else rng.sample(sorted(TAGS), k=1), []
                    else:
                        customer = rng.choice(self.customers[c])
                        add = rng.sample(sorted(TAGS), k=rng.randint(0, 2))
                        remove = [t for t in rng.sample(sorted(TAGS), k=rng.randint(0, 1)) if t not in add]
                    if c in self.cancelled_at:
                        self.after_cancel[c].add(customer)     # sent after its cancel_auth was applied
                    await send(self.staff.tag(c, customer, USERID, add=add, remove=remove))
                await asyncio.sleep(0.05)
                for cancelling, after in CANCELLING.items():
                    if n + 1 == after:
                        await loop.run_in_executor(None, self.wait_until_reported, cancelling)
                        assert await sender.send(SUITE_ID, self.provider.cancel(cancelling))
                        self.cancelled_at[cancelling] = time.time()
                        await loop.run_in_executor(None, lambda: wait_until(
                            lambda: metric(self.enrich_port, "tagstream_wecom_auth_commands_total",
                                           info_type="cancel_auth", outcome="applied") == len(self.cancelled_at),
                            60, "the cancel_auth to be applied", self.enrich))
            for corp in CANCELLING:                    # and once more at the end, from every one
                customer = self.customers[corp][0]
                self.after_cancel[corp].add(customer)
                await send(self.staff.tag(corp, customer, USERID, add=["etC"]))

    def wait_until_reported(self, corp: str) -> None:
        """Before a corp cancels, its first customer's VALID reached the API (so the worker,
        the sink and the enrichment all hold something of it to erase)."""
        wanted = oid(corp, self.customers[corp][0], "VALID")
        wait_until(lambda: wanted in self.marketing.accepted, 90, f"{corp}'s first report", self.enrich)


def deploy(pipeline: Pipeline, tmp_path: Path, rules: list, seed: int) -> tuple:
    """The whole path on `pipeline`: the fake WeCom with its provider side, the local
    Marketing API, a worker (with `rules` loaded), the ingest, the enrichment and the sink."""
    fake = FakeWeComApi(seed=seed)
    provider = FakeProvider(fake, SUITE_ID, SUITE[3])
    wecom = ServerThread(fake).start()
    marketing = MarketingApiServer(API_TOKEN)
    api = ServerThread(marketing).start()
    (tmp_path / "token").write_text(API_TOKEN)
    overrides = {"wecom_api_base": f"{wecom.base_url}/cgi-bin/"}
    worker = pipeline.start_worker()
    worker.wait_for_rules(len(rules))
    ingest = IngestProcess(pipeline, {}, tmp_path / "ingest.log", suite=SUITE, **overrides).start()
    enrich = IngestProcess(pipeline, {}, tmp_path / "enrich.log", command="enrich", suite=SUITE, **overrides).start()
    sink = SinkProcess(pipeline, api.base_url, tmp_path / "token", tmp_path / "sink.log").start()
    return fake, provider, wecom, marketing, api, worker, ingest, enrich, sink


def undeploy(pipeline: Pipeline, wecom, api, *processes) -> None:
    for process in processes:
        process.stop()
    pipeline.stop()
    wecom.stop()
    api.stop()


def rocksdb_items(data_dir: Path):
    """Every (store, key, value) of every RocksDB database under `data_dir`."""
    for current in data_dir.rglob("CURRENT"):
        options = Options(raw_mode=True)
        db = Rdict(str(current.parent), options, access_type=AccessType.read_only())
        try:
            for key, value in db.items():
                yield current.parent.name, key, value
        finally:
            db.close()


def test_fifty_corps_authorise_while_traffic_flows_and_three_that_cancel_are_erased(kafka_broker, tmp_path):
    pipeline = Pipeline(tmp_path, partitions=PARTITIONS, erasure_deadline=ERASURE_DEADLINE_S * 1000,
                        sink_rate_limit=60_000)
    pipeline.create_topics()
    now_ms = int(time.time() * 1000)
    rules = [(f"{corp}:{tag}", {
        "corp_id": corp, "tag_id": tag, "tag_name": name, "standard_type": TYPES[tag],
        "account_id": 4000 + n % 3, "user_action_set_id": 14000 + n % 3, "effective_from": now_ms - 86_400_000,
        "version": 1, "action_type": None}) for n, corp in enumerate(CORPS) for tag, name in TAGS.items()]
    pipeline.send(*[("tag_mappings", key, value) for key, value in rules])
    pipeline.send(*[("ad_clicks", f"{corp}:ad_{n}", {"click_id": f"clk-{n}", "click_time": now_ms})
                    for corp in CORPS for n in range(len(CORPS))])
    fake, provider, wecom, marketing, api, worker, ingest, enrich, sink = deploy(pipeline, tmp_path, rules, seed=5)
    run = Run(pipeline, ingest, enrich, provider, Staff(fake), marketing)
    secrets = list(SECRETS)
    try:
        asyncio.run(run.traffic(seed=11))
        secrets += run.codes + list(provider.permanent_codes.values())
        # the operator's tools serve the authorised corps too: a reconcile repairs a lost
        # callback, `tagstream tag` tags through the suite, and a cancelled corp is refused
        env = {**ingest.env, "TAGSTREAM_RECONCILE_STATE_DIR": str(tmp_path / "reconcile")}
        repaired = []
        for corp, how in ((STAYING[0], "reconcile"), (STAYING[1], "tag")):
            customer = run.customers[corp][0]
            tag = next(t for t in sorted(TAGS) if t not in fake.corps[corp].customers[customer].follows[USERID].tags)
            repaired.append((corp, customer, tag))
            if how == "reconcile":
                run.staff.tag(corp, customer, USERID, add=[tag])       # its callback is lost
                args = ["reconcile", "--corp", corp]
            else:
                args = ["tag", "--corp", corp, "--userid", USERID, "--customer", customer, "--add", tag]
            done = subprocess.run([sys.executable, "-m", "streams.cli", *args], env=env, cwd=REPO,
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
        refused = subprocess.run([sys.executable, "-m", "streams.cli", "tag", "--corp", next(iter(CANCELLING)),
                                  "--userid", USERID, "--customer", "wm1", "--add", "etA"], env=env, cwd=REPO,
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and "has not authorised the suite" in refused.stderr.strip().splitlines()[-1]
        staying = {(c, customer) for c in STAYING for customer in fake.corps[c].customers}

        def events(topic: str) -> list[dict]:
            return [orjson.loads(r.value) for r in pipeline.read(topic, timeout=0.5)]
        wait_until(lambda: {(e["corp_id"], e["external_userid"]) for e in events("contact_events")} >= staying,
                   120, "every staying corp's customers as contact events", enrich)
        refused_wanted = sum(len(c) for c in run.after_cancel.values())
        wait_until(lambda: metric(run.enrich_port, "tagstream_wecom_callbacks_enriched_total", outcome="refused")
                   >= refused_wanted, 60, "the cancelled corps' later callbacks to be refused", enrich)

        wait_until(lambda: {(e["corp_id"], e["external_userid"], e["tag_id"]) for e in events("tag_events")
                            if e["op"] == "add"} >= set(repaired), 60, "the reconciled and the tagged tag", enrich)

        # -- the 47 corps that stay: their reports are the reference model's -----------------
        contact_events, tag_events = events("contact_events"), events("tag_events")
        kept = sorted((e for e in contact_events + tag_events if e["corp_id"] in STAYING),
                      key=lambda e: (e["ts"], "op" in e))
        expected, unreportable = reference_reports(
            rules, kept, partition_of=lambda key: kafka_partition(key, PARTITIONS), flush_at_end=False)
        expected_ids = {r["outer_action_id"] for r in expected}
        assert len(expected_ids) >= 40 and {r["standard_type"] for r in expected} == {"VALID"}
        wait_until(lambda: set(marketing.accepted) >= expected_ids, 90, "the staying corps' reports", sink)
        time.sleep(3)                                       # anything more would show up now
        cancelled_ids = {oid(c, u, t) for c in CANCELLING for u in run.customers[c] for t in ("VALID", "INVALID")}
        assert set(marketing.accepted) - cancelled_ids == expected_ids
        assert sum(marketing.duplicates.values()) == 0
        for report in expected:
            action = marketing.accepted[report["outer_action_id"]].action
            assert (action["action_time"], action["action_type"]) == (report["action_time"], report["action_type"])
        assert not unreportable or {orjson.loads(r.value)["outer_action_id"] for r in pipeline.read(
            "unreportable", timeout=1)} >= {r["outer_action_id"] for r in unreportable}

        # -- the cancelled corps: nothing of them came through after the cancel -------------
        assert all(run.after_cancel.values())
        assert not [e for e in contact_events + tag_events if e["corp_id"] in run.cancelled_at
                    and e["ts"] >= (run.cancelled_at[e["corp_id"]] + 1) * 1000]

        # -- erased, by every component, within the deadline ---------------------------------
        def audits() -> list[dict]:
            return [a for a in events("wecom_erasures") if a.get("kind") == "erased"]

        def worker_partitions(corp: str) -> set:
            return {a["partition"] for a in audits() if a["corp_id"] == corp and a["component"] == "worker"}
        wait_until(lambda: all(worker_partitions(c) == set(range(PARTITIONS)) for c in CANCELLING)
                   and {a["corp_id"] for a in audits() if a["component"] == "sink"} == set(CANCELLING),
                   ERASURE_DEADLINE_S, "every component's erasure of the cancelled corps", worker, sink)
        audit = audits()
        for corp, cancelled_at in run.cancelled_at.items():
            last = max(a["at"] for a in audit if a["corp_id"] == corp) / 1000
            print(f"{corp}: erased by every component {last - cancelled_at:.1f} s after its cancel_auth was sent")
            assert last - cancelled_at < ERASURE_DEADLINE_S
            mine = [a for a in audit if a["corp_id"] == corp]
            assert sum(a["keys_erased"] for a in mine if a["component"] == "worker") >= 2    # a customer, a hold
            assert sum(a["keys_erased"] for a in mine if a["component"] == "sink") >= 1
            assert sum(a["keys_erased"] for a in mine if a["topic"].endswith("wecom-snapshots")) >= 1
            assert [a for a in mine if a["topic"].endswith("wecom-tags") and a["keys_erased"] == len(TAGS)]
        assert {a["corp_id"] for a in audit} == set(CANCELLING)
        assert not [a for a in audit if "wm" in orjson.dumps(a).decode()], "a customer id in the audit"
        assert metric(pipeline.settings.metrics_port, "tagstream_erasure_pending_seconds") == 0

        gone = [c.encode() for c in CANCELLING]
        changelogs = [f"{pipeline.settings.app_id}-{table}-changelog" for table in ("reporting_state", "rule_versions")]
        for topic in ("wecom_snapshots", "wecom_tags", "ad_clicks", "tag_mappings", "wecom_auth",
                      "delivered_reports", *changelogs):
            latest = compacted(pipeline, topic, topic if topic in changelogs else None)
            assert latest, topic
            assert not [k for k, r in latest.items() if any(c in k.encode() or c in r.value for c in gone)], topic
            if topic in ("wecom_snapshots", "wecom_tags", "tag_mappings", changelogs[0]):
                assert [k for k in latest if CORPS[0] in k or CORPS[0].encode() in latest[k].value], \
                    f"{topic}: the staying corps erased too"
        hashes = {hashlib.sha256(c).hexdigest().encode() for c in gone}
        delivered = compacted(pipeline, "delivered_reports").values()
        assert not [r for r in delivered if any(v in hashes for _, v in r.headers)], "a cancelled corp's delivery"
        assert len(delivered) >= len(expected_ids)

        # -- wecom-auth: sealed codes for the staying corps, nothing of the cancelled -------
        auth = {k: orjson.loads(r.value) for k, r in compacted(pipeline, "wecom_auth").items()}
        for corp in STAYING:
            assert auth[f"corp:{corp}"]["status"] == "active" and auth[f"corp:{corp}"]["permanent_code"]
        raw = b"".join((r.value or b"") for r in pipeline.read("wecom_auth", timeout=1))
        raw += b"".join((r.value or b"") for r in pipeline.read("wecom_callbacks", timeout=1))
        assert not [s for s in secrets[len(SECRETS):] if s.encode() in raw], "a secret in clear on a topic"
        # ... nor, in any metric or dead letter, the cancelled corps' ids (no metric has a corp label)
        assert_no_secret_exposed(pipeline, [ingest.port, run.enrich_port, pipeline.settings.metrics_port, sink.port],
                                 secrets + [API_TOKEN] + list(CANCELLING))
        assert metric(run.enrich_port, "tagstream_wecom_auth_commands_total", info_type="create_auth",
                      outcome="applied") == len(CORPS)
    finally:
        undeploy(pipeline, wecom, api, ingest, enrich, sink)
    # -- the worker's RocksDB stores, once it stopped: nothing of the cancelled corps -----
    items = list(rocksdb_items(Path(pipeline.settings.data_dir)))
    assert [1 for store, _, _ in items if store.startswith("partition-")], "no worker store found"
    assert not [(store, key) for store, key, value in items if any(c in key or c in value for c in gone)]
    assert [1 for _, key, _ in items if CORPS[0].encode() in key], "the staying corps' state is gone too"
    for name in ("ingest.log", "enrich.log", "sink.log", "worker-0.log"):
        log = (tmp_path / name).read_text()
        assert not [s for s in secrets if s in log], f"a secret in {name}"


# -- chaos: SIGKILLs during create_auth and during an erasure ----------------------------------

class Supervisor:
    """Restarts a process that a failpoint killed (SIGKILL), without the failpoint; `arm`
    restarts one (gracefully) with a failpoint set."""

    def __init__(self, **processes):
        self.processes = processes
        self.kills: dict[str, int] = {name: 0 for name in processes}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _start(self, process, failpoint: str | None = None) -> None:
        if isinstance(process, WorkerProcess):
            process.start({"TAGSTREAM_FAILPOINT": failpoint} if failpoint else None)
            return
        if failpoint:
            process.env["TAGSTREAM_FAILPOINT"] = failpoint
        else:
            process.env.pop("TAGSTREAM_FAILPOINT", None)
        process.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            with self.lock:
                for name, process in self.processes.items():
                    code = process.process.poll()
                    assert code in (None, -9), f"{name} exited {code}"
                    if code == -9 and not self.stopping.is_set():
                        self.kills[name] += 1
                        self._start(process)
            time.sleep(0.1)

    def arm(self, name: str, failpoint: str) -> None:
        with self.lock:
            process = self.processes[name]
            process.stop()
            self._start(process, failpoint)

    def wait_for_kill(self, name: str, kills: int, timeout: float = 60) -> None:
        wait_until(lambda: self.kills[name] >= kills, timeout, f"{name} killed by its failpoint")

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(5)


def auth_status(pipeline: Pipeline) -> dict[str, str]:
    return {k[len("corp:"):]: orjson.loads(r.value)["status"]
            for k, r in compacted(pipeline, "wecom_auth").items() if k.startswith("corp:")}


def test_kills_during_create_auth_and_during_an_erasure_lose_only_the_window_the_protocol_leaves(kafka_broker, tmp_path):
    """Each process is killed where it hurts: the ingest after writing a create_auth and a
    cancel_auth but before answering WeCom (WeCom pushes again); the enrichment after saving
    a permanent code but before committing its batch (the corp stays authorised), and
    between get_permanent_code's answer and the save (the one window the protocol leaves:
    that authorisation is lost, and the admin's second scan brings the corp in); the worker
    and the sink in the middle of the erasure (it completes after their restart). The staying
    corps' reports equal the reference model's, and nothing of the cancelled corp is left."""
    corps = [f"wwkill{n:010d}" for n in range(6)]
    cancelling = corps[1]
    pipeline = Pipeline(tmp_path, partitions=PARTITIONS, sink_rate_limit=60_000)
    pipeline.create_topics()
    now_ms = int(time.time() * 1000)
    rules = [(f"{corp}:{tag}", {
        "corp_id": corp, "tag_id": tag, "tag_name": name, "standard_type": TYPES[tag], "account_id": 4100,
        "user_action_set_id": 14100, "effective_from": now_ms - 86_400_000, "version": 1, "action_type": None})
        for corp in corps for tag, name in TAGS.items()]
    pipeline.send(*[("tag_mappings", key, value) for key, value in rules])
    fake, provider, wecom, marketing, api, worker, ingest, enrich, sink = deploy(pipeline, tmp_path, rules, seed=7)
    staff = Staff(fake)
    supervisor = Supervisor(ingest=ingest, enrich=enrich, worker=worker, sink=sink)
    customers: dict[str, list[str]] = {corp: [] for corp in corps}
    secrets = list(SECRETS)

    async def traffic() -> None:
        loop = asyncio.get_running_loop()
        blocking = lambda f, *args: loop.run_in_executor(None, f, *args)
        async with CallbackSender(ingest.base_url, {SUITE_ID: CallbackCrypto(SUITE[1], SUITE[2])},
                                  suites=frozenset({SUITE_ID}), seed=3,
                                  retry_intervals_s=(0.5, 1, 2, 4, 8), retries=5) as sender:
            async def send(command: dict) -> None:
                assert await sender.send(SUITE_ID, command)

            async def customer_of(corp: str) -> None:
                customer = f"wm{corp[-3:]}{len(customers[corp]):03d}"
                customers[corp].append(customer)
                await send(provider.provider_event(staff.add_customer(corp, customer, USERID, unionid=f"un-{customer}")))
                await send(provider.provider_event(staff.tag(corp, customer, USERID, add=["etA", "etB"])))

            async def authorise(corp: str) -> dict:
                command = provider.authorise(corp, TAGS)
                secrets.append(command["AuthCode"])
                await send(command)
                return command

            ticket = provider.push_ticket()
            secrets.append(ticket["SuiteTicket"])
            await send(ticket)
            for corp in corps[:2]:
                await authorise(corp)
                await customer_of(corp)
            # the ingest dies after writing a create_auth, before answering: WeCom pushes again
            await blocking(supervisor.arm, "ingest", "callback-written:1")
            await authorise(corps[2])
            await blocking(supervisor.wait_for_kill, "ingest", 1)
            # the enrichment dies after saving the permanent code, before committing its batch
            await blocking(supervisor.arm, "enrich", "permanent-code-saved:1")
            await authorise(corps[3])
            await blocking(supervisor.wait_for_kill, "enrich", 1)
            # ... and between get_permanent_code's answer and the save: the window
            await blocking(supervisor.arm, "enrich", "permanent-code-fetched:1")
            await authorise(corps[4])
            await blocking(supervisor.wait_for_kill, "enrich", 2)
            await blocking(wait_until, lambda: {c for c, s in auth_status(pipeline).items() if s == "active"}
                           == set(corps[:4]), 60, "corps 0-3 authorised, corp 4 not", enrich)
            assert corps[4] not in await blocking(auth_status, pipeline)   # its code was spent: the admin scans again
            await authorise(corps[4])
            await authorise(corps[5])
            for corp in corps[2:]:
                await customer_of(corp)
            for corp in corps:
                await customer_of(corp)
            await blocking(wait_until, lambda: oid(cancelling, customers[cancelling][-1], "VALID") in marketing.accepted,
                           90, "the cancelling corp's last report", sink)
            # the erasure: the ingest dies after writing the cancel_auth, the worker and the sink
            # in the middle of erasing
            await blocking(supervisor.arm, "worker", "erasure-staged:1")
            await blocking(supervisor.arm, "sink", "delivered-erased:1")
            await blocking(worker.wait_for_rules, len(rules))
            await blocking(supervisor.arm, "ingest", "callback-written:1")
            await send(provider.cancel(cancelling))
            for name, kills in (("ingest", 2), ("worker", 1), ("sink", 1)):
                await blocking(supervisor.wait_for_kill, name, kills)
            for corp in corps:
                if corp != cancelling:
                    await customer_of(corp)

    try:
        asyncio.run(traffic())
        secrets += list(provider.permanent_codes.values())
        assert {c for c, s in auth_status(pipeline).items() if s == "active"} == set(corps) - {cancelling}

        def audits() -> list[dict]:
            return [a for a in (orjson.loads(r.value) for r in pipeline.read("wecom_erasures", timeout=0.5))
                    if a.get("kind") == "erased"]
        wait_until(lambda: {a["partition"] for a in audits() if a["component"] == "worker"} == set(range(PARTITIONS))
                   and [a for a in audits() if a["component"] == "sink" and a["keys_erased"]],
                   120, "the worker's and the sink's erasure after their restarts")

        staying = [c for c in corps if c != cancelling]
        events = [orjson.loads(r.value) for topic in ("contact_events", "tag_events")
                  for r in pipeline.read(topic, timeout=0.5)]
        kept = sorted((e for e in events if e["corp_id"] in staying), key=lambda e: (e["ts"], "op" in e))
        expected, _ = reference_reports(rules, kept, partition_of=lambda key: kafka_partition(key, PARTITIONS),
                                        flush_at_end=False)
        expected_ids = {r["outer_action_id"] for r in expected}
        assert len(expected_ids) == sum(len(customers[c]) for c in staying)      # a VALID per customer
        wait_until(lambda: set(marketing.accepted) >= expected_ids, 90, "the staying corps' reports", sink)
        time.sleep(3)
        gone_ids = {oid(cancelling, u, t) for u in customers[cancelling] for t in ("VALID", "INVALID")}
        assert set(marketing.accepted) - gone_ids == expected_ids
        assert sum(marketing.duplicates.values()) == 0

        gone = cancelling.encode()
        changelogs = [f"{pipeline.settings.app_id}-{table}-changelog" for table in ("reporting_state", "rule_versions")]
        for topic in ("wecom_snapshots", "wecom_tags", "tag_mappings", "wecom_auth", "delivered_reports", *changelogs):
            latest = compacted(pipeline, topic, topic if topic in changelogs else None)
            assert not [k for k, r in latest.items() if gone in k.encode() or gone in r.value], topic
        assert not [r for r in compacted(pipeline, "delivered_reports").values()
                    if (CORP_HEADER, hashlib.sha256(gone).hexdigest().encode()) in r.headers]
        unsaved = scrape(int(enrich.env["TAGSTREAM_ENRICH_METRICS_PORT"])) or {}
        count = total(unsaved, "tagstream_wecom_permanent_code_unsaved_seconds_count")
        seconds = total(unsaved, "tagstream_wecom_permanent_code_unsaved_seconds_sum")
        print(f"permanent code unsaved: {count:.0f} codes since the last restart, mean {1000 * seconds / max(count, 1):.1f} ms")
        assert count >= 2
        assert_no_secret_exposed(pipeline, [ingest.port, int(enrich.env["TAGSTREAM_ENRICH_METRICS_PORT"]),
                                            pipeline.settings.metrics_port, sink.port], secrets + [API_TOKEN])
    finally:
        supervisor.stop()
        undeploy(pipeline, wecom, api, ingest, enrich, sink)
    items = list(rocksdb_items(Path(pipeline.settings.data_dir)))
    assert items and not [(store, key) for store, key, value in items if gone in key or gone in value]
    for name in ("ingest.log", "enrich.log", "sink.log", "worker-0.log"):
        log = (tmp_path / name).read_text()
        assert not [s for s in secrets if s in log], f"a secret in {name}"
