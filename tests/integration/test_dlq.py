"""Bad input: every class reaches the DLQ under its own reason, and never blocks its partition.

Through the real broker and a processor subprocess that requires known customers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest

from meterline.config import Settings
from meterline.core.events import Reason
from meterline.devstack.load import LoadGenerator

from .harness import (
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

pytestmark = pytest.mark.integration

KNOWN = "cust_known"
MAX_BYTES = 2048


def _iso(dt: datetime) -> str:
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _event(n: int, now: datetime, **changes: object) -> bytes:
    doc: dict[str, object] = {
        "specversion": "1.0", "id": f"bad-{n}", "source": "dlq-test", "type": "llm_tokens",
        "subject": KNOWN, "time": _iso(now), "data": {"tokens": 10},
    }
    for key, value in changes.items():
        if value is None:
            doc.pop(key)
        else:
            doc[key] = value
    return orjson.dumps(doc)


def bad_messages(now: datetime) -> list[tuple[Reason, bytes]]:
    """One single-event message per reason (two for invalid_value and invalid_envelope)."""
    oversized = _event(1, now, data={"tokens": 1, "pad": "x" * (MAX_BYTES + 100)})
    assert len(oversized) > MAX_BYTES
    return [
        (Reason.OVERSIZED, oversized),
        (Reason.NOT_UTF8, b'{"specversion":"1.0","id":"\xff\xfe"}'),
        (Reason.MALFORMED_JSON, b'{"specversion": "1.0", "id": '),
        (Reason.INVALID_ENVELOPE, _event(2, now, subject=None)),
        (Reason.TOO_DEEP, b"[" * 300 + b"]" * 300),  # issue 9: orjson could not re-encode it
        (Reason.INVALID_TIME, _event(3, now, time="yesterday at noon")),
        (Reason.INVALID_VALUE, _event(4, now, data={"tokens": -5})),
        (Reason.INVALID_VALUE, _event(5, now, data={"tokens": "NaN"})),
        (Reason.UNKNOWN_METER, _event(6, now, type="no.such.meter")),
        (Reason.UNKNOWN_CUSTOMER, _event(7, now, subject="cust_nobody")),
        (Reason.TOO_OLD, _event(8, now, time=_iso(now - timedelta(days=40)))),
        (Reason.FUTURE_TIMESTAMP, _event(9, now, time=_iso(now + timedelta(hours=1)))),
    ]


async def test_every_bad_input_class_lands_in_dlq_with_its_reason(
    pipeline_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = pipeline_settings(
        customers=[{"id": KNOWN}],
        processor={"require_known_customers": True, "max_message_bytes": MAX_BYTES},
    )
    k = settings.kafka
    with fleet(settings, tmp_path, "w1") as workers:
        async with db_pool(settings.database_url) as pool:
            await wait_for_owners(pool, settings, {"w1"}, workers=workers)
            gen = LoadGenerator(settings, [KNOWN], duplicates=0, late=0, invalid=0, seed=3)
            now = datetime.now(UTC)
            now_ms = int(now.timestamp() * 1000)
            singles = bad_messages(now)
            # A batch envelope mixing valid and invalid members (indexes 1 and 3 are bad).
            batch_members = [
                orjson.loads(gen.make_event(now_ms)[1]),
                orjson.loads(_event(10, now, data={"tokens": -1})),
                orjson.loads(gen.make_event(now_ms)[1]),
                orjson.loads(_event(11, now, type="no.such.meter")),
            ]
            batch = orjson.dumps(batch_members)
            # All on the known customer's key: one partition, where they must not block.
            key = KNOWN.encode()
            for _, body in singles:
                gen.producer.produce(k.usage_topic, body, key)
            gen.producer.produce(k.usage_topic, batch, key)
            gen.producer.produce(k.usage_topic, b"[]", key)  # a batch of no events: no dead letter
            _, last_valid = gen.make_event(now_ms)
            gen.producer.produce(k.usage_topic, last_valid, key)
            gen.flush()

            # The valid event after all the bad ones is debited: the partition kept flowing.
            snap = await wait_for_ledger(pool, gen, timeout=30, workers=workers, settle=0.5)
            assert gen.stats.events_sent == 3
            assert_exact(snap, gen)
            await assert_ledger_integrity(pool, gen.stats.events_sent)

            sent = {m.value: m for m in read_messages(k.bootstrap_servers, k.usage_topic, 1.0)}
            assert len(sent) == len(singles) + 3
            final = sent[last_valid]
            # ... and the checkpoint moved past every bad record, to the end of the partition.
            await wait_until(
                lambda: pool.fetchval(
                    "SELECT next_offset = $3 FROM partition_checkpoints "
                    "WHERE topic = $1 AND partition = $2", k.usage_topic, final.partition,
                    final.offset + 1),
                15, "the checkpoint past the last record", workers)

    # Every reason, with the right count.
    want = Counter(reason.value for reason, _ in singles)
    want.update([Reason.INVALID_VALUE.value, Reason.UNKNOWN_METER.value])
    # internal_error is a meterline bug, not bad input: test_intake_failures.py injects one.
    assert set(want) == {r.value for r in Reason} - {Reason.INTERNAL_ERROR.value}
    assert read_dlq(k.bootstrap_servers, k.usage_dlq_topic, 1.0) == dict(want)

    # Headers carry the origin of each rejected record.
    dlq = read_messages(k.bootstrap_servers, k.usage_dlq_topic, 1.0)
    assert len(dlq) == sum(want.values())
    batch_origin = sent[batch]
    by_batch_index = {}
    for m in dlq:
        h = m.headers
        assert h["meterline.original.topic"] == k.usage_topic.encode()
        assert m.key == key
        reason = h["meterline.reason"].decode()
        if "meterline.original.batch_index" in h:
            index = int(h["meterline.original.batch_index"])
            by_batch_index[index] = reason
            origin = batch_origin
            assert m.value == orjson.dumps(batch_members[index])  # its own bytes in the batch
        else:
            origin = sent[m.value]  # single-event messages reach the DLQ byte for byte
            assert (reason, m.value) in [(r.value, b) for r, b in singles]
        assert int(h["meterline.original.partition"]) == origin.partition
        assert int(h["meterline.original.offset"]) == origin.offset
        assert h["meterline.detail"]
    assert by_batch_index == {1: Reason.INVALID_VALUE.value, 3: Reason.UNKNOWN_METER.value}
