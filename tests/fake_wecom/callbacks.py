"""The fake WeCom's callback side (WECOM.md §1, §7): it signs and encrypts a callback the way
WeCom does and POSTs it to the ingest, and retries the way WeCom does when the answer is late
or not 200: up to `retries` more times, each identical or re-signed with a fresh nonce and
timestamp. It can also lose a callback for good (`drop_rate`), as WeCom does once its
retries are exhausted."""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Optional
from xml.sax.saxutils import escape

import aiohttp

from streams.wecom.crypto import CallbackCrypto


def message_xml(fields: dict) -> bytes:
    """A callback message as WeCom writes it: flat, every text in CDATA except numbers."""
    parts = []
    for name, value in fields.items():
        text = str(value)
        parts.append(f"<{name}>{text}</{name}>" if text.isdigit() else f"<{name}><![CDATA[{text}]]></{name}>")
    return ("<xml>" + "".join(parts) + "</xml>").encode()


def envelope_xml(to_user_name: str, encrypted: str, agent_id: str = "1000002") -> bytes:
    return (f"<xml><ToUserName><![CDATA[{escape(to_user_name)}]]></ToUserName>"
            f"<Encrypt><![CDATA[{encrypted}]]></Encrypt><AgentID><![CDATA[{agent_id}]]></AgentID></xml>").encode()


@dataclass
class SignedCallback:
    """One delivery attempt: the query string and the body."""
    params: dict
    body: bytes


def sign_callback(crypto: CallbackCrypto, corp_id: str, fields: dict, *, timestamp: Optional[int] = None,
                  nonce: Optional[str] = None, receive_id: Optional[str] = None) -> SignedCallback:
    timestamp = str(int(time.time()) if timestamp is None else timestamp)
    nonce = nonce or str(random.randrange(10**8, 10**9))
    encrypted = crypto.encrypt(message_xml(fields), corp_id if receive_id is None else receive_id)
    return SignedCallback({"msg_signature": crypto.sign(timestamp, nonce, encrypted), "timestamp": timestamp,
                           "nonce": nonce}, envelope_xml(corp_id, encrypted))


@dataclass
class DeliveryStats:
    sent: int = 0             # callbacks handed to `send`
    attempts: int = 0         # POSTs made
    retries_identical: int = 0
    retries_resigned: int = 0
    dropped: int = 0          # lost for good (drop_rate, or every retry failed)
    answered: int = 0         # got a 200 at some attempt
    statuses: dict = field(default_factory=dict)


class CallbackSender:
    """WeCom's side of the callbacks of several corps to one ingest."""

    def __init__(self, base_url: str, cryptos: dict[str, CallbackCrypto], *, timeout_s: float = 5.0,
                 retries: int = 3, retry_intervals_s: tuple = (0.2, 0.5, 1.0), resign_share: float = 0.5,
                 drop_rate: float = 0.0, seed: int = 1, suites: frozenset = frozenset()):
        self.base_url = base_url.rstrip("/")
        self.cryptos = cryptos
        self.suites = suites              # ids among `cryptos` that are suites: their command URL
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.retries = retries
        self.retry_intervals_s = retry_intervals_s
        self.resign_share = resign_share
        self.drop_rate = drop_rate
        self.random = random.Random(seed)
        self.stats = DeliveryStats()
        self.session: Optional[aiohttp.ClientSession] = None

    async def __aenter__(self) -> "CallbackSender":
        self.session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.close()

    def url(self, corp_id: str) -> str:
        if corp_id in self.suites:
            return f"{self.base_url}/wecom/suite/{corp_id}"
        return f"{self.base_url}/wecom/{corp_id}/callback"

    async def post(self, corp_id: str, signed: SignedCallback) -> int:
        """One attempt; the HTTP status, or 0 for no answer in time."""
        self.stats.attempts += 1
        try:
            async with self.session.post(self.url(corp_id), params=signed.params, data=signed.body,
                                         timeout=self.timeout) as response:
                await response.read()
                status = response.status
        except (aiohttp.ClientError, asyncio.TimeoutError):
            status = 0
        self.stats.statuses[status] = self.stats.statuses.get(status, 0) + 1
        return status

    async def send(self, corp_id: str, fields: dict) -> bool:
        """Deliver one callback as WeCom would; True if the ingest answered 200 at some attempt."""
        self.stats.sent += 1
        if self.drop_rate and self.random.random() < self.drop_rate:
            self.stats.dropped += 1
            return False
        crypto = self.cryptos[corp_id]
        signed = sign_callback(crypto, corp_id, fields)
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.retry_intervals_s[min(attempt - 1, len(self.retry_intervals_s) - 1)])
                if self.random.random() < self.resign_share:
                    signed = sign_callback(crypto, corp_id, fields)
                    self.stats.retries_resigned += 1
                else:
                    self.stats.retries_identical += 1
            if await self.post(corp_id, signed) == 200:
                self.stats.answered += 1
                return True
        self.stats.dropped += 1
        return False

    async def send_twice(self, corp_id: str, fields: dict) -> None:
        """A callback answered but delivered again anyway (WeCom timed out on its side just as
        the answer came): once identical, once re-signed."""
        signed = sign_callback(self.cryptos[corp_id], corp_id, fields)
        await self.post(corp_id, signed)
        await self.post(corp_id, signed)
        await self.post(corp_id, sign_callback(self.cryptos[corp_id], corp_id, fields))
