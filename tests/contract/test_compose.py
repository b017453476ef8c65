"""Contract tests for docker-compose.yml and deploy/: parsed and cross-checked, not run.

The service graph holds together (every dependency exists, waits on health or on
completion the right way, every pipeline service waits for init), every meterline
container runs the image built from deploy/Dockerfile with a command the real CLI parser
accepts, each service listens on its own port and is health-checked and scraped there,
secrets come from the environment with marked dev-only defaults, and the mounted config
loads with the real `load_settings` under the environment compose gives it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
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

from .deployment import (
    PORT_SETTING,
    SECRETS_USED,
    SERVICE_PORTS,
    check_meterline_argv,
    configured_ports,
    setting,
)

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
INFRA = {"kafka", "postgres"}
MONITORING = {"prometheus", "grafana"}
CONFIG_IN_CONTAINER = "/etc/meterline/meterline.yaml"

COMPOSE: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
METERLINE_SERVICES = sorted(set(SERVICES) - INFRA - MONITORING)
ONE_SHOT = {"init", "load"}
# The local Stripe: needs neither Kafka nor Postgres, so it waits for nothing.
STANDALONE = {"stripe-emulator"}
# The long-running pipeline services: each waits for init and is scraped by Prometheus.
PIPELINE = sorted(set(METERLINE_SERVICES) - ONE_SHOT - STANDALONE)

# Secrets the services read from the environment; compose must take them from its own
# environment, with at most a default that says it is for development only.
SECRET_ENV = {"STRIPE_API_KEY", "STRIPE_WEBHOOK_SECRETS", "METERLINE_API_TOKENS", "POSTGRES_PASSWORD"}
# Dev defaults that predate the "dev" marking; changing one would lock existing pgdata
# volumes out (Postgres keeps the password it was initialised with). Marked by comment.
UNMARKED_DEV_DEFAULTS = {"POSTGRES_PASSWORD": "meterline"}
HEALTHCHECK_SCRIPT = "/usr/local/lib/meterline/healthcheck.py"


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


def wrapper_script(service: str) -> str | None:
    """The script of an `sh -ec SCRIPT meterline` entrypoint that ends by exec-ing
    `meterline "$@"` with the service's command (the Stripe key/emulator switch)."""
    entrypoint = SERVICES[service].get("entrypoint")
    if (isinstance(entrypoint, list) and len(entrypoint) == 4 and entrypoint[:2] == ["sh", "-ec"]
            and entrypoint[3] == "meterline"):
        script: str = entrypoint[2]
        assert script.rstrip().endswith('exec meterline "$$@"'), f"{service}: wrapper must exec meterline"
        return script
    return None


def meterline_argvs(service: str) -> list[list[str]]:
    """The meterline argument vectors a service runs (several for a `sh -c` chain)."""
    spec = SERVICES[service]
    entrypoint = spec.get("entrypoint")
    command = spec.get("command")
    if isinstance(command, str):
        command = shlex.split(command)
    assert command, f"{service}: no command (the image's default is --help)"
    if entrypoint is None or entrypoint == ["meterline"] or wrapper_script(service):
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
    assert set(SERVICE_PORTS) <= set(SERVICES)
    assert set(PIPELINE) | STANDALONE == set(SERVICE_PORTS), "a service without a known port"


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
    assert depends_on("load")["init"] == "service_completed_successfully"
    assert SERVICES["load"].get("profiles") == ["load"]
    for service in set(METERLINE_SERVICES) - {"load"}:
        assert "profiles" not in SERVICES[service]


@pytest.mark.parametrize("service", PIPELINE)
def test_pipeline_services_wait_for_init_and_healthy_servers(service: str) -> None:
    deps = depends_on(service)
    assert deps["init"] == "service_completed_successfully", service
    assert deps["kafka"] == "service_healthy" and deps["postgres"] == "service_healthy", service


def test_the_stripe_emulator_waits_for_nothing_and_the_stripe_services_wait_for_it() -> None:
    assert depends_on("stripe-emulator") == {}
    for service in ("stripe-sink", "reconcile"):
        assert depends_on(service)["stripe-emulator"] == "service_healthy", service


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
    for argv in meterline_argvs(service):
        check_meterline_argv(service, argv)


