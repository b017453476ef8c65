"""Stripe webhook signing secrets: from the environment only, never from YAML, never logged.

Several secrets may be active at once: when a secret is rolled in the Stripe dashboard,
Stripe signs with both the old and the new one for a while (the header then carries
several `v1=` entries), so the bridge accepts a signature made with any configured one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from meterline.config import ConfigError

SECRETS_ENV = "STRIPE_WEBHOOK_SECRETS"
SECRETS_FILE_ENV = "STRIPE_WEBHOOK_SECRETS_FILE"


class SigningSecrets:
    """The HMAC keys signatures are checked against; `repr` never shows them."""

    __slots__ = ("_keys",)

    def __init__(self, secrets: Iterable[str]) -> None:
        # Surrounding whitespace is a copy-paste accident, never part of a Stripe secret.
        keys = tuple(dict.fromkeys(s.strip().encode() for s in secrets if s.strip()))
        if not keys:
            raise ConfigError(
                f"no Stripe webhook signing secret: set {SECRETS_ENV} (comma-separated) "
                f"or {SECRETS_FILE_ENV} (a file with one secret per line)"
            )
        self._keys = keys

    @property
    def keys(self) -> tuple[bytes, ...]:
        return self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"SigningSecrets(<{len(self._keys)} redacted>)"

    __str__ = __repr__


def resolve_signing_secrets(environ: Mapping[str, str]) -> SigningSecrets:
    """The secrets named by `environ` (pass `os.environ`); ConfigError naming the variable if none.

    Exactly one of the two variables may be set: silently merging both would keep
    accepting a secret someone meant to retire.
    """
    inline, path = environ.get(SECRETS_ENV, ""), environ.get(SECRETS_FILE_ENV, "")
    if inline.strip() and path.strip():
        raise ConfigError(f"set {SECRETS_ENV} or {SECRETS_FILE_ENV}, not both")
    if path.strip():
        try:
            lines = Path(path.strip()).read_text().splitlines()
        except OSError as exc:
            # The OS error names the path and the reason, never the file's content.
            raise ConfigError(f"{SECRETS_FILE_ENV}: cannot read: {exc}") from exc
        return SigningSecrets(line for line in lines if not line.lstrip().startswith("#"))
    return SigningSecrets(inline.split(","))
