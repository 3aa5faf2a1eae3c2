"""`tagstream ingest` on the real broker (SPEC §7): WeCom's callbacks of two corps, signed
and encrypted by the fake WeCom, become records on wecom-callbacks before they are answered;
every way a callback can be bad gets its 4xx, is counted, writes nothing, and the server goes
on serving."""
import asyncio
import time

import aiohttp
import orjson
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from streams.observability.observe import total
from streams.wecom.crypto import CallbackCrypto
from streams.wecom.messages import MAX_BODY_BYTES
from tests.fake_wecom.callbacks import CallbackSender, envelope_xml, sign_callback
from tests.integration.conftest import IngestProcess, Pipeline

CORPS = {
    "wwcorpa0000000001": ("ingest-token-A", "6qkdMrq68nTKduznJYO1A37W2oEgpkMUvkttRToqhUt", "ingest-secret-A", "wxappA"),
    "wwcorpb0000000002": ("ingest-token-B", "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG", "ingest-secret-B", "wxappB"),
}
#: a provider's suite beside them (docs/provider.md): id, token, key, secret, app id, vault key
SUITE = ("wwsuiteingest01", "ingest-suite-token", "S" * 43, "ingest-suite-secret", "wxsuite",
         "9d7Jx3Ya8Sgbm1eP8ZlKYtiJYpZ5o3u8NqWvRkPDQ7E=")
SECRETS = [v for token, key, secret, _ in CORPS.values() for v in (token, key, secret)] + [SUITE[1], SUITE[3], SUITE[5]]
CRYPTOS = {corp: CallbackCrypto(token, key) for corp, (token, key, _, _) in CORPS.items()}
A, B = sorted(CORPS)


def edit(corp: str, customer: str, userid: str = "zhangsan", at: int = 1_790_000_000) -> dict:
    return {"ToUserName": corp, "FromUserName": "sys", "CreateTime": at, "MsgType": "event",
            "Event": "change_external_contact", "ChangeType": "edit_external_contact",
            "UserID": userid, "ExternalUserID": customer}


