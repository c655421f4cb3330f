"""Shared fixtures: a real cargohold node on this machine, driven through its CLI."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cargohold.core import wire
from cargohold.stores import pki
from cargohold.stores.diskstore import DiskChunkStore

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("CARGOHOLD_HOST", None)
    env.pop("CARGOHOLD_TOKEN", None)
    return env


def plain_hello(address: str) -> bytes:
    """What a data server at ``address`` answers a HELLO frame sent on a plain TCP socket
    (a stranger without TLS): everything it sends until it closes."""
    host, port = address.rsplit(":", 1)
    received = b""
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(wire.encode_request_header(wire.Op.HELLO, 1, ""))
        try:
            while chunk := sock.recv(4096):
                received += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    return received


def credentials(base: Path, name: str, hosts: tuple[str, ...] = ()) -> tuple[str, str]:
    """``--tls-dir`` of node ``name`` of the cluster whose CA lives in ``base/pki`` (made on
    first use): nodes sharing a metadata store must share a CA and cluster key, as deployed
    (``cargohold pki init`` once, ``pki issue`` per node; ``hosts``: its addresses)."""
    authority, out = base / "pki", base / "tls" / name
    if not (authority / "ca.key").exists():
        pki.init_authority(authority)
    if not out.exists():
        pki.issue(authority, name, out, hosts)
    return "--tls-dir", str(out)


class Node:
    """One ``cargohold node`` process with its own state, data dirs and API socket."""

    def __init__(self, base: Path, data_servers: int = 3, name: str = "node1",
                 extra: tuple[str, ...] = (), env: dict[str, str] | None = None,
                 umask: int = -1) -> None:
        self.base = base
        self.umask = umask  # the node's umask (-1: this process's)
        self.extra = list(extra)
        self.env = env or {}
        self.name = name
        self.state = base / "state"
        self.socket = base / "api.sock"
        self.data_dirs = [base / f"disk{i}" for i in range(1, data_servers + 1)]
        self.log = base / "node.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    #: How to run cargohold: the source tree's (a Debian package's node replaces it)
    program = [sys.executable, "-m", "cargohold.cli"]

    def command(self) -> list[str]:
        """The node's command line."""
        argv = [*self.program, "node", "--name", self.name, "--state-dir", str(self.state),
                "--api", self.host]
        if "--docker-socket" not in self.extra:
            argv += ["--docker-socket", "none"]
        for d in self.data_dirs:
            argv += ["--data-dir", str(d)]
        return argv + self.extra

    def environment(self) -> dict[str, str]:
        return {**_env(), **self.env}

    def start(self, timeout: float = 30.0) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT,
                                         env=self.environment(), umask=self.umask)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited early:\n{self.logs()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"node not ready in {timeout}s:\n{self.logs()}")
            if self._accepting():  # httpx leaks the socket of a refused unix connect
                try:
                    with httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket))) as c:
                        if c.get("http://n/readyz").status_code == 200:
                            return
                except httpx.TransportError:
                    pass
            time.sleep(0.05)

    def _accepting(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(self.socket))
            except OSError:
                return False
        return True

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        """SIGKILL the node process only (its data servers and engines keep running)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([*self.program, "--host", self.host, *args],
                              capture_output=True, text=True, env=self.environment(),
                              timeout=300)
        if check and done.returncode != 0:
            raise AssertionError(f"cargohold {' '.join(args)} failed ({done.returncode}):\n"
                                 f"{done.stdout}{done.stderr}\n--- node log ---\n"
                                 f"{self.logs()}")
        return done

    def json(self, *args: str) -> object:
        return json.loads(self.cli(*args, "-o", "json").stdout)

    def logs(self) -> str:
        parts = []
        for path in [self.log, *sorted(self.state.glob("logs/*.log")),
                     *sorted(self.state.glob("engines/*/engine.log"))]:
            try:
                parts.append(f"== {path.name}\n{path.read_text(errors='replace')[-4000:]}")
            except OSError:
                pass
        return "\n".join(parts)

    def dataserver_pids(self) -> list[int]:
        pids = []
        for d in self.data_dirs:
            try:
                pids.append(int(json.loads((d / "process.json").read_text())["pid"]))
            except (OSError, ValueError, KeyError):
                pass
        return pids

    def cleanup(self) -> None:
        """Stop everything this node started, even after a failed test."""
        self.stop()
        for pid in self.dataserver_pids() + self.engine_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        # find the loop devices first: once the FUSE mount under them is gone, their backing
        # file no longer reads as a path under base
        loops = loops_under(self.base)
        unmount_under(self.base)
        detach_loops(loops)

    def engine_pids(self) -> list[int]:
        pids = []
        for pid_file in self.state.glob("engines/*/engine.pid"):
            try:
                pids.append(int(pid_file.read_text()))
            except (OSError, ValueError):
                pass
        return [p for p in pids if Path(f"/proc/{p}").exists()]


def loops_under(base: Path) -> list[str]:
    """The loop devices whose backing file lies under ``base``."""
    loops = []
    for loop in Path("/sys/block").glob("loop*"):
        try:
            backing = (loop / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue
        if backing.startswith(str(base)):
            loops.append(f"/dev/{loop.name}")
    return loops


def unmount_under(base: Path) -> None:
    """Unmount everything mounted under ``base`` (and ``base`` itself), deepest first."""
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()
              if line.split()[1].startswith(str(base))]
    for target in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True, check=False)


def detach_loops(loops: list[str]) -> None:
    for device in loops:
        subprocess.run(["losetup", "-d", device], capture_output=True, check=False)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tcp_node(base: Path, tokens: str, *extra: str) -> tuple[Node, int]:
    """A node (not started) with two data servers and, besides its unix socket, an HTTPS API
    on a free port taking the named tokens ``tokens`` (lines ``NAME ROLE SECRET``)."""
    port = free_port()
    base.mkdir(parents=True, exist_ok=True)
    tokens_file = base / "tokens"
    tokens_file.write_text(tokens)
    tokens_file.chmod(0o600)
    node = Node(base / "n", data_servers=2,
                extra=("--api", f"tcp://127.0.0.1:{port}", "--tokens-file", str(tokens_file),
                       *extra))
    node.base.mkdir()
    return node, port


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds; waits for the end either way."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def write_random(path: Path, total: int, piece: int = 4 << 20) -> str:
    """Write ``total`` random bytes to ``path`` with fsync; return their sha256."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(total // piece):
            data = os.urandom(piece)
            f.write(data)
            digest.update(data)
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest()


