"""The fake WeCom's provider side (WECOM.md §5): a suite that corps authorise.

- **Tickets.** `push_ticket` makes a new suite ticket (valid 30 minutes on the fake's clock)
  and returns the `suite_ticket` command WeCom would push. `get_suite_token` accepts only a
  ticket that is known and unexpired (else 40085).
- **Authorisation.** `authorise(corp_id)` is the QR-code scan: the corp comes into being
  with its tags, a single-use auth code (valid 10 minutes) is issued, and the `create_auth`
  command is returned. `get_permanent_code` answers a code once; a second try is 40029.
- **Tokens.** Suite tokens expire (`suite_token_ttl_s`) or are invalidated early
  (`expire_suite_tokens`: 42009 on the next call). `get_corp_token` answers a corp token
  the fake's ordinary API accepts.
- **Cancellation.** `cancel(corp_id)` returns `cancel_auth`; from then on the corp's
  permanent code is refused (40084) and its tokens (40014).
- `provider_event` turns a self-built app's callback (from `Staff`) into the provider
  format WeCom pushes to the command URL (`AuthCorpId`, `InfoType`).
"""
from __future__ import annotations

import secrets
from typing import Optional

from aiohttp import web

from tests.fake_wecom.api import FakeWeComApi

TICKET_TTL_S = 1800
AUTH_CODE_TTL_S = 600


