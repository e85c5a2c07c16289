# SPDX-License-Identifier: Apache-2.0
"""A real ``redis-server`` on loopback, started and stopped by the process that uses it.

Used by the shared-tier tests (tests/e2e/test_shared_remote.py) and by
``vllm-kvplugin bench tiers``; runs in the test or benchmark process, the
server is a child process. ``ci/setup-env.sh`` installs Debian's redis-server.
The server keeps nothing on disk (no RDB, no AOF), so a restart comes back
empty, as a replaced cache node would.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from vllm_kvplugin.demo.server import free_port


class RedisServer:
    """One ``redis-server`` process; :meth:`kill` and :meth:`start` again keep its port."""

    def __init__(self, workdir: Path, port: int | None = None, password: str | None = None):
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found: run `make setup` (it installs Debian's redis-server)")
        self.binary, self.workdir = binary, workdir
        self.port = port or free_port()
        self.password = password
        self.url = f"redis://{f'default:{password}@' if password else ''}127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        log = open(self.workdir / f"redis-{self.port}.log", "a")
        self._proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--protected-mode", "yes",
             *(["--requirepass", self.password] if self.password else [])],
            stdout=log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while not self.ping():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)
        return self

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith((b"+PONG", b"-NOAUTH"))  # up, password or not
        except OSError:
            return False

    def command(self, *args: str) -> bytes:
        """One RESP command's raw reply (enough for DBSIZE/FLUSHALL in tests); AUTHs first if needed."""
        def encode(words):
            return b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w.encode()) for w in words)

        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            if self.password:
                s.sendall(encode(("AUTH", self.password)))
                s.recv(64)
            s.sendall(encode(args))
            return s.recv(4096)

    def dbsize(self) -> int:
        return int(self.command("DBSIZE").strip()[1:])

    def memory_info(self) -> dict[str, str]:
        """``INFO memory`` as a dict (``used_memory``, ``used_memory_dataset``, ``maxmemory_policy``, ...)."""
        lines = self.command("INFO", "memory").decode().splitlines()
        return dict(line.split(":", 1) for line in lines if ":" in line and not line.startswith("#"))

    def kill(self) -> None:
        """SIGKILL, as a crashed node: no clean shutdown, clients see dropped connections."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def freeze(self) -> None:
        """SIGSTOP, as a hung node: connections stay open, nothing answers until :meth:`thaw`."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()
