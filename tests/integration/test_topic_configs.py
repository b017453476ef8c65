"""`meterline topics` sizes the DLQ topics from `kafka.producer_message_max_bytes`."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType

from meterline.config import Settings
from meterline.devstack.topics import topic_configs

pytestmark = pytest.mark.integration


def test_dlq_topics_take_records_as_large_as_the_producers_send(
    pipeline_settings: Callable[..., Settings],
) -> None:
    settings = pipeline_settings(customers=1)  # creates the topics with `ensure_topics`
    k = settings.kafka
    dlqs = {k.usage_dlq_topic, k.aggregates_dlq_topic, k.stripe_events_dlq_topic}
    assert set(topic_configs(settings)) == dlqs
    admin = AdminClient({"bootstrap.servers": k.bootstrap_servers})
    for topic in sorted(dlqs):
        resource = ConfigResource(ResourceType.TOPIC, topic)
        try:
            cfg = admin.describe_configs([resource], request_timeout=10)[resource].result(10)
        except KafkaException as exc:
            pytest.skip(f"the broker does not describe topic configs ({exc}); "
                        "max.message.bytes cannot be read back here")
        # Kafka reports every topic's limit; Tansu reports the configs a topic was created with
        entry = cfg.get("max.message.bytes")
        assert entry is not None and int(entry.value) == k.producer_message_max_bytes, topic
