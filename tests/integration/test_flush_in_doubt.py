"""A flush whose connection breaks inside its transaction: Postgres says whether it counts.

The ambiguous case is a COMMIT the server carried out but whose answer never reached the
client. A proxy between the pipeline and the real Postgres passes the flush's COMMIT to
the server, waits for the server's answer, and breaks the client's connection instead of
forwarding it. The pipeline must count that flush as done (exact debits, no second
application, no endless retry on `flush_tokens_pkey`) and move on to the next one.
The other case — the connection breaks before COMMIT — must be retried.

In-process, one `Pipeline` (no Faust) on a migrated database, time injected through its
clock, as in test_fencing.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest
from prometheus_client import REGISTRY

from meterline.config import Settings
from meterline.devstack.load import LoadGenerator, customer_ids
from meterline.processor.dlq import DlqWriter
from meterline.processor.pipeline import Pipeline, RecordRun
from meterline.storage.db import create_pool

from .harness import FakeClock, Record, assert_exact, assert_ledger_integrity, snapshot

pytestmark = pytest.mark.integration

EVENTS = 300
READY_FOR_QUERY = b"Z\x00\x00\x00\x05"  # the server's "done, next command" message


class ConnectionCutter:
    """A byte-level proxy in front of Postgres that can break one connection on cue.

    Armed with a marker (a piece of SQL text), it watches what clients send: the first
    message holding the marker is either passed to the server and the server's answer
    swallowed (`deliver=True`: the statement ran, the client never hears) or dropped
    (`deliver=False`: the statement never ran); then both sides of that connection close.
    It listens the way the server does (a Unix socket directory or a TCP port), so the
    server authenticates clients exactly as it would without it.
    """

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        parts = urlsplit(dsn)
        self._query = dict(parse_qsl(parts.query))
        self._socket_dir = self._query.get("host", "")
        self._port = parts.port or int(self._query.get("port", 5432))
        self._hostname = parts.hostname or "127.0.0.1"
        self._marker: bytes | None = None
        self._deliver = False
        self._reply: bytes | None = None
        self.cuts = 0
        self._server: asyncio.AbstractServer | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="meterline-cutter-")

    def arm(self, marker: bytes, *, deliver: bool) -> None:
        self._marker, self._deliver = marker, deliver

    def arm_reply(self, tag: bytes) -> None:
        """Cut the first connection whose server reply holds `tag` (a command tag such as
        b"INSERT 0 "), once the server said it is done with it (ReadyForQuery): the
        statement ran and committed; the client never hears."""
        self._reply = tag

    async def start(self) -> str:
        """Start listening; the DSN that goes through the proxy."""
        parts = urlsplit(self.dsn)
        if self._socket_dir.startswith("/"):
            path = Path(self._dir.name) / f".s.PGSQL.{self._port}"
            self._server = await asyncio.start_unix_server(self._client, path=str(path))
            query = urlencode({**self._query, "host": self._dir.name})
            return urlunsplit(parts._replace(query=query))
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        netloc = parts.netloc.rsplit("@", 1)
        address = f"127.0.0.1:{port}"
        return urlunsplit(parts._replace(
            netloc=f"{netloc[0]}@{address}" if len(netloc) == 2 else address))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._dir.cleanup()

    async def _connect_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._socket_dir.startswith("/"):
            return await asyncio.open_unix_connection(
                str(Path(self._socket_dir) / f".s.PGSQL.{self._port}"))
        return await asyncio.open_connection(self._hostname, self._port)

    async def _client(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        s_reader, s_writer = await self._connect_upstream()
        swallow = asyncio.Event()  # the next server bytes answer the marked statement

        async def upstream() -> None:
            while data := await c_reader.read(65536):
                marker = self._marker
                if marker is not None and marker in data:
                    self._marker = None
                    self.cuts += 1
                    if not self._deliver:
                        return  # dropped: the statement never reaches the server
                    swallow.set()
                s_writer.write(data)
                await s_writer.drain()

        async def downstream() -> None:
            while data := await s_reader.read(65536):
                if swallow.is_set():
                    return  # the server answered; the client never hears it
                if self._reply is not None and self._reply in data:
                    self._reply = None
                    self.cuts += 1
                    while READY_FOR_QUERY not in data:
                        data = await s_reader.read(65536)
                    return  # the server is done with it; the client never hears
                c_writer.write(data)
                await c_writer.drain()

        tasks = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
        with contextlib.suppress(Exception):
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            t.cancel()
        for w in (c_writer, s_writer):
            w.close()
            with contextlib.suppress(Exception):
                await w.wait_closed()


def in_doubt(outcome: str) -> float:
    return REGISTRY.get_sample_value("meterline_flushes_in_doubt_total",
                                     {"outcome": outcome}) or 0.0


def _records(settings: Settings, gen: LoadGenerator, t0: float, first: int) -> list[Record]:
    t0_ms = int(t0 * 1000)
    out = []
    for i in range(first, first + EVENTS):
        customer, body = gen.make_event(t0_ms - (i % 3) * 450)  # current and previous window
        out.append(Record(i, customer.encode(), body))
    return out


@contextlib.asynccontextmanager
async def _pipeline(settings: Settings, cutter: ConnectionCutter, clock: FakeClock,
                    ) -> AsyncIterator[tuple[Pipeline, object]]:
    dsn = await cutter.start()
    pool = await create_pool(dsn, max_size=2)
    direct = await create_pool(settings.database_url, max_size=1)
    k = settings.kafka
    dlq = DlqWriter(k, k.usage_dlq_topic, k.usage_topic)
    try:
        yield Pipeline(settings, pool, dlq, "worker-A", clock), direct
    finally:
        dlq.close()
        await pool.close()
        await direct.close()
        await cutter.close()


@pytest.mark.parametrize("deliver", [True, False], ids=["cut-after-commit", "cut-before-commit"])
async def test_flush_with_unanswered_commit_is_resolved_from_postgres(
    pipeline_settings: Callable[..., Settings], deliver: bool,
) -> None:
    settings = pipeline_settings(customers=5)
    gen = LoadGenerator(settings, customer_ids(5), duplicates=0, late=0, invalid=0, seed=9)
    t0 = time.time()
    close_s = (settings.processor.window_size_ms + settings.processor.window_grace_ms) / 1000 + 1
    cutter = ConnectionCutter(settings.database_url)
    clock = FakeClock(t0)
    async with _pipeline(settings, cutter, clock) as (pipeline, direct):
        assert await pipeline.claim([0]) == {0: 0}
        pipeline.ingest(RecordRun(0, pipeline.generation(0), _records(settings, gen, t0, 0)))
        clock.now = t0 + close_s
        before = {o: in_doubt(o) for o in ("committed", "not_committed")}

        # COMMIT reaches the server and runs; its answer is lost (or: BEGIN never arrives).
        cutter.arm(b"COMMIT" if deliver else b"BEGIN", deliver=deliver)
        result = await pipeline.flush_tick()
        assert cutter.cuts == 1
        outcome = "committed" if deliver else "not_committed"
        assert {o: in_doubt(o) - before[o] for o in before} == {
            o: 1.0 if o == outcome else 0.0 for o in before}
        if deliver:  # counted as done on the spot: nothing pending, nothing to re-apply
            assert result is not None and result.events_new == EVENTS
            assert pipeline.windows.pending_events == 0
        else:  # put back and retried by the next tick
            assert result is None
            assert pipeline.windows.pending_events == EVENTS
            retried = await pipeline.flush_tick()
            assert retried is not None and retried.events_new == EVENTS
        assert await pipeline.flush_tick() is None  # nothing left, no retry loop
        assert await direct.fetchval(
            "SELECT next_offset FROM partition_checkpoints WHERE topic = $1 AND partition = 0",
            settings.kafka.usage_topic) == EVENTS

        # The processor moves on: the next records flush normally, on a healthy connection.
        t1 = clock.now
        pipeline.ingest(RecordRun(0, pipeline.generation(0),
                                  _records(settings, gen, t1, EVENTS)))
        clock.now = t1 + close_s
        nxt = await pipeline.flush_tick()
        assert nxt is not None and nxt.events_new == EVENTS
        assert await direct.fetchval(
            "SELECT next_offset FROM partition_checkpoints WHERE topic = $1 AND partition = 0",
            settings.kafka.usage_topic) == 2 * EVENTS

        assert_exact(await snapshot(direct), gen)  # every event debited once
        await assert_ledger_integrity(direct, gen.stats.events_sent)


async def test_reservation_with_a_lost_answer_is_sent_again_not_taken_for_duplicates(
    pipeline_settings: Callable[..., Settings],
) -> None:
    """The dedupe reservation ran in Postgres but its answer never came back: retried, the
    buffer's own marks must count as its own — not as duplicates dropped unseen."""
    settings = pipeline_settings(customers=5)
    gen = LoadGenerator(settings, customer_ids(5), duplicates=0, late=0, invalid=0, seed=11)
    t0 = time.time()
    close_s = (settings.processor.window_size_ms + settings.processor.window_grace_ms) / 1000 + 1
    cutter = ConnectionCutter(settings.database_url)
    clock = FakeClock(t0)
    async with _pipeline(settings, cutter, clock) as (pipeline, direct):
        assert await pipeline.claim([0]) == {0: 0}
        pipeline.ingest(RecordRun(0, pipeline.generation(0), _records(settings, gen, t0, 0)))
        cutter.arm_reply(f"INSERT 0 {EVENTS}".encode())
        assert await pipeline.flush_tick() is None  # windows still open; the reservation broke
        assert cutter.cuts == 1
        assert await direct.fetchval("SELECT count(*) FROM dedupe_marks") == EVENTS  # it ran
        clock.now = t0 + close_s
        result = await pipeline.flush_tick()
        assert result is not None and (result.events_new, result.duplicates) == (EVENTS, 0)
        assert pipeline.windows.pending_events == 0
        assert_exact(await snapshot(direct), gen)
        await assert_ledger_integrity(direct, gen.stats.events_sent)


