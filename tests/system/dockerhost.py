"""A real dockerd (Debian's docker.io) with its own data-root, exec-root and socket."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

from tests.conftest import stop_process, unmount_under

BUSYBOX = "/bin/busybox"
IMAGE = "cargohold-test/busybox"
APPLETS = ["sh", "cat", "echo", "sleep", "ls", "date", "sync", "wc", "seq", "dd", "test",
           "true", "tail", "head", "hostname", "grep", "mkdir", "rm", "touch"]


def busybox_rootfs(rootfs: Path) -> Path:
    """A tarball of a static busybox with its applets: what ``docker import`` makes an image
    of (no registry here). Made once per path."""
    if not rootfs.exists():
        with tarfile.open(rootfs, "w") as tar:
            tar.add(BUSYBOX, arcname="bin/busybox")
            for applet in APPLETS:
                info = tarfile.TarInfo(f"bin/{applet}")
                info.type = tarfile.SYMTYPE
                info.linkname = "busybox"
                tar.addfile(info)
            for d in ("data", "tmp", "proc", "sys", "dev", "etc"):
                info = tarfile.TarInfo(d)
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
    return rootfs


class DockerHost:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.data_root = base / "data"
        self.exec_root = base / "exec"
        self.socket = base / "docker.sock"
        self.pidfile = base / "docker.pid"
        self.log = base / "dockerd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["DOCKER_HOST"] = f"unix://{self.socket}"
        env["DOCKER_SERVICE_PREFER_OFFLINE_IMAGE"] = "1"
        env.pop("DOCKER_CONTEXT", None)
        return env

    def start(self, timeout: float = 30.0) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        argv = ["dockerd", "--data-root", str(self.data_root), "--exec-root",
                str(self.exec_root), "-H", f"unix://{self.socket}", "--pidfile",
                str(self.pidfile), "--storage-driver", "overlay2", "--iptables=false",
                "--ip-masq=false", "--ip-forward=false", "--bridge=none"]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                         env={**self.env, "TMPDIR": str(self.base)},
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while self.docker("version", check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dockerd did not start:\n{self.logs()}")
            time.sleep(0.1)

    def docker(self, *args: str, check: bool = True,
               timeout: float = 120) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["docker", *args], capture_output=True, text=True, env=self.env,
                              timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} failed ({done.returncode}):\n"
                                 f"{done.stdout}{done.stderr}")
        return done

    def import_busybox(self, tag: str = "1") -> str:
        rootfs = busybox_rootfs(self.base / "rootfs.tar")
        image = f"{IMAGE}:{tag}"
        self.docker("import", "--change", 'CMD ["/bin/sh"]', str(rootfs), image)
        return image

    def logs(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop dockerd and everything it started; unmount what it mounted."""
        if self.proc is not None and self.proc.poll() is None:
            self.docker("swarm", "leave", "--force", check=False, timeout=30)
            ids = self.docker("ps", "-aq", check=False).stdout.split()
            if ids:
                self.docker("rm", "-f", *ids, check=False)
            stop_process(self.proc)
        for proc in Path("/proc").iterdir():  # containerd and shims live on after dockerd
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if str(self.base).encode() in cmdline:
                try:
                    os.kill(int(proc.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        unmount_under(self.base)
        shutil.rmtree(self.base, ignore_errors=True)
