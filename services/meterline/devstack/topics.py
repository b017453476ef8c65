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


def ensure_topics(settings: Settings) -> list[str]:
    topics = topic_partitions(settings)
    create_topics(settings.kafka, topics)
    return sorted(topics)
