"""WeCom to the Marketing API, end to end on the real broker (issue 20): staff of two corps
tag customers in the (fake) sidebar; WeCom's callbacks reach `tagstream ingest`; `tagstream
enrich` fetches the customers and diffs their tags; the worker applies the events; the sink
delivers to the local Marketing API.

Meanwhile: callbacks are retried (identical and re-signed) and some delivered twice, WeCom
invalidates the tokens mid-run, one corp is frequency-limited (45009) for a while, and 5% of
API calls answer -1 (busy). Every mapped tag must become exactly one accepted action, equal
to what the reference model computes from the staff's changes; an untagging inside the hold
window cancels the delayed report.

The staff work interleaved across customers, as a sidebar would, but each customer's next
change waits until the last one has been enriched: the enrichment reads the customer's
state when it handles a callback (that is WeCom's contract), so two changes faster than
that are one diff, and the expected events here are one diff per change.
"""
from __future__ import annotations

import asyncio
import hashlib
import random
import subprocess
import sys
import threading
import time

import aiohttp
import orjson

from streams.observability.observe import scrape, total
from tests.logs import kafka_partition
from tests.fake_wecom.api import FakeWeComApi, Staff
from tests.fake_wecom.callbacks import CallbackSender
from tests.integration.conftest import REPO, IngestProcess, Pipeline, SinkProcess, assert_no_secret_exposed, wait_until
from tests.marketing_api_server import MarketingApiServer, ServerThread
from tests.reference_model import reference_reports
from streams.wecom.crypto import CallbackCrypto

TOKEN = "e2e-marketing-token"
CORPS = {
    "wwe2ecorpa0000001": ("wecom-token-A", "6qkdMrq68nTKduznJYO1A37W2oEgpkMUvkttRToqhUt", "contact-secret-A", "wxappA"),
    "wwe2ecorpb0000002": ("wecom-token-B", "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG", "contact-secret-B", "wxappB"),
}
#: every corp secret above, for the session's scan of every log the tests wrote (tests/conftest.py)
SECRETS = [v for token, key, secret, _ in CORPS.values() for v in (token, key, secret)]
TAGS = {"etCONSULT": "CONSULT", "etVALID": "VALID", "etORDER": "ORDER", "etINVALID": "INVALID", "etREGION": None}
HOLD_MS = 20_000        # well beyond a callback delayed by retries and restarts (the worker flushes holds by wall clock 1 s after it)
PARTITIONS = 4


def rules(now_ms: int) -> list[tuple[str, dict]]:
    return [(f"{corp}:{tag}", {"corp_id": corp, "tag_id": tag, "tag_name": tag, "standard_type": standard_type,
                               "account_id": 3000 + i, "user_action_set_id": 13000 + i,
                               "effective_from": now_ms - 86_400_000, "version": 1, "action_type": None})
            for i, corp in enumerate(sorted(CORPS)) for tag, standard_type in TAGS.items() if standard_type]