class FakeProvider:
    def __init__(self, api: FakeWeComApi, suite_id: str, suite_secret: str):
        self.api, self.suite_id, self.suite_secret = api, suite_id, suite_secret
        self.clock = api.clock
        self.tickets: dict[str, float] = {}                # ticket -> expires at
        self.suite_tokens: dict[str, tuple[float, bool]] = {}   # token -> (expires at, invalidated)
        self.suite_token_ttl_s = 7200
        self.auth_codes: dict[str, tuple[str, float]] = {}       # code -> (corp, expires at); single use
        self.permanent_codes: dict[str, str] = {}                # corp -> its permanent code
        self.agent_ids: dict[str, int] = {}
        self.cancelled: set[str] = set()
        api.extra_routes += [
            web.post("/cgi-bin/service/get_suite_token", self.get_suite_token),
            web.post("/cgi-bin/service/get_permanent_code", self.get_permanent_code),
            web.post("/cgi-bin/service/get_corp_token", self.get_corp_token),
            web.post("/cgi-bin/service/get_auth_info", self.get_auth_info),
        ]

    # -- what WeCom pushes ---------------------------------------------------------------------
    def _command(self, info_type: str, **fields) -> dict:
        return {"SuiteId": self.suite_id, "InfoType": info_type, "TimeStamp": int(self.clock()), **fields}

    def push_ticket(self) -> dict:
        ticket = secrets.token_urlsafe(32)
        self.tickets = {**self.tickets, ticket: self.clock() + TICKET_TTL_S}
        return self._command("suite_ticket", SuiteTicket=ticket)

    def authorise(self, corp_id: str, tags: dict[str, str], state: str = "") -> dict:
        """The corp's admin scans the QR code: the corp exists with its tags, and WeCom pushes
        `create_auth` with a fresh single-use code."""
        if corp_id not in self.api.corps:
            self.api.add_corp(corp_id, secrets.token_urlsafe(16), tags)
        self.cancelled = self.cancelled - {corp_id}
        code = secrets.token_urlsafe(24)
        self.auth_codes = {**self.auth_codes, code: (corp_id, self.clock() + AUTH_CODE_TTL_S)}
        self.agent_ids.setdefault(corp_id, 1000000 + len(self.agent_ids) + 1)
        return self._command("create_auth", AuthCode=code, **({"State": state} if state else {}))

    def change(self, corp_id: str) -> dict:
        self.agent_ids[corp_id] = self.agent_ids.get(corp_id, 1000000) + 1000
        return self._command("change_auth", AuthCorpId=corp_id)

    def cancel(self, corp_id: str) -> dict:
        self.cancelled = self.cancelled | {corp_id}
        self.permanent_codes = {c: p for c, p in self.permanent_codes.items() if c != corp_id}
        self.api.invalidate_tokens(corp_id)
        return self._command("cancel_auth", AuthCorpId=corp_id)

    def provider_event(self, fields: dict) -> dict:
        """A self-built app's callback message as the provider format carries it."""
        body = {k: v for k, v in fields.items() if k not in ("ToUserName", "FromUserName", "CreateTime", "MsgType", "Event")}
        return self._command(fields["Event"], AuthCorpId=fields["ToUserName"], **body)

    def expire_suite_tokens(self) -> None:
        self.suite_tokens = {t: (expires, True) for t, (expires, _) in self.suite_tokens.items()}

    # -- the routes -------------------------------------------------------------------------------
    def _suite_refusal(self, api: str, request: web.Request) -> Optional[web.Response]:
        token = request.query.get("suite_access_token", "")
        if token not in self.suite_tokens:
            return self.api._answer(api, 40082)
        expires, invalidated = self.suite_tokens[token]
        if invalidated or self.clock() >= expires:
            return self.api._answer(api, 42009)
        return None

    async def get_suite_token(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("suite_id") != self.suite_id or body.get("suite_secret") != self.suite_secret:
            return self.api._answer("service/get_suite_token", 40001)
        if self.clock() >= self.tickets.get(body.get("suite_ticket", ""), 0):
            return self.api._answer("service/get_suite_token", 40085)
        token = secrets.token_urlsafe(24)
        self.suite_tokens = {**self.suite_tokens, token: (self.clock() + self.suite_token_ttl_s, False)}
        return self.api._answer("service/get_suite_token", 0, suite_access_token=token,
                                expires_in=self.suite_token_ttl_s)

    async def get_permanent_code(self, request: web.Request) -> web.Response:
        refused = self._suite_refusal("service/get_permanent_code", request)
        if refused:
            return refused
        code = (await request.json()).get("auth_code", "")
        corp_id, expires = self.auth_codes.get(code, ("", 0))
        self.auth_codes = {c: v for c, v in self.auth_codes.items() if c != code}      # single use
        if not corp_id or self.clock() >= expires:
            return self.api._answer("service/get_permanent_code", 40029)
        permanent = secrets.token_urlsafe(32)
        self.permanent_codes = {**self.permanent_codes, corp_id: permanent}
        return self.api._answer("service/get_permanent_code", 0, permanent_code=permanent,
                                auth_corp_info={"corpid": corp_id, "corp_name": "企业" + corp_id[-4:]},
                                auth_info={"agent": [{"agentid": self.agent_ids[corp_id], "name": "线索通"}]})

    async def get_corp_token(self, request: web.Request) -> web.Response:
        refused = self._suite_refusal("service/get_corp_token", request)
        if refused:
            return refused
        body = await request.json()
        corp_id = body.get("auth_corpid", "")
        if not corp_id or self.permanent_codes.get(corp_id) != body.get("permanent_code"):
            return self.api._answer("service/get_corp_token", 40084)
        token = secrets.token_urlsafe(24)
        self.api.tokens[token] = (corp_id, self.clock() + self.api.token_ttl_s, False)
        return self.api._answer("service/get_corp_token", 0, access_token=token, expires_in=self.api.token_ttl_s)

    async def get_auth_info(self, request: web.Request) -> web.Response:
        refused = self._suite_refusal("service/get_auth_info", request)
        if refused:
            return refused
        body = await request.json()
        corp_id = body.get("auth_corpid", "")
        if not corp_id or self.permanent_codes.get(corp_id) != body.get("permanent_code"):
            return self.api._answer("service/get_auth_info", 40084)
        return self.api._answer("service/get_auth_info", 0, auth_corp_info={"corpid": corp_id},
                                auth_info={"agent": [{"agentid": self.agent_ids[corp_id], "name": "线索通"}]})
