"""The fake WeCom's REST API (WECOM.md §4, §7): what the enrichment, `tagstream tag` and
`tagstream reconcile` call, with WeCom's errcodes on demand.

State: per corp, a tag catalogue and customers, each followed by staff members with their
corp tags. The "staff" side (`Staff`) changes that state the way the sidebar does and returns
the callback WeCom would send; changes made through `mark_tag` send none (WeCom: "通过API进行
的操作不会产生回调").

Failure modes, each controllable from a test: `gettoken` tokens expire (`token_ttl_s`, on a
settable clock) or are invalidated early (40014 on the next call, then 42001 once expired);
-1 (busy) at `busy_rate`; 45009 (frequency limit) for a corp during a burst; 45033
(concurrency) at `concurrency_rate`; 84061 for an unknown customer; call counts by API and
errcode in `calls`.
"""
from __future__ import annotations

import contextlib
import random
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

from aiohttp import web

CORP_TAG, PERSONAL_TAG, RULE_TAG = 1, 2, 3


class SettableClock:
    """A clock a test moves (`now`), for the fake and the client alike."""

    def __init__(self, now: float = 1_790_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Tag:
    tag_id: str
    name: str
    group_id: str
    group_name: str
    deleted: bool = False


@dataclass
class Follow:
    userid: str
    createtime: int                 # seconds
    state: str = ""
    tags: set = field(default_factory=set)       # corp tag ids


@dataclass
class Customer:
    external_userid: str
    name: str
    unionid: Optional[str]
    follows: dict = field(default_factory=dict)  # userid -> Follow


@dataclass
class FakeCorp:
    corp_id: str
    secret: str
    catalogue: dict = field(default_factory=dict)    # tag_id -> Tag
    customers: dict = field(default_factory=dict)    # external_userid -> Customer
    staff: set = field(default_factory=set)          # staff members with the contact permission


class FakeWeComApi:
    """The API's state, its faults, and the aiohttp routes under /cgi-bin/. Tests change the
    state from another thread than the server's, so changes replace sets and dicts instead of
    mutating them (a reader never iterates one that changes)."""

    def __init__(self, *, clock: Callable[[], float] = time.time, seed: int = 1, page_size: int = 500):
        self.clock = clock
        self.random = random.Random(seed)
        self.page_size = page_size                  # follow users per externalcontact/get page
        self.corps: dict[str, FakeCorp] = {}
        self.tokens: dict[str, tuple[str, float, bool]] = {}   # token -> (corp, expires_at, invalidated)
        self.token_ttl_s = 7200
        self.busy_rate = 0.0
        self.concurrency_rate = 0.0
        self.freq_limited_until: dict[str, float] = {}         # corp -> end of a 45009 burst
        self.calls: Counter = Counter()                        # (api, errcode) -> calls
        self.marked: list = []                                 # mark_tag requests accepted
        self.extra_routes: list = []                           # the provider's (tests/fake_wecom/provider.py)

    # -- set-up and control ------------------------------------------------------------------
    def add_corp(self, corp_id: str, secret: str, tags: dict[str, str]) -> FakeCorp:
        """A corp with its contact secret and tags {tag_id: name} in one group."""
        corp = self.corps[corp_id] = FakeCorp(corp_id, secret)
        for tag_id, name in tags.items():
            corp.catalogue[tag_id] = Tag(tag_id, name, "grp-" + corp_id[-4:], "客户等级")
        return corp

    def invalidate_tokens(self, corp_id: Optional[str] = None) -> None:
        """Tokens stop working before their expiry (WeCom may do this at any time)."""
        for token, (corp, expires, _) in list(self.tokens.items()):
            if corp_id is None or corp == corp_id:
                self.tokens[token] = (corp, expires, True)

    def frequency_limit(self, corp_id: str, seconds: float) -> None:
        """45009 for every call of the corp for `seconds` (WeCom blocks for 60 s)."""
        self.freq_limited_until[corp_id] = max(self.freq_limited_until.get(corp_id, 0), self.clock() + seconds)

    def calls_of(self, api: str, errcode: Optional[int] = None) -> int:
        return sum(n for (name, code), n in self.calls.items() if name == api and (errcode is None or code == errcode))

    # -- the routes ------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes([
            web.get("/cgi-bin/gettoken", self.gettoken),
            web.get("/cgi-bin/externalcontact/get", self.get_contact),
            web.get("/cgi-bin/externalcontact/get_follow_user_list", self.follow_user_list),
            web.post("/cgi-bin/externalcontact/batch/get_by_user", self.batch_get_by_user),
            web.post("/cgi-bin/externalcontact/get_corp_tag_list", self.get_corp_tag_list),
            web.post("/cgi-bin/externalcontact/mark_tag", self.mark_tag),
            *self.extra_routes,
        ])
        return app

    def _answer(self, api: str, errcode: int, **body) -> web.Response:
        self.calls[(api, errcode)] += 1
        messages = {0: "ok", -1: "system busy", 40001: "invalid credential", 40014: "invalid access_token",
                    42001: "access_token expired", 45009: "api freq out of limit", 45033: "api concurrent out of limit",
                    84061: "not external contact", 40003: "invalid userid", 41001: "access_token missing",
                    40029: "invalid code", 40082: "invalid suite_token", 42009: "suite_access_token expired",
                    40084: "invalid permanent_code", 40085: "invalid suite_ticket"}
        return web.json_response({"errcode": errcode, "errmsg": messages.get(errcode, "error"), **body})

    def _authorise(self, api: str, request: web.Request) -> tuple[Optional[FakeCorp], Optional[web.Response]]:
        token = request.query.get("access_token", "")
        if not token:
            return None, self._answer(api, 41001)
        if token not in self.tokens:
            return None, self._answer(api, 40014)
        corp_id, expires, invalidated = self.tokens[token]
        if self.clock() >= expires:
            return None, self._answer(api, 42001)
        if invalidated:
            return None, self._answer(api, 40014)
        if self.clock() < self.freq_limited_until.get(corp_id, 0):
            return None, self._answer(api, 45009)
        if self.busy_rate and self.random.random() < self.busy_rate:
            return None, self._answer(api, -1)
        if self.concurrency_rate and self.random.random() < self.concurrency_rate:
            return None, self._answer(api, 45033)
        return self.corps[corp_id], None

    async def gettoken(self, request: web.Request) -> web.Response:
        corp = self.corps.get(request.query.get("corpid", ""))
        if corp is None or request.query.get("corpsecret") != corp.secret:
            return self._answer("gettoken", 40001)
        token = secrets.token_urlsafe(24)
        self.tokens[token] = (corp.corp_id, self.clock() + self.token_ttl_s, False)
        return self._answer("gettoken", 0, access_token=token, expires_in=self.token_ttl_s)

    def _tags_of(self, corp: FakeCorp, follow: Follow) -> list[dict]:
        tags = [{"group_name": corp.catalogue[t].group_name, "tag_name": corp.catalogue[t].name, "type": CORP_TAG,
                 "tag_id": t} for t in sorted(follow.tags) if t in corp.catalogue]
        return tags + [{"group_name": "", "tag_name": "个人标签", "type": PERSONAL_TAG}]   # no tag_id: ignored

    async def get_contact(self, request: web.Request) -> web.Response:
        corp, refused = self._authorise("externalcontact/get", request)
        if refused:
            return refused
        customer = corp.customers.get(request.query.get("external_userid", ""))
        if customer is None:
            return self._answer("externalcontact/get", 84061)
        follows = [customer.follows[u] for u in sorted(customer.follows)]
        start = int(request.query.get("cursor") or 0)
        page = follows[start:start + self.page_size]
        next_cursor = str(start + self.page_size) if start + self.page_size < len(follows) else ""
        contact = {"external_userid": customer.external_userid, "name": customer.name, "type": 1}
        if customer.unionid:
            contact["unionid"] = customer.unionid
        return self._answer("externalcontact/get", 0, external_contact=contact, next_cursor=next_cursor,
                            follow_user=[{"userid": f.userid, "remark": "", "createtime": f.createtime,
                                          "tags": self._tags_of(corp, f), "state": f.state, "add_way": 1,
                                          "oper_userid": f.userid} for f in page])

    async def follow_user_list(self, request: web.Request) -> web.Response:
        corp, refused = self._authorise("externalcontact/get_follow_user_list", request)
        if refused:
            return refused
        staff = sorted({u for c in corp.customers.values() for u in c.follows} | corp.staff)
        return self._answer("externalcontact/get_follow_user_list", 0, follow_user=staff)

    async def batch_get_by_user(self, request: web.Request) -> web.Response:
        corp, refused = self._authorise("externalcontact/batch/get_by_user", request)
        if refused:
            return refused
        body = await request.json()
        users, limit = set(body.get("userid_list") or []), min(int(body.get("limit") or 50), 100)
        rows = [(u, c) for c in sorted(corp.customers.values(), key=lambda c: c.external_userid)
                for u in sorted(c.follows) if u in users]
        start = int(body.get("cursor") or 0)
        page = rows[start:start + limit]
        next_cursor = str(start + limit) if start + limit < len(rows) else ""
        return self._answer("externalcontact/batch/get_by_user", 0, next_cursor=next_cursor, external_contact_list=[
            {"external_contact": {"external_userid": c.external_userid, "name": c.name, "type": 1,
                                  **({"unionid": c.unionid} if c.unionid else {})},
             "follow_info": {"userid": u, "createtime": c.follows[u].createtime, "state": c.follows[u].state,
                             "tag_id": sorted(t for t in c.follows[u].tags if t in corp.catalogue)}}
            for u, c in page])

    async def get_corp_tag_list(self, request: web.Request) -> web.Response:
        corp, refused = self._authorise("externalcontact/get_corp_tag_list", request)
        if refused:
            return refused
        groups: dict[str, dict] = {}
        for tag in corp.catalogue.values():
            group = groups.setdefault(tag.group_id, {"group_id": tag.group_id, "group_name": tag.group_name,
                                                     "create_time": 1700000000, "order": 0, "tag": []})
            group["tag"].append({"id": tag.tag_id, "name": tag.name, "create_time": 1700000000, "order": 0,
                                 **({"deleted": True} if tag.deleted else {})})
        return self._answer("externalcontact/get_corp_tag_list", 0, tag_group=list(groups.values()))

    async def mark_tag(self, request: web.Request) -> web.Response:
        corp, refused = self._authorise("externalcontact/mark_tag", request)
        if refused:
            return refused
        body = await request.json()
        customer = corp.customers.get(body.get("external_userid", ""))
        if customer is None:
            return self._answer("externalcontact/mark_tag", 84061)
        follow = customer.follows.get(body.get("userid", ""))
        if follow is None:
            return self._answer("externalcontact/mark_tag", 40003)
        follow.tags = (follow.tags | set(body.get("add_tag") or [])) - set(body.get("remove_tag") or [])
        self.marked.append(body)
        return self._answer("externalcontact/mark_tag", 0)


