"""What a local user who is not root can do to an attached volume: nothing."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import Node, needs_root

pytestmark = [needs_root(), pytest.mark.system]

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def _options(mountpoint: str) -> set[str]:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[1] == mountpoint:
            return set(fields[3].split(","))
    raise AssertionError(f"{mountpoint} is not mounted")


def test_only_root_opens_a_volume_and_its_files_are_never_setuid_or_devices(node: Node) -> None:
    node.cli("volume", "create", "sec", "--size", "64M")
    mountpoint = node.cli("volume", "attach", "sec").stdout.strip()
    fuse = node.state / "engines" / "sec" / "fuse"
    # The state directory is root's alone; the FUSE mount itself must refuse too, whatever
    # the directories above it allow: look at it through a path anyone may walk.
    view = Path(tempfile.mkdtemp(prefix="cargohold-view-"))
    view.chmod(0o755)
    subprocess.run(["mount", "--bind", str(fuse), str(view)], check=True)
    try:
        listed = subprocess.run([*NOBODY, "ls", "-ln", str(view)], capture_output=True,
                                text=True, check=True)
        assert "volume" in listed.stdout  # the file is visible ...
        for mode in ("rb", "r+b"):  # ... but opens for root only
            refused = subprocess.run(
                [*NOBODY, sys.executable, "-c", f"open({str(view / 'volume')!r}, {mode!r})"],
                capture_output=True, text=True)
            assert refused.returncode != 0 and "Permission denied" in refused.stderr, \
                refused.stderr
        with open(view / "volume", "rb") as f:  # root still reads it
            assert len(f.read(4096)) == 4096
    finally:
        subprocess.run(["umount", str(view)], check=True)
        view.rmdir()
    assert {"nosuid", "nodev"} <= _options(mountpoint)
    assert {"nosuid", "nodev"} <= _options(str(fuse))
    node.cli("volume", "detach", "sec")
