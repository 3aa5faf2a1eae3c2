"""How every Kafka client of tagstream connects (SPEC §8): one place turns the connection
settings into the keyword arguments of aiokafka and Faust, so no client can miss them.

    AIOKafkaConsumer(*topics, **client_kwargs(settings), group_id=...)
    AIOKafkaProducer(**producer_kwargs(settings))            # acks=all, idempotent
    AIOKafkaAdminClient(**client_kwargs(settings))
    faust.App(..., **faust_kwargs(settings))                 # broker_credentials, replication
    NewTopic(..., replication_factor=settings.replication_factor, topic_configs=topic_configs(settings))

The password is read from its file (or TAGSTREAM_SASL_PASSWORD) when the arguments are built
and goes nowhere else. The TLS context is built once per (CA, certificate, key) with the
standard library, through aiokafka's helper.
"""
from __future__ import annotations

import ssl
from functools import lru_cache
from typing import Any, Optional

from aiokafka.helpers import create_ssl_context

from streams.kafka.partitioner import partitioner
from streams.settings import ConfigError, Settings

SSL_PROTOCOLS = ("SSL", "SASL_SSL")
SASL_PROTOCOLS = ("SASL_PLAINTEXT", "SASL_SSL")


@lru_cache(maxsize=8)
def _ssl_context(cafile: str, certfile: str, keyfile: str) -> ssl.SSLContext:
    try:
        return create_ssl_context(cafile=cafile or None, certfile=certfile or None, keyfile=keyfile or None)
    except (OSError, ssl.SSLError) as exc:
        which = "TAGSTREAM_SSL_CAFILE" if not certfile else "TAGSTREAM_SSL_CERTFILE/TAGSTREAM_SSL_KEYFILE"
        raise ConfigError(f"{which}: cannot load it ({exc}); give PEM files that belong together") from None


def ssl_context(settings: Settings) -> Optional[ssl.SSLContext]:
    """The TLS context of SSL and SASL_SSL connections, else None."""
    if settings.security_protocol not in SSL_PROTOCOLS:
        return None
    return _ssl_context(settings.ssl_cafile, settings.ssl_certfile, settings.ssl_keyfile)


def client_kwargs(settings: Settings) -> dict[str, Any]:
    """bootstrap_servers and the security arguments every aiokafka client takes."""
    kwargs: dict[str, Any] = {"bootstrap_servers": settings.bootstrap_servers,
                              "security_protocol": settings.security_protocol}
    context = ssl_context(settings)
    if context is not None:
        kwargs["ssl_context"] = context
    if settings.security_protocol in SASL_PROTOCOLS:
        kwargs.update(sasl_mechanism=settings.sasl_mechanism, sasl_plain_username=settings.sasl_username,
                      sasl_plain_password=settings.sasl_password())
    return kwargs


def producer_kwargs(settings: Settings, **extra: Any) -> dict[str, Any]:
    """A producer's arguments: every write waits for the in-sync replicas, retries cannot
    duplicate or reorder (idempotence), and keys are hashed in compiled code (partitioner.py)."""
    return {**client_kwargs(settings), "acks": "all", "enable_idempotence": True, "partitioner": partitioner, **extra}


def faust_kwargs(settings: Settings) -> dict[str, Any]:
    """The Faust app's connection arguments: the broker URL, credentials and the replication of
    the topics Faust creates (changelogs and internal topics)."""
    import faust                         # the worker's dependency; the sink and tools do not need it

    kwargs: dict[str, Any] = {"broker": settings.broker, "topic_replication_factor": settings.replication_factor}
    context = ssl_context(settings)
    if settings.security_protocol in SASL_PROTOCOLS:
        kwargs["broker_credentials"] = faust.SASLCredentials(
            username=settings.sasl_username, password=settings.sasl_password(),
            ssl_context=context, mechanism=settings.sasl_mechanism)
    elif context is not None:
        kwargs["broker_credentials"] = faust.SSLCredentials(context)
    return kwargs


def topic_configs(settings: Settings, **configs: str) -> dict[str, str]:
    """Topic-level configs of a topic tagstream creates: `configs` plus min.insync.replicas."""
    return {"min.insync.replicas": str(settings.min_insync_replicas), **configs}


async def start_client(client: Any) -> Any:
    """`await client.start()`, closing the client if that fails (a login refused, no
    broker), so the failure is not followed by aiokafka's "Unclosed ..." warnings."""
    try:
        await client.start()
    except BaseException:
        await (client.stop() if hasattr(client, "stop") else client.close())
        raise
    return client


def idempotent_faust_producer(app: Any) -> None:
    """Make the Faust app's own producer (it writes the rule table's changelog) use acks=all
    with idempotence, like every other producer here; Faust enables idempotence only for
    exactly_once, which tagstream does not use (docs/architecture.md)."""
    from faust.transport.drivers.aiokafka import Producer

    class IdempotentProducer(Producer):
        def _settings_extra(self) -> dict[str, Any]:
            return {"acks": "all", "enable_idempotence": True}

    app.transport.Producer = IdempotentProducer
