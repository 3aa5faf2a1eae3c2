"""Service-provider mode (SPEC §7, WECOM.md §5): one suite (第三方应用), authorised by many corps.

An advertiser scans the provider's QR code and authorises the suite for their corp. WeCom
then talks to the provider on the suite's *command* URL (`tagstream ingest`'s
`/wecom/suite/{suite_id}`), signed with the suite's token, encrypted with its
EncodingAESKey, and with the suite id as the receive id:

| InfoType | what tagstream does |
|---|---|
| `suite_ticket` (every 10 min, valid 30) | keeps the newest, sealed, in `wecom-auth` |
| `create_auth` (a single-use AuthCode) | `get_permanent_code`; the corp becomes active |
| `change_auth` | `get_auth_info`: the corp's agent id is brought up to date |
| `cancel_auth` | the corp becomes cancelled: its later callbacks are refused and counted |
| `change_external_contact`, `change_external_tag` (with `AuthCorpId`) | as a self-built app's |

The ingest writes each command to `wecom-callbacks`, as it does an event, and answers
`success` (WeCom waits 1 s for these); the enrichment acts on it. Suite-level commands
(`suite_ticket`, `create_auth`) are keyed by the suite id, so they are handled in order on
one partition; a corp's commands are keyed by its id.

**State.** The compacted topic `wecom-auth`, written only by the enrichment:

    suite_ticket      -> {"ticket": <sealed>, "at": epoch ms of the ticket}
    corp:<corp_id>    -> {"corp_id", "status", "permanent_code": <sealed> or null, "agent_id", "at",
                          "code_hash": SHA-256 of the spent auth code (a retried create_auth)}
    cancelled:<SHA-256 of the corp id> -> {"at": epoch ms of the cancel_auth}

`status` is `active` or `inactive` (WeCom refused the permanent code: 40084; not retried
until the corp authorises again). A corp that cancels loses its `corp:` record (a
tombstone) and is remembered only by the hash of its id, which is enough to refuse its
later callbacks and to find its keys, and holds nothing of the corp in clear. Every process that needs it follows the topic
(`AuthBook` over a `CompactedReplica`), so every replica shares the authorisations and a
restart keeps them.

**Secrets at rest.** The ingest seals a command's ticket and auth code (`seal_command`)
before it writes the command to `wecom-callbacks`. The ticket and the permanent codes are sealed with Fernet
(`cryptography`: AES-128-CBC and HMAC-SHA256) under the vault key from
`wecom_vault_key_file` or `TAGSTREAM_WECOM_VAULT_KEY`. Neither a sealed nor an open secret
is ever logged, counted or dead-lettered; `Authorisation`'s repr leaves the code out.

**The window the protocol leaves open.** The AuthCode is single-use: once
`get_permanent_code` has answered, the permanent code exists only in this process's memory
until `wecom-auth` has it. The enrichment writes it at once (acks=all, before anything
else of its batch), and counts the time from the answer to the broker's acknowledgement in
`tagstream_wecom_permanent_code_unsaved_seconds`. A crash inside that window loses the
authorisation; the corp's admin must authorise again (WeCom offers no way to fetch a
permanent code twice).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping, MutableMapping, Optional

import orjson
from cryptography.fernet import Fernet, InvalidToken

from streams.core.erasure import corp_hash
from streams.settings import ConfigError, Settings, read_secret_file

TICKET_KEY = "suite_ticket"
CORP_PREFIX = "corp:"
CANCELLED_PREFIX = "cancelled:"
ACTIVE, INACTIVE, CANCELLED = "active", "inactive", "cancelled"
#: the commands of a suite, as opposed to a corp's contact and tag events
COMMANDS = frozenset({"suite_ticket", "create_auth", "change_auth", "cancel_auth"})


#: the fields of a command that are credentials, sealed on `wecom-callbacks`
SECRET_FIELDS = ("SuiteTicket", "AuthCode")


class Vault:
    """Seals secrets for `wecom-auth` (Fernet). The key is a secret like any other: it comes
    from a file or the environment and is never printed."""

    def __init__(self, key: bytes):
        try:
            self.fernet = Fernet(key)
        except (ValueError, TypeError):
            raise ConfigError("the WeCom vault key is not a Fernet key (32 url-safe base64 bytes); make one with "
                              "`python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'`"
                              ) from None

    def __repr__(self) -> str:
        return "Vault(<key hidden>)"

    @classmethod
    def from_settings(cls, settings: Settings, environ: Optional[Mapping[str, str]] = None) -> "Vault":
        environ = os.environ if environ is None else environ
        path = settings.wecom_vault_key_file
        if path:
            key = read_secret_file("TAGSTREAM_WECOM_VAULT_KEY_FILE", path, "a Fernet key")
        else:
            key = environ.get("TAGSTREAM_WECOM_VAULT_KEY", "")
        if not key:
            raise ConfigError("provider mode seals permanent codes at rest: set TAGSTREAM_WECOM_VAULT_KEY_FILE "
                              "to a file holding a Fernet key (or TAGSTREAM_WECOM_VAULT_KEY)")
        return cls(key.encode())

    def seal(self, secret: str) -> str:
        return self.fernet.encrypt(secret.encode()).decode()

    def open(self, sealed: str) -> str:
        try:
            return self.fernet.decrypt(sealed.encode()).decode()
        except InvalidToken:
            raise ConfigError("a secret in wecom-auth does not open with this vault key: every ingest and "
                              "enrichment must use the key that sealed it (TAGSTREAM_WECOM_VAULT_KEY_FILE)") from None


@dataclass(frozen=True)
class Authorisation:
    """One corp's authorisation of the suite."""
    corp_id: str
    status: str
    permanent_code: Optional[str] = field(repr=False)
    agent_id: str = ""
    at: int = 0                 # epoch ms of the last change


