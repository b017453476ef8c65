"""Reusable harness for the integration and e2e tests: processor subprocesses, waits, reads.

Builds on ``meterline.devstack.dev`` (``Services``, ``snapshot``, ``compare``,
``read_dlq``) rather than re-implementing it; what is added here is what tests
need and ``meterline dev`` does not: several named workers, SIGKILL/SIGTERM of
one of them, environment isolation, and waits with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import asyncpg
import yaml
from prometheus_client.parser import text_string_to_metric_families

from meterline.config import Settings
from meterline.devstack.dev import Services, Snapshot, compare, read_dlq, read_topic, snapshot
from meterline.devstack.load import LoadGenerator
from meterline.kafka.security import KafkaTarget

__all__ = [
    "FakeClock", "Fleet", "Message", "Record", "Sample", "Sender", "assert_exact",
    "assert_ledger_integrity", "compare", "db_pool", "fleet", "metric_value", "owners", "read_dlq",
    "read_messages", "scrape", "send_until_exact", "snapshot", "wait_for_ledger",
    "wait_for_owners", "wait_until",
    "write_settings",
]

# The subprocess must run on exactly the YAML we write, not on whatever the shell exports.
_ISOLATE_ENV = ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS", "METERLINE_CONFIG")


def write_settings(settings: Settings, path: Path) -> Path:
    """Dump `settings` as a YAML config file a `meterline -c` process loads back identically."""
    path.write_text(yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False))
    return path


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in _ISOLATE_ENV and not k.startswith("METERLINE_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Fleet(Services):
    """Processor workers as subprocesses, one per worker id (its `--worker-id` and log name).

    `procs` holds the live ones (so `check_alive` and `stop` from `Services` apply);
    killed or stopped workers move to `gone`.
    """

    gone: list[tuple[str, int]] = field(default_factory=list)

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        """Start worker `name` (`meterline processor --worker-id name`); cwd = workdir.

        The working directory matters: Faust writes `<app id>-data/` into it.
        """
        return self.service(name, "processor", "--worker-id", name, *args)

    def service(self, name: str, command: str, *args: str) -> subprocess.Popen[bytes]:
        """Start `meterline <command> <args>` as process `name` (its log is `<name>.log`)."""
        return self.spawn(name, "-m", "meterline.cli", "-c", str(self.config), command, *args)

    def spawn(self, name: str, *python_args: str) -> subprocess.Popen[bytes]:
        """Start `python <python_args>` as process `name` (its log is `<name>.log`)."""
        if name in self.procs:
            raise RuntimeError(f"{name} is already running")
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(
            [sys.executable, *python_args],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.workdir,
            env=_child_env(),
        )
        log.close()
        self.procs[name] = proc
        return proc

    def kill(self, name: str) -> None:
        """SIGKILL: no shutdown code runs, like a crashed node."""
        proc = self.procs.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        self.gone.append((name, proc.returncode))

    def terminate(self, name: str, timeout: float = 20) -> int:
        """SIGTERM and wait for a clean exit (SIGKILL after `timeout`); return the exit code."""
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self.gone.append((name, proc.returncode))
        return proc.returncode

    def stop(self, timeout: float = 15) -> None:
        super().stop(timeout)
        for name, proc in list(self.procs.items()):
            self.gone.append((name, proc.returncode))
        self.procs.clear()

    def logs(self, chars: int = 4000) -> str:
        out = []
        for path in sorted(self.workdir.glob("*.log")):
            out.append(f"--- {path.name} ---\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(out)


@contextlib.contextmanager
def fleet(settings: Settings, workdir: Path, *workers: str) -> Iterator[Fleet]:
    """A `Fleet` on `settings` with `workers` started; every worker is stopped on exit."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = write_settings(settings, workdir / "meterline.yaml")
    f = Fleet(config, workdir)
    try:
        for w in workers:
            f.start(w)
        yield f
    except BaseException:
        # Leave the workers' log tails in the test report.
        print(f.logs(), file=sys.stderr)
        raise
    finally:
        f.stop()