@pytest.fixture(scope="module")
def ingest(kafka_broker, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ingest")
    pipeline = Pipeline(tmp)
    pipeline.create_topics()
    process = IngestProcess(pipeline, CORPS, tmp / "ingest.log", suite=SUITE).start()
    yield pipeline, process
    process.stop()
    log = (tmp / "ingest.log").read_text()
    for token, key, secret, _ in CORPS.values():          # refusals are logged without secrets
        assert token not in log and key not in log and secret not in log


def read_callbacks(pipeline: Pipeline, at_least: int, settle: float = 1.0) -> list[dict]:
    records = pipeline.read("wecom_callbacks", until=lambda rs: len(rs) >= at_least, timeout=20, settle=settle)
    return [{"key": r.key.decode(), **orjson.loads(r.value)} for r in records]


def test_callbacks_of_two_corps_are_written_before_they_are_answered(ingest):
    pipeline, process = ingest
    now = int(time.time())

    async def deliver():
        async with CallbackSender(process.base_url, CRYPTOS) as sender:
            answered = [await sender.send(corp, edit(corp, f"wm{corp[-1]}{i}", at=now)) for corp in (A, B)
                        for i in range(3)]
            # WeCom gave up waiting just as the answer came: the same callback twice, then re-signed
            await sender.send_twice(A, edit(A, "wmdup", at=now))
            return answered, sender.stats
    answered, stats = asyncio.run(deliver())
    assert all(answered) and stats.statuses == {200: 9}
    records = read_callbacks(pipeline, 9)
    assert len(records) == 9
    by_customer = {r["fields"]["ExternalUserID"]: r for r in records}
    assert by_customer[f"wm{A[-1]}0"]["key"] == f"{A}:wm{A[-1]}0" and by_customer[f"wm{B[-1]}2"]["corp_id"] == B
    duplicates = [r for r in records if r["fields"]["ExternalUserID"] == "wmdup"]
    # three deliveries, one content: the enrichment's ids come from this, so one event
    assert len(duplicates) == 3 and len({r["content_id"] for r in duplicates}) == 1
    assert total(process.metrics(), "tagstream_wecom_callbacks_total",
                 kind="change_external_contact:edit_external_contact", outcome="accepted") >= 9


def test_url_verification_answers_the_decrypted_echostr(ingest):
    _, process = ingest
    timestamp, nonce = str(int(time.time())), "1372623149"
    echostr = CRYPTOS[A].encrypt(b"8047937489284390173", A)
    params = {"msg_signature": CRYPTOS[A].sign(timestamp, nonce, echostr), "timestamp": timestamp,
              "nonce": nonce, "echostr": echostr}

    async def verify():
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{process.base_url}/wecom/{A}/callback", params=params) as response:
                return response.status, await response.read()
    assert asyncio.run(verify()) == (200, b"8047937489284390173")


BOMB = (b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">'
        b'<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;">]><xml><Encrypt>&c;</Encrypt></xml>')


def _bad_callbacks() -> list[tuple[str, str, dict, bytes, int, str]]:
    """(name, corp in the URL, query, body, status, reason) of each way a callback is bad."""
    now = int(time.time())
    good = sign_callback(CRYPTOS[A], A, edit(A, "wmbad", at=now))
    wrong_key = sign_callback(CallbackCrypto(CORPS[A][0], CORPS[B][1]), A, edit(A, "wmbad", at=now))
    wrong_receiver = sign_callback(CRYPTOS[A], A, edit(A, "wmbad", at=now), receive_id=B)
    stale = sign_callback(CRYPTOS[A], A, edit(A, "wmbad", at=now), timestamp=now - 3600)
    inner = CRYPTOS[A].encrypt(b"<xml><a>unclosed</xml>", A)
    malformed_message = (dict(good.params, msg_signature=CRYPTOS[A].sign(good.params["timestamp"], good.params["nonce"], inner)),
                         envelope_xml(A, inner))
    return [
        ("wrong signature", A, dict(good.params, msg_signature="0" * 40), good.body, 403, "bad_signature"),
        # the wrong key fails the padding check, or (by chance) passes it and fails the
        # length or receive-id check: never anything else
        ("wrong key", A, wrong_key.params, wrong_key.body, 400, "bad_ciphertext|wrong_receive_id"),
        ("wrong receive id", A, wrong_receiver.params, wrong_receiver.body, 403, "wrong_receive_id"),
        ("replayed old timestamp", A, stale.params, stale.body, 403, "stale_timestamp"),
        ("malformed envelope", A, good.params, b"<xml><Encrypt>", 400, "bad_xml"),
        ("malformed message", A, *malformed_message, 400, "bad_xml"),
        ("XML bomb", A, good.params, BOMB, 400, "bad_xml"),
        ("oversized body", A, good.params, b"<xml><Encrypt>" + b"A" * MAX_BODY_BYTES + b"</Encrypt></xml>", 413, "too_large"),
        ("unknown corp", "wwnotconfigured", good.params, good.body, 404, "unknown_corp"),
        ("no signature", A, {"timestamp": str(now), "nonce": "1"}, good.body, 400, "missing_parameter"),
    ]


async def _post(base_url: str, corp: str, params: dict, body: bytes) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base_url}/wecom/{corp}/callback", params=params, data=body) as response:
            return response.status, await response.text()


