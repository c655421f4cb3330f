#!/usr/bin/env python3
"""Reads that miss the page cache, and what they do to the other volumes of a data server.

Run as root from the repository:  ``python3 benchmarks/coldread_bench.py [--size 1G]``

One data server (a real process, plaintext TCP on 127.0.0.1, a directory under /var/tmp)
holds two replicas: ``cold``, ``--size`` of random data whose pages are then dropped from the
cache, and ``warm``, 64 MiB written just before. For ``--seconds`` each phase:

1. raw: fio random 4 KiB reads of a plain file of ``--size`` (direct=1, libaio, iodepth
   ``--depth``): what the disk gives;
2. probe alone: 4 KiB writes and reads of ``warm``, one at a time (QD1): their latency;
3. probe while ``--depth`` random 4 KiB reads of ``cold`` are in flight through the same
   data server: the cold reads' IOPS against raw, and the probe's latency against phase 2;
4. the same once ``cold`` is all in the page cache: what the reads' CPU alone costs the
   probe (two cores: client and server share them), against which phase 3 is judged.

A data server that reads on its event loop stalls the probe behind every read that waits for
the disk; one that leaves such reads to threads keeps the probe's latency near phase 2's and
reads the cold replica with the disk's parallelism. Results go to stdout and
``benchmarks/results/coldread-<timestamp>.json``. Everything started is stopped and the
directory removed, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from cargohold.clients.dataclient import DataClient  # noqa: E402
from cargohold.core.sizes import parse_size  # noqa: E402

MIB = 1 << 20
BLOCK = 4096


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def fio_randread(path: Path, size: int, depth: int, seconds: float) -> float:
    with open(path, "wb") as f:
        for _ in range(size // MIB):
            f.write(os.urandom(MIB))
        os.fsync(f.fileno())
    drop_caches()
    done = subprocess.run(["fio", "--name=raw", f"--filename={path}", "--rw=randread",
                           "--bs=4k", "--direct=1", "--ioengine=libaio", f"--iodepth={depth}",
                           f"--size={size}", f"--runtime={seconds}", "--time_based",
                           "--output-format=json"], capture_output=True, text=True, check=True)
    path.unlink()
    return float(json.loads(done.stdout)["jobs"][0]["read"]["iops"])


def percentiles(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {"n": len(ordered), "p50_us": ordered[len(ordered) // 2] * 1e6,
            "p99_us": ordered[int(len(ordered) * 0.99)] * 1e6, "max_us": ordered[-1] * 1e6,
            "mean_us": statistics.fmean(ordered) * 1e6}


async def probe(client: DataClient, volume: str, until: float) -> dict[str, Any]:
    """QD1 4 KiB writes then reads of the warm replica, until ``until``."""
    writes: list[float] = []
    reads: list[float] = []
    data = os.urandom(BLOCK)
    generation = 100
    while time.monotonic() < until:
        offset = random.randrange(64 * MIB // BLOCK) * BLOCK
        generation += 1
        started = time.perf_counter()
        await client.write(volume, 1, offset, data, generation)
        writes.append(time.perf_counter() - started)
        started = time.perf_counter()
        await client.read(volume, 1, offset, BLOCK)
        reads.append(time.perf_counter() - started)
    return {"write": percentiles(writes), "read": percentiles(reads)}


async def cold_reads(client: DataClient, volume: str, size: int, depth: int,
                     until: float) -> float:
    done = 0

    async def one_at_a_time() -> None:
        nonlocal done
        while time.monotonic() < until:
            await client.read(volume, 1, random.randrange(size // BLOCK) * BLOCK, BLOCK)
            done += 1

    started = time.monotonic()
    await asyncio.gather(*(one_at_a_time() for _ in range(depth)))
    return done / (time.monotonic() - started)


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(address: str, pid: int, size: int, depth: int,
                  seconds: float) -> dict[str, Any]:
    cold, warm = uuid.uuid4().hex, uuid.uuid4().hex
    async with DataClient(address) as loader:
        await loader.create(cold, size)
        await loader.create(warm, 64 * MIB)
        for volume in (cold, warm):
            await loader.fence(volume, 1)
        chunk = os.urandom(MIB)
        for offset in range(0, size, MIB):
            await loader.write(cold, 1, offset, chunk, 1)
        for offset in range(0, 64 * MIB, MIB):
            await loader.write(warm, 1, offset, chunk, 1)
        await loader.flush(cold, 1)
        await loader.flush(warm, 1)
    drop_caches()
    async with DataClient(address) as prober, DataClient(address) as reader:
        for volume in (cold, warm):  # connect, and read the warm replica back into the cache
            await reader.read(volume, 1, 0, BLOCK)
        for offset in range(0, 64 * MIB, MIB):
            await prober.read(warm, 1, offset, MIB)
        alone = await probe(prober, warm, time.monotonic() + seconds)
        until = time.monotonic() + seconds
        cpu = cpu_seconds(pid)
        loaded, iops = await asyncio.gather(probe(prober, warm, until),
                                            cold_reads(reader, cold, size, depth, until))
        cold_cpu = cpu_seconds(pid) - cpu
        for offset in range(0, size, MIB):  # the whole cold replica into the cache
            await reader.read(cold, 1, offset, MIB)
        until = time.monotonic() + seconds
        cpu = cpu_seconds(pid)
        cached, cached_iops = await asyncio.gather(probe(prober, warm, until),
                                                   cold_reads(reader, cold, size, depth, until))
        cached_cpu = cpu_seconds(pid) - cpu
    return {"probe_alone": alone, "probe_with_cold_reads": loaded, "cold_read_iops": iops,
            "probe_with_cached_reads": cached, "cached_read_iops": cached_iops,
            "server_cpu_share_cold": cold_cpu / seconds,
            "server_cpu_share_cached": cached_cpu / seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1G", help="the cold replica's size (default 1G)")
    parser.add_argument("--depth", type=int, default=16, help="cold reads in flight")
    parser.add_argument("--seconds", type=float, default=10.0, help="per phase")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("run as root: it drops the page cache", file=sys.stderr)
        return 2
    size = parse_size(args.size)
    base = Path(tempfile.mkdtemp(prefix="coldread-", dir="/var/tmp"))
    server: subprocess.Popen[bytes] | None = None
    try:
        raw = fio_randread(base / "raw", size, args.depth, args.seconds)
        ready = base / "ready.json"
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        server = subprocess.Popen([sys.executable, "-m", "cargohold.daemons.dataserver",
                                   "--dir", str(base / "disk"), "--listen", "127.0.0.1:0",
                                   "--ready-file", str(ready), "--insecure-plaintext"],
                                  env=env, stdout=subprocess.DEVNULL,
                                  stderr=open(base / "server.log", "wb"))
        deadline = time.monotonic() + 15
        while not ready.exists() or not ready.read_text().strip():
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit((base / "server.log").read_text())
            time.sleep(0.05)
        address = json.loads(ready.read_text())["address"]
        result = asyncio.run(measure(address, server.pid, size, args.depth, args.seconds))
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        shutil.rmtree(base, ignore_errors=True)
    result["raw_randread_iops"] = raw
    alone, loaded = result["probe_alone"], result["probe_with_cold_reads"]
    print(f"raw random 4K reads (fio, QD{args.depth}, direct): {raw:,.0f} IOPS")
    print(f"cold random 4K reads through the data server (QD{args.depth}): "
          f"{result['cold_read_iops']:,.0f} IOPS = {result['cold_read_iops'] / raw:.2f} of raw")
    print(f"the same reads once all in the page cache: {result['cached_read_iops']:,.0f} IOPS")
    print(f"data server CPU: {result['server_cpu_share_cold']:.2f} of a core with cold reads, "
          f"{result['server_cpu_share_cached']:.2f} with cached ones")
    for op in ("write", "read"):
        a, b, c = alone[op], loaded[op], result["probe_with_cached_reads"][op]
        print(f"probe {op} QD1 on the warm replica (alone / with cold reads / with cached "
              f"reads): p50 {a['p50_us']:.0f} / {b['p50_us']:.0f} / {c['p50_us']:.0f} us, "
              f"p99 {a['p99_us']:.0f} / {b['p99_us']:.0f} / {c['p99_us']:.0f} us, "
              f"max {a['max_us']:.0f} / {b['max_us']:.0f} / {c['max_us']:.0f} us")
    out = ROOT / "benchmarks" / "results" / \
        f"coldread-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"args": vars(args), **result}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
