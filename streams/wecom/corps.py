"""The corps the ingest serves (SPEC §7), read once from the corps file: self-built apps, each
listed, and a provider's suite, which corps authorise at run time (streams/wecom/provider.py).

    # wecom-corps.yaml (TAGSTREAM_WECOM_CORPS_FILE)
    corps:
      - corp_id: ww51a2
        wechat_app_id: wx7d21            # the app id reports carry (SPEC §3.2)
        token_file: /run/secrets/ww51a2/token
        encoding_aes_key_file: /run/secrets/ww51a2/aes_key
        contact_secret_file: /run/secrets/ww51a2/contact_secret
    suite:                               # optional: provider mode (then `corps` may be empty)
      suite_id: wwsuite7
      wechat_app_id: wx7d21              # the app id the reports of authorised corps carry
      token_file: /run/secrets/suite/token
      encoding_aes_key_file: /run/secrets/suite/aes_key
      suite_secret_file: /run/secrets/suite/secret

Each secret comes from its `*_file`, else from `TAGSTREAM_WECOM_<CORP_ID>_<NAME>` (upper case,
e.g. `TAGSTREAM_WECOM_WW51A2_TOKEN`; the suite's: `TAGSTREAM_WECOM_<SUITE_ID>_<NAME>`). A secret written into the file itself is refused: the
corps file is configuration (a ConfigMap), secrets are mounted (a Secret). Every problem is a
one-line `ConfigError` that says what to fix; no message carries a secret's value.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping, Optional

import yaml

from streams.settings import ConfigError, Settings
from streams.wecom.crypto import CallbackCrypto

SECRETS = ("token", "encoding_aes_key", "contact_secret")
FIELDS = {"corp_id", "wechat_app_id", "agent_id"} | {f"{name}_file" for name in SECRETS}
SUITE_SECRETS = ("token", "encoding_aes_key", "suite_secret")
SUITE_FIELDS = {"suite_id", "wechat_app_id"} | {f"{name}_file" for name in SUITE_SECRETS}


@dataclass(frozen=True)
class Corp:
    corp_id: str
    wechat_app_id: Optional[str]
    crypto: CallbackCrypto = field(repr=False)
    contact_secret: str = field(repr=False)
    agent_id: str = ""


@dataclass(frozen=True)
class Suite:
    """A provider's suite: its command callbacks' crypto and the secret of its tokens."""
    suite_id: str
    wechat_app_id: Optional[str]
    crypto: CallbackCrypto = field(repr=False)
    suite_secret: str = field(repr=False)

    def corp(self, corp_id: str, agent_id: str = "") -> Corp:
        """An authorised corp as the enrichment sees it (its tokens come from the suite)."""
        return Corp(corp_id, self.wechat_app_id, self.crypto, "", agent_id)


def _secret(entry: Mapping, name: str, corp_id: str, source: str, environ: Mapping[str, str]) -> str:
    variable = f"TAGSTREAM_WECOM_{corp_id.upper()}_{name.upper()}"
    path = entry.get(f"{name}_file")
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                value = f.read().strip()
        except OSError as exc:
            raise ConfigError(f"{source}: corp {corp_id}: {name}_file {path!r}: cannot read it "
                              f"({exc.strerror}); point it at a readable file") from None
        if not value:
            raise ConfigError(f"{source}: corp {corp_id}: {name}_file {path!r} is empty; write the {name} into it")
        return value
    value = environ.get(variable, "")
    if not value:
        raise ConfigError(f"{source}: corp {corp_id} has no {name}: set {name}_file in the corps file, "
                          f"or {variable}")
    return value


def load_corps(settings: Settings, environ: Optional[Mapping[str, str]] = None) -> dict[str, Corp]:
    """corp_id -> Corp, from `settings.wecom_corps_file` and the environment."""
    environ = os.environ if environ is None else environ
    source, document = _document(settings)
    entries = document.get("corps")
    if entries is None and document.get("suite"):
        entries = []                      # provider mode alone
    if not isinstance(entries, list) or not (entries or document.get("suite")):
        raise ConfigError(f"{source}: expected a non-empty list under `corps:` (or a `suite:`); see docs/ingest.md")
    corps: dict[str, Corp] = {}
    for number, entry in enumerate(entries, 1):
        if not isinstance(entry, dict) or not isinstance(entry.get("corp_id"), str) or not entry["corp_id"]:
            raise ConfigError(f"{source}: corps entry {number} needs a corp_id")
        corp_id = entry["corp_id"]
        _check_fields(entry, f"{source}: corp {corp_id}", SECRETS, FIELDS)
        if corp_id in corps:
            raise ConfigError(f"{source}: corp {corp_id} is listed twice")
        token, aes_key, contact_secret = (_secret(entry, name, corp_id, source, environ) for name in SECRETS)
        corps[corp_id] = Corp(corp_id, entry.get("wechat_app_id"), _crypto(token, aes_key, f"{source}: corp {corp_id}"),
                              contact_secret, str(entry.get("agent_id") or ""))
    return corps


def load_suite(settings: Settings, environ: Optional[Mapping[str, str]] = None) -> Optional[Suite]:
    """The provider's suite from the corps file's `suite:` section, or None without one."""
    environ = os.environ if environ is None else environ
    if not settings.wecom_corps_file:
        return None
    source, document = _document(settings)
    entry = document.get("suite")
    if entry is None:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("suite_id"), str) or not entry["suite_id"]:
        raise ConfigError(f"{source}: `suite:` needs a suite_id; see docs/ingest.md")
    suite_id = entry["suite_id"]
    _check_fields(entry, f"{source}: suite {suite_id}", SUITE_SECRETS, SUITE_FIELDS)
    token, aes_key, suite_secret = (_secret(entry, name, suite_id, source, environ) for name in SUITE_SECRETS)
    return Suite(suite_id, entry.get("wechat_app_id"), _crypto(token, aes_key, f"{source}: suite {suite_id}"),
                 suite_secret)


def _check_fields(entry: Mapping, where: str, secrets: tuple, fields: set) -> None:
    inline = sorted(set(entry) & set(secrets))
    if inline:
        raise ConfigError(f"{where}: {inline[0]} is written into the corps file; "
                          f"secrets come only from files ({inline[0]}_file) or the environment")
    unknown = sorted(set(entry) - fields)
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r}; known: {', '.join(sorted(fields))}")


def _crypto(token: str, aes_key: str, where: str) -> CallbackCrypto:
    try:
        return CallbackCrypto(token, aes_key)
    except ValueError as exc:
        raise ConfigError(f"{where}: bad encoding_aes_key: {exc}") from None


def _document(settings: Settings) -> tuple[str, object]:
    source = settings.wecom_corps_file
    if not source:
        raise ConfigError("no corps configured: set TAGSTREAM_WECOM_CORPS_FILE to a YAML file "
                          "listing them (docs/ingest.md shows one)")
    try:
        with open(source, encoding="utf-8") as f:
            document = yaml.safe_load(f) or {}
    except OSError as exc:
        raise ConfigError(f"TAGSTREAM_WECOM_CORPS_FILE={source!r}: cannot read it ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{source}: not valid YAML{where}; see docs/ingest.md for the format") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: expected a non-empty list under `corps:` (or a `suite:`); see docs/ingest.md")
    return source, document
