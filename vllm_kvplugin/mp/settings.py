# SPDX-License-Identifier: Apache-2.0
"""What ``kv_connector_extra_config`` means in LMCache's multiprocess mode.

Pure functions (no vLLM or LMCache import): run by the connector class at
construction in the API server, engine core and workers, and by ``doctor``.
"""

from __future__ import annotations

MP_PREFIX = "lmcache.mp."
PROBE_TIMEOUT_KEY = "kvplugin.mp.probe_timeout_s"
EAGER_PREFETCH_KEY = MP_PREFIX + "eager_prefetch"
_DEFAULT_PROBE_TIMEOUT_S = 5.0


def is_mp_config(extra: dict | None) -> bool:
    """Whether ``kv_connector_extra_config`` asks for MP mode (any ``lmcache.mp.*`` key)."""
    return any(str(k).startswith(MP_PREFIX) for k in (extra or {}))


def check_mp_config(extra: dict) -> float:
    """Refuse in-process keys in an MP config; return the server probe's timeout (s).

    Raises:
        ValueError: naming each key that belongs to the server in MP mode.
    """
    misplaced = sorted(k for k in extra if not k.startswith(MP_PREFIX) and k != PROBE_TIMEOUT_KEY
                       and k.startswith(("lmcache.", "kvplugin.")))
    if misplaced:
        raise ValueError(
            f"{misplaced} in kv_connector_extra_config: with lmcache.mp.* keys the connector runs in LMCache's "
            "multiprocess mode, where the cache, its tiers and LMCache's settings belong to the `lmcache server` "
            "(see `vllm-kvplugin server --help`); remove them here, or remove the lmcache.mp.* keys for "
            "the in-process mode"
        )
    timeout = extra.get(PROBE_TIMEOUT_KEY, _DEFAULT_PROBE_TIMEOUT_S)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError(f"{PROBE_TIMEOUT_KEY} must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


def server_urls(extra: dict) -> list[str]:
    """The servers LMCache's MP connector will use (its own precedence: ``server_urls``, then host/port)."""
    urls = extra.get(MP_PREFIX + "server_urls")
    if urls:
        return [u.strip() for u in (urls if isinstance(urls, list) else str(urls).split(",")) if u.strip()]
    return [f"{extra.get(MP_PREFIX + 'host', 'tcp://localhost')}:{extra.get(MP_PREFIX + 'port', 5555)}"]


def eager_prefetch(extra: dict, loads: bool) -> bool:
    """Whether the scheduler asks the server about a request as it arrives rather than when first scheduled.

    LMCache's ``lmcache.mp.eager_prefetch`` (off in LMCache) is on here unless the user set it: the lookup's
    round trip to the server then overlaps the request's wait in the queue, one engine step less before a
    warm request's KV is loaded (warm TTFT 1.55x -> 1.42x in-process at 1K and 4K tokens, BENCHMARKS.md).
    A ``kv_producer`` never loads, so it never looks up.
    """
    if not loads:
        return False
    value = extra.get(EAGER_PREFETCH_KEY, True)
    if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off"):
        return False
    return bool(value)
