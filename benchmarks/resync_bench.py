#!/usr/bin/env python3
"""Resync throughput against the raw disk's sequential write bandwidth.

Run as root from the repository:  ``python3 benchmarks/resync_bench.py [--size 4G]``

In one run, on one disk (a temporary directory under /var/tmp):

1. raw: fio sequential write (bs=1M, direct=1, iodepth=16, libaio) of ``--size`` to a plain
   file: the local limit;
2. cargohold: a real node with two data servers, a 2-replica volume attached as ext4; one
   data server is killed (the node restarts it, but its replica is now out of sync), ``--size``
   of random data is written through the mount with fsync, the volume is detached, and the
   controller resyncs the returning replica: every chunk written while it was away is copied.
   The throughput is the bytes the resync copied over the time it took (from its own log
   line), and the ratio to raw is checked against the target (≥ 0.5).

A whole-volume resync is the same copy a rebuild onto a new data server does. Results go to
stdout and ``benchmarks/results/resync-<timestamp>.json``; everything is cleaned up.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from tests.conftest import Node  # noqa: E402

from cargohold.core.sizes import format_size, parse_size  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TARGET = 0.5
MIB = 1 << 20


def raw_seq_write(base: Path, size: int) -> float:
    """MB/s of fio's sequential direct write of ``size`` bytes to a file under ``base``."""
    target = base / "raw.bin"
    out = subprocess.run(
        ["fio", "--name=seqwrite", f"--filename={target}", "--rw=write", "--bs=1M",
         "--direct=1", "--ioengine=libaio", "--iodepth=16", f"--size={size}",
         "--end_fsync=1", "--output-format=json"],
        capture_output=True, text=True, check=True, timeout=600)
    target.unlink()
    job = json.loads(out.stdout)["jobs"][0]["write"]
    return float(job["bw_bytes"]) / 1e6


def fill(path: Path, size: int) -> None:
    block = os.urandom(16 * MIB)
    with open(path, "wb") as f:
        written = 0
        while written < size:
            f.write(block[: min(len(block), size - written)])
            written += min(len(block), size - written)
            # vary the content so nothing can be deduplicated or compressed away
            block = block[1:] + block[:1]
        f.flush()
        os.fsync(f.fileno())


def resync_run(base: Path, size: int, rate: str) -> dict[str, float]:
    node = Node(base / "node", data_servers=2, extra=("--rebuild-rate", rate))
    (base / "node").mkdir()
    try:
        node.start()
        volume_size = size + size // 4 + 256 * MIB  # room for ext4's own blocks
        node.cli("volume", "create", "bench", "--size", str(volume_size), "--replicas", "2")
        mountpoint = Path(node.cli("volume", "attach", "bench").stdout.strip())
        victim = node.json("volume", "inspect", "bench")["replicas"][1]["path"]
        os.kill(json.loads((Path(victim) / "process.json").read_text())["pid"], signal.SIGKILL)
        started = time.monotonic()
        fill(mountpoint / "data.bin", size)
        write_mbps = size / (time.monotonic() - started) / 1e6
        node.cli("volume", "detach", "bench")
        deadline = time.monotonic() + 1800
        pattern = re.compile(r"resync of bench done: (\d+) of (\d+) chunks copied in "
                             r"([\d.]+) s")
        while not (found := pattern.findall(node.logs())):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no resync in 30 min:\n{node.logs()}")
            time.sleep(0.5)
        chunks, total, seconds = int(found[0][0]), int(found[0][1]), float(found[0][2])
        node.cli("volume", "rm", "bench")
        return {"chunks_copied": chunks, "chunks_total": total, "seconds": seconds,
                "mbps": chunks * MIB / seconds / 1e6, "volume_write_mbps": write_mbps}
    finally:
        node.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1G", help="data written while away (default 1G)")
    parser.add_argument("--rate", default="0",
                        help="the node's --rebuild-rate, e.g. 100M (default 0: no limit)")
    args = parser.parse_args()
    if os.geteuid() != 0 or not shutil.which("fio"):
        print("needs root and fio (scripts/install-deps.sh --test installs fio)",
              file=sys.stderr)
        return 2
    size = parse_size(args.size)
    with tempfile.TemporaryDirectory(prefix="cargohold-resync-", dir="/var/tmp") as tmp:
        base = Path(tmp)
        raw = raw_seq_write(base, size)
        run = resync_run(base, size, args.rate)
    ratio = run["mbps"] / raw
    verdict = "PASS" if ratio >= TARGET else "MISS"
    print(f"{'':24}{'MB/s':>10}{'ratio':>8}")
    print(f"{'raw sequential write':24}{raw:>10.0f}{1.0:>8.2f}")
    if args.rate != "0":
        print(f"(resync limited to {args.rate}/s by --rebuild-rate)")
    print(f"{'resync (copy)':24}{run['mbps']:>10.0f}{ratio:>8.2f}   target >= {TARGET} "
          f"{verdict}")
    print(f"copied {run['chunks_copied']} of {run['chunks_total']} chunks "
          f"({format_size(run['chunks_copied'] * MIB)}) in {run['seconds']:.1f} s; "
          f"writing the data through the volume ran at {run['volume_write_mbps']:.0f} MB/s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"resync-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"size": size, "raw_seq_write_mbps": raw, **run,
                               "ratio": ratio, "target": TARGET, "verdict": verdict},
                              indent=2))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
