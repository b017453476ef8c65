"""Intake rules of `processor/pipeline.py`, driven at the Pipeline level against real Postgres.

The consumer is modelled in memory the way `CheckpointedConsumerThread` behaves (a fetch
position per partition, seek generations, runs still in flight after a seek, runs that
carry the position they were fetched from), so thousands of agent crashes are cheap.
Flushes go to the real, migrated Postgres. The internal_error test writes to the real
broker's DLQ; only the DLQ-refusal test uses a DlqWriter double (a DLQ that is down on
cue), as a pipeline-level test may.

- every record is applied exactly once, whatever run the agent dies in (hypothesis);
- an exception while handling one record dead-letters it as internal_error and the
  partition flows on;
- a DLQ that refuses a record stops intake *at* it, and intake resumes when it recovers.
"""

from __future__ import annotations

import asyncio
import bisect
import os
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from meterline.config import Settings
from meterline.core.events import Rejection
from meterline.processor.dlq import DlqUnavailable, DlqWriter
from meterline.processor.pipeline import Pipeline, RecordRun
from meterline.storage.db import create_pool

from .harness import FakeClock, Record, read_messages, wait_until

pytestmark = pytest.mark.integration

# Hypothesis examples of the crash test; each injects ~15 crashes (~2,400 in all). `make test` keeps
# it well under a minute; INTAKE_CRASH_EXAMPLES=2000 runs a long soak (not METERLINE_*:
# those are configuration overrides).
CRASH_EXAMPLES = int(os.environ.get("INTAKE_CRASH_EXAMPLES", "150"))
BAD = b'{"specversion": "1.0", "id": '  # malformed_json


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels or None) or 0.0


def event(customer: str, event_id: str, time_ms: int, tokens: int) -> bytes:
    iso = datetime.fromtimestamp(time_ms / 1000, UTC).isoformat(timespec="milliseconds")
    return orjson.dumps({
        "specversion": "1.0", "id": event_id, "source": "intake-test", "type": "llm_tokens",
        "subject": customer, "time": iso.replace("+00:00", "Z"), "data": {"tokens": tokens}})


def for_topic(settings: Settings, usage_topic: str) -> Settings:
    """`settings` with another usage topic: its own checkpoints in the shared database."""
    return settings.model_copy(update={
        "kafka": settings.kafka.model_copy(update={"usage_topic": usage_topic})})


class MemoryDlq:
    """`DlqWriter`'s interface in memory; while `refusing`, it raises like a DLQ that is down."""

    def __init__(self, source_topic: str) -> None:
        self.source_topic = source_topic
        self.letters: list[tuple[int, int, str]] = []  # (partition, offset, reason)
        self.refusing = False
        self.refused = 0

    def _check(self) -> None:
        if self.refusing:
            self.refused += 1
            raise DlqUnavailable("test: the DLQ is down")

    def write(self, partition: int, key: bytes | None, rejections: Iterable[Rejection]) -> int:
        self._check()
        rs = list(rejections)
        self.letters += [(partition, r.offset, r.reason.value) for r in rs]
        return len(rs)

    def publish(self, key: bytes | None, value: bytes, headers: Any, reason: str) -> None:
        self._check()
        h = {k: v for k, v in headers}
        self.letters.append(
            (int(h["meterline.original.partition"]), int(h["meterline.original.offset"]), reason))

    async def settle(self) -> None:
        pass  # nothing is ever queued unconfirmed: write() either keeps a letter or refuses

    def close(self) -> None:
        pass


class MemoryConsumer:
    """The consumer thread's behaviour in memory (see processor/app.py).

    `fetch` moves a partition's position past the run it returns, and tags the run with
    the partition's seek generation and the position it was fetched from; `seek` (the
    pipeline's `Seek`) moves the position, and runs already fetched keep their old tag.
    """

    def __init__(self, logs: dict[int, list[Record]], rng: random.Random) -> None:
        self.logs = logs
        self.rng = rng
        self.positions = dict.fromkeys(logs, 0)
        self.tags = dict.fromkeys(logs, 0)
        self.inflight: deque[RecordRun] = deque()

    async def seek(self, seeks: Mapping[int, tuple[int, int]]) -> None:
        for p, (offset, generation) in seeks.items():
            self.positions[p], self.tags[p] = offset, generation

    def end(self, p: int) -> int:
        return self.logs[p][-1].offset + 1 if self.logs[p] else 0

    def fetch(self, max_run: int) -> bool:
        ready = [p for p in self.logs if self.positions[p] < self.end(p)]
        if not ready:
            return False
        p = self.rng.choice(ready)
        log, start = self.logs[p], self.positions[p]
        first = bisect.bisect_left([r.offset for r in log], start)
        records = log[first:first + self.rng.randint(1, max_run)]
        self.positions[p] = records[-1].offset + 1
        self.inflight.append(RecordRun(p, self.tags[p], records, start))
        return True


