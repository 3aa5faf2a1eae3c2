"""Provider mode's tokens and secrets at rest (streams/wecom/provider.py, streams/wecom/api.py),
against the fake WeCom's provider side on a local port, under a clock the test moves. No
broker: the auth book here is a dict, as the replica of `wecom-auth` would fill it.

The lifecycle faults of issue 21: a ticket that arrives late, a suite token that expires
mid-run, and a permanent code that is refused."""
import asyncio
import contextlib

import pytest
from cryptography.fernet import Fernet

from streams.settings import ConfigError, Settings
from streams.wecom.api import WeComClient, WeComError, WeComUnavailable
from streams.wecom.corps import Suite
from streams.wecom.crypto import CallbackCrypto
from streams.wecom.provider import ACTIVE, INACTIVE, Authorisation, AuthBook, Vault, agent_id_of
from tests.fake_wecom.api import FakeWeComApi, SettableClock as Clock, Staff, api_base_of
from tests.fake_wecom.provider import FakeProvider

SUITE_ID, SUITE_SECRET = "wwsuitetest0001", "the-suite-secret"
CORP = "wwprovidedcorp01"


def world():
    clock = Clock()
    fake = FakeWeComApi(clock=clock)
    provider = FakeProvider(fake, SUITE_ID, SUITE_SECRET)
    book = AuthBook(Vault(Fernet.generate_key()))
    return clock, fake, provider, book


@contextlib.asynccontextmanager
async def client_of(fake: FakeWeComApi, book: AuthBook, clock: Clock, refused: list):
    async with api_base_of(fake) as base:
        settings = Settings.load({"wecom_api_base": base}, environ={})
        suite = Suite(SUITE_ID, "wxsuite", CallbackCrypto("t", "a" * 43), SUITE_SECRET)
        async with WeComClient(settings, {}, suite=suite, auth=book, on_code_refused=refused.append,
                               retry_budget_s=0.5, backoff_base_s=0.001, backoff_cap_s=0.01,
                               wall_clock=clock) as client:
            yield client


async def authorise(client: WeComClient, provider: FakeProvider, book: AuthBook, clock: Clock) -> None:
    """What the enrichment does with create_auth: the permanent code, kept in the book."""
    command = provider.authorise(CORP, {"etA": "核心"})
    answer = await client.get_permanent_code(command["AuthCode"])
    book.record(Authorisation(answer["auth_corp_info"]["corpid"], ACTIVE, answer["permanent_code"],
                              agent_id_of(answer), int(clock() * 1000)))


def test_a_ticket_that_arrives_late_holds_calls_back_until_it_comes():
    clock, fake, provider, book = world()
    refused = []

    async def run():
        async with client_of(fake, book, clock, refused) as client:
            command = provider.authorise(CORP, {"etA": "核心"})
            with pytest.raises(WeComUnavailable, match="get_suite_token for the suite"):
                await client.get_permanent_code(command["AuthCode"])        # no ticket yet: wait, not fail
            ticket = provider.push_ticket()
            book.record_ticket(ticket["SuiteTicket"], ticket["TimeStamp"] * 1000)
            answer = await client.get_permanent_code(command["AuthCode"])
            assert answer["auth_corp_info"]["corpid"] == CORP and answer["permanent_code"]
            with pytest.raises(WeComError) as used:                         # the code is single-use
                await client.get_permanent_code(command["AuthCode"])
            assert used.value.errcode == 40029
    asyncio.run(run())
    assert fake.calls_of("service/get_suite_token", 0) == 1


def test_a_stale_ticket_is_retried_until_a_fresh_one_is_pushed():
    clock, fake, provider, book = world()

    async def run():
        async with client_of(fake, book, clock, []) as client:
            old = provider.push_ticket()
            book.record_ticket(old["SuiteTicket"], old["TimeStamp"] * 1000)
            clock.now += 1801                                                # the ticket expired
            command = provider.authorise(CORP, {"etA": "核心"})
            with pytest.raises(WeComUnavailable):
                await client.get_permanent_code(command["AuthCode"])
            assert fake.calls_of("service/get_suite_token", 40085) >= 1
            new = provider.push_ticket()
            assert book.record_ticket(new["SuiteTicket"], new["TimeStamp"] * 1000) is not None
            assert book.record_ticket(old["SuiteTicket"], old["TimeStamp"] * 1000) is None   # a late retry of the old push
            assert (await client.get_permanent_code(command["AuthCode"]))["permanent_code"]
    asyncio.run(run())


