"""What every handler needs, built once at start-up and stored on the aiohttp app."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
from aiohttp import web

from meterline.config import MeterConfig, Settings

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class ApiContext:
    settings: Settings
    pool: asyncpg.Pool
    clock: Clock
    meters: dict[str, MeterConfig]  # by meter key
    exports: asyncio.Semaphore  # CSV exports streaming now (each holds a pooled connection)

    @classmethod
    def create(cls, settings: Settings, pool: asyncpg.Pool, clock: Clock = utc_now) -> ApiContext:
        return cls(settings, pool, clock, {m.key: m for m in settings.meters},
                   asyncio.Semaphore(settings.api.max_concurrent_exports))


CONTEXT = web.AppKey("meterline_api_context", ApiContext)


def context(request: web.Request) -> ApiContext:
    return request.app[CONTEXT]
