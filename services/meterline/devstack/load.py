"""Load generator: `meterline load` — a realistic usage mix, and the ledger it should produce.

Customers are picked with a skewed (Zipf-like) popularity; each event is one
of the configured meters. A configurable fraction is re-sent as exact
duplicates (same source/id), a fraction carries an old timestamp (late: debited
as a correction of its own window), and a fraction is bad input (must reach
the DLQ). The generator keeps the *expected* debits per customer, computed
independently of the pipeline, so a run can check the ledger exactly.
"""

from __future__ import annotations

import argparse
import itertools
import random
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

import orjson
from confluent_kafka import Producer

from meterline.config import MeterConfig, Settings
from meterline.core.credits import debit_for
from meterline.kafka.security import librdkafka_config

# Bad inputs the generator sends; each must end in the DLQ under this reason.
BAD_INPUTS: tuple[tuple[str, bytes | None], ...] = (
    ("malformed_json", b'{"specversion": "1.0", "id": '),
    ("not_utf8", b'{"specversion":"1.0","id":"\xff\xfe"}'),
    ("invalid_envelope", b'{"specversion":"1.0","source":"loadgen","type":"api_request"}'),
    ("unknown_meter", None),  # built per event below (needs a fresh time)
    ("invalid_value", None),
    ("too_old", None),
)


