"""The one way meterline configures a Kafka client: `kafka:` settings -> client settings.

meterline talks to Kafka through two client libraries: librdkafka (confluent-kafka:
producers, admin clients, the dev tools' consumers) and aiokafka (the processor's Faust
consumer, the ledger consumer, the Stripe sink's consumer). Both get the brokers and
the security settings from here and nowhere else, so a cluster that needs TLS and SASL
(Confluent Cloud, MSK, Aiven, a self-run one) is configured once, in `kafka:`, and every
client obeys it. `tests/unit/test_kafka_security.py` fails when code builds a client
without going through this module.

Invariants kept here:
- certificate verification is always on; hostname verification is on unless
  `kafka.ssl_check_hostname` is false;
- secrets reach the client libraries only: nothing here logs or formats them.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING, Any

from aiokafka.abc import AbstractTokenProvider

from meterline.config import KafkaConfig

if TYPE_CHECKING:
    from faust.types.auth import CredentialsT

# Refresh an OAuth token when this share of its lifetime is left (the broker drops a
# session whose token expired; refreshing early keeps a slow token endpoint off the path).
_TOKEN_REFRESH_FRACTION = 0.2


# What the dev tools and tests pass for the embedded broker: a bare address, no security.
KafkaTarget = KafkaConfig | str


def kafka_config(target: KafkaTarget) -> KafkaConfig:
    """`target` as a KafkaConfig; a bare "host:port" is a PLAINTEXT broker (the embedded one)."""
    return target if isinstance(target, KafkaConfig) else KafkaConfig(bootstrap_servers=target)


def librdkafka_config(target: KafkaTarget, **settings: Any) -> dict[str, Any]:
    """librdkafka settings for a confluent-kafka Producer/Consumer/AdminClient: the brokers
    and security from `target`, plus the client's own `settings` (which cannot override
    the security keys: no caller may turn verification off by accident)."""
    kafka = kafka_config(target)
    security = librdkafka_security(kafka)
    if clash := sorted(security.keys() & settings.keys()):
        raise ValueError(f"security settings come from kafka: config only, not {clash}")
    return {"bootstrap.servers": kafka.bootstrap_servers, **settings, **security}


def librdkafka_security(kafka: KafkaConfig) -> dict[str, Any]:
    """The librdkafka keys for `kafka`'s security settings (CONFIGURATION.md names)."""
    out: dict[str, Any] = {"security.protocol": kafka.security_protocol.lower()}
    if kafka.security_protocol.endswith("SSL"):
        out["enable.ssl.certificate.verification"] = True
        out["ssl.endpoint.identification.algorithm"] = (
            "https" if kafka.ssl_check_hostname else "none")
        # "probe": the system's trust store, wherever this distribution keeps it.
        out["ssl.ca.location"] = str(kafka.ssl_ca_file) if kafka.ssl_ca_file else "probe"
        if kafka.ssl_cert_file and kafka.ssl_key_file:
            out["ssl.certificate.location"] = str(kafka.ssl_cert_file)
            out["ssl.key.location"] = str(kafka.ssl_key_file)
    mech = kafka.sasl_mechanism
    if mech is not None:
        out["sasl.mechanism"] = mech
    if mech in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
        assert kafka.sasl_password is not None  # KafkaConfig validated it
        out["sasl.username"] = kafka.sasl_username
        out["sasl.password"] = kafka.sasl_password.get_secret_value()
    elif mech == "OAUTHBEARER" and kafka.oauth_provider == "aws_msk_iam":
        assert kafka.aws_region is not None
        out["oauth_cb"] = MskIamToken(kafka.aws_region).for_librdkafka
    elif mech == "OAUTHBEARER":
        assert kafka.oauth_client_secret is not None
        out["sasl.oauthbearer.method"] = "oidc"
        out["sasl.oauthbearer.token.endpoint.url"] = kafka.oauth_token_endpoint_url
        out["sasl.oauthbearer.client.id"] = kafka.oauth_client_id
        out["sasl.oauthbearer.client.secret"] = kafka.oauth_client_secret.get_secret_value()
        if kafka.oauth_scope:
            out["sasl.oauthbearer.scope"] = kafka.oauth_scope
    return out


def aiokafka_config(kafka: KafkaConfig, **settings: Any) -> dict[str, Any]:
    """Keyword arguments for an `AIOKafkaConsumer`/`AIOKafkaProducer`: the brokers and
    security from `kafka`, plus the client's own `settings`."""
    security = aiokafka_security(kafka)
    if clash := sorted(security.keys() & settings.keys()):
        raise ValueError(f"security settings come from kafka: config only, not {clash}")
    return {"bootstrap_servers": kafka.bootstrap_servers, **settings, **security}


def aiokafka_security(kafka: KafkaConfig) -> dict[str, Any]:
    """aiokafka's security keyword arguments for `kafka`."""
    out: dict[str, Any] = {"security_protocol": kafka.security_protocol}
    if (context := ssl_context(kafka)) is not None:
        out["ssl_context"] = context
    mech = kafka.sasl_mechanism
    if mech is not None:
        out["sasl_mechanism"] = mech
    if mech in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
        assert kafka.sasl_password is not None
        out["sasl_plain_username"] = kafka.sasl_username
        out["sasl_plain_password"] = kafka.sasl_password.get_secret_value()
    elif mech == "OAUTHBEARER":
        out["sasl_oauth_token_provider"] = oauth_token_provider(kafka)
    return out


