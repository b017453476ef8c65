"""Contract tests for docker-compose.yml and deploy/: parsed and cross-checked, not run.

The service graph holds together (every dependency exists, waits on health or on
completion the right way), every meterline container runs the image built from
deploy/Dockerfile with a command the real CLI parser accepts, and the mounted config
loads with the real `load_settings` under the environment compose gives it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shlex
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path, PurePosixPath
from typing import Any
from unittest import mock
from urllib.parse import urlsplit

import pytest
import yaml

from meterline.cli import build_parser
from meterline.config import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
INFRA = {"kafka", "postgres"}
MONITORING = {"prometheus", "grafana"}
CONFIG_IN_CONTAINER = "/etc/meterline/meterline.yaml"

COMPOSE: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
METERLINE_SERVICES = sorted(set(SERVICES) - INFRA - MONITORING)


def interpolate(value: str) -> str:
    """Compose's `${VAR:-default}` interpolation, as `docker compose` would do it here."""
    def sub(m: re.Match[str]) -> str:
        return os.environ.get(m.group(1)) or m.group(3) or ""
    return re.sub(r"\$\{(\w+)(:-([^}]*))?\}", sub, value)


def env_of(service: str) -> dict[str, str]:
    env = SERVICES[service].get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: interpolate(str(v)) for k, v in env.items()}


def depends_on(service: str) -> dict[str, str]:
    """Target -> condition (compose's short list form means service_started)."""
    deps = SERVICES[service].get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def subcommands() -> set[str]:
    parser = build_parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]  # noqa: SLF001
    assert len(actions) == 1
    return set(actions[0].choices)


def meterline_argvs(service: str) -> list[list[str]]:
    """The meterline argument vectors a service runs (several for a `sh -c` chain)."""
    spec = SERVICES[service]
    entrypoint = spec.get("entrypoint")
    command = spec.get("command")
    if isinstance(command, str):
        command = shlex.split(command)
    assert command, f"{service}: no command (the image's default is --help)"
    if entrypoint is None or entrypoint == ["meterline"]:
        return [list(command)]
    assert entrypoint[0] in ("sh", "/bin/sh", "bash") and entrypoint[-1].startswith("-") \
        and "c" in entrypoint[-1], f"{service}: unexpected entrypoint {entrypoint}"
    (script,) = command
    argvs = []
    for part in re.split(r"&&|;|\n", script):
        words = shlex.split(part)
        if words:
            assert words[0] == "meterline", f"{service}: runs {words[0]!r}, not meterline"
            argvs.append(words[1:])
    return argvs


def mounted_config(service: str) -> Path:
    """The host file mounted at the path METERLINE_CONFIG names."""
    target = env_of(service)["METERLINE_CONFIG"]
    for volume in SERVICES[service].get("volumes", []):
        if isinstance(volume, str):
            source, _, rest = volume.partition(":")
            mount_target = rest.split(":")[0]
        else:
            source, mount_target = volume["source"], volume["target"]
        if mount_target == target:
            return (ROOT / source).resolve()
    raise AssertionError(f"{service}: nothing mounted at {target}")


def load_as(service: str) -> Settings:
    """The service's settings, loaded as the container would: its env, its mounted file."""
    with mock.patch.dict(os.environ, env_of(service), clear=True):
        return load_settings(mounted_config(service))


# --- the graph ------------------------------------------------------------------------------


def test_expected_services_exist() -> None:
    assert {"kafka", "postgres", "init", "processor", "relay", "load"} <= set(SERVICES)


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_every_dependency_exists_and_is_waited_for_correctly(service: str) -> None:
    for target, condition in depends_on(service).items():
        assert target in SERVICES, f"{service} depends on unknown service {target}"
        assert target != service
        assert condition in ("service_started", "service_healthy", "service_completed_successfully")
        if condition == "service_healthy":
            assert "healthcheck" in SERVICES[target], f"{target} has no healthcheck to wait for"
        if condition == "service_completed_successfully":
            assert SERVICES[target].get("restart", "no") == "no", f"{target} must be one-shot"


def test_dependency_graph_has_no_cycle() -> None:
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"cycle: {' -> '.join((*path, name))}"
        if name not in done:
            for target in depends_on(name):
                visit(target, (*path, name))
            done.add(name)

    for name in SERVICES:
        visit(name, ())