class AgentKilled(BaseException):
    """The agent dies while handling a record (like a cancellation: not contained per record)."""


class Scenario:
    """One hypothesis example: partitions with valid and bad records, an agent that dies often."""

    def __init__(self, name: str, seed: int, partitions: int, records: int, p_crash: float,
                 p_lost: float, max_run: int, now: float) -> None:
        self.name = name
        self.rng = random.Random(seed)
        self.p_crash, self.p_lost, self.max_run = p_crash, p_lost, max_run
        self.now_ms = int(now * 1000)
        self.expected: Counter[str] = Counter()  # customer -> tokens
        self.events = 0
        self.bad: set[tuple[int, int]] = set()
        self.logs: dict[int, list[Record]] = {p: [] for p in range(partitions)}
        for _ in range(records):
            self.append(self.rng.randrange(partitions))
        self.crashes = 0

    def append(self, p: int) -> None:
        """One more record on partition `p`; offsets sometimes skip one (a transaction marker)."""
        log = self.logs[p]
        offset = (log[-1].offset + 1 if log else 0) + (self.rng.random() < 0.1)
        if self.rng.random() < 0.1:
            log.append(Record(offset, None, BAD))
            self.bad.add((p, offset))
            return
        customer = f"{self.name}-c{self.rng.randrange(4)}"
        tokens = self.rng.randint(1, 1000)
        # Event times spread over a few seconds: regular windows and late corrections.
        t = self.now_ms + self.rng.randint(-3000, 3000)
        log.append(Record(offset, customer.encode(), event(customer, f"{self.name}-{p}-{offset}", t, tokens)))
        self.expected[customer] += tokens
        self.events += 1

    def parse_or_die(self, parse: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(value: bytes | None, offset: int, now_ms: int) -> Any:
            if self.rng.random() < self.p_crash:
                self.crashes += 1
                raise AgentKilled(f"injected at offset {offset}")
            return parse(value, offset, now_ms)
        return wrapped


async def run_scenario(base: Settings, sc: Scenario) -> None:
    settings = for_topic(base, f"{base.kafka.usage_topic}.{sc.name}")
    clock = FakeClock(sc.now_ms / 1000)
    dlq = MemoryDlq(settings.kafka.usage_topic)
    pool = await create_pool(settings.database_url, max_size=2)
    try:
        pipeline = Pipeline(settings, pool, dlq, "crash-test", clock)  # type: ignore[arg-type]
        pipeline.validator.parse_record = sc.parse_or_die(  # type: ignore[method-assign]
            pipeline.validator.parse_record)
        consumer = MemoryConsumer(sc.logs, sc.rng)
        pipeline.seek = consumer.seek
        resume = await pipeline.claim(sc.logs)
        await consumer.seek({p: (o, pipeline.generation(p)) for p, o in resume.items()})
        marks_before = await pool.fetchval("SELECT count(*) FROM dedupe_marks")
        duplicates_before = sample("meterline_events_duplicate_total")

        def done() -> bool:
            return all(pipeline.windows.next_offset(p) == consumer.end(p) for p in sc.logs)

        for _ in range(50_000):
            if done() and not consumer.inflight:
                break
            if sc.rng.random() < 0.1:
                clock.now += sc.rng.uniform(0.05, 0.8)
                await pipeline.flush_tick()
                continue
            while len(consumer.inflight) < 3 and consumer.fetch(sc.max_run):
                pass  # the consumer prefetches: runs in flight when a seek happens go stale
            if not consumer.inflight:
                # Idle, but a crash left records unhandled and nothing told the pipeline
                # yet: on a live topic the partition's next record arrives and shows the gap.
                stuck = [p for p in sc.logs if pipeline.windows.next_offset(p) != consumer.end(p)]
                sc.append(sc.rng.choice(stuck))
                continue
            run = consumer.inflight.popleft()
            if sc.rng.random() < sc.p_lost:
                continue  # lost between consumer and agent: only the next run can tell
            try:
                await pipeline.consume(run)
            except AgentKilled:
                if sc.rng.random() < 0.5:  # app.py rewinds after a crash; a restart may not
                    await pipeline.rewind(run)
        else:
            raise AssertionError(f"{sc.name}: intake did not converge")

        # Close every window and flush until everything is committed.
        clock.now += 30
        for _ in range(20):
            await pipeline.flush_tick()
            if pipeline.windows.pending_events == 0 and not pipeline.windows.buffers():
                break
        await check_exactly_once(pool, settings, sc, consumer)
        assert await pool.fetchval("SELECT count(*) FROM dedupe_marks") - marks_before == sc.events
        # Nothing was applied twice and caught by dedupe: the intake itself was exact.
        assert sample("meterline_events_duplicate_total") == duplicates_before
        assert Counter((p, o) for p, o, _ in dlq.letters) == Counter(sc.bad)
        assert {r for _, _, r in dlq.letters} <= {"malformed_json"}
    finally:
        await pool.close()


async def check_exactly_once(pool: asyncpg.Pool, settings: Settings, sc: Scenario,
                             consumer: MemoryConsumer) -> None:
    rows = await pool.fetch(
        "SELECT customer_id, sum(quantity) AS q, sum(event_count) AS n FROM window_aggregates "
        "WHERE customer_id LIKE $1 GROUP BY customer_id", f"{sc.name}-%")
    assert {r["customer_id"]: r["q"] for r in rows} == {
        c: Decimal(t) for c, t in sc.expected.items()}, sc.name
    assert sum(r["n"] for r in rows) == sc.events
    checkpoints = {r["partition"]: r["next_offset"] for r in await pool.fetch(
        "SELECT partition, next_offset FROM partition_checkpoints WHERE topic = $1",
        settings.kafka.usage_topic)}
    assert checkpoints == {p: consumer.end(p) for p in sc.logs}


async def test_agent_killed_at_random_records_debits_every_event_exactly_once(
    pipeline_settings: Callable[..., Settings],
) -> None:
    base = pipeline_settings(customers=0)
    now = time.time()
    crashes: list[int] = []
    gaps_before = sample("meterline_intake_gaps_total")

    @settings(max_examples=CRASH_EXAMPLES, derandomize=True, deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(seed=st.integers(0, 2**32), partitions=st.integers(1, 3), records=st.integers(20, 200),
           p_crash=st.sampled_from([0.1, 0.03, 0.3]), p_lost=st.sampled_from([0.0, 0.05, 0.2]),
           max_run=st.integers(1, 40))
    def check(seed: int, partitions: int, records: int, p_crash: float, p_lost: float,
              max_run: int) -> None:
        sc = Scenario(f"x{len(crashes)}", seed, partitions, records, p_crash, p_lost, max_run, now)
        asyncio.run(run_scenario(base, sc))
        crashes.append(sc.crashes)

    # In a thread with its own event loops: one per example, none nested in the test's loop.
    await asyncio.to_thread(check)
    print(f"{sum(crashes)} crashes injected in {len(crashes)} examples")
    assert sum(crashes) >= 10 * CRASH_EXAMPLES, f"only {sum(crashes)} crashes injected"
    assert sample("meterline_intake_gaps_total") > gaps_before


class Explodes(Exception):
    """An unexpected bug while handling one record."""


async def test_record_whose_handling_raises_is_dead_lettered_as_internal_error(
    pipeline_settings: Callable[..., Settings],
) -> None:
    settings = pipeline_settings(customers=0)
    k = settings.kafka
    now = time.time()
    now_ms = int(now * 1000)
    records = [Record(i, b"c-int", event("c-int", f"ie-{i}", now_ms, 10 + i)) for i in range(6)]
    clock = FakeClock(now)
    pool = await create_pool(settings.database_url)
    dlq = DlqWriter(k, k.usage_dlq_topic, k.usage_topic)
    errors_before = sample("meterline_intake_internal_errors_total")
    try:
        pipeline = Pipeline(settings, pool, dlq, "w-internal", clock)
        parse = pipeline.validator.parse_record

        def parse_with_bug(value: bytes | None, offset: int, now_ms: int) -> Any:
            if offset == 2:
                raise Explodes("a bug in validation")
            return parse(value, offset, now_ms)

        pipeline.validator.parse_record = parse_with_bug  # type: ignore[method-assign]
        await pipeline.claim([0])
        await pipeline.consume(RecordRun(0, pipeline.generation(0), records, 0))
        assert pipeline.windows.next_offset(0) == 6  # the partition flowed on
        clock.now += 10
        assert await pipeline.flush_tick() is not None
        debited = await pool.fetchval(
            "SELECT sum(quantity) FROM window_aggregates WHERE customer_id = 'c-int'")
        assert debited == sum(10 + i for i in range(6) if i != 2)
    finally:
        dlq.close()
        await pool.close()
    assert sample("meterline_intake_internal_errors_total") == errors_before + 1
    (letter,) = read_messages(k.bootstrap_servers, k.usage_dlq_topic, 1.0)
    assert letter.value == records[2].value  # the raw record
    assert letter.key == b"c-int"
    h = letter.headers
    assert h["meterline.reason"] == b"internal_error"
    assert h["meterline.exception"] == f"{__name__}.Explodes".encode()
    assert b"a bug in validation" in h["meterline.detail"]
    assert (h["meterline.original.topic"], h["meterline.original.offset"]) == (
        k.usage_topic.encode(), b"2")


async def test_dlq_refusing_a_record_stops_intake_at_it_until_the_dlq_takes_it(
    pipeline_settings: Callable[..., Settings],
) -> None:
    settings = pipeline_settings(customers=0)
    now = time.time()
    now_ms = int(now * 1000)
    records = [Record(i, b"c-st", event("c-st", f"st-{i}", now_ms, 100 + i)) for i in range(5)]
    records[2] = Record(2, b"c-st", BAD)
    clock = FakeClock(now)
    dlq = MemoryDlq(settings.kafka.usage_topic)
    dlq.refusing = True
    pool = await create_pool(settings.database_url)
    refusals_before = sample("meterline_intake_dlq_refusals_total")
    try:
        pipeline = Pipeline(settings, pool, dlq, "w-stall", clock,  # type: ignore[arg-type]
                            stall_backoff_s=(0.01, 0.05))
        await pipeline.claim([0])
        consuming = asyncio.create_task(pipeline.consume(RecordRun(0, pipeline.generation(0), records, 0)))
        async def refused_five_times() -> bool:
            return dlq.refused >= 5

        await wait_until(refused_five_times, 5, "five refusals", interval=0.01)
        # Stopped at the refused record: the record before it is applied, nothing after it.
        assert not consuming.done()
        assert pipeline.windows.next_offset(0) == 2
        assert pipeline.windows.pending_events == 2
        assert sample("meterline_intake_stalled") == 1
        assert sample("meterline_intake_dlq_refusals_total") >= refusals_before + 5
        # A flush meanwhile commits the records before it, and the checkpoint stays at it.
        clock.now += 10
        assert await pipeline.flush_tick() is not None
        assert await pool.fetchval(
            "SELECT next_offset FROM partition_checkpoints WHERE topic = $1 AND partition = 0",
            settings.kafka.usage_topic) == 2
        assert not consuming.done()

        dlq.refusing = False
        await asyncio.wait_for(consuming, 5)  # the DLQ took it: intake resumed by itself
        assert sample("meterline_intake_stalled") == 0
        assert dlq.letters == [(0, 2, "malformed_json")]
        clock.now += 10
        assert await pipeline.flush_tick() is not None
        assert await pool.fetchval(
            "SELECT sum(quantity) FROM window_aggregates WHERE customer_id = 'c-st'") == sum(
            100 + i for i in (0, 1, 3, 4))
        assert await pool.fetchval(
            "SELECT next_offset FROM partition_checkpoints WHERE topic = $1 AND partition = 0",
            settings.kafka.usage_topic) == 5
    finally:
        await pool.close()
