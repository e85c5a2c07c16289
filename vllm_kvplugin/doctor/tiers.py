# SPDX-License-Identifier: Apache-2.0
"""Doctor probes of the storage tiers: is each configured tier really usable?

Runs in the user's shell process (``vllm-kvplugin doctor``). Each probe
does the real thing on a small scale — a chunk file written and read back
through the I/O engine the direct-I/O tier would pick, a file round trip on
LMCache's local disk, a TCP connect and ``PING`` to Redis with a short
timeout — and cleans up after itself. Credentials in URLs are never printed.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from urllib.parse import urlsplit

_TIMEOUT_S = 2.0
_GB = 1e9


def check_tiers(found, config, extra: dict) -> None:
    """Probe every tier the connector would configure from LMCache's ``config`` and ``extra``."""
    from vllm_kvplugin.lmcache.directio_backend import PATH_KEY, PLUGIN_NAME, SIZE_KEY

    check_cpu(found, config)
    settings = {**(config.extra_config or {}), **extra}
    if PLUGIN_NAME in (config.storage_plugins or []) or PATH_KEY in extra:
        check_directio(found, str(settings[PATH_KEY]), float(settings.get(SIZE_KEY, 10)))
    if config.local_disk:
        check_local_disk(found, config)
    if config.remote_url:
        check_remote(found, config.remote_url, config)


def check_cpu(found, config) -> None:
    """LMCache's host-memory tier: its size against this host's memory (it is per TP rank)."""
    size = float(config.max_local_cpu_size or 0)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / _GB
    if size <= 0:
        found.add("CPU tier", "fail", "max_local_cpu_size=0: LMCache has no host buffer to stage chunks in")
    elif size >= total:
        found.add("CPU tier", "fail", f"max_local_cpu_size={size:g} GB per TP rank, host has {total:.0f} GB")
    else:
        role = "tier and staging buffer" if config.local_cpu else "staging buffer only (local_cpu=false)"
        found.add("CPU tier", "ok", f"{size:g} GB per TP rank ({role}); host memory {total:.0f} GB")


def check_directio(found, path: str, max_size_gb: float) -> None:
    """The direct-I/O tier's directory: usable, which I/O engine and why, room for its budget."""
    from vllm_kvplugin.storage.select import select_io

    if not _usable_directory(found, "direct-I/O tier", path):
        return
    try:
        # The tier's own choice (hipFile, O_DIRECT or buffered, and why); LMCache hands it host memory.
        io, choice = select_io(path, chunks_on_device=False)
        try:
            alignment = _chunk_round_trip(io, path)
        finally:
            io.close()
    except OSError as e:
        found.add("direct-I/O tier", "fail", f"{path}: write/read probe failed ({e.strerror or e})")
        return
    free = shutil.disk_usage(path).free / _GB
    level = "ok" if max_size_gb <= free else "warn"
    reported = (f"statx DIO alignment {alignment.memory}/{alignment.offset} B" if alignment
                else "no statx DIO alignment reported")
    found.add("direct-I/O tier", level, f"{path}: chunk written and read back with {choice.engine} "
              f"({choice.reason}; {reported}); budget {max_size_gb:g} GB, {free:.0f} GB free"
              + ("" if level == "ok" else ": the budget will not fit"))


def check_local_disk(found, config) -> None:
    """LMCache's own ``local_disk`` tier (comma-separated directories)."""
    if float(config.max_local_disk_size or 0) <= 0:
        found.add("local_disk", "warn", f"local_disk={config.local_disk} is ignored: LMCache creates the "
                  "disk tier only with max_local_disk_size > 0")
        return
    for path in filter(None, (p.strip() for p in config.local_disk.split(","))):
        if not _usable_directory(found, "local_disk", path):
            continue
        try:
            _file_round_trip(path)
        except OSError as e:
            found.add("local_disk", "fail", f"{path}: write/read probe failed ({e.strerror or e})")
            continue
        found.add("local_disk", "warn", f"{path}: file written and read back, {config.max_local_disk_size:g} GB; "
                  "LMCache's disk tier keeps its index in memory (a restarted server starts cold) and serves "
                  "files unchecked: prefer kvplugin.directio.*")