def test_startup_order() -> None:
    assert depends_on("init") == {"kafka": "service_healthy", "postgres": "service_healthy"}
    for service in ("processor", "relay", "load"):
        assert depends_on(service)["init"] == "service_completed_successfully"
    assert SERVICES["load"].get("profiles") == ["load"]
    for service in set(METERLINE_SERVICES) - {"load"}:
        assert "profiles" not in SERVICES[service]


@pytest.mark.parametrize("service", sorted(INFRA))
def test_infrastructure_has_healthchecks(service: str) -> None:
    check = SERVICES[service]["healthcheck"]
    assert check["test"] and check["test"][0] in ("CMD", "CMD-SHELL")
    assert check.get("retries", 0) >= 3


def test_infrastructure_images_and_storage() -> None:
    assert SERVICES["kafka"]["image"].startswith("apache/kafka:3.9")
    assert SERVICES["postgres"]["image"] == "postgres:17"
    kafka_env = env_of("kafka")
    assert "broker" in kafka_env["KAFKA_PROCESS_ROLES"] and "controller" in kafka_env["KAFKA_PROCESS_ROLES"]
    assert "ZOOKEEPER" not in " ".join(kafka_env)  # KRaft
    named = set(COMPOSE.get("volumes") or {})
    for service in INFRA:
        sources = {v.split(":")[0] for v in SERVICES[service].get("volumes", [])}
        assert sources & named, f"{service} keeps its data in no named volume"


# --- meterline services ---------------------------------------------------------------------