def test_each_bad_callback_gets_its_4xx_is_counted_and_writes_nothing(ingest):
    pipeline, process = ingest
    before = len(read_callbacks(pipeline, 0, settle=0.5))
    counted_before = process.metrics()
    for name, corp, params, body, status, reason in _bad_callbacks():
        answer_status, answer = asyncio.run(_post(process.base_url, corp, params, body))
        assert answer in reason.split("|") and 400 <= answer_status < 500, (name, answer_status, answer)
        assert answer_status == status or "|" in reason, (name, answer_status)
        assert total(process.metrics(), "tagstream_wecom_callbacks_total", outcome=answer) > \
            total(counted_before, "tagstream_wecom_callbacks_total", outcome=answer), f"{name} not counted"
    # still serving, and a good callback after all that is written
    now = int(time.time())
    good = sign_callback(CRYPTOS[B], B, edit(B, "wmafter", at=now))
    assert asyncio.run(_post(process.base_url, B, good.params, good.body)) == (200, "")
    records = read_callbacks(pipeline, before + 1, settle=2.0)
    assert len(records) == before + 1 and "wmafter" in {r["fields"]["ExternalUserID"] for r in records}


@given(body=st.binary(max_size=4096), corp=st.sampled_from([A, B, "wwx"]))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_arbitrary_bodies_get_a_4xx_and_never_break_the_server(ingest, body, corp):
    _, process = ingest
    now = str(int(time.time()))
    params = {"msg_signature": "a" * 40, "timestamp": now, "nonce": "5"}
    accepted = total(process.metrics(), "tagstream_wecom_callbacks_total", outcome="accepted")
    status, _ = asyncio.run(_post(process.base_url, corp, params, body))
    assert 400 <= status < 500
    assert process.process.poll() is None
    assert total(process.metrics(), "tagstream_wecom_callbacks_total", outcome="accepted") == accepted


def test_the_suite_command_url_verifies_answers_success_and_seals_credentials(ingest):
    """Provider mode's command URL (docs/provider.md): URL verification with the suite's key
    and id; a command answered `success` after it is written, keyed by the suite and
    InfoType, its ticket sealed; a command for another suite, or signed for a corp, refused."""
    pipeline, process = ingest
    suite_id, crypto = SUITE[0], CallbackCrypto(SUITE[1], SUITE[2])
    now = int(time.time())

    async def call(method: str, suite: str, params: dict, body: bytes = b"") -> tuple[int, str]:
        async with aiohttp.ClientSession() as session:
            async with session.request(method, f"{process.base_url}/wecom/suite/{suite}", params=params,
                                       data=body) as response:
                return response.status, await response.text()

    echo = crypto.encrypt(b"4242424242", suite_id)
    nonce = "8127"
    verify = {"msg_signature": crypto.sign(str(now), nonce, echo), "timestamp": str(now), "nonce": nonce,
              "echostr": echo}
    assert asyncio.run(call("GET", suite_id, verify)) == (200, "4242424242")
    assert asyncio.run(call("GET", "wwnosuchsuite", verify))[0] == 404

    before = len(read_callbacks(pipeline, 0, settle=0.5))
    ticket = {"SuiteId": suite_id, "InfoType": "suite_ticket", "TimeStamp": now, "SuiteTicket": "tkt-in-clear-0001"}
    signed = sign_callback(crypto, suite_id, ticket)
    assert asyncio.run(call("POST", suite_id, signed.params, signed.body)) == (200, "success")
    other = sign_callback(crypto, suite_id, {**ticket, "SuiteId": "wwanothersuite"})
    assert asyncio.run(call("POST", suite_id, other.params, other.body)) == (403, "wrong_receive_id")
    for_a_corp = sign_callback(crypto, suite_id, ticket, receive_id=A)
    assert asyncio.run(call("POST", suite_id, for_a_corp.params, for_a_corp.body)) == (403, "wrong_receive_id")
    records = read_callbacks(pipeline, before + 1, settle=2.0)
    assert len(records) == before + 1
    [written] = [r for r in records if r["key"] == f"{suite_id}/suite_ticket"]
    assert written["corp_id"] == suite_id
    assert written["fields"]["SuiteTicket"] != "tkt-in-clear-0001" and "tkt-in-clear" not in str(written)
