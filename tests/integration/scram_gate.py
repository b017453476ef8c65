"""SASL/SCRAM authentication in front of the embedded broker, for the SASL tests.

Why: Tansu 0.6.0 cannot hold a SCRAM user (`tansu user create` against a broker started
with --authentication fails with "early eof"; without --authentication the broker refuses
every SaslHandshake), see test_kafka_tls.py. So the TLS terminator (tls.py) can also
demand a SCRAM login, the way a Kafka broker does, before it pipes a connection to the
broker: it forwards ApiVersions (the broker's answer lists SaslHandshake and
SaslAuthenticate), answers SaslHandshake and SaslAuthenticate itself (RFC 5802/7677, the
server side), and closes the connection on any other request before a successful login.
What this proves is the client side: each client library really performs a SCRAM login
with the configured mechanism, user and password. It is not a test of a broker's SASL.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import struct

API_VERSIONS, SASL_HANDSHAKE, SASL_AUTHENTICATE = 18, 17, 36
UNSUPPORTED_SASL_MECHANISM, ILLEGAL_SASL_STATE, SASL_AUTHENTICATION_FAILED = 33, 34, 58
_HASHES = {"SCRAM-SHA-256": hashlib.sha256, "SCRAM-SHA-512": hashlib.sha512}
_ITERATIONS = 4096


class ScramUsers:
    """Users of one SCRAM mechanism, stored as a broker stores them (salt, keys), not as
    passwords."""

    def __init__(self, mechanism: str, passwords: dict[str, str]) -> None:
        self.mechanism = mechanism
        self.hash = _HASHES[mechanism]
        self.users: dict[str, tuple[bytes, bytes, bytes]] = {}
        for user, password in passwords.items():
            salt = os.urandom(16)
            salted = hashlib.pbkdf2_hmac(self.hash().name, password.encode(), salt, _ITERATIONS)
            stored_key = self.hash(self._hmac(salted, b"Client Key")).digest()
            self.users[user] = (salt, stored_key, self._hmac(salted, b"Server Key"))
        self.failed_logins = 0
        self.logins = 0

    def _hmac(self, key: bytes, msg: bytes) -> bytes:
        return hmac.new(key, msg, self.hash).digest()

    async def authenticate(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           up_reader: asyncio.StreamReader,
                           up_writer: asyncio.StreamWriter) -> bool:
        """Run the connection's requests up to a successful login; False = refused/closed."""
        first: bytes | None = None  # client-first-message-bare, once received
        server_first = b""
        nonce = ""
        while True:
            frame = await _read_frame(reader)
            if frame is None:
                return False
            api_key, version, correlation, body = _parse_request(frame)
            if api_key == API_VERSIONS:
                up_writer.write(struct.pack(">i", len(frame)) + frame)
                await up_writer.drain()
                answer = await _read_frame(up_reader)
                if answer is None:
                    return False
                writer.write(struct.pack(">i", len(answer)) + answer)
                await writer.drain()
            elif api_key == SASL_HANDSHAKE:
                (length,) = struct.unpack_from(">h", body)
                asked = body[2:2 + length].decode()
                error = 0 if asked == self.mechanism else UNSUPPORTED_SASL_MECHANISM
                mechs = self.mechanism.encode()
                await _respond(writer, correlation, struct.pack(">hi", error, 1)
                               + struct.pack(">h", len(mechs)) + mechs)
                if error:
                    return False
            elif api_key == SASL_AUTHENTICATE:
                payload = _auth_bytes(body, version)
                if first is None:
                    first = payload.split(b",", 2)[2]  # drop the gs2 header "n,,"
                    attrs = _attributes(first)
                    user = attrs.get("n", "")
                    if user not in self.users:
                        self.failed_logins += 1
                        await _auth_response(writer, correlation, version,
                                             SASL_AUTHENTICATION_FAILED,
                                             "Authentication failed: unknown user", b"")
                        return False
                    salt = self.users[user][0]
                    nonce = attrs["r"] + base64.b64encode(os.urandom(18)).decode()
                    server_first = (f"r={nonce},s={base64.b64encode(salt).decode()},"
                                    f"i={_ITERATIONS}").encode()
                    await _auth_response(writer, correlation, version, 0, None, server_first)
                    continue
                attrs = _attributes(payload)
                _, stored_key, server_key = self.users[_attributes(first)["n"]]
                without_proof = payload[:payload.rindex(b",p=")]
                auth_message = first + b"," + server_first + b"," + without_proof
                signature = self._hmac(stored_key, auth_message)
                proof = base64.b64decode(attrs.get("p", ""))
                client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=False))
                if attrs.get("r") != nonce or self.hash(client_key).digest() != stored_key:
                    self.failed_logins += 1
                    await _auth_response(writer, correlation, version,
                                         SASL_AUTHENTICATION_FAILED,
                                         "Authentication failed: invalid credentials", b"")
                    return False
                verifier = base64.b64encode(self._hmac(server_key, auth_message))
                await _auth_response(writer, correlation, version, 0, None, b"v=" + verifier)
                self.logins += 1
                return True
            else:  # a broker that requires SASL answers nothing before the login
                return False


def _attributes(message: bytes) -> dict[str, str]:
    return dict(part.split("=", 1) for part in message.decode().split(",") if "=" in part)


async def _read_frame(reader: asyncio.StreamReader) -> bytes | None:
    try:
        (size,) = struct.unpack(">i", await reader.readexactly(4))
        return await reader.readexactly(size)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


def _uvarint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _compact(data: bytes) -> bytes:
    """Compact (flexible-version) bytes: unsigned varint of length + 1, then the bytes."""
    n, out = len(data) + 1, bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out) + data


def _parse_request(frame: bytes) -> tuple[int, int, int, bytes]:
    """(api key, version, correlation id, body) of a request (header v1, or v2 for the
    flexible SaslAuthenticate v2)."""
    api_key, version, correlation, client_len = struct.unpack_from(">hhih", frame)
    pos = 10 + max(client_len, 0)
    if api_key == SASL_AUTHENTICATE and version >= 2:
        tags, pos = _uvarint(frame, pos)
        assert tags == 0, "tagged fields in a request header"
    return api_key, version, correlation, frame[pos:]


def _auth_bytes(body: bytes, version: int) -> bytes:
    if version >= 2:  # compact bytes
        length, pos = _uvarint(body, 0)
        return body[pos:pos + length - 1]
    (length,) = struct.unpack_from(">i", body)
    return body[4:4 + length]


async def _respond(writer: asyncio.StreamWriter, correlation: int, body: bytes,
                   flexible: bool = False) -> None:
    header = struct.pack(">i", correlation) + (b"\x00" if flexible else b"")
    writer.write(struct.pack(">i", len(header) + len(body)) + header + body)
    await writer.drain()


async def _auth_response(writer: asyncio.StreamWriter, correlation: int, version: int,
                         error: int, message: str | None, auth: bytes) -> None:
    if version >= 2:
        text = b"\x00" if message is None else _compact(message.encode())
        body = struct.pack(">h", error) + text + _compact(auth) + struct.pack(">q", 0) + b"\x00"
        await _respond(writer, correlation, body, flexible=True)
        return
    text = struct.pack(">h", -1) if message is None else (
        struct.pack(">h", len(message.encode())) + message.encode())
    body = struct.pack(">h", error) + text + struct.pack(">i", len(auth)) + auth
    if version >= 1:
        body += struct.pack(">q", 0)  # session lifetime: no re-authentication
    await _respond(writer, correlation, body)
