"""The repository keeps its promises: lint clean, README commands, CI entry point."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(r"```sh\n(.+?)\n```", text)[:2]


def test_ruff_is_clean() -> None:
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--quiet", str(REPO)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_is_clean() -> None:
    proc = subprocess.run([sys.executable, "-m", "mypy"], cwd=REPO,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_readme_opens_with_demo_and_test_commands() -> None:
    demo, tests = _readme_commands()
    assert demo == "./scripts/bootstrap && .venv/bin/python -m bench.demo"
    assert tests == "./scripts/bootstrap && .venv/bin/python -m pytest"


def test_ci_runs_exactly_the_readme_test_command() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    extracted = subprocess.run(
        ["awk", "/<!-- test-command -->/ {getline; while ($0 ~ /^```/) getline; print; exit}",
         str(REPO / "README.md")], capture_output=True, text=True, check=True).stdout.strip()
    assert extracted == _readme_commands()[1]
    assert "test-command" in ci and 'bash -c "$cmd"' in ci


def test_demo_runs() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.demo"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "Hello from headquarters" in proc.stdout
    assert "Traceback" not in proc.stderr
