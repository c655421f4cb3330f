"""The node's supervision of its data server processes, one per ``--data-dir``.

Data servers run in their own session so that a crash of the node (control plane) does not
take the data path down with it: a restarted node adopts the data servers still running and
starts the ones that are not.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from cargohold.config import DATASERVER_MODULES, DataServerConfig, TlsFiles
from cargohold.errors import DataServerStartFailed

log = logging.getLogger(__name__)

START_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0
READY_FILE = "process.json"


class DataServerProcess:
    def __init__(self, path: Path, host: str, log_file: Path, tls: TlsFiles | None = None,
                 cluster_key: Path | None = None, node: str = "") -> None:
        """``tls``, ``cluster_key``, ``node``: as in ``DataServerConfig`` (None: plaintext,
        no capabilities)."""
        self.path = path.absolute()
        self.host = host
        self.tls = tls
        self.cluster_key = cluster_key
        self.node = node
        self.log_file = log_file
        self.ready_file = self.path / READY_FILE
        self.info: dict[str, Any] = {}
        self._child: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    @property
    def pid(self) -> int:
        return int(self.info.get("pid", 0))

    def adopt_or_start(self) -> None:
        try:
            info = json.loads(self.ready_file.read_text())
        except (OSError, ValueError):
            info = {}
        if info and self._is_ours(int(info.get("pid", 0))):
            self.info = info
            if (info.get("tls", False), info.get("guarded", False)) == (
                    self.tls is not None, self.cluster_key is not None):
                log.info("adopted data server %s (pid %d) at %s", info["id"], self.pid,
                         self.path)
                return
            log.warning("data server %s (pid %d) at %s runs with other security settings "
                        "(TLS %s, capabilities %s): restarting it", info["id"], self.pid,
                        self.path, info.get("tls", False), info.get("guarded", False))
            self.stop()
        self.start()

    def start(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.ready_file.unlink(missing_ok=True)
        argv = DataServerConfig(root=self.path, host=self.host, port=0,
                                ready_file=self.ready_file, tls=self.tls,
                                cluster_key=self.cluster_key, node=self.node).argv()
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as out:
            self._child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                           stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while not self.ready_file.exists():
            exited = self._child.poll() is not None
            if exited or time.monotonic() > deadline:
                self._child.kill()
                self._child.wait()
                raise DataServerStartFailed(
                    path=str(self.path), log=str(self.log_file),
                    detail=f"it exited with status {self._child.returncode}" if exited
                    else f"not ready after {START_TIMEOUT:.0f} s")
            time.sleep(0.02)
        self.info = json.loads(self.ready_file.read_text())
        log.info("started data server %s (pid %d) at %s on %s", self.info["id"], self.pid,
                 self.path, self.info["address"])

    def alive(self) -> bool:
        if self._child is not None and self._child.pid == self.pid:
            return self._child.poll() is None
        return self._is_ours(self.pid)

    def _is_ours(self, pid: int) -> bool:
        if pid <= 0:
            return False
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return (any(m.encode() in cmdline for m in DATASERVER_MODULES)
                and str(self.path).encode() in cmdline and state != "Z")

    def stop(self) -> None:
        if not self.alive():
            return
        os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while self.alive():
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
            time.sleep(0.02)
        if self._child is not None:
            self._child.wait()
        self.ready_file.unlink(missing_ok=True)