def test_the_service_commands() -> None:
    assert meterline_argvs("init") == [["migrate"], ["topics"]]
    assert meterline_argvs("processor") == [["processor"]]
    assert meterline_argvs("relay") == [["relay"]]
    assert meterline_argvs("stripe-sink") == [["stripe-sink"]]
    assert meterline_argvs("reconcile") == [["reconcile", "--every", "300"]]
    assert meterline_argvs("webhook-bridge") == [["webhook-bridge"]]
    assert meterline_argvs("ledger-consumer") == [["ledger-consumer"]]
    assert meterline_argvs("api") == [["api"]]
    args = build_parser().parse_args(meterline_argvs("load")[0])
    assert (args.command, args.rate, args.duration) == ("load", 2000, 3600)
    args = build_parser().parse_args(meterline_argvs("stripe-emulator")[0])
    assert (args.host, args.port) == ("0.0.0.0", SERVICE_PORTS["stripe-emulator"][0])


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
    binds = [v for v in SERVICES[service]["volumes"] if isinstance(v, str) and v.startswith(".")]
    assert all(v.endswith(":ro") for v in binds), f"{service}: repository files mounted writable"
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


def exposed(service: str) -> list[int]:
    return [int(str(p).split("/")[0]) for p in SERVICES[service].get("expose", [])]


@pytest.mark.parametrize("service", sorted(SERVICE_PORTS))
def test_healthcheck_probes_the_services_port(service: str) -> None:
    port, path = SERVICE_PORTS[service]
    test = SERVICES[service]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", HEALTHCHECK_SCRIPT], test
    assert test[3:] == ([str(port)] if path == "/metrics" else [str(port), path]), test
    assert exposed(service) == [port], f"{service} should expose exactly its port {port}"
    assert SERVICES[service]["healthcheck"].get("retries", 0) >= 3


@pytest.mark.parametrize("service", sorted(PORT_SETTING))
def test_service_ports_are_the_configured_ones(service: str) -> None:
    assert setting(load_as(service), PORT_SETTING[service]) == SERVICE_PORTS[service][0]


def test_every_configured_port_is_a_service_port() -> None:
    """A port added to the config (a new service's metrics_port) must be where compose
    expects it: exposed by a service, health-checked and scraped."""
    ports = configured_ports(load_as("processor"))
    assert ports, "no *port settings found: the walk is broken"
    served = {port for port, _ in SERVICE_PORTS.values()}
    assert {name: p for name, p in ports.items() if p not in served} == {}


def test_ports_are_unique() -> None:
    listening = [port for port, _ in SERVICE_PORTS.values()]
    assert len(listening) == len(set(listening))
    published = [str(p).rsplit(":", 1)[0].rsplit(":", 1)[-1]
                 for spec in SERVICES.values() for p in spec.get("ports", [])]
    assert len(published) == len(set(published)), f"host port published twice: {sorted(published)}"


def test_http_services_publish_on_loopback_only() -> None:
    """The api and the bridge are guarded by dev-only credentials by default: never expose
    them beyond the machine running compose."""
    for service in ("api", "webhook-bridge"):
        port = SERVICE_PORTS[service][0]
        assert SERVICES[service]["ports"] == [f"127.0.0.1:{port}:{port}"], service


# --- secrets ----------------------------------------------------------------------------


def test_secrets_come_from_the_environment_with_marked_dev_defaults() -> None:
    seen = set()
    for service, spec in SERVICES.items():
        for name, raw in (spec.get("environment") or {}).items():
            if name not in SECRET_ENV:
                continue
            seen.add(name)
            m = re.fullmatch(r"\$\{(\w+)(?::-(.*))?\}", str(raw))
            assert m and m.group(1) == name, f"{service}.{name}: take it from ${{{name}:-...}}, got {raw!r}"
            default = m.group(2) or ""
            assert default in ("", UNMARKED_DEV_DEFAULTS.get(name)) or "dev" in default, \
                f"{service}.{name}: default {default!r} not marked dev-only"
    assert seen == SECRET_ENV, f"secrets not passed to any service: {sorted(SECRET_ENV - seen)}"
    text = COMPOSE_FILE.read_text()
    assert not re.search(r"\b(sk|rk)_live_\w", text), "a live Stripe key in docker-compose.yml"
    assert "DEV ONLY" in text


def test_services_get_only_the_secrets_they_use() -> None:
    for service in METERLINE_SERVICES:
        given = set(SERVICES[service].get("environment") or {}) & SECRET_ENV
        assert given == SECRETS_USED.get(service, set()), service


def test_dev_default_secrets_pass_the_services_own_checks() -> None:
    """`docker compose up` with nothing set starts the api and the bridge: their dev-only
    defaults satisfy the same checks the services run at start-up."""
    from meterline.api.auth import load_tokens
    from meterline.webhooks.signing_secrets import resolve_signing_secrets

    with mock.patch.dict(os.environ, {}, clear=True):
        assert load_tokens(env_of("api"))
        assert resolve_signing_secrets(env_of("webhook-bridge"))