class Staff:
    """Staff members working the sidebar: each change updates the fake's state and returns the
    callback message WeCom would send for it (fields for `CallbackSender.send`)."""

    def __init__(self, api: FakeWeComApi, clock: Callable[[], float] = time.time):
        self.api = api
        self.clock = clock

    def _callback(self, corp_id: str, change_type: str, userid: str, customer: str, **extra) -> dict:
        return {"ToUserName": corp_id, "FromUserName": "sys", "CreateTime": int(self.clock()), "MsgType": "event",
                "Event": "change_external_contact", "ChangeType": change_type, "UserID": userid,
                "ExternalUserID": customer, **extra}

    def add_customer(self, corp_id: str, customer: str, userid: str, *, state: str = "",
                     unionid: Optional[str] = None, half: bool = False) -> dict:
        """The customer adds the staff member (add_external_contact), or, with `half`, the
        customer added the staff member who has not yet accepted (add_half_external_contact)."""
        corp = self.api.corps[corp_id]
        record = corp.customers.get(customer) or Customer(customer, "客户" + customer[-4:], unionid)
        record.follows = {**record.follows, userid: Follow(userid, int(self.clock()), state)}
        corp.customers = {**corp.customers, customer: record}
        change_type = "add_half_external_contact" if half else "add_external_contact"
        return self._callback(corp_id, change_type, userid, customer,
                              **({"State": state} if state else {}), WelcomeCode="WELCOME")

    def tag(self, corp_id: str, customer: str, userid: str, add=(), remove=()) -> dict:
        follow = self.api.corps[corp_id].customers[customer].follows[userid]
        follow.tags = (follow.tags | set(add)) - set(remove)
        return self._callback(corp_id, "edit_external_contact", userid, customer)

    def delete_follow(self, corp_id: str, customer: str, userid: str, *, by_customer: bool = False,
                      transferred: bool = False) -> dict:
        """The staff member deletes the customer (del_external_contact; with `transferred`, the
        customer was moved to another staff member: Source=DELETE_BY_TRANSFER), or, with
        `by_customer`, the customer deletes the staff member (del_follow_user)."""
        record = self.api.corps[corp_id].customers[customer]
        record.follows = {u: f for u, f in record.follows.items() if u != userid}
        if by_customer:
            return self._callback(corp_id, "del_follow_user", userid, customer)
        return self._callback(corp_id, "del_external_contact", userid, customer,
                              **({"Source": "DELETE_BY_TRANSFER"} if transferred else {}))

    def transfer_fail(self, corp_id: str, customer: str, userid: str, reason: str = "customer_refused") -> dict:
        """A transfer of the customer to `userid` failed (transfer_fail): nothing changed."""
        return self._callback(corp_id, "transfer_fail", userid, customer, FailReason=reason)

    def rename_tag(self, corp_id: str, tag_id: str, name: str) -> dict:
        """An admin renames a corp tag (change_external_tag, ChangeType update)."""
        corp = self.api.corps[corp_id]
        old = corp.catalogue[tag_id]
        corp.catalogue = {**corp.catalogue, tag_id: Tag(tag_id, name, old.group_id, old.group_name)}
        return {"ToUserName": corp_id, "FromUserName": "sys", "CreateTime": int(self.clock()), "MsgType": "event",
                "Event": "change_external_tag", "Id": tag_id, "TagType": "tag", "ChangeType": "update"}

    def delete_tag(self, corp_id: str, tag_id: str) -> dict:
        """An admin deletes a corp tag (change_external_tag, ChangeType delete): the catalogue
        lists it as deleted from then on."""
        corp = self.api.corps[corp_id]
        old = corp.catalogue[tag_id]
        corp.catalogue = {**corp.catalogue, tag_id: Tag(tag_id, old.name, old.group_id, old.group_name, deleted=True)}
        return {"ToUserName": corp_id, "FromUserName": "sys", "CreateTime": int(self.clock()), "MsgType": "event",
                "Event": "change_external_tag", "Id": tag_id, "TagType": "tag", "ChangeType": "delete"}


@contextlib.asynccontextmanager
async def api_base_of(fake: FakeWeComApi):
    """The fake's API on a free local port, for in-process tests: its base URL."""
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/cgi-bin/"
    finally:
        await runner.cleanup()
