"""The alert rules shipped for Prometheus pass ``promtool check rules`` and their own unit
tests (``promtool test rules``: each alert fires on what it is about, after its ``for``,
and not on healthy series)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"

pytestmark = pytest.mark.skipif(shutil.which("promtool") is None,
                                reason="needs promtool (Debian's prometheus)")


def _promtool(*args: str) -> str:
    done = subprocess.run(["promtool", *args], cwd=RULES, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_rules_are_valid() -> None:
    assert "SUCCESS: 11 rules found" in _promtool("check", "rules", "alerts.yml")


def test_the_rules_fire_as_their_tests_say() -> None:
    assert "SUCCESS" in _promtool("test", "rules", "alerts_test.yml")
