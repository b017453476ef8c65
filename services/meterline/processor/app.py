"""The processor as a Faust app: `meterline processor`.

Two changes to Faust's consumer make it fit billing (see DESIGN "measured facts"):

1. **Offsets live in Postgres.** Faust rewinds every assigned partition to its
   committed offset after each rebalance (`seek_to_committed`). Here that call
   claims the partitions in Postgres — bumping their fencing epoch — and seeks
   to the offsets stored there by the flush transactions. Faust never commits
   offsets for the usage topic (acks are off for it).
2. **One item per fetched run, not per event.** Faust's per-message handoff
   caps a process at ~11k messages/s. `getmany` yields one message per
   fetched per-partition run of records, whose value is the whole run; the
   agent processes runs. The run's message carries the last offset, so
   Faust's read-offset bookkeeping stays right.

A crash while handling a run must not lose the rest of it: each run carries the
position it was fetched from, and the pipeline seeks back when a run was
fetched past its next unhandled record (rules in `pipeline.py`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import faust
from faust.transport.consumer import ConsumerMessage
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP

from meterline import metrics
from meterline.config import Settings
from meterline.consumer_lag import ConsumerLag
from meterline.health import POSTGRES, Health
from meterline.kafka.security import faust_credentials
from meterline.processor.dlq import DlqWriter
from meterline.processor.pipeline import Pipeline, RecordRun
from meterline.storage.db import DATABASE_UNAVAILABLE, create_pool
from meterline.storage.grants import sync_config

log = logging.getLogger(__name__)


class TaggedRecords(dict):  # type: ignore[type-arg]
    """Fetched records, plus per partition the seek generation when they were drained and
    the position they were fetched from (None when no seek or earlier fetch told it)."""

    tags: dict[TP, int]
    starts: dict[TP, int | None]


class CheckpointedConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Seeks and drains records on the consumer thread, so they are ordered.

    A seek made after records were drained gets a new generation; those records
    keep the old one and the pipeline drops them (they come from the position
    before the seek). aiokafka discards fetches for a partition whose position
    moved, so records drained after a seek come from the new position.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seek_tags: dict[TP, int] = {}
        # Where the next drained records of each partition come from: the last seek's
        # offset, else the offset after the last drained record.
        self.positions: dict[TP, int] = {}

    async def _fetch_records(self, *args: Any, **kwargs: Any) -> Any:
        records = TaggedRecords(await super()._fetch_records(*args, **kwargs))
        records.tags = dict(self.seek_tags)  # no await since the drain: same instant
        records.starts = {}
        for tp, recs in records.items():
            if recs:
                records.starts[tp] = self.positions.get(tp)
                self.positions[tp] = recs[-1].offset + 1
        return records

    async def seek_tagged(self, seeks: Mapping[TP, tuple[int, int]]) -> None:
        """Seek partitions to (offset, generation) on the consumer thread."""
        await self.call_thread(self._seek_tagged, seeks)

    async def _seek_tagged(self, seeks: Mapping[TP, tuple[int, int]]) -> None:
        consumer = self._ensure_consumer()
        for tp, (offset, generation) in seeks.items():
            consumer.seek(tp, offset)
            self.seek_tags[tp] = generation
            self.positions[tp] = offset


class CheckpointedConsumer(faust_aiokafka.Consumer):
    """Faust's aiokafka consumer, seeking to Postgres checkpoints and yielding record runs."""

    pipeline: Pipeline | None = None  # set by MeterlineApp before the worker starts
    usage_topic: str = ""
    lag: ConsumerLag | None = None  # set by build_app
    _thread: CheckpointedConsumerThread

    def _new_consumer_thread(self) -> CheckpointedConsumerThread:
        return CheckpointedConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def seek_to_committed(self) -> Mapping[TP, int]:
        committed = dict(await super().seek_to_committed())
        assert self.pipeline is not None
        ours = [tp for tp in self.assignment() if tp.topic == self.usage_topic]
        mine = {tp.partition for tp in ours}
        self.pipeline.release(p for p in list(self.pipeline.epochs) if p not in mine)
        resume = await self.pipeline.claim(mine)
        await self._thread.seek_tagged(
            {tp: (resume[tp.partition], self.pipeline.generation(tp.partition)) for tp in ours})
        for tp in ours:
            committed[tp] = resume[tp.partition]
        return committed

    async def seek_back(self, seeks: Mapping[int, tuple[int, int]]) -> None:
        """The pipeline's `Seek`: usage-topic partition -> (offset, seek generation)."""
        await self._thread.seek_tagged(
            {TP(self.usage_topic, p): target for p, target in seeks.items()})

    async def _commit(self, offsets: Mapping[TP, int]) -> bool:
        # The usage topic's offsets are committed to Postgres with the debits.
        others = {tp: o for tp, o in offsets.items() if tp.topic != self.usage_topic}
        return await super()._commit(others) if others else True

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[TP, Any]]:
        records, active = await self._wait_next_records(timeout)
        generation_id = self.app.consumer_generation_id
        if records is None or self.should_stop:
            return
        if not self.flow_active:
            await self.perform_seek()
            return
        tags: Mapping[TP, int] = getattr(records, "tags", {})
        starts: Mapping[TP, int | None] = getattr(records, "starts", {})
        for tp, recs in records.items():
            if not recs or (active is not None and tp not in active):
                continue
            if self.app.consumer_generation_id != generation_id:
                return
            last = recs[-1]
            if tp.topic == self.usage_topic:
                self._update_lag(tp, recs)
            run = RecordRun(tp.partition, tags.get(tp, 0), recs, starts.get(tp))
            yield tp, ConsumerMessage(
                tp.topic, tp.partition, last.offset, (last.timestamp or 0) / 1000.0,
                last.timestamp_type, [], None, run,  # type: ignore[arg-type] # the run is the value
                None, 0, 0, tp,
                generation_id=generation_id,
            )

    def usage_highwater(self, partition: int) -> int | None:
        try:
            value: int | None = self.highwater(TP(self.usage_topic, partition))
        except Exception:  # noqa: BLE001 - unknown right after assignment, or not assigned
            return None
        return value

    def usage_partitions(self) -> set[int]:
        return {tp.partition for tp in self.assignment() if tp.topic == self.usage_topic}

    def _update_lag(self, tp: TP, records: Any) -> None:
        last = records[-1]
        highwater = self.usage_highwater(tp.partition)
        if highwater is not None:
            metrics.CONSUMER_LAG.labels(str(tp.partition)).set(max(highwater - last.offset - 1, 0))
        if self.lag is not None:
            self.lag.fetched(tp.partition, records[0].offset, records[0].timestamp, time.time())

    def consumed(self, run: RecordRun) -> None:
        """The pipeline applied `run`. Lag in seconds counts from here, not from the fetch:
        runs waiting in Faust's stream buffer (back-pressure) are not consumed yet."""
        if self.lag is not None and run.records:
            last = run.records[-1]
            self.lag.delivered(run.partition, last.offset, getattr(last, "timestamp", None),
                               self.usage_highwater(run.partition), time.time())


