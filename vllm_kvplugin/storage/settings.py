# SPDX-License-Identifier: Apache-2.0
"""The tiers' own settings (``kvplugin.directio.*``, ``kvplugin.remote.*``), checked the same way everywhere.

Runs at startup in the engine core (``prepare_config``: a bad value refuses the
config before workers load, naming the key) and in each vLLM worker when
LMCache builds the tier from its ``extra_config`` (LMCache YAML users set the
same keys there by hand).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PATH_KEY = "kvplugin.directio.path"
SIZE_KEY = "kvplugin.directio.max_size_gb"
THREADS_KEY = "kvplugin.directio.io_threads"
ENGINE_KEY = "kvplugin.directio.engine"
READ_AHEAD_KEY = "kvplugin.directio.read_ahead"
# auto: hipFile where it pays (chunks on device), else O_DIRECT, else buffered; the others ask for one
# engine, and fall back to O_DIRECT (logged, never failing the server) where it cannot run.
ENGINES = ("auto", "posix", "nixl", "hipfile")
REMOTE_URL_KEY = "kvplugin.remote.url"
REMOTE_TIMEOUT_KEY = "kvplugin.remote.timeout_s"
REMOTE_THREADS_KEY = "kvplugin.remote.io_threads"
REMOTE_ENDPOINT_KEY = "kvplugin.remote.endpoint_url"
REMOTE_READ_AHEAD_KEY = "kvplugin.remote.read_ahead"
# Chunks a lookup or load of many reads at once (measured in BENCHMARKS.md, "Reads in flight").
DEFAULT_READ_AHEAD = 4
REMOTE_SCHEMES = ("redis://", "rediss://", "unix://", "s3://")


@dataclass(frozen=True)
class TierSettings:
    path: str
    max_size_gb: float
    io_threads: int
    engine: str = "auto"
    read_ahead: int = DEFAULT_READ_AHEAD


def tier_settings(extra: dict) -> TierSettings:
    """The tier's settings from ``extra`` (LMCache's ``extra_config`` or ``kv_connector_extra_config``).

    Raises:
        ValueError: naming the key, for a missing path, a size or thread count
            that is not a positive number, or an unknown I/O engine.
    """
    path = extra.get(PATH_KEY)
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"{PATH_KEY} must name a directory, got {path!r}")
    engine = extra.get(ENGINE_KEY, "auto")
    if engine not in ENGINES:
        raise ValueError(f"{ENGINE_KEY} must be one of {', '.join(ENGINES)}, got {engine!r}")
    return TierSettings(path, _positive(extra, SIZE_KEY, 10.0, float), _positive(extra, THREADS_KEY, 2, int), engine,
                        _positive(extra, READ_AHEAD_KEY, DEFAULT_READ_AHEAD, int))


@dataclass(frozen=True)
class RemoteSettings:
    url: str
    timeout_s: float
    io_threads: int
    endpoint_url: str | None = None  # S3 only
    read_ahead: int = DEFAULT_READ_AHEAD


def remote_settings(extra: dict) -> RemoteSettings:
    """The remote tier's settings from ``extra``.

    Raises:
        ValueError: naming the key (never echoing the URL: it may carry a password).
    """
    url = extra.get(REMOTE_URL_KEY)
    if not isinstance(url, str) or not url.startswith(REMOTE_SCHEMES):
        raise ValueError(f"{REMOTE_URL_KEY} must be a {', '.join(REMOTE_SCHEMES)} URL")
    endpoint = extra.get(REMOTE_ENDPOINT_KEY)
    if url.startswith("s3://"):
        from vllm_kvplugin.storage.s3_store import parse_s3_url

        parse_s3_url(url)
        if endpoint is not None and (not isinstance(endpoint, str) or not endpoint.startswith(("http://", "https://"))
                                     or "@" in endpoint):
            raise ValueError(f"{REMOTE_ENDPOINT_KEY} must be an http:// or https:// URL without credentials")
    elif endpoint is not None:
        raise ValueError(f"{REMOTE_ENDPOINT_KEY} is for an s3:// {REMOTE_URL_KEY} only")
    # An object store's first byte takes longer than a Redis reply (and a fresh bucket's first put longer still).
    default_timeout_s = 5.0 if url.startswith("s3://") else 1.0
    return RemoteSettings(url, _positive(extra, REMOTE_TIMEOUT_KEY, default_timeout_s, float),
                          _positive(extra, REMOTE_THREADS_KEY, 2, int), endpoint,
                          _positive(extra, REMOTE_READ_AHEAD_KEY, DEFAULT_READ_AHEAD, int))


def _positive(extra: dict, key: str, default, kind: type):
    value = extra.get(key, default)
    wanted = "a positive integer" if kind is int else "a positive number"
    try:
        number = kind(value)
        if isinstance(value, bool) or number != float(value):  # True, or 2.5 threads
            raise ValueError(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be {wanted}, got {value!r}") from None
    if not 0 < number < math.inf:
        raise ValueError(f"{key} must be {wanted}, got {value!r}")
    return number