async def test_duplicates_arriving_during_the_reservation_leave_pending_exact(
    pipeline_settings: Callable[..., Settings],
) -> None:
    """Events that arrive while the tick's first reservation runs are reserved after the take;
    those that are duplicates leave the taken windows — and must not leave `pending` twice."""
    settings = pipeline_settings(customers=5)
    gen = LoadGenerator(settings, customer_ids(5), duplicates=0, late=0, invalid=0, seed=13)
    t0 = time.time()
    close_s = (settings.processor.window_size_ms + settings.processor.window_grace_ms) / 1000 + 1
    clock = FakeClock(t0)
    async with _pipeline(settings, ConnectionCutter(settings.database_url), clock) as (
            pipeline, direct):
        assert await pipeline.claim([0]) == {0: 0}
        first = _records(settings, gen, t0, 0)
        pipeline.ingest(RecordRun(0, pipeline.generation(0), first[:EVENTS // 2]))
        await pipeline.flush_tick()  # reserved (and the checkpoint stored); windows still open
        open_events = sum(len(b.events) for b in pipeline.windows.buffers())
        assert open_events > 0 and pipeline.windows.pending_events == open_events
        # The same events again (a producer retry), arriving during the next reservation.
        again = [Record(EVENTS // 2 + i, r.key, r.value) for i, r in enumerate(first[:EVENTS // 2])]
        reserve = pipeline.reserve
        arrived = False

        async def reserve_while_records_arrive(buffers: list[object]) -> None:
            nonlocal arrived
            await reserve(buffers)  # type: ignore[arg-type]
            if not arrived:
                arrived = True
                pipeline.ingest(RecordRun(0, pipeline.generation(0), again))

        pipeline.reserve = reserve_while_records_arrive  # type: ignore[method-assign]
        clock.now = t0 + close_s
        result = await pipeline.flush_tick()
        assert result is not None and result.events_new == open_events
        assert pipeline.windows.pending_events == 0
        assert await pipeline.flush_tick() is None
        assert pipeline.windows.pending_events == 0
        assert await direct.fetchval("SELECT count(*) FROM dedupe_marks") == EVENTS // 2
