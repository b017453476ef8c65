"""`meterline ledger-consumer`: Stripe events from Kafka applied to the credits ledger.

Delivery guarantee, decided here: at least once from Kafka, exactly-once effect. Each
event is applied in its own Postgres transaction that also claims its Stripe event id
(`stripe_ledger.apply_event`); the partition's Kafka offset is committed only after
every event before it has committed in Postgres or been acknowledged by the DLQ topic.
A crash in between re-reads events whose ids are already claimed: they change nothing.

Nothing stalls a partition: bad input and events that cannot apply go to
`stripe.events.dlq` (reason in headers, counted); transient failures (Postgres down,
deadlock, DLQ broker unavailable) retry the same event with backoff, never skip it.

Outages never end it: Postgres or the broker down makes it back off and retry the step
it was on, report itself not ready (`/readyz`, meterline.health) and log the state
change once; it resumes by itself.

A plain aiokafka consumer with manual commits, not Faust: billing events are few,
each needs its own transaction, and the commit point must be explicit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import asyncpg
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from meterline import metrics
from meterline.billing.ledger_actions import Apply, Catalog, Ignore, Reason, Reject
from meterline.billing.stripe_events import decide, type_label
from meterline.billing.stripe_ledger import Applied, EventRejected, LedgerPolicy, apply_event
from meterline.config import Settings
from meterline.consumer_lag import ConsumerLag, publishing
from meterline.health import KAFKA, POSTGRES, Health, stopped_within
from meterline.kafka.security import aiokafka_config
from meterline.metrics import run_service
from meterline.processor import dlq
from meterline.processor.dlq import DlqUnavailable, DlqWriter, Headers
from meterline.storage.db import DATABASE_UNAVAILABLE, create_pool
from meterline.storage.grants import sync_plans

log = logging.getLogger(__name__)

# Postgres refused the data itself: retrying cannot help, so the event is dead-lettered.
_PERMANENT_DB_ERRORS = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)
# The database or the network is unavailable, or a deadlock/serialization failure: retry.
_TRANSIENT_ERRORS = DATABASE_UNAVAILABLE
# Start-up: the database is unavailable (exception type -> dependency, meterline.health).
_PG_OUTAGES: dict[type[BaseException], str] = dict.fromkeys(_TRANSIENT_ERRORS, POSTGRES)


def catalog_from(settings: Settings) -> Catalog:
    lc = settings.ledger_consumer
    expiry = lc.purchased_credit_expiry_days
    return Catalog(
        plans=frozenset(p.key for p in settings.plans),
        plan_by_price=dict(lc.plan_by_price),
        credits_by_price=dict(lc.credits_by_price),
        credit_places=settings.processor.credit_decimal_places,
        purchased_expiry_seconds=(None if expiry is None
                                  else int(timedelta(days=expiry).total_seconds())),
    )


def policy_from(settings: Settings) -> LedgerPolicy:
    return LedgerPolicy(
        balance_topic=settings.kafka.balance_changes_topic,
        thresholds=settings.processor.thresholds_percent,
        credit_places=settings.processor.credit_decimal_places,
        plans={p.key: p for p in settings.plans},
        purchased_priority=settings.ledger_consumer.purchased_credit_priority,
    )


def dead_letter_headers(
    reason: str, detail: str, topic: str, partition: int, offset: int,
    event_id: str | None, event_type: str | None,
) -> Headers:
    """The DLQ header conventions of `schemas/dlq-headers.md`, plus the Stripe event's id/type."""
    return dlq.dead_letter_headers(reason, detail, topic, partition, offset,
                                   stripe_event_id=event_id, stripe_event_type=event_type)


