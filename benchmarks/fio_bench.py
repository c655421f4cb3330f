#!/usr/bin/env python3
"""fio benchmark of cargohold's data path against the local limit.

Run as root from the repository:  ``python3 benchmarks/fio_bench.py [--quick] [--runs N]``

On one disk (a temporary directory under /var/tmp or /tmp, on the same filesystem as the
repository) it measures, with fio (direct=1, ioengine=libaio):

* ``raw``: a loop device (``--direct-io=on --sector-size 4096``) over a sparse file, with
  ext4 made and mounted exactly as cargohold does it (the local limit);
* ``1 replica`` and ``2 replicas``: a real ``cargohold node`` with two data dirs, a volume
  created, attached (FUSE engine + loop + ext4) and benchmarked through its mountpoint.

Jobs, in this order on one test file: sequential write (lays the file out) and read
(bs=1M, iodepth=16), 4 KiB random write and read (iodepth=32, time based), 4 KiB random
write at iodepth=1 (latency). After the first, ``seqwrite_recycled`` writes as much new
data to a second file (removed after it) right after memory was faulted in and freed
(``recycle_memory``): this VM's host makes fresh page-cache pages cost a fault each, which
the first write pays and a machine with its memory backed would not. For cargohold it also
measures the engine's and the data servers' CPU time (user+sys from /proc/PID/stat, delta
over each job) and peak RSS (VmHWM).

After each write job the file system is synced outside the timed window (``sync -f``: ext4
journal commit, loop flush, FUSE fsync, the replicas' fdatasync) so that the next job does not
pay for it; the time that takes is reported as "sync s" (``--no-settle`` turns this off).

The machine may be shared: before each configuration the script waits (``--wait-quiet``) for
the host to be idle, measures the CPU other processes use during every job, runs a job again
when they used more than 0.25 cores (``--retry-noisy``), and flags what stayed noisy. It also
hashes ``src/`` at the start and end and warns if the code under test changed meanwhile.

With ``--runs N`` every configuration is set up from scratch N times (fresh image or fresh
volume) and the median of the N runs is reported. The table goes to stdout, everything to
``benchmarks/results/<timestamp>.json``. ``--profile`` adds one unmeasured 2-replica random
write job during which py-spy records the engine and the data servers; ``--profile-perf``
records them with ``perf`` instead and prints the CPU share per shared object (kernel,
libpython, uvloop, ...): what a compiled hot path that keeps the system calls could save.

Whatever happens (errors, Ctrl-C, SIGTERM, SIGHUP) the script detaches its volumes, stops its
node (which stops its data servers), unmounts and detaches its loop devices, removes its
temporary directory, and then checks that nothing of it is left.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import json
import mmap
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: The cargohold sources to run (``--src``: e.g. a private copy with an experiment in it).
SRC = ROOT / "src"
RESULTS = ROOT / "benchmarks" / "results"
FIO = shutil.which("fio") or "/usr/bin/fio"
MKFS_EXT4 = ["mkfs.ext4", "-q", "-F", "-m", "1", "-E",
             "nodiscard,lazy_itable_init=1,lazy_journal_init=1"]
MOUNT_OPTIONS = "noinit_itable"
VOLUME_SIZE = "3G"
IMAGE_SIZE = 3 << 30
CLK_TCK = os.sysconf("SC_CLK_TCK")
GIB = 1 << 30
MIB = 1 << 20

CONFIGS = [("raw", "raw", 0), ("r1", "1 replica", 1), ("r2", "2 replicas", 2),
           ("r2enc", "2 encrypted", 2), ("r2tls", "2 remote TLS", 2),
           ("r2plain", "2 remote plain", 2), ("r2nomet", "2, no metrics", 2),
           ("r2ring", "2, FUSE io_uring", 2)]
#: ``r2ring``: as ``r2``, the engine taking FUSE requests over io_uring (the kernel's
#: ``fuse.enable_uring`` is on while it attaches; for every other config it is off).
URING = Path("/sys/module/fuse/parameters/enable_uring")
#: ``r2enc``: as ``r2``, the volume encrypted at rest (``--encrypt``).
#: ``r2nomet``: as ``r2``, on a node whose engines keep no request counts for /metrics
#: (``--no-engine-metrics``): what measuring costs.
#: Configurations whose engine runs on a second node without data servers, so that it reaches
#: both replicas over TCP (as on a host without a replica): with TLS and capabilities (the
#: default) or with ``--insecure-plaintext``. Their ratio is what TLS costs on the data path.
REMOTE = {"r2tls": True, "r2plain": False}
PROFILE_SECONDS = 10
#: A job during which other processes used more CPU than this (cores, on average) is noisy.
NOISY_CORES = 0.25


@dataclass(frozen=True)
class Job:
    name: str
    rw: str
    bs: str
    iodepth: int
    direction: str  # the fio result section: "read" or "write"
    timed: bool  # time_based (random jobs) or passes over the file (sequential jobs)
    loops: int = 1  # passes over the file (sequential jobs)
    #: a file of its own, removed after the job (else fio.dat, which the later jobs use)
    scratch: str = ""
    #: just before the job, fault in and free memory for the page cache to take: see
    #: ``recycle_memory``
    recycled: bool = False


JOBS = [
    Job("seqwrite", "write", "1M", 16, "write", False),
    # the same write of new data, on memory this VM's host still backs (``recycle_memory``)
    Job("seqwrite_recycled", "write", "1M", 16, "write", False,
        scratch="fio-recycled.dat", recycled=True),
    # 8 passes: one pass of the 256 MiB --quick file took ~0.1 s at 2 GB/s, too short to
    # compare two configurations (all passes read what seqwrite left in the page cache)
    Job("seqread", "read", "1M", 16, "read", False, loops=8),
    Job("randwrite", "randwrite", "4k", 32, "write", True),
    Job("randread", "randread", "4k", 32, "read", True),
    Job("randwrite_qd1", "randwrite", "4k", 1, "write", True),
]
METRICS = [("mbps", "MB/s"), ("iops", "IOPS"), ("p50_us", "p50 us"), ("p99_us", "p99 us")]
# issue 6: ratios to raw with 2 replicas
TARGETS = [
    ("seq write MB/s", "seqwrite", "mbps", 0.70),
    ("seq write, recycled memory", "seqwrite_recycled", "mbps", 0.70),
    ("seq read MB/s", "seqread", "mbps", 0.80),
    ("4K rand write IOPS", "randwrite", "iops", 0.30),
    ("4K rand read IOPS", "randread", "iops", 0.50),
]
ENGINE_MEMORY_TARGET_MIB = 256


class Interrupted(BaseException):
    """A termination signal arrived: unwind through every ``finally`` and clean up."""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(argv: list[str], timeout: float = 120.0, check: bool = True,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                          check=False, stdin=subprocess.DEVNULL)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): "
                           f"{(done.stderr or done.stdout).strip()}")
    return done


# --- /proc -----------------------------------------------------------------------------

def cpu_times(pid: int) -> tuple[float, float] | None:
    """(user, sys) CPU seconds of a process (all its threads), or None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK  # utime, stime (14, 15)


def cpu_seconds(pid: int) -> float | None:
    """user+sys CPU seconds of a process, or None if it is gone."""
    times = cpu_times(pid)
    return None if times is None else times[0] + times[1]


