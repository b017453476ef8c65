"""Bearer-token authentication for everything under /v1.

Tokens come only from the environment, read once at start-up:
`METERLINE_API_TOKENS` (comma-separated) and/or `METERLINE_API_TOKENS_FILE`
(one per line, `#` comments). Several tokens may be valid at once, so a
token can be rotated without downtime. A presented token is compared with
*every* configured token by `hmac.compare_digest`, with no early exit, so
the time taken says nothing about which token (or which prefix) matched.
Tokens are never logged, echoed in errors, or put in settings.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from pathlib import Path

from meterline.config import ConfigError

TOKENS_ENV = "METERLINE_API_TOKENS"
TOKENS_FILE_ENV = "METERLINE_API_TOKENS_FILE"
# Short tokens can be guessed; refuse to start with one.
MIN_TOKEN_LENGTH = 16
CHALLENGE = 'Bearer realm="meterline"'


def load_tokens(env: Mapping[str, str]) -> tuple[bytes, ...]:
    """The configured tokens; ConfigError (naming the variable, never the token) if none or weak."""
    found: list[tuple[str, str]] = [
        (TOKENS_ENV, t.strip()) for t in env.get(TOKENS_ENV, "").split(",") if t.strip()]
    if path := env.get(TOKENS_FILE_ENV):
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"{TOKENS_FILE_ENV}: cannot read {path}: {exc.strerror}") from None
        found += [(TOKENS_FILE_ENV, line.strip()) for line in text.splitlines()
                  if line.strip() and not line.lstrip().startswith("#")]
    if not found:
        raise ConfigError(f"no API tokens: set {TOKENS_ENV} (comma-separated) or {TOKENS_FILE_ENV}")
    for n, (source, token) in enumerate(found, 1):
        if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token) or not token.isascii():
            raise ConfigError(f"{source}: token #{n} must be at least {MIN_TOKEN_LENGTH} printable "
                              "ASCII characters without spaces")
    return tuple(dict.fromkeys(t.encode() for _, t in found))


class TokenChecker:
    """Answers whether an Authorization header carries one of the configured tokens."""

    def __init__(self, tokens: tuple[bytes, ...]) -> None:
        if not tokens:
            raise ValueError("at least one token is needed")
        self._tokens = tokens

    def check(self, authorization: str | None) -> str | None:
        """None when authorised, else the failure: "missing" or "invalid"."""
        if not authorization:
            return "missing"
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return "missing"
        candidate = presented.strip().encode("utf-8", "replace")
        matched = False
        for token in self._tokens:  # every token, always: no early exit
            matched |= hmac.compare_digest(candidate, token)
        return None if matched else "invalid"
