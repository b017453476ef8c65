"""Kafka security: `kafka:` settings that cannot work fail at start naming the field; the
one mapping (meterline.kafka.security) turns them into each client library's settings;
secrets never show; and no code builds a Kafka client without that mapping."""

from __future__ import annotations

import ast
import asyncio
import base64
import json
import os
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from faust.auth import OAuthCredentials, SASLCredentials, SSLCredentials

from meterline.config import KAFKA_SECRETS, ConfigError, KafkaConfig, load_settings
from meterline.kafka.security import (
    ClientCredentialsToken,
    aiokafka_config,
    faust_credentials,
    librdkafka_config,
    ssl_context,
)

SERVICES = Path(__file__).resolve().parents[2] / "services" / "meterline"
SECURITY_MODULE = SERVICES / "kafka" / "security.py"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("METERLINE_") or name in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS"):
            monkeypatch.delenv(name)


@pytest.fixture
def pem() -> Path:
    """A real CA bundle: the system's (ssl_context loads it)."""
    cafile = ssl.get_default_verify_paths().cafile
    if cafile is None or not Path(cafile).is_file():
        pytest.skip("needs the system's CA bundle file")
    return Path(cafile)


def kafka_error(tmp_path: Path, *, secrets_in_file: bool = False, **kafka: object) -> str:
    """The ConfigError of `kafka:` settings; secrets are passed as the environment would
    pass them (overrides), unless `secrets_in_file`."""
    kafka = {k: str(v) if isinstance(v, Path) else v for k, v in kafka.items()}
    secrets = {} if secrets_in_file else {k: kafka.pop(k) for k in KAFKA_SECRETS if k in kafka}
    config = tmp_path / "meterline.yaml"
    config.write_text(json.dumps({"kafka": kafka}))
    with pytest.raises(ConfigError) as info:
        load_settings(config, **({"kafka": secrets} if secrets else {}))
    return str(info.value)


# --- invalid combinations fail at start, naming the field -----------------------------------


@pytest.mark.parametrize(("kafka", "names"), [
    # a mechanism without a SASL protocol would silently connect without logging in
    ({"security_protocol": "SSL", "sasl_mechanism": "PLAIN", "sasl_username": "u",
      "sasl_password": "p"}, "sasl_mechanism"),
    # a SASL protocol without a mechanism
    ({"security_protocol": "SASL_SSL"}, "sasl_mechanism"),
    # SCRAM without a user name, or without a password
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_password": "p"},
     "sasl_username"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-256", "sasl_username": "u"},
     "sasl_password"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_username": "u"},
     "sasl_password"),
    # OAUTHBEARER without its token endpoint / client id / secret
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "OAUTHBEARER", "oauth_client_id": "c",
      "oauth_client_secret": "s"}, "oauth_token_endpoint_url"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "OAUTHBEARER",
      "oauth_token_endpoint_url": "https://idp/token", "oauth_client_secret": "s"},
     "oauth_client_id"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "OAUTHBEARER",
      "oauth_token_endpoint_url": "https://idp/token", "oauth_client_id": "c"},
     "oauth_client_secret"),
    # OAuth settings given but another mechanism chosen
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_username": "u",
      "sasl_password": "p", "oauth_token_endpoint_url": "https://idp/token"},
     "oauth_token_endpoint_url"),
    # an unknown protocol or mechanism
    ({"security_protocol": "TLS"}, "security_protocol"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "GSSAPI"}, "sasl_mechanism"),
])
def test_invalid_security_combination_names_the_field(
    tmp_path: Path, kafka: dict[str, object], names: str,
) -> None:
    message = kafka_error(tmp_path, **kafka)

    assert "kafka" in message and names in message, message


def test_certificate_without_key_names_the_missing_one(tmp_path: Path, pem: Path) -> None:
    assert "ssl_key_file" in kafka_error(tmp_path, security_protocol="SSL", ssl_cert_file=pem)
    assert "ssl_cert_file" in kafka_error(tmp_path, security_protocol="SSL", ssl_key_file=pem)


