#!/usr/bin/env python3
"""Rebuild throughput against the raw disk's sequential write bandwidth.

Run as root from the repository:  ``python3 benchmarks/rebuild_bench.py [--size 4G] [--runs 3]``

Each run, on one disk (a temporary directory under /var/tmp):

1. raw: fio sequential write (bs=1M, direct=1, iodepth=16, libaio) of ``--size`` to a plain
   file, exactly as ``resync_bench.py`` measures it: the local limit;
2. cargohold: a real node with two data servers (disk1, disk2), a 2-replica volume attached as
   ext4, ``--size`` of random data written through the mount with fsync, the volume detached;
3. disk2 is removed for good the way an operator does it (there is no CLI or REST call that
   deletes a data server): the node is stopped (which stops its data servers and marks them
   down), the directory is deleted, and the node is started again with disk1 and a NEW,
   empty disk3 and ``--rebuild-after 1``. The record of disk2's data server stays down, so
   the controller replaces its replica with one on disk3 (the only data server holding no
   replica): every chunk ever written is copied, not just the ones a resync would miss;
4. the benchmark waits, through ``cargohold volume rebuild NAME``, until the new replica is
   in sync and the old one is dropped (see ``wait_rebuilt``). The rebuild's time is taken
   from the node's own log lines: from "replacing the replica" (placement, empty replica
   created) to "resync ... done" (every chunk copied and flushed, replica in sync); the
   copy's own figure is reported too;
5. the copy is checked: the two replicas' chunk generation tables are equal, the rebuild
   copied every chunk written, and the node is started a third time with disk3 alone: the
   volume is attached from the rebuilt replica only and the file's sha256 must match.

The result is the median over ``--runs`` runs of the rebuild's MB/s, its ratio to raw, and
PASS/MISS against the target (ratio >= 0.5). The host is shared: /proc/loadavg, the host's CPU
use and the node's and data servers' CPU time during each rebuild are recorded. Results go to
stdout and ``benchmarks/results/rebuild-<timestamp>.json``. Whatever happens (errors, Ctrl-C,
SIGTERM, SIGHUP) every process, mount, loop device and temporary directory is removed and the
script checks that nothing is left. Exit status: 0 PASS, 1 MISS or a copy that failed its
check, 2 an error, 130 interrupted, 3 something left over.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from resync_bench import raw_seq_write  # noqa: E402  (the same raw measurement)
from tests.conftest import Node, leftovers, sha256_of  # noqa: E402

from cargohold.clients.dataclient import DataClient  # noqa: E402
from cargohold.core.layout import CHUNK_SIZE  # noqa: E402
from cargohold.core.sizes import format_size, parse_size  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TARGET = 0.5
MIB = 1 << 20
VOLUME = "bench"
REBUILD_AFTER = "1"  # seconds the removed data server is down before its replica is replaced
REBUILD_TIMEOUT = 1800.0
CLK_TCK = os.sysconf("SC_CLK_TCK")

_STAMP = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) node \w+ [\w.]+: "
REPLACING = re.compile(_STAMP + rf"replacing the replica of {VOLUME} on (\S+) with one on (\S+) ",
                       re.M)
RESYNC_DONE = re.compile(_STAMP + rf"resync of {VOLUME} done: (\d+) of (\d+) chunks copied in "
                         r"([\d.]+) s", re.M)
RESYNC_STOPPED = re.compile(_STAMP + rf"resync of {VOLUME} stopped: (.*)$", re.M)


class Interrupted(BaseException):
    """A termination signal arrived: unwind through every ``finally`` and clean up."""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- host and process load -----------------------------------------------------------------

def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def host_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of the whole host, from /proc/stat (iowait counts as idle)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal
    return total - fields[3] - fields[4], total


def cpu_seconds(pid: int) -> float:
    """user+sys CPU seconds of a process (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def log_time(text: str) -> float:
    """The time of a cargohold log line's timestamp."""
    return dt.datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def source_state() -> dict[str, str]:
    """The commit checked out and a fingerprint of the sources under test as they are now
    (the tree may hold uncommitted work: a change during a run is flagged)."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "src").rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"],
                           capture_output=True, text=True, check=False).stdout.split("\n")
    return {"head": head, "src_sha256": digest.hexdigest()[:16],
            "uncommitted": ", ".join(line[3:] for line in dirty if line.strip())}


# --- the cargohold side ----------------------------------------------------------------------

def fill(path: Path, size: int) -> str:
    """Write ``size`` bytes of random data to ``path`` with fsync; return their sha256."""
    digest = hashlib.sha256()
    block = os.urandom(16 * MIB)
    with open(path, "wb") as f:
        written = 0
        while written < size:
            piece = block[: min(len(block), size - written)]
            f.write(piece)
            digest.update(piece)
            written += len(piece)
            # vary the content so nothing can be deduplicated or compressed away
            block = block[1:] + block[:1]
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest()


class Cluster:
    """The node processes started, one after another, on one state directory under ``base``:
    cleaned up together, with anything of ours still running under ``base`` afterwards."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.nodes: list[Node] = []

    def start(self, data_dirs: list[Path], *extra: str) -> Node:
        node = Node(self.base, data_servers=0, extra=extra)
        node.data_dirs = list(data_dirs)
        self.nodes.append(node)
        node.start(timeout=60.0)
        return node

    def cleanup(self) -> dict[str, list[str]]:
        for node in reversed(self.nodes):
            node.cleanup()
        # a data server whose directory was deleted is in no process.json any more
        for pid in _our_processes(self.base):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while (left := {k: v for k, v in leftovers(self.base).items() if v}) \
                and time.monotonic() < deadline:
            time.sleep(0.2)  # SIGKILLed processes and lazy unmounts take a moment
        return left


def _our_processes(base: Path) -> list[int]:
    """Pids of the cargohold processes whose command line names ``base``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if str(base).encode() in cmdline and b"cargohold" in cmdline:
            pids.append(int(proc.name))
    return pids


def inspect(node: Node) -> dict[str, Any]:
    view = node.json("volume", "inspect", VOLUME)
    assert isinstance(view, dict)
    return view


def wait_rebuilt(node: Node, removed: str) -> dict[str, Any]:
    """Wait until the replica on data server ``removed`` is replaced: a replacement was added,
    every replica is in sync and none still ``replaces`` another (the old one is dropped).

    This is what ``cargohold volume rebuild NAME --wait`` waits for, polled here through
    ``volume rebuild NAME -o json``, because ``--wait`` alone returns at once until the
    controller has added the replacement (the removed server's replica still reads as in
    sync), and at commit de7d34e it crashes (``min() arg is an empty sequence``) in the moment
    between the new replica coming in sync and the old one being dropped."""
    deadline = time.monotonic() + REBUILD_TIMEOUT
    started = False
    while True:
        view = node.json("volume", "rebuild", VOLUME)
        assert isinstance(view, dict)
        replicas = view["replicas"]
        started = started or any(r["replaces"] == removed for r in replicas) \
            or all(r["server"] != removed for r in replicas)
        if started and all(r["state"] == "in_sync" and not r["replaces"] for r in replicas):
            return view
        if time.monotonic() > deadline:
            raise RuntimeError(f"not rebuilt in {REBUILD_TIMEOUT:.0f} s: {replicas}\n"
                               f"{node.logs()}")
        time.sleep(0.5)


async def _generations(replicas: list[dict[str, Any]], volume_id: str) -> dict[str, list[int]]:
    """Each replica's chunk generations, trailing never-written chunks left out."""
    tables: dict[str, list[int]] = {}
    for replica in replicas:
        async with DataClient(replica["address"], replica["server"]) as client:
            table = array("Q", await client.generations(volume_id))  # little-endian u64s
        if sys.byteorder == "big":
            table.byteswap()
        gens = list(table)
        while gens and gens[-1] == 0:
            gens.pop()
        tables[replica["server"]] = gens
    return tables


def rebuild_run(base: Path, size: int, rate: str) -> dict[str, Any]:
    """One run of steps 2-5 (see the module docstring) under ``base``."""
    root = base / "node"
    root.mkdir()
    disk1, disk2, disk3 = (root / f"disk{i}" for i in (1, 2, 3))
    cluster = Cluster(root)
    try:
        node = cluster.start([disk1, disk2], "--rebuild-rate", rate)
        volume_size = size + size // 4 + 256 * MIB  # room for ext4's own blocks
        node.cli("volume", "create", VOLUME, "--size", str(volume_size), "--replicas", "2")
        mountpoint = Path(node.cli("volume", "attach", VOLUME).stdout.strip())
        log(f"  writing {format_size(size)} of random data through {mountpoint}")
        started = time.monotonic()
        digest = fill(mountpoint / "data.bin", size)
        write_mbps = size / (time.monotonic() - started) / 1e6
        node.cli("volume", "detach", VOLUME)
        volume = inspect(node)
        [removed] = [r for r in volume["replicas"] if Path(r["path"]) == disk2]
        [kept] = [r for r in volume["replicas"] if Path(r["path"]) == disk1]
        removed_pid = json.loads((disk2 / "process.json").read_text())["pid"]

        log(f"  removing data server {removed['server'][:12]} ({disk2.name}) for good; "
            f"adding an empty one ({disk3.name})")
        node.stop()  # stops its data servers and marks them down
        with contextlib.suppress(ProcessLookupError):
            os.kill(removed_pid, signal.SIGKILL)  # only if the stop did not end it
        shutil.rmtree(disk2)
        log_offset = node.log.stat().st_size
        node = cluster.start([disk1, disk3], "--rebuild-rate", rate,
                             "--rebuild-after", REBUILD_AFTER)
        pids = [node.proc.pid] if node.proc else []
        servers = node.dataserver_pids()
        cpu_before = [cpu_seconds(p) for p in pids + servers]
        host_before, load_before, t0 = host_cpu(), loadavg(), time.monotonic()
        final = wait_rebuilt(node, removed["server"])
        wall = time.monotonic() - t0
        busy, total = (a - b for a, b in zip(host_cpu(), host_before, strict=True))
        cpu = [cpu_seconds(p) - b for p, b in zip(pids + servers, cpu_before, strict=True)]
        load_after = loadavg()

        text = node.log.read_bytes()[log_offset:].decode(errors="replace")
        replacing, done = REPLACING.findall(text), RESYNC_DONE.findall(text)
        stopped = RESYNC_STOPPED.findall(text)
        if len(replacing) != 1 or not done:
            raise RuntimeError(f"expected one replacement and its resync in the log:\n{text}")
        stamp, old, new = replacing[0]
        if old != removed["server"]:
            raise RuntimeError(f"replaced {old}, not the removed {removed['server']}")
        end, chunks, chunks_total, copy_seconds = done[-1]
        chunks, seconds = int(chunks), log_time(end) - log_time(stamp)

        check = verify(node, cluster, final, kept["server"], new, removed["server"], disk3,
                       volume["id"], chunks, digest)
        return {"volume_size": volume_size, "chunks_copied": chunks,
                "chunks_total": int(chunks_total), "bytes_copied": chunks * CHUNK_SIZE,
                "seconds": seconds, "mbps": chunks * CHUNK_SIZE / seconds / 1e6,
                "copy_seconds": float(copy_seconds),
                "copy_mbps": chunks * CHUNK_SIZE / float(copy_seconds) / 1e6,
                "resync_passes": len(done), "resync_stops": [s[1] for s in stopped],
                "volume_write_mbps": write_mbps, "wait_wall_seconds": wall,
                "loadavg_before": load_before, "loadavg_after": load_after,
                "host_busy_pct": 100 * busy / total if total else 0.0,
                "node_cpu_seconds": cpu[0] if pids else None,
                "dataserver_cpu_seconds": cpu[len(pids):], **check}
    except BaseException:
        with contextlib.suppress(Exception):
            sys.stderr.write(f"--- logs (before cleanup) ---\n{cluster.nodes[-1].logs()}\n")
        raise
    finally:
        left = cluster.cleanup()
        if left:
            log(f"  cleanup: LEFT OVER {left}")


def verify(node: Node, cluster: Cluster, final: dict[str, Any], kept: str, new: str,
           removed: str, disk3: Path, volume_id: str, chunks: int, digest: str
           ) -> dict[str, Any]:
    """Step 5: is the rebuilt replica a complete copy? (stops ``node``)"""
    replicas = {r["server"]: r for r in final["replicas"]}
    layout_ok = (set(replicas) == {kept, new} and new != removed
                 and Path(replicas[new]["path"]) == disk3
                 and all(r["state"] == "in_sync" and not r["replaces"]
                         for r in replicas.values()))
    tables = asyncio.run(_generations([replicas[kept], replicas[new]], volume_id))
    written = sum(1 for g in tables[kept] if g)
    generations_equal = tables[kept] == tables[new]
    log(f"  check: replicas {'OK' if layout_ok else 'WRONG'}, generations "
        f"{'equal' if generations_equal else 'DIFFER'}, {chunks} of {written} written chunks "
        f"copied; reading the volume back from the rebuilt replica alone")
    node.stop()
    alone = cluster.start([disk3])
    mountpoint = Path(alone.cli("volume", "attach", VOLUME).stdout.strip())
    readers = [r["server"] for r in inspect(alone)["replicas"] if r["state"] == "in_sync"]
    sha_ok = sha256_of(mountpoint / "data.bin") == digest
    alone.cli("volume", "detach", VOLUME)
    alone.stop()
    verified = (layout_ok and generations_equal and chunks == written and sha_ok
                and readers == [new])
    return {"replicas_ok": layout_ok, "generations_equal": generations_equal,
            "chunks_written": written, "full_copy": chunks == written,
            "read_from": readers, "sha256_ok": sha_ok, "verified": verified}


# --- the benchmark ---------------------------------------------------------------------------

def one_run(index: int, tmp: Path, size: int, rate: str) -> dict[str, Any]:
    base = tmp / f"run{index}"
    base.mkdir()
    try:
        load, source = loadavg(), source_state()
        log(f"run {index}: loadavg {load}; raw fio sequential write of {format_size(size)}")
        raw = raw_seq_write(base, size)
        log(f"  raw {raw:.0f} MB/s")
        run = rebuild_run(base, size, rate)
    finally:
        if not any(leftovers(base).values()):
            shutil.rmtree(base, ignore_errors=True)
    changed = source_state() != source
    if changed:
        log("  WARNING: the sources under src/ changed during this run")
    ratio = run["mbps"] / raw
    verdict = "PASS" if ratio >= TARGET else "MISS"
    log(f"  rebuild {format_size(run['bytes_copied'])} in {run['seconds']:.1f} s: "
        f"{run['mbps']:.0f} MB/s, ratio {ratio:.2f} {verdict}")
    return {"run": index, "raw_seq_write_mbps": raw, "loadavg_start": load, **run,
            "ratio": ratio, "verdict": verdict, "source": source, "source_changed": changed}


def print_table(runs: list[dict[str, Any]], summary: dict[str, Any] | None, rate: str) -> None:
    header = (f"{'run':>6}{'copied':>11}{'seconds':>9}{'MB/s':>7}{'copy s':>8}{'copy MB/s':>11}"
              f"{'raw MB/s':>10}{'ratio':>7}  {'':5}{'verified':>9}  loadavg before -> after")
    print(header)
    for r in runs:
        print(f"{r['run']:>6}{format_size(r['bytes_copied']):>11}{r['seconds']:>9.1f}"
              f"{r['mbps']:>7.0f}{r['copy_seconds']:>8.1f}{r['copy_mbps']:>11.0f}"
              f"{r['raw_seq_write_mbps']:>10.0f}{r['ratio']:>7.2f}  {r['verdict']:5}"
              f"{'yes' if r['verified'] else 'NO':>9}  {' '.join(r['loadavg_start'].split()[:3])}"
              f" -> {' '.join(r['loadavg_after'].split()[:3])}")
    if summary:
        print(f"{'median':>6}{'':11}{summary['seconds']:>9.1f}{summary['mbps']:>7.0f}"
              f"{summary['copy_seconds']:>8.1f}{summary['copy_mbps']:>11.0f}"
              f"{summary['raw_seq_write_mbps']:>10.0f}{summary['ratio']:>7.2f}  "
              f"{summary['verdict']:5}   target: rebuild >= {TARGET} x raw")
    if rate != "0":
        print(f"(rebuild limited to {rate}/s by --rebuild-rate)")
    for r in runs:
        node_cpu = r["node_cpu_seconds"]
        print(f"run {r['run']}: {r['chunks_copied']} of {r['chunks_total']} chunks copied "
              f"({r['chunks_written']} written); during the rebuild wait "
              f"({r['wait_wall_seconds']:.1f} s) the host was {r['host_busy_pct']:.0f}% busy, "
              f"the node used {node_cpu or 0:.1f} s of CPU, the data servers "
              f"{', '.join(f'{c:.1f}' for c in r['dataserver_cpu_seconds'])} s; writing the data "
              f"through the volume ran at {r['volume_write_mbps']:.0f} MB/s")
        if r["source_changed"]:
            print("  the sources under src/ changed during this run")
        if r["resync_passes"] != 1 or r["resync_stops"]:
            print(f"  the copy took {r['resync_passes']} passes; stopped: {r['resync_stops']}")


_signalled: list[str] = []


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    name = signal.Signals(signum).name
    if _signalled:  # the first one is unwinding through the cleanup: let it finish
        log(f"{name} received; still cleaning up")
        return
    _signalled.append(name)
    raise Interrupted(name)


def run_cleanly(prefix: str, body: Callable[[Path], None],
                ) -> tuple[str, int, dict[str, list[str]]]:
    """Run ``body`` in a new directory under /var/tmp, termination signals raising
    ``Interrupted``; then check what it left and remove the directory. Returns (error,
    status, what was left over): status 130 interrupted, 2 failed, 3 something left over (the
    directory is kept for a look), else 0. What ``body`` measured before a failure stays
    where it put it."""
    error, status = "", 0
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    with signals_raise():
        try:
            body(tmp)
        except Interrupted as e:
            error, status = f"interrupted by {e}", 130
        except Exception as e:  # noqa: BLE001 - report, keep what was measured
            error, status = f"{type(e).__name__}: {e}", 2
        finally:
            _signalled.append("done")  # from here on a signal no longer interrupts
            left = {k: v for k, v in leftovers(tmp).items() if v}
            if not left:
                shutil.rmtree(tmp, ignore_errors=True)
    if error:
        log(f"benchmark failed: {error}")
    if left:
        log(f"cleanup: LEFT OVER (and {tmp} kept): {json.dumps(left, indent=2)}")
        status = status or 3
    else:
        log(f"cleanup: OK, no mounts, loop devices or processes left; {tmp} removed")
    return error, status, left


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGINT/SIGTERM/SIGHUP raise ``Interrupted`` once; later ones do not disturb the
    cleanup."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, _interrupt) for s in sigs}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--size", default="4G",
                        help="data written to the volume before the rebuild (default 4G)")
    parser.add_argument("--runs", type=int, default=3, help="runs to take the median of "
                        "(default 3)")
    parser.add_argument("--rate", default="0",
                        help="the node's --rebuild-rate, e.g. 100M (default 0: no limit)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or not shutil.which("fio") or not os.path.exists("/dev/fuse"):
        print("needs root, /dev/fuse and fio (scripts/install-deps.sh --test installs fio)",
              file=sys.stderr)
        return 2
    size = parse_size(args.size)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs: list[dict[str, Any]] = []
    load_start, source = loadavg(), source_state()
    log(f"rebuild benchmark: {args.runs} run(s) of {format_size(size)}; loadavg {load_start}")
    log(f"sources: commit {source['head']}, src/ fingerprint {source['src_sha256']}"
        + (f", uncommitted changes in {source['uncommitted']}" if source["uncommitted"] else ""))

    def body(tmp: Path) -> None:
        for i in range(1, args.runs + 1):
            runs.append(one_run(i, tmp, size, args.rate))

    error, status, left = run_cleanly("cargohold-rebuild-", body)
    load_end = loadavg()
    summary: dict[str, Any] | None = None
    if runs:
        summary = {key: statistics.median(r[key] for r in runs)
                   for key in ("seconds", "mbps", "copy_seconds", "copy_mbps",
                               "raw_seq_write_mbps", "ratio", "bytes_copied")}
        summary["verdict"] = "PASS" if summary["ratio"] >= TARGET else "MISS"
        summary["all_verified"] = all(r["verified"] for r in runs)
        print_table(runs, summary, args.rate)
        if not status and (summary["verdict"] == "MISS" or not summary["all_verified"]):
            status = 1
    print(f"host loadavg: {load_start} at the start, {load_end} at the end "
          f"({os.cpu_count()} CPUs)")
    if not runs:
        return status
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"rebuild-{stamp}.json"
    out.write_text(json.dumps({"timestamp": stamp, "size": size, "runs_asked": args.runs,
                               "rate": args.rate, "target": TARGET, "cpus": os.cpu_count(),
                               "source": source,
                               "loadavg_start": load_start, "loadavg_end": load_end,
                               "median": summary, "runs": runs, "error": error,
                               "left_over": left}, indent=2))
    print(f"results: {out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
