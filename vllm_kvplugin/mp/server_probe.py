# SPDX-License-Identifier: Apache-2.0
"""What a running ``lmcache server`` answers, asked with short timeouts.

Runs in vLLM's engine core and workers (before LMCache's MP connector starts
talking to the server) and in ``vllm-kvplugin doctor``.

Why: LMCache's MP client waits ``lmcache.mp.mq_timeout`` (300 s by default)
for every answer, and the server sends none for an operation it has no
handler for. A server that is down, or one started with its default
``--supported-transfer-mode lmcache_driven`` facing a worker that registers
``engine_driven`` (every CPU and HPU worker), used to hold vLLM's startup for
five minutes and then kill it. The server has no RPC that names its transfer
modes, so :func:`served_transfer_modes` asks each mode's *unregister*
operation for an instance that does not exist: a server with that mode's
handler answers at once (and logs that it knows no such instance), one
without it stays silent.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

ENGINE_DRIVEN = "engine_driven"
LMCACHE_DRIVEN = "lmcache_driven"

# The fix named in every error: a server that accepts both transfer modes.
SERVER_FIX = (
    "start the server with `--supported-transfer-mode auto` (`vllm-kvplugin server` does), "
    "e.g. `lmcache server --l1-size-gb 4 --eviction-policy LRU --supported-transfer-mode auto`"
)


class ServerUnavailable(ConnectionError):
    """The LMCache server did not answer, or cannot serve this worker; the message names the fix."""


@dataclass(frozen=True)
class ServerAnswer:
    url: str
    transfer_modes: frozenset[str]


def normalized_url(url: str) -> str:
    """LMCache's own rule: a bare ``host:port`` is ZMQ over TCP."""
    return url if "://" in url else f"tcp://{url}"


def is_local(url: str) -> bool:
    """Whether the server shares this host's ``/dev/shm`` (loopback TCP or an IPC socket)."""
    url = normalized_url(url)
    if url.startswith(("ipc://", "inproc://", "grpc+unix://")):
        return True
    host = url.split("://", 1)[1].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "127.0.0.1", "::1")


def ask(url: str, timeout_s: float, modes: bool = True) -> ServerAnswer:
    """Ping the server at ``url`` and (``modes``) learn which transfer modes it serves.

    Raises:
        ServerUnavailable: no answer to a ping within ``timeout_s``.
    """
    import zmq
    from lmcache.v1.multiprocess.transport.factory import RequestClientFactory

    client = RequestClientFactory.create(normalized_url(url), context=zmq.Context.instance())
    try:
        try:
            client.ping(None).result(timeout=timeout_s)
        except TimeoutError:
            raise ServerUnavailable(
                f"no LMCache server answered at {url} within {timeout_s:g} s; start one there "
                f"(`vllm-kvplugin server --port ...`) or fix lmcache.mp.host/port/server_urls"
            ) from None
        return ServerAnswer(url, served_transfer_modes(client, timeout_s) if modes else frozenset())
    finally:
        client.close()


def served_transfer_modes(client, timeout_s: float) -> frozenset[str]:
    """The transfer modes the server behind ``client`` has handlers for (both asked at once)."""
    unknown_instance = uuid.uuid4().int & ((1 << 63) - 1)
    pending = {
        ENGINE_DRIVEN: client.unregister_kv_cache_engine_driven_context(unknown_instance),
        LMCACHE_DRIVEN: client.unregister_kv_cache(unknown_instance),
    }
    deadline = time.monotonic() + timeout_s
    served = set()
    for mode, future in pending.items():
        try:
            future.result(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            continue
        except Exception:  # the handler exists and refused the unknown instance: still served
            pass
        served.add(mode)
    return frozenset(served)


def choose_transfer_mode(answer: ServerAnswer, device_type: str, requested: str | None) -> str:
    """The transfer mode a worker with KV on ``device_type`` should register with this server.

    ``requested`` is the user's ``lmcache.mp.mp_transfer_mode`` or
    ``LMCACHE_MP_TRANSFER_MODE`` (``None`` or ``auto``: ours to pick). CPU and
    HPU workers move KV themselves (``engine_driven``); a CPU worker can also
    hand a server on the same host its KV in shared memory
    (``lmcache_driven``, LMCache's CPU SHM path); CUDA/ROCm workers prefer
    ``lmcache_driven`` (device IPC handles) and can fall back to
    ``engine_driven``.

    Raises:
        ServerUnavailable: no mode both sides support, naming the fix.
    """
    possible = [ENGINE_DRIVEN]
    if device_type == "cuda":
        possible.insert(0, LMCACHE_DRIVEN)
    elif device_type == "cpu" and is_local(answer.url):
        possible.append(LMCACHE_DRIVEN)
    if requested and requested != "auto":
        if requested not in answer.transfer_modes:
            raise ServerUnavailable(
                f"lmcache.mp.mp_transfer_mode={requested}, but the LMCache server at {answer.url} serves "
                f"{_names(answer.transfer_modes)}; {SERVER_FIX}"
            )
        return requested
    for mode in possible:
        if mode in answer.transfer_modes:
            return mode
    raise ServerUnavailable(
        f"the LMCache server at {answer.url} serves {_names(answer.transfer_modes)} transfers; a {device_type} "
        f"worker{'' if is_local(answer.url) else ' on another host'} needs {' or '.join(possible)}: {SERVER_FIX}"
    )


def _names(modes) -> str:
    return " and ".join(sorted(modes)) or "no known"
