"""The API's aiohttp application, its in-process start/stop, and `meterline api`.

One middleware does the cross-cutting work for every request, in this order:
time it and label it by route *template* (bounded metric cardinality),
require a bearer token under /v1, and turn every failure into the JSON error
shape `{"error": {"code", "message"}}`. Handlers raise `ApiError`; anything
else is a 500 whose details go to the log, not to the client (headers, and so
tokens, are never logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Self

import asyncpg
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from meterline.api import balance, credits, customers, export, usage
from meterline.api.auth import CHALLENGE, TokenChecker, load_tokens
from meterline.api.context import CONTEXT, ApiContext, Clock, utc_now
from meterline.api.wire import ApiError, StreamAborted, error_response, json_response
from meterline.config import Settings
from meterline.metrics import API_AUTH_FAILURES, API_REQUEST_DURATION, API_REQUESTS

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
TOKENS = web.AppKey("meterline_api_tokens", TokenChecker)
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large",
               415: "unsupported_media_type"}


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    route = _route(request)
    status = 500
    try:
        response = await _answer(request, handler)
        status = response.status
        return response
    finally:
        API_REQUESTS.labels(route, str(status)).inc()
        API_REQUEST_DURATION.labels(route).observe(time.perf_counter() - started)


async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith("/v1/"):
        failure = request.app[TOKENS].check(request.headers.get("Authorization"))
        if failure is not None:
            API_AUTH_FAILURES.labels(failure).inc()
            challenge = CHALLENGE if failure == "missing" else CHALLENGE + ', error="invalid_token"'
            return error_response(401, "unauthorized", "a valid bearer token is required",
                                  {"WWW-Authenticate": challenge})
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.code, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "http_error")
        return error_response(exc.status, code, exc.reason,
                              {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None)
    except StreamAborted:
        raise  # the status line has gone out: aiohttp drops the connection, nothing to answer
    except (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError,
            asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError,
            asyncpg.ConnectionDoesNotExistError) as exc:
        log.warning("database unavailable for %s: %s", _route(request), type(exc).__name__)
        return error_response(503, "database_unavailable", "the database is not reachable")
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error in %s %s", request.method, _route(request))
        return error_response(500, "internal", "internal error")


async def healthz(request: web.Request) -> web.Response:
    """Alive: the process answers (no dependencies checked)."""
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready: the database answers a trivial query within a second."""
    try:
        await request.app[CONTEXT].pool.fetchval("SELECT 1", timeout=1)
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        return error_response(503, "not_ready", f"database: {type(exc).__name__}")
    return json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(REGISTRY),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


def build_app(ctx: ApiContext, tokens: TokenChecker) -> web.Application:
    app = web.Application(middlewares=[middleware],
                          client_max_size=ctx.settings.api.max_body_bytes)
    app[CONTEXT] = ctx
    app[TOKENS] = tokens
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/customers", customers.post_customer)
    app.router.add_get("/v1/customers/{id}/balance", balance.get_balance)
    app.router.add_get("/v1/customers/{id}/entitlements/{meter}", balance.get_entitlement)
    app.router.add_get("/v1/customers/{id}/usage", usage.get_usage)
    app.router.add_get("/v1/customers/{id}/ledger", usage.get_ledger)
    app.router.add_get("/v1/customers/{id}/export.csv", export.export_csv)
    app.router.add_post("/v1/customers/{id}/grants", credits.post_grant)
    return app


async def create_pool(settings: Settings) -> asyncpg.Pool:
    """A fixed-size pool (min = max): connections are opened once, never per request."""
    size = settings.api.pool_size
    pool = await asyncpg.create_pool(
        settings.database_url, min_size=size, max_size=size,
        command_timeout=settings.api.query_timeout_seconds,
        server_settings={"application_name": "meterline-api"})
    assert pool is not None
    return pool


class ApiServer:
    """The API in this process: `await ApiServer(settings, tokens).start()`, then `stop()`.

    `port` 0 in settings (or the `port` argument) binds a free port; read it back
    from `.port` / `.url` after start. Used by `meterline dev`, tests and `run`.
    """

    def __init__(self, settings: Settings, tokens: tuple[bytes, ...], *,
                 host: str | None = None, port: int | None = None, clock: Clock = utc_now) -> None:
        self.settings = settings
        self.host = host if host is not None else settings.api.host
        self.port = port if port is not None else settings.api.port
        self._checker = TokenChecker(tokens)
        self._clock = clock
        self._pool: asyncpg.Pool | None = None
        self._runner: web.AppRunner | None = None
        self.context: ApiContext | None = None  # while running: settings, pool, clock, ...

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> Self:
        self._pool = await create_pool(self.settings)
        try:
            self.context = ApiContext.create(self.settings, self._pool, self._clock)
            app = build_app(self.context, self._checker)
            self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await self._runner.setup()
            site = web.TCPSite(self._runner, self.host, self.port, backlog=1024)
            await site.start()
        except BaseException:
            await self.stop()
            raise
        self.port = int(self._runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        pool, self._pool = self._pool, None
        if runner is not None:
            await runner.cleanup()
        if pool is not None:
            await pool.close()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()


def run(settings: Settings) -> None:
    """Blocking entry point of `meterline api`: serve until SIGTERM or SIGINT."""
    tokens = load_tokens(os.environ)  # raises ConfigError (exit 2) without usable tokens

    async def main() -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        async with ApiServer(settings, tokens) as server:
            log.info("meterline api listening on %s:%d (%d token(s))", server.host, server.port,
                     len(tokens))
            await stopping.wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
