"""Bearer tokens: loading from env and file, and the check itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from meterline.api.auth import TokenChecker, load_tokens
from meterline.config import ConfigError, load_settings

A = "a" * 16
B = "b-token-0123456789"


def test_tokens_from_the_variable_and_the_file_together(tmp_path: Path) -> None:
    file = tmp_path / "tokens"
    file.write_text(f"# comment\n{B}\n\n  {A}  \n")
    assert load_tokens({"METERLINE_API_TOKENS": f" {A} ,", "METERLINE_API_TOKENS_FILE": str(file)}
                       ) == (A.encode(), B.encode())


@pytest.mark.parametrize(("env", "fragment"), [
    ({}, "no API tokens"),
    ({"METERLINE_API_TOKENS": " , "}, "no API tokens"),
    ({"METERLINE_API_TOKENS": "short"}, "token #1 must be at least 16"),
    ({"METERLINE_API_TOKENS": f"{A},tøken-with-non-ascii"}, "token #2"),
    ({"METERLINE_API_TOKENS_FILE": "/nonexistent/tokens"}, "cannot read"),
])
def test_missing_or_weak_tokens_stop_start_up_without_showing_them(
        env: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_tokens(env)
    assert fragment in str(err.value)
    assert "short" not in str(err.value).replace("shorter", "")


def test_token_variables_are_not_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERLINE_API_TOKENS", A)
    monkeypatch.setenv("METERLINE_API_TOKENS_FILE", "/x")
    monkeypatch.setenv("METERLINE_API__PORT", "9999")
    settings = load_settings(None)
    assert settings.api.port == 9999
    assert A not in settings.model_dump_json()


@pytest.mark.parametrize(("header", "result"), [
    (None, "missing"),
    ("", "missing"),
    ("Bearer", "missing"),
    ("Bearer    ", "missing"),
    (f"Basic {A}", "missing"),
    (f"Bearer {A}", None),
    (f"bearer {B}", None),
    (f"Bearer {A}a", "invalid"),
    (f"Bearer {A[:-1]}", "invalid"),
    ("Bearer ünïcode", "invalid"),
])
def test_check(header: str | None, result: str | None) -> None:
    assert TokenChecker((A.encode(), B.encode())).check(header) == result
