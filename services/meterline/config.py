"""Typed settings, loaded once at start-up from a YAML file plus env overrides.

Precedence (highest first): `METERLINE_*` env vars (nested keys with `__`,
e.g. `METERLINE_PROCESSOR__WINDOW_SIZE_MS=10000`), the two well-known
connection variables `KAFKA_BOOTSTRAP_SERVERS` and `DATABASE_URL`, then the
YAML file, then the defaults below. A bad value fails start-up with a message
naming the field.
"""

from __future__ import annotations

import os
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Aggregation = Literal["sum", "count", "max", "latest"]


class ConfigError(Exception):
    """Raised when the configuration is invalid; the message names the field."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class MeterConfig(_Frozen):
    """Maps a CloudEvents `type` to a metered quantity and its credit price."""

    key: str = Field(pattern=r"^[a-z][a-z0-9_]{0,62}$")
    event_type: str
    aggregation: Aggregation = "sum"
    # Property of `data` holding the quantity; not used by `count`.
    value_property: str | None = None
    # Credits debited per unit of the aggregated quantity (e.g. 0.001 = 1 credit per 1,000 calls).
    credits_per_unit: Decimal = Field(ge=0)
    stripe_event_name: str | None = None

    @model_validator(mode="after")
    def _value_property_needed(self) -> MeterConfig:
        if self.aggregation != "count" and not self.value_property:
            raise ValueError(f"meter {self.key!r}: aggregation {self.aggregation!r} needs value_property")
        return self


class PlanConfig(_Frozen):
    """Included credits granted at each period start, and what happens past zero."""

    key: str
    included_credits: Decimal = Field(ge=0)
    period: Literal["hour", "day", "month"] = "month"
    # rollover: unused included credits never expire; reset: they expire at period end.
    carryover: Literal["rollover", "reset"] = "reset"
    # allow: balance may go negative (Stripe bills the overage); block: entitlement says no.
    overage: Literal["allow", "block"] = "allow"
    grant_priority: int = 10


class GrantConfig(_Frozen):
    """A grant declared in config (dev/demo); applied once, identified by `ref`."""

    ref: str
    amount: Decimal = Field(gt=0)
    priority: int = 10
    effective_at: datetime | None = None
    expires_at: datetime | None = None


class CustomerConfig(_Frozen):
    id: str = Field(min_length=1, max_length=200)
    plan: str | None = None
    stripe_customer_id: str | None = None
    grants: tuple[GrantConfig, ...] = ()


class KafkaConfig(_Frozen):
    bootstrap_servers: str = "127.0.0.1:9092"
    usage_topic: str = "usage.events"
    usage_dlq_topic: str = "usage.events.dlq"
    aggregates_topic: str = "usage.aggregates"
    # the Stripe sink's dead letters: aggregates Stripe refused (non-retryable 4xx)
    aggregates_dlq_topic: str = "usage.aggregates.dlq"
    # verified Stripe webhook events (webhook bridge -> ledger consumer), key = Stripe customer id
    stripe_events_topic: str = "stripe.events"
    stripe_events_dlq_topic: str = "stripe.events.dlq"
    balance_changes_topic: str = "billing.balance-changes"
    partitions: int = Field(default=4, ge=1)
    consumer_group: str = "meterline-processor"
    session_timeout_ms: int = Field(default=10_000, ge=1000)


class ProcessorConfig(_Frozen):
    window_size_ms: int = Field(default=5_000, ge=100)
    # A window closes when the processing-time clock passes its end plus this grace.
    window_grace_ms: int = Field(default=1_000, ge=0)
    flush_interval_ms: int = Field(default=250, ge=10)
    dedupe_horizon_hours: float = Field(default=24, gt=0)
    # Stripe rejects meter events older than 35 days; so do we (DLQ reason too_old).
    max_lateness_days: float = Field(default=35, gt=0)
    # Stripe rejects timestamps more than 5 minutes ahead; so do we (future_timestamp).
    max_future_skew_ms: int = Field(default=300_000, ge=0)
    max_message_bytes: int = Field(default=1_048_576, ge=1024)
    max_batch_events: int = Field(default=10_000, ge=1)
    # Back-pressure: stop taking records while this many events wait for a flush.
    max_pending_events: int = Field(default=2_000_000, ge=1000)
    require_known_customers: bool = False
    # Credits are rounded half-even to this many decimal places per window aggregate.
    credit_decimal_places: int = Field(default=6, ge=0, le=12)
    thresholds_percent: tuple[int, ...] = (50, 75, 90, 100)
    metrics_port: int = Field(default=9464, ge=0, le=65535)

    @field_validator("thresholds_percent")
    @classmethod
    def _sorted_thresholds(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(t <= 0 or t > 100 for t in v):
            raise ValueError("thresholds must be in (0, 100]")
        return tuple(sorted(set(v)))


class RelayConfig(_Frozen):
    poll_interval_ms: int = Field(default=100, ge=10)
    batch_size: int = Field(default=5_000, ge=1)
    metrics_port: int = Field(default=9465, ge=0, le=65535)


class BillingConfig(_Frozen):
    """Billing state shared by the ledger consumer (writes it) and the API (reads it)."""

    # A customer whose Stripe invoice payment failed is past due until an invoice is paid.
    # block: entitlement checks answer no while past due; allow: past due is only reported.
    past_due_policy: Literal["block", "allow"] = "block"


# --- stripe sink / reconciler config classes go here ---

# --- webhook bridge config classes go here ---

# --- ledger consumer config classes go here ---

# --- api config classes go here ---


class Settings(_Frozen):
    """Everything a meterline service needs; pass it explicitly, never read env elsewhere."""

    database_url: str = "postgresql://postgres@127.0.0.1:5432/meterline"
    kafka: KafkaConfig = KafkaConfig()
    processor: ProcessorConfig = ProcessorConfig()
    relay: RelayConfig = RelayConfig()
    meters: tuple[MeterConfig, ...] = ()
    plans: tuple[PlanConfig, ...] = ()
    customers: tuple[CustomerConfig, ...] = ()
    billing: BillingConfig = BillingConfig()
    # stripe sink / reconciler settings
    # webhook bridge settings
    # ledger consumer settings
    # api settings

    @model_validator(mode="after")
    def _references_resolve(self) -> Settings:
        keys = [m.key for m in self.meters]
        if len(keys) != len(set(keys)):
            raise ValueError("meters: duplicate meter key")
        types = [m.event_type for m in self.meters]
        if len(types) != len(set(types)):
            raise ValueError("meters: two meters share one event_type")
        plans = {p.key for p in self.plans}
        for c in self.customers:
            if c.plan and c.plan not in plans:
                raise ValueError(f"customers: {c.id!r} refers to unknown plan {c.plan!r}")
        return self

    def meter_for_type(self) -> dict[str, MeterConfig]:
        return {m.event_type: m for m in self.meters}


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Load settings from `path` (or $METERLINE_CONFIG) plus env; raise ConfigError naming the field."""
    path = path or os.environ.get("METERLINE_CONFIG")
    data: dict[str, Any] = {}
    if path:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping")
    if os.environ.get("DATABASE_URL"):
        data["database_url"] = os.environ["DATABASE_URL"]
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        data.setdefault("kafka", {})
        data["kafka"] = {**data["kafka"], "bootstrap_servers": os.environ["KAFKA_BOOTSTRAP_SERVERS"]}
    data = deep_merge(deep_merge(data, _env_overrides()), overrides)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from exc


def _env_overrides() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in os.environ.items():
        if not name.startswith("METERLINE_") or name == "METERLINE_CONFIG":
            continue
        path = name[len("METERLINE_") :].lower().split("__")
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`, merging nested mappings key by key."""
    merged = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = deep_merge(merged[k], v)
        else:
            merged[k] = v
    return merged
