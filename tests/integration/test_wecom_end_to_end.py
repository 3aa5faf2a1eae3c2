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
import random
import threading
import time

import orjson

from tests.logs import kafka_partition
from tests.fake_wecom.api import FakeWeComApi, Staff
from tests.fake_wecom.callbacks import CallbackSender
from tests.integration.conftest import IngestProcess, Pipeline, SinkProcess, wait_until
from tests.marketing_api_server import MarketingApiServer, ServerThread
from tests.reference_model import reference_reports
from streams.wecom.crypto import CallbackCrypto

TOKEN = "e2e-marketing-token"
CORPS = {
    "wwe2ecorpa0000001": ("tokA", "6qkdMrq68nTKduznJYO1A37W2oEgpkMUvkttRToqhUt", "secretA", "wxappA"),
    "wwe2ecorpb0000002": ("tokB", "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG", "secretB", "wxappB"),
}
TAGS = {"etCONSULT": "CONSULT", "etVALID": "VALID", "etORDER": "ORDER", "etINVALID": "INVALID", "etREGION": None}
HOLD_MS = 4_000
PARTITIONS = 4


def rules(now_ms: int) -> list[tuple[str, dict]]:
    return [(f"{corp}:{tag}", {"corp_id": corp, "tag_id": tag, "tag_name": tag, "standard_type": standard_type,
                               "account_id": 3000 + i, "user_action_set_id": 13000 + i,
                               "effective_from": now_ms - 86_400_000, "version": 1, "action_type": None})
            for i, corp in enumerate(sorted(CORPS)) for tag, standard_type in TAGS.items() if standard_type]


def customer_script(rng: random.Random, corp: str, n: int) -> list[tuple]:
    """One customer's changes: ("add", state, unionid) then tag changes, maybe a delete."""
    steps: list[tuple] = [("add", f"ad_{n}", None if n % 5 == 4 else f"oU-{corp[-2:]}-{n}")]
    owned: set = set()
    for _ in range(rng.randint(2, 4)):
        add = rng.sample(sorted(set(TAGS) - owned), k=min(rng.randint(1, 2), len(set(TAGS) - owned)))
        remove = rng.sample(sorted(owned), k=min(rng.randint(0, 1), len(owned)))
        owned = (owned | set(add)) - set(remove)
        steps.append(("tag", add, remove))
    if n % 6 == 0:                       # INVALID, then untagged inside the hold window
        steps += [("tag", ["etINVALID"], []), ("tag", [], ["etINVALID"])]
    if n % 7 == 3:
        steps.append(("delete",))
    return steps


class World:
    """The fake WeCom, the staff, and what they did (as the events the model expects)."""

    def __init__(self, seed: int, customers_per_corp: int):
        self.fake = FakeWeComApi(seed=seed, page_size=2)
        self.staff = Staff(self.fake)
        for corp, (_, _, secret, _) in CORPS.items():
            self.fake.add_corp(corp, secret, {tag: tag for tag in TAGS})
        rng = random.Random(seed)
        self.scripts = {(corp, f"wm{corp[-1]}{n:03d}"): customer_script(rng, corp, n)
                        for corp in sorted(CORPS) for n in range(customers_per_corp)}
        self.expected_events: list[dict] = []
        self.lock = threading.Lock()

    def act(self, corp: str, customer: str, step: tuple) -> dict:
        """Do one step in the sidebar; returns its callback and records its expected events."""
        userid = "staff1"
        app_id = CORPS[corp][3]
        if step[0] == "add":
            _, state, unionid = step
            callback = self.staff.add_customer(corp, customer, userid, state=state, unionid=unionid)
            ts = self.fake.corps[corp].customers[customer].follows[userid].createtime * 1000
            events = [{"kind": "contact", "event_id": f"x-{corp}-{customer}-add", "corp_id": corp,
                       "external_userid": customer, "userid": userid, "change_type": "add_external_contact",
                       "ts": ts, "state": state, "wechat_app_id": app_id, "wechat_unionid": unionid,
                       "wechat_openid": None, "click_id": f"clk-{state}" if int(state[3:]) % 2 == 0 else None}]
        elif step[0] == "tag":
            _, add, remove = step
            before = set(self.fake.corps[corp].customers[customer].follows[userid].tags)
            callback = self.staff.tag(corp, customer, userid, add=add, remove=remove)
            after = set(self.fake.corps[corp].customers[customer].follows[userid].tags)
            ts = callback["CreateTime"] * 1000
            events = [{"kind": "tag", "event_id": f"x-{corp}-{customer}-{op}-{t}-{ts}-{len(self.expected_events)}",
                       "corp_id": corp, "external_userid": customer, "userid": userid, "tag_id": t, "op": op,
                       "ts": ts, "source": "wecom_callback"}
                      for op, tags in (("add", sorted(after - before)), ("remove", sorted(before - after)))
                      for t in tags]
        else:
            callback = self.staff.delete_follow(corp, customer, userid)
            events = [{"kind": "contact", "event_id": f"x-{corp}-{customer}-del", "corp_id": corp,
                       "external_userid": customer, "userid": userid, "change_type": "del_external_contact",
                       "ts": callback["CreateTime"] * 1000, "state": None}]
        with self.lock:
            self.expected_events += events
        return callback


