"""Several "hosts" on this machine: network, mount and uts namespaces on a private switch.

``Hosts(n)`` builds, for one test (names and addresses unique to it, so that parallel runs do
not collide):

* a *switch*: a network namespace ``ch-RUN-sw`` holding a bridge; each host is one veth pair,
  ``eth0`` (10.77.0.N/24) in the host's network namespace, ``hN`` plugged into the bridge.
  The addresses exist only inside namespaces made here; the root namespace gets none.
* per host: a network namespace (``ip netns``), a mount and a uts namespace (kept alive by
  binding them onto files under ``BASE/ns``, so they outlive the host's processes), a tmpfs
  over ``/run`` and ``/etc/docker`` in it, the host's plugin directory bound to
  ``/run/docker/plugins`` and its own hostname (``h1``, ``h2``, ...). Everything of a host
  runs in these namespaces (entered with ``nsenter``) and in one cgroup of its own
  (``ch-RUN/hN``; dockerd puts its containers below it with ``--cgroup-parent``).
* on every host: an etcd member (one three-member cluster across the hosts), a
  ``cargohold node`` (one data dir, ``--metadata etcds://`` of all members, the Docker plugin
  socket in the host's plugin directory, a short ``--lease-ttl``) and, if asked, a dockerd.
* ``Hosts(n, clusters=k)`` splits the hosts into ``k`` cargohold clusters instead (hosts
  1..n/k the first, and so on): each with its own etcd cluster, CA and cluster key, and
  every node also serves its API on ``https://ADDRESS:7480`` taking the token
  ``REMOTE_TOKEN`` (what another cluster's ``remote add`` uses, with ``Host.ca``).

``Host.kill()`` kills the host as a power cut would: it freezes everything of the host (its
cgroup, which holds the containers' cgroups, and every process in its network namespace,
with their descendants: containerd, shims, cargohold's engines and data servers live in
sessions of their own), stopping processes until the set stops changing, takes its link
down, then SIGKILLs them all. A dead machine does not answer: its address stays silent
instead of refusing connections. ``cut_network()``/``restore_network()`` only unplug and
replug the cable.

``Hosts.close()`` removes everything, whatever state the test left: processes, mounts inside
the mount namespaces (volume, FUSE, overlay), loop devices, namespaces, veths, cgroups and the
temporary directory. This follows ../shared/MEASURED.md ("Several Docker hosts with Swarm on
one machine").
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import credentials
from tests.etcdcluster import show_past_capture
from tests.system.dockerhost import BUSYBOX, busybox_rootfs

ROOT = Path(__file__).resolve().parent.parent
ETCD = os.environ.get("CARGOHOLD_ETCD", "/usr/bin/etcd")
SUBNET = "10.77.0"
IMAGE = "cargohold-hosts/busybox:1"
CGROUP = Path("/sys/fs/cgroup")
CGROUP_V2 = (CGROUP / "cgroup.controllers").exists()
#: The nodes' --lease-ttl (seconds) unless a test asks for another.
LEASE_TTL_DEFAULT = 3.0
#: With several clusters: each node's HTTPS API port and its admin token.
API_PORT = 7480
REMOTE_TOKEN = "remote-admin-0123456789abcdef"


def missing_binaries(docker: bool = False) -> list[str]:
    """The programs this harness needs that are not installed (empty: all there)."""
    need = ["ip", "nsenter", "unshare", "curl", "losetup", "mount", "umount"]
    if docker:
        need += ["dockerd", "docker", "containerd"]
    missing = [b for b in need if shutil.which(b) is None]
    if not os.access(ETCD, os.X_OK):
        missing.append(ETCD)
    if docker and not os.path.exists(BUSYBOX):
        missing.append(BUSYBOX)
    return missing


def skip_reason(docker: bool = False) -> str | None:
    """Why the harness cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/dev/fuse"):
        return "needs /dev/fuse"
    missing = missing_binaries(docker)
    if missing:
        return "needs " + ", ".join(missing) + " (scripts/install-deps.sh --test)"
    return None


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    for key in ("CARGOHOLD_HOST", "CARGOHOLD_TOKEN", "DOCKER_HOST", "DOCKER_CONTEXT"):
        env.pop(key, None)
    return env


def _sh(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr}")
    return done


def wait_for(predicate: Callable[[], object], timeout: float, what: str,
             interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned); AssertionError after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# -- processes ----------------------------------------------------------------------------

