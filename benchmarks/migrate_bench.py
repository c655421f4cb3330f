#!/usr/bin/env python3
"""Migration between clusters benchmark: a 4 GiB volume under fio random writes moved live
to another cluster, the replication lag under the same load, and a container moved with its
volume by the companion.

Run as root from the repository:  ``python3 benchmarks/migrate_bench.py [--iops 2000]``

The test harness (``tests/hosts.py``) builds four hosts in two cargohold clusters of two
(each with its own etcd, CA and a dockerd per host; volumes have 2 replicas, on both hosts
of their cluster); h1's cluster has h3's as the remote ``dr``. Three measurements:

* **migration**: a 4 GiB volume with 2 GiB written is attached on h1 and fio writes 4 KiB
  blocks at random over 1 GiB of it (direct I/O, ``--iops`` per second) while ``volume
  migrate --to dr`` runs. Reported: each round's bytes and seconds, the bytes copied against
  the volume's used size, and the pause writers saw at the handover (target <= 500 ms);
  the 1 GiB written before the load must read back whole on the promoted copy (fio's verify
  pattern is checked there).
* **lag**: another volume (1 GiB written) is replicated to dr every 10 s under the same fio
  load; its lag (``volume inspect``: the age of the point dr holds) is sampled every second
  for ``--lag-seconds``.
* **companion**: a busybox container appending and syncing a line to its volume 20 times a
  second is moved to h3 with ``cargohold container migrate`` (``--runs`` times): its
  downtime (target <= 3 s) and that no line was lost.

Results go to stdout and ``benchmarks/results/migrate-<timestamp>.json``; the hosts are
removed whatever happens. Exit status 0 when both targets were met and nothing was lost.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.hosts import IMAGE, REMOTE_TOKEN, Host, Hosts, skip_reason, wait_for  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MIB = 1 << 20
TARGET_PAUSE = 0.5
TARGET_DOWNTIME = 3.0
APP = ("i=$(wc -l < /data/log 2>/dev/null || echo 0); "
       "while true; do echo $i >> /data/log; sync /data/log; i=$((i+1)); sleep 0.05; done")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def fio_load(host: Host, path: str, iops: int, seconds: int) -> Any:
    """Start fio writing 4 KiB blocks at random over 1 GiB of ``path`` (a verify pattern
    in each block, so that a copy can be checked), in the background."""
    return host.popen(["fio", "--name=load", f"--filename={path}", "--rw=randwrite",
                       "--bs=4k", "--size=1G", "--direct=1", "--ioengine=libaio",
                       "--iodepth=8", f"--rate_iops={iops}", "--time_based",
                       f"--runtime={seconds}", "--verify=crc32c", "--do_verify=0",
                       "--verify_state_save=0"], host.base / "fio.log")


def fill(host: Host, path: str, size: str) -> None:
    host.run("fio", "--name=fill", f"--filename={path}", "--rw=write", "--bs=1M",
             f"--size={size}", "--direct=1", "--ioengine=libaio", "--iodepth=4",
             "--verify=crc32c", "--do_verify=0", timeout=600)


def inspect(host: Host, name: str) -> dict[str, Any]:
    return dict(host.json("volume", "inspect", name))


def migration(h1: Host, h3: Host, iops: int) -> dict[str, Any]:
    h1.cli("volume", "create", "mig", "--size", "4G")
    mount = h1.cli("volume", "attach", "mig").stdout.strip()
    fill(h1, f"{mount}/filled", "1G")
    fill(h1, f"{mount}/load", "1G")
    load = fio_load(h1, f"{mount}/load", iops, 600)
    time.sleep(5)
    started = time.monotonic()
    done = h1.cli("volume", "migrate", "mig", "--to", "dr", "--wait", "-o", "json",
                  timeout=1800, check=False)
    took = time.monotonic() - started
    load.kill()
    load.wait()
    moved = json.loads(done.stdout)["migration"] if done.returncode == 0 else None
    if moved is None or moved["state"] != "done":
        raise RuntimeError(f"migration failed: {done.stdout}{done.stderr}")
    h1.cli("volume", "detach", "mig", check=False)
    # the promoted copy: fio's blocks check (the ones written after the handover failed)
    there = h3.cli("volume", "attach", "mig").stdout.strip()
    verify = h3.run("fio", "--name=check", f"--filename={there}/filled", "--rw=read",
                    "--bs=1M", "--size=1G", "--verify=crc32c", "--verify_only",
                    check=False, timeout=600)
    h3.cli("volume", "detach", "mig")
    steps = [line.split("cargohold.services.", 1)[1] for line in
             (h1.base / "node.log").read_text(errors="replace").splitlines()
             if "replication of mig" in line or "migration of mig" in line]
    steps += [line.split("cargohold.services.", 1)[1] for line in
              (h3.base / "node.log").read_text(errors="replace").splitlines()
              if "standby mig holds" in line]
    steps += [line.split(" INFO ", 1)[-1] for line in  # each cut's hold, in steps
              h1.engine_log("mig").splitlines() if "writes held" in line]
    for line in steps:
        log(f"  {line}")
    sent = sum(r["bytes"] for r in moved["rounds"])
    written = 2 * 1024 * MIB
    result = {"rounds": moved["rounds"], "bytes_sent": sent, "bytes_written": written,
              "sent_over_used": round(sent / written, 3), "held_s": moved["held"],
              "seconds": round(took, 1), "verified": verify.returncode == 0,
              "log": steps}
    rounds = ", ".join(f"{r['bytes'] / MIB:.0f} MiB in {r['seconds']:.1f} s"
                       for r in moved["rounds"])
    log(f"migration: {len(moved['rounds'])} rounds ({rounds}); "
        f"sent {sent / MIB:.0f} MiB for {written / MIB:.0f} MiB written "
        f"({result['sent_over_used']:.2f}x); writes held {moved['held'] * 1000:.0f} ms; "
        f"{took:.1f} s in all; data verified there: {result['verified']}")
    return result


def lag(h1: Host, iops: int, seconds: int) -> dict[str, Any]:
    h1.cli("volume", "create", "rep", "--size", "4G")
    mount = h1.cli("volume", "attach", "rep").stdout.strip()
    fill(h1, f"{mount}/load", "1G")
    h1.cli("volume", "replicate", "rep", "--to", "dr", "--every", "10s", "--wait",
           timeout=1800)
    load = fio_load(h1, f"{mount}/load", iops, seconds + 30)
    samples: list[float] = []
    sent: list[int] = []
    for _ in range(seconds):
        rep = inspect(h1, "rep")["replication"]
        if rep["lag"] is not None:
            samples.append(rep["lag"])
        sent.append(rep["last_bytes"])
        time.sleep(1)
    load.kill()
    load.wait()
    h1.cli("volume", "detach", "rep")
    result = {"every_s": 10, "samples": len(samples), "lag_median_s": statistics.median(samples),
              "lag_max_s": max(samples), "round_bytes_median": statistics.median(sent)}
    log(f"lag under {iops} IOPS of random writes, copies every 10 s: median "
        f"{result['lag_median_s']:.1f} s, max {result['lag_max_s']:.1f} s; a round sends "
        f"{result['round_bytes_median'] / MIB:.1f} MiB (median)")
    return result


def companion(h1: Host, h3: Host, run: int) -> dict[str, Any]:
    name, volume = f"app{run}", f"appdata{run}"
    h1.docker("volume", "create", "-d", "cargohold", "--name", volume, "-o", "size=1G")
    h1.docker("run", "-d", "--name", name, "-v", f"{volume}:/data", IMAGE, "sh", "-c", APP)
    wait_for(lambda: len(h1.docker("exec", name, "cat", "/data/log").stdout.split()) > 40,
             60, "the app to write")
    done = h1.cli("container", "migrate", name, "--docker", f"unix://{h1.docker_socket}",
                  "--to", "dr", "--target-docker", f"unix://{h3.docker_socket}", "-o", "json",
                  timeout=600)
    moved = json.loads(done.stdout)
    time.sleep(2)
    lines = [int(x) for x in h3.docker("exec", name, "cat", "/data/log").stdout.split()]
    h3.docker("rm", "-f", name)
    lossless = lines == list(range(len(lines)))
    log(f"companion run {run}: down {moved['downtime']:.2f} s (handover "
        f"{moved['handover']:.2f} s, writes held {moved['held'] * 1000:.0f} ms); "
        f"{len(lines)} lines, none lost: {lossless}")
    return {"downtime_s": moved["downtime"], "handover_s": moved["handover"],
            "held_s": moved["held"], "lines": len(lines), "lossless": lossless}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iops", type=int, default=2000, help="fio's random writes per second")
    p.add_argument("--lag-seconds", type=int, default=60)
    p.add_argument("--runs", type=int, default=3, help="companion moves")
    p.add_argument("--only", choices=("migration", "lag", "companion"),
                   help="one measurement (its target alone decides the exit status)")
    args = p.parse_args()
    reason = skip_reason(docker=True)
    if reason:
        log(f"cannot run: {reason}")
        return 2
    hosts = Hosts(4, docker=True, clusters=2)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the hosts go, even then
    try:
        hosts.start()
        h1, h3 = hosts[0], hosts[2]
        token = h1.base / "dr-token"
        token.write_text(REMOTE_TOKEN + "\n")
        token.chmod(0o600)
        h1.cli("remote", "add", "dr", "--endpoint", h3.api_url, "--token-file", str(token),
               "--ca", str(h3.ca))
        want = {args.only} if args.only else {"migration", "lag", "companion"}
        moved = migration(h1, h3, args.iops) if "migration" in want else None
        lagged = lag(h1, args.iops, args.lag_seconds) if "lag" in want else None
        moves = ([companion(h1, h3, run) for run in range(1, args.runs + 1)]
                 if "companion" in want else [])
    except BaseException:
        sys.stderr.write(f"--- logs ---\n{hosts.logs()}\n")
        raise
    finally:
        problems = hosts.close()
        if problems:
            log(f"cleanup problems: {problems}")
    downtime = statistics.median(m["downtime_s"] for m in moves) if moves else None
    lossless = (moved is None or moved["verified"]) and all(m["lossless"] for m in moves)
    ok = ((moved is None or moved["held_s"] <= TARGET_PAUSE)
          and (downtime is None or downtime <= TARGET_DOWNTIME) and lossless)
    if moved is not None:
        log(f"writes held at the handover {moved['held_s'] * 1000:.0f} ms (target <= "
            f"{TARGET_PAUSE * 1000:.0f})")
    if downtime is not None:
        log(f"container down {downtime:.2f} s median (target <= {TARGET_DOWNTIME:g})")
    log(f"nothing lost: {lossless}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"migrate-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps({"iops": args.iops, "migration": moved, "lag": lagged,
                               "companion": moves, "downtime_median_s": downtime,
                               "ok": ok}, indent=2) + "\n")
    log(f"results: {out.relative_to(ROOT)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
