"""Webhook bridge settings and signing secrets: from env only, never shown, clear failures."""

from __future__ import annotations

from pathlib import Path

import pytest

from meterline.config import ConfigError, Settings, load_settings
from meterline.webhooks.publisher import BrokerHealth
from meterline.webhooks.signing_secrets import SigningSecrets, resolve_signing_secrets


def test_defaults() -> None:
    cfg = Settings().webhook_bridge

    assert (cfg.host, cfg.port, cfg.tolerance_seconds, cfg.max_body_bytes,
            cfg.delivery_timeout_ms) == ("0.0.0.0", 8081, 300, 262_144, 5_000)


def test_env_overrides_a_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("METERLINE_CONFIG", raising=False)
    monkeypatch.setenv("METERLINE_WEBHOOK_BRIDGE__PORT", "9000")

    assert load_settings(None).webhook_bridge.port == 9000


def test_a_bad_value_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("webhook_bridge:\n  max_body_bytes: 5000000\n")

    with pytest.raises(ConfigError, match="webhook_bridge.max_body_bytes"):
        load_settings(path)


def test_secrets_are_not_settings() -> None:
    """Secrets never come from YAML: the section refuses the key."""
    with pytest.raises(ValueError, match="extra"):
        Settings.model_validate({"webhook_bridge": {"secrets": ["whsec_x"]}})


def test_comma_separated_secrets_in_order_without_blanks() -> None:
    secrets = resolve_signing_secrets({"STRIPE_WEBHOOK_SECRETS": " whsec_a , whsec_b,,"})

    assert secrets.keys == (b"whsec_a", b"whsec_b")


def test_secrets_file_one_per_line(tmp_path: Path) -> None:
    path = tmp_path / "secrets"
    path.write_text("# rolled 2026-01-02\nwhsec_new\n\nwhsec_old\n")

    secrets = resolve_signing_secrets({"STRIPE_WEBHOOK_SECRETS_FILE": str(path)})

    assert secrets.keys == (b"whsec_new", b"whsec_old")


@pytest.mark.parametrize("environ", [{}, {"STRIPE_WEBHOOK_SECRETS": " , "}],
                         ids=["unset", "only_blanks"])
def test_no_secret_fails_naming_both_variables(environ: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_signing_secrets(environ)

    assert "STRIPE_WEBHOOK_SECRETS" in str(info.value)
    assert "STRIPE_WEBHOOK_SECRETS_FILE" in str(info.value)


def test_both_variables_set_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "secrets"
    path.write_text("whsec_b\n")

    with pytest.raises(ConfigError, match="not both"):
        resolve_signing_secrets({"STRIPE_WEBHOOK_SECRETS": "whsec_a",
                                 "STRIPE_WEBHOOK_SECRETS_FILE": str(path)})


def test_unreadable_secrets_file_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="STRIPE_WEBHOOK_SECRETS_FILE"):
        resolve_signing_secrets({"STRIPE_WEBHOOK_SECRETS_FILE": str(tmp_path / "missing")})


def test_secrets_never_appear_in_repr_or_str() -> None:
    secrets = SigningSecrets(["whsec_topsecret"])

    assert "topsecret" not in repr(secrets)
    assert "topsecret" not in str(secrets)
    assert "topsecret" not in f"{secrets!r} {[secrets]}"


# --- readiness ---------------------------------------------------------------------------

def test_not_ready_before_any_success() -> None:
    assert not BrokerHealth(stale_after_s=6).ready(now=100)


def test_ready_while_the_last_success_is_recent() -> None:
    health = BrokerHealth(stale_after_s=6)
    health.succeeded(100)

    assert health.ready(106)
    assert not health.ready(106.5)


def test_a_failure_outweighs_earlier_successes_until_the_next_one() -> None:
    health = BrokerHealth(stale_after_s=6)
    health.succeeded(100)
    health.failed()

    assert not health.ready(101)
    health.succeeded(102)
    assert health.ready(102)


def test_cli_refuses_to_start_without_a_secret(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from meterline.cli import main

    for name in ("STRIPE_WEBHOOK_SECRETS", "STRIPE_WEBHOOK_SECRETS_FILE", "METERLINE_CONFIG"):
        monkeypatch.delenv(name, raising=False)

    assert main(["webhook-bridge"]) == 2
    assert "STRIPE_WEBHOOK_SECRETS" in capsys.readouterr().err
