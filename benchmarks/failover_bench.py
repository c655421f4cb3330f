#!/usr/bin/env python3
"""Failover benchmark: a host with an attached, written volume is killed; how long until the
volume is mounted on another host, and was any acknowledged write lost?

Run as root from the repository:  ``python3 benchmarks/failover_bench.py [--runs 5]
[--mode swarm|attach] [--lease-ttl 3] [--heartbeat 1s]``

Each run builds three fresh hosts on this machine with the test harness (``tests/hosts.py``:
network, mount and uts namespaces on a private switch, an etcd member, a ``cargohold node``
and, for ``swarm``, a dockerd each) and runs one scenario:

* ``swarm`` (default, the seed scenario): a one-replica Swarm service on a worker writes a
  counter to a cargohold volume (2 replicas) and fsyncs it every 50 ms; the worker's host is
  killed like a power cut (frozen, link down, SIGKILL); Swarm restarts the task on the other
  worker. Measured: kill → the volume mounted on the new host (and → the new task running).
* ``attach``: the same writer in a shell on host A, A killed, ``cargohold volume attach``
  polled on host B until it succeeds. Measured: kill → attach returned.

Every run checks that each counter value acknowledged (fsync returned) before the kill is in
the file afterwards. The targets are median ≤ 10 s and worst ≤ 20 s. Times go to stdout,
everything to ``benchmarks/results/failover-<timestamp>.json``. The exit status is 0 when
every run kept every acknowledged write and both targets were met, 1 otherwise, 2 when a run
failed. Whatever happens (errors, Ctrl-C, SIGTERM, SIGHUP) each run's hosts are removed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import platform
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.hosts import (  # noqa: E402  (the one harness, shared with the tests)
    LEASE_TTL_DEFAULT,
    Failover,
    Hosts,
    attach_failover,
    skip_reason,
    swarm_failover,
)

RESULTS = ROOT / "benchmarks" / "results"
TARGET_MEDIAN = 10.0
TARGET_WORST = 20.0


def log(message: str) -> None:
    print(message, flush=True)


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def one_run(mode: str, lease_ttl: float, heartbeat: str) -> tuple[Failover, float]:
    """One scenario on fresh hosts; returns what it saw and the seconds the hosts took to
    start."""
    hosts = Hosts(3, docker=mode == "swarm", lease_ttl=lease_ttl)
    try:
        t = time.monotonic()
        hosts.start()
        setup = time.monotonic() - t
        if mode == "swarm":
            return swarm_failover(hosts, heartbeat), setup
        return attach_failover(hosts), setup
    except BaseException:
        sys.stderr.write(f"--- logs ---\n{hosts.logs()}\n")
        raise
    finally:
        problems = hosts.close()
        left = {k: v for k, v in hosts.leftovers().items() if v}
        if problems or left:
            log(f"  cleanup problems: {problems} leftovers: {left}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--mode", choices=("swarm", "attach"), default="swarm")
    parser.add_argument("--lease-ttl", type=float, default=LEASE_TTL_DEFAULT,
                        help="the nodes' --lease-ttl in seconds (default %(default)s)")
    parser.add_argument("--heartbeat", default="1s",
                        help="docker swarm update --dispatcher-heartbeat (swarm mode)")
    args = parser.parse_args(argv)
    reason = skip_reason(docker=args.mode == "swarm")
    if reason:
        log(f"cannot run: {reason}")
        return 2
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)

    settings = (f"mode {args.mode}, node lease TTL {args.lease_ttl:g} s"
                + (f", Swarm dispatcher heartbeat {args.heartbeat}, restart delay 0 s"
                   if args.mode == "swarm" else ""))
    log(f"failover benchmark: {args.runs} runs, {settings}")
    runs: list[dict[str, Any]] = []
    error = ""
    try:
        for i in range(1, args.runs + 1):
            result, setup = one_run(args.mode, args.lease_ttl, args.heartbeat)
            runs.append({**dataclasses.asdict(result), "setup_s": setup})
            running = (f", task running after {result.running_after:.2f} s"
                       if result.running_after is not None else "")
            verdict = "no acknowledged write lost" if not result.lost and result.seed_ok \
                else f"LOST {len(result.lost)} acknowledged writes (seed ok: {result.seed_ok})"
            log(f"run {i}: {result.killed} killed -> mounted on {result.new_host} in "
                f"{result.mounted_after:.2f} s{running}; {result.acked} writes acknowledged "
                f"before the kill, {verdict}")
    except KeyboardInterrupt as exc:
        error = f"interrupted ({exc})"
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()

    times = [r["mounted_after"] for r in runs]
    summary: dict[str, Any] = {"runs": len(runs)}
    ok = False
    if times:
        median, worst = statistics.median(times), max(times)
        lossless = all(not r["lost"] and r["seed_ok"] for r in runs)
        ok = median <= TARGET_MEDIAN and worst <= TARGET_WORST and lossless and not error
        summary.update(median_s=median, worst_s=worst, best_s=min(times),
                       lost_writes=sum(len(r["lost"]) for r in runs), lossless=lossless,
                       median_ok=median <= TARGET_MEDIAN, worst_ok=worst <= TARGET_WORST)
        log(f"kill -> mounted: median {median:.2f} s (target <= {TARGET_MEDIAN:g} s: "
            f"{'ok' if median <= TARGET_MEDIAN else 'MISSED'}), worst {worst:.2f} s "
            f"(target <= {TARGET_WORST:g} s: {'ok' if worst <= TARGET_WORST else 'MISSED'}), "
            f"best {min(times):.2f} s; acknowledged writes lost: "
            f"{summary['lost_writes']} ({'ok' if lossless else 'FAILED'})")
    log(f"settings: {settings}")
    if error:
        log(f"stopped early: {error}")

    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"failover-{stamp}.json"
    out.write_text(json.dumps({
        "benchmark": "failover", "when": stamp, "machine": platform.node(),
        "kernel": platform.release(), "mode": args.mode, "lease_ttl_s": args.lease_ttl,
        "swarm_heartbeat": args.heartbeat if args.mode == "swarm" else None,
        "targets": {"median_s": TARGET_MEDIAN, "worst_s": TARGET_WORST},
        "summary": summary, "runs": runs, "error": error,
    }, indent=2) + "\n")
    log(f"results: {out.relative_to(ROOT)}")
    if error:
        return 2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