def _ppids() -> dict[int, int]:
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        out[int(proc.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def _with_descendants(pids: set[int]) -> set[int]:
    ppids = _ppids()
    result = set(pids)
    grew = True
    while grew:
        grew = False
        for pid, ppid in ppids.items():
            if ppid in result and pid not in result:
                result.add(pid)
                grew = True
    return result


def _signal(pids: set[int], sig: int) -> None:
    for pid in pids:
        if pid in (os.getpid(), 1):
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


class Cgroup:
    """The host's cgroup: freezer (cgroup v1) or the unified hierarchy (v2). Processes of the
    host go to ``procs_dir``; dockerd's ``--cgroup-parent`` is ``parent``."""

    def __init__(self, rel: str) -> None:
        self.rel = rel  # e.g. "ch-RUN/h1"
        if CGROUP_V2:
            self.top = CGROUP / rel
            self.procs_dir = self.top / "sys"  # no processes in inner nodes (v2 rule)
            self.parent = f"/{rel}/docker"
        else:
            self.top = CGROUP / "freezer" / rel
            self.procs_dir = self.top
            self.parent = f"/{rel}"

    def create(self) -> None:
        self.procs_dir.mkdir(parents=True, exist_ok=True)

    @property
    def procs_file(self) -> str:
        return str(self.procs_dir / "cgroup.procs")

    def pids(self) -> set[int]:
        pids: set[int] = set()
        if not self.top.exists():
            return pids
        for procs in self.top.rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                pids.update(int(p) for p in procs.read_text().split())
        return pids

    def freeze(self, frozen: bool) -> None:
        with contextlib.suppress(OSError):
            if CGROUP_V2:
                (self.top / "cgroup.freeze").write_text("1" if frozen else "0")
            else:
                (self.top / "freezer.state").write_text("FROZEN" if frozen else "THAWED")

    def kill_all(self) -> None:
        if CGROUP_V2:
            with contextlib.suppress(OSError):
                (self.top / "cgroup.kill").write_text("1")
        _signal(self.pids(), signal.SIGKILL)

    def remove_children(self) -> None:
        """Remove the cgroup directories below the host's (killed containers leave them), in
        every hierarchy."""
        for top in _hierarchy_dirs(self.rel):
            for d in sorted((p for p in top.rglob("*") if p.is_dir()),
                            key=lambda p: len(p.parts), reverse=True):
                if d != self.procs_dir:
                    with contextlib.suppress(OSError):
                        d.rmdir()


def _hierarchy_dirs(rel: str) -> list[Path]:
    if CGROUP_V2:
        return [CGROUP / rel] if (CGROUP / rel).exists() else []
    return [h / rel for h in CGROUP.iterdir() if (h / rel).is_dir()]


def _rmtree_cgroup(rel: str) -> None:
    for top in _hierarchy_dirs(rel):
        for d in sorted((p for p in [top, *top.rglob("*")] if p.is_dir()),
                        key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                d.rmdir()


# -- one host ---------------------------------------------------------------------------

def _loops(prefix: list[str] | None = None) -> list[tuple[str, str, str]]:
    """(device, backing MAJ:MIN, backing file) of every loop device, as seen by ``prefix``
    (e.g. nsenter into a mount namespace)."""
    done = subprocess.run([*(prefix or []), "losetup", "-l", "-n", "-O",
                           "NAME,BACK-MAJ:MIN,BACK-FILE"], capture_output=True, text=True,
                          timeout=30, check=False)
    out = []
    for line in done.stdout.splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3:
            out.append((parts[0], parts[1], parts[2].strip()))
    return out


class Host:
    """One host: its namespaces, cgroup, etcd member, cargohold node and dockerd."""

    def __init__(self, hosts: Hosts, index: int) -> None:
        self.hosts = hosts
        self.index = index
        self.cluster = (index - 1) * hosts.clusters // hosts.n  # which cargohold cluster
        self.name = f"h{index}"
        self.ip = f"{SUBNET}.{index}"
        self.base = hosts.base / self.name
        self.netns = f"{hosts.prefix}-{self.name}"
        self.mnt_ns = hosts.base / "ns" / f"{self.name}.mnt"
        self.uts_ns = hosts.base / "ns" / f"{self.name}.uts"
        self.cgroup = Cgroup(f"{hosts.prefix}/{self.name}")
        self.plugins = self.base / "plugins"
        self.state = self.base / "state"
        self.data_dirs = [self.base / "disk1"]
        self.api_socket = self.base / "api.sock"
        self.etcd_dir = self.base / "etcd"
        self.docker_dir = self.base / "docker"
        self.docker_socket = self.base / "docker.sock"
        self.etcd: subprocess.Popen[bytes] | None = None
        self.node: subprocess.Popen[bytes] | None = None
        self.dockerd: subprocess.Popen[bytes] | None = None
        self.started: list[subprocess.Popen[bytes]] = []  # every popen, reaped at destroy
        self.killed = False

    # -- entering the host

    def argv(self, argv: list[str]) -> list[str]:
        """``argv`` run in this host's cgroup and namespaces."""
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', self.cgroup.procs_file,
                "nsenter", f"--net=/run/netns/{self.netns}", f"--mount={self.mnt_ns}",
                f"--uts={self.uts_ns}", "--", *argv]

    def run(self, *argv: str, check: bool = True, timeout: float = 30, input: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command in the host; AssertionError with its output if it fails."""
        done = subprocess.run(self.argv(list(argv)), capture_output=True, text=True,
                              timeout=timeout, input=input, env=env or _env())
        if check and done.returncode != 0:
            raise AssertionError(f"[{self.name}] {' '.join(argv)} failed ({done.returncode}):"
                                 f"\n{done.stdout}{done.stderr}")
        return done

    def popen(self, argv: list[str], log: Path, env: dict[str, str] | None = None,
              **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start a long-running command in the host, its output appended to ``log``."""
        with open(log, "ab") as out:
            proc = subprocess.Popen(self.argv(argv), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env or _env(), **kwargs)
        self.started.append(proc)
        return proc

    # -- building

    def create(self) -> None:
        """Namespaces, link, cgroup, /run and /etc/docker tmpfs, plugin dir, hostname."""
        for d in (self.base, self.plugins, self.state, self.etcd_dir, self.docker_dir,
                  *self.data_dirs):
            d.mkdir(parents=True, exist_ok=True)
        self.cgroup.create()
        _sh("ip", "netns", "add", self.netns)
        _sh("ip", "link", "add", "eth0", "netns", self.netns, "type", "veth",
            "peer", "name", self.name, "netns", self.hosts.switch)
        _sh("ip", "-n", self.hosts.switch, "link", "set", self.name, "master", "br0", "up")
        _sh("ip", "-n", self.netns, "addr", "add", f"{self.ip}/24", "dev", "eth0")
        _sh("ip", "-n", self.netns, "link", "set", "lo", "up")
        _sh("ip", "-n", self.netns, "link", "set", "eth0", "up")
        self.mnt_ns.touch()
        self.uts_ns.touch()
        setup = (f"umount -l {self.hosts.base}/ns && mount -t tmpfs tmpfs /run && "
                 "mkdir -p /run/docker/plugins && "
                 f"mount --bind {self.plugins} /run/docker/plugins && "
                 "mount -t tmpfs tmpfs /etc/docker && "
                 f"hostname {self.name}")
        _sh("nsenter", f"--net=/run/netns/{self.netns}", "unshare", f"--mount={self.mnt_ns}",
            f"--uts={self.uts_ns}", "--propagation", "slave", "sh", "-c", setup)

    @property
    def tls(self) -> Path:
        """This host's credentials from the hosts' cluster CA (its node's and its etcd
        member's: the certificate names the host and its address)."""
        return Path(credentials(self.hosts.trust(self), self.name, (self.ip,))[1])

    @property
    def ca(self) -> Path:
        """The CA certificate of this host's cluster (its API's certificate is under it)."""
        return self.tls / "ca.crt"

    @property
    def api_url(self) -> str:
        """This node's HTTPS API (with several clusters)."""
        return f"https://{self.ip}:{API_PORT}"

    def start_etcd(self, initial_cluster: str, state: str = "new") -> None:
        ca, cert, key = (str(self.tls / f) for f in ("ca.crt", "node.crt", "node.key"))
        argv = [
            ETCD, "--name", self.name, "--data-dir", str(self.etcd_dir / "data"),
            "--listen-client-urls", f"https://{self.ip}:2379",
            "--advertise-client-urls", f"https://{self.ip}:2379",
            "--listen-peer-urls", f"https://{self.ip}:2380",
            "--initial-advertise-peer-urls", f"https://{self.ip}:2380",
            "--initial-cluster", initial_cluster, "--initial-cluster-state", state,
            "--initial-cluster-token", f"{self.hosts.prefix}-c{self.cluster}",
            "--logger", "zap", "--log-outputs", "stderr", "--enable-v2=false",
            # TLS with certificates of the cluster CA, both for clients and between members
            "--cert-file", cert, "--key-file", key, "--trusted-ca-file", ca,
            "--client-cert-auth", "--peer-cert-file", cert, "--peer-key-file", key,
            "--peer-trusted-ca-file", ca, "--peer-client-cert-auth",
        ]  # fmt: skip
        self.etcd = self.popen(argv, self.base / "etcd.log")

    def _curl(self) -> list[str]:
        return ["curl", "-sf", "-m", "1", "--cacert", str(self.tls / "ca.crt"), "--cert",
                str(self.tls / "node.crt"), "--key", str(self.tls / "node.key")]

    def etcd_healthy(self) -> bool:
        done = self.run(*self._curl(), f"https://{self.ip}:2379/health", check=False)
        try:
            return done.returncode == 0 and json.loads(done.stdout).get("health") == "true"
        except ValueError:
            return False

    def etcd_is_leader(self) -> bool:
        done = self.run(*self._curl(), "-X", "POST", "-d", "{}",
                        f"https://{self.ip}:2379/v3/maintenance/status", check=False)
        try:
            body = json.loads(done.stdout)
            return bool(body["header"]["member_id"] == body["leader"])
        except (ValueError, KeyError):
            return False

    def kill_etcd(self) -> None:
        """SIGKILL this host's etcd member only (its data dir stays)."""
        if self.etcd is not None and self.etcd.poll() is None:
            self.etcd.kill()
            self.etcd.wait()

    def start_node(self) -> None:
        argv = [sys.executable, "-m", "cargohold.cli", "node", "--name", self.name,
                "--state-dir", str(self.state), "--metadata", self.hosts.metadata_url_from(self),
                "--api", f"unix://{self.api_socket}", "--data-host", self.ip,
                "--docker-socket", str(self.plugins / "cargohold.sock"),
                "--lease-ttl", str(self.hosts.lease_ttl),
                *credentials(self.hosts.trust(self), self.name, (self.ip,))]
        if self.hosts.clusters > 1:
            tokens = self.base / "tokens"
            tokens.write_text(f"remote admin {REMOTE_TOKEN}\n")
            tokens.chmod(0o600)
            argv += ["--api", f"tcp://{self.ip}:{API_PORT}", "--tokens-file", str(tokens)]
        for d in self.data_dirs:
            argv += ["--data-dir", str(d)]
        self.node = self.popen(argv, self.base / "node.log")

    def node_ready(self) -> bool:
        if self.node is not None and self.node.poll() is not None:
            raise RuntimeError(f"node {self.name} exited:\n{self.logs()}")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(self.api_socket))
            except OSError:
                return False
        try:
            with httpx.Client(transport=httpx.HTTPTransport(uds=str(self.api_socket))) as c:
                return c.get("http://n/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def start_dockerd(self) -> None:
        d = self.docker_dir
        argv = ["dockerd", "--data-root", str(d / "data"), "--exec-root", str(d / "exec"),
                "-H", f"unix://{self.docker_socket}", "--pidfile", str(d / "docker.pid"),
                "--storage-driver", "overlay2", "--iptables=false", "--ip-masq=false",
                "--ip-forward=false", "--bridge=none", "--cgroup-parent", self.cgroup.parent]
        env = {**_env(), "TMPDIR": str(d), "DOCKER_SERVICE_PREFER_OFFLINE_IMAGE": "1"}
        self.dockerd = self.popen(argv, self.base / "dockerd.log", env=env)

    def docker_ready(self) -> bool:
        if self.dockerd is not None and self.dockerd.poll() is not None:
            raise RuntimeError(f"dockerd of {self.name} exited:\n{self.logs()}")
        return self.docker("version", check=False, timeout=10).returncode == 0

    # -- using it

    def cli(self, *args: str, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``cargohold --host <this host's node> ARGS`` (run inside the host)."""
        done = self.run(sys.executable, "-m", "cargohold.cli", "--host",
                        f"unix://{self.api_socket}", *args, check=False, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"[{self.name}] cargohold {' '.join(args)} failed "
                                 f"({done.returncode}):\n{done.stdout}{done.stderr}\n"
                                 f"--- logs ---\n{self.logs()}")
        return done

    def json(self, *args: str, timeout: float = 120) -> Any:
        return json.loads(self.cli(*args, "-o", "json", timeout=timeout).stdout)

    def docker(self, *args: str, check: bool = True,
               timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {**_env(), "DOCKER_HOST": f"unix://{self.docker_socket}",
               "DOCKER_SERVICE_PREFER_OFFLINE_IMAGE": "1"}
        done = self.run("docker", *args, check=False, timeout=timeout, env=env)
        if check and done.returncode != 0:
            raise AssertionError(f"[{self.name}] docker {' '.join(args)} failed "
                                 f"({done.returncode}):\n{done.stdout}{done.stderr}")
        return done

    def import_busybox(self) -> None:
        rootfs = busybox_rootfs(self.hosts.base / "rootfs.tar")
        self.docker("import", "--change", 'CMD ["/bin/sh"]', str(rootfs), IMAGE)

    def mountpoint(self, volume: str) -> str:
        return str(self.state / "mounts" / volume)

    def mounted(self, volume: str) -> bool:
        """Whether ``volume`` is mounted in this host (its mount namespace)."""
        target = self.mountpoint(volume)
        done = self.run("cat", "/proc/self/mounts", check=False, timeout=10)
        return any(line.split()[1] == target for line in done.stdout.splitlines()
                   if len(line.split()) > 1)

    def read(self, path: str, timeout: float = 10) -> str:
        """A file's text as this host sees it."""
        return self.run("cat", path, timeout=timeout).stdout

    def engine_log(self, volume: str) -> str:
        try:
            return (self.state / "engines" / volume / "engine.log").read_text(errors="replace")
        except OSError:
            return ""

    # -- failures

    def netns_pids(self) -> set[int]:
        """Processes in this host's network namespace."""
        try:
            ino = os.stat(f"/run/netns/{self.netns}").st_ino
        except OSError:
            return set()
        pids = set()
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                with contextlib.suppress(OSError):
                    if os.stat(proc / "ns" / "net").st_ino == ino:
                        pids.add(int(proc.name))
        return pids

    def pids(self) -> set[int]:
        """Everything of this host: its cgroup (with the containers'), its network namespace,
        and their descendants."""
        return _with_descendants(self.cgroup.pids() | self.netns_pids())

    def kill(self) -> float:
        """Kill the host like a power cut; returns time.monotonic() of the moment it froze."""
        self.cgroup.freeze(True)
        t = time.monotonic()
        stopped: set[int] = set()
        for _ in range(50):  # SIGSTOP until the set stops changing (forks in flight)
            pids = self.pids() - stopped
            if not pids:
                break
            _signal(pids, signal.SIGSTOP)
            stopped |= pids
        self.cut_network()
        for _ in range(50):
            pids = self.pids()
            if not pids:
                break
            _signal(pids, signal.SIGKILL)
            self.cgroup.kill_all()
            self.cgroup.freeze(False)  # frozen tasks die once thawed
            time.sleep(0.05)
        else:
            raise RuntimeError(f"processes of {self.name} survive SIGKILL: {self.pids()}")
        for proc in (self.etcd, self.node, self.dockerd):
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
        self.cgroup.remove_children()
        self.killed = True
        return t

    def cut_network(self) -> None:
        """Unplug the host's cable (its switch port goes down)."""
        _sh("ip", "-n", self.hosts.switch, "link", "set", self.name, "down")

    def restore_network(self) -> None:
        _sh("ip", "-n", self.hosts.switch, "link", "set", self.name, "up")

    def logs(self, limit: int = 4000) -> str:
        parts = []
        for path in [self.base / "node.log", *sorted(self.state.glob("logs/*.log")),
                     *sorted(self.state.glob("engines/*/engine.log")),
                     self.base / "etcd.log", self.base / "dockerd.log"]:
            with contextlib.suppress(OSError):
                parts.append(f"== {self.name}/{path.name}\n"
                             f"{path.read_text(errors='replace')[-limit:]}")
        return "\n".join(parts)

    # -- cleanup

    def destroy(self) -> list[str]:
        """Kill and remove everything of the host; returns the problems met (if any)."""
        problems = []
        try:
            self.kill()
        except Exception as exc:  # keep going: the rest must be removed anyway
            problems.append(f"kill {self.name}: {exc}")
        loops = []
        if self.mnt_ns.exists():  # volume, FUSE, overlay and docker mounts in the namespace
            # Loop devices over the host's FUSE files: only inside the namespace does their
            # backing file have its full path (outside, or once unmounted, it is "/volume").
            for name, dev, path in _loops(["nsenter", f"--mount={self.mnt_ns}"]):
                if path.startswith(str(self.hosts.base)):
                    loops.append(name)
                    self.hosts.loop_backing.add(dev)
            done = subprocess.run(["nsenter", f"--mount={self.mnt_ns}", "cat",
                                   "/proc/self/mounts"], capture_output=True, text=True,
                                  timeout=30, check=False)
            targets = [line.split()[1] for line in done.stdout.splitlines()
                       if line.split()[1].startswith(str(self.hosts.base))]
            for target in sorted(targets, key=len, reverse=True):
                subprocess.run(["nsenter", f"--mount={self.mnt_ns}", "umount", "-l", target],
                               capture_output=True, timeout=30, check=False)
        for name in loops:
            subprocess.run(["losetup", "-d", name], capture_output=True, timeout=30, check=False)
        for ns in (self.mnt_ns, self.uts_ns):
            subprocess.run(["umount", "-l", str(ns)], capture_output=True, timeout=30,
                           check=False)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True, timeout=30,
                       check=False)
        _rmtree_cgroup(self.cgroup.rel)
        for proc in self.started:  # killed above: reap them (no zombies, no warnings)
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                problems.append(f"{self.name}: pid {proc.pid} did not exit")
        return problems


def hosts_for(request: pytest.FixtureRequest, docker: bool,
              configure: Callable[[Hosts], None] | None = None, n: int = 3,
              clusters: int = 1) -> Iterator[Hosts]:
    """``n`` started hosts (in ``clusters`` cargohold clusters) for one test (a fixture's
    body): skipped when a binary is missing, failed instead under CI; the logs shown when
    the test fails; everything removed after, and checked to be gone. ``configure``: changes
    before the start (e.g. a host without data servers)."""
    reason = skip_reason(docker)
    if reason and os.environ.get("CI"):
        pytest.fail(f"CI must run this: {reason}")  # .ci/run installs everything it needs
    if reason:
        pytest.skip(reason)
    hosts = Hosts(n, docker=docker, lease_ttl=LEASE_TTL_DEFAULT, clusters=clusters)
    if configure is not None:
        configure(hosts)
    failed_before = request.session.testsfailed
    try:
        hosts.start()
        yield hosts
    finally:
        if request.session.testsfailed > failed_before or sys.exc_info()[0] is not None:
            show_past_capture(request, f"\n--- logs of {request.node.nodeid} ---\n{hosts.logs()}\n")
        problems = hosts.close()
        left = hosts.leftovers()
    assert problems == []
    assert all(v == [] for v in left.values()), left


class Hosts:
    """``n`` hosts on a private switch (see the module docstring). Use as a context manager
    or call ``start()`` and, always, ``close()``."""

    def __init__(self, n: int = 3, *, docker: bool = False,
                 lease_ttl: float = LEASE_TTL_DEFAULT,
                 base: Path | None = None, clusters: int = 1) -> None:
        self.run_id = secrets.token_hex(3)
        self.prefix = f"ch-{self.run_id}"
        self.base = base or Path(tempfile.mkdtemp(prefix=f"{self.prefix}-", dir="/tmp"))
        self.switch = f"{self.prefix}-sw"
        self.docker = docker
        self.lease_ttl = lease_ttl
        self.n, self.clusters = n, clusters
        self.hosts = [Host(self, i) for i in range(1, n + 1)]
        self.swarm_manager: Host | None = None
        #: MAJ:MIN of the FUSE files the hosts' loop devices were over (to find leftovers)
        self.loop_backing: set[str] = set()

    def __getitem__(self, index: int) -> Host:
        return self.hosts[index]

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts)

    def __len__(self) -> int:
        return len(self.hosts)

    @property
    def initial_cluster(self) -> str:
        return ",".join(f"{h.name}=https://{h.ip}:2380" for h in self.hosts)

    @property
    def metadata_url(self) -> str:
        return "etcds://" + ",".join(f"{h.ip}:2379" for h in self.hosts)

    def cluster_of(self, host: Host) -> list[Host]:
        """The hosts of ``host``'s cargohold cluster."""
        return [h for h in self.hosts if h.cluster == host.cluster]

    def initial_cluster_of(self, host: Host) -> str:
        return ",".join(f"{h.name}=https://{h.ip}:2380" for h in self.cluster_of(host))

    def trust(self, host: Host) -> Path:
        """Where ``host``'s cluster keeps its CA (one per cluster)."""
        return self.base if self.clusters == 1 else self.base / f"cluster{host.cluster}"

    def metadata_url_from(self, host: Host) -> str:
        """The etcd endpoints with ``host``'s own member first: a node talks to its local
        member, as deployed, so one host cut off does not stall every node's requests."""
        others = [h for h in self.cluster_of(host) if h is not host]
        return "etcds://" + ",".join(f"{h.ip}:2379" for h in [host, *others])

    def start(self, timeout: float = 60) -> None:
        ns_dir = self.base / "ns"
        ns_dir.mkdir(parents=True, exist_ok=True)
        _sh("mount", "--bind", str(ns_dir), str(ns_dir))
        _sh("mount", "--make-private", str(ns_dir))
        _sh("ip", "netns", "add", self.switch)
        _sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", self.switch, "link", "set", "br0", "up")
        for h in self.hosts:
            h.create()
        for h in self.hosts:
            h.start_etcd(self.initial_cluster_of(h))
        wait_for(lambda: all(h.etcd_healthy() for h in self.hosts), timeout, "etcd healthy")
        for h in self.hosts:
            h.start_node()
            if self.docker:
                h.start_dockerd()
        wait_for(lambda: all(h.node_ready() for h in self.hosts), timeout, "nodes ready")
        if self.docker:
            wait_for(lambda: all(h.docker_ready() for h in self.hosts), timeout,
                     "dockerd ready", interval=0.2)
            for h in self.hosts:
                h.import_busybox()
                h.docker("volume", "ls")  # Swarm lists a legacy plugin once dockerd used it

    def swarm(self, heartbeat: str = "1s") -> Host:
        """A Swarm with the first host as its (only) manager; returns the manager."""
        manager = self.hosts[0]
        manager.docker("swarm", "init", "--advertise-addr", manager.ip,
                       "--listen-addr", f"{manager.ip}:2377")
        manager.docker("swarm", "update", "--dispatcher-heartbeat", heartbeat)
        token = manager.docker("swarm", "join-token", "-q", "worker").stdout.strip()
        for h in self.hosts[1:]:
            h.docker("swarm", "join", "--token", token, "--advertise-addr", h.ip,
                     f"{manager.ip}:2377")
        wait_for(lambda: manager.docker("node", "ls", "--format", "{{.Status}}")
                 .stdout.split().count("Ready") == len(self.hosts), 60, "swarm nodes ready")
        self.swarm_manager = manager
        return manager

    def alive(self) -> list[Host]:
        return [h for h in self.hosts if not h.killed]

    def logs(self) -> str:
        return "\n".join(h.logs() for h in self.hosts)

    def leftovers(self) -> dict[str, list[str]]:
        """What of this run is still there (all lists empty after close())."""
        netns = [n for n in _sh("ip", "netns", "list", check=False).stdout.split()
                 if n.startswith(self.prefix)]
        mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()
                  if str(self.base) in line.split()[1]]
        loops = [name for name, dev, path in _loops()  # "/volume": its FUSE mount is gone
                 if str(self.base) in path or (dev in self.loop_backing and path == "/volume")]
        procs = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                with contextlib.suppress(OSError):
                    cmdline = (proc / "cmdline").read_bytes()
                    if str(self.base).encode() in cmdline:
                        procs.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
        cgroups = [str(d) for h in self.hosts for d in _hierarchy_dirs(h.cgroup.rel)]
        cgroups += [str(d) for d in _hierarchy_dirs(self.prefix)]
        return {"netns": netns, "mounts": mounts, "loops": loops, "processes": procs,
                "cgroups": cgroups, "dirs": [str(self.base)] if self.base.exists() else []}

    def close(self) -> list[str]:
        """Remove everything; returns the problems met. Idempotent."""
        problems: list[str] = []
        for h in self.hosts:
            problems += h.destroy()
        for name, _dev, path in _loops():  # what Host.destroy() could not see
            if str(self.base) in path:
                subprocess.run(["losetup", "-d", name], capture_output=True, timeout=30,
                               check=False)
        subprocess.run(["ip", "netns", "del", self.switch], capture_output=True, timeout=30,
                       check=False)
        for target in sorted((line.split()[1] for line in
                              Path("/proc/self/mounts").read_text().splitlines()
                              if line.split()[1].startswith(str(self.base))),
                             key=len, reverse=True):
            subprocess.run(["umount", "-l", target], capture_output=True, timeout=30,
                           check=False)
        _rmtree_cgroup(self.prefix)
        shutil.rmtree(self.base, ignore_errors=True)
        return problems

    def __enter__(self) -> Hosts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def hosts_running(n: int = 3, *, docker: bool = False,
                  lease_ttl: float = LEASE_TTL_DEFAULT,
                  on_failure: Callable[[str], None] | None = None) -> Iterator[Hosts]:
    """Started ``Hosts``; closed whatever happens. ``on_failure`` gets the logs if the body or
    the start raised."""
    hosts = Hosts(n, docker=docker, lease_ttl=lease_ttl)
    try:
        hosts.start()
        yield hosts
    except BaseException:
        if on_failure is not None:
            on_failure(hosts.logs())
        raise
    finally:
        hosts.close()


# -- the failover scenario (tests/system/test_failover.py and benchmarks/failover_bench.py)

#: A writer: a marker file, then a counter appended and fsync'd (``sync FILE``: busybox and
#: coreutils both fsync the file) every 50 ms; ``acked`` names the last line whose fsync
#: returned. Lines carry a token per start, so a restarted writer's counter cannot stand in
#: for the first one's. ``$D`` is the volume's directory. SIGTERM ends it (a shell as PID 1
#: of a container ignores it otherwise, and ``docker service rm`` waits 10 s).
WRITER = ("trap 'exit 0' TERM; read t < /proc/sys/kernel/random/uuid; "
          "[ -f $D/file ] || { echo seed > $D/file; sync $D/file; }; i=0; "
          "while :; do i=$((i+1)); echo \"$t $i\" >> $D/log; "
          "sync $D/log && echo \"$t $i\" > $D/acked; sleep 0.05; done")


@dataclass
class Failover:
    """What one failover run saw."""

    mode: str
    killed: str = ""
    new_host: str = ""
    #: seconds from the kill to the volume mounted on the new host
    mounted_after: float = 0.0
    #: Swarm only: seconds from the kill to the new task running
    running_after: float | None = None
    acked: int = 0  # the last counter value acknowledged (fsync returned) before the kill
    lost: list[int] = field(default_factory=list)  # acknowledged values missing afterwards
    seed_ok: bool = False
    phases: dict[str, float] = field(default_factory=dict)


def acked(host: Host, volume: str) -> tuple[str, int] | None:
    """(token, counter) of the writer's last acknowledged line, read through ``host``'s
    mount."""
    done = host.run("cat", f"{host.mountpoint(volume)}/acked", check=False, timeout=10)
    parts = done.stdout.split()
    return (parts[0], int(parts[1])) if done.returncode == 0 and len(parts) == 2 else None


def task_host(manager: Host, hosts: Hosts, service: str) -> Host | None:
    """The host whose task of ``service`` is running, if exactly one is."""
    out = manager.docker("service", "ps", service, "--filter", "desired-state=running",
                         "--format", "{{.Node}} {{.CurrentState}}", check=False).stdout
    running = [line.split()[0] for line in out.splitlines() if " Running " in f" {line} "]
    if len(running) != 1:
        return None
    return next(h for h in hosts if h.name == running[0])


def _check(result: Failover, host: Host, volume: str, token: str) -> None:
    mount = host.mountpoint(volume)
    result.seed_ok = host.read(f"{mount}/file").strip() == "seed"
    seen = {int(n) for t, n in (line.split() for line in host.read(f"{mount}/log").splitlines()
                                if len(line.split()) == 2) if t == token}
    result.lost = sorted(set(range(1, result.acked + 1)) - seen)


def swarm_failover(hosts: Hosts, heartbeat: str = "1s", volume: str = "v",
                   min_writes: int = 20) -> Failover:
    """The seed scenario: a one-replica Swarm service on a worker writes and fsyncs a counter
    on a cargohold volume; its host is killed; Swarm restarts the task on the other worker.
    Needs ``Hosts(docker=True)`` (three hosts: h1 manager, two workers)."""
    result = Failover("swarm")
    t = time.monotonic()
    manager = hosts.swarm_manager or hosts.swarm(heartbeat)
    result.phases["swarm"] = time.monotonic() - t
    service = f"writer-{volume}"
    manager.docker(
        "service", "create", "--detach", "--name", service, "--replicas", "1",
        "--restart-delay", "0s", "--no-resolve-image", "--endpoint-mode", "dnsrr",
        "--constraint", "node.role==worker",  # a killed Swarm leader costs 15-24 s
        "--env", "D=/data",
        "--mount", f"type=volume,source={volume},target=/data,volume-driver=cargohold,"
        "volume-opt=size=256M,volume-opt=replicas=2",
        IMAGE, "sh", "-c", WRITER)
    first: Host = wait_for(lambda: task_host(manager, hosts, service), 90, "the task")
    if first is manager:
        raise AssertionError("the task runs on the Swarm manager despite its constraint")
    wait_for(lambda: (a := acked(first, volume)) is not None and a[1] >= min_writes, 60,
             f"{min_writes} acknowledged writes")
    result.phases["task started"] = time.monotonic() - t
    token, result.acked = acked(first, volume)  # type: ignore[misc]
    killed_at = first.kill()
    result.killed = first.name
    [other] = [h for h in hosts.alive() if h is not manager]
    result.new_host = other.name
    wait_for(lambda: other.mounted(volume), 90, f"{volume} mounted on {other.name}",
             interval=0.05)
    result.mounted_after = time.monotonic() - killed_at
    wait_for(lambda: task_host(manager, hosts, service) is other, 60, "the new task")
    result.running_after = time.monotonic() - killed_at
    _check(result, other, volume, token)
    manager.docker("service", "rm", service)
    wait_for(lambda: other.json("volume", "inspect", volume)["state"] == "detached", 60,
             f"{volume} released")
    result.phases["released"] = time.monotonic() - t
    result.phases["total"] = time.monotonic() - t
    return result


@dataclass
class PlannedMove:
    """What one planned move of a Swarm service with its volume saw (seconds)."""

    source: str = ""
    target: str = ""
    baseline: float = 0.0  # a service without a volume moved the same way: Swarm's own cost
    prepare: float = 0.0  # ``volume move --to TARGET --wait``: the replica made there
    moved: float = 0.0  # service update -> the new task running on the target
    mounted: float = 0.0  # service update -> the volume mounted on the target
    acked: int = 0  # the writer's last acknowledged counter before the update
    lost: list[int] = field(default_factory=list)
    seed_ok: bool = False
    local: bool = False  # a replica of the volume on the target when it was mounted there


def _move_service(manager: Host, hosts: Hosts, service: str, source: Host,
                  target: Host) -> None:
    manager.docker("service", "update", "--detach", "--constraint-rm",
                   f"node.hostname=={source.name}", "--constraint-add",
                   f"node.hostname=={target.name}", service)


def swarm_planned_move(hosts: Hosts, heartbeat: str = "1s", volume: str = "pm",
                       min_writes: int = 20) -> PlannedMove:
    """A one-replica Swarm service writing and fsyncing a counter on a cargohold volume runs
    on worker h2; a replica is prepared on h3 (``volume move --to h3 --wait``); the service
    is moved there with ``docker service update --constraint-add node.hostname==h3``.
    Swarm's own cost is measured first with a service without a volume moved the same way.
    Needs ``Hosts(docker=True)``."""
    result = PlannedMove()
    manager = hosts.swarm_manager or hosts.swarm(heartbeat)
    source, target = hosts[1], hosts[2]
    result.source, result.target = source.name, target.name
    common = ["--detach", "--replicas", "1", "--restart-delay", "0s", "--no-resolve-image",
              "--endpoint-mode", "dnsrr", "--constraint", f"node.hostname=={source.name}"]
    manager.docker("service", "create", "--name", "idle", *common, IMAGE, "sh", "-c",
                   "trap 'exit 0' TERM; while :; do sleep 0.05; done")  # stops as the writer
    wait_for(lambda: task_host(manager, hosts, "idle") is source, 90, "the idle task")
    t = time.monotonic()
    _move_service(manager, hosts, "idle", source, target)
    wait_for(lambda: task_host(manager, hosts, "idle") is target, 90, "the idle task moved",
             interval=0.05)
    result.baseline = time.monotonic() - t
    manager.docker("service", "rm", "idle")

    service = f"writer-{volume}"
    manager.docker(
        "service", "create", "--name", service, *common, "--env", "D=/data",
        "--mount", f"type=volume,source={volume},target=/data,volume-driver=cargohold,"
        "volume-opt=size=256M,volume-opt=replicas=2",
        IMAGE, "sh", "-c", WRITER)
    wait_for(lambda: task_host(manager, hosts, service) is source, 90, "the writer's task")
    wait_for(lambda: (a := acked(source, volume)) is not None and a[1] >= min_writes, 60,
             f"{min_writes} acknowledged writes")
    # locality may be moving a replica to the source meanwhile: let it finish first
    wait_for(lambda: not any(r["replaces"] or r["state"] != "in_sync" for r in
                             manager.json("volume", "inspect", volume)["replicas"]), 120,
             f"{volume}'s replicas settled")
    t = time.monotonic()
    manager.cli("volume", "move", volume, "--to", target.name, "--wait", timeout=300)
    result.prepare = time.monotonic() - t
    token, _ = acked(source, volume)  # type: ignore[misc]
    t = time.monotonic()
    _move_service(manager, hosts, service, source, target)
    # the old task stops (the writer's last acknowledged line is then final)
    wait_for(lambda: not source.mounted(volume), 90, f"{volume} released by {source.name}",
             interval=0.05)
    wait_for(lambda: target.mounted(volume), 90, f"{volume} mounted on {target.name}",
             interval=0.05)
    result.mounted = time.monotonic() - t
    view = target.json("volume", "inspect", volume)
    result.local = any(r["node"] == target.name and r["state"] == "in_sync"
                       for r in view["replicas"])
    wait_for(lambda: task_host(manager, hosts, service) is target, 60, "the moved task",
             interval=0.05)
    result.moved = time.monotonic() - t
    # acknowledged on the source: every value up to the last one there is in the log
    last = _last_acked_by(target, volume, token)
    failover = Failover("planned", acked=last)
    _check(failover, target, volume, token)
    result.acked, result.lost, result.seed_ok = last, failover.lost, failover.seed_ok
    manager.docker("service", "rm", service)
    wait_for(lambda: target.json("volume", "inspect", volume)["state"] == "detached", 60,
             f"{volume} released")
    return result


def _last_acked_by(host: Host, volume: str, token: str) -> int:
    """The highest counter the first writer (``token``) had acknowledged, as read now."""
    for line in reversed(host.read(f"{host.mountpoint(volume)}/log").splitlines()):
        parts = line.split()
        if len(parts) == 2 and parts[0] == token:
            return int(parts[1])
    return 0


def attach_failover(hosts: Hosts, volume: str = "v", min_writes: int = 20) -> Failover:
    """The scenario without Swarm: attach on h2 with the same writer in a shell there, kill
    h2, attach on h3 as soon as it is allowed (polling ``volume attach``)."""
    result = Failover("attach")
    t = time.monotonic()
    a, b = hosts[1], hosts[2]
    a.cli("volume", "create", volume, "--size", "256M", "--replicas", "2")
    mount = a.cli("volume", "attach", volume).stdout.strip()
    a.popen(["sh", "-c", WRITER], a.base / f"writer-{volume}.log",
            env={**_env(), "D": mount})
    wait_for(lambda: (x := acked(a, volume)) is not None and x[1] >= min_writes, 60,
             f"{min_writes} acknowledged writes")
    token, result.acked = acked(a, volume)  # type: ignore[misc]
    killed_at = a.kill()
    result.killed, result.new_host = a.name, b.name

    def attach() -> bool:
        done = b.cli("volume", "attach", volume, check=False, timeout=60)
        if done.returncode not in (0, 4):
            raise AssertionError(f"attach on {b.name}: {done.stderr}")
        return done.returncode == 0

    wait_for(attach, 90, f"attach on {b.name}", interval=0.05)
    result.mounted_after = time.monotonic() - killed_at
    _check(result, b, volume, token)
    b.cli("volume", "detach", volume)
    result.phases["total"] = time.monotonic() - t
    return result
