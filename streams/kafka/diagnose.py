"""Why a Kafka client could not work, in one line that names the setting to fix (SPEC §8).

aiokafka reports a refused login or an untrusted certificate at bootstrap only as "Unable to
bootstrap from [...]"; the broker's real answer is in an ERROR it logs per node. So the
commands install `RecentKafkaErrors` on the `aiokafka` logger first, and `explain` reads the
exception and those lines:

    authentication failed  -> TAGSTREAM_SASL_USERNAME / TAGSTREAM_SASL_PASSWORD_FILE
    certificate not trusted -> TAGSTREAM_SSL_CAFILE
    an ACL is missing      -> the user's ACLs (or TAGSTREAM_SASL_USERNAME)
    too many replicas      -> TAGSTREAM_REPLICATION_FACTOR
    nothing answers        -> TAGSTREAM_BROKER / TAGSTREAM_SECURITY_PROTOCOL

The handler also keeps aiokafka's per-node lines off the terminal when nothing else logs
yet (it is a handler, so Python's last-resort printer stays quiet), so a command that fails
at startup prints only its one line. No line quotes a password: the broker's answers do not
carry it, and neither does anything here.
"""
from __future__ import annotations

import logging
import ssl
from collections import deque
from typing import Optional

from aiokafka import errors

from streams.settings import Settings

AUTHORIZATION_ERRORS = (errors.TopicAuthorizationFailedError, errors.GroupAuthorizationFailedError,
                        errors.ClusterAuthorizationFailedError, errors.TransactionalIdAuthorizationFailed)


class RecentKafkaErrors(logging.Handler):
    """The last ERROR lines aiokafka logged (connection failures name their cause there)."""

    def __init__(self, keep: int = 50):
        super().__init__(level=logging.ERROR)
        self.lines: deque[str] = deque(maxlen=keep)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(record.getMessage())
        except Exception:  # noqa: BLE001 - a log line must never break the client
            pass

    def mention(self, *needles: str) -> Optional[str]:
        """The newest line that contains one of `needles`."""
        for line in reversed(self.lines):
            if any(needle in line for needle in needles):
                return line
        return None


_installed: Optional[RecentKafkaErrors] = None


def install() -> RecentKafkaErrors:
    """Attach the handler to the `aiokafka` logger (once per process)."""
    global _installed
    if _installed is None:
        _installed = RecentKafkaErrors()
        logging.getLogger("aiokafka").addHandler(_installed)
    return _installed


def _chain(exc: BaseException) -> list[BaseException]:
    seen = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def explain(exc: BaseException, settings: Settings, recent: Optional[RecentKafkaErrors] = None) -> Optional[str]:
    """One line saying what to fix, if `exc` is a Kafka connection, login, TLS or ACL failure."""
    chain = _chain(exc)
    recent = recent or _installed or RecentKafkaErrors()
    user = f"user {settings.sasl_username!r}" if settings.sasl_username else "this client"
    if any(isinstance(e, (errors.SaslAuthenticationFailed, errors.AuthenticationFailedError)) for e in chain) \
            or recent.mention("SaslAuthenticationFailed", "AuthenticationFailed"):
        return (f"Kafka refused the login of {user} ({settings.sasl_mechanism} over {settings.security_protocol}): "
                f"check TAGSTREAM_SASL_USERNAME and the password in TAGSTREAM_SASL_PASSWORD_FILE "
                f"(or TAGSTREAM_SASL_PASSWORD)")
    if any(isinstance(e, errors.UnsupportedSaslMechanismError) for e in chain) \
            or recent.mention("UnsupportedSaslMechanism"):
        return (f"the brokers do not offer TAGSTREAM_SASL_MECHANISM={settings.sasl_mechanism}: "
                f"use one they enable (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)")
    if any(isinstance(e, ssl.SSLCertVerificationError) for e in chain) \
            or recent.mention("CERTIFICATE_VERIFY_FAILED", "certificate verify failed"):
        where = f"TAGSTREAM_SSL_CAFILE={settings.ssl_cafile!r}" if settings.ssl_cafile else "the system's CAs"
        return (f"the brokers' TLS certificate is not trusted by {where}: set TAGSTREAM_SSL_CAFILE to the CA "
                f"that signed it")
    refused = next((e for e in chain if isinstance(e, AUTHORIZATION_ERRORS)), None)
    if refused is not None:
        return (f"Kafka refused {user} ({type(refused).__name__}): grant it ACLs on tagstream's topics "
                f"(prefix {settings.topic_prefix!r} and {settings.app_id!r}), its groups ({settings.app_id!r}, "
                f"{settings.app_id + '-sink'!r}) and transactional ids, or set TAGSTREAM_SASL_USERNAME to a "
                f"user that has them")
    if any(isinstance(e, errors.InvalidReplicationFactorError) for e in chain):
        return (f"the cluster cannot hold TAGSTREAM_REPLICATION_FACTOR={settings.replication_factor} replicas "
                f"({chain[0]}): set it to at most the number of brokers")
    if any(isinstance(e, (errors.KafkaConnectionError, ConnectionError)) for e in chain):
        hint = ("start the local broker with `deploy/kafka/kafka.sh start` or set TAGSTREAM_BROKER"
                if settings.security_protocol == "PLAINTEXT" else
                f"check TAGSTREAM_BROKER and that its listeners speak "
                f"TAGSTREAM_SECURITY_PROTOCOL={settings.security_protocol}")
        return f"cannot reach Kafka at {settings.broker}: {hint}"
    return None
