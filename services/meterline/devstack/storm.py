"""Bad-input storm: every class of input the processor must dead-letter, mixed with valid events.

A platform team's worst day on `usage.events`, as data: 1-2 MB messages, JSON
nested 300 deep, invalid UTF-8, NaN/Infinity/1e400, tombstones, null keys,
duplicate object keys, batches mixing good and bad members, every per-event
reason. Each message built here knows what it must cause: the DLQ reasons it
must produce (one per rejected message or batch member) and, for the valid
events in it, their debit (recorded in the wrapped `LoadGenerator`, whose
`expected()` is the ledger the run must end with).

Used by the storm test (tests/e2e/test_bad_input_storm.py); the same `Storm`
can feed any topic, e.g. `meterline load` against a `meterline dev` stack.
"""

from __future__ import annotations

import functools
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import orjson
from confluent_kafka import Producer

from meterline.devstack.load import LoadGenerator
from meterline.kafka.security import KafkaTarget, librdkafka_config

MB = 1_000_000


@dataclass(frozen=True, slots=True)
class StormMessage:
    """One `usage.events` message and what the processor must make of it."""

    kind: str  # the input class, e.g. "too_deep_300"
    key: bytes | None
    value: bytes | None
    dlq: tuple[str, ...]  # reasons of the dead letters it must cause, one per rejection
    valid_events: int = 0  # events in it that must be debited


