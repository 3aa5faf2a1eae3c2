"""The connection settings of SPEC §8 and the one function that turns them into client
arguments (streams/kafka/connection.py): what each protocol gives aiokafka and Faust, the
one-line errors of a bad configuration, and that no client is built around it."""
from __future__ import annotations

import re
import ssl
from pathlib import Path

import faust
import pytest

from streams.kafka import admin
from streams.kafka.connection import client_kwargs, faust_kwargs, producer_kwargs, topic_configs
from streams.settings import ConfigError, Settings
from tests.integration.conftest import REPO

SYSTEM_CA = "/etc/ssl/certs/ca-certificates.crt"
PASSWORD = "s3cret-pw-9f2c"


def sasl_ssl(tmp_path: Path, **changes) -> Settings:
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD + "\n")
    return Settings.load({"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
                          "sasl_username": "tagstream", "sasl_password_file": str(password_file),
                          "ssl_cafile": SYSTEM_CA, **changes}, environ={})


def test_plaintext_is_the_default_and_adds_nothing():
    kwargs = client_kwargs(Settings.load(environ={}))
    assert kwargs == {"bootstrap_servers": "127.0.0.1:9092", "security_protocol": "PLAINTEXT"}
    assert producer_kwargs(Settings.load(environ={}))["acks"] == "all"
    assert producer_kwargs(Settings.load(environ={}))["enable_idempotence"] is True
    assert "broker_credentials" not in faust_kwargs(Settings.load(environ={}))


def test_sasl_ssl_gives_every_client_the_credentials_and_a_tls_context(tmp_path):
    settings = sasl_ssl(tmp_path)
    kwargs = client_kwargs(settings)
    assert kwargs["security_protocol"] == "SASL_SSL"
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kwargs["sasl_plain_username"] == "tagstream"
    assert kwargs["sasl_plain_password"] == PASSWORD            # read from the file, stripped
    assert isinstance(kwargs["ssl_context"], ssl.SSLContext)
    assert kwargs["ssl_context"].verify_mode == ssl.CERT_REQUIRED
    credentials = faust_kwargs(settings)["broker_credentials"]
    assert isinstance(credentials, faust.SASLCredentials)
    assert credentials.protocol.value == "SASL_SSL" and credentials.mechanism.value == "SCRAM-SHA-512"
    assert credentials.password == PASSWORD


def test_the_password_is_in_no_field_no_child_environment_and_no_repr(tmp_path):
    settings = sasl_ssl(tmp_path)
    assert PASSWORD not in repr(settings)
    assert PASSWORD not in str(settings.to_environ())
    assert PASSWORD not in repr(faust_kwargs(settings)["broker_credentials"])
    assert all(PASSWORD not in row for rows in Settings.describe() for row in rows)


def test_the_password_may_come_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TAGSTREAM_SASL_PASSWORD", "from-env")
    settings = Settings.load({"security_protocol": "SASL_PLAINTEXT", "sasl_username": "u"}, environ={})
    assert client_kwargs(settings)["sasl_plain_password"] == "from-env"
    assert "ssl_context" not in client_kwargs(settings)


def test_ssl_only_gives_a_tls_context_and_faust_ssl_credentials():
    settings = Settings.load({"security_protocol": "SSL", "ssl_cafile": SYSTEM_CA}, environ={})
    assert "sasl_mechanism" not in client_kwargs(settings)
    assert isinstance(faust_kwargs(settings)["broker_credentials"], faust.SSLCredentials)


@pytest.mark.parametrize("changes, names", [
    ({"security_protocol": "SASL_TLS"}, "TAGSTREAM_SECURITY_PROTOCOL"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "GSSAPI", "sasl_username": "u"}, "TAGSTREAM_SASL_MECHANISM"),
    ({"security_protocol": "SASL_SSL"}, "TAGSTREAM_SASL_USERNAME"),
    ({"security_protocol": "SASL_SSL", "sasl_username": "u"}, "TAGSTREAM_SASL_PASSWORD_FILE"),
    ({"security_protocol": "SASL_SSL", "sasl_username": "u", "sasl_password_file": "/nonexistent/pw"},
     "TAGSTREAM_SASL_PASSWORD_FILE"),
    ({"security_protocol": "SSL", "ssl_cafile": "/nonexistent/ca.pem"}, "TAGSTREAM_SSL_CAFILE"),
    ({"ssl_certfile": SYSTEM_CA}, "TAGSTREAM_SSL_KEYFILE"),
    ({"replication_factor": "3", "min_insync_replicas": "4"}, "TAGSTREAM_MIN_INSYNC_REPLICAS"),
    ({"replication_factor": "0"}, "TAGSTREAM_REPLICATION_FACTOR"),
])
def test_a_bad_connection_setting_is_one_line_that_names_it(changes, names):
    with pytest.raises(ConfigError) as raised:
        Settings.load(changes, environ={})
    message = str(raised.value)
    assert names in message and "\n" not in message


def test_a_ca_file_that_is_not_a_certificate_is_refused_naming_the_setting(tmp_path):
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate")
    settings = Settings.load({"security_protocol": "SSL", "ssl_cafile": str(bogus)}, environ={})
    with pytest.raises(ConfigError, match="TAGSTREAM_SSL_CAFILE"):
        client_kwargs(settings)


def test_every_topic_tagstream_creates_gets_the_replication_settings():
    settings = Settings.load({"replication_factor": "3", "min_insync_replicas": "2"}, environ={})
    assert topic_configs(settings) == {"min.insync.replicas": "2"}
    for name in admin.TOPIC_SETTINGS:
        assert admin.topic_configs(name, settings)["min.insync.replicas"] == "2"
    assert faust_kwargs(settings)["topic_replication_factor"] == 3


def test_no_client_is_built_around_the_connection_function():
    """Every aiokafka client and the Faust app get their arguments from
    streams/kafka/connection.py: nothing else in the product passes bootstrap_servers."""
    offenders = []
    for path in [*(REPO / "streams").rglob("*.py"), *(REPO / "agents").rglob("*.py")]:
        if path.name in ("connection.py", "settings.py"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"bootstrap_servers\s*=|broker=s\.", line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert offenders == []


def test_the_faust_apps_own_producer_is_idempotent_too(tmp_path):
    from streams.topology import build_topology
    topology = build_topology(Settings.load({"data_dir": str(tmp_path)}, environ={}))
    extra = topology.app.transport.Producer._settings_extra(None)
    assert extra == {"acks": "all", "enable_idempotence": True}
