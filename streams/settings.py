"""All of tagstream's settings in one typed object, with defaults and TAGSTREAM_* overrides.

Each field's environment variable is `TAGSTREAM_` + its upper-cased name; command-line flags
override both. Durations are integer milliseconds inside the program and may be written
with a unit outside it ("30m", "7d", "5s", "250ms"). A bad value stops the program with a
one-line `ConfigError` that names the variable and shows a valid example.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional

from schemas.records import DEFAULT_ACTION_TYPES

SECOND = 1000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE
DAY = 24 * HOUR


class ConfigError(ValueError):
    """A setting is missing or malformed; the message says how to fix it, in one line."""


_UNITS = {"ms": 1, "s": SECOND, "m": MINUTE, "min": MINUTE, "h": HOUR, "d": DAY}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|min|m|h|d)?\s*$")


def parse_duration_ms(text: str) -> int:
    """'30m' -> 1800000. A bare number is milliseconds."""
    match = _DURATION.match(str(text))
    if not match:
        raise ValueError(text)
    return int(float(match.group(1)) * _UNITS[match.group(2) or "ms"])


def _duration(default_ms: int, help: str) -> Any:
    return field(default=default_ms, metadata={"kind": "duration", "help": help})


def _setting(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Settings:
    # Kafka
    broker: str = _setting("kafka://127.0.0.1:9092", "Kafka bootstrap server(s), kafka://host:port[,host:port]")
    app_id: str = _setting("tagstream", "Faust app id: the consumer group and the prefix of changelog topics")
    topic_prefix: str = _setting("tagstream.", "prefix of every topic name below")
    partitions: int = _setting(4, "partitions of the input topics (tag and contact events must match)")
    # Kafka connection (SPEC §8): every client takes these, through streams/kafka/connection.py
    security_protocol: str = _setting("PLAINTEXT", "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL")
    sasl_mechanism: str = _setting("SCRAM-SHA-512", "with SASL_*: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512")
    sasl_username: str = _setting("", "with SASL_*: the user tagstream authenticates as")
    sasl_password_file: str = _setting("", "with SASL_*: file holding the password (or set TAGSTREAM_SASL_PASSWORD; never a flag)")
    ssl_cafile: str = _setting("", "with SSL or SASL_SSL: CA bundle that signed the brokers' certificates (empty: the system's)")
    ssl_certfile: str = _setting("", "mutual TLS: this client's certificate (PEM), with ssl_keyfile")
    ssl_keyfile: str = _setting("", "mutual TLS: this client's private key (PEM)")
    replication_factor: int = _setting(1, "replicas of every topic tagstream creates, changelogs and internal topics included (3 in production)")
    min_insync_replicas: int = _setting(1, "min.insync.replicas of every topic tagstream creates; with acks=all a write needs this many replicas (2 with replication_factor 3)")
    # topic names, relative to topic_prefix (SPEC §2)
    tag_events_topic: str = _setting("tag-events", "tag events (input)")
    contact_events_topic: str = _setting("contact-events", "contact events (input, co-partitioned)")
    tag_mappings_topic: str = _setting("tag-mappings", "reporting rules (input, compacted)")
    conversion_reports_topic: str = _setting("conversion-reports", "reports (output)")
    unreportable_topic: str = _setting("unreportable", "reports without user identity")
    dead_letters_topic: str = _setting("dead-letters", "invalid input, with the reason")
    report_failures_topic: str = _setting("report-failures", "permanent delivery failures")
    delivered_reports_topic: str = _setting("delivered-reports", "the sink's record of acknowledged outer_action_ids (compacted)")
    retry_reports_topic: str = _setting("conversion-reports-retry", "reports the sink parked for a later attempt (non-blocking retries; as many partitions as conversion-reports)")
    wecom_callbacks_topic: str = _setting("wecom-callbacks", "verified, decrypted WeCom callbacks, written before WeCom gets its answer")
    wecom_tags_topic: str = _setting("wecom-tags", "each corp's tag catalogue (compacted; kept by the ingest)")
    wecom_snapshots_topic: str = _setting("wecom-snapshots", "each relationship's corp tags as last seen (compacted; the enrichment's table, partitioned like wecom-callbacks)")
    wecom_auth_topic: str = _setting("wecom-auth", "provider mode: the suite ticket and each authorised corp's status and permanent code, sealed (compacted; written by the enrichment)")
    wecom_erasures_topic: str = _setting("wecom-erasures", "erasure requests of corps that left, and the audit of each erasure (corp id, time, what and how many keys; no personal data); kept forever")
    erasure_deadline: int = _duration(10 * MINUTE, "a corp that cancels is erased from every component's state within this; past it, tagstream_erasure_pending_seconds fires TagstreamErasureOverdue and the component logs an error")
    ad_clicks_topic: str = _setting("ad-clicks", "click ids by corp_id:state (compacted; written by whoever builds the ad's contact link)")
    # the WeCom ingest (SPEC §7)
    wecom_corps_file: str = _setting("", "YAML file of the corps whose callbacks the ingest takes (docs/ingest.md); their secrets come from files or TAGSTREAM_WECOM_<CORP_ID>_* variables, never from this file")
    wecom_vault_key_file: str = _setting("", "provider mode: file holding the Fernet key that seals permanent codes and the suite ticket in wecom-auth (or set TAGSTREAM_WECOM_VAULT_KEY)")
    wecom_api_base: str = _setting("https://qyapi.weixin.qq.com/cgi-bin/", "WeCom API base URL")
    ingest_listen: str = _setting("127.0.0.1:8480", "host:port of the ingest's HTTP server: WeCom callbacks, /healthz and /metrics")
    callback_max_age: int = _duration(10 * MINUTE, "a callback whose timestamp is further than this from the ingest's clock is refused (a replay, or a clock that is off)")
    wecom_rate_limit: int = _setting(6000, "WeCom API calls per minute per corp and API (WeCom allows 10,000)")
    wecom_request_timeout: int = _duration(5 * SECOND, "timeout of one WeCom API request (then retried)")
    wecom_retry_budget: int = _duration(5 * SECOND, "how long one WeCom call is retried (busy, rate limits, 5xx, timeouts) before its callback is deferred and the corp's later callbacks wait behind it")
    ingest_api_token_file: str = _setting("", "file holding the bearer token of the ingest's POST /tags (tag through WeCom's API); empty: the endpoint is off")
    reconcile_every: int = _duration(0, "above 0, `tagstream reconcile` keeps running and starts another pass this long after each one ends (the schedule); 0: one pass and exit (e.g. from a CronJob)")
    reconcile_state_dir: str = _setting(".state/reconcile", "where `tagstream reconcile` records how far it got, to resume after a crash")
    enrich_metrics_port: int = _setting(9466, "port of `tagstream enrich`'s Prometheus /metrics endpoint (0: none)")
    # reporting semantics (SPEC §4)
    order_window: int = _duration(7 * DAY, "an ORDER later than this after the add time is LONG_TERM")
    delay_hold: int = _duration(30 * MINUTE, "how long LONG_TERM and INVALID reports are held")
    idle_grace: int = _duration(5 * MINUTE, "live mode: a hold also fires this long after its deadline in wall-clock time")
    dedupe_horizon: int = _duration(7 * DAY, "how long event ids are remembered for dedupe (stream time)")
    max_future_skew: int = _duration(HOUR, "an event whose ts is further ahead of its Kafka record timestamp is dead-lettered (ts_in_future) and does not move stream time")
    action_type_consult: str = _setting(DEFAULT_ACTION_TYPES["CONSULT"], "default action type for CONSULT")
    action_type_lead: str = _setting(DEFAULT_ACTION_TYPES["LEAD"], "default action type for LEAD")
    action_type_valid: str = _setting(DEFAULT_ACTION_TYPES["VALID"], "default action type for VALID")
    action_type_order: str = _setting(DEFAULT_ACTION_TYPES["ORDER"], "default action type for ORDER")
    action_type_long_term: str = _setting(DEFAULT_ACTION_TYPES["LONG_TERM"], "default action type for LONG_TERM")
    action_type_invalid: str = _setting(DEFAULT_ACTION_TYPES["INVALID"], "default action type for INVALID")
    # worker runtime
    processing_guarantee: str = _setting("at_least_once", "Faust processing guarantee; docs/architecture.md says why exactly_once is not used")
    session_timeout: int = _duration(10 * SECOND, "consumer-group session timeout: how soon a crashed worker's partitions move")
    partition_fetch_bytes: int = _setting(1024 * 1024, "most bytes one fetch takes from one input partition (Kafka's max.partition.fetch.bytes)")
    merge_wait: int = _duration(500, "how long an event may wait for the other event topic's partition before it is applied out of ts order")
    data_dir: str = _setting(".state/worker", "where the worker keeps its RocksDB tables")
    # the reporting sink (SPEC §5)
    marketing_api_base: str = _setting("", "Marketing API base URL for `tagstream sink --target api`, e.g. https://api.e.qq.com")
    access_token: str = _setting("", "Marketing API access token (prefer access_token_file: a file is re-read when the token expires)")
    access_token_file: str = _setting("", "file holding the Marketing API access token; re-read on codes 11000/11002")
    sink_rate_limit: int = _setting(4000, "Marketing API requests per minute per token")
    sink_concurrency: int = _setting(8, "requests in flight at once (one account at a time keeps its order)")
    sink_linger: int = _duration(20, "how long the sink waits to fill a batch; real-time reports are held at most this long")
    sink_round: int = _setting(2000, "reports read per delivery round; offsets are committed after each round")
    sink_request_timeout: int = _duration(10 * SECOND, "timeout of one Marketing API request (then retried)")
    sink_max_backoff: int = _duration(30 * SECOND, "longest wait between retries of one request")
    sink_retry_budget: int = _duration(5 * SECOND, "how long a request is retried within a round; then its reports are parked on the retry topic, the round commits past them, and the account's next reports are parked at once")
    sink_retry_delay: int = _duration(10 * SECOND, "how long a parked report waits on the retry topic before its next attempt; a stuck account gets one request per delay")
    sink_metrics_port: int = _setting(9465, "port of the sink's Prometheus /metrics endpoint (0: none)")
    batch_linger: int = _duration(50, "longest a batch of applied events waits for its group commit (reports are sent at once regardless)")
    batch_max: int = _setting(500, "most events applied before the worker waits for its reports' acks and writes its state (group commit)")
    metrics_port: int = _setting(9464, "port of the worker's Prometheus /metrics and /healthz endpoint (0: none)")
    metrics_host: str = _setting("127.0.0.1", "address every /metrics and /healthz endpoint (worker, sink, enrichment) listens on; 0.0.0.0 in a pod, where Prometheus scrapes and the kubelet probes the pod's address")
    metrics_interval: int = _duration(5 * SECOND, "how often consumer lag, table sizes and held reports are sampled for /metrics")
    log_level: str = _setting("info", "debug, info, warning or error")

    def topic(self, name: str) -> str:
        """Full topic name of one of the *_topic settings."""
        return self.topic_prefix + getattr(self, name)

    @property
    def bootstrap_servers(self) -> str:
        """The broker setting as aiokafka wants it: host:port[,host:port]."""
        return ",".join(part.split("://", 1)[-1] for part in self.broker.split(","))

    @property
    def default_action_types(self) -> dict[str, str]:
        return {t: getattr(self, "action_type_" + t.lower()) for t in DEFAULT_ACTION_TYPES}

    @classmethod
    def load(cls, overrides: Optional[Mapping[str, Any]] = None,
             environ: Optional[Mapping[str, str]] = None) -> "Settings":
        """Defaults, then TAGSTREAM_* variables, then explicit overrides (e.g. CLI flags)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            variable = "TAGSTREAM_" + f.name.upper()
            if variable in environ:
                values[f.name] = _convert(f, environ[variable], variable)
        for name, raw in (overrides or {}).items():
            if raw is None:
                continue
            f = _FIELDS.get(name)
            if f is None:
                raise ConfigError(f"unknown setting {name!r}; see `tagstream settings`")
            values[name] = _convert(f, raw, "--" + name.replace("_", "-")) if isinstance(raw, str) else raw
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        if self.partitions < 1:
            raise ConfigError(f"TAGSTREAM_PARTITIONS={self.partitions}: must be at least 1, e.g. TAGSTREAM_PARTITIONS=4")
        if not self.broker.strip():
            raise ConfigError("TAGSTREAM_BROKER is empty: set it to e.g. kafka://127.0.0.1:9092")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"TAGSTREAM_LOG_LEVEL={self.log_level!r}: use debug, info, warning or error")
        self._check_connection()

    def _check_connection(self) -> None:
        protocols = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
        if self.security_protocol not in protocols:
            raise ConfigError(f"TAGSTREAM_SECURITY_PROTOCOL={self.security_protocol!r}: use {', '.join(protocols)}")
        if self.security_protocol.startswith("SASL_"):
            mechanisms = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
            if self.sasl_mechanism not in mechanisms:
                raise ConfigError(f"TAGSTREAM_SASL_MECHANISM={self.sasl_mechanism!r}: use {', '.join(mechanisms)}")
            if not self.sasl_username:
                raise ConfigError(f"{self.security_protocol} needs a user: set TAGSTREAM_SASL_USERNAME "
                                  f"(or --sasl-username)")
            self.sasl_password()
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "sasl_password_file"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise ConfigError(f"TAGSTREAM_{name.upper()}={path!r}: no such file; point it at a readable file")
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ConfigError("mutual TLS needs both TAGSTREAM_SSL_CERTFILE and TAGSTREAM_SSL_KEYFILE (or neither)")
        if self.replication_factor < 1:
            raise ConfigError(f"TAGSTREAM_REPLICATION_FACTOR={self.replication_factor}: must be at least 1, e.g. 3")
        if not 1 <= self.min_insync_replicas <= self.replication_factor:
            raise ConfigError(f"TAGSTREAM_MIN_INSYNC_REPLICAS={self.min_insync_replicas}: must be between 1 and "
                              f"TAGSTREAM_REPLICATION_FACTOR={self.replication_factor}, e.g. 2 with 3 replicas")

    def sasl_password(self) -> str:
        """The SASL password: from `sasl_password_file`, else TAGSTREAM_SASL_PASSWORD. It is
        read here and handed to the clients only; it is not a field, so it is never in
        `to_environ`, `tagstream settings` or a log line."""
        if self.sasl_password_file:
            return read_secret_file("TAGSTREAM_SASL_PASSWORD_FILE", self.sasl_password_file, "the password")
        password = os.environ.get("TAGSTREAM_SASL_PASSWORD", "")
        if not password:
            raise ConfigError(f"{self.security_protocol} needs a password: set TAGSTREAM_SASL_PASSWORD_FILE "
                              f"to a file holding it (or TAGSTREAM_SASL_PASSWORD)")
        return password

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)

    def to_environ(self) -> dict[str, str]:
        """These settings as TAGSTREAM_* variables, to hand to a child process."""
        return {"TAGSTREAM_" + f.name.upper(): str(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def describe(cls) -> list[tuple[str, str, str]]:
        """(variable, default, help) for every setting: the source of `tagstream settings`."""
        rows = []
        for f in fields(cls):
            default = f.default
            if f.metadata.get("kind") == "duration":
                default = format_duration(default)
            rows.append(("TAGSTREAM_" + f.name.upper(), str(default), f.metadata.get("help", "")))
        return rows


_FIELDS = {f.name: f for f in fields(Settings)}


def format_duration(ms: int) -> str:
    for unit, size in (("d", DAY), ("h", HOUR), ("m", MINUTE), ("s", SECOND)):
        if ms and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def _convert(f: dataclasses.Field, raw: str, source: str) -> Any:
    kind = f.metadata.get("kind")
    try:
        if kind == "duration":
            return parse_duration_ms(raw)
        if f.type in ("int", int):
            return int(raw)
        return str(raw)
    except ValueError:
        example = format_duration(f.default) if kind == "duration" else f.default
        what = "a duration like 30m, 7d or 500ms" if kind == "duration" else "an integer"
        raise ConfigError(f"{source}={raw!r}: expected {what}, e.g. {source}={example}") from None


def read_secret_file(setting: str, path: str, what: str) -> str:
    """A secret from the file a `*_FILE` setting names; a one-line ConfigError if unreadable
    or empty (the message names the setting and the path, never the content)."""
    try:
        with open(path, encoding="utf-8") as f:
            value = f.read().strip()
    except OSError as exc:
        raise ConfigError(f"{setting}={path!r}: cannot read it ({exc.strerror}); point it at a readable file") from None
    if not value:
        raise ConfigError(f"{setting}={path!r} is empty; write {what} into it")
    return value