def faust_credentials(kafka: KafkaConfig) -> CredentialsT | None:
    """Faust's `broker_credentials` for `kafka` (None = PLAINTEXT); Faust hands them to
    every aiokafka client it makes (consumer, producer, admin)."""
    # Imported here: loading Faust costs ~0.5 s, and only the processor needs it.
    from faust.auth import OAuthCredentials, SASLCredentials, SSLCredentials

    context = ssl_context(kafka)
    mech = kafka.sasl_mechanism
    if mech == "OAUTHBEARER":
        return OAuthCredentials(oauth_cb=oauth_token_provider(kafka), ssl_context=context)
    if mech is not None:
        assert kafka.sasl_password is not None
        # SASLCredentials picks SASL_SSL when given a context, SASL_PLAINTEXT otherwise.
        return SASLCredentials(username=kafka.sasl_username,
                               password=kafka.sasl_password.get_secret_value(),
                               ssl_context=context, mechanism=mech)
    if context is not None:
        return SSLCredentials(context)
    return None


def ssl_context(kafka: KafkaConfig) -> ssl.SSLContext | None:
    """The TLS context of a Python client (None without TLS): the CA file or the system's
    trust store, the client certificate for mTLS, and hostname checks unless opted out."""
    if not kafka.security_protocol.endswith("SSL"):
        return None
    context = ssl.create_default_context(
        cafile=str(kafka.ssl_ca_file) if kafka.ssl_ca_file else None)
    if kafka.ssl_cert_file and kafka.ssl_key_file:
        context.load_cert_chain(str(kafka.ssl_cert_file), str(kafka.ssl_key_file))
    context.check_hostname = kafka.ssl_check_hostname
    context.verify_mode = ssl.CERT_REQUIRED  # never optional, whatever the hostname rule
    return context


def oauth_token_provider(kafka: KafkaConfig) -> AbstractTokenProvider:
    """The OAUTHBEARER token source of the Python clients, per `kafka.oauth_provider`."""
    if kafka.oauth_provider == "aws_msk_iam":
        assert kafka.aws_region is not None
        return MskIamToken(kafka.aws_region)
    return ClientCredentialsToken(kafka)


class MskIamToken(AbstractTokenProvider):
    """Amazon MSK IAM: a token signed (SigV4, locally) with the AWS credentials of the
    default chain. Each call signs anew: signing is local and cheap, and the credentials
    (e.g. a pod role's) may have rotated."""

    def __init__(self, region: str) -> None:
        self.region = region

    def _generate(self) -> tuple[str, float]:
        """(token, expiry in epoch seconds)."""
        from aws_msk_iam_sasl_signer import MSKAuthTokenProvider  # the `msk` extra

        token, expiry_ms = MSKAuthTokenProvider.generate_auth_token(self.region)
        return token, expiry_ms / 1000

    def for_librdkafka(self, _config: str) -> tuple[str, float]:
        """librdkafka's `oauth_cb`."""
        return self._generate()

    async def token(self) -> str:
        return (await asyncio.to_thread(self._generate))[0]


class ClientCredentialsToken(AbstractTokenProvider):
    """aiokafka's OAUTHBEARER token: the OAuth 2.0 client-credentials grant against
    `kafka.oauth_token_endpoint_url` (librdkafka's `sasl.oauthbearer.method=oidc`, for the
    Python clients). One token is shared until most of its lifetime has passed."""

    def __init__(self, kafka: KafkaConfig, clock: Any = time.monotonic) -> None:
        assert kafka.oauth_token_endpoint_url and kafka.oauth_client_secret is not None
        self._url = kafka.oauth_token_endpoint_url
        form = {"grant_type": "client_credentials", "client_id": kafka.oauth_client_id or "",
                "client_secret": kafka.oauth_client_secret.get_secret_value()}
        if kafka.oauth_scope:
            form["scope"] = kafka.oauth_scope
        self._body = urllib.parse.urlencode(form).encode()
        self._clock = clock
        self._token: str | None = None
        self._refresh_at = 0.0
        self._lock = asyncio.Lock()

    async def token(self) -> str:
        async with self._lock:
            if self._token is None or self._clock() >= self._refresh_at:
                token, lifetime_s = await asyncio.to_thread(self._fetch)
                self._token = token
                self._refresh_at = self._clock() + lifetime_s * (1 - _TOKEN_REFRESH_FRACTION)
            return self._token

    def _fetch(self) -> tuple[str, float]:
        request = urllib.request.Request(
            self._url, data=self._body, method="POST",
            headers={"Content-Type": "application/x-www-form-urlencoded",
                     "Accept": "application/json"})
        # urllib verifies the endpoint's certificate and hostname by default.
        with urllib.request.urlopen(request, timeout=10) as resp:
            answer = json.loads(resp.read())
        if not isinstance(answer, dict) or not isinstance(answer.get("access_token"), str):
            raise RuntimeError(f"token endpoint {self._url} answered without an access_token")
        return answer["access_token"], float(answer.get("expires_in", 300))

    def __repr__(self) -> str:  # never the secret
        return f"<ClientCredentialsToken {self._url}>"
