#!/usr/bin/env python3
"""Planned move benchmark: a Swarm service moved to a host where its volume's replica was
prepared, against Swarm moving a service without a volume.

Run as root from the repository:  ``python3 benchmarks/move_bench.py [--runs 3]``

Each run builds three fresh hosts with the test harness (``tests/hosts.py``: network
namespaces, an etcd member, a ``cargohold node`` and a dockerd each, h1 the Swarm manager)
and runs ``swarm_planned_move``: a service without a volume is moved from h2 to h3 with
``docker service update --constraint-add node.hostname==h3`` (Swarm's own cost: stop, then
start elsewhere), then a service writing and fsyncing a counter on a 2-replica cargohold
volume gets a replica prepared on h3 (``cargohold volume move --to h3 --wait``) and is moved
the same way. Measured: update -> the new task running, for both; the difference is what the
volume costs (target <= 2 s); every acknowledged write must be there afterwards. Results go to
stdout and ``benchmarks/results/move-<timestamp>.json``; the hosts are removed whatever
happens. Exit status 0 when the target was met and nothing was lost, 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.hosts import Hosts, PlannedMove, skip_reason, swarm_planned_move  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TARGET_EXTRA = 2.0


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def one_run() -> PlannedMove:
    hosts = Hosts(3, docker=True)
    try:
        hosts.start()
        return swarm_planned_move(hosts)
    except BaseException:
        sys.stderr.write(f"--- logs ---\n{hosts.logs()}\n")
        raise
    finally:
        problems = hosts.close()
        if problems:
            log(f"  cleanup problems: {problems}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    reason = skip_reason(docker=True)
    if reason:
        log(f"cannot run: {reason}")
        return 2
    runs = []
    for i in range(1, args.runs + 1):
        r = one_run()
        runs.append(dataclasses.asdict(r))
        log(f"run {i}: task running on {r.target} {r.moved:.2f} s after the update (volume "
            f"mounted at {r.mounted:.2f} s, local replica: {r.local}); without a volume "
            f"{r.baseline:.2f} s; extra {r.moved - r.baseline:+.2f} s; replica prepared in "
            f"{r.prepare:.2f} s; {r.acked} writes, lost {len(r.lost)}")
    extra = statistics.median(r["moved"] - r["baseline"] for r in runs)
    lossless = all(not r["lost"] and r["seed_ok"] for r in runs)
    log(f"median: moved {statistics.median(r['moved'] for r in runs):.2f} s, Swarm alone "
        f"{statistics.median(r['baseline'] for r in runs):.2f} s, the volume adds "
        f"{extra:+.2f} s (target <= {TARGET_EXTRA:g} s: "
        f"{'ok' if extra <= TARGET_EXTRA else 'MISSED'}); acknowledged writes lost: "
        f"{'none' if lossless else 'SOME'}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"move-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps({"runs": runs, "median_extra_s": extra,
                               "target_extra_s": TARGET_EXTRA, "lossless": lossless},
                              indent=2) + "\n")
    log(f"results: {out.relative_to(ROOT)}")
    return 0 if extra <= TARGET_EXTRA and lossless else 1


if __name__ == "__main__":
    sys.exit(main())
