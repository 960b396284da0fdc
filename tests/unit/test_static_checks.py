"""ruff and mypy over the tree, as pyproject.toml configures them ([tool.ruff],
[tool.mypy]), so CI runs both through the README's test command. Each test fails with
the tool's own report; it skips only where the tool is not installed (the `test` extra
installs both, pinned)."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    pytest.importorskip(tool, reason=f"{tool} is not installed (pip install -e '.[test]')")
    return subprocess.run([sys.executable, "-m", tool, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)


def test_ruff_reports_nothing() -> None:
    result = _run("ruff", "check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_reports_nothing() -> None:
    # trio-typing (a libp2p dependency) ships stubs for an old trio; PEP 561 prefers them
    # to trio's own inline types, and mypy then rejects current trio APIs
    stale = Path(sysconfig.get_paths()["purelib"]) / "trio-stubs"
    assert not stale.exists(), f"{stale} shadows trio's own types: ./scripts/setup-venv removes it"
    result = _run("mypy", "--cache-dir", str(ROOT / ".mypy_cache"))
    assert result.returncode == 0, result.stdout + result.stderr
