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


async def test_rounds_contain_an_unexpected_exception_log_it_once_and_back_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    h = Health("unit-rounds", stall_after_s=10, clock=clock)
    calls: list[float] = []
    loop = asyncio.get_running_loop()
    stop = False

    async def round_() -> None:
        nonlocal stop
        calls.append(loop.time())
        if len(calls) <= 3:
            raise KeyError("a bug, not an outage")
        stop = len(calls) >= 5

    failures = metrics.LOOP_FAILURES.labels("unit-rounds", "work")
    before = failures._value.get()  # noqa: SLF001
    with caplog.at_level(logging.INFO, logger="meterline.health"):
        await asyncio.wait_for(
            h.rounds(round_, lambda: stop, loop="work", interval_s=0.01, cap_s=0.5), 5)
    assert len(calls) == 5  # the exceptions did not end the loop
    assert failures._value.get() == before + 3  # noqa: SLF001
    gaps = [b - a for a, b in zip(calls, calls[1:], strict=False)]
    # backed off after each failure (from 0.1 s, doubling, up to the cap), not after success
    for gap, delay in zip(gaps, (0.2, 0.4, 0.5), strict=False):
        assert delay <= gap < delay + 0.15
    assert gaps[3] < 0.15
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "work loop failed" in errors[0].getMessage()
    assert errors[0].exc_info is not None  # the traceback, once
    assert any("completed a round again" in r.getMessage() for r in caplog.records)
    assert h.probes()["/healthz"]()[1]["failing"] == {}


async def test_a_loop_that_only_fails_is_not_alive() -> None:
    clock = FakeClock()
    h = Health("unit-failing", stall_after_s=10, clock=clock)
    h.beat("work")
    stop = False

    async def round_() -> None:
        nonlocal stop
        clock.now += 11  # time passes; no round succeeds
        stop = True
        raise ValueError("still broken")

    await h.rounds(round_, lambda: stop, loop="work", interval_s=0.01)
    assert not h.live()
    assert h.probes()["/healthz"]() == (False, {"service": "unit-failing", "stalled": ["work"],
                                                "failing": {"work": "ValueError"},
                                                "since_beat_s": {"work": 11.0}})
