"""WeCom's callback XML (WECOM.md §1–3), parsed safely, into the record `wecom-callbacks` holds.

Both layers are XML: the envelope WeCom POSTs (`ToUserName`, `Encrypt`, `AgentID`) and the
decrypted message inside. Both are parsed by `defusedxml`, which refuses DTDs, entity
declarations and external references outright, so neither a "billion laughs" bomb nor an
external entity can cost more than the (bounded) body. Callbacks are flat: every field is a
direct child element holding text, and that is all this module reads.

A `Callback` is the decrypted message's fields plus what the ingest knows about it (the
corp it was addressed to, when it was received). Its key on `wecom-callbacks` is
`corp_id:external_userid`, else `corp_id` (SPEC §2), so one customer's callbacks stay in
order on one partition; a provider suite's own commands are keyed `suite_id/InfoType`.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional
from xml.etree.ElementTree import Element

import orjson
from defusedxml import DefusedXmlException
from defusedxml.ElementTree import ParseError, fromstring

from streams.wecom.crypto import Refused

#: the largest body the ingest reads (WeCom's callbacks are a few hundred bytes)
MAX_BODY_BYTES = 64 * 1024
#: the largest field value kept (SPEC §3: identifiers are at most 128 characters; a welcome
#: code or a fail reason is longer, but nothing WeCom sends comes near this)
MAX_FIELD_CHARS = 2048


def parse_flat(xml: bytes, what: str) -> dict[str, str]:
    """The text of each direct child of the root, refusing DTDs, entities and anything not
    flat. Raises `Refused("bad_xml")`."""
    try:
        root: Element = fromstring(xml, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except DefusedXmlException as exc:
        raise Refused("bad_xml", f"{what}: {type(exc).__name__}") from None
    except (ParseError, ValueError):
        raise Refused("bad_xml", f"{what}: not well-formed") from None
    fields: dict[str, str] = {}
    for child in root:
        if len(child):
            raise Refused("bad_xml", f"{what}: nested element {child.tag!r}")
        text = (child.text or "").strip()
        if len(text) > MAX_FIELD_CHARS:
            raise Refused("bad_xml", f"{what}: field {child.tag!r} too long")
        fields[str(child.tag)] = text
    return fields


@dataclass(frozen=True)
class Envelope:
    """What WeCom POSTs: the addressee and the ciphertext."""
    to_user_name: str
    encrypted: str
    agent_id: str

    @classmethod
    def parse(cls, body: bytes) -> "Envelope":
        if len(body) > MAX_BODY_BYTES:
            raise Refused("too_large")
        fields = parse_flat(body, "envelope")
        if not fields.get("Encrypt"):
            raise Refused("bad_xml", "envelope: no Encrypt")
        return cls(fields.get("ToUserName", ""), fields["Encrypt"], fields.get("AgentID", ""))


@dataclass(frozen=True)
class Callback:
    """A verified, decrypted callback, as `wecom-callbacks` holds it."""
    corp_id: str
    fields: dict            # the decrypted message's fields, as WeCom sent them
    received_at: int        # epoch ms at the ingest

    @property
    def event(self) -> str:
        return self.fields.get("Event") or self.fields.get("InfoType") or self.fields.get("MsgType", "")

    @property
    def change_type(self) -> str:
        return self.fields.get("ChangeType", "")

    @property
    def external_userid(self) -> str:
        return self.fields.get("ExternalUserID", "")

    @property
    def create_time_ms(self) -> Optional[int]:
        text = self.fields.get("CreateTime") or self.fields.get("TimeStamp")
        return int(text) * 1000 if text and text.isdigit() else None

    def key(self) -> bytes:
        if self.external_userid:
            return f"{self.corp_id}:{self.external_userid}".encode()
        if self.fields.get("SuiteId") and not self.fields.get("AuthCorpId"):
            # a suite's own commands, one queue per InfoType: a create_auth waiting for a
            # ticket must not hold the next ticket back (streams/wecom/enrich.py defers by queue)
            return f"{self.corp_id}/{self.event}".encode()
        return self.corp_id.encode()

    def content_id(self) -> str:
        """A hash of what the callback says, not of how it was delivered: a retry, identical
        or re-signed with a fresh nonce, has the same id (WECOM.md §1: dedupe on content)."""
        return hashlib.sha256(self.corp_id.encode() + b"\x00" + orjson.dumps(self.fields, option=orjson.OPT_SORT_KEYS)).hexdigest()

    def to_wire(self) -> bytes:
        return orjson.dumps({"corp_id": self.corp_id, "received_at": self.received_at,
                             "content_id": self.content_id(), "fields": self.fields})

    @classmethod
    def from_wire(cls, value: bytes) -> "Callback":
        record = orjson.loads(value)
        return cls(record["corp_id"], record["fields"], record["received_at"])
