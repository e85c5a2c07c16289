# SPDX-License-Identifier: Apache-2.0
"""Doctor probes of the storage tiers: is each configured tier really usable?

Runs in the user's shell process (``vllm-kvplugin doctor``). Each probe
does the real thing on a small scale — a chunk file written and read back
through the I/O engine the direct-I/O tier would pick, a ``PING`` and a probe
value written, read and deleted on the remote tier's Redis or bucket with a short
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
    from vllm_kvplugin.lmcache.directio_backend import ENGINE_KEY, PATH_KEY, PLUGIN_NAME, SIZE_KEY
    from vllm_kvplugin.storage.settings import REMOTE_URL_KEY

    check_cpu(found, config)
    settings = {**(config.extra_config or {}), **extra}
    if PLUGIN_NAME in (config.storage_plugins or []) or PATH_KEY in extra:
        check_directio(found, str(settings[PATH_KEY]), float(settings.get(SIZE_KEY, 10)),
                       str(settings.get(ENGINE_KEY, "auto")))
    if REMOTE_URL_KEY in settings:
        check_remote(found, settings)
    # LMCache's own local_disk and remote_url tiers are refused by the config check (no checksum).


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


def check_directio(found, path: str, max_size_gb: float, engine: str = "auto") -> None:
    """The direct-I/O tier's directory: usable, which I/O engine and why (a warning where the configured
    ``engine`` fell back), room for its budget."""
    from vllm_kvplugin.storage.select import select_io
    from vllm_kvplugin.storage.settings import ENGINE_KEY

    if not _usable_directory(found, "direct-I/O tier", path):
        return
    try:
        # The tier's own choice (hipFile, NIXL, O_DIRECT or buffered, and why); LMCache hands it host memory.
        io, choice = select_io(path, chunks_on_device=False, engine=engine)
        try:
            alignment = _chunk_round_trip(io, path)
        finally:
            io.close()
    except OSError as e:
        found.add("direct-I/O tier", "fail", f"{path}: write/read probe failed ({e.strerror or e})")
        return
    free = shutil.disk_usage(path).free / _GB
    level = "ok" if max_size_gb <= free else "warn"
    fell_back = engine != "auto" and not choice.engine.startswith(engine)
    reported = (f"statx DIO alignment {alignment.memory}/{alignment.offset} B" if alignment
                else "no statx DIO alignment reported")
    found.add("direct-I/O tier", level, f"{path}: chunk written and read back with {choice.engine} "
              f"({choice.reason}; {reported}); budget {max_size_gb:g} GB, {free:.0f} GB free"
              + ("" if level == "ok" else ": the budget will not fit"))
    if fell_back:
        found.add("direct-I/O tier", "warn", f"{ENGINE_KEY}={engine} cannot run here (why: above); the tier "
                  f"falls back to {choice.engine}")


def check_remote(found, settings: dict) -> None:
    """The checksummed remote tier: a real connect, ``PING`` (or the bucket's HEAD) and probe value,
    never showing credentials."""
    from vllm_kvplugin.storage.chunk_store import open_chunk_store
    from vllm_kvplugin.storage.format import HEADER_SIZE
    from vllm_kvplugin.storage.redis_store import PASSWORD_ENV
    from vllm_kvplugin.storage.settings import remote_settings

    tier = remote_settings(settings)
    store = open_chunk_store(tier.url, min(tier.timeout_s, _TIMEOUT_S), tier.endpoint_url, retry_after_s=0)
    if store.password_in_url:
        found.add("remote tier", "warn", f"{store.url}: a password in kvplugin.remote.url is written to vLLM's "
                  f"and LMCache's config logs; set {PASSWORD_ENV} in the environment instead")
    probe, name = uuid.uuid4().bytes * (HEADER_SIZE // 16), f"doctor-probe-{uuid.uuid4().hex}"
    try:
        ok = store.ping() and store.put(name, probe) and store.get(name) == probe
        store.delete(name)
    finally:
        store.close()
    if not ok:
        error = store.last_error or "the probe value did not round-trip"
        for secret in filter(None, (urlsplit(tier.url).password, os.environ.get(PASSWORD_ENV),
                                    os.environ.get("AWS_SECRET_ACCESS_KEY"))):
            error = error.replace(secret, "***")
        found.add("remote tier", "fail", f"{store.url}: not usable within {_TIMEOUT_S:g} s ({error})")
        return
    answered = "the bucket answered" if tier.url.startswith("s3://") else "PING answered"
    found.add("remote tier", "ok", f"{store.url}: {answered}, a {len(probe)}-byte value written, read back "
              f"and deleted; calls bounded by {tier.timeout_s:g} s")


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