@contextlib.asynccontextmanager
async def db_pool(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    assert pool is not None
    try:
        yield pool
    finally:
        await pool.close()


# --- waiting ----------------------------------------------------------------------------


async def wait_until(
    check: Callable[[], Awaitable[Any]],
    timeout: float,
    what: str,
    workers: Fleet | None = None,
    interval: float = 0.25,
) -> Any:
    """Poll `check` until it returns something truthy; fail after `timeout` s (or a dead worker)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        if workers is not None:
            workers.check_alive()
        last = await check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")
        await asyncio.sleep(interval)


async def owners(pool: asyncpg.Pool, settings: Settings) -> dict[int, tuple[str | None, int]]:
    """partition -> (owner, epoch) of the usage topic's checkpoints."""
    rows = await pool.fetch(
        "SELECT partition, owner, epoch FROM partition_checkpoints WHERE topic = $1",
        settings.kafka.usage_topic)
    return {r["partition"]: (r["owner"], r["epoch"]) for r in rows}


async def wait_for_owners(
    pool: asyncpg.Pool,
    settings: Settings,
    expected: Callable[[dict[int, str | None]], bool] | set[str],
    timeout: float = 60,
    workers: Fleet | None = None,
) -> dict[int, tuple[str | None, int]]:
    """Wait until every partition is claimed and the owners satisfy `expected`.

    `expected` is either the exact set of owners wanted, or a predicate on
    {partition: owner}.
    """
    n = settings.kafka.partitions

    async def check() -> dict[int, tuple[str | None, int]] | None:
        now = await owners(pool, settings)
        by_part = {p: o for p, (o, _) in now.items()}
        if len(now) < n:
            return None
        ok = (set(by_part.values()) == expected if isinstance(expected, set)
              else expected(by_part))
        return now if ok else None

    result: dict[int, tuple[str | None, int]] = await wait_until(
        check, timeout, f"partition owners {expected}", workers)
    return result


async def wait_for_ledger(
    pool: asyncpg.Pool,
    gen: LoadGenerator,
    timeout: float = 60,
    workers: Fleet | None = None,
    settle: float = 0.0,
    stall: float = 15.0,
) -> Snapshot:
    """Wait until the ledger equals `gen.expected()` and every sent event is counted; return it.

    Returns the last snapshot on `timeout`, or once the debited event count has
    not moved for `stall` seconds (a lost record never shows up; the caller's
    exact assertions then say what is wrong). With `settle` > 0, waits that long
    more afterwards and snapshots again, so a late double debit would still show.
    """
    expected = gen.expected()
    sent = gen.stats.events_sent
    deadline = time.monotonic() + timeout
    last_change, last_count = time.monotonic(), -1
    while True:
        if workers is not None:
            workers.check_alive()
        snap = await snapshot(pool)
        if snap.events_debited >= sent and not compare(expected, snap.debited):
            break
        now = time.monotonic()
        if snap.events_debited != last_count:
            last_change, last_count = now, snap.events_debited
        if now > deadline or now - last_change > stall:
            return snap
        await asyncio.sleep(0.25)
    if settle:
        await asyncio.sleep(settle)
        snap = await snapshot(pool)
    return snap


def assert_exact(snap: Snapshot, gen: LoadGenerator) -> None:
    """The two equalities every test checks: debits per customer, and debited event count."""
    mismatches = compare(gen.expected(), snap.debited)
    assert not mismatches, f"ledger differs from the generator for {len(mismatches)} customers: {mismatches[:5]}"
    assert snap.debited == {c: d for c, d in gen.expected().items() if d != 0}
    assert snap.events_debited == gen.stats.events_sent


async def assert_ledger_integrity(pool: asyncpg.Pool, events_sent: int) -> None:
    """Invariants that a lost or doubled flush would break.

    - one dedupe mark per unique event, none missing, none extra;
    - every billable aggregate has exactly one debit entry, of its credits;
    - every balance equals the sum of its customer's ledger entries.
    """
    marks = await pool.fetchval("SELECT count(*) FROM dedupe_marks")
    assert marks == events_sent, f"{marks} dedupe marks for {events_sent} unique events"
    bad = await pool.fetch("""
        SELECT a.id, a.credits, count(l.id) AS entries, coalesce(sum(l.amount), 0) AS amount
        FROM window_aggregates a LEFT JOIN ledger_entries l ON l.aggregate_id = a.id
        GROUP BY a.id, a.credits
        HAVING count(l.id) <> (CASE WHEN a.credits = 0 THEN 0 ELSE 1 END)
            OR coalesce(sum(l.amount), 0) <> -a.credits""")
    assert not bad, f"aggregates without exactly one matching debit: {[dict(r) for r in bad[:5]]}"
    off = await pool.fetch("""
        SELECT b.customer_id, b.balance, coalesce(sum(l.amount), 0) AS ledger
        FROM balances b LEFT JOIN ledger_entries l USING (customer_id)
        GROUP BY b.customer_id, b.balance HAVING b.balance <> coalesce(sum(l.amount), 0)""")
    assert not off, f"balances differ from their ledger: {[dict(r) for r in off[:5]]}"


async def send_until_exact(
    pool: asyncpg.Pool, gen: LoadGenerator, *, rate: float, seconds: float, workers: Fleet,
    timeout: float = 60,
) -> Snapshot:
    """Send `gen`'s events at `rate` for `seconds`, wait for the ledger to take them all and
    assert it is exact and consistent (`assert_exact`, `assert_ledger_integrity`)."""
    with Sender(gen, rate) as sender:
        await asyncio.sleep(seconds)
        sender.stop()
    snap = await wait_for_ledger(pool, gen, timeout=timeout, workers=workers, settle=1.5)
    assert_exact(snap, gen)
    await assert_ledger_integrity(pool, gen.stats.events_sent)
    return snap


# --- sending ----------------------------------------------------------------------------


class Sender:
    """`gen.run(rate)` in a thread until `stop()`; always stopped by the context manager."""

    def __init__(self, gen: LoadGenerator, rate: float) -> None:
        self.gen = gen
        self.rate = rate
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="load-sender", daemon=True)

    def _run(self) -> None:
        try:
            self.gen.run(self.rate, 0, self._stop)
        except BaseException as exc:  # noqa: BLE001 - re-raised in stop()
            self._error = exc

    def __enter__(self) -> Sender:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(90)

    def stop(self) -> None:
        """Stop sending, wait until everything sent is acknowledged by the broker."""
        self._stop.set()
        self._thread.join(90)
        if self._thread.is_alive():
            raise AssertionError("the load sender did not stop within 90 s")
        if self._error is not None:
            raise self._error


