"""The WeCom API client (streams/wecom/api.py) against the fake WeCom's API on a local port:
tokens cached and refreshed once, retries on busy and rate limits, permanent errors, paging.
No broker."""
import asyncio
import contextlib

import pytest

from streams.settings import Settings
from streams.wecom.api import WeComClient, WeComError, WeComUnavailable
from streams.wecom.corps import Corp
from streams.wecom.crypto import CallbackCrypto
from tests.fake_wecom.api import FakeWeComApi, SettableClock as Clock, Staff, api_base_of

CORP = "wwapitest00000001"


@contextlib.asynccontextmanager
async def fake_and_client(fake: FakeWeComApi, **client_args):
    async with api_base_of(fake) as base:
        settings = Settings.load({"wecom_api_base": base}, environ={})
        corps = {CORP: Corp(CORP, "wxapp", CallbackCrypto("t", "a" * 43), "the-secret")}
        async with WeComClient(settings, corps, backoff_base_s=0.001, backoff_cap_s=0.01, **client_args) as client:
            yield client


def world(page_size: int = 500, clock=None) -> tuple[FakeWeComApi, Staff]:
    fake = FakeWeComApi(page_size=page_size, **({"clock": clock} if clock else {}))
    fake.add_corp(CORP, "the-secret", {"etA": "核心", "etB": "已下单"})
    staff = Staff(fake, clock or (lambda: 1_790_000_000))
    for userid in ("u1", "u2", "u3"):
        staff.add_customer(CORP, "wmC1", userid, state="ad_7", unionid="oU-1")
    staff.tag(CORP, "wmC1", "u2", add=["etA"])
    return fake, staff


def test_a_token_is_fetched_once_and_reused():
    fake, _ = world()

    async def run():
        async with fake_and_client(fake) as client:
            for _ in range(5):
                await client.get_contact(CORP, "wmC1")
    asyncio.run(run())
    assert fake.calls_of("gettoken") == 1 and fake.calls_of("externalcontact/get", 0) == 5


def test_an_invalidated_token_is_refreshed_once_and_the_call_goes_through():
    fake, _ = world()

    async def run():
        async with fake_and_client(fake) as client:
            await client.get_contact(CORP, "wmC1")
            fake.invalidate_tokens(CORP)
            return await client.get_contact(CORP, "wmC1")
    contact = asyncio.run(run())
    assert contact["external_contact"]["external_userid"] == "wmC1"
    assert fake.calls_of("gettoken") == 2 and fake.calls_of("externalcontact/get", 40014) == 1


def test_an_expired_token_is_renewed_before_wecom_refuses_it():
    clock = Clock()
    fake, _ = world(clock=clock)

    async def run():
        async with fake_and_client(fake, wall_clock=clock) as client:
            await client.get_contact(CORP, "wmC1")
            clock.now += 7200 - 200                # inside the renewal margin
            await client.get_contact(CORP, "wmC1")
    asyncio.run(run())
    assert fake.calls_of("gettoken") == 2 and fake.calls_of("externalcontact/get", 42001) == 0


def test_busy_and_rate_limited_answers_are_retried():
    fake, _ = world()
    fake.busy_rate, fake.concurrency_rate = 0.3, 0.2

    async def run():
        async with fake_and_client(fake) as client:
            return [await client.get_contact(CORP, "wmC1") for _ in range(30)]
    assert len(asyncio.run(run())) == 30
    assert fake.calls_of("externalcontact/get", -1) > 0 and fake.calls_of("externalcontact/get", 45033) > 0
    assert fake.calls_of("externalcontact/get", 0) == 30


def test_a_frequency_limit_that_outlasts_the_budget_is_unavailable_not_an_error():
    fake, _ = world()

    async def run():
        async with fake_and_client(fake, retry_budget_s=0.3) as client:
            await client.get_contact(CORP, "wmC1")
            fake.frequency_limit(CORP, 60)
            await client.get_contact(CORP, "wmC1")
    with pytest.raises(WeComUnavailable):
        asyncio.run(run())
    assert fake.calls_of("externalcontact/get", 45009) >= 2


def test_a_permanent_errcode_is_raised_with_its_code():
    fake, _ = world()

    async def run():
        async with fake_and_client(fake) as client:
            await client.get_contact(CORP, "wm-nobody")
    with pytest.raises(WeComError) as error:
        asyncio.run(run())
    assert error.value.errcode == 84061 and "the-secret" not in str(error.value)


def test_follow_users_on_several_pages_are_merged():
    fake, _ = world(page_size=2)

    async def run():
        async with fake_and_client(fake) as client:
            return await client.get_contact(CORP, "wmC1")
    contact = asyncio.run(run())
    assert [f["userid"] for f in contact["follow_user"]] == ["u1", "u2", "u3"]
    assert fake.calls_of("externalcontact/get", 0) == 2
    tags = {f["userid"]: [t.get("tag_id") for t in f["tags"]] for f in contact["follow_user"]}
    assert tags["u2"] == ["etA", None]              # a personal tag has no id


def test_a_wrong_secret_is_a_permanent_error():
    fake, _ = world()
    fake.corps[CORP].secret = "rotated"

    async def run():
        async with fake_and_client(fake) as client:
            await client.get_contact(CORP, "wmC1")
    with pytest.raises(WeComError) as error:
        asyncio.run(run())
    assert error.value.errcode == 40001 and error.value.api == "gettoken"