@pytest.mark.parametrize("service", METERLINE_SERVICES)
def test_meterline_service_uses_the_deploy_image(service: str) -> None:
    spec = SERVICES[service]
    build = spec["build"]
    assert (ROOT / build["context"]).resolve() == ROOT
    assert (ROOT / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    images = {SERVICES[s].get("image") for s in METERLINE_SERVICES}
    assert len(images) == 1, f"meterline services disagree on the image name: {images}"


@pytest.mark.parametrize("service", METERLINE_SERVICES)
def test_meterline_service_runs_real_commands(service: str) -> None:
    known = subcommands()
    parser = build_parser()
    for argv in meterline_argvs(service):
        assert argv and argv[0] in known, f"{service}: {argv} is not one of {sorted(known)}"
        try:
            parser.parse_args(argv)
        except SystemExit as exc:  # argparse reports bad options by exiting
            pytest.fail(f"{service}: `meterline {shlex.join(argv)}` does not parse ({exc})")


def test_the_service_commands() -> None:
    assert meterline_argvs("init") == [["migrate"], ["topics"]]
    assert meterline_argvs("processor") == [["processor"]]
    assert meterline_argvs("relay") == [["relay"]]
    args = build_parser().parse_args(meterline_argvs("load")[0])
    assert (args.command, args.rate, args.duration) == ("load", 2000, 3600)


@pytest.mark.parametrize("service", METERLINE_SERVICES)
def test_meterline_service_environment(service: str) -> None:
    env = env_of(service)
    assert env["METERLINE_CONFIG"] == CONFIG_IN_CONTAINER
    kafka_host, _, kafka_port = env["KAFKA_BOOTSTRAP_SERVERS"].partition(":")
    assert kafka_host in SERVICES and f"PLAINTEXT://{kafka_host}:{kafka_port}" in \
        env_of(kafka_host)["KAFKA_ADVERTISED_LISTENERS"]
    db = urlsplit(env["DATABASE_URL"])
    pg = env_of("postgres")
    assert db.scheme in ("postgresql", "postgres") and db.hostname in SERVICES
    assert (db.username, db.password, db.path.lstrip("/")) == (
        pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"])


@pytest.mark.parametrize("service", METERLINE_SERVICES)
def test_mounted_config_exists_and_loads(service: str) -> None:
    path = mounted_config(service)
    assert path.is_file() and path.is_relative_to(ROOT / "deploy")
    assert all(":ro" in v for v in SERVICES[service]["volumes"] if isinstance(v, str))
    settings = load_as(service)
    env = env_of(service)
    assert settings.database_url == env["DATABASE_URL"]
    assert settings.kafka.bootstrap_servers == env["KAFKA_BOOTSTRAP_SERVERS"]
    assert settings.meters, "no meters: every event would be dead-lettered"
    assert settings.kafka.session_timeout_ms == 10_000
    assert (settings.processor.metrics_port, settings.relay.metrics_port) == (9464, 9465)


def test_partitions_allow_scaling_the_processor() -> None:
    partitions = load_as("processor").kafka.partitions
    assert partitions >= 2  # the replicas hint in docker-compose.yml is 2


@pytest.mark.parametrize(("service", "port_of"), [
    ("processor", lambda s: s.processor.metrics_port),
    ("relay", lambda s: s.relay.metrics_port),
])
def test_healthcheck_probes_the_services_metrics_port(service: str, port_of: Any) -> None:
    port = str(port_of(load_as(service)))
    spec = SERVICES[service]
    assert spec["healthcheck"]["test"][-1] == port
    assert "/usr/local/lib/meterline/healthcheck.py" in spec["healthcheck"]["test"]
    assert port in [str(p) for p in spec.get("expose", [])]


# --- deploy/ ----------------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile() -> None:
    instructions = _instructions()
    args = dict(rest.split("=", 1) for word, rest in instructions if word == "ARG" and "=" in rest)
    bases = []
    for word, rest in instructions:
        if word == "FROM":
            base = rest.split()[0]
            for name, value in args.items():
                base = base.replace(f"${{{name}}}", value)
            bases.append(base)
    assert bases and all(base == "python:3.11-slim" for base in bases), bases
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    assert re.search(r"pip install (\S+ )*\.(\s|$)", runs), "the image must pip install the package"
    users = [rest for word, rest in instructions if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "must not run as root"
    assert ("ENTRYPOINT", '["meterline"]') in instructions
    assert any(word == "HEALTHCHECK" for word, _ in instructions)
    for word, rest in instructions:
        if word == "COPY" and not rest.startswith("--from"):
            for source in rest.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"


def test_dockerignore_keeps_what_the_build_copies() -> None:
    rules = [line.strip() for line in (ROOT / "deploy" / "Dockerfile.dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert rules[0] == "*"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    for word, rest in _instructions():
        if word == "COPY" and not rest.startswith("--from"):
            for source in rest.split()[:-1]:
                assert source.rstrip("/") in allowed, f"{source} is copied but ignored"


def _healthcheck_module() -> Any:
    spec = importlib.util.spec_from_file_location("meterline_healthcheck", ROOT / "deploy" / "healthcheck.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_healthcheck_script() -> None:
    health = _healthcheck_module()

    class Metrics(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self.send_response(200 if self.path == "/metrics" else 404)
            self.end_headers()
            self.wfile.write(b"meterline_records_in_total 0\n")

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Metrics)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        assert health.main(["healthcheck.py", str(port)]) == 0
        with mock.patch.dict(os.environ, {"METERLINE_HEALTH_PORT": str(port)}):
            assert health.main(["healthcheck.py"]) == 0
    finally:
        server.shutdown()
        server.server_close()
    assert health.main(["healthcheck.py", str(port)]) == 1  # nothing listens any more
    with mock.patch.dict(os.environ, {"METERLINE_HEALTH_PORT": ""}):
        assert health.main(["healthcheck.py"]) == 0  # one-shot commands pass


def test_compose_paths_are_posix_relative() -> None:
    for service in METERLINE_SERVICES:
        for volume in SERVICES[service].get("volumes", []):
            source = volume.split(":")[0]
            assert source.startswith("./") and not PurePosixPath(source).is_absolute()


def test_monitoring_mounts_the_shipped_prometheus_and_grafana_files() -> None:
    mounts = {
        service: {v.split(":")[0]: v.split(":")[1] for v in SERVICES[service]["volumes"] if v.startswith("./")}
        for service in MONITORING
    }
    assert mounts["prometheus"] == {"./deploy/prometheus": "/etc/prometheus"}
    assert mounts["grafana"] == {
        "./deploy/grafana/provisioning": "/etc/grafana/provisioning",
        "./deploy/grafana/dashboards": "/var/lib/grafana/dashboards",
    }
    for source in (s for m in mounts.values() for s in m):
        assert (ROOT / source).is_dir(), source
    assert "processor" in SERVICES["prometheus"]["depends_on"]
