"""The processor's work, independent of Faust: ingest record runs, flush closed windows.

Faust (see `app.py`) hands `Pipeline.consume` one `RecordRun` per fetched
per-partition run of records, and calls `claim` whenever partitions are
assigned. Everything here works on whole runs and whole flushes; nothing
happens per event except parsing and window assignment.

Intake rules (what keeps "nothing lost, nothing stuck"):

- **Gap-proof.** A partition's records are applied in offset order, with no
  gaps. `windows.next_offset(p)` is the first record not yet handled; it only
  moves past records that were handled (buffered, dead-lettered or skipped as
  already handled), so the checkpoint a flush commits never passes an
  unhandled record. Each run says where the consumer fetched it from
  (`RecordRun.start`). A run fetched from *above* the next offset means the
  consumer delivered records that were never applied — an agent crash abandoned
  them (Faust restarts the agent and the consumer goes on with the next fetch)
  or a run was lost on the way. The pipeline then bumps the partition's seek
  generation (every run in flight becomes stale and is dropped) and seeks the
  consumer back to the next offset before anything else of that partition is
  applied; `meterline_intake_gaps_total` counts it. Offsets missing *inside* a
  fetch (transaction markers, compaction) are the log's own and are fine.
- **Contained failures.** An unexpected exception while validating or
  dead-lettering one record sends that record (raw bytes) to the DLQ with
  reason `internal_error` and the exception type in `meterline.exception`,
  counts it (`meterline_intake_internal_errors_total`), and the partition flows
  on. One bad record never takes the agent down.
- **Stall, never skip.** When the DLQ cannot take a record (`DlqWriter` raising),
  the records before it are applied and intake stops *at* it, retrying with
  back-off (`meterline_intake_stalled`, `meterline_intake_dlq_refusals_total`,
  one log line when it starts and one when it ends). The worker's agent
  handles one run at a time, so all of the worker's partitions wait with it.
  A record retried after a refusal may reach the DLQ twice (at-least-once,
  like a crash after a DLQ write); its `meterline.original.*` headers identify
  the repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

import asyncpg

from meterline import metrics
from meterline.config import ProcessorConfig, Settings
from meterline.core.events import EventValidator, Limits, Reason, UsageEvent
from meterline.core.windows import TIME_BUCKET_MS, Closable, OpenWindows, WindowBuffer
from meterline.health import POSTGRES, Health
from meterline.ledger import expire_grants
from meterline.processor.dlq import DlqUnavailable, DlqWriter, dead_letter_headers
from meterline.storage import checkpoints
from meterline.storage.checkpoints import FencedError
from meterline.storage.db import DATABASE_UNAVAILABLE
from meterline.storage.dedupe import Identity, reserve, retain
from meterline.storage.flush import FlushPolicy, FlushResult, flush, flush_committed
from meterline.storage.grants import allocate_plan_periods

log = logging.getLogger(__name__)

# A flush that failed on these is restored and retried on the next tick.
_FLUSH_RETRYABLE: tuple[type[Exception], ...] = (DlqUnavailable, *DATABASE_UNAVAILABLE)

Clock = Callable[[], float]  # seconds since the epoch; tests pass a fake
# Seeks the consumer: partition -> (offset, seek generation of the runs fetched from there).
Seek = Callable[[Mapping[int, tuple[int, int]]], Awaitable[None]]


class KafkaRecord(Protocol):
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True, slots=True)
class RecordRun:
    """Consecutive records of one partition, as fetched; `generation` tells stale runs apart.

    `start` is the consumer's position when it fetched the run: the seek offset, or
    the offset after the previous run it delivered. None: the first record's offset.
    """

    partition: int
    generation: int
    records: Sequence[KafkaRecord]
    start: int | None = None


@dataclass(slots=True)
class _InDoubt:
    """A flush whose transaction broke after it began: it may or may not have committed."""

    closable: Closable
    generations: dict[int, int]  # claim generations at its take
    result: FlushResult  # what it wrote, if it committed
    started: float


class Stalled(Exception):
    """The DLQ refused the record at `position` of the run: intake stops there and retries."""

    def __init__(self, position: int, cause: BaseException) -> None:
        super().__init__(f"the DLQ refused a record: {cause!r}")
        self.position = position


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


def dedupe_horizon(p: ProcessorConfig) -> timedelta:
    """How long dedupe marks are kept: the maximum lateness, unless explicitly opted out of.

    A shorter horizon means a re-publication of an event older than it, but still
    within the maximum lateness, is debited again; start-up says so.
    """
    lateness = timedelta(days=p.max_lateness_days)
    if p.dedupe_horizon_hours is None:
        return lateness
    horizon = timedelta(hours=p.dedupe_horizon_hours)
    if horizon < lateness:
        log.warning("processor.dedupe_horizon_hours=%s is shorter than max_lateness_days=%s: "
                    "an event re-published more than %s after its original but within the "
                    "maximum lateness is debited twice (opt-out of exactly-once, see "
                    "docs/operations.md)", p.dedupe_horizon_hours, p.max_lateness_days, horizon)
    return horizon


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        dlq: DlqWriter,
        owner: str,
        clock: Clock = time.time,
        stall_backoff_s: tuple[float, float] = (0.1, 5.0),
        health: Health | None = None,
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
            Limits.from_config(p),
        )
        self.windows = OpenWindows(p.window_size_ms, p.window_grace_ms)
        self.dedupe_horizon = dedupe_horizon(p)
        self.epochs: dict[int, int] = {}
        self.slots: dict[int, int] = {}
        # Claim generations: bumped when a partition is claimed or released; window state
        # taken under one generation is dropped (not restored) once it moved on.
        self.generations: dict[int, int] = {}
        # Seek generations: bumped by every seek (claim, release, gap); a run fetched before
        # the latest seek carries an older one and is dropped.
        self.seek_generations: dict[int, int] = {}
        self.seek: Seek | None = None  # set by the transport (app.py); tests pass a fake
        self._seeks: dict[int, tuple[int, int]] = {}  # requested, not yet made
        self.stall_backoff_s = stall_backoff_s
        self._room = asyncio.Event()
        self._room.set()
        self._in_doubt: _InDoubt | None = None  # a flush whose COMMIT went unanswered
        self.health = health or Health("processor")  # flushes report Postgres up or down

    # --- ownership -----------------------------------------------------------------

    async def claim(self, partitions: Iterable[int]) -> dict[int, int]:
        """Claim partitions in Postgres (bumping their fencing epoch); return where to resume."""
        claims = await checkpoints.claim(self.pool, self.policy.usage_topic, partitions, self.owner)
        for c in claims:
            self.windows.assign(c.partition, c.next_offset)
            self.epochs[c.partition] = c.epoch
            self.slots[c.partition] = c.slot
            self.generations[c.partition] = self.generations.get(c.partition, 0) + 1
            self._next_seek_generation(c.partition)  # the caller seeks to the checkpoint
            metrics.CHECKPOINT_OFFSET.labels(str(c.partition)).set(c.next_offset)
        metrics.OWNED_PARTITIONS.set(len(self.epochs))
        metrics.PENDING_EVENTS.set(self.windows.pending_events)
        log.info("claimed partitions %s", {c.partition: c.next_offset for c in claims})
        return {c.partition: c.next_offset for c in claims}

    def release(self, partitions: Iterable[int]) -> None:
        """Forget partitions (revoked or fenced): their next owner replays from the checkpoint."""
        for p in partitions:
            self.windows.drop(p)
            self.epochs.pop(p, None)
            self.slots.pop(p, None)
            self.generations[p] = self.generations.get(p, 0) + 1
            self._next_seek_generation(p)
            # Its lag is its next owner's to report: a stale value here would count as
            # work waiting on this worker (MeterlineProcessorNotCommitting).
            with contextlib.suppress(KeyError):
                metrics.CONSUMER_LAG.remove(str(p))
        metrics.OWNED_PARTITIONS.set(len(self.epochs))
        metrics.PENDING_EVENTS.set(self.windows.pending_events)

    def generation(self, partition: int) -> int:
        """The seek generation a run of `partition` must carry to be applied."""
        return self.seek_generations.get(partition, 0)

    def _next_seek_generation(self, partition: int) -> int:
        g = self.seek_generations[partition] = self.seek_generations.get(partition, 0) + 1
        self._seeks.pop(partition, None)  # a newer seek supersedes one still pending
        return g

    # --- seeking back over a gap ---------------------------------------------------------

    def _seek_back(self, partition: int, offset: int) -> None:
        """Drop every run in flight for `partition` and ask the consumer to refetch from `offset`."""
        self._seeks[partition] = (offset, self._next_seek_generation(partition))

    async def rewind(self, run: RecordRun) -> None:
        """After `run` was abandoned (handling it raised): refetch its unhandled records, if any."""
        p = run.partition
        expected = self.windows.next_offset(p)
        if (run.generation == self.generation(p) and expected is not None and run.records
                and run.records[-1].offset >= expected):
            metrics.INTAKE_GAPS.inc()
            log.warning("partition %d: records from offset %d on were abandoned; seeking back",
                        p, expected)
            self._seek_back(p, expected)
        await self.make_seeks()

    async def rewind_all(self) -> None:
        """Refetch every owned partition from its next unhandled record (after an agent restart)."""
        for p in list(self.epochs):
            expected = self.windows.next_offset(p)
            if expected is not None:
                self._seek_back(p, expected)
        await self.make_seeks()

    async def make_seeks(self) -> None:
        """Make the seeks requested by gap detection (kept for the next call if seeking fails)."""
        if not self._seeks or self.seek is None:
            return
        seeks, self._seeks = self._seeks, {}
        try:
            await self.seek(seeks)
        except BaseException:
            for p, (offset, g) in seeks.items():
                if self.seek_generations.get(p) == g:
                    self._seeks.setdefault(p, (offset, g))
            raise

    # --- intake ----------------------------------------------------------------------

    async def consume(self, run: RecordRun) -> None:
        """Apply one run: ingest it in slices, yielding to the event loop between them.

        While the DLQ refuses a record, waits with back-off and retries that record:
        the partition never moves past it. An exception from anywhere else leaves
        the run (its handled records stay applied); the next run of the partition
        then finds the gap and seeks back (see the module docstring).
        """
        await self.make_seeks()
        position: int | None = 0
        low, high = self.stall_backoff_s
        delay = low
        stalled_at: int | None = None
        try:
            while position is not None:
                try:
                    position = self.ingest(run, position)
                except Stalled as stall:
                    position = stall.position
                    offset = run.records[position].offset
                    metrics.INTAKE_DLQ_REFUSALS.inc()
                    if stalled_at != offset:
                        stalled_at = offset
                        metrics.INTAKE_STALLED.set(1)
                        log.error("partition %d: the DLQ refused the record at offset %d (%r); "
                                  "intake waits at it and retries", run.partition, offset,
                                  stall.__cause__)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, high)
                    continue
                if stalled_at is not None:
                    log.warning("partition %d: the DLQ took the record at offset %d; intake resumes",
                                run.partition, stalled_at)
                    stalled_at, delay = None, low
                    metrics.INTAKE_STALLED.set(0)
                await self.wait_for_room()
                await asyncio.sleep(0)  # let flushes, reservations and heartbeats run
        finally:
            if stalled_at is not None:  # the run went stale (re-claimed) while waiting
                metrics.INTAKE_STALLED.set(0)
        await self.make_seeks()  # a gap found in this run: refetch now, not at the next run

    def ingest(self, run: RecordRun, start: int = 0, max_events: int = 20_000) -> int | None:
        """Validate and window records of one run from index `start`; DLQ the rejections.

        Stops after about `max_events` events (a run of batch envelopes can hold
        a million) and returns the index to continue from, so the caller can
        yield to the event loop — flushes and heartbeats must not starve.
        Returns None when the run is done (or stale, or a gap made it seek back).
        Raises `Stalled` when the DLQ refuses a record; the records before it are
        applied. No I/O but DLQ produce.
        """
        p = run.partition
        if run.generation != self.generation(p) or not self.windows.owns(p):
            return None  # fetched before a re-claim/seek, or for a partition we lost
        expected = self.windows.next_offset(p)
        assert expected is not None
        records = run.records
        if start == 0 and records:
            fetched_from = records[0].offset if run.start is None else run.start
            if fetched_from > expected:
                metrics.INTAKE_GAPS.inc()
                log.warning("partition %d: a run fetched from offset %d, but %d is the next "
                            "unhandled record (an abandoned run); seeking back to it",
                            p, fetched_from, expected)
                self._seek_back(p, expected)
                return None
        now_ms = int(self.clock() * 1000)
        parse = self.validator.parse_record
        dlq_write = self.dlq.write
        accepted: list[UsageEvent] = []
        rejected: list[str] = []
        handled = expected  # records before it are handled: accepted events in `accepted`
        i = start
        try:
            while i < len(records) and len(accepted) < max_events:
                rec = records[i]
                off = rec.offset
                if off < expected:
                    i += 1
                    continue  # already handled before a seek: never apply twice
                # Invariant: `handled` moves past a record only once its events are in
                # `accepted` and its rejections are queued in the DLQ (or it is dead-lettered
                # whole as internal_error). The try costs nothing unless something raises.
                try:
                    parsed = parse(rec.value, off, now_ms)
                    if parsed.rejected:
                        dlq_write(p, rec.key, parsed.rejected)
                except DlqUnavailable as exc:
                    raise Stalled(i, exc) from exc
                except Exception as exc:  # noqa: BLE001 - contained: the record goes to the DLQ
                    self._dead_letter_internal(p, rec, exc, i)
                    rejected.append(Reason.INTERNAL_ERROR.value)
                else:
                    if parsed.accepted:
                        accepted.extend(parsed.accepted)
                    if parsed.rejected:
                        rejected.extend(r.reason.value for r in parsed.rejected)
                i += 1
                handled = off + 1
        finally:
            # Also on Stalled or a crash: what was handled stays handled (its DLQ copies are
            # queued), so a retry or a seek back resumes right after it.
            if handled > expected:
                self._apply(p, accepted, rejected, handled - expected, handled, now_ms)
        return i if i < len(records) else None

    def _dead_letter_internal(self, partition: int, rec: KafkaRecord, exc: Exception,
                              position: int) -> None:
        """Send `rec` whole (raw bytes) to the DLQ as internal_error; Stalled if it cannot go."""
        kind = f"{type(exc).__module__}.{type(exc).__qualname__}"
        headers = dead_letter_headers(Reason.INTERNAL_ERROR.value, f"{kind}: {exc}",
                                      self.dlq.source_topic, partition, rec.offset, exception=kind)
        try:
            self.dlq.publish(rec.key, rec.value or b"", headers, Reason.INTERNAL_ERROR.value)
        except Exception as dlq_exc:  # noqa: BLE001 - whatever the cause, the record must not be skipped
            raise Stalled(position, dlq_exc) from dlq_exc
        # Counted and logged once the record is in the DLQ, not on every retry of a stall.
        metrics.INTAKE_INTERNAL_ERRORS.inc()
        log.error("partition %d offset %d: handling the record raised %s; dead-lettered as %s",
                  partition, rec.offset, kind, Reason.INTERNAL_ERROR.value, exc_info=exc)

    def _apply(self, partition: int, accepted: list[UsageEvent], rejected: list[str],
               records: int, next_offset: int, now_ms: int) -> None:
        """Buffer the accepted events of handled records and advance past them."""
        metrics.RECORDS_IN.inc(records)
        for reason, n in Counter(rejected).items():
            metrics.EVENTS_INVALID.labels(reason).inc(n)
        for meter, n in Counter(e.meter for e in accepted).items():
            metrics.EVENTS_VALID.labels(meter).inc(n)
        self.windows.add(partition, accepted, next_offset, now_ms)
        if self.windows.pending_events >= self.settings.processor.max_pending_events:
            self._room.clear()  # back-pressure: the agent waits for the next flush
        metrics.PENDING_EVENTS.set(self.windows.pending_events)

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
        identities: list[Identity] = []
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
            start = buf.key.start_ms
            identities += [(start, k) for k in mine]
            slots += [self.slots[p]] * n
            epochs += [self.epochs[p]] * n
            tokens += [buf.token] * n
            batch.append((buf, upto, mine))
        if not batch:
            return
        # An identity held by two buffers (a window's regular and late buffer, or two
        # customers' buffers of one window) is sent once (ON CONFLICT DO UPDATE may touch
        # a row once per statement); the first holder keeps it, later holders drop it.
        later_holders: dict[int, set[bytes]] = {}
        if len(set(identities)) < len(identities):
            first: dict[Identity, int] = {}
            keep = []
            owner_of = [i for i, (_, _, mine) in enumerate(batch) for _ in mine]
            for i, ident in enumerate(identities):
                if ident in first:
                    later_holders.setdefault(owner_of[i], set()).add(ident[1])
                else:
                    first[ident] = owner_of[i]
                    keep.append(i)
            identities = [identities[i] for i in keep]
            slots = [slots[i] for i in keep]
            epochs = [epochs[i] for i in keep]
            tokens = [tokens[i] for i in keep]
        ours = await reserve(self.pool, identities, slots, epochs, tokens)
        all_ours = len(ours) == len(identities) and not later_holders
        dropped = 0
        for index, (buf, upto, mine) in enumerate(batch):
            p = buf.key.partition
            if self.generations.get(p) != generations.get(p):
                continue  # re-claimed or released meanwhile: this buffer was dropped
            rejected: set[bytes] = set()
            if not all_ours:
                start = buf.key.start_ms
                rejected = {k for k in mine if (start, k) not in ours} | later_holders.get(index, set())
            dropped += buf.settle_reservation(upto, rejected)
        self.windows.pending_events -= dropped
        self.windows.duplicates_dropped += dropped

    async def flush_tick(self) -> FlushResult | None:
        """Reserve new events' dedupe marks; flush every closed window in one transaction."""
        try:
            return await self._flush_tick()
        finally:
            # The gauge tells what is pending *now*: after a flush (or a failed one, or
            # duplicates dropped by the reservation) as after an ingest.
            metrics.PENDING_EVENTS.set(self.windows.pending_events)

    async def _flush_tick(self) -> FlushResult | None:
        if self._in_doubt is not None:
            # Nothing else flushes until Postgres says whether the unanswered COMMIT
            # landed: a later checkpoint must never pass windows that may need a retry.
            return await self._resolve_in_doubt()
        try:
            await self.reserve(self.windows.buffers())
        except DATABASE_UNAVAILABLE as exc:
            metrics.FLUSH_FAILURES.labels("reserve_" + type(exc).__name__).inc()
            self.health.down(POSTGRES, exc)  # logged once per outage, not per tick
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
        result = FlushResult()
        sent = False  # the flush transaction began: from here a lost connection is ambiguous
        try:
            held = sum(len(w.events) for w in closable.windows)
            await self.reserve(closable.windows)  # events that arrived during the first reserve
            # reserve() takes the duplicates it drops out of `pending`, but these windows
            # already left it at the take: put them back, or the gauge drifts below zero.
            self.windows.pending_events += held - sum(len(w.events) for w in closable.windows)
            same = {p for p in epochs if self.generations.get(p) == generations.get(p)}
            if len(same) < len(epochs):  # re-claimed meanwhile: the new claim replays them
                closable = _only(closable, same)
                epochs = {p: epochs[p] for p in same}
            await self.dlq.settle()
            async with self.pool.acquire() as conn:
                sent = True
                await flush(conn, closable, epochs, self.policy,
                            datetime.fromtimestamp(now, UTC), result)
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
            if not isinstance(exc, DlqUnavailable):  # the DLQ writer reports the broker itself
                self.health.down(POSTGRES, exc)  # logged once per outage, not per tick
            if not sent:
                self._restore(closable, generations)
                return None
            # The connection broke (or a statement failed) inside the flush transaction, maybe
            # during its COMMIT: it may have committed without our hearing. A blind retry
            # would re-apply it, which its tokens' primary key refuses, forever. Ask Postgres.
            log.warning("flush failed, checking whether it committed: %r", exc)
            self._in_doubt = _InDoubt(closable, generations, result, started)
            return await self._resolve_in_doubt()
        self._committed(result, closable, started)
        return result

    async def _resolve_in_doubt(self) -> FlushResult | None:
        """Settle a flush whose outcome is unknown: count it if it committed, else retry it."""
        doubt = self._in_doubt
        assert doubt is not None
        try:
            committed = await flush_committed(self.pool, doubt.closable)
        except DATABASE_UNAVAILABLE as exc:
            metrics.FLUSH_FAILURES.labels("in_doubt_" + type(exc).__name__).inc()
            self.health.down(POSTGRES, exc)
            return None  # still down: ask again next tick, flushing nothing else meanwhile
        self._in_doubt = None
        self.health.up(POSTGRES)
        metrics.FLUSHES_IN_DOUBT.labels("committed" if committed else "not_committed").inc()
        if not committed:
            log.warning("the failed flush did not commit; its windows are retried")
            self._restore(doubt.closable, doubt.generations)
            return None
        log.warning("the failed flush did commit: counted as done, not applied again")
        self._committed(doubt.result, doubt.closable, doubt.started)
        return doubt.result

    def _committed(self, result: FlushResult, closable: Closable, started: float) -> None:
        self.health.up(POSTGRES)
        self._record(result, closable, started, self.clock())
        if self.windows.pending_events < self.settings.processor.max_pending_events:
            self._room.set()

    def _restore(self, closable: Closable, generations: dict[int, int]) -> None:
        still = {p for p, g in generations.items() if self.generations.get(p) == g}
        self.windows.restore(_only(closable, still))

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
        """Plan allocations, expiry write-offs, dedupe partitions. Idempotent; any worker may run it."""
        now = datetime.fromtimestamp(self.clock(), UTC)
        async with self.pool.acquire() as conn:
            made = await allocate_plan_periods(conn, self.settings, now)
            if made:
                metrics.LEDGER_GRANTS.labels("plan_allocation").inc(made)
            expired = await expire_grants(conn, now, self.policy.balance_changes_topic,
                                          self.policy.thresholds)
            metrics.GRANTS_EXPIRED.inc(expired)
            retention = await retain(conn, now, self.dedupe_horizon)
            metrics.DEDUPE_DAYS_AHEAD.set(retention.days_ahead)
            metrics.DEDUPE_PARTITIONS_DROPPED.inc(len(retention.dropped))
            for table in retention.dropped:
                log.info("dedupe retention: dropped %s (past the %s horizon)", table,
                         self.dedupe_horizon)
            if self.settings.processor.require_known_customers:
                rows = await conn.fetch("SELECT id FROM customers")
                self.validator.known_customers = {r["id"] for r in rows}


def _only(closable: Closable, partitions: set[int]) -> Closable:
    return Closable(
        tuple(w for w in closable.windows if w.key.partition in partitions),
        {p: o for p, o in closable.checkpoints.items() if p in partitions},
    )