def test_tls_files_need_a_tls_protocol(tmp_path: Path, pem: Path) -> None:
    message = kafka_error(tmp_path, security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN",
                          sasl_username="u", sasl_password="p", ssl_ca_file=pem)

    assert "ssl_ca_file needs security_protocol SSL or SASL_SSL" in message


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    message = kafka_error(tmp_path, security_protocol="SSL", ssl_ca_file=tmp_path / "nope.pem")
    assert "ssl_ca_file: no such file" in message

    message = kafka_error(tmp_path, security_protocol="SASL_SSL", sasl_mechanism="PLAIN",
                          sasl_username="u", sasl_password_file=tmp_path / "nope")
    assert "sasl_password_file: cannot read" in message


# --- secrets: from env or a file, never shown ------------------------------------------------


def test_password_from_env_and_from_a_file_and_never_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = tmp_path / "meterline.yaml"
    config.write_text("kafka:\n  security_protocol: SASL_SSL\n  sasl_mechanism: SCRAM-SHA-512\n"
                      "  sasl_username: meterline\n")
    monkeypatch.setenv("METERLINE_KAFKA__SASL_PASSWORD", "from-env-s3cret")
    from_env = load_settings(config)
    assert from_env.kafka.sasl_password is not None
    assert from_env.kafka.sasl_password.get_secret_value() == "from-env-s3cret"

    secret_file = tmp_path / "kafka-password"
    secret_file.write_text("from-file-s3cret\n")
    monkeypatch.setenv("METERLINE_KAFKA__SASL_PASSWORD_FILE", str(secret_file))
    from_file = load_settings(config)
    assert from_file.kafka.sasl_password is not None
    assert from_file.kafka.sasl_password.get_secret_value() == "from-file-s3cret"  # file wins

    for shown in (repr(from_file), str(from_file.model_dump()),
                  from_file.model_dump_json(), repr(faust_credentials(from_file.kafka))):
        assert "s3cret" not in shown
    # a dumped config (what tests hand to subprocesses) keeps the file, not the secret
    assert "sasl_password" not in from_file.model_dump()["kafka"]
    assert from_file.model_dump()["kafka"]["sasl_password_file"] == secret_file


def test_a_config_error_does_not_echo_the_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("METERLINE_KAFKA__SASL_PASSWORD", "hunter2-s3cret")
    message = kafka_error(tmp_path, security_protocol="SSL", sasl_mechanism="PLAIN",
                          sasl_username="u")

    assert "sasl_mechanism" in message and "hunter2" not in message


@pytest.mark.parametrize("secret", ["sasl_password", "oauth_client_secret"])
def test_a_secret_in_the_config_file_is_refused(tmp_path: Path, secret: str) -> None:
    message = kafka_error(tmp_path, secrets_in_file=True, **{secret: "s3cret"})

    assert f"kafka.{secret}: secrets are never in the config file" in message
    assert f"METERLINE_KAFKA__{secret.upper()}" in message and "s3cret" not in message


# --- the mapping ------------------------------------------------------------------------------


def test_plaintext_is_the_default_and_adds_nothing_but_the_protocol() -> None:
    kafka = KafkaConfig(bootstrap_servers="b:9092")

    assert librdkafka_config(kafka, **{"acks": "all"}) == {
        "bootstrap.servers": "b:9092", "acks": "all", "security.protocol": "plaintext"}
    assert aiokafka_config(kafka, group_id="g") == {
        "bootstrap_servers": "b:9092", "group_id": "g", "security_protocol": "PLAINTEXT"}
    assert faust_credentials(kafka) is None
    assert ssl_context(kafka) is None