# --- metrics ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def scrape(port: int) -> list[Sample]:
    """Every sample a meterline process serves on /metrics (`metrics_port`)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return [Sample(s.name, dict(s.labels), s.value)
            for family in text_string_to_metric_families(text) for s in family.samples]


def metric_value(samples: list[Sample], name: str, **labels: str) -> float:
    """Sum of `name`'s samples whose labels include `labels` (0 when there is none)."""
    return sum(s.value for s in samples
               if s.name == name and labels.items() <= s.labels.items())


# --- in-memory records for Pipeline-level tests ------------------------------------------


@dataclass(slots=True)
class Record:
    """What `Pipeline.ingest` reads of a Kafka record."""

    offset: int
    key: bytes | None
    value: bytes | None


class FakeClock:
    """A pipeline clock the test moves: `clock.now = ...`."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- reading topics ---------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]


def read_messages(bootstrap: KafkaTarget, topic: str, quiet_seconds: float = 2.0) -> list[Message]:
    """Every message of `topic` (see `meterline.devstack.dev.read_topic`), as plain tuples."""
    out: list[Message] = []
    for m in read_topic(bootstrap, topic, quiet_seconds):
        partition, offset = m.partition(), m.offset()
        assert partition is not None and offset is not None
        raw = cast(list[tuple[str, bytes | None]], m.headers() or [])
        headers = {k: v or b"" for k, v in raw}
        out.append(Message(partition, offset, m.key(), m.value(), headers))
    return out
