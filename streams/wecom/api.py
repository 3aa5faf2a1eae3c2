"""The WeCom API client (SPEC §7, WECOM.md §4): tokens, retries, a per-corp rate limit.

- **Tokens.** `gettoken` per corp with its contact secret, cached until shortly before
  `expires_in`. A call answered 40014 (invalid) or 42001 (expired) gets a fresh token and is
  sent once more; a second refusal is an error (the secret or the corp is wrong).
- **Retries.** -1 (busy), 45009 (frequency limit), 45033 (concurrency), HTTP 5xx, timeouts
  and refused connections are retried with exponential backoff and full jitter, for at most
  `wecom_retry_budget` (5 s); then `WeComUnavailable` (the caller keeps the callback and
  tries later).
- **Permanent errors** (anything else, e.g. 84061: no such contact) raise `WeComError` with
  the errcode, which the enrichment dead-letters.
- **Rate limit.** Each (corp, API) has a token bucket of `wecom_rate_limit` calls per minute,
  below WeCom's 10,000 (WECOM.md §4): one busy corp waits for its own bucket, nobody else's.
- **Provider mode** (streams/wecom/provider.py). A corp that authorised the suite gets its
  token from `service/get_corp_token` with its permanent code, under the suite's token, which
  comes from `service/get_suite_token` with the newest ticket. Both are cached to expiry. A
  suite token refused (42009 expired, 40082 invalid) is fetched again once; no ticket yet, or
  a ticket WeCom refuses (40085), is retried like a busy answer (a new ticket comes every 10
  minutes), so the corp's callbacks wait instead of failing. A permanent code refused (40084)
  is permanent: `on_code_refused` marks the corp inactive, and its callbacks are
  dead-lettered with the errcode, not retried forever.

The access token is a secret: it is sent in the query string, as WeCom requires, and never
logged (aiohttp logs no URLs here; errors are reported by API name and errcode only).
"""
from __future__ import annotations

import asyncio
import contextvars
import random
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Optional

import aiohttp

from streams.observability import metrics
from streams.settings import Settings
from streams.wecom.corps import Corp, Suite, load_suite
from streams.wecom.provider import ACTIVE, AuthBook, Vault

#: a shorter retry budget for the calls made inside it (the enrichment's retries of a
#: deferred corp: one quick look, not another full budget)
RETRY_BUDGET_S: contextvars.ContextVar = contextvars.ContextVar("wecom_retry_budget_s", default=None)

RETRYABLE = frozenset({-1, 45009, 45033})
TOKEN_REFUSED = frozenset({40014, 42001})
SUITE_TOKEN_REFUSED = frozenset({42009, 40082})
#: a permanent code WeCom no longer accepts (the corp cancelled, or it was reset)
CODE_REFUSED = 40084
#: a suite ticket WeCom refuses (a newer one is on its way)
TICKET_REFUSED = 40085
#: the token cache's key of the suite's own token (no corp id has a NUL)
SUITE = "\x00suite"
#: a cached token is renewed this long before WeCom says it expires
TOKEN_MARGIN_S = 300


class WeComError(Exception):
    """A permanent refusal: the errcode and WeCom's message (no secrets in either)."""

    def __init__(self, api: str, errcode: int, errmsg: str = ""):
        super().__init__(f"{api}: errcode {errcode} {errmsg}".strip())
        self.api, self.errcode, self.errmsg = api, errcode, errmsg


class WeComUnavailable(Exception):
    """Retries ran out (busy, rate limited, 5xx, timeouts): try again later."""


@dataclass
class _Bucket:
    capacity: float
    per_second: float
    tokens: float
    at: float

    async def take(self, clock: Callable[[], float]) -> None:
        while True:
            now = clock()
            self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.per_second)
            self.at = now
            if self.tokens >= 1:
                self.tokens -= 1
                return
            await asyncio.sleep((1 - self.tokens) / self.per_second)


