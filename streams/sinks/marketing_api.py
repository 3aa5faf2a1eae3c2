"""The Tencent Ads Marketing API `user_actions/add`, as the sink sees it (SPEC §5).

Pure parts (no I/O): turning reports into API actions, packing them into requests of at
most 50 actions and 50 KB for one (account, action set), and classifying an answer as
success, retry, token reload or permanent failure. I/O parts: the access-token source, a
token-bucket rate limiter and the HTTP client. The token is held here and nowhere else; it
never reaches a log line, a metric or a dead letter (`redact`).
"""
from __future__ import annotations

import asyncio
import enum
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Optional

import aiohttp
import orjson

MAX_ACTIONS = 50
MAX_BODY_BYTES = 50 * 1024
RETRYABLE_CODES = frozenset({10000, 10001, 11008, 11016, 11017, 11018, 11019})
TOKEN_CODES = frozenset({11000, 11002})       # expired, invalid: reload the token, retry
PATH = "/v3.0/user_actions/add"


class Outcome(enum.Enum):
    DELIVERED = "delivered"
    RETRY = "retry"
    RELOAD_TOKEN = "reload_token"
    PERMANENT = "permanent"


def classify(status: Optional[int], answer: Optional[dict]) -> Outcome:
    """SPEC §5: what to do with one HTTP answer (status None: timeout or connection error)."""
    if status is None or status == 429 or status >= 500:
        return Outcome.RETRY
    if status != 200 or not isinstance(answer, dict) or not isinstance(answer.get("code"), int):
        return Outcome.PERMANENT
    code = answer["code"]
    if code == 0:
        return Outcome.DELIVERED
    if code in RETRYABLE_CODES:
        return Outcome.RETRY
    if code in TOKEN_CODES:
        return Outcome.RELOAD_TOKEN
    return Outcome.PERMANENT


def action_of(report: dict) -> dict:
    """The API action of one conversion report: only the fields the API takes."""
    action = {"outer_action_id": report["outer_action_id"], "action_time": report["action_time"],
              "action_type": report["action_type"]}
    if report.get("user_id"):
        action["user_id"] = report["user_id"]
    if report.get("custom_action"):
        action["custom_action"] = report["custom_action"]
    if report.get("trace"):
        action["trace"] = report["trace"]
    if report.get("action_param"):
        action["action_param"] = report["action_param"]
    return action


@dataclass
class Batch:
    """One request: actions of one (account_id, user_action_set_id), within the limits."""
    account_id: int
    user_action_set_id: int
    reports: list[dict] = field(default_factory=list)
    actions: list[bytes] = field(default_factory=list)   # each action, orjson-encoded

    def body(self) -> bytes:
        head = b'{"account_id":%d,"user_action_set_id":%d,"actions":[' % (self.account_id, self.user_action_set_id)
        return head + b",".join(self.actions) + b"]}"

    def size_with(self, action: bytes) -> int:
        return len(self.body()) + len(action) + (1 if self.actions else 0)


def pack(reports: list[dict]) -> list[Batch]:
    """Group reports per (account, action set), in order, into requests of at most 50
    actions and 50 KB. A single action over 50 KB still gets a request of its own (the API
    rejects it, and it becomes a permanent failure rather than a stuck sink)."""
    open_batches: dict[tuple[int, int], Batch] = {}
    done: list[Batch] = []
    for report in reports:
        key = (report["account_id"], report["user_action_set_id"])
        action = orjson.dumps(action_of(report))
        batch = open_batches.get(key)
        if batch is not None and (len(batch.actions) >= MAX_ACTIONS or batch.size_with(action) > MAX_BODY_BYTES):
            done.append(batch)
            batch = None
        if batch is None:
            batch = open_batches[key] = Batch(*key)
        batch.reports.append(report)
        batch.actions.append(action)
    return done + list(open_batches.values())


class TokenSource:
    """The access token, from a file (re-read on reload, so a rotated token is picked up)
    or from a fixed value (`TAGSTREAM_ACCESS_TOKEN`)."""

    def __init__(self, value: str = "", path: str = ""):
        self.path = path
        self.fixed = value
        self.token = self._read()

    def _read(self) -> str:
        if self.path:
            with open(self.path, encoding="utf-8") as f:
                return f.read().strip()
        return self.fixed

    def reload(self) -> bool:
        """Read the token again; True if it changed."""
        fresh = self._read()
        changed = fresh != self.token
        self.token = fresh
        return changed

    def redact(self, text: str) -> str:
        return text.replace(self.token, "<token>") if self.token else text


class RateLimiter:
    """Token bucket: at most `per_minute` requests a minute, bursts up to a second's worth."""

    def __init__(self, per_minute: int):
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate)
        self.tokens = self.capacity
        self.updated = time.monotonic()
        self.lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self.lock:
            while True:
                now = time.monotonic()
                self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
                self.updated = now
                if self.tokens >= 1:
                    self.tokens -= 1
                    return
                await asyncio.sleep((1 - self.tokens) / self.rate)


class MarketingApiClient:
    def __init__(self, base_url: str, token: TokenSource, limiter: RateLimiter, timeout_s: float):
        self.url = base_url.rstrip("/") + PATH
        self.token = token
        self.limiter = limiter
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.session: Optional[aiohttp.ClientSession] = None

    async def __aenter__(self) -> "MarketingApiClient":
        self.session = aiohttp.ClientSession(timeout=self.timeout)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.close()

    async def post(self, body: bytes) -> tuple[Optional[int], Optional[dict], str]:
        """One request. Returns (HTTP status or None, parsed answer or None, a short
        description without the token)."""
        await self.limiter.acquire()
        params = {"access_token": self.token.token, "timestamp": str(int(time.time())),
                  "nonce": secrets.token_hex(16)}       # 32 hex characters, unique per request
        try:
            async with self.session.post(self.url, params=params, data=body,
                                         headers={"Content-Type": "application/json"}) as response:
                text = await response.text()
                try:
                    answer = orjson.loads(text)
                except orjson.JSONDecodeError:
                    answer = None
                return response.status, answer, self.token.redact(text[:500])
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            return None, None, self.token.redact(f"{type(exc).__name__}: {exc}"[:500])


def token_from_settings(settings) -> TokenSource:
    if settings.access_token_file:
        if not os.path.exists(settings.access_token_file):
            from streams.settings import ConfigError
            raise ConfigError(f"TAGSTREAM_ACCESS_TOKEN_FILE={settings.access_token_file!r}: no such file; "
                              f"write the Marketing API access token into it")
        return TokenSource(path=settings.access_token_file)
    return TokenSource(value=settings.access_token)