def test_a_suite_token_that_expires_mid_run_is_fetched_again_and_the_calls_go_on():
    clock, fake, provider, book = world()
    staff = Staff(fake, clock)

    async def run():
        async with client_of(fake, book, clock, []) as client:
            ticket = provider.push_ticket()
            book.record_ticket(ticket["SuiteTicket"], ticket["TimeStamp"] * 1000)
            await authorise(client, provider, book, clock)
            staff.add_customer(CORP, "wmP1", "u1", state="ad_1")
            assert (await client.get_contact(CORP, "wmP1"))["external_contact"]["external_userid"] == "wmP1"
            provider.expire_suite_tokens()           # WeCom drops the suite token early...
            fake.invalidate_tokens(CORP)              # ...and the corp token with it
            assert (await client.get_contact(CORP, "wmP1"))["external_contact"]["external_userid"] == "wmP1"
            clock.now += 7200                         # and both expire on the clock, while
            ticket = provider.push_ticket()           # WeCom went on pushing tickets
            book.record_ticket(ticket["SuiteTicket"], ticket["TimeStamp"] * 1000)
            assert (await client.get_contact(CORP, "wmP1"))["external_contact"]["external_userid"] == "wmP1"
    asyncio.run(run())
    assert fake.calls_of("service/get_corp_token", 42009) == 1               # refused once, then a fresh suite token
    assert fake.calls_of("service/get_suite_token", 0) == 3
    assert fake.calls_of("externalcontact/get", 40014) == 1


def test_a_refused_permanent_code_marks_the_corp_inactive_and_is_not_retried():
    clock, fake, provider, book = world()
    staff = Staff(fake, clock)
    refused = []

    async def run():
        async with client_of(fake, book, clock, refused) as client:
            ticket = provider.push_ticket()
            book.record_ticket(ticket["SuiteTicket"], ticket["TimeStamp"] * 1000)
            await authorise(client, provider, book, clock)
            staff.add_customer(CORP, "wmP1", "u1")
            await client.get_contact(CORP, "wmP1")
            provider.cancel(CORP)                     # the corp leaves; its code is dead
            with pytest.raises(WeComError) as error:
                await client.get_contact(CORP, "wmP1")
            assert error.value.errcode == 40084
            assert refused == [CORP]
            old = book.get(CORP)
            book.record(Authorisation(CORP, INACTIVE, old.permanent_code, old.agent_id, old.at))
            calls = fake.calls_of("service/get_corp_token")
            with pytest.raises(WeComError) as again:  # inactive: refused here, WeCom is not asked
                await client.get_contact(CORP, "wmP1")
            assert again.value.errcode == 40084 and fake.calls_of("service/get_corp_token") == calls
    asyncio.run(run())


def test_secrets_are_sealed_at_rest_and_never_in_a_repr():
    vault = Vault(Fernet.generate_key())
    book = AuthBook(vault)
    key, value = book.record(Authorisation(CORP, ACTIVE, "PERMANENT-CODE-123", "1000002", 1))
    _, ticket_value = book.record_ticket("TICKET-XYZ", 5)
    assert key == f"corp:{CORP}"
    assert b"PERMANENT-CODE-123" not in value and b"TICKET-XYZ" not in ticket_value
    assert book.get(CORP).permanent_code == "PERMANENT-CODE-123" and book.ticket() == ("TICKET-XYZ", 5)
    assert "PERMANENT-CODE-123" not in repr(book.get(CORP)) and "key" not in repr(vault).replace("<key hidden>", "")
    stranger = AuthBook(Vault(Fernet.generate_key()), book.values)
    with pytest.raises(ConfigError, match="does not open with this vault key"):
        stranger.get(CORP)


def test_a_missing_or_malformed_vault_key_is_a_one_line_error():
    settings = Settings.load({}, environ={})
    with pytest.raises(ConfigError, match="TAGSTREAM_WECOM_VAULT_KEY_FILE"):
        Vault.from_settings(settings, environ={})
    with pytest.raises(ConfigError, match="not a Fernet key"):
        Vault.from_settings(settings, environ={"TAGSTREAM_WECOM_VAULT_KEY": "too-short"})
    assert Vault.from_settings(settings, environ={"TAGSTREAM_WECOM_VAULT_KEY": Fernet.generate_key().decode()})


def test_a_cancelled_corp_is_remembered_only_by_the_hash_of_its_id():
    book = AuthBook(Vault(Fernet.generate_key()))
    book.record(Authorisation(CORP, ACTIVE, "PERMANENT-CODE-123", "1000002", 1))
    records = book.record_cancel(CORP, 2)
    assert records[0] == (f"corp:{CORP}", None)
    assert book.status(CORP) == "cancelled" and book.get(CORP) is None and book.corp_ids() == []
    assert not [k for k in book.values if CORP in k] and not [v for v in book.values.values() if CORP.encode() in v]
    assert book.record_uncancel(CORP) and book.status(CORP) is None and book.record_uncancel(CORP) == []
