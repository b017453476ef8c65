"""How large a record a topic takes: the producer's limit checked against the broker's.

Three limits apply to one record, and the smallest wins: the producer's
`message.max.bytes` (librdkafka refuses larger records at `produce`), the topic's
`max.message.bytes` and, when the topic does not say, the broker's `message.max.bytes`
(the broker refuses larger batches). They are compared once, at start-up; a broker that
cannot answer (the embedded Tansu broker reports no configs) leaves the producer's own
limit in force, and we say so in the log.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType

from meterline.config import KafkaConfig
from meterline.kafka.security import librdkafka_config

log = logging.getLogger(__name__)

# Record-batch framing a broker counts against its limit besides key, value and headers
# (batch header 61 bytes, record attributes and varints); rounded up generously.
RECORD_OVERHEAD_BYTES = 512


def topic_max_bytes(kafka: KafkaConfig, topic: str, configured: int,
                    timeout_s: float = 5.0) -> int:
    """The largest record `topic` takes from a producer limited to `configured` bytes."""
    admin = AdminClient(librdkafka_config(kafka, log_level=0))
    found: dict[str, int] = {}
    try:
        resource = ConfigResource(ResourceType.TOPIC, topic)
        topic_cfg = admin.describe_configs([resource], request_timeout=timeout_s)[resource].result(
            timeout=timeout_s)
        if (entry := topic_cfg.get("max.message.bytes")) is not None and entry.value:
            found["topic max.message.bytes"] = int(entry.value)
        else:
            brokers = admin.list_topics(timeout=timeout_s).brokers
            for broker_id in brokers:
                res = ConfigResource(ResourceType.BROKER, str(broker_id))
                cfg = admin.describe_configs([res], request_timeout=timeout_s)[res].result(
                    timeout=timeout_s)
                if (entry := cfg.get("message.max.bytes")) is not None and entry.value:
                    found[f"broker {broker_id} message.max.bytes"] = int(entry.value)
    except (KafkaException, TimeoutError, ValueError) as exc:
        log.warning("%s: could not read the broker's size limits (%r); using message.max.bytes "
                    "= %d from the configuration", topic, exc, configured)
        return configured
    if not found:
        log.info("%s: the broker reports no size limits; using message.max.bytes = %d from the "
                 "configuration", topic, configured)
        return configured
    name, smallest = min(found.items(), key=lambda kv: kv[1])
    if smallest < configured:
        log.warning("%s: %s = %d is below the producer's message.max.bytes = %d; larger records "
                    "are truncated (docs/operations.md, Producers)", topic, name, smallest,
                    configured)
        return smallest
    return configured


def producer_limits(kafka: KafkaConfig, topics: Iterable[str], configured: int,
                    timeout_s: float = 5.0) -> dict[str, int]:
    """`topic_max_bytes` of each topic a producer writes, checked once at start-up (a topic
    that takes less than the producer sends is logged as a warning there)."""
    return {t: topic_max_bytes(kafka, t, configured, timeout_s) for t in topics}
