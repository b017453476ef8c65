"""Which producer errors mean "replace the producer", not "retry on it" (meterline.kafka.producer)."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError

from meterline.config import KafkaConfig
from meterline.kafka.producer import is_unrecoverable, producer_config


@pytest.mark.parametrize(("code", "idempotent", "replace"), [
    (KafkaError.PRODUCER_FENCED, False, True),          # the Tansu outage symptom
    (KafkaError.INVALID_PRODUCER_EPOCH, True, True),
    (KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, True, True),
    (KafkaError._MSG_TIMED_OUT, True, True),            # idempotent: fenced on Tansu next
    (KafkaError._MSG_TIMED_OUT, False, False),          # plain: retrying is fine
    (KafkaError._TRANSPORT, True, False),               # a dropped connection: librdkafka reconnects
    (KafkaError.MSG_SIZE_TOO_LARGE, True, False),       # the record, not the producer
])
def test_classification(code: int, idempotent: bool, replace: bool) -> None:
    assert is_unrecoverable(KafkaError(code), idempotent=idempotent) is replace


def test_any_fatal_error_means_replace() -> None:
    assert is_unrecoverable(KafkaError(KafkaError._TRANSPORT, fatal=True), idempotent=False)


def test_size_and_timeout_come_from_the_configuration() -> None:
    cfg = producer_config(KafkaConfig(producer_message_max_bytes=2_000_000,
                                      producer_message_timeout_ms=7000), "relay",
                          **{"linger.ms": 5})
    assert cfg["message.max.bytes"] == 2_000_000
    assert cfg["message.timeout.ms"] == 7000
    assert (cfg["enable.idempotence"], cfg["acks"], cfg["linger.ms"]) == (True, "all", 5)
    assert cfg["client.id"] == "meterline-relay"