class AuthBook:
    """The state of `wecom-auth`, read from `values` (a replica's key -> value bytes) and
    opened with the vault on demand. The enrichment also writes through it (`record_*`
    return the record and apply it here at once, before the replica reads it back)."""

    def __init__(self, vault: Vault, values: Optional[MutableMapping[str, bytes]] = None):
        self.vault = vault
        self.values: MutableMapping[str, bytes] = {} if values is None else values

    # -- reading ------------------------------------------------------------------------------
    def ticket(self) -> Optional[tuple[str, int]]:
        """(the newest suite ticket, its epoch ms), or None before the first."""
        value = self.values.get(TICKET_KEY)
        if value is None:
            return None
        record = orjson.loads(value)
        return self.vault.open(record["ticket"]), int(record["at"])

    def get(self, corp_id: str) -> Optional[Authorisation]:
        value = self.values.get(CORP_PREFIX + corp_id)
        if value is None:
            return None
        record = orjson.loads(value)
        sealed = record.get("permanent_code")
        return Authorisation(record["corp_id"], record["status"], self.vault.open(sealed) if sealed else None,
                             record.get("agent_id") or "", int(record.get("at") or 0))

    def status(self, corp_id: str) -> Optional[str]:
        """`active`, `inactive`, `cancelled`, or None for a corp that never authorised."""
        value = self.values.get(CORP_PREFIX + corp_id)
        if value is not None:
            return orjson.loads(value)["status"]
        return CANCELLED if CANCELLED_PREFIX + corp_hash(corp_id) in self.values else None

    def corp_ids(self, status: Optional[str] = None) -> list[str]:
        """The corps with a `corp:` record (a cancelled corp has none)."""
        ids = [key[len(CORP_PREFIX):] for key in self.values if key.startswith(CORP_PREFIX)]
        return sorted(i for i in ids if status is None or self.status(i) == status)

    def cancelled_hashes(self) -> frozenset:
        return frozenset(key[len(CANCELLED_PREFIX):] for key in self.values if key.startswith(CANCELLED_PREFIX))

    # -- writing ------------------------------------------------------------------------------
    def record_ticket(self, ticket: str, at_ms: int) -> Optional[tuple[str, bytes]]:
        """The record keeping `ticket`, or None if a newer one is kept already (WeCom pushes
        every 10 minutes, and a retried push can arrive after the next one)."""
        current = self.ticket()
        if current is not None and current[1] > at_ms:
            return None
        value = orjson.dumps({"ticket": self.vault.seal(ticket), "at": at_ms})
        self.values[TICKET_KEY] = value
        return TICKET_KEY, value

    def code_hash(self, corp_id: str) -> Optional[str]:
        """The SHA-256 of the auth code the corp's permanent code was fetched with: a retried
        `create_auth` is recognised by it (the code is single-use and spent by then)."""
        value = self.values.get(CORP_PREFIX + corp_id)
        return orjson.loads(value).get("code_hash") if value is not None else None

    def record_cancel(self, corp_id: str, at_ms: int) -> list[tuple[str, Optional[bytes]]]:
        """The records of a cancel: the corp's record deleted, the hash of its id kept."""
        marker = orjson.dumps({"at": at_ms})
        self.values.pop(CORP_PREFIX + corp_id, None)
        self.values[CANCELLED_PREFIX + corp_hash(corp_id)] = marker
        return [(CORP_PREFIX + corp_id, None), (CANCELLED_PREFIX + corp_hash(corp_id), marker)]

    def record_uncancel(self, corp_id: str) -> list[tuple[str, Optional[bytes]]]:
        """A corp that cancelled and authorises again: its cancel marker deleted."""
        if self.values.pop(CANCELLED_PREFIX + corp_hash(corp_id), None) is None:
            return []
        return [(CANCELLED_PREFIX + corp_hash(corp_id), None)]

    def record(self, auth: Authorisation, code_hash: Optional[str] = None) -> tuple[str, bytes]:
        value = orjson.dumps({"corp_id": auth.corp_id, "status": auth.status, "agent_id": auth.agent_id,
                              "at": auth.at, "permanent_code": self.vault.seal(auth.permanent_code)
                              if auth.permanent_code else None,
                              "code_hash": code_hash or self.code_hash(auth.corp_id)})
        self.values[CORP_PREFIX + auth.corp_id] = value
        return CORP_PREFIX + auth.corp_id, value


def agent_id_of(answer: dict) -> str:
    """The suite's agent id in a corp, from get_permanent_code's or get_auth_info's answer."""
    agents = (answer.get("auth_info") or {}).get("agent") or []
    return str(agents[0].get("agentid", "")) if agents else ""


def seal_command(fields: dict, vault: Vault) -> dict:
    """A command as `wecom-callbacks` keeps it: its credentials sealed."""
    return {name: vault.seal(value) if name in SECRET_FIELDS and value else value for name, value in fields.items()}


def open_command(fields: dict, vault: Vault) -> dict:
    return {name: vault.open(value) if name in SECRET_FIELDS and value else value for name, value in fields.items()}