def customer_script(rng: random.Random, corp: str, n: int) -> list[tuple]:
    """One customer's changes: ("add", state, unionid, half) then tag changes, maybe a failed
    transfer and maybe a delete; between them every ChangeType of change_external_contact."""
    steps: list[tuple] = [("add", f"ad_{n}", None if n % 5 == 4 else f"oU-{corp[-2:]}-{n}", n % 4 == 2)]
    owned: set = set()
    for _ in range(rng.randint(2, 4)):
        add = rng.sample(sorted(set(TAGS) - owned), k=min(rng.randint(1, 2), len(set(TAGS) - owned)))
        remove = rng.sample(sorted(owned), k=min(rng.randint(0, 1), len(owned)))
        owned = (owned | set(add)) - set(remove)
        steps.append(("tag", add, remove))
    if n % 6 == 0:                       # INVALID, then untagged inside the hold window
        steps += [("tag", ["etINVALID"], []), ("tag", [], ["etINVALID"])]
    if n % 4 == 1:                       # a transfer to this staff member that failed: no event
        steps.insert(2, ("transfer_fail",))
    if n % 4 == 3:                       # deleted by the staff member, the customer, or a transfer
        steps.append(("delete", ("staff", "customer", "transfer")[(n // 4 + corp.endswith("2")) % 3]))
    return steps


class World:
    """The fake WeCom, the staff, and what the enrichment should make of what they did.

    `observe` follows each relationship as the enrichment sees it (only delivered callbacks),
    one diff per delivered change, an add healed by the first later callback if its own was
    lost; `reconciled` adds what a reconcile finds. The result is the event log the reference
    model gets; its ids are the test's own (the model only needs them unique)."""

    USERID = "staff1"

    def __init__(self, seed: int, customers_per_corp: int):
        self.fake = FakeWeComApi(seed=seed, page_size=2)
        self.staff = Staff(self.fake)
        for corp, (_, _, secret, _) in CORPS.items():
            self.fake.add_corp(corp, secret, {**{tag: tag for tag in TAGS}, "etSPARE": "备用"})
        rng = random.Random(seed)
        self.scripts = {(corp, f"wm{corp[-1]}{n:03d}"): customer_script(rng, corp, n)
                        for corp in sorted(CORPS) for n in range(customers_per_corp)}
        self.expected_events: list[dict] = []
        self.seen: dict[tuple, set] = {}          # relationship -> tags as the enrichment last saw them
        self.added: dict[tuple, tuple] = {}       # relationship -> (createtime ms, state, unionid)
        self.deleted_at: dict[tuple, int] = {}
        self.lock = threading.Lock()

    def tags_now(self, corp: str, customer: str) -> set:
        return set(self.fake.corps[corp].customers[customer].follows[self.USERID].tags)

    def act(self, corp: str, customer: str, step: tuple) -> dict:
        """Do one step in the sidebar; returns the callback WeCom would send."""
        if step[0] == "add":
            _, state, unionid, half = step
            callback = self.staff.add_customer(corp, customer, self.USERID, state=state, unionid=unionid, half=half)
            createtime = self.fake.corps[corp].customers[customer].follows[self.USERID].createtime * 1000
            self.added[(corp, customer)] = (createtime, state, unionid)
            return callback
        if step[0] == "tag":
            return self.staff.tag(corp, customer, self.USERID, add=step[1], remove=step[2])
        if step[0] == "transfer_fail":
            return self.staff.transfer_fail(corp, customer, self.USERID)
        callback = self.staff.delete_follow(corp, customer, self.USERID, by_customer=step[1] == "customer",
                                            transferred=step[1] == "transfer")
        self.deleted_at[(corp, customer)] = callback["CreateTime"] * 1000
        return callback

    def _add_event(self, corp: str, customer: str) -> dict:
        createtime, state, unionid = self.added[(corp, customer)]
        return {"event_id": f"x-{corp}-{customer}-add", "corp_id": corp, "external_userid": customer,
                "userid": self.USERID, "change_type": "add_external_contact", "ts": createtime, "state": state,
                "wechat_app_id": CORPS[corp][3], "wechat_unionid": unionid, "wechat_openid": None,
                "click_id": f"clk-{state}" if int(state[3:]) % 2 == 0 else None}

    def _diff(self, corp: str, customer: str, before: set, after: set, ts: int) -> list[dict]:
        return [{"event_id": f"x-{corp}-{customer}-{op}-{t}-{ts}-{len(self.expected_events)}-{i}", "corp_id": corp,
                 "external_userid": customer, "userid": self.USERID, "tag_id": t, "op": op, "ts": ts}
                for i, (op, t) in enumerate([("add", t) for t in sorted(after - before)] +
                                            [("remove", t) for t in sorted(before - after)])]

    refused_corps: set = set()          # corps WeCom refuses while the staff work

    def observe(self, corp: str, customer: str, step: tuple, callback: dict, delivered: bool) -> None:
        """What the enrichment makes of this change (nothing if its callback was lost)."""
        if not delivered or corp in self.refused_corps or step[0] == "transfer_fail":
            return
        key, events = (corp, customer), []
        if step[0] == "delete":
            events.append({"event_id": f"x-{corp}-{customer}-del", "corp_id": corp, "external_userid": customer,
                           "userid": self.USERID, "change_type": "del_external_contact",
                           "ts": callback["CreateTime"] * 1000, "state": None})
            self.seen.pop(key, None)
        else:
            if key not in self.seen:                      # an add, or the first callback after a lost one
                events.append(self._add_event(corp, customer))
            now = self.tags_now(corp, customer)
            events += self._diff(corp, customer, self.seen.get(key, set()), now, callback["CreateTime"] * 1000)
            self.seen[key] = now
        with self.lock:
            self.expected_events += events

    def enriched_late(self, corp: str) -> None:
        """What the enrichment makes of a corp's callbacks handled only after the staff were
        done: the oldest (the add) finds the final tags, stamped with its CreateTime (the
        relationship's createtime); the rest find no difference; a delete is a delete."""
        for (c, customer), steps in self.scripts.items():
            if c != corp:
                continue
            self.expected_events.append(self._add_event(corp, customer))
            record = self.fake.corps[corp].customers[customer]
            if self.USERID in record.follows:
                createtime = self.added[(corp, customer)][0]
                self.expected_events += self._diff(corp, customer, set(), self.tags_now(corp, customer), createtime)
            else:
                self.expected_events.append({
                    "event_id": f"x-{corp}-{customer}-del", "corp_id": corp, "external_userid": customer,
                    "userid": self.USERID, "change_type": "del_external_contact", "ts": self.deleted_at[(corp, customer)],
                    "state": None})

    def reconciled(self, reconcile_ts: dict[tuple, int]) -> None:
        """What a reconcile finds for each relationship that still exists (`reconcile_ts`:
        when the enrichment handled the relationship's synthetic callback)."""
        for (corp, customer) in self.scripts:
            follows = self.fake.corps[corp].customers.get(customer)
            if follows is None or self.USERID not in follows.follows:
                continue
            key, now = (corp, customer), self.tags_now(corp, customer)
            if key not in self.seen:
                self.expected_events.append(self._add_event(corp, customer))
            if self.seen.get(key, set()) != now or key not in self.seen:
                self.expected_events += self._diff(corp, customer, self.seen.get(key, set()), now,
                                                   reconcile_ts.get(key, 0))
            self.seen[key] = now


def enriched_count(pipeline: Pipeline) -> int:
    """Distinct events on the two event topics (a callback delivered twice repeats an id)."""
    records = pipeline.read("tag_events", timeout=0.5) + pipeline.read("contact_events", timeout=0.5)
    return len({orjson.loads(r.value)["event_id"] for r in records})


class Deployment:
    """The whole path on one pipeline: worker, ingest (with its tag endpoint), enrichment,
    sink, the fake WeCom and the local Marketing API."""

    API_TOKEN = "ingest-api-token-for-tests"

    def __init__(self, tmp_path, world: World, failpoints: dict[str, str] | None = None, **settings):
        self.tmp_path, self.world = tmp_path, world
        self.failpoints = failpoints or {}     # "ingest" / "enrich" -> TAGSTREAM_FAILPOINT
        self.settings = settings               # more TAGSTREAM_* settings of the ingest and the enrichment
        self.restarts = 0
        self.stopping = threading.Event()
        self.now_ms = int(time.time() * 1000)
        self.pipeline = Pipeline(tmp_path, partitions=PARTITIONS, delay_hold=HOLD_MS, idle_grace=1000,
                                 sink_rate_limit=60_000)
        self.rules = rules(self.now_ms)
        self.processes: list = []

    def __enter__(self) -> "Deployment":
        pipeline = self.pipeline
        pipeline.create_topics()
        pipeline.send(*[("tag_mappings", key, value) for key, value in self.rules])
        # the ad platform wrote click ids for even states before the ads were clicked
        pipeline.send(*[("ad_clicks", f"{corp}:ad_{n}", {"click_id": f"clk-ad_{n}", "click_time": self.now_ms})
                        for corp in CORPS for n in range(0, 20, 2)])
        self.wecom = ServerThread(self.world.fake).start()
        self.marketing = MarketingApiServer(TOKEN)
        self.api = ServerThread(self.marketing).start()
        (self.tmp_path / "token").write_text(TOKEN)
        (self.tmp_path / "api-token").write_text(self.API_TOKEN)
        self.wecom_settings = {"wecom_api_base": f"{self.wecom.base_url}/cgi-bin/",
                               "ingest_api_token_file": str(self.tmp_path / "api-token"),
                               "reconcile_state_dir": str(self.tmp_path / "reconcile"), **self.settings}
        self.worker = pipeline.start_worker()
        self.worker.wait_for_rules(len(self.rules))
        self.ingest = IngestProcess(pipeline, CORPS, self.tmp_path / "ingest.log", **self.wecom_settings,
                                    **({"failpoint": self.failpoints["ingest"]} if "ingest" in self.failpoints else {})
                                    ).start()
        self.enrich = IngestProcess(pipeline, CORPS, self.tmp_path / "enrich.log", command="enrich",
                                    **self.wecom_settings,
                                    **({"failpoint": self.failpoints["enrich"]} if "enrich" in self.failpoints else {})
                                    ).start()
        if self.failpoints:
            threading.Thread(target=self._supervise, daemon=True).start()
        self.sink = SinkProcess(pipeline, self.api.base_url, self.tmp_path / "token", self.tmp_path / "sink.log").start()
        self.processes = [self.ingest, self.enrich, self.sink]
        return self

    def _supervise(self) -> None:
        """Restart the ingest or the enrichment when a failpoint killed it (without it)."""
        while not self.stopping.is_set():
            for process in (self.ingest, self.enrich):
                if process.process.poll() is not None and not self.stopping.is_set():
                    assert process.process.returncode == -9, f"{process.command} exited {process.process.returncode}"
                    process.env.pop("TAGSTREAM_FAILPOINT", None)
                    process.start() if process.command == "enrich" else process.start(timeout=30)
                    self.restarts += 1
            time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        if exc[0] is None:
            assert_no_secret_exposed(
                self.pipeline, [self.ingest.port, int(self.enrich.env["TAGSTREAM_ENRICH_METRICS_PORT"]),
                                self.pipeline.settings.metrics_port, self.sink.port], SECRETS + [self.API_TOKEN, TOKEN])
        time.sleep(0.3)
        for process in self.processes:
            process.stop()
        self.pipeline.stop()
        self.wecom.stop()
        self.api.stop()
        for name in ("ingest.log", "enrich.log"):
            log = (self.tmp_path / name).read_text()
            for token, key, secret, _ in CORPS.values():
                assert secret not in log and token not in log and key not in log, f"a secret in {name}"
            assert self.API_TOKEN not in log

    def staff_at_work(self, drop_rate: float = 0.0, retry_intervals_s: tuple = (0.2, 0.4, 0.8)):
        return asyncio.run(_staff_at_work(self.world, self.pipeline, self.ingest, self.cryptos(), drop_rate,
                                          retry_intervals_s))

    def send_callbacks(self, corp: str, *callbacks: dict) -> None:
        async def send() -> None:
            async with CallbackSender(self.ingest.base_url, self.cryptos()) as sender:
                for callback in callbacks:
                    assert await sender.send(corp, callback)
        asyncio.run(send())

    @staticmethod
    def cryptos() -> dict:
        return {corp: CallbackCrypto(token, key) for corp, (token, key, _, _) in CORPS.items()}

    def tagstream(self, *args: str) -> str:
        """A `tagstream` command against this deployment; its stdout."""
        result = subprocess.run([sys.executable, "-m", "streams.cli", *args], env=self.ingest.env, cwd=REPO,
                                capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def assert_reports_equal_the_model(self) -> None:
        expected, unreportable = _model(self.world, self.rules)
        expected_ids = {r["outer_action_id"] for r in expected}
        deadline = time.monotonic() + 90
        while not set(self.marketing.accepted) >= expected_ids and time.monotonic() < deadline:
            for process in (self.worker, self.enrich, self.sink):
                assert process.process.poll() is None, "a process exited"
            time.sleep(0.5)
        time.sleep(3)                                     # anything more would show up now
        accepted = self.marketing.accepted
        brief = lambda r: (r["external_userid"], r["standard_type"], r["mode"], r["reason"], r["event_ts"])
        by_id = {r["outer_action_id"]: r for r in expected}
        assert set(accepted) == expected_ids, (
            f"missing {sorted(brief(by_id[i]) for i in expected_ids - set(accepted))[:8]}, "
            f"extra {sorted((accepted[i].action.get('action_type'), accepted[i].action.get('action_time')) for i in set(accepted) - expected_ids)[:8]}")
        assert sum(self.marketing.duplicates.values()) == 0
        for report in expected:
            action = accepted[report["outer_action_id"]].action
            got = (action["action_time"], action["action_type"], action.get("user_id"), action.get("trace") or None)
            want = (report["action_time"], report["action_type"], report["user_id"], report["trace"] or None)
            assert got == want, (got, want)
        got_unreportable = {orjson.loads(r.value)["outer_action_id"] for r in self.pipeline.read(
            "unreportable", until=lambda rs: len(rs) >= len(unreportable), timeout=30, settle=1)}
        assert got_unreportable == {r["outer_action_id"] for r in unreportable}

    def wait_for_events_to_settle(self, quiet_s: float = 4.0, timeout_s: float = 60.0) -> None:
        """Until the enrichment has written nothing new for `quiet_s`."""
        deadline, last, quiet_since = time.monotonic() + timeout_s, -1, time.monotonic()
        while time.monotonic() < deadline:
            count = enriched_count(self.pipeline)
            if count != last:
                last, quiet_since = count, time.monotonic()
            elif time.monotonic() - quiet_since >= quiet_s:
                return
            time.sleep(0.5)
        raise AssertionError("the enrichment kept writing events")

    def events(self, topic: str) -> list[dict]:
        return [orjson.loads(r.value) for r in self.pipeline.read(topic, timeout=1)]


def test_staff_tags_in_two_corps_reach_the_marketing_api_exactly_once(kafka_broker, tmp_path):
    world = World(seed=5, customers_per_corp=10)
    with Deployment(tmp_path, world) as deployment:
        world.fake.busy_rate = 0.05
        stats = deployment.staff_at_work()
        assert stats.dropped == 0 and stats.retries_identical + stats.retries_resigned + stats.attempts > stats.sent
        deployment.assert_reports_equal_the_model()
        # the faults happened
        assert world.fake.calls_of("externalcontact/get", 40014) >= 1
        assert world.fake.calls_of("externalcontact/get", 45009) >= 1
        assert world.fake.calls_of("externalcontact/get", -1) >= 1
        # every ChangeType was sent, and the catalogue follows change_external_tag
        sent = {step[0] if step[0] != "delete" else step[1] for steps in world.scripts.values() for step in steps}
        assert sent >= {"add", "tag", "transfer_fail", "staff", "customer", "transfer"}
        corp = sorted(CORPS)[0]
        deployment.send_callbacks(corp, world.staff.rename_tag(corp, "etREGION", "地区-华南"),
                                  world.staff.delete_tag(corp, "etSPARE"))

        def catalogue() -> dict:
            latest = {}
            for record in deployment.pipeline.read("wecom_tags", timeout=0.5):
                latest[record.key.decode()] = orjson.loads(record.value) if record.value else None
            return latest
        wait_until(lambda: catalogue().get(f"{corp}:etREGION", {}).get("tag_name") == "地区-华南"
                   and catalogue().get(f"{corp}:etSPARE", 0) is None, 30, "the renamed and the deleted tag",
                   deployment.enrich)
        assert catalogue()[f"{corp}:etVALID"]["tag_name"] == "etVALID"                # the rest are kept
        assert not [key for key in catalogue() if key.startswith(sorted(CORPS)[1])]    # no callback, no refresh


def test_killing_the_ingest_before_it_answers_and_the_enrichment_before_it_commits_loses_and_doubles_nothing(
        kafka_broker, tmp_path):
    """The ingest SIGKILLs itself after writing a callback and before answering (WeCom then
    retries it: a second record of the same callback), and the enrichment after sending a
    batch's events and before committing its transaction (aborted; the next owner redoes it
    with the same ids). Reports still equal the model, none twice, every event id once on
    the committed log."""
    world = World(seed=13, customers_per_corp=6)
    with Deployment(tmp_path, world, failpoints={"ingest": "callback-written:7", "enrich": "enrich-sent:5"}) as d:
        stats = d.staff_at_work(retry_intervals_s=(1.0, 2.0, 4.0))
        assert stats.dropped == 0
        d.assert_reports_equal_the_model()
        assert d.restarts >= 2, "both failpoints fire"
        for topic in ("tag_events", "contact_events"):
            ids = [e["event_id"] for e in d.events(topic)]
            assert len(ids) == len(set(ids)) or topic == "contact_events", f"an aborted event on {topic}"


def test_a_corp_wecom_keeps_refusing_waits_while_the_other_corp_flows(kafka_broker, tmp_path):
    """WeCom answers 45009 to every call for corp B while the staff of both corps work: A's
    reports come as if B did not exist, B's callbacks wait (deferred, not lost), and once
    WeCom lets B through, B's reports come too, each once."""
    world = World(seed=17, customers_per_corp=5)
    a, b = sorted(CORPS)
    with Deployment(tmp_path, world, wecom_retry_budget="1s") as deployment:
        world.refused_corps = {b}
        world.fake.frequency_limit(b, 10**6)
        deployment.staff_at_work()
        deployment.assert_reports_equal_the_model()          # A's, and nothing of B's
        deferred = total(scrape(int(deployment.enrich.env["TAGSTREAM_ENRICH_METRICS_PORT"])),
                         "tagstream_wecom_deferred_callbacks")
        assert deferred > 0
        world.fake.freq_limited_until[b] = 0                 # WeCom lets B through again
        world.refused_corps = set()
        world.enriched_late(b)
        deployment.assert_reports_equal_the_model()


def test_lost_callbacks_are_repaired_by_one_reconcile_and_a_second_finds_nothing(kafka_broker, tmp_path):
    world = World(seed=8, customers_per_corp=8)
    with Deployment(tmp_path, world) as deployment:
        stats = deployment.staff_at_work(drop_rate=0.08)
        assert stats.dropped >= 2, "the seed must lose some callbacks"
        first = deployment.tagstream("reconcile")
        assert "synthetic callbacks written" in first
        deployment.wait_for_events_to_settle()
        # when the enrichment handled each relationship's synthetic callback: the model's ts
        found_at = {}
        for event in deployment.events("tag_events"):
            if event.get("source") == "tagstream_reconcile":
                found_at[(event["corp_id"], event["external_userid"])] = event["ts"]
        world.reconciled(found_at)
        deployment.assert_reports_equal_the_model()
        events_before = len(deployment.events("tag_events")) + len(deployment.events("contact_events"))
        # then on a schedule: two more passes, a second apart, find nothing
        scheduled = subprocess.Popen([sys.executable, "-m", "streams.cli", "reconcile", "--reconcile-every", "1s"],
                                     env=deployment.ingest.env, cwd=REPO, stdout=subprocess.PIPE, text=True)
        try:
            passes = []
            deadline = time.monotonic() + 120
            while len(passes) < 2 and time.monotonic() < deadline:
                line = scheduled.stdout.readline()
                assert line, "the scheduled reconcile exited"
                if "synthetic callbacks written" in line:
                    passes.append(line)
            assert len(passes) == 2 and all("0 synthetic callbacks written" in p for p in passes), passes
        finally:
            scheduled.terminate()
            assert scheduled.wait(timeout=30) == 0, "SIGTERM ends the schedule cleanly"
        time.sleep(3)
        assert len(deployment.events("tag_events")) + len(deployment.events("contact_events")) == events_before


def test_tags_applied_through_tagstream_are_reported_without_a_callback(kafka_broker, tmp_path):
    world = World(seed=11, customers_per_corp=2)
    with Deployment(tmp_path, world) as deployment:
        corp = sorted(CORPS)[0]
        customers = sorted(c for (k, c) in world.scripts if k == corp)
        for customer in customers:                 # only the adds, through callbacks
            world.scripts[(corp, customer)] = world.scripts[(corp, customer)][:1]
        for key in [k for k in world.scripts if k[0] != corp]:
            del world.scripts[key]
        deployment.staff_at_work()
        sent_callbacks = deployment.ingest.metrics()
        deployment.tagstream("tag", "--corp", corp, "--userid", World.USERID, "--customer", customers[0],
                             "--add", "etVALID,etREGION")

        async def post_tags():
            async with aiohttp.ClientSession() as session:
                body = {"corp_id": corp, "userid": World.USERID, "external_userid": customers[1], "add": ["etORDER"]}
                async with session.post(deployment.ingest.base_url + "/tags", json=body,
                                        headers={"Authorization": "Bearer wrong"}) as refused:
                    assert refused.status == 401
                async with session.post(deployment.ingest.base_url + "/tags", json=body,
                                        headers={"Authorization": f"Bearer {Deployment.API_TOKEN}"}) as response:
                    return response.status
        assert asyncio.run(post_tags()) == 200
        assert len(world.fake.marked) == 2
        # no callback was sent for them: the ingest's callback count did not move
        assert total(deployment.ingest.metrics(), "tagstream_wecom_callbacks_total", outcome="accepted") == \
            total(sent_callbacks, "tagstream_wecom_callbacks_total", outcome="accepted")
        want = {hashlib.sha256(f"{corp}|{customers[0]}|VALID".encode()).hexdigest(),
                hashlib.sha256(f"{corp}|{customers[1]}|ORDER".encode()).hexdigest()}
        wait_until(lambda: set(deployment.marketing.accepted) >= want, 60, "the tagged customers' reports",
                   deployment.worker, deployment.enrich, deployment.sink)
        sources = {e["source"] for e in deployment.events("tag_events")}
        assert sources == {"tagstream_tag"}


async def _staff_at_work(world: World, pipeline: Pipeline, ingest: IngestProcess, cryptos: dict,
                         drop_rate: float = 0.0, retry_intervals_s: tuple = (0.2, 0.4, 0.8)):
    """Every customer's script, customers interleaved; a customer's next change waits until
    its last callback's events are out (read from the event topics)."""
    async with CallbackSender(ingest.base_url, cryptos, timeout_s=5.0, retry_intervals_s=retry_intervals_s,
                              seed=3, drop_rate=drop_rate) as sender:
        queues = {key: list(steps) for key, steps in world.scripts.items()}
        done_events = 0
        step_number = 0
        while any(queues.values()):
            batch = []
            for (corp, customer), steps in queues.items():
                if steps:
                    batch.append((corp, customer, steps.pop(0)))
            for corp, customer, step in batch:
                callback = world.act(corp, customer, step)
                step_number += 1
                if step_number == 25:
                    world.fake.invalidate_tokens()
                if step_number == 40:
                    world.fake.frequency_limit(sorted(CORPS)[1], 2.0)
                if step_number % 9 == 0 and not sender.drop_rate:
                    await sender.send_twice(corp, callback)
                    delivered = True
                else:
                    delivered = await sender.send(corp, callback)
                world.observe(corp, customer, step, callback, delivered)
            with world.lock:
                want = len(world.expected_events)
            deadline = time.monotonic() + 60
            while done_events < want:     # this round's events are out before the next round
                await asyncio.sleep(0.3)
                done_events = await asyncio.get_running_loop().run_in_executor(None, enriched_count, pipeline)
                assert time.monotonic() < deadline, f"enrichment stuck at {done_events} of {want} events"
            await asyncio.sleep(1.05)     # the next change falls in a later second (CreateTime)
        return sender.stats


def _model(world: World, the_rules: list) -> tuple[list, list]:
    events = sorted(world.expected_events, key=lambda e: (e["ts"], "op" in e))
    return reference_reports(the_rules, events, partition_of=lambda key: kafka_partition(key, PARTITIONS),
                             delay_hold_ms=HOLD_MS)