def enriched_count(pipeline: Pipeline) -> int:
    """Distinct events on the two event topics (a callback delivered twice repeats an id)."""
    records = pipeline.read("tag_events", timeout=0.5) + pipeline.read("contact_events", timeout=0.5)
    return len({orjson.loads(r.value)["event_id"] for r in records})


def test_staff_tags_in_two_corps_reach_the_marketing_api_exactly_once(kafka_broker, tmp_path):
    world = World(seed=5, customers_per_corp=10)
    now_ms = int(time.time() * 1000)
    pipeline = Pipeline(tmp_path, partitions=PARTITIONS, delay_hold=HOLD_MS, idle_grace=1000,
                        sink_rate_limit=60_000)
    pipeline.create_topics()
    the_rules = rules(now_ms)
    pipeline.send(*[("tag_mappings", key, value) for key, value in the_rules])
    # the ad platform wrote click ids for even states before the ads were clicked
    pipeline.send(*[("ad_clicks", f"{corp}:ad_{n}", {"click_id": f"clk-ad_{n}", "click_time": now_ms})
                    for corp in CORPS for n in range(0, 20, 2)])
    wecom = ServerThread(world.fake).start()
    marketing = MarketingApiServer(TOKEN)
    api = ServerThread(marketing).start()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    wecom_settings = {"wecom_api_base": f"{wecom.base_url}/cgi-bin/"}
    processes = []
    try:
        worker = pipeline.start_worker()
        worker.wait_for_rules(len(the_rules))
        ingest = IngestProcess(pipeline, CORPS, tmp_path / "ingest.log", **wecom_settings).start()
        enrich = IngestProcess(pipeline, CORPS, tmp_path / "enrich.log", command="enrich", **wecom_settings).start()
        sink = SinkProcess(pipeline, api.base_url, token_file, tmp_path / "sink.log").start()
        processes = [ingest, enrich, sink]
        world.fake.busy_rate = 0.05
        cryptos = {corp: CallbackCrypto(token, key) for corp, (token, key, _, _) in CORPS.items()}
        stats = asyncio.run(_staff_at_work(world, pipeline, ingest, cryptos))
        assert stats.dropped == 0 and stats.retries_identical + stats.retries_resigned >= 0

        expected, unreportable = _model(world, the_rules)
        expected_ids = {r["outer_action_id"] for r in expected}
        wait_until(lambda: set(marketing.accepted) >= expected_ids, 90, "the model's reports at the API",
                   worker, enrich, sink)
        time.sleep(3)                                     # anything more would show up now
        accepted = marketing.accepted
        assert set(accepted) == expected_ids, (sorted(set(accepted) - expected_ids)[:5],
                                               sorted(expected_ids - set(accepted))[:5])
        assert sum(marketing.duplicates.values()) == 0
        for report in expected:
            action = accepted[report["outer_action_id"]].action
            assert (action["action_time"], action["action_type"], action.get("user_id"), action.get("trace")) == \
                (report["action_time"], report["action_type"], report["user_id"], report["trace"]), report
        got_unreportable = {orjson.loads(r.value)["outer_action_id"] for r in pipeline.read(
            "unreportable", until=lambda rs: len(rs) >= len(unreportable), timeout=30, settle=1)}
        assert got_unreportable == {r["outer_action_id"] for r in unreportable}
        # the faults happened
        assert world.fake.calls_of("externalcontact/get", 40014) >= 1
        assert world.fake.calls_of("externalcontact/get", 45009) >= 1
        assert world.fake.calls_of("externalcontact/get", -1) >= 1
        enrich_log = (tmp_path / "enrich.log").read_text()
        for token, key, secret, _ in CORPS.values():
            assert secret not in enrich_log and token not in enrich_log
    finally:
        for process in processes:
            process.stop()
        pipeline.stop()
        wecom.stop()
        api.stop()


async def _staff_at_work(world: World, pipeline: Pipeline, ingest: IngestProcess, cryptos: dict):
    """Every customer's script, customers interleaved; a customer's next change waits until
    its last callback's events are out (read from the event topics)."""
    async with CallbackSender(ingest.base_url, cryptos, timeout_s=5.0, retry_intervals_s=(0.2, 0.4, 0.8),
                              seed=3) as sender:
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
                if step_number % 9 == 0:
                    await sender.send_twice(corp, callback)
                else:
                    assert await sender.send(corp, callback)
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
    events = sorted(world.expected_events, key=lambda e: (e["ts"], e["kind"] != "contact"))
    for event in events:
        event.pop("kind")
    return reference_reports(the_rules, events, partition_of=lambda key: kafka_partition(key, PARTITIONS),
                             delay_hold_ms=HOLD_MS)
