"""A TLS-secured Kafka broker for tests: the embedded Tansu broker behind a TLS terminator.

Why a terminator: Tansu 0.6.0 declares `--cert` and `--key` in one exclusive clap group,
so `tansu broker --cert server.pem --key server.key` exits with "the argument '--cert
<CERT>' cannot be used with '--key <KEY>'" and the broker cannot serve TLS itself. The
terminator below is a plain byte pipe: clients do a real TLS handshake with it (the
server certificate signed by a CA made here, and optionally a required client
certificate, i.e. mTLS) and everything after the handshake is the Kafka protocol of the
real broker, which advertises the terminator's address in its metadata.

Certificates come from the `openssl` CLI; without it the tests that need them skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from integration.scram_gate import ScramUsers
from meterline.devstack.embedded import EmbeddedKafka


@dataclass(frozen=True)
class Pki:
    """Throwaway PEM files: a CA, a server certificate it signed, a client certificate it
    signed (mTLS), and a second CA that signed nothing the broker uses (untrusted)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    # signed by `ca`, but for a host name that is not the one clients dial
    wrong_host_cert: Path
    wrong_host_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(directory: Path) -> Pki:
    """Create the PEM files of `Pki` in `directory` (skips the test without openssl)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl CLI to make a throwaway CA and certificates")
    d = directory
    d.mkdir(parents=True, exist_ok=True)
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                 "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-subj", f"/CN=meterline test {ca}",
                 cwd=d)

    def signed(name: str, subject: str, san: str) -> None:
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", "-subj", f"/CN={subject}", cwd=d)
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
                 "-extfile", f"{name}.ext", cwd=d)

    signed("server", "localhost", "DNS:localhost,IP:127.0.0.1")
    signed("client", "meterline", "DNS:meterline")
    signed("wrong-host", "elsewhere.example", "DNS:elsewhere.example")
    return Pki(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem",
               d / "client.key", d / "other-ca.pem", d / "wrong-host.pem", d / "wrong-host.key")


class TlsTerminator:
    """Listens on 127.0.0.1 with TLS and pipes each connection to `upstream_port` in the
    clear. Runs its own event loop in a thread, so sync and async clients and subprocesses
    can all connect. `client_ca` set = clients must present a certificate it signed."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None,
                 scram: ScramUsers | None = None) -> None:
        self.scram = scram  # set: every connection must log in first (scram_gate.py)
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        if client_ca is not None:
            self.context.load_verify_locations(client_ca)
            self.context.verify_mode = ssl.CERT_REQUIRED
        self.upstream_port = 0  # set before the first client connects
        self.handshake_failures = 0
        self.connections = 0
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._run, name="tls-terminator", daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(
            self._serve, "127.0.0.1", self.port, ssl=self.context, ssl_handshake_timeout=10))
        self._ready.set()
        self._loop.run_forever()

    def __enter__(self) -> TlsTerminator:
        self._thread.start()
        self._ready.wait(10)
        self._loop.set_exception_handler(self._on_loop_error)
        return self

    def __exit__(self, *exc: object) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        # A client that rejects our certificate (or has none) ends in a failed handshake:
        # counted, so a test can prove the handshake is where it failed.
        if isinstance(context.get("exception"), ssl.SSLError | ConnectionResetError):
            self.handshake_failures += 1
        else:
            loop.default_exception_handler(context)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        if self.scram is not None and not await self.scram.authenticate(
                reader, writer, up_reader, up_writer):
            writer.close()
            up_writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(256 * 1024):
                    dst.write(data)
                    await dst.drain()
            except (OSError, ssl.SSLError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


@contextlib.contextmanager
def tls_broker(work_dir: Path, pki: Pki, *, cert: Path | None = None, key: Path | None = None,
               require_client_cert: bool = False, scram: ScramUsers | None = None,
               ) -> Iterator[tuple[EmbeddedKafka, TlsTerminator]]:
    """An embedded broker reachable only through TLS at `terminator.address` (and, with
    `scram`, only after a SCRAM login)."""
    with TlsTerminator(cert or pki.server_cert, key or pki.server_key,
                       pki.ca if require_client_cert else None, scram) as terminator:
        kafka = EmbeddedKafka(work_dir, advertised=terminator.address)
        with kafka:
            terminator.upstream_port = kafka.port
            yield kafka, terminator