class Storm:
    """Builds storm messages; valid events go through `gen` so its ledger stays exact."""

    def __init__(self, gen: LoadGenerator, seed: int = 0) -> None:
        self.gen = gen
        self.rng = random.Random(seed)
        p = gen.settings.processor
        self.max_bytes = p.max_message_bytes
        self.max_batch = p.max_batch_events
        self.depth = p.max_json_depth
        self.lateness_ms = int(p.max_lateness_days * 86_400_000)
        self.meter = next(m for m in gen.meters if m.aggregation != "count")
        self._n = 0
        # Small bad inputs, drawn at random: name -> builder(now_ms) -> (value, its reasons).
        self.small: dict[str, Callable[[int], tuple[bytes | None, tuple[str, ...]]]] = {
            "not_utf8": self._not_utf8,
            "malformed_json": self._malformed,
            "nan_infinity_1e400": self._non_finite,
            "tombstone": lambda _: (None, ("malformed_json",)),
            "too_deep_300": lambda _: (b"[" * 300 + b"]" * 300, ("too_deep",)),
            "too_deep_data": self._deep_data,
            "not_an_object": lambda _: (self.rng.choice([b"42", b'"usage"', b"null", b"true"]),
                                        ("invalid_envelope",)),
            "duplicate_keys_bad_last": self._duplicate_bad_last,
            "oversized_batch_count": lambda _: (
                b"[" + b",".join([b"0"] * (self.max_batch + 1)) + b"]", ("oversized",)),
            **{reason: functools.partial(self._member, reason=reason) for reason in (
                "invalid_envelope", "invalid_time", "invalid_value", "unknown_meter",
                "unknown_customer", "too_old", "future_timestamp")},
        }
        self.member_reasons = ("invalid_envelope", "invalid_time", "invalid_value", "unknown_meter",
                               "unknown_customer", "too_old", "future_timestamp", "not_an_object",
                               "duplicate_keys_bad_last")

    # --- messages -------------------------------------------------------------------------

    def valid(self, now_ms: int) -> StormMessage:
        customer, body = self.gen.make_event(now_ms)
        return StormMessage("valid", customer.encode(), body, (), 1)

    def valid_duplicate_keys(self, now_ms: int) -> StormMessage:
        """A valid event whose `data` and `subject` are written twice: the last ones count."""
        customer, body = self.gen.make_event(now_ms)
        return StormMessage("valid_duplicate_keys", customer.encode(),
                            b'{"data":"not a number","subject":7,' + body[1:], (), 1)

    def valid_null_key(self, now_ms: int) -> StormMessage:
        _, body = self.gen.make_event(now_ms)
        return StormMessage("valid_null_key", None, body, (), 1)

    def empty_batch(self) -> StormMessage:
        return StormMessage("empty_batch", self._key(), self.rng.choice([b"[]", b" [ ] "]), ())

    def bad(self, now_ms: int, kind: str | None = None, null_key: bool = False) -> StormMessage:
        """One small bad input (a random class unless `kind`), keyed by a customer or null."""
        kind = kind or self.rng.choice(sorted(self.small))
        value, reasons = self.small[kind](now_ms)
        return StormMessage(kind + ("+null_key" if null_key else ""), None if null_key else self._key(),
                            value, reasons)

    def oversized(self, now_ms: int) -> StormMessage:
        """A 1-2 MB event: above `max_message_bytes`, rejected whole."""
        size = self.rng.randint(self.max_bytes + 1, 2 * MB)
        return StormMessage("oversized_1_2mb", self._key(), self.padded(now_ms, size, self.meter.event_type),
                            ("oversized",))

    def large_unknown_type(self, now_ms: int) -> StormMessage:
        """Just under `max_message_bytes`, with a `type` no meter has: a large dead letter."""
        size = self.rng.randint(int(self.max_bytes * 0.95), self.max_bytes)
        return StormMessage("large_unknown_type", self._key(), self.padded(now_ms, size, "no.such.meter"),
                            ("unknown_meter",))

    def mixed_batch(self, now_ms: int) -> StormMessage:
        """A batch of valid and bad members: each bad member is dead-lettered alone."""
        members: list[bytes] = []
        reasons: list[str] = []
        valid = 0
        for _ in range(self.rng.randint(5, 40)):
            if self.rng.random() < 0.5:
                members.append(self.gen.make_event(now_ms)[1])
                valid += 1
            else:
                reason = self.rng.choice(self.member_reasons)
                value, (dlq_reason,) = self.small[reason](now_ms)
                assert value is not None
                members.append(value)
                reasons.append(dlq_reason)
        spacing = self.rng.choice([b",", b", ", b",\n  "])
        return StormMessage("mixed_batch", self._key(), b"[" + spacing.join(members) + b"]",
                            tuple(reasons), valid)

    def deep_member_batch(self, now_ms: int) -> StormMessage:
        """Valid-looking members and one nested too deep: the whole batch is `too_deep`.
        Its valid-looking members are not recorded: they must not be debited."""
        members = [self.event(now_ms, f"deep-batch-{self._next()}") for _ in range(self.rng.randint(1, 5))]
        members.insert(self.rng.randrange(len(members) + 1), self._nested(self.depth + 5))
        return StormMessage("deep_member_batch", self._key(), b"[" + b",".join(members) + b"]", ("too_deep",))

    def mix(self, now_ms: int, bad_inputs: int = 10_000, valid: int = 2_000) -> list[StormMessage]:
        """At least `bad_inputs` bad inputs of every class among about `valid` + batch-member
        valid events, shuffled: 1-2 MB messages and large ones, deep batches, mixed
        batches, every small class at least 20 times (a quarter of them with a null key)."""
        scale = max(bad_inputs / 10_000, 0.01)
        messages = [self.oversized(now_ms) for _ in range(max(1, round(12 * scale)))]
        messages += [self.large_unknown_type(now_ms) for _ in range(max(1, round(6 * scale)))]
        messages += [self.deep_member_batch(now_ms) for _ in range(max(1, round(30 * scale)))]
        messages += [self.mixed_batch(now_ms) for _ in range(max(1, round(150 * scale)))]
        for kind in sorted(self.small):
            messages += [self.bad(now_ms, kind, null_key=i % 4 == 0) for i in range(20)]
        messages += [self.valid(now_ms) for _ in range(valid)]
        messages += [self.valid_duplicate_keys(now_ms) for _ in range(max(1, valid // 20))]
        messages += [self.valid_null_key(now_ms) for _ in range(max(1, valid // 20))]
        messages += [self.empty_batch() for _ in range(20)]
        while sum(len(m.dlq) for m in messages) < bad_inputs:
            messages.append(self.bad(now_ms, null_key=self.rng.random() < 0.05))
        self.rng.shuffle(messages)
        return messages

    # --- builders -------------------------------------------------------------------------

    def _next(self) -> int:
        self._n += 1
        return self._n

    def _key(self) -> bytes:
        return self.rng.choice(self.gen.customers).encode()

    def event(self, now_ms: int, event_id: str, **changes: object) -> bytes:
        """A valid event of the first sum meter, not recorded as expected (None drops a member)."""
        doc: dict[str, object] = {
            "specversion": "1.0", "id": event_id, "source": f"{self.gen.source}-storm",
            "type": self.meter.event_type, "subject": self.rng.choice(self.gen.customers),
            "time": self.gen._iso(now_ms), "data": {self.meter.value_property or "value": 3},
        }
        for k, v in changes.items():
            if v is None:
                doc.pop(k)
            else:
                doc[k] = v
        return orjson.dumps(doc)

    def _member(self, now_ms: int, reason: str) -> tuple[bytes, tuple[str, ...]]:
        """One event broken so that exactly `reason` names it."""
        i = f"storm-{self._next()}"
        day = 86_400_000
        broken: dict[str, dict[str, object]] = {
            "invalid_envelope": self.rng.choice([{"subject": None}, {"specversion": "0.3"}, {"id": ""},
                                                 {"source": 17}]),
            "invalid_time": {"time": self.rng.choice(["yesterday", "2026-02-30T00:00:00Z",
                                                      "2026-11-21T17:04:00", 1795280640])},
            "invalid_value": {"data": {self.meter.value_property: self.rng.choice(
                [-5, "NaN", True, "1e3", [1], "0000000000000001",
                 "1.2345678901234567"])}},  # last: 17 significant digits, more than Stripe takes
            "unknown_meter": {"type": "no.such.meter"},
            "unknown_customer": {"subject": f"cust_nobody_{i}"},
            "too_old": {"time": self.gen._iso(now_ms - self.lateness_ms - 5 * day)},
            "future_timestamp": {"time": self.gen._iso(now_ms + 3_600_000)},
        }
        return self.event(now_ms, i, **broken[reason]), (reason,)

    def _not_utf8(self, now_ms: int) -> tuple[bytes, tuple[str, ...]]:
        body = self.event(now_ms, f"storm-{self._next()}")
        bad = self.rng.choice([b"\xff\xfe", b"\x80", b"\xc3", b"\xed\xa0\x80"])  # incl. an encoded surrogate
        return body.replace(b'"id":"', b'"id":"' + bad, 1), ("not_utf8",)

    def _malformed(self, now_ms: int) -> tuple[bytes, tuple[str, ...]]:
        body = self.event(now_ms, f"storm-{self._next()}")
        return self.rng.choice([body[: self.rng.randint(0, len(body) - 1)], body + b"}", b"{'a': 1}",
                                b"", b"[1,]", body.replace(b":", b"=", 1)]), ("malformed_json",)

    def _non_finite(self, now_ms: int) -> tuple[bytes, tuple[str, ...]]:
        body = self.event(now_ms, f"storm-{self._next()}")
        literal = self.rng.choice([b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400"])
        return body.replace(b":3}", b":" + literal + b"}", 1), ("malformed_json",)

    def _nested(self, depth: int) -> bytes:
        return b'{"a":' * (depth // 2) + b"[" * (depth - depth // 2) + b"]" * (depth - depth // 2) \
            + b"}" * (depth // 2)

    def _deep_data(self, now_ms: int) -> tuple[bytes, tuple[str, ...]]:
        body = self.event(now_ms, f"storm-{self._next()}", type="api_request")
        return body[:-1] + b',"trace":' + self._nested(self.rng.randint(self.depth, 300)) + b"}", ("too_deep",)

    def _duplicate_bad_last(self, now_ms: int) -> tuple[bytes, tuple[str, ...]]:
        body = self.event(now_ms, f"storm-{self._next()}")  # valid, then its data written again
        return body[:-1] + b',"data":{"' + (self.meter.value_property or "value").encode() + b'":-3}}', (
            "invalid_value",)

    def padded(self, now_ms: int, size: int, event_type: str) -> bytes:
        """An event of `event_type` padded to about `size` bytes, not recorded as expected."""
        body = self.event(now_ms, f"storm-{self._next()}", type=event_type)
        pad = size - len(body) - len(b',"pad":""')
        return body[:-1] + b',"pad":"' + b"x" * max(pad, 0) + b'"}'


def storm_producer(kafka: KafkaTarget, max_message_bytes: int = 3 * MB) -> Producer:
    """A producer that can write the storm's largest messages (librdkafka's default is 1 MB)."""
    return Producer(librdkafka_config(kafka, **{
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 20,
        "message.max.bytes": max_message_bytes,
        "queue.buffering.max.kbytes": 512 * 1024,
    }))


def expected_dead_letters(messages: list[StormMessage]) -> Counter[str]:
    """DLQ messages by reason that `messages` must produce."""
    return Counter(reason for m in messages for reason in m.dlq)


def send(producer: Producer, topic: str, messages: list[StormMessage], timeout: float = 120) -> None:
    """Produce every message and wait until the broker has them all."""
    for m in messages:
        while True:
            try:
                producer.produce(topic, m.value, m.key)
                break
            except BufferError:  # local queue full: serve delivery reports, retry
                producer.poll(0.05)
        producer.poll(0)
    remaining = producer.flush(timeout)
    if remaining:
        raise RuntimeError(f"{remaining} storm messages were not delivered to the broker")


def run(gen: LoadGenerator, bad_inputs: int, valid: int, seed: int | None = None) -> dict[str, object]:
    """`meterline load --storm N`: one storm to `usage.events`; what it must produce."""
    storm = Storm(gen, seed if seed is not None else random.randrange(2**32))
    messages = storm.mix(int(time.time() * 1000), bad_inputs, valid)
    send(storm_producer(gen.settings.kafka), gen.topic, messages)
    return {"messages": len(messages), "valid_events": gen.stats.events_sent,
            "expected_dlq": dict(sorted(expected_dead_letters(messages).items()))}
