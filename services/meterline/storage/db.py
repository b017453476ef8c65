"""Postgres connections (asyncpg) and the migration runner."""

from __future__ import annotations

import logging
from importlib import resources
from urllib.parse import urlsplit, urlunsplit

import asyncpg

log = logging.getLogger(__name__)

# Any number: the advisory lock that serialises concurrent `meterline migrate` runs.
_MIGRATION_LOCK = 0x6D65746572

# What a database outage looks like to asyncpg (crash, restart, no free connection slot,
# a connection dropped mid-operation): retry with back-off, never exit. InterfaceError and
# InternalClientError are raised on a connection that died under an operation.
DATABASE_UNAVAILABLE: tuple[type[Exception], ...] = (
    asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError,
    TimeoutError)


def with_database(dsn: str, database: str) -> str:
    """The same server and credentials as `dsn`, another database (keeps ?host=... for sockets)."""
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{database}"))


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 4) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size, command_timeout=60)
    assert pool is not None
    return pool


def migration_files() -> list[tuple[str, str]]:
    """(name, sql) of every migration, in order of their number."""
    folder = resources.files("meterline.storage") / "migrations"
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".sql")), key=lambda f: f.name)
    return [(f.name, f.read_text()) for f in files]


async def migrate(dsn: str) -> list[str]:
    """Apply pending migrations, each in its own transaction; return the names applied."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
        applied = []
        for name, sql in migration_files():
            if name in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)
            log.info("applied migration %s", name)
            applied.append(name)
        return applied
    finally:
        await conn.close()
