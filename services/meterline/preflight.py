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
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

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


def check_kafka(bootstrap_servers: str, timeout_s: float = 10.0) -> None:
    """Fetch cluster metadata once; raise `Unreachable` naming the brokers if it fails."""
    config: dict[str, Any] = {"bootstrap.servers": bootstrap_servers, "logger": _QUIET}
    admin = AdminClient(config)
    try:
        admin.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        err = exc.args[0] if exc.args else exc
        reason = err.str() if hasattr(err, "str") else str(err)
        raise Unreachable(
            f"cannot reach Kafka at {bootstrap_servers}: {reason} — check "
            "KAFKA_BOOTSTRAP_SERVERS (or kafka.bootstrap_servers in the config), that the "
            "brokers are running and that this host can connect to them") from exc