def host_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of the whole host, from /proc/stat (iowait counts as idle)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal
    return total - fields[3] - fields[4], total


def proc_status_kib(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _all_cpu() -> dict[int, tuple[float, str]]:
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            head, tail = (proc / "stat").read_text().rsplit(")", 1)
        except OSError:
            continue
        fields = tail.split()
        out[int(proc.name)] = ((int(fields[11]) + int(fields[12])) / CLK_TCK,
                               head.split("(", 1)[1])
    return out


def foreign_cpu(base: str) -> dict[int, tuple[float, str]]:
    """CPU seconds of every user-space process that is not part of this benchmark."""
    out = {}
    for pid, (seconds, name) in _all_cpu().items():
        if pid == os.getpid():
            continue
        cmdline = _cmdline(pid)
        if not cmdline or base.encode() in cmdline:  # kernel threads, or ours
            continue
        out[pid] = (seconds, name)
    return out


def foreign_delta(before: dict[int, tuple[float, str]], after: dict[int, tuple[float, str]],
                  ) -> tuple[float, list[str]]:
    deltas = sorted(((t - before.get(pid, (0.0, ""))[0], pid, name)
                     for pid, (t, name) in after.items()), reverse=True)
    return (sum(d for d, _, _ in deltas if d > 0),
            [f"{name}[{pid}] {d:.1f}s" for d, pid, name in deltas[:3] if d >= 0.05])


def background_load(seconds: float = 1.0) -> tuple[float, list[str]]:
    """Host CPU busy % over ``seconds`` and the busiest processes meanwhile."""
    cpu_before, host_before = _all_cpu(), host_cpu()
    time.sleep(seconds)
    cpu_after, host_after = _all_cpu(), host_cpu()
    busy, total = (a - b for a, b in zip(host_after, host_before, strict=True))
    deltas = sorted(((t - cpu_before[pid][0], pid, name) for pid, (t, name)
                     in cpu_after.items() if pid in cpu_before), reverse=True)
    top = [f"{name}[{pid}] {100 * d / seconds:.0f}%" for d, pid, name in deltas[:3] if d > 0]
    return (100 * busy / total if total else 0.0), top


def mounts_under(base: str) -> list[str]:
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        target = line.split()[1].replace("\\040", " ")
        if target == base or target.startswith(base + "/"):
            out.append(target)
    return out


def loops_under(base: str) -> list[str]:
    out = []
    for loop in Path("/sys/block").glob("loop*"):
        try:
            backing = (loop / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue
        if backing.startswith(base + "/"):
            out.append(f"/dev/{loop.name}")
    return sorted(out)


def processes_under(base: str) -> dict[int, str]:
    """Processes (other than this one) with ``base`` in their command line."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if base.encode() in cmdline and state != "Z":
            found[int(proc.name)] = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
    return found


def leftovers(base: str) -> dict[str, Any]:
    return {"mounts": mounts_under(base), "loops": loops_under(base),
            "processes": [f"{pid} {cmd}" for pid, cmd in processes_under(base).items()],
            "dir_exists": os.path.exists(base)}


# --- fio -------------------------------------------------------------------------------

def fio_argv(job: Job, filename: str, size: str, runtime: int, ramp: int,
             output: str) -> list[str]:
    argv = [FIO, f"--name={job.name}", f"--filename={filename}", f"--rw={job.rw}",
            f"--bs={job.bs}", f"--iodepth={job.iodepth}", f"--size={size}", "--direct=1",
            "--ioengine=libaio", "--numjobs=1", "--output-format=json", f"--output={output}"]
    if job.loops > 1:
        argv.append(f"--loops={job.loops}")
    if job.timed:
        argv += ["--time_based", f"--runtime={runtime}", "--norandommap", "--randrepeat=0"]
        if ramp:
            argv.append(f"--ramp_time={ramp}")
    return argv


def parse_fio(path: str, job: Job) -> dict[str, Any]:
    text = Path(path).read_text()
    data = json.loads(text[text.index("{"):])  # fio may print notes before the JSON
    result = data["jobs"][0]
    if result.get("error"):
        raise RuntimeError(f"fio job {job.name} failed with error {result['error']}")
    side = result[job.direction]
    percentiles = side.get("clat_ns", {}).get("percentile", {})
    return {
        "mbps": side["bw_bytes"] / 1e6,
        "iops": side["iops"],
        "p50_us": percentiles.get("50.000000", 0) / 1000,
        "p99_us": percentiles.get("99.000000", 0) / 1000,
        "io_bytes": side["io_bytes"],
        "total_ios": side["total_ios"],
        "runtime_s": side["runtime"] / 1000,
        "fio_usr_cpu": result.get("usr_cpu"),
        "fio_sys_cpu": result.get("sys_cpu"),
    }


# --- the node --------------------------------------------------------------------------

def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("CARGOHOLD_HOST", None)
    env.pop("CARGOHOLD_TOKEN", None)
    return env


class Node:
    """One ``cargohold node`` with ``disks`` data dirs (two by default), all under ``base``."""

    def __init__(self, base: Path, name: str = "bench", disks: int = 2,
                 extra: tuple[str, ...] = ()) -> None:
        self.base = base
        self.name = name
        self.extra = extra
        self.state = base / "state"
        self.socket = base / "api.sock"
        self.data_dirs = [base / f"disk{i}" for i in range(1, disks + 1)]
        self.log = base / "node.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.attached: set[str] = set()

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout: float = 60.0) -> None:
        argv = [sys.executable, "-m", "cargohold.cli", "node", "--name", self.name,
                "--state-dir", str(self.state), "--api", self.host, *self.extra]
        for d in self.data_dirs:
            argv += ["--data-dir", str(d)]
        node_help = run([sys.executable, "-m", "cargohold.cli", "node", "--help"],
                        env=_env(), check=False).stdout
        if "--docker-socket" in node_help:  # never touch the host's Docker plugin socket
            argv += ["--docker-socket", "none"]
        with open(self.log, "ab") as out:
            # its own session: a Ctrl-C in the terminal reaches us, and we stop the node
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=_env(),
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited early:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"node not ready in {timeout}s:\n{self.tail()}")
            time.sleep(0.05)

    def _ready(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(2)
            try:
                probe.connect(str(self.socket))
                probe.sendall(b"GET /readyz HTTP/1.1\r\nHost: n\r\nConnection: close\r\n\r\n")
                reply = probe.recv(64)
            except OSError:
                return False
        return reply.startswith(b"HTTP/1.1 200")

    def cli(self, *args: str, timeout: float = 300.0) -> str:
        done = run([sys.executable, "-m", "cargohold.cli", "--host", self.host, *args],
                   timeout=timeout, env=_env(), check=False)
        if done.returncode != 0:
            raise RuntimeError(f"cargohold {' '.join(args)} failed ({done.returncode}): "
                               f"{done.stdout}{done.stderr}\n--- logs ---\n{self.tail()}")
        return done.stdout.strip()

    def create(self, name: str, replicas: int, encrypt: bool = False) -> None:
        self.cli("volume", "create", name, "--size", VOLUME_SIZE, "--replicas", str(replicas),
                 *(["--encrypt"] if encrypt else []))

    def attach(self, name: str) -> str:
        self.attached.add(name)
        return self.cli("volume", "attach", name).splitlines()[-1]

    def detach(self, name: str) -> None:
        self.cli("volume", "detach", name)
        self.attached.discard(name)

    def remove(self, name: str) -> None:
        self.cli("volume", "rm", name)

    def engine_pid(self, name: str) -> int:
        return int((self.state / "engines" / name / "engine.pid").read_text())

    def dataserver_pids(self) -> dict[str, int]:
        pids = {}
        for d in self.data_dirs:
            with contextlib.suppress(OSError, ValueError, KeyError):
                pids[d.name] = int(json.loads((d / "process.json").read_text())["pid"])
        return pids

    def replica_servers(self, name: str) -> list[str]:
        """The data dirs (disk1, disk2) holding the volume's replicas."""
        info = json.loads(self.cli("volume", "inspect", name, "-o", "json"))
        paths = {str(r.get("path") or "") for r in info.get("replicas", [])}
        return [d.name for d in self.data_dirs if str(d) in paths or str(d.absolute()) in paths]

    def tail(self, limit: int = 3000) -> str:
        parts = []
        for path in [self.log, *sorted(self.state.glob("logs/*.log")),
                     *sorted(self.state.glob("engines/*/engine.log"))]:
            with contextlib.suppress(OSError):
                parts.append(f"== {path}\n{path.read_text(errors='replace')[-limit:]}")
        return "\n".join(parts)

    def stop(self, timeout: float = 90.0) -> None:
        """Detach what we attached, then SIGTERM the node (it stops its data servers)."""
        for name in sorted(self.attached):
            try:
                self.detach(name)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                log(f"cleanup: detach of {name} failed: {str(e)[:300]}")
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log(f"cleanup: node {self.proc.pid} did not stop in {timeout}s; killing it")
            self.proc.kill()
            self.proc.wait()


# --- the benchmark ---------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.size = args.file_size or ("256M" if args.quick else "1G")
        self.runtime = args.runtime or (5 if args.quick else 20)
        self.ramp = 0 if args.quick else 2
        self.runs = args.runs or (1 if args.quick else 3)
        self.tmp = Path(tempfile.mkdtemp(prefix="cargohold-bench-", dir=args.tmp_parent))
        self.node: Node | None = None
        self.unmetered: Node | None = None  # for r2nomet
        self.uring_before = URING.read_text().strip() if URING.exists() else None
        self.pairs: dict[str, tuple[Node, Node]] = {}  # REMOTE config → (storage, client)
        self.raw_mount: Path | None = None
        self.first_touch: float | None = None  # us per page of fresh memory (main)
        self.raw_loop: str | None = None
        self.stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.profile: dict[str, Any] = {}
        self.background: dict[str, Any] = {}

    # -- one configuration ----------------------------------------------------------------

    def wait_quiet(self, limit: float | None = None) -> dict[str, Any]:
        """Wait (up to --wait-quiet s) until the host is idle; return the load seen."""
        limit = self.args.wait_quiet if limit is None else limit
        deadline = time.monotonic() + limit
        waited = 0.0
        while True:
            busy, top = background_load(1.0)
            if busy <= self.args.quiet_threshold or time.monotonic() >= deadline:
                break
            if waited == 0:
                log(f"  host busy {busy:.0f}% before the jobs ({', '.join(top)}); waiting up "
                    f"to {limit:.0f}s for it to calm down")
            time.sleep(2)
            waited = limit - (deadline - time.monotonic())
        quiet = busy <= self.args.quiet_threshold
        if not quiet:
            log(f"  WARNING: host still {busy:.0f}% busy ({', '.join(top)}); numbers are noisy")
        return {"busy_pct": busy, "top": top, "waited_s": waited, "quiet": quiet}

    def run_jobs(self, directory: Path, engine: int | None,
                 servers: dict[str, int]) -> dict[str, Any]:
        filename = str(directory / "fio.dat")
        jobs: dict[str, Any] = {}
        self.background = self.wait_quiet()
        for job in JOBS:
            best: dict[str, Any] | None = None
            last: dict[str, Any] | None = None
            for attempt in range(1 + self.args.retry_noisy):
                if last is not None:
                    log(f"  {job.name}: other processes used {last['foreign_cores']:.2f} "
                        f"cores meanwhile; running it again ({attempt}/{self.args.retry_noisy})")
                    self.wait_quiet(limit=min(self.args.wait_quiet, 30))
                result = last = self.run_job(job, filename, engine, servers)
                result["attempts"] = attempt + 1
                if best is None or result["foreign_cores"] < best["foreign_cores"]:
                    best = result
                if result["foreign_cores"] <= NOISY_CORES:
                    break
            assert best is not None
            jobs[job.name] = best
        return jobs

    def run_job(self, job: Job, filename: str, engine: int | None,
                servers: dict[str, int]) -> dict[str, Any]:
        if job.direction == "read" and self.args.drop_caches:
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
        output = str(self.tmp / f"fio-{job.name}.json")
        if job.scratch:
            filename = str(Path(filename).with_name(job.scratch))
        if job.recycled:
            # a page cache copy per replica (raw: none, but the same work before it)
            recycle_memory(size_bytes(self.size) * 2 + (256 << 20))
        before_engine = cpu_times(engine) if engine else None
        before_servers = {k: cpu_times(p) for k, p in servers.items()}
        before_foreign = foreign_cpu(str(self.tmp))
        before_host = host_cpu()
        started = time.monotonic()
        timeout = 900 if not job.timed else self.runtime + self.ramp + 120
        run(fio_argv(job, filename, self.size, self.runtime, self.ramp, output), timeout=timeout)
        wall = time.monotonic() - started
        after_host = host_cpu()
        foreign_s, foreign_top = foreign_delta(before_foreign, foreign_cpu(str(self.tmp)))
        result = parse_fio(output, job)
        result["wall_s"] = wall
        if job.direction == "write" and self.args.settle:
            # Outside the timed window: make what the job wrote durable (ext4 journal commit,
            # loop flush, and for cargohold the FUSE fsync and the replicas' fdatasync), so
            # that the next job does not pay for it. How long that takes is reported.
            t0 = time.monotonic()
            run(["sync", "--file-system", filename], timeout=600)
            result["settle_sync_s"] = time.monotonic() - t0
        if job.scratch:
            Path(filename).unlink()
        result["foreign_cpu_s"] = foreign_s
        result["foreign_cores"] = foreign_s / wall
        result["foreign_top"] = foreign_top
        busy, total = (a - b for a, b in zip(after_host, before_host, strict=True))
        result["host_cpu_busy_pct"] = 100 * busy / total if total else None
        result["host_cpu_busy_cores"] = busy / CLK_TCK / wall
        if engine:
            after = cpu_times(engine)
            if before_engine is None or after is None:
                raise RuntimeError(f"engine {engine} died during {job.name}")
            result["engine_user_s"] = after[0] - before_engine[0]
            result["engine_sys_s"] = after[1] - before_engine[1]
            result["engine_cpu_s"] = result["engine_user_s"] + result["engine_sys_s"]
        if servers:
            per: dict[str, float | None] = {}
            per_sys: dict[str, float | None] = {}
            for key, pid in servers.items():
                after = cpu_times(pid)
                start = before_servers.get(key)
                if after is None or start is None:
                    per[key] = per_sys[key] = None
                    continue
                per[key] = after[0] + after[1] - start[0] - start[1]
                per_sys[key] = after[1] - start[1]
            result["dataserver_cpu_s"] = per
            result["dataserver_sys_s"] = per_sys
            result["dataservers_cpu_s"] = sum(v for v in per.values() if v is not None)
        log(f"  {job.name:14s} {result['mbps']:9.1f} MB/s {result['iops']:10.0f} IOPS "
            f"p50 {result['p50_us']:9.0f} us p99 {result['p99_us']:9.0f} us"
            + (f"  engine {result['engine_cpu_s']:.2f} s CPU "
               f"({result['engine_sys_s']:.2f} sys)" if engine else "")
            + f"  host busy {result['host_cpu_busy_pct']:.0f}%"
            + (f"  then sync {result['settle_sync_s']:.2f}s" if "settle_sync_s" in result else "")
            + (f"  OTHER WORK {result['foreign_cores']:.2f} cores ({', '.join(foreign_top)})"
               if result["foreign_cores"] > NOISY_CORES else ""))
        return result

    def run_raw(self, index: int) -> dict[str, Any]:
        base = self.tmp / "raw"
        base.mkdir(exist_ok=True)
        image = base / "disk.img"
        mnt = base / "mnt"
        with open(image, "wb") as f:
            f.truncate(IMAGE_SIZE)
        try:
            self.raw_loop = run(["losetup", "--find", "--show", "--direct-io=on",
                                 "--sector-size", "4096", str(image)]).stdout.strip()
            run([*MKFS_EXT4, "-L", "bench-raw", self.raw_loop], timeout=600)
            mnt.mkdir(exist_ok=True)
            run(["mount", "-t", "ext4", "-o", MOUNT_OPTIONS, self.raw_loop, str(mnt)])
            self.raw_mount = mnt
            jobs = self.run_jobs(mnt, None, {})
        finally:
            self.teardown_raw()
            image.unlink(missing_ok=True)
        return {"jobs": jobs, "background": self.background}

    def teardown_raw(self) -> None:
        if self.raw_mount is not None:
            if str(self.raw_mount) in mounts_under(str(self.tmp)):
                run(["umount", str(self.raw_mount)], check=False)
            self.raw_mount = None
        if self.raw_loop is not None:
            run(["losetup", "-d", self.raw_loop], check=False)
            self.raw_loop = None

    def remote_pair(self, key: str) -> tuple[Node, Node]:
        """Two nodes on one metadata store: one with the two data dirs, one without any,
        which attaches (its engine reaches both replicas over TCP)."""
        if key in self.pairs:
            return self.pairs[key]
        base = self.tmp / key
        base.mkdir()
        common = ("--metadata", f"sqlite://{base / 'meta.db'}")
        tls: dict[str, tuple[str, ...]] = {"bench": (), "bench-client": ()}
        if REMOTE[key]:
            cli = [sys.executable, "-m", "cargohold.cli", "pki"]
            run([*cli, "init", "--dir", str(base / "pki")], env=_env())
            for name in tls:
                run([*cli, "issue", name, "--dir", str(base / "pki"), "--out",
                     str(base / f"tls-{name}")], env=_env())
                tls[name] = ("--tls-dir", str(base / f"tls-{name}"))
        else:
            tls = {name: ("--insecure-plaintext",) for name in tls}
        storage = Node(base / "storage", "bench", 2, (*common, *tls["bench"]))
        client = Node(base / "client", "bench-client", 0, (*common, *tls["bench-client"]))
        self.pairs[key] = (storage, client)
        for node in (storage, client):
            node.base.mkdir()
            node.start()
        return storage, client

    def run_cargohold(self, index: int, replicas: int, profile: bool, key: str = "",
                      ) -> dict[str, Any]:
        if key in REMOTE:
            storage, client = self.remote_pair(key)
        elif key == "r2nomet":
            assert self.unmetered is not None
            storage = client = self.unmetered
        else:
            assert self.node is not None
            storage = client = self.node
        name = f"bench-{key or f'r{replicas}'}-run{index}"
        storage.create(name, replicas, encrypt=key == "r2enc")
        try:
            t0 = time.monotonic()
            if self.uring_before is not None:  # the engine looks once, at its INIT
                URING.write_text("1" if key == "r2ring" else "0")
            mountpoint = Path(client.attach(name))
            attach_s = time.monotonic() - t0
            engine = client.engine_pid(name)
            servers = storage.dataserver_pids()
            holders = storage.replica_servers(name)
            ds_before = {k: proc_status_kib(p, "VmHWM") for k, p in servers.items()}
            jobs = self.run_jobs(mountpoint, engine, servers)
            result: dict[str, Any] = {"jobs": jobs, "attach_s": attach_s,
                                      "background": self.background,
                                      "engine_pid": engine, "replica_servers": holders}
            result["engine"] = self.engine_summary(engine, jobs)
            result["dataservers"] = {
                "cpu_s": sum(j["dataservers_cpu_s"] for j in jobs.values()),
                "cpu_s_per_server": {k: sum((j["dataserver_cpu_s"].get(k) or 0)
                                            for j in jobs.values()) for k in servers},
                "vmhwm_mib": {k: (proc_status_kib(p, "VmHWM") or 0) / 1024
                              for k, p in servers.items()},
                "vmhwm_mib_before": {k: (v or 0) / 1024 for k, v in ds_before.items()},
            }
            moved = sum(j["io_bytes"] for j in jobs.values()) / GIB
            result["dataservers"]["cpu_s_per_gib"] = \
                result["dataservers"]["cpu_s"] / moved if moved else None
            if profile:
                self.profile = self.take_profile(mountpoint, engine, servers, holders)
            t0 = time.monotonic()
            client.detach(name)
            result["detach_s"] = time.monotonic() - t0
        finally:
            if name in client.attached:
                with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                    client.detach(name)
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                storage.remove(name)
        return result

    @staticmethod
    def engine_summary(pid: int, jobs: dict[str, Any]) -> dict[str, Any]:
        cpu = sum(j["engine_cpu_s"] for j in jobs.values())
        moved = sum(j["io_bytes"] for j in jobs.values()) / GIB
        per_job = {}
        for name, j in jobs.items():
            gib = j["io_bytes"] / GIB
            per_job[name] = {
                "cpu_s": j["engine_cpu_s"],
                "cpu_s_per_gib": j["engine_cpu_s"] / gib if gib else None,
                "cpu_us_per_io": j["engine_cpu_s"] / j["total_ios"] * 1e6
                if j["total_ios"] else None,
                "cpu_util": j["engine_cpu_s"] / j["runtime_s"] if j["runtime_s"] else None,
            }
        return {
            "cpu_s": cpu,
            "user_s": sum(j["engine_user_s"] for j in jobs.values()),
            "sys_s": sum(j["engine_sys_s"] for j in jobs.values()),
            "gib_moved": moved,
            "cpu_s_per_gib": cpu / moved if moved else None,
            "vmhwm_mib": (proc_status_kib(pid, "VmHWM") or 0) / 1024,
            "vmrss_mib": (proc_status_kib(pid, "VmRSS") or 0) / 1024,
            "threads": proc_status_kib(pid, "Threads"),
            "per_job": per_job,
        }

    # -- profiling --------------------------------------------------------------------

    def take_profile(self, mountpoint: Path, engine: int, servers: dict[str, int],
                     holders: list[str]) -> dict[str, Any]:
        """One extra, unmeasured random-write job with py-spy (or ``perf`` with
        ``--profile-perf``) on the engine and servers."""
        tool = "perf" if self.args.profile_perf else "py-spy"
        binary = shutil.which(tool)
        if binary is None:
            log(f"profile: {tool} is not installed; skipped")
            return {"error": f"{tool} not installed"}
        job = next(j for j in JOBS if j.name == "randwrite")
        seconds = self.args.profile_seconds
        targets = {"engine": engine, **{f"dataserver-{k}": p for k, p in servers.items()
                                        if k in holders}}
        RESULTS.mkdir(parents=True, exist_ok=True)
        suffix = "perf.data" if self.args.profile_perf else "speedscope.json"
        outputs = {k: RESULTS / f"{self.stamp}-{k}.{suffix}" for k in targets}
        output = str(self.tmp / "fio-profile.json")
        log(f"profile: randwrite iodepth 32 for {seconds + 6}s, {tool} {seconds}s on "
            f"{', '.join(f'{k} ({p})' for k, p in targets.items())}")
        fio = subprocess.Popen(fio_argv(job, str(mountpoint / "fio.dat"), self.size,
                                        seconds + 6, 0, output),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        spies: dict[str, subprocess.Popen[bytes]] = {}
        try:
            time.sleep(2)
            for key, pid in targets.items():
                if self.args.profile_perf:
                    argv = [binary, "record", "-q", "-F", str(self.args.profile_rate * 10),
                            "-p", str(pid), "-o", str(outputs[key]), "--", "sleep",
                            str(seconds)]
                else:
                    argv = [binary, "record", "-p", str(pid), "-d", str(seconds), "-r",
                            str(self.args.profile_rate), "-f", "speedscope", "-o",
                            str(outputs[key])]
                    if self.args.profile_native:
                        argv.append("--native")
                    if self.args.profile_gil:
                        argv.append("--gil")
                    if not self.args.profile_blocking:
                        argv.append("--nonblocking")  # do not pause the process per sample
                spies[key] = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.PIPE)
            for spy in spies.values():
                spy.wait(seconds + 60)
            fio.wait(seconds + 120)
        finally:
            for proc in [*spies.values(), fio]:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        summary: dict[str, Any] = {"tool": tool, "seconds": seconds,
                                   "rate": self.args.profile_rate,
                                   "native": self.args.profile_native,
                                   "blocking": self.args.profile_blocking,
                                   "gil": self.args.profile_gil}
        with contextlib.suppress(Exception):
            summary["fio_during_profile"] = parse_fio(output, job)
        for key, spy in spies.items():
            if spy.returncode != 0 or not outputs[key].exists():
                err = spy.stderr.read().decode(errors="replace") if spy.stderr else ""
                summary[key] = {"error": f"{tool} exited {spy.returncode}: {err[-500:]}"}
                continue
            if self.args.profile_perf:
                summary[key] = {"by_object": perf_by_object(binary, outputs[key])}
            else:
                summary[key] = summarise_speedscope(outputs[key], seconds)
            summary[key]["file"] = str(outputs[key])
        return summary

    # -- the whole benchmark ----------------------------------------------------------

    def main(self) -> dict[str, Any]:
        log(f"temporary directory {self.tmp} ({describe_fs(self.tmp)}); repository on "
            f"{describe_fs(ROOT)}")
        self.first_touch = first_touch_us()
        log(f"fresh memory costs {self.first_touch:.1f} us per 4 KiB page to fault in (the "
            f"page cache the data servers write into grows by such pages; raw does not)")
        runs: list[dict[str, Any]] = []
        by_key = {c[0]: c for c in CONFIGS}
        configs = [by_key[key] for key in self.args.configs]  # in the order asked
        for index in range(1, self.runs + 1):
            results: dict[str, Any] = {}
            for key, label, replicas in configs:
                log(f"run {index}/{self.runs}: {label}")
                if key == "raw":
                    results[key] = self.run_raw(index)
                    continue
                if key == "r2nomet" and self.unmetered is None:
                    self.unmetered = Node(self.tmp / "unmetered", "bench-unmetered",
                                          extra=("--no-engine-metrics",))
                    self.unmetered.base.mkdir()
                    self.unmetered.start()
                elif self.node is None and key not in REMOTE and key != "r2nomet":
                    self.node = Node(self.tmp / "node")
                    self.node.base.mkdir()
                    self.node.start()
                profile = (self.args.profile and key == "r2" and index == self.runs)
                results[key] = self.run_cargohold(index, replicas, profile, key)
                e = results[key]["engine"]
                log(f"  engine: {e['cpu_s']:.1f} s CPU, {e['cpu_s_per_gib']:.2f} s/GiB, "
                    f"VmHWM {e['vmhwm_mib']:.0f} MiB; data servers "
                    f"{results[key]['dataservers']['cpu_s']:.1f} s CPU")
            runs.append(results)
        return {"runs": runs, "median": median_of(runs), "profile": self.profile}

    def cleanup(self) -> dict[str, Any]:
        """Undo everything; return what (if anything) is left."""
        base = str(self.tmp)
        steps: list[str] = []
        if self.uring_before is not None:
            URING.write_text("1" if self.uring_before == "Y" else "0")
        nodes = [n for pair in self.pairs.values() for n in reversed(pair)]
        nodes += [n for n in (self.node, self.unmetered) if n is not None]
        for node in nodes:
            try:
                node.stop()
            except Exception as e:  # noqa: BLE001 - keep cleaning
                steps.append(f"node stop: {e}")
            for key, pid in node.dataserver_pids().items():
                if cpu_seconds(pid) is not None and base.encode() in _cmdline(pid):
                    steps.append(f"killed data server {key} ({pid})")
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        try:
            self.teardown_raw()
        except Exception as e:  # noqa: BLE001
            steps.append(f"raw teardown: {e}")
        for pid, cmd in processes_under(base).items():  # engines, fio, anything of ours
            steps.append(f"killed {pid}: {cmd[:120]}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for target in sorted(mounts_under(base), key=len, reverse=True):
            steps.append(f"unmounted {target}")
            if run(["umount", target], check=False).returncode != 0:
                run(["umount", "-l", target], check=False)
        for device in loops_under(base):
            steps.append(f"detached {device}")
            run(["losetup", "-d", device], check=False)
        deadline = time.monotonic() + 10
        while True:
            left = leftovers(base)
            if not (left["mounts"] or left["loops"] or left["processes"]) \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if not (left["mounts"] or left["loops"]):
            shutil.rmtree(base, ignore_errors=True)
        left = leftovers(base)
        left["steps"] = steps
        left["clean"] = not (left["mounts"] or left["loops"] or left["processes"]
                             or left["dir_exists"])
        return left


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def source_fingerprint() -> str:
    """A hash of the code under test (src/), to notice edits made while the benchmark ran."""
    import hashlib
    digest = hashlib.sha256()
    for path in sorted(SRC.rglob("*.py")):
        with contextlib.suppress(OSError):
            digest.update(str(path.relative_to(SRC)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def first_touch_us(size: int = 256 << 20) -> float:
    """Microseconds to fault in one 4 KiB page of fresh anonymous memory (a machine fact).

    Raw writes with direct I/O; the data servers write through the page cache, and every
    page the cache grows by costs this. In a VM whose balloon reports free pages to the host
    (virtio-balloon free page reporting), memory freed a few seconds ago costs it again:
    measured on the development machine at ~15 us per page (~4 ms per MiB, i.e. a 1 GiB
    write to 2 replicas spends ~8 s of CPU in faults) against ~1 us for memory the host kept.
    """
    return recycle_memory(size) * 1e6 / (size // mmap.PAGESIZE)


def recycle_memory(size: int) -> float:
    """Fault in ``size`` bytes of anonymous memory and free them at once; the seconds the
    faults took.

    In this VM (see ``first_touch_us``) a page the host reclaimed costs a fault again, and a
    freed page is reported to the host only a couple of seconds after it is freed. The page
    cache a job grows right after this takes the freed pages, which the host still backs: the
    job then costs what it would on a machine whose memory is simply there. The jobs without
    it pay for fresh pages as the first write of a new VM does.
    """
    area = mmap.mmap(-1, size)
    try:
        target = ctypes.c_char.from_buffer(area)
        start = time.perf_counter()
        ctypes.memset(ctypes.addressof(target), 1, size)
        took = time.perf_counter() - start
        del target
    finally:
        area.close()
    return took


def size_bytes(text: str) -> int:
    """fio's size ("256M", "1G", "4096") in bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper()
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def describe_fs(path: Path) -> str:
    done = run(["df", "--output=source,target", str(path)], check=False)
    lines = done.stdout.split("\n")
    return " ".join(lines[1].split()) if len(lines) > 1 else "?"


def perf_by_object(perf: str, data: Path) -> dict[str, float]:
    """Share of a ``perf record`` file's samples per shared object (kernel, libpython, ...):
    how much of a process is the interpreter and how much the system calls under it."""
    done = run([perf, "report", "-i", str(data), "--stdio", "--sort", "dso"], check=False)
    shares: dict[str, float] = {}
    for line in done.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].endswith("%") and not line.startswith("#"):
            with contextlib.suppress(ValueError):
                shares[parts[1]] = float(parts[0].rstrip("%"))
    return shares


WAITING = ("EpollSelector.select", "_worker", "Condition.wait", "Event.wait", "Thread.join",
           "select", "poll", "epoll_wait")


def summarise_speedscope(path: Path, seconds: int, top: int = 15) -> dict[str, Any]:
    """Own ('self') and total time per function from a py-spy speedscope file.

    py-spy keeps only samples where a thread is not sleeping (running, or runnable but waiting
    for a CPU), weighted in seconds. Leaf frames that are really waits (``select`` of the
    event loop, an idle pool worker) are still counted when the thread was runnable there;
    they are flagged.
    """
    data = json.loads(path.read_text())
    frames = data["shared"]["frames"]

    def label(index: int) -> str:
        frame = frames[index]
        file = str(frame.get("file") or "")
        for marker in ("site-packages/", "/src/", "/lib/python3.11/", "/lib/python3"):
            if marker in file:
                file = file.split(marker, 1)[1]
                break
        line = frame.get("line")
        return f"{frame['name']} ({file}{':' + str(line) if line else ''})"

    def ranked(table: dict[int, float], whole: float, n: int = top) -> list[dict[str, Any]]:
        best = sorted(table.items(), key=lambda kv: kv[1], reverse=True)[:n]
        return [{"function": label(i), "seconds": round(w, 3),
                 "pct": round(100 * w / whole, 1) if whole else 0,
                 "waiting": frames[i]["name"] in WAITING} for i, w in best]

    threads = []
    all_own: dict[int, float] = {}
    for profile in data["profiles"]:
        weights = profile.get("weights") or [1.0] * len(profile["samples"])
        own: dict[int, float] = {}
        total: dict[int, float] = {}
        active = 0.0
        for stack, weight in zip(profile["samples"], weights, strict=True):
            if not stack:
                continue
            active += weight
            own[stack[-1]] = own.get(stack[-1], 0) + weight
            all_own[stack[-1]] = all_own.get(stack[-1], 0) + weight
            for index in set(stack):
                total[index] = total.get(index, 0) + weight
        waiting = sum(w for i, w in own.items() if frames[i]["name"] in WAITING)
        threads.append({"name": profile.get("name"), "active_s": round(active, 3),
                        "waiting_s": round(waiting, 3), "own": ranked(own, active),
                        "total": ranked(total, active, 40)})
    threads.sort(key=lambda t: t["active_s"], reverse=True)
    active = sum(t["active_s"] for t in threads)
    return {"seconds": seconds, "active_s": round(active, 3),
            "active_pct_of_one_core": round(100 * active / seconds, 1),
            "own_all_threads": ranked(all_own, active), "threads": threads}


# --- aggregation and report ------------------------------------------------------------

def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of every number found at the same place in every run."""
    def merge(values: list[Any]) -> Any:
        first = values[0]
        if isinstance(first, dict):
            keys = [k for k in first if all(isinstance(v, dict) and k in v for v in values)]
            return {k: merge([v[k] for v in values]) for k in keys}
        if isinstance(first, bool) or not isinstance(first, int | float):
            return first
        numbers = [v for v in values if isinstance(v, int | float)]
        return statistics.median(numbers) if numbers else None
    return merge(runs)


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def report(result: dict[str, Any], runs: int) -> str:
    med = result["median"]
    configs = [c for c in CONFIGS if c[0] in med]
    cargo = [c for c in configs if c[0] != "raw"]
    lines = [f"fio results, median of {runs} run(s); ratios = cargohold / raw "
             f"(for latency, above 1 is slower)", ""]
    header = ["job", "metric", *[c[1] for c in configs]]
    if "raw" in med:
        header += [f"{c[0]}/raw" for c in cargo]
    rows = []
    for job in JOBS:
        for metric, title in METRICS:
            row = [job.name, title]
            for key, _, _ in configs:
                row.append(fmt(med[key]["jobs"][job.name][metric]))
            if "raw" in med:
                raw = med["raw"]["jobs"][job.name][metric]
                for key, _, _ in cargo:
                    value = med[key]["jobs"][job.name][metric]
                    row.append(f"{value / raw:.2f}" if raw else "-")
            rows.append(row)
        if all("settle_sync_s" in med[key]["jobs"][job.name] for key, _, _ in configs):
            row = [job.name, "sync s"]
            values = [med[key]["jobs"][job.name]["settle_sync_s"] for key, _, _ in configs]
            row += [f"{v:.2f}" for v in values]
            if "raw" in med:
                raw = med["raw"]["jobs"][job.name]["settle_sync_s"]
                row += [f"{med[key]['jobs'][job.name]['settle_sync_s'] / raw:.1f}" if raw
                        else "-" for key, _, _ in cargo]
            rows.append(row)
        rows.append([])
    lines += table(rows, header)
    if any("settle_sync_s" in j for r in med.values() for j in r["jobs"].values()):
        lines += ["(sync s: the untimed 'sync --file-system' after a write job, i.e. the cost "
                  "of making that job's data durable)"]
    noisy = [f"run {i} {key}: {r[key]['background']['busy_pct']:.0f}% "
             f"({', '.join(r[key]['background']['top'])})"
             for i, r in enumerate(result["runs"], 1) for key in r
             if not r[key].get("background", {}).get("quiet", True)]
    for i, r in enumerate(result["runs"], 1):
        for key in r:
            for name, j in r[key]["jobs"].items():
                if j.get("foreign_cores", 0) > NOISY_CORES:
                    noisy.append(f"run {i} {key} {name}: other processes used "
                                 f"{j['foreign_cores']:.2f} cores ({', '.join(j['foreign_top'])})")
    if noisy:
        lines += ["", "WARNING: the host was busy with other work (numbers are noisy):",
                  *[f"  {n}" for n in noisy]]
    if cargo:
        lines += ["", "engine and data servers (CPU = user+sys over the five jobs)", ""]
        rows = []
        for key, label, _ in cargo:
            e, d = med[key]["engine"], med[key]["dataservers"]
            rows.append([label, fmt(e["cpu_s"], 2), fmt(e["gib_moved"], 2),
                         fmt(e["cpu_s_per_gib"], 2), fmt(e["vmhwm_mib"]), fmt(d["cpu_s"], 2),
                         fmt(d["cpu_s_per_gib"], 2),
                         " ".join(f"{k}={fmt(v)}" for k, v in d["vmhwm_mib"].items())])
        lines += table(rows, ["config", "engine CPU s", "GiB moved", "engine s/GiB",
                              "engine VmHWM MiB", "servers CPU s", "servers s/GiB",
                              "servers VmHWM MiB"])
        lines += ["", "engine CPU per job", ""]
        rows = []
        for job in JOBS:
            row = [job.name]
            for key, _, _ in cargo:
                pj = med[key]["engine"]["per_job"][job.name]
                sv = med[key]["jobs"][job.name]
                ios = sv["total_ios"]
                row += [fmt(pj["cpu_s_per_gib"], 2), fmt(pj["cpu_us_per_io"], 1),
                        f"{100 * (pj['cpu_util'] or 0):.0f}%",
                        fmt(sv["dataservers_cpu_s"] / ios * 1e6 if ios else None, 1)]
            rows.append(row)
        head = ["job"]
        for short, _, _ in cargo:
            head += [f"{short} eng s/GiB", f"{short} eng us/IO", f"{short} eng util",
                     f"{short} srv us/IO"]
        lines += table(rows, head)
    if "raw" in med and "r2" in med:
        lines += ["", "targets (issue 6: 2 replicas against raw)", ""]
        rows = []
        for title, job_name, metric, goal in TARGETS:
            raw = med["raw"]["jobs"][job_name][metric]
            ratio = med["r2"]["jobs"][job_name][metric] / raw if raw else 0
            rows.append([title, f"{ratio:.2f}", f">= {goal:.2f}",
                         "PASS" if ratio >= goal else "MISS"])
        hwm = max(r["r2"]["engine"]["vmhwm_mib"] for r in result["runs"])
        rows.append(["engine peak RSS (max of runs)", f"{hwm:.0f} MiB",
                     f"<= {ENGINE_MEMORY_TARGET_MIB} MiB",
                     "PASS" if hwm <= ENGINE_MEMORY_TARGET_MIB else "MISS"])
        lines += table(rows, ["target", "measured", "goal", ""])
    for base, other, what, names, digits in (
            ("r2plain", "r2tls", "what TLS and capabilities cost (2 remote replicas: TLS / "
             "plaintext)", ["plaintext", "TLS", "TLS/plain"], 2),
            ("r2", "r2enc", "what encryption at rest costs (2 replicas: encrypted / not)",
             ["plain", "encrypted", "enc/plain"], 2),
            ("r2nomet", "r2", "what the engine's request counts for /metrics cost (2 "
             "replicas: counted / not)", ["no metrics", "metrics", "on/off"], 3),
            ("r2", "r2ring", "what FUSE over io_uring does (2 replicas: ring / /dev/fuse)",
             ["/dev/fuse", "io_uring", "ring/dev"], 2)):
        if base in med and other in med:
            lines += ["", what, ""] + comparison(med, base, other, names, digits)
    touch = result.get("meta", {}).get("first_touch_us_per_page")
    if touch is not None:
        lines += ["", f"fresh memory: {touch:.1f} us per 4 KiB page to fault in, i.e. "
                  f"{touch * 256 / 1000:.1f} ms of CPU per MiB the page cache grows by "
                  f"(sequential write to 2 replicas grows it by 2 MiB per MiB; raw by none)"]
    profile = result.get("profile") or {}
    for key, summary in profile.items():
        if isinstance(summary, dict) and "by_object" in summary:
            shares = summary["by_object"]
            lines += ["", f"perf {key}: CPU by shared object (file {summary.get('file')})"]
            lines += [f"  {pct:5.1f}%  {name}" for name, pct in
                      sorted(shares.items(), key=lambda item: -item[1])[:8]]
            continue
        if not isinstance(summary, dict) or "threads" not in summary:
            if isinstance(summary, dict) and "error" in summary:
                lines += ["", f"profile {key}: {summary['error']}"]
            continue
        lines += ["", f"py-spy {key} ({summary['seconds']} s; file {summary.get('file')})"]
        for thread in summary["threads"]:
            if thread["active_s"] < 0.05 * summary["seconds"]:
                continue
            lines.append(f"  thread {thread['name']}: active {thread['active_s']:.1f} s "
                         f"(of which in waits {thread['waiting_s']:.1f} s); top by own time:")
            lines += [f"    {s['pct']:5.1f}%  {s['function']}"
                      + ("  [wait]" if s["waiting"] else "") for s in thread["own"][:12]]
            lines.append("   top by total (inclusive) time:")
            lines += [f"    {s['pct']:5.1f}%  {s['function']}" for s in thread["total"]
                      if s["pct"] < 80 and not s["waiting"]][:10]
    if "fio_during_profile" in profile:
        f = profile["fio_during_profile"]
        lines += ["", f"(fio during profiling, not counted: {f['iops']:.0f} IOPS)"]
    return "\n".join(lines)


def comparison(med: dict[str, Any], base: str, other: str, names: list[str],
               digits: int) -> list[str]:
    """A table of every job's figures in configurations ``base`` and ``other``, with their
    ratio (other / base)."""
    rows = []
    for job in JOBS:
        for metric, title in METRICS:
            a, b = (med[k]["jobs"][job.name][metric] for k in (base, other))
            rows.append([job.name, title, fmt(a), fmt(b), f"{b / a:.{digits}f}" if a else "-"])
    return table(rows, ["job", "metric", *names])


def table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows] if len(r) > i)
              for i in range(len(header))]
    out = []
    for n, row in enumerate([header, [], *rows]):
        if not row:
            out.append("-" * (sum(widths) + 2 * (len(widths) - 1)) if n == 1 else "")
            continue
        cells = [str(c).rjust(w) if i >= 2 or (i == 1 and c[:1].isdigit()) else
                 str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=False))]
        out.append("  ".join(cells).rstrip())
    while out and not out[-1]:
        out.pop()
    return out


# --- entry point -----------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--quick", action="store_true", help="5 s random jobs, 256M file, 1 run")
    p.add_argument("--runs", type=int, default=0,
                   help="repeat everything N times, report the median (default 3; 1 if --quick)")
    p.add_argument("--file-size", default="",
                   help="fio file size (default 1G; 256M with --quick); the volume is "
                        f"{VOLUME_SIZE}")
    p.add_argument("--runtime", type=int, default=0,
                   help="seconds per random job (default 20; 5 with --quick)")
    p.add_argument("--configs", default="raw,r1,r2",
                   help="comma-separated subset of raw,r1,r2,r2enc,r2tls,r2plain,r2nomet,r2ring, "
                        "run in that order (default raw,r1,r2; r2enc: encrypted at rest; "
                        "r2tls,r2plain: the engine on a second node, both replicas over TCP "
                        "with TLS or in plaintext; r2nomet: engines without request counts; "
                        "r2ring: FUSE requests over io_uring)")
    p.add_argument("--no-settle", dest="settle", action="store_false",
                   help="do not sync the file system (untimed) after each write job: the "
                        "next job then pays for the previous job's flush")
    p.add_argument("--drop-caches", action="store_true",
                   help="sync and drop the page cache before every read job (the data "
                        "servers read through the page cache; the raw loop does not)")
    p.add_argument("--profile", action="store_true",
                   help="after the last 2-replica run's jobs, run one more randwrite job "
                        "(not counted) and py-spy the engine and data servers during it")
    p.add_argument("--profile-seconds", type=int, default=PROFILE_SECONDS)
    p.add_argument("--profile-perf", action="store_true",
                   help="profile with perf instead of py-spy: CPU share per shared object "
                   "(kernel, libpython, uvloop, ...), i.e. how much a compiled hot path "
                   "that keeps the system calls could save")
    p.add_argument("--profile-rate", type=int, default=100,
                   help="py-spy samples per second (perf: 10 times as many)")
    p.add_argument("--profile-native", action="store_true", help="py-spy --native")
    p.add_argument("--profile-gil", action="store_true",
                   help="py-spy --gil: only samples where Python code runs (leaves out the "
                        "time in system calls and waiting for a CPU)")
    p.add_argument("--profile-blocking", action="store_true",
                   help="let py-spy pause the process for each sample (exact stacks, but it "
                        "slows the process down; default --nonblocking)")
    p.add_argument("--wait-quiet", type=float, default=120.0,
                   help="before each configuration wait up to this many seconds for the host "
                        "to be idle (other benchmarks or tests share the CPUs; default 120)")
    p.add_argument("--retry-noisy", type=int, default=2,
                   help=f"run a job again (up to N times) when other processes used more than "
                        f"{NOISY_CORES} cores during it; the quietest attempt counts (default 2)")
    p.add_argument("--quiet-threshold", type=float, default=15.0,
                   help="host CPU busy %% that still counts as idle (default 15)")
    p.add_argument("--tmp-parent", default="",
                   help="where the temporary directory goes (default: /var/tmp or /tmp, "
                        "whichever is on the repository's filesystem)")
    p.add_argument("--src", type=Path, default=SRC,
                   help="the directory holding the cargohold package to benchmark (default: "
                        "this repository's src/; use a private copy to try a change)")
    p.add_argument("--no-save", action="store_true", help="do not write results/*.json")
    args = p.parse_args(argv)
    args.configs = list(dict.fromkeys(c.strip() for c in args.configs.split(",") if c.strip()))
    args.profile = args.profile or args.profile_perf
    unknown = set(args.configs) - {c[0] for c in CONFIGS}
    if unknown or not args.configs:
        p.error(f"--configs: unknown {', '.join(sorted(unknown)) or '(empty)'}")
    if args.runs < 0:
        p.error("--runs must be at least 1")
    if not args.tmp_parent:
        repo_dev = os.stat(ROOT).st_dev
        same = [d for d in ("/var/tmp", "/tmp") if os.path.isdir(d)
                and os.stat(d).st_dev == repo_dev]
        args.tmp_parent = same[0] if same else "/var/tmp"
        if not same:
            log("warning: neither /var/tmp nor /tmp is on the repository's filesystem")
    return args


@contextlib.contextmanager
def signals_raise() -> Iterator[dict[str, bool]]:
    """SIGTERM/SIGHUP/SIGINT raise ``Interrupted`` once; during cleanup they are noted only."""
    state = {"cleaning": False, "got": False}

    def handler(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if state["cleaning"] or state["got"]:
            log(f"{name} received; still cleaning up")
            return
        state["got"] = True
        raise Interrupted(name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP,
                                                        signal.SIGINT)}
    try:
        yield state
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    global SRC
    args = parse_args(argv)
    SRC = args.src.resolve()
    if not (SRC / "cargohold" / "__init__.py").exists():
        print(f"--src {SRC}: no cargohold package there", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("fio_bench.py needs root (loop devices, mounts, FUSE)", file=sys.stderr)
        return 2
    for tool in (FIO, "losetup", "mkfs.ext4"):
        if not shutil.which(tool):
            print(f"{tool} is not installed", file=sys.stderr)
            return 2
    fingerprint = source_fingerprint()
    with signals_raise() as state:
        bench = Bench(args)
        result: dict[str, Any] | None = None
        status = 0
        error = ""
        try:
            result = bench.main()
        except Interrupted as e:
            error = f"interrupted by {e}"
            status = 130
        except Exception as e:  # noqa: BLE001 - report, then clean up
            error = f"{type(e).__name__}: {e}"
            status = 1
            if bench.node is not None and "--- logs ---" not in error:
                error += f"\n--- logs (before cleanup) ---\n{bench.node.tail(1500)}"
        finally:
            state["cleaning"] = True
            log("cleaning up")
            left = bench.cleanup()
        if error:
            log(f"benchmark failed: {error}")
    for step in left["steps"]:
        log(f"cleanup: {step}")
    if left["clean"]:
        log(f"cleanup: OK, nothing left (no mounts, loop devices or processes under "
            f"{bench.tmp}; directory removed)")
    else:
        log(f"cleanup: LEFT OVER: {json.dumps(left, indent=2)}")
        status = status or 3
    if result is None:
        return status
    meta = {
        "timestamp": bench.stamp,
        "args": {k: v for k, v in vars(args).items()},
        "runs": bench.runs, "file_size": bench.size, "runtime_s": bench.runtime,
        "ramp_s": bench.ramp, "volume_size": VOLUME_SIZE,
        "kernel": platform.release(), "cpus": os.cpu_count(),
        "first_touch_us_per_page": bench.first_touch,
        "fio": run([FIO, "--version"], check=False).stdout.strip(),
        "python": platform.python_version(), "tmp_dir": str(bench.tmp), "src": str(SRC),
        "tmp_fs": describe_fs(Path(args.tmp_parent)), "repo_fs": describe_fs(ROOT),
        "jobs": [vars(j) for j in JOBS], "cleanup": left,
        "src_fingerprint_start": fingerprint, "src_fingerprint_end": source_fingerprint(),
    }
    if meta["src_fingerprint_start"] != meta["src_fingerprint_end"]:
        log("WARNING: files under src/ changed while the benchmark ran; the runs may have "
            "measured different code")
    result = {"meta": meta, **result}
    text = report(result, bench.runs)
    if meta["src_fingerprint_start"] != meta["src_fingerprint_end"]:
        text += ("\n\nWARNING: files under src/ changed while the benchmark ran "
                 f"({meta['src_fingerprint_start']} -> {meta['src_fingerprint_end']})")
    print(text)
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"{bench.stamp}.json"
        result["report"] = text
        path.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"\nresults written to {path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
