"""Provider mode on the real broker (issue 21): one suite, corps that authorise it while the
staff of the corps already in keep working, and one corp that cancels.

The fake WeCom pushes a suite ticket, then authorises corps one after another (QR scan:
`create_auth` with a single-use code); after each, the staff of every authorised corp add
and tag customers, their callbacks in the provider format on the suite's command URL,
retried as WeCom retries. Mid-run one corp cancels. What must hold:

- every authorised corp's customers arrive as contact events, and their tag events add up
  to the tags the staff left (the diffs are WeCom's state at enrichment time, so the sum,
  not each step, is what a test can fix);
- the cancelled corp's callbacks after its cancel_auth was applied are refused and counted,
  and none of them becomes an event;
- the cancelled corp is erased from the enrichment's state: its snapshots, catalogue, click
  ids, rules and authorisation are tombstoned (no key or value of the compacted topics'
  latest state carries its id), and each erasure is audited on `wecom-erasures` with counts
  and no customer id;
- `wecom-auth` holds each corp's permanent code sealed, the cancelled corp's not at all, and
  no secret (suite secret, token, key, ticket, auth code, permanent code) reaches a log, a
  metric or a dead letter.
"""
from __future__ import annotations

import asyncio
import random
import time

import orjson
from cryptography.fernet import Fernet

from streams.observability.observe import scrape, total
from streams.wecom.crypto import CallbackCrypto
from tests.fake_wecom.api import FakeWeComApi, Staff
from tests.fake_wecom.callbacks import CallbackSender
from tests.fake_wecom.provider import FakeProvider
from tests.integration.conftest import IngestProcess, Pipeline, assert_no_secret_exposed, wait_until
from tests.marketing_api_server import ServerThread

SUITE_ID = "wwsuitee2e000001"
SUITE = (SUITE_ID, "suite-callback-token", "Zm9vYmFyYmF6cXV4MDEyMzQ1Njc4OWFiY2RlZmdoaWo", "suite-secret-e2e",
         "wxsuiteapp", Fernet.generate_key().decode())
#: the suite's secrets, for the session's scan of every log the tests wrote (tests/conftest.py)
SECRETS = [SUITE[1], SUITE[2], SUITE[3], SUITE[5]]
CORPS = [f"wwprov{n:010d}" for n in range(8)]
CANCELLING = CORPS[2]
CANCEL_AFTER = 5                         # the cancel comes once this many corps have authorised
TAGS = {"etA": "核心", "etB": "已下单", "etC": "区域"}
USERID = "staff1"


def compacted(pipeline: Pipeline, topic: str) -> dict[str, bytes]:
    """A topic's latest value per key, tombstoned keys left out (what compaction keeps)."""
    latest: dict[str, bytes] = {}
    for record in pipeline.read(topic, timeout=1):
        key = record.key.decode()
        if record.value is None:
            latest.pop(key, None)
        else:
            latest[key] = record.value
    return latest


def enrich_metric(enrich: IngestProcess, name: str, **labels) -> float:
    return total(scrape(int(enrich.env["TAGSTREAM_ENRICH_METRICS_PORT"])) or {}, name, **labels)


