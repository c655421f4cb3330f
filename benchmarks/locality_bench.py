#!/usr/bin/env python3
"""Locality benchmark: reads of a volume attached on a host without its replica, then with
the replica moved there.

Run as root from the repository:  ``python3 benchmarks/locality_bench.py [--size 1G]
[--runtime 15]``

It builds three hosts with the test harness (``tests/hosts.py``: network namespaces on a
private switch, an etcd member and a ``cargohold node`` each, TLS between them), creates a
one-replica volume with ``--locality off``, attaches it on a host that does not hold the
replica and fills a file with fio. Then, on that host, it runs fio (direct I/O, libaio) for
4 KiB random reads (iodepth 32) and 1 MiB sequential reads (iodepth 16), with the page
cache dropped first: every read crosses the network to the other host's data server. It
sets the volume's locality to ``best-effort``, waits until the controller has moved the
replica to the attaching host (the engine fills it while attached), and runs the same jobs
again: now the engine reads the local replica's files. The table shows both and their ratio;
everything goes to ``benchmarks/results/locality-<timestamp>.json``. The hosts are removed
whatever happens.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.hosts import Host, Hosts, skip_reason, wait_for  # noqa: E402  (the one harness)

RESULTS = ROOT / "benchmarks" / "results"
JOBS = [("randread", "randread", "4k", 32), ("seqread", "read", "1M", 16)]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def fio(host: Host, path: str, rw: str, bs: str, depth: int, size: str,
        runtime: int) -> dict[str, Any]:
    host.run("sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches")
    done = host.run("fio", "--name=bench", f"--filename={path}", f"--rw={rw}", f"--bs={bs}",
                    f"--iodepth={depth}", f"--size={size}", "--direct=1", "--ioengine=libaio",
                    "--time_based", f"--runtime={runtime}", "--output-format=json",
                    timeout=runtime + 120)
    text = done.stdout
    side = json.loads(text[text.index("{"):])["jobs"][0]["read"]
    return {"iops": side["iops"], "mbps": side["bw_bytes"] / 1e6,
            "p50_us": side["clat_ns"]["percentile"]["50.000000"] / 1000,
            "p99_us": side["clat_ns"]["percentile"]["99.000000"] / 1000}


def measure(host: Host, path: str, size: str, runtime: int) -> dict[str, Any]:
    results = {}
    for name, rw, bs, depth in JOBS:
        results[name] = fio(host, path, rw, bs, depth, size, runtime)
        r = results[name]
        log(f"  {name:9} {r['mbps']:8.1f} MB/s {r['iops']:9.0f} IOPS  p50 {r['p50_us']:7.0f} us"
            f"  p99 {r['p99_us']:7.0f} us")
    return results


def run(args: argparse.Namespace) -> dict[str, Any]:
    hosts = Hosts(3)
    try:
        hosts.start()
        h1 = hosts[0]
        h1.cli("volume", "create", "bench", "--size", args.volume_size, "--replicas", "1",
               "--locality", "off")
        volume = h1.json("volume", "inspect", "bench")
        home = volume["replicas"][0]["node"]
        user = next(h for h in hosts if h.name != home)
        mountpoint = user.cli("volume", "attach", "bench").stdout.strip()
        path = f"{mountpoint}/data"
        log(f"replica on {home}, attached on {user.name}: filling {args.size}")
        user.run("fio", "--name=fill", f"--filename={path}", "--rw=write", "--bs=1M",
                 f"--size={args.size}", "--direct=1", "--ioengine=libaio", "--iodepth=16",
                 timeout=900)
        log("remote replica (locality off)")
        remote = measure(user, path, args.size, args.runtime)
        t0 = time.monotonic()
        user.cli("volume", "update", "bench", "--locality", "best-effort")

        def local() -> bool:
            v = user.json("volume", "inspect", "bench")
            return ([r["node"] for r in v["replicas"]] == [user.name]
                    and v["replicas"][0]["state"] == "in_sync")

        wait_for(local, 900, "the replica moved to the attaching host", interval=1.0)
        moved_s = time.monotonic() - t0
        log(f"replica moved to {user.name} in {moved_s:.1f} s (while attached)")
        log("local replica (locality best-effort)")
        near = measure(user, path, args.size, args.runtime)
        user.cli("volume", "detach", "bench")
        return {"remote": remote, "local": near, "move_s": moved_s, "size": args.size}
    finally:
        problems = hosts.close()
        if problems:
            log(f"cleanup problems: {problems}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="1G", help="the file read (default 1G)")
    p.add_argument("--volume-size", default="2G")
    p.add_argument("--runtime", type=int, default=15, help="seconds per job (default 15)")
    args = p.parse_args()
    reason = skip_reason()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    result = run(args)
    print()
    print(f"{'job':10} {'metric':8} {'remote':>10} {'local':>10} {'local/remote':>13}")
    for name, _, _, _ in JOBS:
        for metric in ("mbps", "iops", "p50_us", "p99_us"):
            a, b = result["remote"][name][metric], result["local"][name][metric]
            print(f"{name:10} {metric:8} {a:10.1f} {b:10.1f} {b / a if a else 0:13.2f}")
    print(f"\nthe move of the replica took {result['move_s']:.1f} s (volume attached)")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"locality-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
