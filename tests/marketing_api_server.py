"""A local Tencent Ads Marketing API `user_actions/add`, for the sink's tests (SPEC §5).

It implements the documented contract and the failures a real deployment sees:

- `POST /v3.0/user_actions/add?access_token=…&timestamp=…&nonce=…`, JSON body
  `{"account_id", "user_action_set_id", "actions": [...]}`.
- Global parameters: the token must be the current one (an expired token answers 11000, an
  unknown one 11002); `timestamp` within 300 s of the server clock; `nonce` at most 32
  characters and never reused.
- Body: 1-50 actions, at most 50 KB; each action has `outer_action_id`, an integer
  `action_time`, `action_type` (`custom_action` when it is CUSTOM) and a user identity
  (`user_id` or `trace.click_id`). Violations are permanent errors (code 40001-40004).
- `outer_action_id` is the API's own dedupe key: an action whose id was already accepted
  is acknowledged but not counted again; the server records it as a duplicate delivery,
  which is what the tests assert never happens.

Faults are injected through `Faults` (in-process) or `POST /control` (JSON of the same
fields): a rate of retryable answers (10000, 10001, 11008, 11016-11019, HTTP 500/503, 429),
a set of outer_action_ids answered with a permanent error (31001, invalid user), a set of
*stuck* accounts whose every request is answered 10001 (system busy) until `heal` takes
them out, a token rotation after N requests, slow answers and dropped connections. Every decision comes from
a seeded random generator, so a run is reproducible.

Run it alone: `python -m tests.marketing_api_server --port 18080 --token T`.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import orjson
from aiohttp import web

from streams.sinks.marketing_api import MAX_ACTIONS, MAX_BODY_BYTES, RETRYABLE_CODES

TIMESTAMP_SKEW_S = 300
PERMANENT_USER_ERROR = 31001


@dataclass
class Faults:
    seed: int = 0
    retryable_rate: float = 0.0          # share of requests answered with a retryable failure
    permanent_ids: set = field(default_factory=set)   # outer_action_ids always rejected
    stuck_accounts: set = field(default_factory=set)  # account_ids answered 10001 on every request
    rotate_token_after: Optional[int] = None          # requests until the token expires
    new_token: Optional[str] = None
    slow_rate: float = 0.0               # share of requests answered after `slow_s`
    slow_s: float = 2.0
    drop_rate: float = 0.0               # share of connections dropped without an answer


@dataclass
class Delivery:
    outer_action_id: str
    account_id: int
    user_action_set_id: int
    action: dict
    at: float = 0.0                  # wall-clock seconds of the first acceptance


class MarketingApiServer:
    def __init__(self, token: str, faults: Optional[Faults] = None):
        self.token = token
        self.expired_tokens: set[str] = set()
        self.faults = faults or Faults()
        self.random = random.Random(self.faults.seed)
        self.accepted: dict[str, Delivery] = {}   # outer_action_id -> first delivery
        self.duplicates: Counter = Counter()       # outer_action_id -> further deliveries
        self.answers: Counter = Counter()           # code (or "http_<status>", "dropped") -> count
        self.requests = 0
        self.requests_by_account: Counter = Counter()   # well-formed requests per account_id
        self.nonces: set[str] = set()
        self.batch_sizes: list[int] = []
        self.tokens_seen: set[str] = set()
        self.first_accepted_at: Optional[float] = None   # wall-clock seconds, for throughput
        self.last_accepted_at: Optional[float] = None
        self.lock = threading.Lock()

    # -- the endpoint ------------------------------------------------------------------
    async def user_actions_add(self, request: web.Request) -> web.StreamResponse:
        with self.lock:
            self.requests += 1
            self._maybe_rotate_token()
            roll = self.random.random()
            slow = self.random.random() < self.faults.slow_rate
            drop = self.random.random() < self.faults.drop_rate
        if drop:
            self.answers["dropped"] += 1
            request.transport.close()               # the client sees a reset connection
            return web.Response(status=500)
        if slow:
            await asyncio.sleep(self.faults.slow_s)
        query = request.rel_url.query
        token = query.get("access_token", "")
        self.tokens_seen.add(token)
        if token in self.expired_tokens:
            return self._answer(11000, "access token expired")
        if token != self.token:
            return self._answer(11002, "access token invalid")
        try:
            timestamp = int(query.get("timestamp", ""))
        except ValueError:
            return self._answer(40001, "timestamp: expected integer seconds")
        if abs(timestamp - time.time()) > TIMESTAMP_SKEW_S:
            return self._answer(40001, "timestamp: more than 300 s from server time")
        nonce = query.get("nonce", "")
        if not nonce or len(nonce) > 32:
            return self._answer(40002, "nonce: 1-32 characters")
        with self.lock:
            if nonce in self.nonces:
                return self._answer(40002, "nonce: already used")
            self.nonces.add(nonce)
        body = await request.read()
        if len(body) > MAX_BODY_BYTES:
            return self._answer(40003, f"body: {len(body)} bytes, over 50 KB")
        problem, payload = _validate_body(body)
        if problem:
            return self._answer(40004, problem)
        account = payload["account_id"]
        with self.lock:
            self.requests_by_account[account] += 1
        if account in self.faults.stuck_accounts:
            return self._answer(10001, "system busy, try again")
        if roll < self.faults.retryable_rate:
            return self._retryable_answer()
        rejected = [a["outer_action_id"] for a in payload["actions"]
                    if a["outer_action_id"] in self.faults.permanent_ids]
        if rejected:
            return self._answer(PERMANENT_USER_ERROR, f"actions[{rejected[0]}].user_id: user not found")
        with self.lock:
            self.batch_sizes.append(len(payload["actions"]))
            for action in payload["actions"]:
                oid = action["outer_action_id"]
                if oid in self.accepted:
                    self.duplicates[oid] += 1
                else:
                    self.accepted[oid] = Delivery(oid, payload["account_id"], payload["user_action_set_id"], action,
                                                  time.time())
            self.last_accepted_at = time.time()
            self.first_accepted_at = self.first_accepted_at or self.last_accepted_at
        return self._answer(0, "")

    def _retryable_answer(self) -> web.Response:
        kind = self.random.choice(("code", "code", "http_500", "http_503", "http_429"))
        if kind == "code":
            return self._answer(self.random.choice(sorted(RETRYABLE_CODES)), "system busy, try again")
        status = int(kind.split("_")[1])
        self.answers[kind] += 1
        return web.Response(status=status, text="temporarily unavailable")

    def _answer(self, code: int, message: str) -> web.Response:
        self.answers[code] += 1
        return web.Response(body=orjson.dumps({"code": code, "message": message, "message_cn": message,
                                               "data": {}}), content_type="application/json")

    def _maybe_rotate_token(self) -> None:
        after = self.faults.rotate_token_after
        if after is not None and self.requests > after and self.faults.new_token:
            self.expired_tokens.add(self.token)
            self.token = self.faults.new_token
            self.faults.rotate_token_after = None

    # -- control and inspection ----------------------------------------------------------
    async def control(self, request: web.Request) -> web.Response:
        changes = orjson.loads(await request.read())
        for name, value in changes.items():
            setattr(self.faults, name, set(value) if name in ("permanent_ids", "stuck_accounts") else value)
        return web.json_response({"ok": True})

    def heal(self, *accounts: int) -> None:
        """The stuck accounts answer normally from now on."""
        self.faults.stuck_accounts = set(self.faults.stuck_accounts) - set(accounts)

    async def stats(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.summary()), content_type="application/json")

    def summary(self) -> dict:
        return {"requests": self.requests, "accepted": len(self.accepted),
                "duplicate_deliveries": sum(self.duplicates.values()),
                "answers": {str(k): v for k, v in self.answers.items()},
                "first_accepted_at": self.first_accepted_at, "last_accepted_at": self.last_accepted_at}

    def app(self) -> web.Application:
        app = web.Application(client_max_size=4 * MAX_BODY_BYTES)
        app.router.add_post("/v3.0/user_actions/add", self.user_actions_add)
        app.router.add_post("/control", self.control)
        app.router.add_get("/stats", self.stats)
        return app


def _validate_body(body: bytes) -> tuple[Optional[str], Optional[dict]]:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "body: not JSON", None
    if not isinstance(payload, dict):
        return "body: expected an object", None
    for name in ("account_id", "user_action_set_id"):
        if not isinstance(payload.get(name), int):
            return f"{name}: expected integer", None
    actions = payload.get("actions")
    if not isinstance(actions, list) or not 1 <= len(actions) <= MAX_ACTIONS:
        return "actions: 1-50 actions", None
    for i, action in enumerate(actions):
        if not isinstance(action, dict):
            return f"actions[{i}]: expected object", None
        if not isinstance(action.get("outer_action_id"), str) or not action["outer_action_id"]:
            return f"actions[{i}].outer_action_id: required", None
        if not isinstance(action.get("action_time"), int):
            return f"actions[{i}].action_time: expected integer seconds", None
        if not isinstance(action.get("action_type"), str):
            return f"actions[{i}].action_type: required", None
        if action["action_type"] == "CUSTOM" and not action.get("custom_action"):
            return f"actions[{i}].custom_action: required for CUSTOM", None
        user_id = action.get("user_id") or {}
        click_id = (action.get("trace") or {}).get("click_id")
        if not user_id and not click_id:
            return f"actions[{i}]: user_id or trace.click_id required", None
    return None, payload


class ServerThread:
    """The server on 127.0.0.1:`port` in a background thread, for in-process tests."""

    def __init__(self, server: MarketingApiServer, port: int = 0):
        self.server = server
        self.port = port
        self.loop = asyncio.new_event_loop()
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        runner = web.AppRunner(self.server.app(), access_log=None)
        self.loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", self.port)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self.started.set()
        self.loop.run_forever()
        self.loop.run_until_complete(runner.cleanup())

    def start(self) -> "ServerThread":
        self.thread.start()
        self.started.wait(10)
        return self

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def main() -> None:
    parser = argparse.ArgumentParser(description="local Marketing API user_actions/add for tests")
    parser.add_argument("--port", type=int, default=18080)
    parser.add_argument("--token", required=True)
    args = parser.parse_args()
    web.run_app(MarketingApiServer(args.token).app(), host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