def _run_wrapper(service: str, tmp_path: Path, env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """Run the service's entrypoint + command with `meterline` replaced by a recorder."""
    fake = tmp_path / "meterline"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$OUT/argv"\nenv > "$OUT/env"\n')
    fake.chmod(0o755)
    # Compose turns `$$` into `$` before the shell sees the script.
    entrypoint = [part.replace("$$", "$") for part in SERVICES[service]["entrypoint"]]
    run_env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "OUT": str(tmp_path), **env}
    subprocess.run([*entrypoint, *SERVICES[service]["command"]], env=run_env, check=True, timeout=10)
    argv = (tmp_path / "argv").read_text().splitlines()
    seen = dict(line.split("=", 1) for line in (tmp_path / "env").read_text().splitlines() if "=" in line)
    return argv, seen


@pytest.mark.parametrize("service", ["stripe-sink", "reconcile"])
def test_without_a_stripe_key_the_stripe_services_use_the_emulator(service: str, tmp_path: Path) -> None:
    assert wrapper_script(service)
    argv, env = _run_wrapper(service, tmp_path, {"STRIPE_API_KEY": "", "STRIPE_API_KEY_FILE": ""})
    assert argv == meterline_argvs(service)[0]
    assert env["STRIPE_API_KEY"].startswith("sk_test_")  # the emulator accepts test keys
    base = urlsplit(env["METERLINE_STRIPE__API_BASE"])
    assert base.hostname == "stripe-emulator" and base.port == SERVICE_PORTS["stripe-emulator"][0]
    emulator = build_parser().parse_args(meterline_argvs("stripe-emulator")[0])
    assert emulator.host == "0.0.0.0" and emulator.port == base.port
    # The config accepts the override (stripe.api_base).
    with mock.patch.dict(os.environ, {**env_of(service), "METERLINE_STRIPE__API_BASE": base.geturl()},
                         clear=True):
        assert load_settings(mounted_config(service)).stripe.api_base == base.geturl()


@pytest.mark.parametrize("service", ["stripe-sink", "reconcile"])
def test_with_a_stripe_key_the_stripe_services_talk_to_stripe(service: str, tmp_path: Path) -> None:
    argv, env = _run_wrapper(service, tmp_path, {"STRIPE_API_KEY": "rk_test_from_the_operator"})
    assert argv == meterline_argvs(service)[0]
    assert env["STRIPE_API_KEY"] == "rk_test_from_the_operator"
    assert "METERLINE_STRIPE__API_BASE" not in env  # stripe.api_base unset: api.stripe.com
    _, env = _run_wrapper(service, tmp_path, {"STRIPE_API_KEY_FILE": "/run/secrets/stripe"})
    assert "METERLINE_STRIPE__API_BASE" not in env and "STRIPE_API_KEY" not in env


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
            self.send_response(200 if self.path in ("/metrics", "/readyz") else 404)
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
        assert health.main(["healthcheck.py", str(port), "/readyz"]) == 0  # the HTTP services
        assert health.main(["healthcheck.py", str(port), "/nope"]) == 1
        assert health.main(["healthcheck.py", str(port), "readyz"]) == 1  # not a path
        with mock.patch.dict(os.environ, {"METERLINE_HEALTH_PORT": str(port)}):
            assert health.main(["healthcheck.py"]) == 0
    finally:
        server.shutdown()
        server.server_close()
    assert health.main(["healthcheck.py", str(port)]) == 1  # nothing listens any more
    with mock.patch.dict(os.environ, {"METERLINE_HEALTH_PORT": ""}):
        assert health.main(["healthcheck.py"]) == 0  # one-shot commands pass


def test_compose_paths_are_posix_relative() -> None:
    named = set(COMPOSE.get("volumes") or {})
    for service in METERLINE_SERVICES:
        for volume in SERVICES[service].get("volumes", []):
            source = volume.split(":")[0]
            if source in named:
                continue
            assert source.startswith("./") and not PurePosixPath(source).is_absolute(), volume


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


def _scrape_jobs() -> dict[str, dict[str, Any]]:
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    return {job["job_name"]: job for job in prometheus["scrape_configs"]}


def test_every_pipeline_service_is_scraped_on_its_port_under_its_own_name() -> None:
    jobs = _scrape_jobs()
    for service in PIPELINE:
        job = jobs.get(service)
        assert job, f"prometheus.yml has no job {service!r}"
        (sd,) = job["dns_sd_configs"]  # every replica, found by the service name
        assert sd["names"] == [service] and int(sd["port"]) == SERVICE_PORTS[service][0], service
        assert job.get("metrics_path", "/metrics") == "/metrics"


def test_every_scraped_target_is_a_compose_service_exposing_that_port() -> None:
    for name, job in _scrape_jobs().items():
        for sd in job.get("dns_sd_configs", []):
            for host in sd["names"]:
                assert host in SERVICES, f"job {name} scrapes unknown service {host}"
                assert int(sd["port"]) in exposed(host), f"job {name}: {host} does not expose {sd['port']}"
