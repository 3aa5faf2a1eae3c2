"""WeCom's callback security (WXBizMsgCrypt), WECOM.md §1: the signature and the AES layer.

- signature: lowercase hex SHA-1 of the sorted concatenation of token, timestamp, nonce and
  the encrypted message;
- cipher: AES-256-CBC with key = base64(EncodingAESKey + "="), IV = the key's first 16 bytes,
  PKCS#7 padding to a multiple of 32 bytes (not AES's 16: WeCom's own choice);
- plaintext: 16 random bytes, the message length (4 bytes, big-endian), the message, then
  the receive id (the corp id for a self-built app, the suite id for a provider's commands).

The AES is `cryptography`'s; nothing here implements a primitive. Every failure is a
`Refused` with a short reason code, which the ingest turns into a 4xx and a counter label; no
message of it contains key material or the decrypted text.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import struct

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

BLOCK = 32          # WeCom pads to 32 bytes


class Refused(ValueError):
    """A callback that fails verification; `reason` is a short code (a metric label)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def signature(token: str, timestamp: str, nonce: str, encrypted: str) -> str:
    return hashlib.sha1("".join(sorted([token, timestamp, nonce, encrypted])).encode()).hexdigest()


class CallbackCrypto:
    """One callback configuration: its token and EncodingAESKey."""

    def __init__(self, token: str, encoding_aes_key: str):
        if len(encoding_aes_key) != 43:
            raise ValueError("an EncodingAESKey has 43 characters")
        try:
            self._key = base64.b64decode(encoding_aes_key + "=", validate=True)
        except binascii.Error:
            raise ValueError("an EncodingAESKey is base64 (43 characters)") from None
        self._token = token

    def __repr__(self) -> str:                      # never the key or the token
        return "CallbackCrypto(<secret>)"

    def verify(self, msg_signature: str, timestamp: str, nonce: str, encrypted: str) -> None:
        expected = signature(self._token, timestamp, nonce, encrypted)
        if not hmac.compare_digest(expected, (msg_signature or "").lower()):
            raise Refused("bad_signature")

    def sign(self, timestamp: str, nonce: str, encrypted: str) -> str:
        return signature(self._token, timestamp, nonce, encrypted)

    def decrypt(self, encrypted: str, receive_id: str) -> bytes:
        """The message inside `encrypted`, whose trailing receive id must be `receive_id`."""
        try:
            raw = base64.b64decode(encrypted, validate=True)
        except (binascii.Error, ValueError):
            raise Refused("bad_ciphertext", "not base64") from None
        if not raw or len(raw) % 16:
            raise Refused("bad_ciphertext", "not whole AES blocks")
        decryptor = Cipher(algorithms.AES(self._key), modes.CBC(self._key[:16])).decryptor()
        padded = decryptor.update(raw) + decryptor.finalize()
        pad = padded[-1]
        if not 1 <= pad <= BLOCK or padded[-pad:] != bytes([pad]) * pad:
            raise Refused("bad_ciphertext", "bad padding (wrong EncodingAESKey?)")
        plain = padded[:-pad]
        if len(plain) < 20:
            raise Refused("bad_ciphertext", "too short")
        (length,) = struct.unpack(">I", plain[16:20])
        if 20 + length > len(plain):
            raise Refused("bad_ciphertext", "length past the end (wrong EncodingAESKey?)")
        message, trailer = plain[20:20 + length], plain[20 + length:]
        if not hmac.compare_digest(trailer, receive_id.encode()):
            raise Refused("wrong_receive_id")
        return message

    def encrypt(self, message: bytes, receive_id: str, random16: bytes | None = None) -> str:
        """What WeCom sends (the fake WeCom and the URL-verification tests use it)."""
        body = (random16 or os.urandom(16)) + struct.pack(">I", len(message)) + message + receive_id.encode()
        pad = BLOCK - len(body) % BLOCK
        encryptor = Cipher(algorithms.AES(self._key), modes.CBC(self._key[:16])).encryptor()
        return base64.b64encode(encryptor.update(body + bytes([pad]) * pad) + encryptor.finalize()).decode()