@dataclass
class LoadStats:
    events_sent: int = 0  # unique valid events (each must be debited once)
    duplicates_sent: int = 0
    late_events: int = 0
    invalid_sent: int = 0
    messages_sent: int = 0
    expected_credits: dict[str, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    # value sums per (customer, meter): debits are computed per window aggregate by the
    # pipeline, so the generator keeps quantities and prices them per window (see expected()).
    window_quantities: dict[tuple[str, str, int], Decimal] = field(
        default_factory=lambda: defaultdict(Decimal))


class LoadGenerator:
    def __init__(
        self,
        settings: Settings,
        customers: list[str],
        *,
        batch_size: int = 0,
        duplicates: float = 0.05,
        late: float = 0.01,
        invalid: float = 0.005,
        seed: int | None = None,
        source: str = "loadgen",
        bootstrap_servers: str | None = None,
    ) -> None:
        self.settings = settings
        self.meters: list[MeterConfig] = list(settings.meters)
        if not self.meters:
            raise ValueError("the load generator needs at least one meter in the config")
        self.customers = customers
        # Cumulative weights, computed once: choices() with plain weights re-sums them per call.
        self.cum_weights = list(itertools.accumulate(1 / (i + 1) ** 0.8 for i in range(len(customers))))
        self.batch_size = batch_size
        self.p_dup, self.p_late, self.p_invalid = duplicates, late, invalid
        self.rng = random.Random(seed)
        self.source = f"{source}-{self.rng.getrandbits(32):08x}"
        self.stats = LoadStats()
        self.topic = settings.kafka.usage_topic
        self._recent: deque[tuple[str, bytes]] = deque(maxlen=5000)
        self._seq = 0
        self._time_cache: tuple[int, str] = (0, "")
        self.lock = threading.Lock()
        kafka = settings.kafka
        if bootstrap_servers:
            kafka = kafka.model_copy(update={"bootstrap_servers": bootstrap_servers})
        self.producer = Producer(librdkafka_config(kafka, **{
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 20,
            "batch.size": 1_000_000,
            "compression.type": "lz4",
            "queue.buffering.max.messages": 1_000_000,
        }))

    # --- event construction ----------------------------------------------------------

    def _iso(self, ms: int) -> str:
        if self._time_cache[0] != ms:
            dt = datetime.fromtimestamp(ms / 1000, UTC)
            self._time_cache = (ms, dt.isoformat(timespec="milliseconds").replace("+00:00", "Z"))
        return self._time_cache[1]

    def _value(self, meter: MeterConfig) -> str:
        if meter.aggregation == "count":
            return "1"
        if meter.key.startswith("gpu"):
            return f"{self.rng.randint(1, 5000) / 1000:.3f}"  # seconds, 3 decimals
        return str(self.rng.randint(1, 2000))

    def make_event(self, now_ms: int, late: bool = False) -> tuple[str, bytes]:
        """One valid event; records what it must cost."""
        customer = self.rng.choices(self.customers, cum_weights=self.cum_weights)[0]
        meter = self.rng.choice(self.meters)
        self._seq += 1
        # Late: half land in windows flushed seconds ago (-> correction aggregates), half hours back.
        if late:
            back = self.rng.choice((self.rng.randint(8_000, 60_000), self.rng.randint(60_000, 7_200_000)))
            t = now_ms - back
        else:
            t = now_ms
        value = self._value(meter)
        prop = meter.value_property or "value"
        body = (
            f'{{"specversion":"1.0","id":"{self._seq}","source":"{self.source}",'
            f'"type":"{meter.event_type}","subject":"{customer}","time":"{self._iso(t)}",'
            f'"data":{{"{prop}":{value}}}}}'
        ).encode()
        size = self.settings.processor.window_size_ms
        qty = Decimal(1) if meter.aggregation == "count" else Decimal(value)
        self.stats.window_quantities[(customer, meter.key, t - t % size)] += qty
        self.stats.events_sent += 1
        self.stats.late_events += late
        return customer, body

    def make_bad(self, now_ms: int) -> tuple[str, bytes]:
        reason, payload = self.rng.choice(BAD_INPUTS)
        customer = self.rng.choice(self.customers)
        if payload is None:
            self._seq += 1
            doc: dict[str, object] = {
                "specversion": "1.0", "id": f"bad-{self._seq}", "source": self.source,
                "type": self.meters[0].event_type, "subject": customer,
                "time": self._iso(now_ms), "data": {self.meters[0].value_property or "value": 1},
            }
            if reason == "unknown_meter":
                doc["type"] = "no.such.meter"
            elif reason == "invalid_value":
                meter = next((m for m in self.meters if m.aggregation != "count"), None)
                if meter is None:
                    doc["type"] = "no.such.meter"
                else:
                    doc["type"] = meter.event_type
                    doc["data"] = {meter.value_property: -5}
            else:  # too_old: beyond the maximum lateness
                days = self.settings.processor.max_lateness_days + 5
                doc["time"] = self._iso(now_ms - int(days * 86_400_000))
            payload = orjson.dumps(doc)
        self.stats.invalid_sent += 1
        return customer, payload

    def next_item(self, now_ms: int) -> tuple[str, bytes, bool]:
        """(customer, event JSON, is_valid_unique) — valid, duplicate, late or bad."""
        r = self.rng.random()
        if r < self.p_invalid:
            c, b = self.make_bad(now_ms)
            return c, b, False
        if r < self.p_invalid + self.p_dup and self._recent:
            self.stats.duplicates_sent += 1
            c, b = self.rng.choice(self._recent)
            return c, b, False
        late = r < self.p_invalid + self.p_dup + self.p_late
        c, b = self.make_event(now_ms, late)
        self._recent.append((c, b))
        return c, b, True

    # --- sending -----------------------------------------------------------------------

    def send(self, n_events: int) -> None:
        """Produce `n_events` events now (as single messages or batch envelopes)."""
        now_ms = int(time.time() * 1000)
        produce = self.producer.produce
        topic = self.topic
        with self.lock:
            if self.batch_size <= 1:
                for _ in range(n_events):
                    c, body, _ = self.next_item(now_ms)
                    self._produce(produce, topic, body, c)
            else:
                left = n_events
                while left > 0:
                    k = min(self.batch_size, left)
                    items = [self.next_item(now_ms) for _ in range(k)]
                    # A batch envelope holds events; a bad *message* (not JSON at all) travels alone.
                    good = [b for _, b, _ in items if b.startswith(b"{") and _is_json(b)]
                    for c, b, _ in items:
                        if not (b.startswith(b"{") and _is_json(b)):
                            self._produce(produce, topic, b, c)
                    if good:
                        self._produce(produce, topic, b"[" + b",".join(good) + b"]", items[0][0])
                    left -= k
            self.producer.poll(0)

    def _produce(self, produce: object, topic: str, body: bytes, key: str) -> None:
        while True:
            try:
                self.producer.produce(topic, body, key.encode())
                self.stats.messages_sent += 1
                return
            except BufferError:
                self.producer.poll(0.01)

    def run(self, rate: float, duration: float, stop: threading.Event | None = None) -> None:
        """Send at `rate` events/s for `duration` s (0 = until `stop`), in 20 ms slices."""
        stop = stop or threading.Event()
        start = time.monotonic()
        sent = 0
        while not stop.is_set():
            elapsed = time.monotonic() - start
            if duration and elapsed >= duration:
                break
            due = int(rate * elapsed) - sent
            if due > 0:
                self.send(due)
                sent += due
            time.sleep(0.02)
        self.flush()

    def flush(self) -> None:
        remaining = self.producer.flush(60)
        if remaining:
            raise RuntimeError(f"{remaining} messages were not delivered to the broker")

    # --- expectations -------------------------------------------------------------------

    def expected(self) -> dict[str, Decimal]:
        """Credits each customer must have been debited: per-window debit, as the pipeline prices it.

        Exact with the shipped meters (their prices times generated values never need rounding);
        with other prices this is still the same rounding rule the pipeline applies.
        """
        meters = {m.key: m for m in self.meters}
        places = self.settings.processor.credit_decimal_places
        out: dict[str, Decimal] = defaultdict(Decimal)
        for (customer, meter, _), qty in self.stats.window_quantities.items():
            out[customer] += debit_for(qty, meters[meter].credits_per_unit, places)
        return dict(out)


def _is_json(body: bytes) -> bool:
    try:
        orjson.loads(body)
        return True
    except orjson.JSONDecodeError:
        return False


def customer_ids(n: int) -> list[str]:
    return [f"cust_{i:05d}" for i in range(n)]


def run(settings: Settings, args: argparse.Namespace) -> int:
    gen = LoadGenerator(settings, customer_ids(args.customers), batch_size=args.batch_size,
                        duplicates=args.duplicates, late=args.late, invalid=args.invalid)
    if args.storm:
        from meterline.devstack import storm

        print(orjson.dumps(storm.run(gen, args.storm, max(args.storm // 5, 1))).decode())
        return 0
    print(f"sending {args.rate:.0f} events/s for {args.duration:.0f} s to {gen.topic} ...")
    gen.run(args.rate, args.duration)
    s = gen.stats
    print(orjson.dumps({
        "events_sent": s.events_sent, "duplicates_sent": s.duplicates_sent,
        "late_events": s.late_events, "invalid_sent": s.invalid_sent,
        "messages_sent": s.messages_sent,
    }).decode())
    return 0