async def traffic(pipeline: Pipeline, ingest: IngestProcess, enrich: IngestProcess, provider: FakeProvider,
                  staff: Staff, seed: int) -> tuple[set, list]:
    """The run; returns the customers of the cancelled corp tagged after its cancel, and
    every auth code WeCom issued (secrets a log must not hold)."""
    rng = random.Random(seed)
    crypto = CallbackCrypto(SUITE[1], SUITE[2])
    codes, after_cancel = [], set()
    async with CallbackSender(ingest.base_url, {SUITE_ID: crypto}, suites=frozenset({SUITE_ID}), seed=seed,
                              retry_intervals_s=(0.2, 0.4, 0.8)) as sender:
        ticket = provider.push_ticket()
        assert await sender.send(SUITE_ID, ticket)
        codes.append(ticket["SuiteTicket"])
        authorised: list[str] = []
        for n, corp in enumerate(CORPS):
            command = provider.authorise(corp, TAGS)
            codes.append(command["AuthCode"])
            assert await sender.send(SUITE_ID, command)
            authorised.append(corp)
            assert await sender.send(SUITE_ID, provider.provider_event(staff.rename_tag(corp, "etC", "区域-新")))
            for round_ in range(3):                # the staff of every corp in, interleaved
                for c in authorised:
                    customer = f"wm{c[-3:]}{n:02d}"
                    if round_ == 0:
                        fields = staff.add_customer(c, customer, USERID, state=f"ad_{n}")
                    else:
                        add = rng.sample(sorted(TAGS), k=rng.randint(0, 2))
                        remove = rng.sample(sorted(TAGS), k=rng.randint(0, 1))
                        fields = staff.tag(c, customer, USERID, add=add, remove=[t for t in remove if t not in add])
                    if c == CANCELLING and n >= CANCEL_AFTER:
                        after_cancel.add(customer)     # sent after its cancel_auth was applied
                    assert await sender.send(SUITE_ID, provider.provider_event(fields))
                await asyncio.sleep(0.05)
            if n + 1 == CANCEL_AFTER:
                # what the corp has by now is in the enrichment's state (a corp's first callbacks
                # may wait a moment for its create_auth, applied on another partition)
                await asyncio.get_running_loop().run_in_executor(None, lambda: wait_until(
                    lambda: len([k for k in compacted(pipeline, "wecom_tags") if k.startswith(CANCELLING)]) == len(TAGS)
                    and len([k for k in compacted(pipeline, "wecom_snapshots") if k.startswith(CANCELLING)])
                    == CANCEL_AFTER - 2, 60, "the cancelling corp's catalogue and snapshots", enrich))
                assert await sender.send(SUITE_ID, provider.cancel(CANCELLING))
                await asyncio.get_running_loop().run_in_executor(None, lambda: wait_until(
                    lambda: enrich_metric(enrich, "tagstream_wecom_auth_commands_total", info_type="cancel_auth",
                                          outcome="applied") == 1, 60, "the cancel_auth to be applied", enrich))
    return after_cancel, codes