class LedgerConsumer:
    """Consumes `kafka.stripe_events_topic` until `stop` is set; see the module docstring."""

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.time,
                 health: Health | None = None) -> None:
        self.settings = settings
        self.health = health or Health("ledger-consumer")
        self.clock = clock
        self.catalog = catalog_from(settings)
        self.policy = policy_from(settings)
        self.topic = settings.kafka.stripe_events_topic
        self.pool: asyncpg.Pool | None = None
        self.kafka: AIOKafkaConsumer | None = None
        self.dlq: DlqWriter | None = None
        self.records_done = 0  # records applied, ignored or dead-lettered (tests wait on it)

    async def open(self, stop: asyncio.Event | None = None) -> None:
        """Connect, make sure the configured plans exist (customers.plan_key refers to them),
        and join the consumer group; waits out Postgres and broker outages (until `stop`)."""
        s = self.settings
        stop = stop or asyncio.Event()

        async def connect() -> asyncpg.Pool:
            pool = await create_pool(s.database_url, max_size=2)
            try:
                async with pool.acquire() as conn:
                    await sync_plans(conn, s)
                    metrics.CUSTOMERS_PAST_DUE.set(
                        await conn.fetchval("SELECT count(*) FROM customers WHERE past_due"))
            except BaseException:
                await pool.close()
                raise
            return pool

        self.pool = await self.health.retrying(connect, stop, retry_on=_PG_OUTAGES, loop="consume")
        if self.pool is None:
            return
        session_ms = s.kafka.session_timeout_ms
        self.kafka = AIOKafkaConsumer(self.topic, **aiokafka_config(
            s.kafka,
            group_id=s.ledger_consumer.consumer_group,
            client_id="meterline-ledger-consumer",
            enable_auto_commit=False,  # committed after Postgres, below
            auto_offset_reset="earliest",  # a new group must not skip purchases
            session_timeout_ms=session_ms,
            heartbeat_interval_ms=max(session_ms // 5, 500),
            max_poll_records=s.ledger_consumer.max_poll_records,
        ))
        self.dlq = DlqWriter(s.kafka, s.kafka.stripe_events_dlq_topic, self.topic,
                             health=self.health)
        await self.health.retrying(self.kafka.start, stop, retry_on={KafkaError: KAFKA}, loop="consume",
                                   base_s=1.0)

    async def close(self) -> None:
        if self.kafka is not None:
            await self.kafka.stop()
        if self.dlq is not None:
            self.dlq.close()
        if self.pool is not None:
            await self.pool.close()

    async def run(self, stop: asyncio.Event) -> None:
        assert self.kafka is not None
        kafka = self.kafka
        lag = ConsumerLag(self.settings.ledger_consumer.consumer_group, self.topic)
        async with publishing(lag, kafka) as highwater:
            while not stop.is_set():
                batches = await self.health.retrying(lambda: kafka.getmany(timeout_ms=500), stop,
                                                     retry_on={KafkaError: KAFKA}, loop="consume")
                lag.fetched_batches(batches or {}, time.time())
                for tp, records in (batches or {}).items():
                    next_offset = await self._process_run(records, stop)
                    if next_offset is not None:
                        await self._commit(tp, next_offset)
                # applied or dead-lettered: consumed
                lag.delivered_batches(batches or {}, highwater, time.time())

    async def _process_run(self, records: list[ConsumerRecord], stop: asyncio.Event) -> int | None:
        """Handle one partition's records in order; return the offset that may be committed."""
        done: int | None = None
        for rec in records:
            if not await self._handle(rec, stop):
                break
            self.health.beat("consume")
            done = rec.offset + 1
            self.records_done += 1
        if done is not None and not await self._settle_dlq(stop):
            return None  # a dead letter is not durable yet: its offset must not pass
        return done

    async def _handle(self, rec: ConsumerRecord, stop: asyncio.Event) -> bool:
        """Apply, ignore or dead-letter one record; False if stopped before it was done."""
        decision = decide(rec.value or b"", self.catalog)
        if isinstance(decision, Reject):
            return await self._dead_letter(rec, decision.reason, decision.detail,
                                           decision.event_id, decision.event_type, stop)
        if isinstance(decision, Ignore):
            metrics.STRIPE_EVENTS.labels(type_label(decision.event.type), "ignored").inc()
            return True
        return await self._apply(rec, decision, stop)

    async def _apply(self, rec: ConsumerRecord, decision: Apply, stop: asyncio.Event) -> bool:
        assert self.pool is not None
        backoff = 0.1
        event = decision.event
        while True:
            try:
                async with self.pool.acquire() as conn:
                    applied = await apply_event(conn, decision, self.policy)
            except EventRejected as rejected:
                return await self._dead_letter(rec, rejected.reason, rejected.detail, event.id,
                                               event.type, stop)
            except _PERMANENT_DB_ERRORS as exc:
                return await self._dead_letter(rec, Reason.APPLY_FAILED, repr(exc), event.id,
                                               event.type, stop)
            except _TRANSIENT_ERRORS as exc:
                metrics.LEDGER_CONSUMER_RETRIES.labels("postgres").inc()
                self.health.down(POSTGRES, exc)  # logged once per outage, not per retry
                self.health.beat("consume")
                if await stopped_within(stop, backoff):
                    return False
                backoff = min(backoff * 2, self.settings.ledger_consumer.retry_max_seconds)
                continue
            except Exception as exc:  # a bug must not stall the partition: DLQ it, loudly
                log.exception("applying %s raised; dead-lettered", event.id)
                return await self._dead_letter(rec, Reason.APPLY_FAILED, repr(exc), event.id,
                                               event.type, stop)
            self.health.up(POSTGRES)
            await self._record(decision, applied)
            return True

    async def _record(self, decision: Apply, applied: Applied) -> None:
        label = type_label(decision.event.type)
        metrics.STRIPE_EVENTS.labels(label, applied.outcome).inc()
        if applied.outcome == "duplicate":
            return
        metrics.STRIPE_EVENT_LAG.observe(max(self.clock() - decision.event.created, 0))
        for source, credits in applied.grants:
            metrics.STRIPE_GRANTS.labels(source).inc()
            metrics.STRIPE_GRANTED_CREDITS.labels(source).inc(float(credits))
            metrics.LEDGER_GRANTS.labels(source).inc()
        if applied.voided:
            metrics.STRIPE_VOIDED_CREDITS.inc(float(applied.voided))
        if applied.past_due_changed and self.pool is not None:
            try:
                metrics.CUSTOMERS_PAST_DUE.set(
                    await self.pool.fetchval("SELECT count(*) FROM customers WHERE past_due"))
            except _TRANSIENT_ERRORS:
                pass  # a gauge: the event is applied; the next change sets it again

    async def _dead_letter(
        self, rec: ConsumerRecord, reason: Reason, detail: str, event_id: str | None,
        event_type: str | None, stop: asyncio.Event,
    ) -> bool:
        """Queue the record's dead letter (waiting out a full or dead producer); False if
        stopped first."""
        dlq = self.dlq
        assert dlq is not None
        headers = dead_letter_headers(reason.value, detail, rec.topic, rec.partition, rec.offset,
                                      event_id, event_type)

        async def publish() -> bool:
            dlq.publish(rec.key, rec.value or b"", headers, reason.value)
            return True

        if not await self.health.retrying(publish, stop, retry_on={DlqUnavailable: KAFKA},
                                          loop="consume"):
            return False
        log.warning("stripe event %s (offset %d) dead-lettered: %s %s",
                    event_id, rec.offset, reason.value, detail[:200])
        metrics.STRIPE_EVENTS.labels(type_label(event_type), "dlq").inc()
        metrics.STRIPE_EVENTS_REJECTED.labels(reason.value).inc()
        return True

    async def _settle_dlq(self, stop: asyncio.Event) -> bool:
        assert self.dlq is not None
        backoff = 0.5
        while True:
            try:
                await self.dlq.settle(timeout=10)
                return True
            except DlqUnavailable:
                metrics.LEDGER_CONSUMER_RETRIES.labels("dlq").inc()  # DlqWriter reports health
                self.health.beat("consume")
                if await stopped_within(stop, backoff):
                    return False
                backoff = min(backoff * 2, self.settings.ledger_consumer.retry_max_seconds)

    async def _commit(self, tp: TopicPartition, next_offset: int) -> None:
        assert self.kafka is not None
        try:
            await self.kafka.commit({tp: next_offset})
            metrics.LEDGER_CONSUMER_LAST_COMMIT.set(time.time())
        except KafkaError as exc:
            # Lost the partition in a rebalance: its next owner re-reads from the last
            # committed offset, and the claimed event ids make the re-reads harmless.
            log.warning("offset commit for %s failed: %r", tp, exc)


@dataclass
class RunningLedgerConsumer:
    """Handle of an in-process consumer (`meterline dev`, tests): `await handle.stop()`."""

    consumer: LedgerConsumer
    stop_event: asyncio.Event
    task: asyncio.Task[None]

    async def stop(self) -> None:
        self.stop_event.set()
        try:
            await self.task
        finally:
            await self.consumer.close()


async def start(settings: Settings, *, clock: Callable[[], float] = time.time,
                health: Health | None = None) -> RunningLedgerConsumer:
    """Start the ledger consumer in this event loop; it runs until `stop()`."""
    consumer = LedgerConsumer(settings, clock=clock, health=health)
    stop = asyncio.Event()
    try:
        await consumer.open(stop)
    except BaseException:
        await consumer.close()
        raise
    task = asyncio.create_task(consumer.run(stop), name="meterline-ledger-consumer")
    return RunningLedgerConsumer(consumer, stop, task)


async def serve(settings: Settings, stop: asyncio.Event, health: Health | None = None) -> None:
    """Run until `stop` is set (the blocking `run` and embedders share this)."""
    handle = await start(settings, health=health)
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({stopped, handle.task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        await handle.stop()


def run(settings: Settings) -> None:
    """`meterline ledger-consumer`: run until SIGINT/SIGTERM."""
    health = Health("ledger-consumer")
    run_service(settings.ledger_consumer.metrics_port, lambda stop: serve(settings, stop, health),
                health.probes())