class WeComClient:
    """Calls WeCom's API for the configured corps."""

    def __init__(self, settings: Settings, corps: dict[str, Corp], *, retry_budget_s: Optional[float] = None,
                 backoff_base_s: float = 0.1, backoff_cap_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time,
                 suite: Optional[Suite] = None, auth: Optional[AuthBook] = None,
                 on_code_refused: Optional[Callable[[str], None]] = None):
        self.base = settings.wecom_api_base.rstrip("/") + "/"
        self.corps = corps
        self.suite, self.auth, self.on_code_refused = suite, auth, on_code_refused
        self.rate_per_minute = settings.wecom_rate_limit
        self.timeout = aiohttp.ClientTimeout(total=settings.wecom_request_timeout / 1000)
        self.retry_budget_s = settings.wecom_retry_budget / 1000 if retry_budget_s is None else retry_budget_s
        self.backoff_base_s, self.backoff_cap_s = backoff_base_s, backoff_cap_s
        self.clock, self.wall_clock = clock, wall_clock
        self.tokens: dict[str, tuple[str, float]] = {}          # corp -> (token, renew at, wall clock)
        self.token_locks: dict[str, asyncio.Lock] = {}
        self.buckets: dict[tuple[str, str], _Bucket] = {}
        self.session: Optional[aiohttp.ClientSession] = None

    def serves(self, corp_id: str) -> bool:
        """A corp of the corps file, or (provider mode) one whose authorisation is active."""
        return corp_id in self.corps or (self.auth is not None and self.auth.status(corp_id) == ACTIVE)

    def corp_ids(self) -> list[str]:
        """Every corp `serves`."""
        return sorted({*self.corps, *(self.auth.corp_ids(ACTIVE) if self.auth is not None else ())})

    async def __aenter__(self) -> "WeComClient":
        self.session = aiohttp.ClientSession(timeout=self.timeout)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.close()

    # -- the calls the ingest makes -----------------------------------------------------------
    async def get_contact(self, corp_id: str, external_userid: str) -> dict:
        """externalcontact/get, every page of follow users merged."""
        result: Optional[dict] = None
        cursor = ""
        while True:
            page = await self.call(corp_id, "GET", "externalcontact/get",
                                   params={"external_userid": external_userid, **({"cursor": cursor} if cursor else {})})
            if result is None:
                result = page
            else:
                result["follow_user"].extend(page.get("follow_user", []))
            cursor = page.get("next_cursor") or ""
            if not cursor:
                return result

    async def get_corp_tag_list(self, corp_id: str) -> list[dict]:
        return (await self.call(corp_id, "POST", "externalcontact/get_corp_tag_list", json={})).get("tag_group", [])

    async def mark_tag(self, corp_id: str, userid: str, external_userid: str, add: list, remove: list) -> None:
        await self.call(corp_id, "POST", "externalcontact/mark_tag",
                        json={"userid": userid, "external_userid": external_userid, "add_tag": add, "remove_tag": remove})

    async def follow_user_list(self, corp_id: str) -> list[str]:
        """The staff members with the customer-contact permission."""
        return (await self.call(corp_id, "GET", "externalcontact/get_follow_user_list")).get("follow_user", [])

    async def batch_get_by_user(self, corp_id: str, userids: list[str], cursor: str = "", limit: int = 100) -> dict:
        return await self.call(corp_id, "POST", "externalcontact/batch/get_by_user",
                               json={"userid_list": userids, "cursor": cursor, "limit": limit})

    # -- the provider's calls (under the suite's token) ------------------------------------------
    async def get_permanent_code(self, auth_code: str) -> dict:
        """The answer of service/get_permanent_code: `permanent_code`, `auth_corp_info.corpid`,
        `auth_info.agent`. The auth code is single-use: a retry after a lost answer is refused."""
        return await self.call(SUITE, "POST", "service/get_permanent_code", json={"auth_code": auth_code})

    async def get_auth_info(self, corp_id: str, permanent_code: str) -> dict:
        return await self.call(SUITE, "POST", "service/get_auth_info",
                               json={"auth_corpid": corp_id, "permanent_code": permanent_code})

    # -- the machinery ----------------------------------------------------------------------------
    async def call(self, corp_id: str, method: str, api: str, *, params: Optional[dict] = None,
                   json: Any = None) -> dict:
        """One API call with a token (the corp's, or with `SUITE` the suite's), retried as the
        module docstring says; the answer's JSON."""
        budget_s = RETRY_BUDGET_S.get() or self.retry_budget_s
        deadline = self.clock() + budget_s
        attempt = 0
        refreshed = False
        token_param, refused_codes = (("suite_access_token", SUITE_TOKEN_REFUSED) if corp_id == SUITE
                                      else ("access_token", TOKEN_REFUSED))
        while True:
            token = await self._token(corp_id)
            await self._bucket(corp_id, api).take(self.clock)
            errcode, answer = await self._send(method, api, {**(params or {}), token_param: token}, json)
            if errcode == 0:
                return answer
            if errcode in refused_codes and not refreshed:
                refreshed = True
                self._drop_token(corp_id, token)
                metrics.WECOM_TOKEN_REFRESHES.labels(str(errcode)).inc()
                continue
            if errcode not in RETRYABLE and errcode is not None:
                raise WeComError(api, errcode, answer.get("errmsg", "") if answer else "")
            attempt += 1
            pause = random.uniform(0, min(self.backoff_cap_s, self.backoff_base_s * 2 ** attempt))
            if self.clock() + pause > deadline:
                raise WeComUnavailable(f"{api} for {_who(corp_id)}: still {errcode if errcode is not None else 'failing'} "
                                       f"after {attempt} attempts in {budget_s:.0f} s")
            await asyncio.sleep(pause)

    async def _send(self, method: str, api: str, params: dict, json: Any) -> tuple[Optional[int], Optional[dict]]:
        """(errcode, answer); errcode None for a transport failure or a 5xx (retryable)."""
        try:
            async with self.session.request(method, self.base + api, params=params, json=json) as response:
                if response.status >= 500:
                    metrics.WECOM_API_CALLS.labels(api, f"http_{response.status}").inc()
                    return None, None
                answer = await response.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            metrics.WECOM_API_CALLS.labels(api, type(exc).__name__).inc()
            return None, None
        errcode = int(answer.get("errcode", 0) or 0)
        metrics.WECOM_API_CALLS.labels(api, str(errcode)).inc()
        return errcode, answer

    async def _token(self, corp_id: str) -> str:
        cached = self.tokens.get(corp_id)
        if cached and self.wall_clock() < cached[1]:
            return cached[0]
        async with self.token_locks.setdefault(corp_id, asyncio.Lock()):
            cached = self.tokens.get(corp_id)
            if cached and self.wall_clock() < cached[1]:
                return cached[0]
            deadline = self.clock() + (RETRY_BUDGET_S.get() or self.retry_budget_s)
            attempt = 0
            while True:
                api, errcode, answer, name = await self._fetch_token(corp_id)
                if errcode == 0:
                    ttl = int(answer.get("expires_in", 7200))
                    self.tokens[corp_id] = (answer[name], self.wall_clock() + max(ttl - TOKEN_MARGIN_S, ttl / 2))
                    metrics.WECOM_TOKEN_REFRESHES.labels("expiry" if cached else "first").inc()
                    return answer[name]
                if errcode is not None and errcode not in RETRYABLE:
                    raise WeComError(api, errcode, answer.get("errmsg", "") if answer else "")
                attempt += 1
                pause = random.uniform(0, min(self.backoff_cap_s, self.backoff_base_s * 2 ** attempt))
                if self.clock() + pause > deadline:
                    raise WeComUnavailable(f"{api} for {_who(corp_id)}: no token after {attempt} attempts")
                await asyncio.sleep(pause)

    async def _fetch_token(self, corp_id: str) -> tuple[str, Optional[int], Optional[dict], str]:
        """(api, errcode, answer, the answer's token field) of one token request; errcode None
        is retried. A self-built app's corp: gettoken with its secret. The suite: its ticket.
        An authorised corp: its permanent code, under the suite's token."""
        corp = self.corps.get(corp_id)
        if corp is not None:
            return ("gettoken", *await self._send("GET", "gettoken", {"corpid": corp_id,
                                                                      "corpsecret": corp.contact_secret}, None),
                    "access_token")
        if self.suite is None or self.auth is None:
            raise WeComError("gettoken", -2, "corp not configured")
        if corp_id == SUITE:
            ticket = self.auth.ticket()
            if ticket is None:            # none pushed yet: retried until the budget ends
                return "get_suite_token", None, None, ""
            errcode, answer = await self._send("POST", "service/get_suite_token", {}, {
                "suite_id": self.suite.suite_id, "suite_secret": self.suite.suite_secret, "suite_ticket": ticket[0]})
            return "get_suite_token", None if errcode == TICKET_REFUSED else errcode, answer, "suite_access_token"
        authorisation = self.auth.get(corp_id)
        if authorisation is None or authorisation.status != ACTIVE or not authorisation.permanent_code:
            raise WeComError("get_corp_token", CODE_REFUSED, "the corp has not authorised the suite"
                             if authorisation is None else f"the corp's authorisation is {authorisation.status}")
        suite_token = await self._token(SUITE)
        errcode, answer = await self._send("POST", "service/get_corp_token", {"suite_access_token": suite_token},
                                           {"auth_corpid": corp_id, "permanent_code": authorisation.permanent_code})
        if errcode in SUITE_TOKEN_REFUSED:
            self._drop_token(SUITE, suite_token)
            metrics.WECOM_TOKEN_REFRESHES.labels(str(errcode)).inc()
            return "get_corp_token", None, answer, ""        # again, with a fresh suite token
        if errcode == CODE_REFUSED and self.on_code_refused is not None:
            self.on_code_refused(corp_id)
        return "get_corp_token", errcode, answer, "access_token"

    def _drop_token(self, corp_id: str, token: str) -> None:
        if self.tokens.get(corp_id, ("",))[0] == token:
            del self.tokens[corp_id]

    def _bucket(self, corp_id: str, api: str) -> _Bucket:
        bucket = self.buckets.get((corp_id, api))
        if bucket is None:
            per_second = self.rate_per_minute / 60
            bucket = self.buckets[(corp_id, api)] = _Bucket(max(1.0, per_second), per_second, max(1.0, per_second), self.clock())
        return bucket


def _who(corp_id: str) -> str:
    return "the suite" if corp_id == SUITE else f"corp {corp_id}"


@asynccontextmanager
async def command_client(settings: Settings, corps: dict[str, Corp], client_id: str) -> AsyncIterator[WeComClient]:
    """The client of a command that calls WeCom for any corp (`tagstream tag`, `reconcile`,
    the ingest's tag endpoint): the corps file's apps and, in provider mode, every corp that
    authorised the suite, followed from `wecom-auth` (read to its end before the first call)."""
    from streams.kafka.replica import CompactedReplica      # Kafka only in provider mode
    suite = load_suite(settings)
    auth = AuthBook(Vault.from_settings(settings)) if suite else None
    replica = None
    if auth is not None:
        replica = CompactedReplica(settings, settings.topic("wecom_auth_topic"), client_id, auth.values)
        await replica.start()
        await replica.caught_up(30.0)
    try:
        async with WeComClient(settings, corps, suite=suite, auth=auth) as client:
            yield client
    finally:
        if replica is not None:
            await replica.stop()