def test_corps_authorise_while_traffic_flows_and_a_cancelled_corp_is_refused(kafka_broker, tmp_path):
    pipeline = Pipeline(tmp_path, partitions=4)
    pipeline.create_topics()
    now_ms = int(time.time() * 1000)
    pipeline.send(*[("tag_mappings", f"{corp}:{tag}", {
        "corp_id": corp, "tag_id": tag, "tag_name": name, "standard_type": "VALID" if tag == "etA" else None,
        "account_id": 4000, "user_action_set_id": 14000, "effective_from": now_ms - 86_400_000, "version": 1,
        "action_type": None}) for corp in CORPS for tag, name in TAGS.items()])
    pipeline.send(*[("ad_clicks", f"{corp}:ad_{n}", {"click_id": f"clk-{n}", "click_time": now_ms})
                    for corp in CORPS for n in range(len(CORPS))])
    fake = FakeWeComApi(seed=5)
    provider = FakeProvider(fake, SUITE_ID, SUITE[3])
    staff = Staff(fake)
    wecom = ServerThread(fake).start()
    overrides = {"wecom_api_base": f"{wecom.base_url}/cgi-bin/"}
    ingest = IngestProcess(pipeline, {}, tmp_path / "ingest.log", suite=SUITE, **overrides).start()
    enrich = IngestProcess(pipeline, {}, tmp_path / "enrich.log", command="enrich", suite=SUITE, **overrides).start()
    try:
        after_cancel, codes = asyncio.run(traffic(pipeline, ingest, enrich, provider, staff, seed=11))
        staying = [c for c in CORPS if c != CANCELLING]
        customers = {(c, customer) for c in staying for customer in fake.corps[c].customers}

        def contacts() -> set:
            return {(e["corp_id"], e["external_userid"]) for e in
                    (orjson.loads(r.value) for r in pipeline.read("contact_events", timeout=0.5))}
        wait_until(lambda: contacts() >= customers, 120, "every staying corp's customers as contact events", enrich)
        wait_until(lambda: enrich_metric(enrich, "tagstream_wecom_callbacks_enriched_total", outcome="refused")
                   >= 2 * len(after_cancel), 60, "the cancelled corp's later callbacks to be refused", enrich)
        time.sleep(3)                               # anything more would show up now

        tag_events = [orjson.loads(r.value) for r in pipeline.read("tag_events", timeout=1)]
        net: dict[tuple, set] = {}
        for event in tag_events:                    # per key in topic order: the diffs add up
            tags = net.setdefault((event["corp_id"], event["external_userid"]), set())
            (tags.add if event["op"] == "add" else tags.discard)(event["tag_id"])
        for corp, customer in sorted(customers):
            want = set(fake.corps[corp].customers[customer].follows[USERID].tags)
            assert net.get((corp, customer), set()) == want, (corp, customer)
        cancelled_events = [e for e in tag_events if e["corp_id"] == CANCELLING and e["external_userid"] in after_cancel]
        assert cancelled_events == [] and not {(CANCELLING, c) for c in after_cancel} & contacts()

        # erased: the latest state of every compacted topic the enrichment keeps carries nothing of it
        for topic in ("wecom_snapshots", "wecom_tags", "ad_clicks", "tag_mappings", "wecom_auth"):
            latest = compacted(pipeline, topic)
            assert latest and not [k for k, v in latest.items() if CANCELLING in k or CANCELLING.encode() in v], topic
            assert [k for k in latest if k.startswith(CORPS[0])] or topic == "wecom_auth", f"{topic}: others erased too"
        audit = [orjson.loads(r.value) for r in pipeline.read("wecom_erasures", timeout=1)]
        erased = {(a["topic"].rsplit(".", 1)[-1], a["partition"]): a["keys_erased"] for a in audit}
        assert {a["corp_id"] for a in audit} == {CANCELLING}
        assert erased[("wecom-tags", None)] == len(TAGS) and erased[("tag-mappings", None)] == len(TAGS)
        assert erased[("ad-clicks", None)] == len(CORPS)
        assert sum(n for (topic, _), n in erased.items() if topic == "wecom-snapshots") == CANCEL_AFTER - 2
        assert not [a for a in audit if "wm" in orjson.dumps(a).decode()], "a customer id in the audit"

        # wecom-auth: sealed codes for the staying corps
        auth = {k: orjson.loads(v) for k, v in compacted(pipeline, "wecom_auth").items()}
        for corp in staying:
            assert auth[f"corp:{corp}"]["status"] == "active" and auth[f"corp:{corp}"]["permanent_code"]
        permanent = list(provider.permanent_codes.values())
        raw = b"".join((r.value or b"") for r in pipeline.read("wecom_auth", timeout=1))
        raw += b"".join((r.value or b"") for r in pipeline.read("wecom_callbacks", timeout=1))
        assert not [s for s in permanent + codes if s.encode() in raw], "a secret in clear on a topic"
        secrets = [*SECRETS, *codes, *permanent]
        assert_no_secret_exposed(pipeline, [ingest.port, int(enrich.env["TAGSTREAM_ENRICH_METRICS_PORT"])], secrets)
        assert enrich_metric(enrich, "tagstream_wecom_auth_commands_total", info_type="create_auth",
                             outcome="applied") == len(CORPS)
    finally:
        for process in (ingest, enrich):
            process.stop()
        pipeline.stop()
        wecom.stop()
    for name in ("ingest.log", "enrich.log"):
        log = (tmp_path / name).read_text()
        assert not [s for s in secrets if s in log], f"a secret in {name}"
