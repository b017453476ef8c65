"""Create the Kafka topics meterline uses (`meterline topics`, and `meterline dev`)."""

from __future__ import annotations

from meterline.config import Settings
from meterline.devstack.embedded import create_topics


def topic_partitions(settings: Settings) -> dict[str, int]:
    k = settings.kafka
    return {
        k.usage_topic: k.partitions,
        k.usage_dlq_topic: k.partitions,
        k.aggregates_topic: k.partitions,
        k.balance_changes_topic: k.partitions,
        k.aggregates_dlq_topic: k.partitions,
        k.stripe_events_topic: k.partitions,
        k.stripe_events_dlq_topic: k.partitions,
    }


def topic_configs(settings: Settings) -> dict[str, dict[str, str]]:
    """The DLQ topics take records as large as meterline's producers send
    (`kafka.producer_message_max_bytes`): a dead letter is never refused by its topic."""
    k = settings.kafka
    limit = {"max.message.bytes": str(k.producer_message_max_bytes)}
    return {t: dict(limit) for t in (k.usage_dlq_topic, k.aggregates_dlq_topic,
                                      k.stripe_events_dlq_topic)}


def ensure_topics(settings: Settings) -> list[str]:
    """Create meterline's topics (existing ones are left as they are)."""
    topics = topic_partitions(settings)
    create_topics(settings.kafka, topics, configs=topic_configs(settings))
    return sorted(topics)
