"""`meterline webhook-bridge`: Stripe webhooks in, verified events on `kafka.stripe_events_topic`.

    POST /webhooks/stripe   200 only once the event is durably in Kafka (acks=all)
                            400 not a fresh, authentic Stripe event (reason in the body)
                            413 body over webhook_bridge.max_body_bytes
                            503 Kafka did not acknowledge in time: Stripe retries for days
    GET  /healthz           200 while its broker probe keeps completing rounds, else 503
    GET  /readyz            200 while the broker answered recently, else 503
    GET  /metrics           Prometheus exposition

The message is the raw body, byte for byte, keyed by the Stripe customer id, with the
event's type, id and API version in headers (see intake.py, publisher.py).

Stateless, so run as many replicas as you like behind one load balancer: nothing is
remembered between requests. A replayed or retried event is published again and
answered 200 again; the topic is at-least-once and its consumer dedupes by event id.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from meterline import metrics
from meterline.config import Settings
from meterline.webhooks.intake import Outcome, WebhookRejected, admit
from meterline.webhooks.publisher import PublishFailed, StripeEventPublisher
from meterline.webhooks.signing_secrets import SigningSecrets, resolve_signing_secrets

log = logging.getLogger(__name__)

WEBHOOK_PATH = "/webhooks/stripe"

_STATUS = {Outcome.ACCEPTED: 200, Outcome.TOO_LARGE: 413, Outcome.KAFKA_UNAVAILABLE: 503}
_BODY = {o: b'{"outcome":"%s"}' % o.value.encode() for o in Outcome}


class WebhookBridge:
    """The HTTP handlers and the producer behind them; `app()` wires them into aiohttp."""

    def __init__(
        self, settings: Settings, secrets: SigningSecrets, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.config = settings.webhook_bridge
        self.secrets = secrets
        self.clock = clock
        self.publisher = StripeEventPublisher(
            settings.kafka,
            settings.kafka.stripe_events_topic,
            delivery_timeout_s=self.config.delivery_timeout_ms / 1000,
            message_timeout_ms=self.config.message_timeout_ms,
            probe_interval_s=self.config.readiness_probe_interval_ms / 1000,
        )
        for outcome in Outcome:  # every series exists from the start, so rate() sees the first one
            metrics.WEBHOOK_REQUESTS.labels(outcome.value)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes)
        app.router.add_post(WEBHOOK_PATH, self.receive)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", _metrics)
        app.on_startup.append(self._start_publisher)
        app.on_cleanup.append(self._close_publisher)
        return app

    async def _start_publisher(self, _app: web.Application) -> None:
        await self.publisher.start()

    async def _close_publisher(self, _app: web.Application) -> None:
        await self.publisher.close()

    async def receive(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        outcome = await self._receive(request)
        metrics.WEBHOOK_REQUESTS.labels(outcome.value).inc()
        metrics.WEBHOOK_REQUEST_DURATION.labels(outcome.value).observe(
            time.perf_counter() - started)
        return web.Response(body=_BODY[outcome], status=_STATUS.get(outcome, 400),
                            content_type="application/json")

    async def _receive(self, request: web.Request) -> Outcome:
        limit = self.config.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return Outcome.TOO_LARGE  # refused before reading a byte of it
        try:
            raw = await request.read()  # chunked bodies: aiohttp enforces client_max_size
        except web.HTTPRequestEntityTooLarge:
            return Outcome.TOO_LARGE
        try:
            event = admit(raw, request.headers.get("Stripe-Signature"), self.secrets,
                          now=self.clock(), tolerance_seconds=self.config.tolerance_seconds)
        except WebhookRejected as rejected:
            return rejected.outcome
        try:
            await self.publisher.publish(event, raw)
        except PublishFailed:
            return Outcome.KAFKA_UNAVAILABLE  # publisher logs broker state changes, not each one
        return Outcome.ACCEPTED

    async def readyz(self, _request: web.Request) -> web.Response:
        if self.publisher.ready():
            return web.Response(text="ready\n")
        return web.Response(text="broker unreachable\n", status=503)

    async def healthz(self, _request: web.Request) -> web.Response:
        if self.publisher.liveness.live():
            return web.Response(text="ok\n")
        return web.Response(text="broker probe stalled\n", status=503)


async def _metrics(_request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


@dataclass
class RunningBridge:
    """A bridge serving on a port; `stop()` drains in-flight requests, then the producer."""

    settings: Settings
    bridge: WebhookBridge
    runner: web.AppRunner
    url: str  # base URL, e.g. http://127.0.0.1:8081

    @property
    def webhook_url(self) -> str:
        return self.url + WEBHOOK_PATH

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_bridge(
    settings: Settings,
    secrets: SigningSecrets,
    *,
    host: str | None = None,
    port: int | None = None,
    clock: Callable[[], float] = time.time,
) -> RunningBridge:
    """Serve the bridge in the running loop (`meterline dev`, tests); port 0 picks a free one.

    Returns once it listens and has probed the broker once.
    """
    cfg = settings.webhook_bridge
    bridge = WebhookBridge(settings, secrets, clock=clock)
    # Shutdown waits for in-flight requests: each ends within the delivery timeout.
    runner = web.AppRunner(bridge.app(), access_log=None,
                           shutdown_timeout=cfg.delivery_timeout_ms / 1000 + 1)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host if host is None else host,
                       cfg.port if port is None else port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_host, bound_port = runner.addresses[0][:2]
    if bound_host in ("0.0.0.0", "::"):
        bound_host = "127.0.0.1"
    return RunningBridge(settings, bridge, runner, f"http://{_url_host(bound_host)}:{bound_port}")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def run(settings: Settings) -> None:
    """Serve until SIGINT/SIGTERM; fails at once (ConfigError) without a signing secret."""
    secrets = resolve_signing_secrets(os.environ)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        running = await start_bridge(settings, secrets)
        log.info("webhook bridge listening on %s:%s%s -> topic %s (%d signing secret(s))",
                 settings.webhook_bridge.host, running.url.rsplit(":", 1)[1], WEBHOOK_PATH,
                 settings.kafka.stripe_events_topic, len(secrets))
        try:
            await stop.wait()
        finally:
            await running.stop()

    asyncio.run(main())
