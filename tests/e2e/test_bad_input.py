"""Bad input through the real broker and a real processor: nothing lost, nothing stuck.

- the storm: >= 10,000 bad inputs of every class (1-2 MB messages, JSON nested 300
  deep, invalid UTF-8, NaN/Infinity/1e400, tombstones, null keys, duplicate keys,
  batches mixing good and bad members, every per-event reason) among valid events,
  built by `meterline.devstack.storm`: the DLQ holds exactly the bad inputs, by
  reason; every valid event is debited exactly once; the agent never crashed;
- issue 9's two reproductions: a 1.1 MB message between valid events on one key
  (then a restart), and a message of 300 `[` then 300 `]`.

These pass only with the intake and producers work of issue 9 in place (contained
failures, a DLQ producer sized for 1-2 MB rejections).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from integration.harness import (
    Fleet,
    assert_exact,
    assert_ledger_integrity,
    db_pool,
    fleet,
    read_dlq,
    read_messages,
    wait_for_ledger,
    wait_for_owners,
    wait_until,
)
from meterline.config import Settings
from meterline.devstack.load import LoadGenerator, customer_ids
from meterline.devstack.storm import (
    Storm,
    StormMessage,
    expected_dead_letters,
    send,
    storm_producer,
)

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

SEED = 9_2026
BAD_INPUTS = 10_000


def assert_agent_never_crashed(workers: Fleet) -> None:
    """Faust logs "Crashed reason=..." each time an agent dies (and its supervisor restarts it)."""
    workers.check_alive()
    for path in workers.workdir.glob("*.log"):
        log = path.read_text(errors="replace")
        assert "Crashed reason=" not in log, f"{path.name}: the agent crashed\n{log[-3000:]}"


def produce_all(settings: Settings, messages: list[StormMessage]) -> None:
    send(storm_producer(settings.kafka.bootstrap_servers), settings.kafka.usage_topic, messages)


async def wait_for_dead_letters(settings: Settings, want: Counter[str], workers: Fleet,
                                timeout: float = 240) -> dict[str, int]:
    """The DLQ by reason once it holds as many messages as `want` (or the last count on timeout)."""
    k = settings.kafka
    total = sum(want.values())
    last: dict[str, int] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers.check_alive()
        last = await asyncio.to_thread(read_dlq, k.bootstrap_servers, k.usage_dlq_topic, 1.0)
        if sum(last.values()) >= total:
            break
        await asyncio.sleep(2)
    await asyncio.sleep(2)  # and nothing more arrives after that
    return await asyncio.to_thread(read_dlq, k.bootstrap_servers, k.usage_dlq_topic, 1.0)


async def test_storm_of_bad_inputs_dead_letters_each_once_and_debits_every_valid_event_once(
    pipeline_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = pipeline_settings(customers=50, processor={"require_known_customers": True})
    k = settings.kafka
    with fleet(settings, tmp_path, "w1") as workers:
        async with db_pool(settings.database_url) as pool:
            await wait_for_owners(pool, settings, {"w1"}, workers=workers)
            gen = LoadGenerator(settings, customer_ids(50), duplicates=0, late=0, invalid=0, seed=SEED)
            storm = Storm(gen, seed=SEED)
            messages = storm.mix(int(time.time() * 1000), BAD_INPUTS, valid=2_000)
            want = expected_dead_letters(messages)
            kinds = Counter(m.kind.split("+")[0] for m in messages)
            assert sum(want.values()) >= BAD_INPUTS
            assert set(storm.small) | {"oversized_1_2mb", "large_unknown_type", "mixed_batch",
                                       "deep_member_batch"} <= set(kinds)
            assert sum(m.valid_events for m in messages) == gen.stats.events_sent
            produce_all(settings, messages)

            got = await wait_for_dead_letters(settings, want, workers)
            snap = await wait_for_ledger(pool, gen, timeout=120, workers=workers, settle=1.0)
            assert_agent_never_crashed(workers)

    print(f"storm: {len(messages)} messages, {sum(want.values())} bad inputs -> DLQ {sum(got.values())} "
          f"{dict(sorted(got.items()))}; {gen.stats.events_sent} valid events, {snap.events_debited} debited; "
          f"classes {dict(sorted(kinds.items()))}")
    # Every bad input dead-lettered exactly once, under its reason ...
    assert got == dict(want), {r: (got.get(r, 0), n) for r, n in (want | Counter(got)).items()
                               if got.get(r, 0) != want.get(r, 0)}
    # ... and every valid event (singles, null keys, duplicate keys, batch members) debited once.
    assert_exact(snap, gen)
    async with db_pool(settings.database_url) as pool:
        await assert_ledger_integrity(pool, gen.stats.events_sent)
    # Dead letters carry raw bytes: a whole message as sent, a batch member as its own slice
    # of the batch (never re-encoded); null keys stay null.
    sent = {(m.partition, m.offset): m for m in read_messages(k.bootstrap_servers, k.usage_topic, 1.0)}
    dlq = read_messages(k.bootstrap_servers, k.usage_dlq_topic, 1.0)
    members = 0
    for dead in dlq:
        h = dead.headers
        original = sent[(int(h["meterline.original.partition"]), int(h["meterline.original.offset"]))]
        assert dead.key == original.key
        if "meterline.original.batch_index" in h:
            members += 1
            assert dead.value and original.value and dead.value in original.value
            assert dead.value != original.value
        elif len(original.value or b"") < 900_000:  # large ones: the DLQ may keep a truncated copy
            assert dead.value == (original.value or b"")
    assert members == sum(len(m.dlq) for m in messages if m.kind == "mixed_batch")
    assert sum(1 for m in dlq if m.key is None) == sum(len(m.dlq) for m in messages if m.key is None)


async def test_issue_9_repro_1_a_1_1_mb_message_between_valid_events_loses_nothing(
    pipeline_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """Valid, 1.1 MB, valid on one key; then one more valid event; then a restart: all debited."""
    settings = pipeline_settings(customers=5)
    k = settings.kafka
    with fleet(settings, tmp_path, "w1") as workers:
        async with db_pool(settings.database_url) as pool:
            await wait_for_owners(pool, settings, {"w1"}, workers=workers)
            gen = LoadGenerator(settings, customer_ids(5), duplicates=0, late=0, invalid=0, seed=1)
            storm = Storm(gen, seed=1)
            now_ms = int(time.time() * 1000)
            key = gen.customers[0].encode()
            big = storm._padded(now_ms, 1_100_000, storm.meter.event_type)
            produce_all(settings, [replace(storm.valid(now_ms), key=key),
                                   StormMessage("oversized", key, big, ("oversized",)),
                                   replace(storm.valid(now_ms), key=key)])
            await asyncio.sleep(3)
            produce_all(settings, [replace(storm.valid(now_ms), key=key)])
            await wait_for_ledger(pool, gen, timeout=30, workers=workers)
            assert_agent_never_crashed(workers)
            workers.terminate("w1")
            workers.start("w2")
            await wait_for_owners(pool, settings, {"w2"}, workers=workers)
            snap = await wait_for_ledger(pool, gen, timeout=30, workers=workers, settle=1.0)
            assert gen.stats.events_sent == 3
            assert_exact(snap, gen)
            await assert_ledger_integrity(pool, 3)
            assert_agent_never_crashed(workers)
    sent = read_messages(k.bootstrap_servers, k.usage_topic, 1.0)
    big_offset = next(m.offset for m in sent if m.value is not None and len(m.value) > 1_000_000)
    (dead,) = read_messages(k.bootstrap_servers, k.usage_dlq_topic, 1.0)
    assert dead.headers["meterline.reason"] == b"oversized"
    assert int(dead.headers["meterline.original.offset"]) == big_offset
    assert dead.key == key


async def test_issue_9_repro_2_300_brackets_is_dead_lettered_as_too_deep_byte_for_byte(
    pipeline_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = pipeline_settings(customers=5)
    k = settings.kafka
    deep = b"[" * 300 + b"]" * 300
    with fleet(settings, tmp_path, "w1") as workers:
        async with db_pool(settings.database_url) as pool:
            await wait_for_owners(pool, settings, {"w1"}, workers=workers)
            gen = LoadGenerator(settings, customer_ids(5), duplicates=0, late=0, invalid=0, seed=2)
            storm = Storm(gen, seed=2)
            now_ms = int(time.time() * 1000)
            key = gen.customers[0].encode()
            # The deep message, and a deep batch member next to a valid one, between valid events.
            deep_batch = b"[" + storm._event(now_ms, "not-billed") + b"," + deep + b"]"
            produce_all(settings, [replace(storm.valid(now_ms), key=key),
                                   StormMessage("deep", key, deep, ("too_deep",)),
                                   StormMessage("deep", key, deep_batch, ("too_deep",)),
                                   replace(storm.valid(now_ms), key=key)])
            snap = await wait_for_ledger(pool, gen, timeout=30, workers=workers, settle=1.0)
            assert gen.stats.events_sent == 2
            assert_exact(snap, gen)

            async def both_dead_lettered() -> bool:
                dead = await asyncio.to_thread(read_dlq, k.bootstrap_servers, k.usage_dlq_topic, 0.5)
                return sum(dead.values()) >= 2

            await wait_until(both_dead_lettered, 20, "two dead letters", workers)
            assert_agent_never_crashed(workers)
    dlq = read_messages(k.bootstrap_servers, k.usage_dlq_topic, 1.0)
    assert sorted((m.headers["meterline.reason"], m.value) for m in dlq) == sorted(
        [(b"too_deep", deep), (b"too_deep", deep_batch)])