def test_sasl_ssl_scram_maps_to_both_libraries(pem: Path) -> None:
    kafka = KafkaConfig(bootstrap_servers="b:9096", security_protocol="SASL_SSL",
                        sasl_mechanism="SCRAM-SHA-512", sasl_username="u", sasl_password="p",
                        ssl_ca_file=pem)
    rd = librdkafka_config(kafka)
    assert rd == {
        "bootstrap.servers": "b:9096", "security.protocol": "sasl_ssl",
        "enable.ssl.certificate.verification": True,
        "ssl.endpoint.identification.algorithm": "https", "ssl.ca.location": str(pem),
        "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "u", "sasl.password": "p"}

    aio = aiokafka_security_without_context(kafka)
    assert aio == {"bootstrap_servers": "b:9096", "security_protocol": "SASL_SSL",
                   "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "u",
                   "sasl_plain_password": "p"}

    creds = faust_credentials(kafka)
    assert isinstance(creds, SASLCredentials)
    assert (creds.protocol.value, creds.mechanism.value, creds.username, creds.password) == (
        "SASL_SSL", "SCRAM-SHA-512", "u", "p")


def aiokafka_security_without_context(kafka: KafkaConfig) -> dict[str, object]:
    """aiokafka_config(kafka) minus the ssl_context, which is checked on its own."""
    out = aiokafka_config(kafka)
    context = out.pop("ssl_context", None)
    assert (context is None) == (not kafka.security_protocol.endswith("SSL"))
    return out


def test_system_trust_store_when_no_ca_file_is_given() -> None:
    kafka = KafkaConfig(bootstrap_servers="b:9092", security_protocol="SASL_SSL",
                        sasl_mechanism="PLAIN", sasl_username="key", sasl_password="secret")

    assert librdkafka_config(kafka)["ssl.ca.location"] == "probe"
    context = ssl_context(kafka)
    assert context is not None and context.cert_store_stats()["x509_ca"] > 0


def test_tls_verifies_the_certificate_always_and_the_hostname_unless_opted_out() -> None:
    kafka = KafkaConfig(bootstrap_servers="b:9093", security_protocol="SSL")
    context = ssl_context(kafka)
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname

    opted_out = kafka.model_copy(update={"ssl_check_hostname": False})
    context = ssl_context(opted_out)
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED and not context.check_hostname
    rd = librdkafka_config(opted_out)
    assert rd["ssl.endpoint.identification.algorithm"] == "none"
    assert rd["enable.ssl.certificate.verification"] is True
    assert isinstance(faust_credentials(kafka), SSLCredentials)


def test_mtls_passes_the_client_certificate_and_key(tmp_path: Path, pem: Path) -> None:
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    cert.write_text("x")
    key.write_text("x")
    kafka = KafkaConfig(bootstrap_servers="b:9093", security_protocol="SSL", ssl_ca_file=pem,
                        ssl_cert_file=cert, ssl_key_file=key)

    rd = librdkafka_config(kafka)
    assert (rd["ssl.certificate.location"], rd["ssl.key.location"]) == (str(cert), str(key))


def test_oauthbearer_uses_oidc_client_credentials() -> None:
    kafka = KafkaConfig(bootstrap_servers="b:9098", security_protocol="SASL_SSL",
                        sasl_mechanism="OAUTHBEARER",
                        oauth_token_endpoint_url="https://idp.example/token",
                        oauth_client_id="meterline", oauth_client_secret="cs",
                        oauth_scope="kafka")
    rd = librdkafka_config(kafka)
    assert {k: v for k, v in rd.items() if k.startswith("sasl")} == {
        "sasl.mechanism": "OAUTHBEARER", "sasl.oauthbearer.method": "oidc",
        "sasl.oauthbearer.token.endpoint.url": "https://idp.example/token",
        "sasl.oauthbearer.client.id": "meterline", "sasl.oauthbearer.client.secret": "cs",
        "sasl.oauthbearer.scope": "kafka"}
    aio = aiokafka_config(kafka)
    assert isinstance(aio["sasl_oauth_token_provider"], ClientCredentialsToken)
    assert isinstance(faust_credentials(kafka), OAuthCredentials)


def test_a_caller_cannot_override_the_security_settings() -> None:
    kafka = KafkaConfig(bootstrap_servers="b:9093", security_protocol="SSL")

    with pytest.raises(ValueError, match="security settings come from kafka"):
        librdkafka_config(kafka, **{"enable.ssl.certificate.verification": False})
    with pytest.raises(ValueError, match="security settings come from kafka"):
        aiokafka_config(kafka, security_protocol="PLAINTEXT")


# --- the OAuth token provider against a real HTTP token endpoint -----------------------------


@pytest.fixture
def token_endpoint() -> Iterator[tuple[str, list[dict[str, list[str]]]]]:
    seen: list[dict[str, list[str]]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            form = parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
            seen.append(form)
            body = json.dumps({"access_token": f"tok-{len(seen)}", "expires_in": 100}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/token", seen
    finally:
        server.shutdown()


def test_token_provider_fetches_once_and_refreshes_before_expiry(
    token_endpoint: tuple[str, list[dict[str, list[str]]]],
) -> None:
    url, seen = token_endpoint
    kafka = KafkaConfig(bootstrap_servers="b:9098", security_protocol="SASL_SSL",
                        sasl_mechanism="OAUTHBEARER", oauth_token_endpoint_url=url,
                        oauth_client_id="meterline", oauth_client_secret="cs", oauth_scope="kafka")
    now = [1000.0]
    provider = ClientCredentialsToken(kafka, clock=lambda: now[0])

    async def tokens() -> list[str]:
        got = [await provider.token(), await provider.token()]
        now[0] += 79  # 79 % of the 100 s lifetime: still the same token
        got.append(await provider.token())
        now[0] += 2  # past 80 %: refreshed
        got.append(await provider.token())
        return got

    assert asyncio.run(tokens()) == ["tok-1", "tok-1", "tok-1", "tok-2"]
    assert seen[0] == {"grant_type": ["client_credentials"], "client_id": ["meterline"],
                       "client_secret": ["cs"], "scope": ["kafka"]}
    assert "cs" not in repr(provider)


# --- every Kafka client goes through the mapping ---------------------------------------------

# Constructors of Kafka clients in confluent-kafka, aiokafka and Faust.
CLIENT_CONSTRUCTORS = frozenset({
    "Producer", "Consumer", "AdminClient", "SerializingProducer", "DeserializingConsumer",
    "AIOKafkaConsumer", "AIOKafkaProducer", "AIOKafkaAdminClient", "App", "MeterlineApp",
    "HealingProducer",
})
# HealingProducer builds its librdkafka Producer from the config it is given; it is itself
# in CLIENT_CONSTRUCTORS, so every caller must hand it a mapped config.
WRAPPERS = {"kafka/producer.py": "Producer"}
# What must appear in the call for it to carry the configured security.
MAPPINGS = frozenset({"librdkafka_config", "aiokafka_config", "producer_config",
                      "faust_credentials"})


def _called_name(node: ast.Call) -> str | None:
    f = node.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


def unsecured_client_constructions(root: Path) -> list[str]:
    """`file:line` of every Kafka client construction whose arguments do not come from the
    security mapping (a call to one of MAPPINGS inside the call, or a variable assigned
    from one in the same function)."""
    found: list[str] = []
    for path in sorted(root.rglob("*.py")):
        if path == SECURITY_MODULE:
            continue
        wrapper = WRAPPERS.get(path.relative_to(root).as_posix())
        tree = ast.parse(path.read_text())
        names: set[str] = set()  # variables and attributes assigned from a mapping
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and any(
                    isinstance(c, ast.Call) and _called_name(c) in MAPPINGS
                    for c in ast.walk(node.value)):
                names.update(t.id if isinstance(t, ast.Name) else t.attr
                             for t in node.targets if isinstance(t, ast.Name | ast.Attribute))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and _called_name(node) in CLIENT_CONSTRUCTORS):
                continue
            inner = [n for n in ast.walk(node) if n is not node]
            if any(isinstance(n, ast.Call) and _called_name(n) in MAPPINGS for n in inner):
                continue
            referenced = {n.attr for n in inner if isinstance(n, ast.Attribute)} | {
                n.id for n in inner if isinstance(n, ast.Name)}
            if referenced & names or (wrapper and _called_name(node) == wrapper):
                continue
            found.append(f"{path.relative_to(root.parent)}:{node.lineno}")
    return found


def test_every_kafka_client_in_services_goes_through_the_security_mapping() -> None:
    assert unsecured_client_constructions(SERVICES) == []


def test_the_scan_sees_a_client_built_around_the_mapping(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "bad.py").write_text(
        "from confluent_kafka import Producer\n"
        "from aiokafka import AIOKafkaConsumer\n"
        "import faust\n"
        "p = Producer({'bootstrap.servers': 'x'})\n"
        "c = AIOKafkaConsumer('t', bootstrap_servers='x')\n"
        "app = faust.App('id', broker='kafka://x')\n")
    (pkg / "good.py").write_text(
        "from confluent_kafka import Producer\n"
        "p = Producer(librdkafka_config(kafka, **{'linger.ms': 5}))\n"
        "class W:\n"
        "    def __init__(self, kafka):\n"
        "        self._config = producer_config(kafka, 'w')\n"
        "        self.p = Producer({**self._config, 'error_cb': print})\n")

    assert unsecured_client_constructions(pkg) == ["pkg/bad.py:4", "pkg/bad.py:5", "pkg/bad.py:6"]


def test_cli_names_the_field_of_an_invalid_security_setting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    from meterline.cli import main

    config = tmp_path / "meterline.yaml"
    config.write_text("kafka:\n  security_protocol: SASL_SSL\n  sasl_mechanism: SCRAM-SHA-256\n")
    monkeypatch.setenv("METERLINE_KAFKA__SASL_PASSWORD", "s3cret")

    assert main(["-c", str(config), "topics"]) == 2
    err = capsys.readouterr().err
    assert "kafka" in err and "needs sasl_username" in err and "s3cret" not in err


# --- Amazon MSK IAM (OAUTHBEARER signed with AWS credentials) ---------------------------------


def test_msk_iam_signs_a_token_for_the_region_with_the_default_credentials(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAMETERLINETEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-real-secret")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    kafka = KafkaConfig(bootstrap_servers="b-1.msk.example:9098", security_protocol="SASL_SSL",
                        sasl_mechanism="OAUTHBEARER", oauth_provider="aws_msk_iam",
                        aws_region="eu-west-1")

    rd = librdkafka_config(kafka)
    assert rd["sasl.mechanism"] == "OAUTHBEARER" and "sasl.oauthbearer.method" not in rd
    token, expiry_s = rd["oauth_cb"]("")
    url = urlsplit(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode())
    query = parse_qs(url.query)
    assert url.hostname == "kafka.eu-west-1.amazonaws.com"
    assert query["Action"] == ["kafka-cluster:Connect"]
    assert query["X-Amz-Credential"][0].startswith("AKIAMETERLINETEST/")
    assert expiry_s > 1_000_000_000  # epoch seconds, as librdkafka wants

    provider = aiokafka_config(kafka)["sasl_oauth_token_provider"]
    aio_token = asyncio.run(provider.token())
    assert base64.urlsafe_b64decode(aio_token + "=" * (-len(aio_token) % 4)).startswith(
        b"https://kafka.eu-west-1.amazonaws.com/?Action=kafka-cluster")
    assert isinstance(faust_credentials(kafka), OAuthCredentials)


@pytest.mark.parametrize(("kafka", "message"), [
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "OAUTHBEARER",
      "oauth_provider": "aws_msk_iam"}, "aws_msk_iam needs aws_region"),
    ({"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "OAUTHBEARER",
      "oauth_provider": "aws_msk_iam", "aws_region": "eu-west-1"},
     "aws_msk_iam needs security_protocol SASL_SSL"),
    ({"security_protocol": "SSL", "oauth_provider": "aws_msk_iam", "aws_region": "eu-west-1"},
     "oauth_provider aws_msk_iam needs sasl_mechanism OAUTHBEARER"),
])
def test_msk_iam_misconfigurations_name_the_field(
    tmp_path: Path, kafka: dict[str, object], message: str,
) -> None:
    assert message in kafka_error(tmp_path, **kafka)
