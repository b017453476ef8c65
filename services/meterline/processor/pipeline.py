"""The processor's work, independent of Faust: ingest record runs, flush closed windows.

Faust (see `app.py`) hands `Pipeline.ingest` one `RecordRun` per fetched
per-partition run of records, and calls `claim` whenever partitions are
assigned. Everything here works on whole runs and whole flushes; nothing
happens per event except parsing and window assignment.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

import asyncpg

from meterline import metrics
from meterline.config import Settings
from meterline.core.events import EventValidator, Limits, UsageEvent
from meterline.core.windows import TIME_BUCKET_MS, Closable, OpenWindows, WindowBuffer
from meterline.processor.dlq import DlqUnavailable, DlqWriter
from meterline.storage import checkpoints
from meterline.storage.checkpoints import FencedError
from meterline.storage.db import DATABASE_UNAVAILABLE
from meterline.storage.dedupe import purge as purge_dedupe
from meterline.storage.dedupe import reserve
from meterline.storage.flush import FlushPolicy, FlushResult, flush
from meterline.storage.grants import allocate_plan_periods, expire_grants

log = logging.getLogger(__name__)

# A flush that failed on these is restored and retried on the next tick.
_FLUSH_RETRYABLE: tuple[type[Exception], ...] = (DlqUnavailable, *DATABASE_UNAVAILABLE)

Clock = Callable[[], float]  # seconds since the epoch; tests pass a fake


class KafkaRecord(Protocol):
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True, slots=True)
class RecordRun:
    """Consecutive records of one partition, as fetched; `generation` tells stale runs apart."""

    partition: int
    generation: int
    records: Sequence[KafkaRecord]


def policy_from(settings: Settings) -> FlushPolicy:
    return FlushPolicy(
        usage_topic=settings.kafka.usage_topic,
        aggregates_topic=settings.kafka.aggregates_topic,
        balance_changes_topic=settings.kafka.balance_changes_topic,
        meters={m.key: m for m in settings.meters},
        window_size_ms=settings.processor.window_size_ms,
        credit_places=settings.processor.credit_decimal_places,
        thresholds=settings.processor.thresholds_percent,
    )


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        dlq: DlqWriter,
        owner: str,
        clock: Clock = time.time,
    ) -> None:
        p = settings.processor
        self.settings = settings
        self.pool = pool
        self.dlq = dlq
        self.owner = owner
        self.clock = clock
        self.policy = policy_from(settings)
        self.validator = EventValidator(
            settings.meter_for_type(),
            Limits(p.max_message_bytes, p.max_batch_events,
                   int(p.max_lateness_days * 86_400_000), p.max_future_skew_ms),
        )
        self.windows = OpenWindows(p.window_size_ms, p.window_grace_ms)
        self.epochs: dict[int, int] = {}
        self.slots: dict[int, int] = {}
        self.generations: dict[int, int] = {}
        self._room = asyncio.Event()
        self._room.set()

    # --- ownership -----------------------------------------------------------------

    async def claim(self, partitions: Iterable[int]) -> dict[int, int]:
        """Claim partitions in Postgres (bumping their fencing epoch); return where to resume."""
        claims = await checkpoints.claim(self.pool, self.policy.usage_topic, partitions, self.owner)
        for c in claims:
            self.windows.assign(c.partition, c.next_offset)
            self.epochs[c.partition] = c.epoch
            self.slots[c.partition] = c.slot
            self.generations[c.partition] = self.generations.get(c.partition, 0) + 1
            metrics.CHECKPOINT_OFFSET.labels(str(c.partition)).set(c.next_offset)
        metrics.OWNED_PARTITIONS.set(len(self.epochs))
        log.info("claimed partitions %s", {c.partition: c.next_offset for c in claims})
        return {c.partition: c.next_offset for c in claims}

    def release(self, partitions: Iterable[int]) -> None:
        """Forget partitions (revoked or fenced): their next owner replays from the checkpoint."""
        for p in partitions:
            self.windows.drop(p)
            self.epochs.pop(p, None)
            self.slots.pop(p, None)
            self.generations[p] = self.generations.get(p, 0) + 1
        metrics.OWNED_PARTITIONS.set(len(self.epochs))

    def generation(self, partition: int) -> int:
        return self.generations.get(partition, 0)

    # --- intake ----------------------------------------------------------------------

    def ingest(self, run: RecordRun, start: int = 0, max_events: int = 20_000) -> int | None:
        """Validate and window records of one run from index `start`; DLQ the rejections.

        Stops after about `max_events` events (a run of batch envelopes can hold
        a million) and returns the index to continue from, so the caller can
        yield to the event loop — flushes and heartbeats must not starve.
        Returns None when the run is done. No I/O but DLQ produce.
        """
        p = run.partition
        if run.generation != self.generation(p) or not self.windows.owns(p):
            return None  # fetched before a re-claim/seek, or for a partition we lost
        expected = self.windows.next_offset(p)
        assert expected is not None
        now_ms = int(self.clock() * 1000)
        parse = self.validator.parse_record
        dlq_write = self.dlq.write
        accepted: list[UsageEvent] = []
        last = expected - 1
        records = run.records
        i = start
        while i < len(records) and len(accepted) < max_events:
            rec = records[i]
            i += 1
            off = rec.offset
            if off < expected:
                continue  # already handled before a seek: never apply twice
            parsed = parse(rec.value, off, now_ms)
            if parsed.accepted:
                accepted.extend(parsed.accepted)
            if parsed.rejected:
                dlq_write(p, rec.key, parsed.rejected)
                for r in parsed.rejected:
                    metrics.EVENTS_INVALID.labels(r.reason.value).inc()
            last = off
        if last >= expected:
            metrics.RECORDS_IN.inc(last - expected + 1)
            for meter, n in Counter(e.meter for e in accepted).items():
                metrics.EVENTS_VALID.labels(meter).inc(n)
            self.windows.add(p, accepted, last + 1, now_ms)
            if self.windows.pending_events >= self.settings.processor.max_pending_events:
                self._room.clear()  # back-pressure: the agent waits for the next flush
            metrics.PENDING_EVENTS.set(self.windows.pending_events)
        return i if i < len(records) else None

    async def wait_for_room(self) -> None:
        await self._room.wait()

    # --- flush -------------------------------------------------------------------------

    async def reserve(self, buffers: Sequence[WindowBuffer]) -> None:
        """Reserve dedupe marks for the not-yet-reserved events of `buffers` (storage/dedupe.py).

        Events whose key is already marked — applied, or reserved by a live
        window — are duplicates and leave their buffer; first wins, also
        between buffers of this call.
        """
        generations = dict(self.generations)
        batch: list[tuple[WindowBuffer, int, list[bytes]]] = []
        keys: list[bytes] = []
        slots: list[int] = []
        epochs: list[int] = []
        tokens: list[int] = []
        for buf in buffers:
            p = buf.key.partition
            upto = len(buf.events)
            if buf.reserved == upto or p not in self.epochs:
                continue
            mine = [e.dedupe_key for e in buf.events[buf.reserved:upto]]
            n = len(mine)
            keys += mine
            slots += [self.slots[p]] * n
            epochs += [self.epochs[p]] * n
            tokens += [buf.token] * n
            batch.append((buf, upto, mine))
        if not batch:
            return
        # A key held by two buffers is sent once (ON CONFLICT DO UPDATE may touch a row
        # once per statement); the first holder keeps it, later holders drop it.
        later_holders: dict[int, set[bytes]] = {}
        if len(set(keys)) < len(keys):
            first: dict[bytes, int] = {}
            keep = []
            owner_of = [i for i, (_, _, mine) in enumerate(batch) for _ in mine]
            for i, k in enumerate(keys):
                if k in first:
                    later_holders.setdefault(owner_of[i], set()).add(k)
                else:
                    first[k] = owner_of[i]
                    keep.append(i)
            keys = [keys[i] for i in keep]
            slots = [slots[i] for i in keep]
            epochs = [epochs[i] for i in keep]
            tokens = [tokens[i] for i in keep]
        ours = await reserve(self.pool, keys, slots, epochs, tokens)
        all_ours = len(ours) == len(keys) and not later_holders
        dropped = 0
        for index, (buf, upto, mine) in enumerate(batch):
            p = buf.key.partition
            if self.generations.get(p) != generations.get(p):
                continue  # re-claimed or released meanwhile: this buffer was dropped
            rejected = set() if all_ours else (set(mine) - ours) | later_holders.get(index, set())
            dropped += buf.settle_reservation(upto, rejected)
        self.windows.pending_events -= dropped
        self.windows.duplicates_dropped += dropped

    async def flush_tick(self) -> FlushResult | None:
        """Reserve new events' dedupe marks; flush every closed window in one transaction."""
        try:
            await self.reserve(self.windows.buffers())
        except DATABASE_UNAVAILABLE as exc:
            metrics.FLUSH_FAILURES.labels("reserve_" + type(exc).__name__).inc()
            log.warning("reserving dedupe marks failed, will retry: %r", exc)
            return None
        now = self.clock()
        closable = self.windows.take_closable(int(now * 1000))
        if not closable.windows and not closable.checkpoints:
            self._room.set()
            return None
        generations = dict(self.generations)
        parts = {w.key.partition for w in closable.windows} | set(closable.checkpoints)
        epochs = {p: self.epochs[p] for p in parts if p in self.epochs}
        if len(epochs) < len(parts):  # a partition was released since the take
            closable = _only(closable, set(epochs))
        started = time.perf_counter()
        try:
            await self.reserve(closable.windows)  # events that arrived during the first reserve
            same = {p for p in epochs if self.generations.get(p) == generations.get(p)}
            if len(same) < len(epochs):  # re-claimed meanwhile: the new claim replays them
                closable = _only(closable, same)
                epochs = {p: epochs[p] for p in same}
            await self.dlq.settle()
            async with self.pool.acquire() as conn:
                result = await flush(conn, closable, epochs, self.policy,
                                     datetime.fromtimestamp(now, UTC))
        except FencedError as exc:
            metrics.FENCED_FLUSHES.inc()
            # Release only what another worker took: a partition we re-claimed ourselves
            # since the take has a new generation and stays ours.
            lost = {p for p in exc.partitions if self.generations.get(p) == generations.get(p)}
            log.warning("flush fenced off: partitions %s now belong to another worker", sorted(lost))
            self.release(lost)
            self._restore(closable, generations)
            return None
        except _FLUSH_RETRYABLE as exc:
            metrics.FLUSH_FAILURES.labels(type(exc).__name__).inc()
            log.warning("flush failed, will retry: %r", exc)
            self._restore(closable, generations)
            return None
        committed = self.clock()
        self._record(result, closable, started, committed)
        if self.windows.pending_events < self.settings.processor.max_pending_events:
            self._room.set()
        return result

    def _restore(self, closable: Closable, generations: dict[int, int]) -> None:
        still = {p for p, g in generations.items() if self.generations.get(p) == g}
        self.windows.restore(_only(closable, still))
        metrics.PENDING_EVENTS.set(self.windows.pending_events)

    def _record(self, r: FlushResult, closable: Closable, started: float, committed: float) -> None:
        metrics.FLUSH_DURATION.observe(time.perf_counter() - started)
        metrics.LAST_COMMIT_TIMESTAMP.set(committed)
        metrics.EVENTS_DUPLICATE.inc(r.duplicates + self.windows.duplicates_dropped)
        self.windows.duplicates_dropped = 0
        for meter, n in r.events_by_meter.items():
            metrics.EVENTS_DEBITED.labels(meter).inc(n)
        metrics.WINDOWS_FLUSHED.labels("regular").inc(r.aggregates - r.corrections)
        metrics.WINDOWS_FLUSHED.labels("correction").inc(r.corrections)
        metrics.LEDGER_DEBITS.inc(r.debits)
        for threshold in r.thresholds_crossed:
            metrics.THRESHOLD_CROSSINGS.labels(str(threshold)).inc()
        metrics.CREDITS_DEBITED.inc(float(r.credits_debited))
        half = TIME_BUCKET_MS / 2000  # bucket midpoint, seconds
        metrics.observe_counts(metrics.DEBIT_LATENCY, [
            (committed - b * TIME_BUCKET_MS / 1000 - half, n) for b, n in r.time_counts.items()])
        for p, off in closable.checkpoints.items():
            metrics.CHECKPOINT_OFFSET.labels(str(p)).set(off)
        for w in closable.windows:
            if w.late:
                metrics.EVENTS_LATE.labels(w.key.meter).inc(len(w.events))

    # --- housekeeping ------------------------------------------------------------------

    async def maintain(self) -> None:
        """Plan allocations, expiry write-offs, dedupe-horizon purge. Idempotent; any worker may run it."""
        now = datetime.fromtimestamp(self.clock(), UTC)
        horizon = timedelta(hours=self.settings.processor.dedupe_horizon_hours)
        async with self.pool.acquire() as conn:
            made = await allocate_plan_periods(conn, self.settings, now)
            if made:
                metrics.LEDGER_GRANTS.labels("plan_allocation").inc(made)
            expired = await expire_grants(conn, now, self.policy.balance_changes_topic,
                                          self.policy.thresholds)
            metrics.GRANTS_EXPIRED.inc(expired)
            await purge_dedupe(conn, now, horizon)
            if self.settings.processor.require_known_customers:
                rows = await conn.fetch("SELECT id FROM customers")
                self.validator.known_customers = {r["id"] for r in rows}


def _only(closable: Closable, partitions: set[int]) -> Closable:
    return Closable(
        tuple(w for w in closable.windows if w.key.partition in partitions),
        {p: o for p, o in closable.checkpoints.items() if p in partitions},
    )

