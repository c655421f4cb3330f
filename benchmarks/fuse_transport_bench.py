#!/usr/bin/env python3
"""What the kernel's FUSE interface costs per request: /dev/fuse against FUSE over io_uring.

Run as root from the repository:  ``python3 benchmarks/fuse_transport_bench.py [--seconds S]``

The engine serves a volume as one FUSE file with a loop device on it (``--direct-io=on``).
Before writing the engine's request loop in C, this measures the transports it could sit on,
with servers that do nothing but answer (writes dropped, reads of zeros), so that what is
left is the kernel's FUSE and loop path and the server's own work per request:

* ``python``: cargohold's ``FuseSession`` (services/engine/fuse.py) under uvloop, serving a
  target whose writes and reads complete at once: the engine's request loop without
  replicas, reading /dev/fuse; ``python_uring``: the same on FUSE over io_uring;
* ``dev``: ``benchmarks/fuse_transport.c``, one C thread reading /dev/fuse and writing one
  reply per request (the least a /dev/fuse server does);
* ``uring``: the same C server on FUSE over io_uring (Linux 6.14+, module parameter
  ``fuse.enable_uring``, set for the run and put back after): ring entries registered per
  queue, each reply committed with the fetch of the next request, a batch of replies per
  ``io_uring_enter``.

For each, and for ``raw`` (the loop device over a sparse file on this disk: the local limit),
fio (libaio, direct) runs 4 KiB random writes and reads at iodepth 32 and random writes at
iodepth 1 on the loop device. Reported: IOPS, p50/p99 latency, and the server's CPU time per
request (user+sys from /proc/PID/stat; for ``raw`` there is no server). Ratios are against
raw and, for the server CPU, against ``python``; JSON goes to
``benchmarks/results/fuse-transport-<timestamp>.json``. Everything it starts (servers, mounts, loop
devices, the temporary directory, the module parameter) is undone on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "fuse_transport.c"
URING_PARAMETER = Path("/sys/module/fuse/parameters/enable_uring")
SIZE = 1 << 30
JOBS = (("randwrite", "randwrite", 32), ("randread", "randread", 32),
        ("randwrite_qd1", "randwrite", 1))


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fio(device: str, rw: str, depth: int, seconds: int) -> dict[str, float]:
    done = subprocess.run(
        ["fio", "--name=job", f"--filename={device}", f"--rw={rw}", "--bs=4k", "--direct=1",
         "--ioengine=libaio", f"--iodepth={depth}", f"--runtime={seconds}", "--time_based",
         "--randrepeat=0", "--output-format=json"],
        capture_output=True, text=True, check=True)
    job = json.loads(done.stdout)["jobs"][0]
    side = job["write" if "write" in rw else "read"]
    clat = side["clat_ns"]["percentile"]
    return {"iops": float(side["iops"]), "p50_us": clat["50.000000"] / 1000,
            "p99_us": clat["99.000000"] / 1000, "ios": float(side["total_ios"])}


@contextlib.contextmanager
def loop_device(path: Path) -> Iterator[str]:
    device = subprocess.run(["losetup", "--find", "--show", "--direct-io=on",
                             "--sector-size", "4096", str(path)],
                            capture_output=True, text=True, check=True).stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


def wait_mounted(mountpoint: Path, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server exited with {server.returncode}")
        if os.path.ismount(mountpoint) and (mountpoint / "volume").exists():
            return
        time.sleep(0.02)
    raise RuntimeError(f"{mountpoint} not mounted within 10 s")


@contextlib.contextmanager
def served(kind: str, mountpoint: Path, binary: Path, entries: int) -> Iterator[int]:
    """A null FUSE server of ``kind`` mounted on ``mountpoint``; yields its PID."""
    mountpoint.mkdir()
    if kind.startswith("python"):
        command = [sys.executable, str(Path(__file__).resolve()), "--serve-python",
                   str(mountpoint)]
    else:
        command = [str(binary), kind, str(mountpoint), str(SIZE), str(entries)]
    env = dict(os.environ, PYTHONPATH=str(HERE.parent / "src"))  # this tree's cargohold
    server = subprocess.Popen(command, start_new_session=True, env=env)
    try:
        wait_mounted(mountpoint, server)
        yield server.pid
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False, capture_output=True)
        try:
            server.wait(5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        mountpoint.rmdir()


def run_jobs(device: str, pid: int | None, seconds: int) -> dict[str, dict[str, float]]:
    results = {}
    for name, rw, depth in JOBS:
        before = cpu_seconds(pid) if pid else 0.0
        result = fio(device, rw, depth, seconds)
        if pid:
            result["server_us"] = (cpu_seconds(pid) - before) / result["ios"] * 1e6
        results[name] = result
        log(f"  {name:14} {result['iops']:9,.0f} IOPS  p50 {result['p50_us']:7.1f} us  "
            f"p99 {result['p99_us']:7.1f} us"
            + (f"  server {result['server_us']:5.1f} us/request" if pid else ""))
    return results


def serve_python(mountpoint: str) -> None:
    """Today's FuseSession over a target that answers at once (``--serve-python``)."""
    import uvloop

    from cargohold.clients.sharedmemory import SLOTS, SharedMemory
    from cargohold.services.engine.fuse import READ_BUFFER, FuseSession, ring_slots

    class Null:
        size = SIZE

        def __init__(self) -> None:
            self.zeros = bytes(1 << 20)

        def read_at_once(self, offset: int, length: int, into: memoryview | None = None
                         ) -> memoryview:
            return memoryview(self.zeros)[:length]

        def start_read(self, offset: int, length: int) -> asyncio.Future[bytes]:
            raise AssertionError("answered at once")

        def start_write(self, offset: int, data: object, shared_at: int = -1
                        ) -> asyncio.Future[None]:
            done = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done

        async def flush(self) -> None:
            return None

        async def trim(self, offset: int, length: int) -> None:
            return None

    async def main() -> None:
        shared = SharedMemory(READ_BUFFER, SLOTS + ring_slots())  # as the engine has them
        session = FuseSession(Null(), mountpoint, shared)  # type: ignore[arg-type]
        session.start()
        while session.finished is not None and not session.finished.done():
            await asyncio.sleep(0.2)
            if session.transport == "io_uring":
                print("python server: requests through io_uring", file=sys.stderr, flush=True)
                break
        await session.wait_closed()

    uvloop.run(main())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=int, default=5, help="per fio job")
    p.add_argument("--entries", type=int, default=32, help="io_uring entries per queue")
    p.add_argument("--kinds", default="raw,python,python_uring,dev,uring")
    p.add_argument("--serve-python", metavar="MOUNTPOINT", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_python:
        serve_python(args.serve_python)
        return 0
    if os.geteuid() != 0:
        print("run as root: it mounts FUSE file systems and sets up loop devices")
        return 2
    kinds = args.kinds.split(",")
    uring_before = URING_PARAMETER.read_text().strip() if URING_PARAMETER.exists() else None
    if uring_before is None and any(k.endswith("uring") for k in kinds):
        log("this kernel has no FUSE over io_uring: leaving it out")
        kinds = [k for k in kinds if not k.endswith("uring")]
    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="fuse-transport-", dir="/var/tmp") as tmp:
        binary = Path(tmp) / "fuse_transport"
        subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread", "-o",
                        str(binary), str(SOURCE)], check=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        try:
            for kind in kinds:
                log(kind)
                if kind == "raw":
                    image = Path(tmp) / "raw.img"
                    with open(image, "wb") as f:
                        f.truncate(SIZE)
                    with loop_device(image) as device:
                        subprocess.run(["dd", "if=/dev/zero", f"of={device}", "bs=1M",
                                        f"count={SIZE >> 20}", "oflag=direct", "status=none"],
                                       check=True)  # laid out, as the FUSE files need not be
                        results[kind] = run_jobs(device, None, args.seconds)
                    image.unlink()
                    continue
                if uring_before is not None:
                    URING_PARAMETER.write_text("1" if kind.endswith("uring") else "0")
                try:
                    with served(kind, Path(tmp) / kind, binary, args.entries) as pid, \
                            loop_device(Path(tmp) / kind / "volume") as device:
                        results[kind] = run_jobs(device, pid, args.seconds)
                finally:
                    if uring_before is not None:
                        URING_PARAMETER.write_text("1" if uring_before == "Y" else "0")
        finally:
            if uring_before is not None:
                URING_PARAMETER.write_text("1" if uring_before == "Y" else "0")
    report(results)
    out = HERE / "results" / f"fuse-transport-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"seconds": args.seconds, "entries": args.entries,
                               "kernel": os.uname().release, "results": results}, indent=1))
    print(f"\nresults written to {out}")
    return 0


def report(results: dict[str, dict[str, dict[str, float]]]) -> None:
    raw, python = results.get("raw"), results.get("python")
    print("\njob            kind            IOPS   /raw   p50 us   p99 us  server us/req  /python")
    for name, _rw, _depth in JOBS:
        for kind, jobs in results.items():
            r = jobs[name]
            ratio = f"{r['iops'] / raw[name]['iops']:6.2f}" if raw else "     -"
            server = f"{r['server_us']:13.1f}" if "server_us" in r else " " * 13
            against = (f"{r['server_us'] / python[name]['server_us']:8.2f}"
                       if python and "server_us" in r else "")
            print(f"{name:14} {kind:12} {r['iops']:9,.0f} {ratio} {r['p50_us']:8.1f} "
                  f"{r['p99_us']:8.1f}  {server}{against}")


if __name__ == "__main__":
    sys.exit(main())
