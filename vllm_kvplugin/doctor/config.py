# SPDX-License-Identifier: Apache-2.0
"""Doctor checks of the KV configuration: what vLLM accepts, what the connector refuses, the chunk hash.

Runs in the user's shell process (``vllm-kvplugin doctor``). The configuration
is read as the connector reads it at startup: vLLM's ``KVTransferConfig`` from
the ``--kv-transfer-config`` JSON, LMCache's loader for ``LMCACHE_CONFIG_FILE``
and ``LMCACHE_*``, then the connector's own
:func:`~vllm_kvplugin.lmcache.settings.apply_extra_config`.
"""

from __future__ import annotations

import json

from vllm_kvplugin import plugin
from vllm_kvplugin.doctor.host import CONNECTORS
from vllm_kvplugin.mp.settings import check_mp_config, is_mp_config

_OUR_MODULE_PATHS = (None, "vllm_kvplugin.connector")


def check_config(found, kv_transfer_config: str | None, block_size: int, device: str | None = None):
    """LMCache's config as the connector would build it (``None`` in MP mode), and ``kv_connector_extra_config``.

    Raises:
        Exception: JSON or vLLM validation errors (the caller reports them as a fail).
    """
    from lmcache.v1.config import load_engine_config_with_overrides
    from vllm.config import KVTransferConfig

    from vllm_kvplugin.lmcache.settings import apply_extra_config, resolve_save_mode

    data = json.loads(kv_transfer_config) if kv_transfer_config else {
        "kv_connector": plugin.PORTABLE_CONNECTOR, "kv_role": "kv_both"}
    ktc = KVTransferConfig(**data)  # vLLM's own validation of the JSON (kv_role, field names)
    extra = ktc.kv_connector_extra_config or {}
    source = "--kv-transfer-config" if kv_transfer_config else "no --kv-transfer-config, defaults"
    ours = ktc.kv_connector in CONNECTORS and ktc.kv_connector_module_path in _OUR_MODULE_PATHS
    found.add("config", "ok" if ours else "warn", f"{source}: {ktc.kv_connector}, {ktc.kv_role}"
              + ("" if ours else f"; not one of this plugin's connectors {list(CONNECTORS)}"))
    if is_mp_config(extra):  # LMCache's multiprocess mode: the server holds config and tiers (doctor.mp)
        try:
            check_mp_config(extra)
        except ValueError as e:
            found.add("config", "fail", f"the connector would refuse this at startup: {e}")
        else:
            found.add("config", "ok", "lmcache.mp.* keys: LMCache's multiprocess mode, the cache is in an "
                      "`lmcache server`")
        return None, extra
    config = load_engine_config_with_overrides()  # LMCache's loader: LMCACHE_CONFIG_FILE, then LMCACHE_*
    try:
        apply_extra_config(config, extra, block_size)
    except ValueError as e:  # it applies the keys before refusing, so the tiers can still be probed
        found.add("config", "fail", f"the connector would refuse this at startup (block_size {block_size}): {e}")
    else:
        found.add("config", "ok", f"accepted by the connector's startup checks: chunk_size {config.chunk_size}, "
                  f"block_size {block_size}, stores {resolve_save_mode(ktc.kv_role, extra, device)}, "
                  + ("a prompt's tail as whole blocks" if config.save_unfull_chunk
                     else "whole chunks only (lmcache.save_unfull_chunk is false: up to chunk_size - 1 "
                          "tokens of each prompt are recomputed)")
                  + f", lookups wait up to {config.lookup_timeout_ms / 1000:g} s")
    check_disaggregation(found, ktc.kv_role, config, extra)
    unknown = sorted(k for k in extra if k.startswith("lmcache.") and not hasattr(config, k[len("lmcache."):]))
    if unknown:
        found.add("config", "warn", f"LMCache ignores unknown key(s) {unknown}")
    return config, extra


def check_hash(found, config, env, plugin_defaults: dict[str, str]) -> None:
    """Scheduler and workers must hash chunks alike, or nothing ever hits (REFERENCE §12)."""
    algorithm, seed = config.pre_caching_hash_algorithm, env.get("PYTHONHASHSEED")
    if algorithm == "builtin" and seed in (None, "random"):
        found.add("hash", "fail", "pre_caching_hash_algorithm=builtin without a fixed PYTHONHASHSEED: the "
                  "scheduler and the workers hash chunks differently and nothing ever hits (silently); set "
                  "LMCACHE_PRE_CACHING_HASH_ALGORITHM=sha256_cbor (or PYTHONHASHSEED=0 on every instance)")
        return
    by_plugin = plugin_defaults.get(plugin._HASH_ENV) == algorithm
    found.add("hash", "ok", f"pre_caching_hash_algorithm={algorithm}"
              + (f" with PYTHONHASHSEED={seed}" if algorithm == "builtin" else "")
              + (" (vllm-kvplugin's default, set by its platform entry)" if by_plugin else ""))


def check_disaggregation(found, kv_role: str, config, extra: dict) -> None:
    """A prefill (``kv_producer``) or decode (``kv_consumer``) instance: what the hand-off does, and whether
    the other side can reach its KV at all (LMCache's CPU tier is this process's memory)."""
    from vllm_kvplugin.lmcache.handoff import DEFAULT_TIMEOUT_S, TIMEOUT_KEY

    if kv_role not in ("kv_producer", "kv_consumer"):
        return
    if not config.storage_plugins:
        found.add("pd", "warn", f"{kv_role} without a shared tier: only LMCache's CPU tier, which no other "
                  "instance can read; set kvplugin.directio.path (a shared directory) or kvplugin.remote.url")
        return
    if kv_role == "kv_producer":
        found.add("pd", "ok", "kv_producer: stores, never loads; each prefill reply waits until its KV is written "
                  f"to {', '.join(config.storage_plugins)} (at most {extra.get(TIMEOUT_KEY, DEFAULT_TIMEOUT_S)} s, "
                  f"{TIMEOUT_KEY}) and reports kv_transfer_params.kvplugin.handed_off_tokens")
    else:
        found.add("pd", "ok", "kv_consumer: loads, never stores; replies report kv_transfer_params.kvplugin."
                  "loaded_tokens (vllm-router's usage.cached_tokens shows the prefill server's 0 instead)")
