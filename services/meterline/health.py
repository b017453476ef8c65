"""How a service rides out an outage and tells the world: readiness, liveness, back-off.

Readiness (`/readyz`) answers "can this service do its work right now": every dependency
(Postgres, Kafka) it used last time worked. A service whose database or broker is down is
not ready, and it keeps retrying with back-off; it never exits over an error it can retry.

Liveness (`/healthz`) answers "is it making progress": each of its loops completed a
round (a unit of work, an idle poll, or a failed attempt followed by its back-off) within
`stall_after_s`. A service waiting out an outage is alive but not ready; a loop that hangs
is not alive, and only then should an orchestrator restart it.

State changes are logged once (down, then up again), never per retry; every retry is
counted in `meterline_dependency_retries_total{service,dependency}`.

A loop that raises something it does not expect (a bug, not an outage) is contained by
`rounds`: counted in `meterline_loop_failures_total{service,loop}`, logged once with its
traceback until a round succeeds again, retried after a growing back-off. Its failed
rounds are no beat: a loop that only fails makes no progress, and liveness says so.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

from meterline import metrics
from meterline.metrics import Probe

log = logging.getLogger(__name__)

T = TypeVar("T")

POSTGRES = "postgres"
KAFKA = "kafka"


class Health:
    """One service's dependency states and loop heartbeats."""

    def __init__(
        self, service: str, *, stall_after_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service = service
        self.stall_after_s = stall_after_s
        self.clock = clock
        self._down: dict[str, str] = {}  # dependency -> why (exception type)
        self._failing: dict[str, str] = {}  # loop -> what it last raised
        self._beats: dict[str, float] = {}

    # --- dependencies --------------------------------------------------------------

    def up(self, dependency: str) -> None:
        metrics.DEPENDENCY_UP.labels(self.service, dependency).set(1)
        if self._down.pop(dependency, None) is not None:
            log.info("%s: %s is back; resuming", self.service, dependency)

    def down(self, dependency: str, exc: BaseException) -> None:
        metrics.DEPENDENCY_UP.labels(self.service, dependency).set(0)
        metrics.DEPENDENCY_RETRIES.labels(self.service, dependency).inc()
        if dependency not in self._down:
            log.warning("%s: %s unavailable (%r); not ready, retrying with back-off",
                        self.service, dependency, exc)
        self._down[dependency] = type(exc).__name__

    def ready(self) -> bool:
        return not self._down

    # --- loops ---------------------------------------------------------------------

    def beat(self, loop: str) -> None:
        """`loop` completed a round: it is not stuck."""
        self._beats[loop] = self.clock()
        metrics.LAST_PROGRESS.labels(self.service).set(time.time())
        if self._failing.pop(loop, None) is not None:
            log.info("%s: the %s loop completed a round again", self.service, loop)

    def failed(self, loop: str, exc: BaseException) -> None:
        """`loop` raised something it does not expect; it backs off and tries again."""
        metrics.LOOP_FAILURES.labels(self.service, loop).inc()
        if loop not in self._failing:
            log.error("%s: the %s loop failed; retrying with back-off", self.service, loop,
                      exc_info=exc)
        self._failing[loop] = type(exc).__name__

    def stalled(self) -> list[str]:
        now = self.clock()
        return sorted(k for k, t in self._beats.items() if now - t > self.stall_after_s)

    def _since_beat(self) -> dict[str, float]:
        now = self.clock()
        return {loop: round(now - t, 1) for loop, t in sorted(self._beats.items())}

    def live(self) -> bool:
        return not self.stalled()

    # --- HTTP probes (metrics.serve) -----------------------------------------------

    def probes(self) -> dict[str, Probe]:
        return {
            "/readyz": lambda: (self.ready(), {"service": self.service, "down": dict(self._down)}),
            "/healthz": lambda: (self.live(), {"service": self.service,
                                               "stalled": self.stalled(),
                                               "failing": dict(self._failing),
                                               "since_beat_s": self._since_beat()}),
        }

    async def rounds(
        self,
        round_: Callable[[], Awaitable[object]],
        stopping: Callable[[], bool],
        *,
        loop: str,
        interval_s: float,
        cap_s: float = 30.0,
    ) -> None:
        """Run `round_` every `interval_s` until `stopping()`; it never ends on an exception.

        A round that returns is a beat. One that raises is counted and logged (`failed`) and
        the next waits twice as long as the last, up to `cap_s`, until a round succeeds.
        """
        delay = interval_s
        while not stopping():
            try:
                await round_()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - contained: counted, logged, retried
                self.failed(loop, exc)
                delay = min(max(delay, interval_s, 0.1) * 2, cap_s)
            else:
                self.beat(loop)
                delay = interval_s
            await asyncio.sleep(delay)

    # --- retrying ------------------------------------------------------------------

    async def retrying(
        self,
        attempt: Callable[[], Awaitable[T]],
        stop: asyncio.Event,
        *,
        retry_on: Mapping[type[BaseException], str],
        loop: str,
        base_s: float = 0.1,
        cap_s: float = 5.0,
    ) -> T | None:
        """`await attempt()` until it succeeds (→ its result) or `stop` is set (→ None).

        An exception of a type in `retry_on` (exception type → the dependency it means is
        down) is reported and retried after an exponential back-off; others propagate.
        On success every dependency named in `retry_on` is reported up.
        """
        retryable = tuple(retry_on)
        delay = base_s
        while not stop.is_set():
            try:
                result = await attempt()
            except retryable as exc:
                self.down(_dependency(retry_on, exc), exc)
                self.beat(loop)  # waiting out an outage is not a stall
                if await stopped_within(stop, delay):
                    return None
                delay = min(delay * 2, cap_s)
                continue
            for dependency in set(retry_on.values()):
                self.up(dependency)
            self.beat(loop)
            return result
        return None


def _dependency(retry_on: Mapping[type[BaseException], str], exc: BaseException) -> str:
    return next(dep for kind, dep in retry_on.items() if isinstance(exc, kind))


async def stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep up to `seconds`; True if `stop` was set meanwhile."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True