def check_remote(found, url: str, config) -> None:
    """LMCache's ``remote_url``: a real connect and ``PING`` for Redis, reported without credentials."""
    shown = redact_url(url)
    scheme = urlsplit(url).scheme
    if scheme not in ("redis", "rediss", "resp"):
        found.add("remote tier", "warn", f"{shown}: scheme {scheme!r} is not probed by doctor")
        return
    if urlsplit(url).password:
        found.add("remote tier", "warn", f"{shown}: LMCache 0.5.6 logs remote_url verbatim, password included; use "
                  "resp://host:port with LMCACHE_RESP_USERNAME/LMCACHE_RESP_PASSWORD instead")
    import redis

    extra = config.extra_config or {}
    password = extra.get("password") or os.environ.get("LMCACHE_RESP_PASSWORD") or None
    username = extra.get("username") or os.environ.get("LMCACHE_RESP_USERNAME") or None
    probe_url = urlsplit(url)._replace(scheme="redis").geturl() if scheme == "resp" else url  # same protocol
    try:
        client = redis.Redis.from_url(probe_url, socket_connect_timeout=_TIMEOUT_S, socket_timeout=_TIMEOUT_S,
                                      **({} if urlsplit(url).password else {"password": password, "username": username}))
        client.ping()
        client.close()
    except Exception as e:  # noqa: BLE001 - refused, timeout, auth, DNS: all unreachable
        message = str(e)
        for secret in filter(None, (urlsplit(url).password, password)):
            message = message.replace(secret, "***")
        found.add("remote tier", "fail", f"{shown}: unreachable within {_TIMEOUT_S:g} s ({message})")
        return
    serde = config.remote_serde
    found.add("remote tier", "ok" if serde == "naive" else "warn", f"{shown}: PING answered; remote_serde={serde}"
              + ("" if serde == "naive" else " (the portable path stores opaque blocks: use naive)"))


def redact_url(url: str) -> str:
    """``url`` with any ``user:password@`` replaced, safe to print."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]).geturl()


def _usable_directory(found, check: str, path: str) -> bool:
    """Whether ``path`` is a directory to probe; a missing one is judged by whether the tier could create it."""
    if os.path.isdir(path):
        return True
    if os.path.exists(path):
        found.add(check, "fail", f"{path} exists and is not a directory")
        return False
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK):
        found.add(check, "warn", f"{path} does not exist; the tier creates it at startup (if it should be a "
                  "shared mount, the mount is missing)")
    else:
        found.add(check, "fail", f"{path} does not exist and cannot be created ({parent} is not a writable "
                  "directory)")
    return False


def _file_round_trip(directory: str) -> None:
    """Write and read back a small plain file (what LMCache's disk tier does), then remove it."""
    path = os.path.join(directory, f".kvplugin-doctor-{uuid.uuid4().hex}")
    data = os.urandom(4096)
    try:
        with open(path, "wb") as f:
            f.write(data)
        with open(path, "rb") as f:
            if f.read() != data:
                raise OSError(errno.EIO, "read back different bytes")
    finally:
        if os.path.exists(path):
            os.unlink(path)


def _chunk_round_trip(io, directory: str):
    """Write and read back one small chunk file with ``io``; the filesystem's O_DIRECT alignment, if reported."""
    from vllm_kvplugin.storage.format import ALIGN, ChunkHeader, crc32c, encode_header
    from vllm_kvplugin.storage.io import dio_alignment

    key = f"kvplugin-doctor-{uuid.uuid4().hex}"
    payload = memoryview(bytearray(os.urandom(ALIGN)))
    header = ChunkHeader(key, "uint8", (ALIGN,), "doctor", ALIGN, crc32c(payload), "KV_2LTD")
    path = os.path.join(directory, f".{key}.probe")
    try:
        io.write(path, encode_header(header), payload)
        _, back = io.read(path, key)
        if bytes(back) != bytes(payload):
            raise OSError(errno.EIO, "read back different bytes")
        return dio_alignment(path)
    finally:
        if os.path.exists(path):
            os.unlink(path)

