"""meterline.health: readiness from dependency states, liveness from loop heartbeats."""

from __future__ import annotations

import asyncio
import logging

import pytest

from meterline import metrics
from meterline.health import KAFKA, POSTGRES, Health


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _retries(service: str, dependency: str) -> float:
    return metrics.DEPENDENCY_RETRIES.labels(service, dependency)._value.get()  # noqa: SLF001


def test_a_dependency_down_makes_the_service_not_ready_until_it_is_up_again() -> None:
    h = Health("unit-ready")
    assert h.ready()
    h.down(POSTGRES, OSError("gone"))
    h.down(KAFKA, TimeoutError())
    assert not h.ready()
    assert h.probes()["/readyz"]() == (False, {"service": "unit-ready", "down": {
        POSTGRES: "OSError", KAFKA: "TimeoutError"}})
    h.up(POSTGRES)
    assert not h.ready()
    h.up(KAFKA)
    assert h.ready()
    assert metrics.DEPENDENCY_UP.labels("unit-ready", KAFKA)._value.get() == 1  # noqa: SLF001


def test_an_outage_is_logged_once_however_many_retries(caplog: pytest.LogCaptureFixture) -> None:
    h = Health("unit-log")
    before = _retries("unit-log", POSTGRES)
    with caplog.at_level(logging.INFO, logger="meterline.health"):
        for _ in range(50):
            h.down(POSTGRES, OSError())
        h.up(POSTGRES)
        h.up(POSTGRES)
    assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"]
    assert _retries("unit-log", POSTGRES) == before + 50


def test_a_loop_that_stops_beating_is_not_alive() -> None:
    clock = FakeClock()
    h = Health("unit-live", stall_after_s=60, clock=clock)
    h.beat("send")
    h.beat("stage")
    clock.now += 59
    h.beat("stage")
    assert h.live()
    clock.now += 2
    assert h.stalled() == ["send"]
    assert h.probes()["/healthz"]()[0] is False
    h.beat("send")
    assert h.live()


async def test_retrying_backs_off_until_the_attempt_succeeds() -> None:
    h = Health("unit-retry")
    calls = 0

    async def attempt() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionRefusedError("down")
        return "done"

    result = await h.retrying(attempt, asyncio.Event(), retry_on={OSError: POSTGRES},
                              loop="main", base_s=0.001)
    assert (result, calls, h.ready()) == ("done", 3, True)


async def test_retrying_gives_up_when_stopped_and_lets_other_errors_through() -> None:
    h = Health("unit-stop")
    stop = asyncio.Event()

    async def down() -> None:
        stop.set()
        raise OSError("down")

    assert await h.retrying(down, stop, retry_on={OSError: KAFKA}, loop="main") is None
    assert not h.ready()

    async def bug() -> None:
        raise KeyError("a bug is not an outage")

    with pytest.raises(KeyError):
        await h.retrying(bug, asyncio.Event(), retry_on={OSError: KAFKA}, loop="main")
