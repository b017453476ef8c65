"""Start-up checks: can this service reach the Postgres and Kafka it was configured with?

A service that starts against a wrong address should say so in one line and
exit, not print a traceback or retry forever before it ever worked. Once a
service is running, outages are ridden out by the service itself (it backs
off and reports not-ready); these checks run once, before that.

Addresses are shown without credentials: a DSN's password never reaches a log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from meterline.config import KafkaConfig
from meterline.kafka.security import KafkaTarget, kafka_config, librdkafka_config

# librdkafka logs every failed connection attempt; the one-line verdict is enough.
_QUIET = logging.getLogger("meterline.preflight.librdkafka")
_QUIET.setLevel(logging.CRITICAL)


class Unreachable(Exception):
    """A dependency could not be reached at start-up; the message is one line for the operator."""


def redact_dsn(dsn: str) -> str:
    """`dsn` without its password (URL form `postgresql://u:p@h/db` or libpq `k=v` form)."""
    if "://" in dsn:
        parts = urlsplit(dsn)
        if parts.password is None:
            return dsn
        host = parts.hostname or ""
        netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return " ".join(
        "password=***" if item.lower().startswith("password=") else item for item in dsn.split())


def check_postgres(dsn: str, timeout_s: float = 10.0) -> None:
    """Connect once and run `SELECT 1`; raise `Unreachable` naming the server if it fails."""

    async def probe() -> None:
        conn = await asyncpg.connect(dsn, timeout=timeout_s)
        try:
            await conn.fetchval("SELECT 1")
        finally:
            await conn.close()

    try:
        asyncio.run(probe())
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise Unreachable(
            f"cannot reach PostgreSQL at {redact_dsn(dsn)}: {reason} — check DATABASE_URL "
            "(or database_url in the config), that the server is running and that it accepts "
            "this user from this host") from exc


def check_kafka(kafka: KafkaTarget, timeout_s: float = 10.0) -> None:
    """Fetch cluster metadata once, with the configured security; raise `Unreachable`
    naming the brokers if it fails.

    A refused TLS handshake or SASL login is final: it fails at once, with the broker's
    reason and the settings to check, instead of after `timeout_s` of silent retries.
    """
    kafka = kafka_config(kafka)
    refused: list[KafkaError] = []

    def on_error(err: KafkaError) -> None:
        if err.code() in _REFUSED or err.fatal():
            refused.append(err)

    where = f"{kafka.bootstrap_servers} ({_describe(kafka)})"
    try:
        admin = AdminClient(librdkafka_config(kafka, logger=_QUIET, error_cb=on_error))
    except KafkaException as exc:  # e.g. a CA file that is not PEM
        raise Unreachable(f"cannot use the kafka: security settings for {where}: "
                          f"{exc.args[0].str() if exc.args else exc}") from exc
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin.list_topics(timeout=min(0.5, max(0.01, deadline - time.monotonic())))
            return
        except KafkaException as exc:
            last = exc.args[0] if exc.args else exc
        admin.poll(0.05)  # serves error_cb
        if refused:
            err = refused[0]
            raise Unreachable(f"Kafka at {where} refused us: {err.str()} — check "
                              f"{_REFUSED_HINTS.get(err.code(), 'the kafka: security settings')}")
        if time.monotonic() >= deadline:
            reason = last.str() if isinstance(last, KafkaError) else str(last)
            raise Unreachable(
                f"cannot reach Kafka at {where}: {reason} — check KAFKA_BOOTSTRAP_SERVERS (or "
                "kafka.bootstrap_servers in the config), kafka.security_protocol, that the "
                "brokers are running and that this host can connect to them")


# Errors that retrying cannot fix: the broker's certificate or our credentials.
_REFUSED_HINTS = {
    KafkaError._SSL: "kafka.ssl_ca_file (the CA that signed the broker's certificate), "
                     "kafka.ssl_check_hostname and the client certificate (ssl_cert_file, "
                     "ssl_key_file)",
    KafkaError._AUTHENTICATION: "kafka.sasl_mechanism, kafka.sasl_username and the password "
                                "(METERLINE_KAFKA__SASL_PASSWORD or kafka.sasl_password_file)",
}
_REFUSED = frozenset(_REFUSED_HINTS)


def _describe(kafka: KafkaConfig) -> str:
    return " ".join(filter(None, [kafka.security_protocol, kafka.sasl_mechanism,
                                  kafka.sasl_username and f"user {kafka.sasl_username}"]))