def compare_on_disk(volume: dict[str, Any]) -> None:
    """The two replicas' chunk files hold the same generations and the same bytes (chunk by
    chunk; read while the node is stopped)."""
    stores = [DiskChunkStore(Path(r["path"])) for r in volume["replicas"]]
    try:
        first, second = (s.replica(volume["id"]) for s in stores)
        assert first.generations() == second.generations()
        for offset in range(0, volume["size"], 16 * MIB):
            assert first.read(offset, 16 * MIB) == second.read(offset, 16 * MIB), offset
    finally:
        for store in stores:
            store.close()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class LiveWriter:
    """An application that keeps writing 4 KiB blocks into one file with fsync after each,
    in a thread, and remembers every block whose fsync returned (acknowledged)."""

    BLOCKS = 1024  # a 4 MiB file

    def __init__(self, path: Path) -> None:
        self.path = path
        self.acked: dict[int, bytes] = {}
        self.writes = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LiveWriter:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)

    def _run(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                while not self._stop.is_set():
                    block = (self.writes * 37) % self.BLOCKS
                    data = os.urandom(16) * 256
                    os.pwrite(fd, data, block * 4096)
                    os.fsync(fd)
                    self.acked[block] = data
                    self.writes += 1
            finally:
                os.close(fd)
        except BaseException as e:  # the test checks it
            self.error = e

    def verify(self) -> None:
        """Every acknowledged block reads back (through whatever mount ``path`` is on)."""
        self.verify_against(self)

    def verify_against(self, writer: LiveWriter) -> None:
        """Every block ``writer`` got acknowledged reads back from this writer's path (the
        same file, attached again, maybe elsewhere)."""
        assert writer.error is None, f"the writer failed: {writer.error!r}"
        with open(self.path, "rb") as f:
            content = f.read()
        for block, data in writer.acked.items():
            assert content[block * 4096:(block + 1) * 4096] == data, f"block {block}"


def leftovers(base: Path) -> dict[str, list[str]]:
    """Mounts, loop devices and processes under ``base`` that are still there."""
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()
              if line.split()[1].startswith(str(base))]
    loops = [device.removeprefix("/dev/") for device in loops_under(base)]
    procs = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if str(base).encode() in cmdline and b"cargohold" in cmdline:
            procs.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return {"mounts": mounts, "loops": loops, "processes": procs}


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path)
    try:
        n.start()
        yield n
    finally:
        n.cleanup()


def needs_root() -> pytest.MarkDecorator:
    return pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                              reason="needs root and /dev/fuse")
