"""`tagstream ingest`: the HTTP server WeCom calls back (SPEC §7, WECOM.md §1).

    GET  /wecom/{corp_id}/callback   URL verification: answer the decrypted echostr
    POST /wecom/{corp_id}/callback   an event: verify, decrypt, write to wecom-callbacks, answer
    GET  /wecom/suite/{suite_id}     provider mode: the suite's command URL, verified alike
    POST /wecom/suite/{suite_id}     a command or a corp's event in the provider format
                                     (streams/wecom/provider.py): as an event, answered `success`
    POST /tags                       tag through WeCom's API (`Authorization: Bearer <token>`):
                                     {"corp_id", "userid", "external_userid", "add": [], "remove": []}
    GET  /healthz                    200 once the producer is connected
    GET  /metrics                    Prometheus

A POST is checked in this order, and the first failure is the answer, counted in
`tagstream_wecom_callbacks_total{kind="unknown", outcome=<reason>}`, with nothing written:

| check | refusal |
|---|---|
| the corp (or the suite) is configured | 404 `unknown_corp` |
| the body is at most 64 KiB | 413 `too_large` |
| `msg_signature`, `timestamp`, `nonce` are present | 400 `missing_parameter` |
| the timestamp is within `callback_max_age` of this clock | 403 `stale_timestamp` |
| the envelope is flat XML without DTD or entities | 400 `bad_xml` |
| the signature matches the corp's token | 403 `bad_signature` |
| the ciphertext decrypts with the corp's key | 400 `bad_ciphertext` |
| the receive id is the corp id (the suite id) | 403 `wrong_receive_id` |
| the message is flat XML | 400 `bad_xml` |
| a command names the suite (`SuiteId`) | 403 `wrong_receive_id` |

A command is written with the corp it concerns (`AuthCorpId`), or, for `suite_ticket` and
`create_auth`, with the suite id in the corp's place.

Then the callback is written to `wecom-callbacks` with acks=all, and only after the broker's
acknowledgement does WeCom get its 200: a callback that was answered is durable. If the write
fails the answer is 503 and WeCom retries (`outcome="not_written"`). A retry, identical or
re-signed, is written again; the enrichment's ids come from its content, so it makes no
second event.

Nothing here logs a secret, a ciphertext or a decrypted message: a refusal is logged with
its reason and the corp id only.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import Optional

from aiohttp import web
from aiokafka import AIOKafkaProducer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from streams.kafka import connection
from streams.observability import metrics
from streams.settings import Settings
from streams.state.failpoints import failpoint
from streams.wecom.api import WeComClient, WeComError, WeComUnavailable, command_client
from streams.wecom.corps import Corp, Suite
from streams.wecom.provider import Vault, seal_command
from streams.wecom.crypto import Refused
from streams.wecom.messages import MAX_BODY_BYTES, Callback, Envelope, parse_flat
from streams.wecom.tagging import tag_through_wecom

log = logging.getLogger(__name__)

#: the event and change types a metric label may carry (anything else is `other`)
KNOWN_KINDS = frozenset({
    "change_external_contact:add_external_contact", "change_external_contact:edit_external_contact",
    "change_external_contact:add_half_external_contact", "change_external_contact:del_external_contact",
    "change_external_contact:del_follow_user", "change_external_contact:transfer_fail",
    "change_external_tag:create", "change_external_tag:update", "change_external_tag:delete",
    "change_external_tag:shuffle", "suite_ticket:", "create_auth:", "change_auth:", "cancel_auth:"})
STATUS = {"unknown_corp": 404, "too_large": 413, "missing_parameter": 400, "stale_timestamp": 403,
          "bad_xml": 400, "bad_signature": 403, "bad_ciphertext": 400, "wrong_receive_id": 403}


def kind_of(callback: Callback) -> str:
    kind = f"{callback.event}:{callback.change_type}"
    return kind if kind in KNOWN_KINDS else "other"


class CallbackIngest:
    """The callbacks of `corps`, verified and written to `wecom-callbacks`."""

    def __init__(self, settings: Settings, corps: dict[str, Corp], *, clock=time.time,
                 api_token: Optional[str] = None, client: Optional[WeComClient] = None,
                 suite: Optional[Suite] = None, vault: Optional[Vault] = None):
        self.settings = settings
        self.corps = corps
        self.suite, self.vault = suite, vault
        self.clock = clock
        self.api_token = api_token          # of POST /tags; None: the endpoint is off
        self.client = client
        self.topic = settings.topic("wecom_callbacks_topic")
        self.producer: Optional[AIOKafkaProducer] = None

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        self.producer = AIOKafkaProducer(**connection.producer_kwargs(self.settings, linger_ms=0),
                                         client_id="tagstream-ingest")
        await connection.start_client(self.producer)

    async def stop(self) -> None:
        if self.producer is not None:
            await self.producer.stop()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES + 1)
        app.add_routes([web.get("/wecom/{corp_id}/callback", self.url_verification),
                        web.post("/wecom/{corp_id}/callback", self.event),
                        web.get("/wecom/suite/{suite_id}", self.suite_verification),
                        web.post("/wecom/suite/{suite_id}", self.command),
                        web.post("/tags", self.tags),
                        web.get("/healthz", self.healthz),
                        web.get("/metrics", self.metrics)])
        return app

    # -- handlers ---------------------------------------------------------------------------
    async def url_verification(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        try:
            corp = self._corp(request)
            echo = self._verified_echo(request, corp.crypto, corp.corp_id)
        except Refused as refused:
            return self._refuse(request, refused, "GET", started)
        return self._echo(echo, started)

    async def suite_verification(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        try:
            suite = self._suite(request)
            echo = self._verified_echo(request, suite.crypto, suite.suite_id)
        except Refused as refused:
            return self._refuse(request, refused, "GET", started)
        return self._echo(echo, started)

    async def event(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        try:
            corp = self._corp(request)
            fields = await self._verified_message(request, corp.crypto, corp.corp_id)
        except Refused as refused:
            return self._refuse(request, refused, "POST", started)
        return await self._write(Callback(corp.corp_id, fields, int(self.clock() * 1000)), started, "")

    async def command(self, request: web.Request) -> web.Response:
        """The suite's command URL: written like an event, answered `success` (WeCom's
        provider contract; it waits 1 s)."""
        started = time.perf_counter()
        try:
            suite = self._suite(request)
            fields = await self._verified_message(request, suite.crypto, suite.suite_id)
            if fields.get("SuiteId") != suite.suite_id:
                raise Refused("wrong_receive_id", "the command names another suite")
        except Refused as refused:
            return self._refuse(request, refused, "POST", started)
        corp_id = fields.get("AuthCorpId") or suite.suite_id
        return await self._write(Callback(corp_id, seal_command(fields, self.vault), int(self.clock() * 1000)),
                                 started, "success")

    def _verified_echo(self, request: web.Request, crypto, receive_id: str) -> bytes:
        query = self._signed_query(request, ("echostr",))
        crypto.verify(query["msg_signature"], query["timestamp"], query["nonce"], query["echostr"])
        return crypto.decrypt(query["echostr"], receive_id)

    def _echo(self, echo: bytes, started: float) -> web.Response:
        metrics.WECOM_CALLBACKS.labels("url_verification", "accepted").inc()
        metrics.WECOM_ANSWER_SECONDS.labels("GET").observe(time.perf_counter() - started)
        return web.Response(body=echo, content_type="text/plain")

    async def _verified_message(self, request: web.Request, crypto, receive_id: str) -> dict:
        body = await self._body(request)
        query = self._signed_query(request, ())
        envelope = Envelope.parse(body)
        crypto.verify(query["msg_signature"], query["timestamp"], query["nonce"], envelope.encrypted)
        return parse_flat(crypto.decrypt(envelope.encrypted, receive_id), "message")

    async def _write(self, callback: Callback, started: float, answer: str) -> web.Response:
        corp_id = callback.corp_id
        kind = kind_of(callback)
        try:
            await (await self.producer.send(self.topic, key=callback.key(), value=callback.to_wire()))
            failpoint("callback-written")
        except Exception as exc:        # the broker is unreachable or refused: WeCom retries
            metrics.WECOM_CALLBACKS.labels(kind, "not_written").inc()
            log.warning("callback of corp %s not written to %s (%s); answered 503, WeCom retries",
                        corp_id, self.topic, type(exc).__name__)
            return web.Response(status=503, text="not_written")
        metrics.WECOM_CALLBACKS.labels(kind, "accepted").inc()
        metrics.WECOM_ANSWER_SECONDS.labels("POST").observe(time.perf_counter() - started)
        return web.Response(text=answer)

    async def tags(self, request: web.Request) -> web.Response:
        """Tag through WeCom's API, then record the change as a callback would have been
        (streams/wecom/tagging.py); 200 only after both."""
        if self.api_token is None or self.client is None:
            return web.json_response({"error": "the tag endpoint is off: set TAGSTREAM_INGEST_API_TOKEN_FILE"},
                                     status=404)
        offered = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(offered.encode(), self.api_token.encode()):
            metrics.WECOM_TAG_REQUESTS.labels("unauthorised").inc()
            return web.json_response({"error": "unauthorised"}, status=401)
        try:
            body = await request.json()
            corp_id, userid, customer = body["corp_id"], body["userid"], body["external_userid"]
            add, remove = list(body.get("add") or []), list(body.get("remove") or [])
            if not all(isinstance(v, str) and v for v in (corp_id, userid, customer, *add, *remove)):
                raise ValueError("ids are non-empty strings")
        except (ValueError, KeyError, TypeError) as exc:
            metrics.WECOM_TAG_REQUESTS.labels("bad_request").inc()
            return web.json_response({"error": f"bad request: {exc}"}, status=400)
        if not self.client.serves(corp_id):
            metrics.WECOM_TAG_REQUESTS.labels("unknown_corp").inc()
            return web.json_response({"error": "unknown_corp"}, status=404)
        try:
            await tag_through_wecom(self.client, self.producer, self.settings, corp_id, userid, customer, add, remove)
        except WeComError as exc:
            metrics.WECOM_TAG_REQUESTS.labels("refused").inc()
            return web.json_response({"error": "refused by WeCom", "errcode": exc.errcode}, status=422)
        except WeComUnavailable:
            metrics.WECOM_TAG_REQUESTS.labels("unavailable").inc()
            return web.json_response({"error": "WeCom unavailable; retry later"}, status=503)
        metrics.WECOM_TAG_REQUESTS.labels("tagged").inc()
        return web.json_response({"ok": True})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok") if self.producer is not None else web.Response(status=503, text="starting")

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    # -- checks -----------------------------------------------------------------------------
    def _corp(self, request: web.Request) -> Corp:
        corp = self.corps.get(request.match_info["corp_id"])
        if corp is None:
            raise Refused("unknown_corp")
        return corp

    def _suite(self, request: web.Request) -> Suite:
        if self.suite is None or request.match_info["suite_id"] != self.suite.suite_id:
            raise Refused("unknown_corp")
        return self.suite

    async def _body(self, request: web.Request) -> bytes:
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            raise Refused("too_large")
        body = await request.content.read(MAX_BODY_BYTES + 1)
        if len(body) > MAX_BODY_BYTES:
            raise Refused("too_large")
        return body

    def _signed_query(self, request: web.Request, extra: tuple[str, ...]) -> dict[str, str]:
        query = {name: request.query.get(name, "") for name in ("msg_signature", "timestamp", "nonce") + extra}
        missing = [name for name, value in query.items() if not value]
        if missing:
            raise Refused("missing_parameter", missing[0])
        timestamp = query["timestamp"]
        if not timestamp.isdigit() or abs(self.clock() - int(timestamp)) * 1000 > self.settings.callback_max_age:
            raise Refused("stale_timestamp")
        return query

    def _refuse(self, request: web.Request, refused: Refused, method: str, started: float) -> web.Response:
        metrics.WECOM_CALLBACKS.labels("unknown", refused.reason).inc()
        metrics.WECOM_ANSWER_SECONDS.labels(method).observe(time.perf_counter() - started)
        addressee = request.match_info.get("corp_id") or request.match_info.get("suite_id", "")
        log.info("refused a %s callback for %r: %s", method, addressee[:64], refused.reason)
        return web.Response(status=STATUS.get(refused.reason, 400), text=refused.reason)


async def serve(settings: Settings, corps: dict[str, Corp], stop: asyncio.Event,
                api_token: Optional[str] = None, suite: Optional[Suite] = None, vault: Optional[Vault] = None) -> None:
    """Run the ingest until `stop` is set."""
    clients = command_client(settings, corps, "tagstream-ingest-auth")   # for the tag endpoint
    client = await clients.__aenter__()
    ingest = CallbackIngest(settings, corps, api_token=api_token, client=client, suite=suite, vault=vault)
    await ingest.start()
    runner = web.AppRunner(ingest.app(), access_log=None)
    await runner.setup()
    host, _, port = settings.ingest_listen.rpartition(":")
    site = web.TCPSite(runner, host or "127.0.0.1", int(port))
    try:
        await site.start()
        log.info("ingest listening on %s for %d corps%s", settings.ingest_listen, len(corps),
                 f" and suite {suite.suite_id}" if suite else "")
        await stop.wait()
    finally:
        await runner.cleanup()
        await ingest.stop()
        await clients.__aexit__(None, None, None)
