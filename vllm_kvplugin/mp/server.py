# SPDX-License-Identifier: Apache-2.0
"""``vllm-kvplugin server``: an ``lmcache server`` set up for the portable connector.

Runs in the user's shell process, then becomes the server (``exec``): the
process an operator or a service manager starts is LMCache's own server,
with flags chosen so that every worker the portable connector serves fits:

* ``--supported-transfer-mode auto``: CPU and HPU workers move KV themselves
  (``engine_driven``), CUDA/ROCm workers hand the server device memory
  (``lmcache_driven``); LMCache's default serves only the latter;
* ``--eviction-policy LRU`` and an L1 size (required by LMCache);
* ``--chunk-size 128`` (LMCache's default is 256): the MP server stores whole
  chunks only, so up to a chunk's worth of a prompt's tail is prefilled again;
  128 halves that and still fits every block size up to 128 (vLLM-CPU's and
  vllm-gaudi's default). Warm TTFT / in-process at 1500 tokens 1.62× instead
  of 2.35×, no worse at 4K and 16K (64 was faster off the grid but slower at
  16K: per-chunk work; BENCHMARKS.md);
* ``--shm-name``: L1 in POSIX shared memory, so CPU and HPU workers on this
  host write and read chunks in place instead of pickling them over ZMQ
  (warm TTFT 1.4× in-process instead of 3× at 4K tokens, BENCHMARKS.md);
  ``--no-shm`` for a server that workers on other hosts use;
* with ``--directio-path``, our checksummed chunk-file tier as the server's
  L2 adapter (:mod:`vllm_kvplugin.mp.l2_adapter`): a restarted server is
  warm from disk, a damaged file is a miss;
* with ``--remote-url``, the same checksummed chunks in a Redis or an S3
  bucket shared by many servers (LMCache's own ``resp``/``s3`` adapters keep
  no checksum).

Anything after ``--`` goes to ``lmcache server`` unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

from vllm_kvplugin.storage.settings import ENGINES

ADAPTER_MODULE = "vllm_kvplugin.mp.l2_adapter"
ADAPTER_CLASS = "DirectIOL2Adapter"


DEFAULT_CHUNK_SIZE = 128


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address of LMCache's ZMQ socket (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=5555, help="its port (lmcache.mp.port; default 5555)")
    parser.add_argument("--http-port", type=int, default=8080, help="LMCache's HTTP API on 127.0.0.1 (default 8080)")
    parser.add_argument("--l1-size-gb", type=float, default=4.0, help="host-memory cache, GB (default 4)")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                        help=f"tokens per chunk, a multiple of vLLM's block size (default {DEFAULT_CHUNK_SIZE}; "
                             "LMCache's is 256): a prompt's tail past its last whole chunk is prefilled again")
    parser.add_argument("--directio-path", help="directory of the direct-I/O L2 tier (enables it)")
    parser.add_argument("--directio-max-size-gb", type=float, default=10.0, help="its byte budget, GB (default 10)")
    parser.add_argument("--directio-io-threads", type=int, default=2, help="its I/O threads (default 2)")
    parser.add_argument("--directio-engine", choices=ENGINES, default="auto",
                        help="its I/O engine (default auto: O_DIRECT; nixl: NIXL's POSIX backend)")
    parser.add_argument("--remote-url", help="redis://host:port or s3://bucket[/prefix]: a checksummed L2 tier on a "
                        "shared store (after the direct-I/O tier if both are given; credentials from the environment)")
    parser.add_argument("--remote-endpoint-url", help="the S3 endpoint, http(s)://host:port, of a store other than AWS")
    parser.add_argument("--shm", action=argparse.BooleanOptionalAction, default=True,
                        help="L1 in POSIX shared memory: workers on this host write chunks straight into it "
                             "(default on; --no-shm for a server that workers on other hosts use)")
    parser.add_argument("--print-command", action="store_true", help="print the lmcache command line; start nothing")
    parser.add_argument("lmcache_args", nargs=argparse.REMAINDER, help="after --: more `lmcache server` flags")


def l2_adapter_json(path: str, max_size_gb: float, io_threads: int, engine: str = "auto") -> str:
    """The ``--l2-adapter`` value that loads our tier through LMCache's ``plugin`` adapter type."""
    params = {"path": path, "max_size_gb": max_size_gb, "io_threads": io_threads}
    return json.dumps({
        "type": "plugin", "module_path": ADAPTER_MODULE, "class_name": ADAPTER_CLASS,
        "adapter_params": params if engine == "auto" else {**params, "engine": engine},
    })


def remote_l2_adapter_json(url: str, endpoint_url: str | None = None) -> str:
    """The ``--l2-adapter`` value that loads our checksummed remote tier (Redis or S3)."""
    params = {"url": url, **({"endpoint_url": endpoint_url} if endpoint_url else {})}
    return json.dumps({"type": "plugin", "module_path": ADAPTER_MODULE, "class_name": "RemoteL2Adapter",
                       "adapter_params": params})


