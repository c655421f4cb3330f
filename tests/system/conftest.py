"""Fixtures shared by the system tests: artefacts built once per run."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="session")
def debian_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The .deb of this tree, built once per run."""
    out = tmp_path_factory.mktemp("deb")
    done = subprocess.run([str(ROOT / "scripts" / "build-deb.sh"), str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"build-deb.sh failed:\n{done.stdout}{done.stderr}"
    return Path(done.stdout.strip().splitlines()[-1])


def source_of(commit: str, base: Path) -> Path:
    """The tree of ``commit`` in ``base/src`` (git archive): an earlier release to build."""
    source = base / "src"
    source.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit],
                             capture_output=True, check=True, timeout=120)
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive.stdout, check=True)
    return source