class CheckpointedTransport(faust_aiokafka.Transport):
    Consumer = CheckpointedConsumer


class MeterlineApp(faust.App):
    def _new_transport(self) -> Any:
        return CheckpointedTransport(self.conf.broker_consumer, self)


def build_app(settings: Settings, worker_id: str | None = None) -> tuple[faust.App, dict[str, Any]]:
    """The Faust app, its agent and tasks; state holds the pipeline once started."""
    k = settings.kafka
    p = settings.processor
    session_s = k.session_timeout_ms / 1000
    app = MeterlineApp(
        k.consumer_group,
        broker=f"kafka://{k.bootstrap_servers}",
        # TLS/SASL for every client Faust makes (consumer, producer, admin).
        broker_credentials=faust_credentials(k),
        value_serializer="raw",
        key_serializer="raw",
        web_enabled=False,
        store="memory://",
        topic_allow_declare=False,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=session_s,
        broker_heartbeat_interval=max(session_s / 5, 0.5),
        broker_rebalance_timeout=max(session_s * 2, 10),
        broker_max_poll_records=5000,
        consumer_max_fetch_size=8 * 1024 * 1024,
        stream_buffer_maxsize=64,
        broker_commit_interval=3600,
    )
    topic = app.topic(k.usage_topic, acks=False, value_serializer="raw", key_serializer="raw")
    CheckpointedConsumer.usage_topic = k.usage_topic
    CheckpointedConsumer.lag = ConsumerLag(k.consumer_group, k.usage_topic)
    owner = worker_id or f"{socket.gethostname()}:{os.getpid()}"
    health = processor_health(settings)
    state: dict[str, Any] = {"health": health}

    @app.agent(topic, concurrency=1)
    async def process(stream: faust.StreamT) -> None:
        pipeline = await _ready(state)
        consumer = app.consumer
        assert isinstance(consumer, CheckpointedConsumer)
        pipeline.seek = consumer.seek_back
        if state.get("agent_started"):
            # Faust restarted a crashed agent: whatever run it was handling is unknown here,
            # so refetch every owned partition from its next unhandled record.
            await pipeline.rewind_all()
        state["agent_started"] = True
        try:
            async for run in stream:
                try:
                    await pipeline.consume(run)
                    consumer.consumed(run)
                except Exception:  # noqa: BLE001 - one run, not the agent: the next run seeks back
                    metrics.AGENT_CRASHES.inc()
                    log.exception("handling a run of partition %d raised; its unhandled records "
                                  "are fetched again", run.partition)
                    try:
                        await pipeline.rewind(run)
                    except Exception:  # noqa: BLE001 - kept pending; the next run's gap check seeks
                        log.exception("seeking partition %d back failed", run.partition)
        except Exception:
            # Faust restarts a crashed agent; the consumer goes on with its next fetch and
            # the pipeline's gap check brings the partitions back to their unhandled records.
            metrics.AGENT_CRASHES.inc()
            log.exception("the processor agent crashed; Faust restarts it")
            raise

    # Each loop runs in rounds that never end it: an unexpected exception is counted, logged
    # once and retried with back-off (health.py). /healthz judges the flush loop's rounds,
    # /readyz the last word on Postgres and Kafka.
    @app.task
    async def flush_loop() -> None:
        pipeline = await _ready(state)
        await health.rounds(pipeline.flush_tick, lambda: app.should_stop, loop="flush",
                            interval_s=p.flush_interval_ms / 1000)

    @app.task
    async def lag_loop() -> None:
        await _ready(state)
        consumer = app.consumer
        assert isinstance(consumer, CheckpointedConsumer) and consumer.lag is not None
        await consumer.lag.publish_every(1.0, consumer.usage_partitions,
                                         consumer.usage_highwater, time.time)

    @app.task
    async def maintenance_loop() -> None:
        pipeline = await _ready(state)

        async def maintain() -> None:
            try:
                await pipeline.maintain()
            except DATABASE_UNAVAILABLE as exc:  # an outage, not a failure: retried next round
                health.down(POSTGRES, exc)
        await health.rounds(maintain, lambda: app.should_stop, loop="maintenance", interval_s=5)

    @app.task
    async def readiness_loop() -> None:
        """Postgres and Kafka checked even when the topic is idle and nothing flushes."""
        pipeline = await _ready(state)

        async def probe() -> None:
            try:
                await pipeline.pool.fetchval("SELECT 1", timeout=5)
            except DATABASE_UNAVAILABLE as exc:
                health.down(POSTGRES, exc)
            else:
                health.up(POSTGRES)
            await pipeline.dlq.reachable()
        await health.rounds(probe, lambda: app.should_stop, loop="readiness", interval_s=5)

    async def on_startup() -> None:
        pool = await create_pool(settings.database_url, max_size=4)
        async with pool.acquire() as conn:
            await sync_config(conn, settings)
        dlq = DlqWriter(k, k.usage_dlq_topic, k.usage_topic, health=health)
        pipeline = Pipeline(settings, pool, dlq, owner, health=health)
        await pipeline.maintain()
        CheckpointedConsumer.pipeline = pipeline
        state["pipeline"] = pipeline
        state["ready"].set()

    state["ready"] = asyncio.Event()
    state["startup"] = on_startup
    return app, state


async def _ready(state: dict[str, Any]) -> Pipeline:
    await state["ready"].wait()
    pipeline: Pipeline = state["pipeline"]
    return pipeline


def processor_health(settings: Settings) -> Health:
    """The processor's readiness and liveness. A flush round may wait out the DLQ's settle
    (three attempts of the producer's message timeout plus 5 s) before it beats."""
    settle_s = 3 * (settings.kafka.producer_message_timeout_ms / 1000 + 5)
    return Health("processor", stall_after_s=max(300.0, settle_s + 60))


def run(settings: Settings, worker_id: str | None = None) -> None:
    """Run a processor worker until SIGINT/SIGTERM."""
    from faust.worker import Worker

    app, state = build_app(settings, worker_id)
    metrics.serve(settings.processor.metrics_port, state["health"].probes())
    # The pipeline (asyncpg pool, DLQ producer) must exist before the consumer's
    # first rebalance calls seek_to_committed, so build it on the worker's loop first.
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    loop.run_until_complete(state["startup"]())
    worker = Worker(app, loop=loop, loglevel="INFO", override_logging=False)
    worker.execute_from_commandline()
