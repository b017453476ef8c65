"""The CLI: options before or after the command, and one clear line when a server does not answer."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from meterline.cli import build_parser
from meterline.preflight import Unreachable, check_kafka, check_postgres, redact_dsn


@pytest.mark.parametrize("argv", [
    ["-c", "m.yaml", "processor", "--worker-id", "w1"],
    ["processor", "-c", "m.yaml", "--worker-id", "w1"],
    ["processor", "--worker-id", "w1", "--config", "m.yaml"],
])
def test_config_option_is_accepted_before_or_after_the_command(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert (args.command, args.config, args.worker_id) == ("processor", "m.yaml", "w1")


def test_an_option_given_before_the_command_is_not_reset_by_the_command() -> None:
    args = build_parser().parse_args(["-v", "-c", "m.yaml", "relay"])
    assert args.config == "m.yaml" and args.verbose is True
    args = build_parser().parse_args(["relay"])
    assert args.config is None and args.verbose is False


@pytest.mark.parametrize(("dsn", "shown"), [
    ("postgresql://meter:s3cret@db.example:5432/meterline",
     "postgresql://meter:***@db.example:5432/meterline"),
    ("postgresql://meter@db.example/meterline", "postgresql://meter@db.example/meterline"),
    ("host=/tmp/pg dbname=x password=s3cret user=u", "host=/tmp/pg dbname=x password=*** user=u"),
])
def test_addresses_are_shown_without_passwords(dsn: str, shown: str) -> None:
    assert redact_dsn(dsn) == shown


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_postgres_names_the_server_without_its_password() -> None:
    port = _closed_port()
    with pytest.raises(Unreachable) as info:
        check_postgres(f"postgresql://u:s3cret@127.0.0.1:{port}/db", timeout_s=3)
    assert f"127.0.0.1:{port}" in str(info.value)
    assert "s3cret" not in str(info.value)


def test_unreachable_kafka_names_the_brokers() -> None:
    port = _closed_port()
    with pytest.raises(Unreachable) as info:
        check_kafka(f"127.0.0.1:{port}", timeout_s=2)
    assert f"127.0.0.1:{port}" in str(info.value)


def test_a_service_started_against_an_unreachable_database_exits_with_one_line() -> None:
    port = _closed_port()
    done = subprocess.run(
        [sys.executable, "-m", "meterline.cli", "relay"],
        env={"DATABASE_URL": f"postgresql://u:s3cret@127.0.0.1:{port}/db",
             "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{_closed_port()}", "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 3
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "cannot reach PostgreSQL" in lines[0] and f":{port}" in lines[0]
    assert "Traceback" not in done.stderr and "s3cret" not in done.stderr
