"""Typed settings, loaded once at start-up from a YAML file plus env overrides.

Precedence (highest first): `METERLINE_*` env vars (nested keys with `__`,
e.g. `METERLINE_PROCESSOR__WINDOW_SIZE_MS=10000`), the two well-known
connection variables `KAFKA_BOOTSTRAP_SERVERS` and `DATABASE_URL`, then the
YAML file, then the defaults below. A bad value fails start-up with a message
naming the field.
"""

from __future__ import annotations

import importlib.util
import os
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

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
    # Stripe meter this meter reports to (its event_name); None = not billed through Stripe.
    stripe_event_name: str | None = None
    # The Stripe meter's payload keys (customer_mapping / value_settings event_payload_key).
    stripe_customer_key: str = "stripe_customer_id"
    stripe_value_key: str = "value"

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


SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"]


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
    # Every meterline producer's librdkafka `message.max.bytes`: the largest record (value +
    # key + headers) it sends. Default: a `processor.max_message_bytes` (1 MiB) message plus
    # room for its dead-letter headers. At start-up the DLQ writers compare it with the DLQ
    # topic's `max.message.bytes` and the broker's `message.max.bytes` and dead-letter larger
    # records as truncated copies (docs/operations.md, "Producers").
    producer_message_max_bytes: int = Field(default=1_114_112, ge=4096, le=1_000_000_000)
    # How long librdkafka retries a message before reporting it failed. A producer whose
    # messages time out is replaced (meterline.kafka.producer) and the work retried.
    producer_message_timeout_ms: int = Field(default=30_000, ge=1000)

    # --- security: one place, applied to every client (meterline.kafka.security) -------
    # Secrets are never in the YAML file: `sasl_password` / `oauth_client_secret` come from
    # METERLINE_KAFKA__SASL_PASSWORD / METERLINE_KAFKA__OAUTH_CLIENT_SECRET, or the `*_file`
    # keys (read once at start-up; the file wins). SecretStr, left out of dumps: repr and
    # logs show '**********', a dumped config has only the file path.
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = Field(default=None, exclude=True)
    sasl_password_file: Path | None = None
    # PEM files. No CA file = the system's trust store (Confluent Cloud, MSK, ...).
    ssl_ca_file: Path | None = None
    # Client certificate and key (mTLS, e.g. Aiven): both or neither.
    ssl_cert_file: Path | None = None
    ssl_key_file: Path | None = None
    # The broker's certificate must name the host we dialled. Off only for a broker whose
    # certificate cannot be fixed; the chain is still verified against the CA either way.
    ssl_check_hostname: bool = True
    # OAUTHBEARER's token source. oidc: the client-credentials grant against
    # oauth_token_endpoint_url (Confluent Cloud, Aiven, Keycloak, ...). aws_msk_iam: Amazon
    # MSK IAM, signed with the AWS credentials of the usual chain (env, profile, pod/instance
    # role) for aws_region; needs the `msk` extra (aws-msk-iam-sasl-signer-python).
    oauth_provider: Literal["oidc", "aws_msk_iam"] = "oidc"
    aws_region: str | None = None
    oauth_token_endpoint_url: str | None = None
    oauth_client_id: str | None = None
    oauth_client_secret: SecretStr | None = Field(default=None, exclude=True)
    oauth_client_secret_file: Path | None = None
    oauth_scope: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _read_secret_files(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for secret in ("sasl_password", "oauth_client_secret"):
            if path := data.get(f"{secret}_file"):
                try:
                    data[secret] = Path(path).read_text().strip()
                except OSError as exc:
                    raise ValueError(f"{secret}_file: cannot read {path}: {exc.strerror}") from exc
        return data

    @model_validator(mode="after")
    def _security_is_coherent(self) -> KafkaConfig:
        # Each rule names the field to fix; a client would otherwise fail much later,
        # far from the cause (or, worse, connect without the protection asked for).
        sasl = self.security_protocol.startswith("SASL_")
        tls = self.security_protocol.endswith("SSL")
        mech = self.sasl_mechanism
        if mech and not sasl:
            raise ValueError(f"sasl_mechanism {mech} needs security_protocol SASL_SSL or "
                             f"SASL_PLAINTEXT, not {self.security_protocol}")
        if sasl and not mech:
            raise ValueError(f"security_protocol {self.security_protocol} needs sasl_mechanism")
        if mech in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
            if not self.sasl_username:
                raise ValueError(f"sasl_mechanism {mech} needs sasl_username")
            if self.sasl_password is None:
                raise ValueError(f"sasl_mechanism {mech} needs sasl_password (or sasl_password_file)")
        if mech == "OAUTHBEARER" and self.oauth_provider == "oidc":
            for name in ("oauth_token_endpoint_url", "oauth_client_id", "oauth_client_secret"):
                if not getattr(self, name):
                    raise ValueError(f"sasl_mechanism OAUTHBEARER needs {name}")
        elif mech == "OAUTHBEARER":  # aws_msk_iam
            if not self.aws_region:
                raise ValueError("oauth_provider aws_msk_iam needs aws_region")
            if self.security_protocol != "SASL_SSL":
                raise ValueError("oauth_provider aws_msk_iam needs security_protocol SASL_SSL")
            if importlib.util.find_spec("aws_msk_iam_sasl_signer") is None:
                raise ValueError("oauth_provider aws_msk_iam needs the msk extra: "
                                 "pip install 'meterline[msk]'")
        elif self.oauth_token_endpoint_url or self.oauth_client_id:
            raise ValueError("oauth_token_endpoint_url/oauth_client_id need sasl_mechanism OAUTHBEARER")
        elif self.oauth_provider != "oidc":
            raise ValueError(f"oauth_provider {self.oauth_provider} needs sasl_mechanism OAUTHBEARER")
        files = {"ssl_ca_file": self.ssl_ca_file, "ssl_cert_file": self.ssl_cert_file,
                 "ssl_key_file": self.ssl_key_file}
        for name, path in files.items():
            if path is None:
                continue
            if not tls:
                raise ValueError(f"{name} needs security_protocol SSL or SASL_SSL, "
                                 f"not {self.security_protocol}")
            if not path.is_file():
                raise ValueError(f"{name}: no such file {path}")
        if (self.ssl_cert_file is None) != (self.ssl_key_file is None):
            missing = "ssl_key_file" if self.ssl_key_file is None else "ssl_cert_file"
            raise ValueError(f"{missing} is needed too: a client certificate goes with its key")
        return self


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
    # Deeper JSON goes to the DLQ as too_deep. orjson reads at most 1024 levels (deeper
    # is too_deep whatever this says); real usage events nest 3 or 4.
    max_json_depth: int = Field(default=64, ge=2, le=1024)
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


class StripeConfig(_Frozen):
    """The Stripe sink (`meterline stripe-sink`) and how it talks to Stripe.

    The API key is never in YAML: `STRIPE_API_KEY` or `STRIPE_API_KEY_FILE`.
    """

    # None = api.stripe.com; a URL = the local emulator (`meterline stripe-emulator`).
    api_base: str | None = None
    # v1: one POST /v1/billing/meter_events per report; v2: meter event stream, <= 100 a call.
    transport: Literal["v1", "v2"] = "v1"
    # Our own token bucket, in requests/s (Stripe live mode allows ~1,000/s per account;
    # test mode far less: set ~20 there). A v2 stream call counts as one request.
    rate_limit_per_second: float = Field(default=500, gt=0)
    max_concurrency: int = Field(default=32, ge=1)
    # Consecutive windows of one (customer, meter) within one interval become one Stripe
    # event (0 = one event per window aggregate). Must divide a day.
    coalesce_interval_seconds: int = Field(default=60, ge=0)
    # A bucket's report is sealed (and sent) this long after the bucket ends; aggregates
    # arriving later go into the next report of the bucket.
    seal_grace_seconds: float = Field(default=10, ge=0)
    request_timeout_seconds: float = Field(default=10, gt=0)
    retry_base_seconds: float = Field(default=0.5, gt=0)
    retry_max_seconds: float = Field(default=60, gt=0)
    # Circuit breaker: open after this many consecutive 5xx/network failures, probe after.
    circuit_failure_threshold: int = Field(default=10, ge=1)
    circuit_recovery_seconds: float = Field(default=30, gt=0)
    # A claimed report not finished within this lease is claimed again (crashed sink).
    lease_seconds: float = Field(default=60, gt=0)
    # v2: open a new session this long before the current one expires (they last 15 min).
    session_refresh_margin_seconds: float = Field(default=60, ge=0)
    consumer_group: str = "meterline-stripe-sink"
    poll_interval_ms: int = Field(default=200, ge=10)
    metrics_port: int = Field(default=9466, ge=0, le=65535)

    @field_validator("coalesce_interval_seconds")
    @classmethod
    def _divides_a_day(cls, v: int) -> int:
        if v and 86_400 % v:
            raise ValueError("must divide 86400 so buckets never straddle a billing period")
        return v


class ReconcileConfig(_Frozen):
    """`meterline reconcile`: ledger vs sink reports vs Stripe's meter event summaries."""

    # Billing periods compared (UTC calendar periods).
    period: Literal["hour", "day", "month"] = "month"
    # How many periods back from the current one are checked.
    lookback_periods: int = Field(default=1, ge=0)
    # Flag (and alert on) a (customer, meter, period) whose variance exceeds this.
    threshold_percent: Decimal = Field(default=Decimal(1), ge=0)
    # Resubmit what Stripe never acknowledged (same identifiers, so safe within
    # Stripe's 24 h identifier dedupe; older accepted reports are only flagged).
    resubmit: bool = True
    resubmit_horizon_hours: float = Field(default=23, gt=0, le=24)
    # Do not judge reports sealed less than this long ago (still in flight).
    settle_seconds: float = Field(default=30, ge=0)
    report_dir: str = "reconcile-reports"
    every_seconds: float = Field(default=0, ge=0)  # 0 = one-shot
    metrics_port: int = Field(default=9467, ge=0, le=65535)

# --- webhook bridge config classes go here ---


class WebhookBridgeConfig(_Frozen):
    """`meterline webhook-bridge`: Stripe webhooks in, verified events to `kafka.stripe_events_topic`.

    The signing secrets are never in YAML: `STRIPE_WEBHOOK_SECRETS` (comma-separated)
    or `STRIPE_WEBHOOK_SECRETS_FILE` (one per line), read once at start-up.
    """

    host: str = "0.0.0.0"
    # Serves POST /webhooks/stripe and /healthz, /readyz, /metrics.
    port: int = Field(default=8081, ge=0, le=65535)
    # A signature older (or further in the future) than this is rejected; Stripe's libraries use 300.
    tolerance_seconds: int = Field(default=300, ge=1)
    # Larger bodies get 413; must stay under Kafka's default 1 MB message size.
    max_body_bytes: int = Field(default=262_144, ge=1024, le=1_000_000)
    # Longest wait for the broker's ack before answering 503 (Stripe retries for days).
    delivery_timeout_ms: int = Field(default=5_000, ge=100)
    # How long librdkafka keeps trying a message, even after we answered 503 for it. Longer
    # than the delivery timeout, so a short outage does not expire in-flight idempotent
    # messages (which forces a producer epoch bump).
    message_timeout_ms: int = Field(default=60_000, ge=1000)
    # /readyz: 200 while a metadata probe or delivery succeeded within 3 intervals, none failed since.
    readiness_probe_interval_ms: int = Field(default=2_000, ge=100)


# --- ledger consumer config classes go here ---


class LedgerConsumerConfig(_Frozen):
    """`meterline ledger-consumer`: Stripe events -> grants, plan periods, refund voids, past due.

    Prices map to meterline through Stripe metadata (`meterline_plan`,
    `meterline_credits` on the price) or the two maps below, which win over metadata.
    """

    consumer_group: str = "meterline-ledger-consumer"
    metrics_port: int = Field(default=9468, ge=0, le=65535)
    # Credits bought (Checkout, credit-pack invoices) expire this many days after the
    # purchase; None = never.
    purchased_credit_expiry_days: float | None = Field(default=None, gt=0)
    # Burn order of bought credits (lower burns first): after plans' default 10, so the
    # included credits, which reset, are used before the ones a customer paid for.
    purchased_credit_priority: int = 20
    # Stripe price id -> meterline plan key (a subscription price).
    plan_by_price: dict[str, str] = Field(default_factory=dict)
    # Stripe price id -> credits per unit (a credit-pack price).
    credits_by_price: dict[str, Annotated[Decimal, Field(gt=0)]] = Field(default_factory=dict)
    max_poll_records: int = Field(default=500, ge=1)
    # Postgres or the DLQ unavailable: the same event is retried, backing off up to this.
    retry_max_seconds: float = Field(default=5, gt=0)

# --- api config classes go here ---


class ApiConfig(_Frozen):
    """`meterline api`: the HTTP API (balance, entitlements, usage, ledger, exports, grants).

    Bearer tokens are never in YAML: `METERLINE_API_TOKENS` (comma-separated) or
    `METERLINE_API_TOKENS_FILE` (one per line), read once at start-up.
    """

    host: str = "0.0.0.0"
    port: int = Field(default=8080, ge=0, le=65535)
    # Fixed-size asyncpg pool (min = max): no connection churn on the hot path.
    pool_size: int = Field(default=8, ge=1, le=200)
    # A query still running after this is cancelled and the request answers 503.
    query_timeout_seconds: float = Field(default=5, gt=0)
    # Projected depletion uses the credits burned over at least this long (hourly rollups).
    burn_rate_lookback_seconds: int = Field(default=3600, ge=60)
    ledger_page_size: int = Field(default=100, ge=1)
    ledger_max_page_size: int = Field(default=1000, ge=1)
    # Longest from..to a usage query may span.
    usage_max_days: int = Field(default=400, ge=1)
    # Rows the CSV export fetches per round trip from its server-side cursor.
    export_fetch_rows: int = Field(default=1000, ge=10)
    # An export holds a pooled connection while its client reads; more at once answer 429,
    # so slow downloads can never take the connections the balance and entitlement checks need.
    max_concurrent_exports: int = Field(default=2, ge=1)
    max_body_bytes: int = Field(default=65_536, ge=1024)


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
    stripe: StripeConfig = StripeConfig()
    reconcile: ReconcileConfig = ReconcileConfig()
    # webhook bridge settings
    webhook_bridge: WebhookBridgeConfig = WebhookBridgeConfig()
    # ledger consumer settings
    ledger_consumer: LedgerConsumerConfig = LedgerConsumerConfig()
    # api settings
    api: ApiConfig = ApiConfig()

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
        for price, plan in self.ledger_consumer.plan_by_price.items():
            if plan not in plans:
                raise ValueError(f"ledger_consumer.plan_by_price: {price!r} refers to unknown plan {plan!r}")
        return self

    def meter_for_type(self) -> dict[str, MeterConfig]:
        return {m.event_type: m for m in self.meters}


# Set from the environment or a file only (KafkaConfig), never from the YAML file.
KAFKA_SECRETS = ("sasl_password", "oauth_client_secret")


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
        kafka = data.get("kafka")
        for secret in KAFKA_SECRETS:
            if isinstance(kafka, dict) and kafka.get(secret) is not None:
                raise ConfigError(
                    f"kafka.{secret}: secrets are never in the config file; set "
                    f"METERLINE_KAFKA__{secret.upper()} or kafka.{secret}_file")
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


# METERLINE_* variables that are not settings: the config path, and secrets that their
# services read once at start-up (kept out of Settings so they are never dumped or logged).
_NOT_SETTINGS = frozenset({"METERLINE_CONFIG", "METERLINE_API_TOKENS", "METERLINE_API_TOKENS_FILE"})


def _env_overrides() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in os.environ.items():
        if not name.startswith("METERLINE_") or name in _NOT_SETTINGS:
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
