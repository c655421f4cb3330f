#!/usr/bin/env python3
"""What snapshots cost: the write pause at a cut, I/O with 0, 16 and 64 snapshots, and space.

Run as root from the repository:  ``python3 benchmarks/snapshot_bench.py [--quick]``

On one disk (a temporary directory, as ``fio_bench.py``), with fio (direct=1, libaio, 4 KiB,
iodepth 32) it measures:

* ``raw``: the same random write and read jobs on a loop device + ext4 over a sparse file,
  the local limit, so that every figure is also printed as a ratio to it;
* a 2-replica cargohold volume (a real node, FUSE engine, loop, ext4): random write and read
  IOPS with 0 snapshots, then with 16 and with 64 kept (each taken after a short random
  write, so that the snapshots hold versions of the blocks being written);
* the pause writers see: during a time-based random write, a snapshot every second; for
  each, the time the engine held writes (freeze, barrier, thaw: cargohold's own figure)
  and fio's completion-latency max and 99.9th percentile against the same job without cuts;
* space: a 256 MiB file written once, then N snapshots with K% of it rewritten between
  them: the space the replica takes against file + N * K% (the ideal), and what
  ``snapshot ls`` says each holds alone; then the time to delete them all and the space
  left.

Nothing else should run meanwhile (2 cores: numbers from a busy machine are noise). The
table goes to stdout, everything to ``benchmarks/results/snapshots-<timestamp>.json``.
Whatever happens, the script detaches, stops its node, unmounts, detaches its loop devices
and removes its directory, then checks that nothing is left.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fio_bench as fb  # noqa: E402

RANDWRITE = fb.Job("randwrite", "randwrite", "4k", 32, "write", True)
RANDREAD = fb.Job("randread", "randread", "4k", 32, "read", True)
MIB = 1 << 20


class SnapshotBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.runtime = 5 if args.quick else 15
        self.size = "256M" if args.quick else "512M"
        self.tmp = Path(tempfile.mkdtemp(prefix="cargohold-snapbench-", dir=args.tmp_parent))
        self.node: fb.Node | None = None
        self.loop: str | None = None
        self.mounted: list[Path] = []
        self.result: dict[str, Any] = {"started": dt.datetime.now().isoformat(),
                                       "runtime_s": self.runtime, "file": self.size}

    def fio(self, job: fb.Job, directory: Path, runtime: int | None = None,
            extra: tuple[str, ...] = ()) -> dict[str, Any]:
        out = self.tmp / f"{job.name}.json"
        argv = fb.fio_argv(job, str(directory / "fio.dat"), self.size,
                           runtime or self.runtime, 0, str(out))
        fb.run([*argv, *extra], timeout=600)
        found = fb.parse_fio(str(out), job)
        text = out.read_text()
        side = json.loads(text[text.index("{"):])["jobs"][0][job.direction]
        clat = side.get("clat_ns", {})
        found["max_us"] = clat.get("max", 0) / 1000
        found["p999_us"] = clat.get("percentile", {}).get("99.900000", 0) / 1000
        return found

    def lay_out(self, directory: Path) -> None:
        fb.run([fb.FIO, "--name=layout", f"--filename={directory / 'fio.dat'}", "--rw=write",
                "--bs=1M", "--iodepth=16", f"--size={self.size}", "--direct=1",
                "--ioengine=libaio", "--output-format=json",
                f"--output={self.tmp / 'layout.json'}"], timeout=600)
        fb.run(["sync", "-f", str(directory / "fio.dat")])

    # -- raw --------------------------------------------------------------------------------

    def raw(self) -> dict[str, Any]:
        image = self.tmp / "raw.img"
        mnt = self.tmp / "raw"
        mnt.mkdir()
        with open(image, "wb") as f:
            f.truncate(fb.IMAGE_SIZE)
        self.loop = fb.run(["losetup", "--find", "--show", "--direct-io=on", "--sector-size",
                            "4096", str(image)]).stdout.strip()
        fb.run([*fb.MKFS_EXT4, self.loop], timeout=600)
        fb.run(["mount", "-t", "ext4", "-o", fb.MOUNT_OPTIONS, self.loop, str(mnt)])
        self.mounted.append(mnt)
        try:
            self.lay_out(mnt)
            return {"randwrite": self.fio(RANDWRITE, mnt), "randread": self.fio(RANDREAD, mnt)}
        finally:
            fb.run(["umount", str(mnt)], check=False)
            self.mounted.remove(mnt)
            fb.run(["losetup", "-d", self.loop], check=False)
            self.loop = None
            image.unlink(missing_ok=True)

    # -- cargohold --------------------------------------------------------------------------

    def snapshot(self, ref: str) -> float:
        assert self.node is not None
        taken = json.loads(self.node.cli("snapshot", "create", ref, "-o", "json"))
        return float(taken["held"])

    def io_with_snapshots(self) -> dict[str, Any]:
        node = self.node
        assert node is not None
        node.cli("volume", "create", "bench", "--size", fb.VOLUME_SIZE, "--replicas", "2")
        mnt = Path(node.attach("bench"))
        self.lay_out(mnt)
        found: dict[str, Any] = {}
        taken = 0
        for keep in (0, 16, 64):
            while taken < keep:
                self.fio(RANDWRITE, mnt, runtime=1)
                self.snapshot(f"bench@s{taken}")
                taken += 1
            fb.run(["sync", "-f", str(mnt / "fio.dat")])
            fb.log(f"  {keep} snapshots: random write, random read")
            found[str(keep)] = {"randwrite": self.fio(RANDWRITE, mnt),
                                "randread": self.fio(RANDREAD, mnt)}
            fb.run(["sync", "-f", str(mnt / "fio.dat")])
        started = time.monotonic()
        for n in range(taken):
            node.cli("snapshot", "rm", f"bench@s{n}")
        found["delete_all_s"] = time.monotonic() - started
        found["reclaim_s"] = self.settle("bench")  # the space is punched in the background
        found["pause"] = self.pause(mnt)
        node.detach("bench")
        node.remove("bench")
        return found

    def pause(self, mnt: Path) -> dict[str, Any]:
        """Snapshots every second under a random write: how long writes were held."""
        assert self.node is not None
        baseline = self.fio(RANDWRITE, mnt)
        out = self.tmp / "paused.json"
        argv = fb.fio_argv(RANDWRITE, str(mnt / "fio.dat"), self.size, self.runtime, 0,
                           str(out))
        fio = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        held: list[float] = []
        try:
            time.sleep(1.0)
            deadline = time.monotonic() + self.runtime - 2
            while time.monotonic() < deadline:
                held.append(self.snapshot(f"bench@p{len(held)}"))
                time.sleep(1.0)
        finally:
            fio.wait(timeout=self.runtime + 120)
        text = out.read_text()
        side = json.loads(text[text.index("{"):])["jobs"][0]["write"]
        clat = side.get("clat_ns", {})
        for n in range(len(held)):
            self.node.cli("snapshot", "rm", f"bench@p{n}")
        return {
            "cuts": len(held), "held_p50_ms": statistics.median(held) * 1000,
            "held_max_ms": max(held) * 1000,
            "iops_with_cuts": side["iops"], "iops_without": baseline["iops"],
            "clat_max_ms_with_cuts": clat.get("max", 0) / 1e6,
            "clat_max_ms_without": baseline["max_us"] / 1000,
            "clat_p999_ms_with_cuts": clat.get("percentile", {}).get("99.900000", 0) / 1e6,
            "clat_p999_ms_without": baseline["p999_us"] / 1000,
        }

    def space(self, count: int, percent: int) -> dict[str, Any]:
        """A 256 MiB file, then ``count`` snapshots with ``percent``% of it rewritten
        between them."""
        node = self.node
        assert node is not None
        node.cli("volume", "create", "space", "--size", "1G", "--replicas", "1")
        mnt = Path(node.attach("space"))
        data = 256 * MIB
        fb.run(["dd", "if=/dev/urandom", f"of={mnt / 'f'}", "bs=1M", "count=256",
                "oflag=direct", "status=none"], timeout=600)
        fb.run(["sync", "-f", str(mnt / "f")])
        before = self.used("space")
        rewrite = data * percent // 100
        for n in range(count):
            self.snapshot(f"space@s{n}")
            offset_mib = (n * rewrite // MIB) % (256 - rewrite // MIB)
            fb.run(["dd", "if=/dev/urandom", f"of={mnt / 'f'}", "bs=1M",
                    f"count={rewrite // MIB}", f"seek={offset_mib}", "conv=notrunc",
                    "oflag=direct", "status=none"], timeout=600)
        fb.run(["sync", "-f", str(mnt / "f")])
        after = self.used("space")
        listed = json.loads(node.cli("snapshot", "ls", "space", "-o", "json"))
        started = time.monotonic()
        for n in range(count):
            node.cli("snapshot", "rm", f"space@s{n}")
        deleted_s = time.monotonic() - started
        reclaimed_s = self.settle("space")
        left = self.used("space")
        node.detach("space")
        node.remove("space")
        ideal = count * rewrite
        return {"snapshots": count, "rewritten_pct": percent, "file_mib": data / MIB,
                "used_before_mib": before / MIB, "used_after_mib": after / MIB,
                "snapshot_space_mib": (after - before) / MIB, "ideal_mib": ideal / MIB,
                "space_ratio": (after - before) / ideal if ideal else None,
                "unique_sum_mib": sum(s["unique"] or 0 for s in listed) / MIB,
                "delete_all_s": deleted_s, "reclaim_s": reclaimed_s,
                "used_after_delete_mib": left / MIB}

    def settle(self, name: str, limit: float = 300.0) -> float:
        """Wait until the space of deleted snapshots is punched (``used`` stops falling);
        return how long that took."""
        started = time.monotonic()
        last = self.used(name)
        while time.monotonic() - started < limit:
            time.sleep(2.0)
            now = self.used(name)
            if now >= last:
                break
            last = now
        return time.monotonic() - started

    def used(self, name: str) -> int:
        assert self.node is not None
        volume = json.loads(self.node.cli("volume", "inspect", name, "-o", "json"))
        return int(volume.get("used") or 0)

    # -- all --------------------------------------------------------------------------------

    def main(self) -> dict[str, Any]:
        fb.log("raw: loop + ext4")
        self.result["raw"] = self.raw()
        self.node = fb.Node(self.tmp / "node")
        self.node.base.mkdir()
        self.node.start()
        fb.log("cargohold: 2 replicas, 0 / 16 / 64 snapshots")
        self.result["cargohold"] = self.io_with_snapshots()
        fb.log("space: 16 snapshots, 10% rewritten between them")
        self.result["space"] = self.space(8 if self.args.quick else 16, 10)
        return self.result

    def cleanup(self) -> dict[str, Any]:
        if self.node is not None:
            self.node.stop()
        for mnt in list(self.mounted):
            fb.run(["umount", "-l", str(mnt)], check=False)
        if self.loop:
            fb.run(["losetup", "-d", self.loop], check=False)
        left = fb.leftovers(str(self.tmp))
        shutil.rmtree(self.tmp, ignore_errors=True)
        return left


def report(result: dict[str, Any]) -> str:
    raw = result["raw"]
    lines = ["", "4 KiB random I/O, iodepth 32 (ratio to raw in the same run)",
             f"{'':<16}{'write IOPS':>12}{'ratio':>8}{'read IOPS':>12}{'ratio':>8}"
             f"{'vs 0 snap w':>13}{'vs 0 snap r':>13}"]
    lines.append(f"{'raw':<16}{raw['randwrite']['iops']:>12.0f}{1:>8.2f}"
                 f"{raw['randread']['iops']:>12.0f}{1:>8.2f}")
    base = result["cargohold"]["0"]
    for keep in ("0", "16", "64"):
        row = result["cargohold"][keep]
        w, r = row["randwrite"]["iops"], row["randread"]["iops"]
        lines.append(f"{keep + ' snapshots':<16}{w:>12.0f}{w / raw['randwrite']['iops']:>8.2f}"
                     f"{r:>12.0f}{r / raw['randread']['iops']:>8.2f}"
                     f"{w / base['randwrite']['iops']:>13.2f}"
                     f"{r / base['randread']['iops']:>13.2f}")
    pause = result["cargohold"]["pause"]
    lines += ["", f"pause at a cut ({pause['cuts']} cuts under random write): writes held "
              f"p50 {pause['held_p50_ms']:.1f} ms, max {pause['held_max_ms']:.1f} ms; fio clat "
              f"max {pause['clat_max_ms_with_cuts']:.1f} ms (without cuts "
              f"{pause['clat_max_ms_without']:.1f}), p99.9 {pause['clat_p999_ms_with_cuts']:.1f}"
              f" ms ({pause['clat_p999_ms_without']:.1f}); IOPS {pause['iops_with_cuts']:.0f} "
              f"with cuts, {pause['iops_without']:.0f} without",
              f"deleting 64 snapshots: {result['cargohold']['delete_all_s']:.1f} s, their space "
              f"punched in the background within {result['cargohold']['reclaim_s']:.0f} s"]
    space = result["space"]
    lines += ["", f"space: {space['file_mib']:.0f} MiB file, {space['snapshots']} snapshots, "
              f"{space['rewritten_pct']}% rewritten between them: snapshots hold "
              f"{space['snapshot_space_mib']:.1f} MiB (ideal {space['ideal_mib']:.1f}, ratio "
              f"{space['space_ratio']:.2f}); snapshot ls says {space['unique_sum_mib']:.1f} MiB "
              f"held alone; deleting them all took {space['delete_all_s']:.1f} s (space punched "
              f"within {space['reclaim_s']:.0f} s more), the volume then takes "
              f"{space['used_after_delete_mib']:.1f} MiB"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short jobs, smaller file")
    parser.add_argument("--tmp-parent", default="/var/tmp")
    args = parser.parse_args(argv)
    bench = SnapshotBench(args)
    status = 0
    try:
        result = bench.main()
        print(report(result))
        fb.RESULTS.mkdir(parents=True, exist_ok=True)
        path = fb.RESULTS / f"snapshots-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
        path.write_text(json.dumps(result, indent=2))
        fb.log(f"results in {path}")
    except BaseException as e:
        fb.log(f"benchmark failed: {type(e).__name__}: {e}")
        if bench.node is not None:
            fb.log(bench.node.tail(2000))
        status = 1
    finally:
        left = bench.cleanup()
        if any(left.get(k) for k in ("mounts", "loops", "processes")):
            fb.log(f"LEFT OVER: {left}")
            status = status or 1
    return status


if __name__ == "__main__":
    sys.exit(main())