def lmcache_server_argv(args: argparse.Namespace) -> list[str]:
    """The ``lmcache server`` command line for ``args``."""
    argv = [
        sys.executable, "-m", "lmcache.cli.main", "server",
        "--host", args.host, "--port", str(args.port), "--http-port", str(args.http_port),
        "--l1-size-gb", f"{args.l1_size_gb:g}", "--eviction-policy", "LRU",
        "--chunk-size", str(args.chunk_size), "--supported-transfer-mode", "auto",
    ]
    if args.shm:
        argv += ["--shm-name", f"kvplugin-{args.port}"]
    if args.directio_path:
        from vllm_kvplugin.mp.l2_adapter import DirectIOL2AdapterConfig

        params = {"path": os.path.abspath(args.directio_path), "max_size_gb": args.directio_max_size_gb,
                  "io_threads": args.directio_io_threads, "engine": args.directio_engine}
        DirectIOL2AdapterConfig.from_dict(params)  # a bad value fails here, with its key named
        argv += ["--l2-adapter", l2_adapter_json(**params)]
    if args.remote_url:
        from vllm_kvplugin.mp.l2_adapter import RemoteL2AdapterConfig

        json_value = remote_l2_adapter_json(args.remote_url, args.remote_endpoint_url)
        RemoteL2AdapterConfig.from_dict(json.loads(json_value)["adapter_params"])  # refused here, naming the key
        argv += ["--l2-adapter", json_value]
    extra = list(args.lmcache_args)
    return argv + (extra[1:] if extra[:1] == ["--"] else extra)


def check_shm_space(l1_size_gb: float, shm_dir: str = "/dev/shm") -> None:
    """Refuse, naming the fix, an L1 that would not fit in shared memory (containers often get 64 MiB)."""
    st = os.statvfs(shm_dir)
    free_gb = st.f_bavail * st.f_frsize / 1e9
    if free_gb < l1_size_gb:
        raise SystemExit(f"vllm-kvplugin server: --l1-size-gb {l1_size_gb:g} does not fit in {shm_dir} "
                         f"({free_gb:.1f} GB free): enlarge it (e.g. docker --shm-size, a Memory emptyDir in "
                         f"Kubernetes), lower --l1-size-gb, or pass --no-shm")


def run(args: argparse.Namespace) -> int:
    argv = lmcache_server_argv(args)
    if args.shm and not args.print_command:
        check_shm_space(args.l1_size_gb)
    if args.print_command:
        print(shlex.join(argv))
        return 0
    env = dict(os.environ)
    env.setdefault("LMCACHE_TRACK_USAGE", "false")  # inference hosts are often offline
    os.execve(sys.executable, argv, env)  # the server replaces this process: signals reach it directly


class ServerProcess:
    """A local ``lmcache server`` child process (tests, benchmarks, ``demo --mp``), ready when started.

    ``stock=True`` starts it the way LMCache documents, with LMCache's defaults
    (``lmcache server --l1-size-gb N --eviction-policy LRU``: ``lmcache_driven``
    transfers only); otherwise as ``vllm-kvplugin server`` would. Runs in the
    caller's process; the server is a child with its own log file.
    """

    def __init__(self, workdir, l1_size_gb: float = 1.0, directio_path=None, stock: bool = False,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, shm: bool = True, extra: tuple[str, ...] = ()):
        from vllm_kvplugin.demo.server import free_port

        self.workdir, self.port, self.http_port = workdir, free_port(), free_port()
        args = argparse.Namespace(
            host="127.0.0.1", port=self.port, http_port=self.http_port, l1_size_gb=l1_size_gb,
            chunk_size=chunk_size, directio_path=str(directio_path) if directio_path else None,
            directio_max_size_gb=1.0, directio_io_threads=2, directio_engine="auto", remote_url=None,
            remote_endpoint_url=None, shm=shm and not stock,
            lmcache_args=list(extra),
        )
        self.argv = lmcache_server_argv(args)
        if stock:  # LMCache's documented minimum: LMCache's transfer mode and chunk size
            for flag in ("--supported-transfer-mode", "--chunk-size"):
                i = self.argv.index(flag)
                del self.argv[i : i + 2]
        self.url = f"tcp://127.0.0.1:{self.port}"
        self._proc = None

    def start(self, timeout_s: float = 60.0) -> "ServerProcess":
        from vllm_kvplugin.mp.server_probe import ServerUnavailable, ask

        log = open(self.workdir / f"lmcache-server-{self.port}.log", "a")
        env = dict(os.environ, LMCACHE_TRACK_USAGE="false")
        self._proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                ask(self.url, 1.0, modes=False)
                return self
            except ServerUnavailable:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"lmcache server did not start; see {log.name}") from None

    @property
    def log_path(self):
        return self.workdir / f"lmcache-server-{self.port}.log"

    def stop(self) -> None:
        """SIGTERM and wait (LMCache closes its L2 adapters: queued stores are written)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def __enter__(self) -> "ServerProcess":
        return self if self._proc is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
