#!/usr/bin/env python3
"""Resync after a host outage under write load: only what changed is copied.

Run as root from the repository:  ``python3 benchmarks/outage_bench.py [--outage 30]``

One run, on one disk (a temporary directory under /var/tmp):

1. two nodes, h1 and h2, share one SQLite metadata file (``--lease-ttl 2``, the default
   ``--rebuild-after`` so no rebuild starts), each with one data server; a 2-replica volume
   (``--size``, default 2G) is attached as ext4 on h1 and pre-filled with ``--prefill``
   (default 1G) of random data in ``data.bin`` plus the load's file ``load.bin``
   (``--region``, default 64M), with fsync;
2. a write load starts on the mount and runs through the whole scenario: fio randwrite
   (``--bs``, default 4k; direct, libaio, ``--iodepth``; ``--iops`` limit, default none)
   over ``load.bin`` only, so the chunks it can change are few next to the volume's;
3. after ``--warmup`` seconds the host of h2's replica goes down: h2's node and its data
   server are SIGKILLed; after ``--outage`` seconds (default 30) h2 is started again; the
   engine on h1 catches its replica up while the load goes on (``back in sync while in use:
   N of M chunks copied`` in the engine log); the load goes on ``--after`` seconds more;
4. check: the load is stopped, the volume detached, both nodes stopped, and the two replicas'
   chunk files compared (generation tables equal, every byte equal); then h2 alone attaches
   the volume and ``data.bin`` must read back with the sha256 it was written with.

Measured: the chunks copied (from the engine's log line), the chunks in the volume, those
written by the pre-fill, and the chunks that changed while h2 was away, read directly from
the replicas' ``gens`` files: h2's table as it was left by the kill against h1's when h2 is
back (changed during the outage) and when the replica is in sync (an upper bound of what the
copy could have to take); the time from h2 back to in sync; the load's IOPS, MB/s and mean
latency before, during the outage, during the catch-up and after it (fio's per-second logs);
whether any application I/O failed (fio's errors, kernel log lines of the volume's loop
device). PASS: copied <= changed-until-in-sync and copied <= ``MAX_SHARE`` of the pre-filled
chunks, no application error, the replica back in sync, the replicas equal.

The host is shared: /proc/loadavg and the host's CPU use per phase are recorded. Results go to
stdout and ``benchmarks/results/outage-<timestamp>.json``. Whatever happens (errors, Ctrl-C,
SIGTERM, SIGHUP) every process, mount, loop device and temporary directory is removed and the
script checks that nothing is left. Exit status: 0 PASS, 1 MISS or a failed check, 2 an
error, 130 interrupted, 3 something left over.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from array import array
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from rebuild_bench import (  # noqa: E402  (the same host and source records)
    cpu_seconds,
    fill,
    host_cpu,
    loadavg,
    log,
    log_time,
    run_cleanly,
    source_state,
)
from tests.conftest import Node, leftovers, sha256_of  # noqa: E402

from cargohold.core.layout import CHUNK_SIZE  # noqa: E402
from cargohold.core.sizes import format_size, parse_size  # noqa: E402
from cargohold.stores.diskstore import DiskChunkStore  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
VOLUME = "outage"
MAX_SHARE = 0.10  # copied chunks may be at most this share of the pre-filled ones
CATCHUP_TIMEOUT = 600.0
MIB = 1 << 20

_STAMP = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) engine\[\d+\] \w+ "
HEALED = re.compile(_STAMP + rf"{VOLUME}: replica on data server (\w+) back in sync while in "
                    r"use: (\d+) of (\d+) chunks copied in ([\d.]+) s", re.M)
NOT_HEALED = re.compile(_STAMP + rf"({VOLUME}: replica on data server \w+ (?:did not catch up|"
                        r"stops catching up).*)$", re.M)


def gens(data_dir: Path, volume_id: str) -> array[int]:
    """A replica's generation per chunk, read from its ``gens`` file (host byte order; the
    data server maps it shared, so a read sees its writes even while it runs)."""
    return array("Q", (data_dir / "replicas" / volume_id / "gens").read_bytes())


def differ(a: array[int], b: array[int]) -> int:
    return sum(1 for x, y in zip(a, b, strict=True) if x != y)


def written(table: array[int]) -> int:
    return len(table) - table.count(0)


def compare_on_disk(dirs: list[Path], volume_id: str, size: int) -> dict[str, Any]:
    """With both data servers stopped: equal generations and equal bytes, chunk by chunk."""
    stores = [DiskChunkStore(d) for d in dirs]
    try:
        first, second = (s.replica(volume_id) for s in stores)
        generations_equal = first.generations() == second.generations()
        differing = [offset // CHUNK_SIZE for offset in range(0, size, CHUNK_SIZE)
                     if first.read(offset, min(CHUNK_SIZE, size - offset))
                     != second.read(offset, min(CHUNK_SIZE, size - offset))]
    finally:
        for store in stores:
            store.close()
    return {"generations_equal": generations_equal, "chunks_differing": len(differing),
            "first_differing": differing[:10]}


# --- the application's load ------------------------------------------------------------------

class Load:
    """fio randwrite over one file, time based, until ``stop``; per-second logs with unix
    timestamps."""

    def __init__(self, target: Path, logs: Path, bs: str, iodepth: int, iops: int) -> None:
        self.logs = logs
        self.prefix = logs / "load"
        self.argv = ["fio", "--name=load", f"--filename={target}", "--rw=randwrite",
                     f"--bs={bs}", "--direct=1", "--ioengine=libaio", f"--iodepth={iodepth}",
                     "--time_based", "--runtime=86400", "--continue_on_error=io",
                     f"--write_iops_log={self.prefix}", f"--write_lat_log={self.prefix}",
                     "--log_avg_msec=1000", "--log_unix_epoch=1", "--output-format=json",
                     f"--output={logs / 'fio.json'}"]
        if iops:
            self.argv.append(f"--rate_iops={iops}")
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    def start(self) -> None:
        with open(self.logs / "fio.out", "wb") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT)
        self.started = time.time()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> dict[str, Any]:
        """SIGINT (fio ends the run and writes its report; it exits 128 then)."""
        assert self.proc is not None
        early = self.proc.poll() is not None
        if not early:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()
        text = (self.logs / "fio.json").read_text(errors="replace")
        job = json.loads(text[text.index("{"):])["jobs"][0]
        output = (self.logs / "fio.out").read_text(errors="replace").strip()
        return {"exit_status": self.proc.returncode, "ended_early": early,
                "error": job["error"], "total_err": job.get("total_err", 0),
                "total_ios": job["write"]["total_ios"], "iops": job["write"]["iops"],
                "runtime_ms": job["job_runtime"], "output": output[-2000:]}

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def samples(self, kind: str) -> list[tuple[float, float]]:
        """(unix time in s, value) per one-second window: kind ``iops`` or ``lat`` (ns)."""
        out = []
        for line in Path(f"{self.prefix}_{kind}.1.log").read_text().splitlines():
            fields = [f.strip() for f in line.split(",")]
            if len(fields) >= 2:
                out.append((int(fields[0]) / 1000, float(fields[1])))
        return out


def phase_stats(iops: list[tuple[float, float]], lat: list[tuple[float, float]],
                start: float, end: float, bs: int) -> dict[str, Any]:
    """The load over (start, end]: each one-second sample is counted whole in the phase its
    window ends in, so boundaries are good to about a second."""
    ios = seconds = 0.0
    zero = 0
    previous = iops[0][0] - 1.0 if iops else 0.0
    for t, value in iops:
        window = t - previous
        previous = t
        if start < t <= end:
            ios += value * window
            seconds += window
            zero += value == 0
    lats = [(v, n) for (t, v), (_, n) in zip(lat, iops, strict=False) if start < t <= end]
    weight = sum(n for _, n in lats)
    return {"seconds": seconds, "ios": ios, "iops": ios / seconds if seconds else 0.0,
            "mbps": ios * bs / seconds / 1e6 if seconds else 0.0,
            "mean_lat_ms": sum(v * n for v, n in lats) / weight / 1e6 if weight else None,
            "worst_second_lat_ms": max((v for v, _ in lats), default=0.0) / 1e6,
            "seconds_without_io": zero}


# --- the cluster -------------------------------------------------------------------------------

def _our_processes(base: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if str(base).encode() in cmdline:
            pids.append(int(proc.name))
    return pids


def cleanup(base: Path, nodes: list[Node], load: Load | None) -> dict[str, list[str]]:
    if load is not None:
        load.kill()
    for node in nodes:
        node.cleanup()
    for pid in _our_processes(base):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while (left := {k: v for k, v in leftovers(base).items() if v}) \
            and time.monotonic() < deadline:
        time.sleep(0.2)  # SIGKILLed processes and lazy unmounts take a moment
    return left


def loop_device(base: Path) -> str:
    for loop in Path("/sys/block").glob("loop*"):
        with contextlib.suppress(OSError):
            if (loop / "loop" / "backing_file").read_text().startswith(str(base)):
                return loop.name
    return ""


def kernel_log() -> list[str]:
    done = subprocess.run(["dmesg"], capture_output=True, text=True, check=False)
    return done.stdout.splitlines()


def states(node: Node, victim: Path) -> str:
    view = node.json("volume", "inspect", VOLUME)
    assert isinstance(view, dict)
    return next(r["state"] for r in view["replicas"] if Path(r["path"]) == victim)


def outage_run(base: Path, args: argparse.Namespace) -> dict[str, Any]:
    size, prefill, region = (parse_size(v) for v in (args.size, args.prefill, args.region))
    bs = parse_size(args.bs)
    meta = f"sqlite://{base / 'meta.db'}"
    nodes: list[Node] = []
    load: Load | None = None
    phases_cpu: dict[str, tuple[int, int]] = {}
    try:
        for name in ("h1", "h2"):
            (base / name).mkdir()
            nodes.append(Node(base / name, data_servers=1, name=name,
                              extra=("--metadata", meta, "--lease-ttl", "2")))
            nodes[-1].start(timeout=60.0)
        h1, h2 = nodes
        h1.cli("volume", "create", VOLUME, "--size", str(size), "--replicas", "2")
        mountpoint = Path(h1.cli("volume", "attach", VOLUME).stdout.strip())
        volume = h1.json("volume", "inspect", VOLUME)
        assert isinstance(volume, dict)
        volume_id = volume["id"]
        d1, d2 = h1.data_dirs[0], h2.data_dirs[0]
        assert {Path(r["path"]) for r in volume["replicas"]} == {d1, d2}, volume["replicas"]
        loop = loop_device(base)
        dmesg_before = len(kernel_log())

        log(f"pre-fill: {format_size(prefill)} in data.bin, {format_size(region)} in "
            f"load.bin, through {mountpoint} ({loop})")
        t0 = time.monotonic()
        digest = fill(mountpoint / "data.bin", prefill)
        fill(mountpoint / "load.bin", region)
        prefill_mbps = (prefill + region) / (time.monotonic() - t0) / 1e6
        g_prefill = gens(d1, volume_id)

        load = Load(mountpoint / "load.bin", base, args.bs, args.iodepth, args.iops)
        log(f"load: fio randwrite bs={args.bs} iodepth={args.iodepth} over load.bin"
            + (f", at most {args.iops} IOPS" if args.iops else ", no rate limit")
            + f"; {args.warmup:.0f} s before the outage")
        load.start()
        cpu_mark = host_cpu()
        time.sleep(args.warmup)
        if not load.running():
            raise RuntimeError(f"fio ended early:\n{load.stop()['output']}")

        h2.kill()  # the host goes down: its node and its data server
        for pid in h2.dataserver_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        t_kill = time.time()
        phases_cpu["before"], cpu_mark = _busy(cpu_mark), host_cpu()
        g_h1_kill = gens(d1, volume_id)
        time.sleep(0.5)  # a killed process's last writes to its mapped gens are in already
        g_h2_dead = gens(d2, volume_id)
        load_at_kill = loadavg()
        log(f"h2 down (node and data server SIGKILLed); loadavg {load_at_kill}")
        seen_outage = set()
        while time.time() < t_kill + args.outage:
            seen_outage.add(states(h1, d2))
            if not load.running():
                raise RuntimeError(f"fio ended during the outage:\n{load.stop()['output']}")
            time.sleep(min(2.0, max(0.0, t_kill + args.outage - time.time())))
        t_restart = time.time()
        phases_cpu["outage"], cpu_mark = _busy(cpu_mark), host_cpu()
        log_file = next(h1.state.glob(f"engines/{VOLUME}/engine.log"))
        log_offset = log_file.stat().st_size
        engine_pid = h1.engine_pids()[0]
        cpu_before = {"engine": cpu_seconds(engine_pid),
                      "h1_dataserver": cpu_seconds(h1.dataserver_pids()[0])}
        h2.start(timeout=60.0)
        t_back = time.time()
        g_h1_back = gens(d1, volume_id)
        log(f"h2 back after {t_back - t_kill:.1f} s (start took {t_back - t_restart:.1f} s); "
            f"waiting for its replica to catch up")

        seen_catchup: set[str] = set()
        failures: list[str] = []
        healed: tuple[str, ...] | None = None
        next_inspect = 0.0
        while healed is None:
            text = log_file.read_bytes()[log_offset:].decode(errors="replace")
            found = HEALED.findall(text)
            failures = [f[1] for f in NOT_HEALED.findall(text)]
            if found:
                healed = found[0]
                break
            if time.time() > t_back + CATCHUP_TIMEOUT:
                raise RuntimeError(f"not back in sync in {CATCHUP_TIMEOUT:.0f} s; "
                                   f"states {seen_catchup}\n{h1.logs()}")
            if not load.running():
                raise RuntimeError(f"fio ended during the catch-up:\n{load.stop()['output']}")
            if time.monotonic() >= next_inspect:
                seen_catchup.add(states(h1, d2))
                next_inspect = time.monotonic() + 1.0
            time.sleep(0.2)
        t_in_sync = log_time(healed[0])
        seen_catchup.add(states(h1, d2))
        g_h1_sync = gens(d1, volume_id)
        phases_cpu["catch-up"], cpu_mark = _busy(cpu_mark), host_cpu()
        cpu_used = {"engine": cpu_seconds(engine_pid) - cpu_before["engine"],
                    "h1_dataserver": cpu_seconds(h1.dataserver_pids()[0])
                    - cpu_before["h1_dataserver"],
                    "h2_dataserver": sum(cpu_seconds(p) for p in h2.dataserver_pids())}
        load_at_sync = loadavg()
        log(f"in sync {t_in_sync - t_back:.1f} s after h2 was back: {healed[2]} of {healed[3]} "
            f"chunks copied in {healed[4]} s; load goes on {args.after:.0f} s more")
        time.sleep(args.after)
        t_stop = time.time()
        fio = load.stop()
        phases_cpu["after"] = _busy(cpu_mark)
        read_only = any(line.split()[1] == str(mountpoint) and "ro" in line.split()[3].split(",")
                        for line in Path("/proc/mounts").read_text().splitlines())
        g_h1_end, g_h2_end = gens(d1, volume_id), gens(d2, volume_id)
        kernel = [line for line in kernel_log()[dmesg_before:]
                  if loop and re.search(rf"\b{loop}\b", line)]
        kernel_errors = [line for line in kernel if re.search(r"error|fail", line, re.I)]

        iops, lat = load.samples("iops"), load.samples("lat")
        bounds = {"before": (t_kill - args.warmup, t_kill), "outage": (t_kill, t_back),
                  "catch-up": (t_back, t_in_sync), "after": (t_in_sync, t_stop)}
        phases = {name: phase_stats(iops, lat, a, b, bs) for name, (a, b) in bounds.items()}
        for name, (busy, total) in phases_cpu.items():
            phases[name]["host_busy_pct"] = 100 * busy / total if total else 0.0

        log("check: detach, stop both nodes, compare the replicas' chunk files")
        h1.cli("volume", "detach", VOLUME)
        final = h1.json("volume", "inspect", VOLUME)
        assert isinstance(final, dict)
        replica_states = {Path(r["path"]).parent.name: r["state"] for r in final["replicas"]}
        h1.stop()
        h2.stop()
        on_disk = compare_on_disk([d1, d2], volume_id, size)
        log("check: h2 alone attaches the volume; data.bin read back from its replica")
        h2.start(timeout=60.0)
        mountpoint = Path(h2.cli("volume", "attach", VOLUME).stdout.strip())
        alone = h2.json("volume", "inspect", VOLUME)
        assert isinstance(alone, dict)
        readers = [Path(r["path"]).parent.name for r in alone["replicas"]
                   if r["state"] == "in_sync"]
        sha_ok = sha256_of(mountpoint / "data.bin") == digest
        h2.cli("volume", "detach", VOLUME)
        h2.stop()

        copied, total = int(healed[2]), int(healed[3])
        return {
            "volume_size": size, "prefill": prefill, "region": region, "bs": bs,
            "chunks_total": total, "chunks_volume": -(-size // CHUNK_SIZE),
            "chunks_prefilled": written(g_prefill),
            "chunks_copied": copied, "copy_seconds": float(healed[4]),
            "changed_during_outage": differ(g_h2_dead, g_h1_back),
            "changed_until_in_sync": differ(g_h2_dead, g_h1_sync),
            "changed_by_load_all_run": differ(g_prefill, g_h1_end),
            "h1_h2_differ_at_kill": differ(g_h1_kill, g_h2_dead),
            "region_chunks": -(-region // CHUNK_SIZE),
            "outage_seconds": t_back - t_kill, "h2_start_seconds": t_back - t_restart,
            "back_to_in_sync_seconds": t_in_sync - t_back,
            "states_during_outage": sorted(seen_outage),
            "states_during_catch_up": sorted(seen_catchup),
            "catch_up_failures": failures, "phases": phases, "fio": fio,
            "kernel_lines": kernel, "kernel_errors": kernel_errors,
            "read_only_after": read_only,
            "live_gens_equal_before_detach": g_h1_end == g_h2_end,
            "cpu_seconds_during_catch_up": cpu_used, "prefill_mbps": prefill_mbps,
            "loadavg_at_kill": load_at_kill, "loadavg_at_in_sync": load_at_sync,
            "replica_states_after_detach": replica_states, **on_disk,
            "read_back_from": readers, "sha256_ok": sha_ok,
            "verified": (on_disk["generations_equal"] and not on_disk["chunks_differing"]
                         and set(replica_states.values()) == {"in_sync"} and sha_ok
                         and readers == ["h2"]),
        }
    except BaseException:
        with contextlib.suppress(Exception):
            for node in nodes:
                sys.stderr.write(f"--- {node.name} logs (before cleanup) ---\n{node.logs()}\n")
        raise
    finally:
        left = cleanup(base, nodes, load)
        if left:
            log(f"cleanup: LEFT OVER {left}")


def _busy(mark: tuple[int, int]) -> tuple[int, int]:
    now = host_cpu()
    return now[0] - mark[0], now[1] - mark[1]


# --- the benchmark ---------------------------------------------------------------------------

def verdict(r: dict[str, Any]) -> tuple[str, list[str]]:
    misses = []
    if r["chunks_copied"] > MAX_SHARE * r["chunks_prefilled"]:
        misses.append(f"copied {r['chunks_copied']} > {MAX_SHARE:.0%} of the "
                      f"{r['chunks_prefilled']} pre-filled chunks")
    if r["chunks_copied"] > r["changed_until_in_sync"]:
        misses.append(f"copied {r['chunks_copied']} > {r['changed_until_in_sync']} chunks "
                      f"changed until in sync")
    fio = r["fio"]
    if fio["error"] or fio["total_err"] or fio["ended_early"] or r["kernel_errors"] \
            or r["read_only_after"]:
        misses.append("the application saw I/O errors")
    if not r["verified"]:
        misses.append("the replicas did not check out")
    return ("MISS" if misses else "PASS"), misses


def print_table(r: dict[str, Any]) -> None:
    mib = CHUNK_SIZE / MIB
    print(f"chunks ({mib:.0f} MiB):")
    for label, key in (("in the volume", "chunks_total"),
                       ("written by the pre-fill", "chunks_prefilled"),
                       ("in the load's file (load.bin)", "region_chunks"),
                       ("changed while h2 was away", "changed_during_outage"),
                       ("changed until in sync (upper bound)", "changed_until_in_sync"),
                       ("COPIED by the catch-up", "chunks_copied")):
        print(f"  {label:38}{r[key]:>7}")
    print(f"h2 away {r['outage_seconds']:.1f} s (its start took {r['h2_start_seconds']:.1f} s); "
          f"back -> in sync {r['back_to_in_sync_seconds']:.1f} s, the copy itself "
          f"{r['copy_seconds']:.1f} s")
    print(f"h2's replica: {', '.join(r['states_during_outage'])} during the outage; "
          f"{', '.join(r['states_during_catch_up'])} while catching up")
    print(f"{'load (fio randwrite)':22}{'seconds':>8}{'IOPS':>8}{'MB/s':>7}{'mean ms':>9}"
          f"{'worst 1s ms':>12}{'0-IO s':>7}{'host busy':>10}")
    for name, p in r["phases"].items():
        mean = f"{p['mean_lat_ms']:.2f}" if p["mean_lat_ms"] is not None else "-"
        print(f"  {name:20}{p['seconds']:>8.0f}{p['iops']:>8.0f}{p['mbps']:>7.1f}{mean:>9}"
              f"{p['worst_second_lat_ms']:>12.1f}{p['seconds_without_io']:>7}"
              f"{p['host_busy_pct']:>9.0f}%")
    fio = r["fio"]
    print(f"application errors: fio error {fio['error']}, {fio['total_err']} failed I/Os, "
          f"{'ended early, ' if fio['ended_early'] else ''}{len(r['kernel_errors'])} kernel "
          f"error lines for the loop device, mount {'READ-ONLY' if r['read_only_after'] else 'rw'}"
          f"; {fio['total_ios']} writes done")
    cpu = r["cpu_seconds_during_catch_up"]
    print(f"CPU during the catch-up: engine {cpu['engine']:.1f} s, h1 data server "
          f"{cpu['h1_dataserver']:.1f} s, h2 data server {cpu['h2_dataserver']:.1f} s")
    print(f"check: replicas {r['replica_states_after_detach']}, generations "
          f"{'equal' if r['generations_equal'] else 'DIFFER'}, {r['chunks_differing']} chunks "
          f"with different bytes; data.bin read from {r['read_back_from']} alone: sha256 "
          f"{'ok' if r['sha256_ok'] else 'WRONG'}")
    for failure in r["catch_up_failures"]:
        print(f"  engine: {failure}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--size", default="2G", help="volume size (default 2G)")
    parser.add_argument("--prefill", default="1G", help="data.bin written first (default 1G)")
    parser.add_argument("--region", default="64M",
                        help="the load's file, written with the pre-fill (default 64M)")
    parser.add_argument("--bs", default="4k", help="the load's block size (default 4k)")
    parser.add_argument("--iodepth", type=int, default=4, help="the load's iodepth (default 4)")
    parser.add_argument("--iops", type=int, default=0,
                        help="the load's IOPS limit (default 0: none)")
    parser.add_argument("--warmup", type=float, default=10.0,
                        help="seconds of load before the outage (default 10)")
    parser.add_argument("--outage", type=float, default=30.0,
                        help="seconds h2 is down (default 30)")
    parser.add_argument("--after", type=float, default=10.0,
                        help="seconds of load after the replica is in sync (default 10)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or not shutil.which("fio") or not os.path.exists("/dev/fuse"):
        print("needs root, /dev/fuse and fio (scripts/install-deps.sh --test installs fio)",
              file=sys.stderr)
        return 2
    stamp = time.strftime("%Y%m%d-%H%M%S")
    load_start, source = loadavg(), source_state()
    log(f"outage benchmark: {args.outage:.0f} s outage under write load; loadavg {load_start}")
    log(f"sources: commit {source['head']}, src/ fingerprint {source['src_sha256']}"
        + (f", uncommitted changes in {source['uncommitted']}" if source["uncommitted"] else ""))
    run: dict[str, Any] | None = None

    def body(tmp: Path) -> None:
        nonlocal run
        run = outage_run(tmp, args)

    error, status, left = run_cleanly("cargohold-outage-", body)
    load_end = loadavg()
    changed = source_state() != source
    if run is not None:
        run["verdict"], run["misses"] = verdict(run)
        print_table(run)
        print(f"verdict: {run['verdict']}  (copied <= {MAX_SHARE:.0%} of the pre-filled chunks "
              f"and <= those changed until in sync; no application error; replicas equal)")
        for miss in run["misses"]:
            print(f"  {miss}")
        if not status and run["verdict"] == "MISS":
            status = 1
    if changed:
        print("the sources under src/ changed during this run")
    print(f"host loadavg: {load_start} at the start, {load_end} at the end "
          f"({os.cpu_count()} CPUs)")
    if run is None:
        return status
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"outage-{stamp}.json"
    out.write_text(json.dumps({"timestamp": stamp, "args": vars(args), "cpus": os.cpu_count(),
                               "source": source, "source_changed": changed,
                               "loadavg_start": load_start, "loadavg_end": load_end,
                               "max_share": MAX_SHARE, **run, "error": error,
                               "left_over": left}, indent=2))
    print(f"results: {out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
