# SPDX-License-Identifier: Apache-2.0
"""Entry points vLLM calls at discovery, in every process it starts.

vLLM loads ``vllm.platform_plugins`` when ``current_platform`` is first resolved
and ``vllm.general_plugins`` in the API server (process 0), the engine core and
every worker (REFERENCE §1). Spawned children run them again, so both functions
are idempotent. They import nothing but the standard library at module level and
register connectors by string path: the connector module, which imports vLLM and
LMCache, is only imported when vLLM creates a connector.
"""

from __future__ import annotations

import importlib.util
import logging
import os

logger = logging.getLogger(__name__)

PORTABLE_CONNECTOR = "LMCachePortableConnector"
HPU_CONNECTOR = "LMCacheHPUConnector"

_OUR_MODULE = "vllm_kvplugin.connector"
# vLLM's in-tree wrapper around LMCache's native (CUDA-kernel) path.
_LMCACHE_NATIVE = (
    "vllm.distributed.kv_transfer.kv_connector.v1.lmcache_connector",
    "LMCacheConnectorV1",
)

# Environment defaults applied by prepare_process (see its docstring).
_HASH_ENV = "LMCACHE_PRE_CACHING_HASH_ALGORITHM"
_DETERMINISTIC_HASH = "sha256_cbor"
_DEVICE_BACKEND_ENV = "LMCACHE_DEVICE_BACKEND"
_USAGE_ENV = "LMCACHE_TRACK_USAGE"


def connector_targets(platform_is_cuda: bool) -> dict[str, tuple[str, str]]:
    """Map each connector name we own to the ``(module, class)`` vLLM should load.

    ``LMCachePortableConnector`` uses LMCache's native kernels where they exist
    (NVIDIA CUDA, through vLLM's in-tree ``LMCacheConnectorV1``) and our portable
    KV mover everywhere else (HPU, ROCm, CPU). ``LMCacheHPUConnector`` is always
    the portable path: it is the HPU port, and also the way to force the portable
    path on any platform.
    """
    portable = (_OUR_MODULE, PORTABLE_CONNECTOR)
    return {
        PORTABLE_CONNECTOR: _LMCACHE_NATIVE if platform_is_cuda else portable,
        HPU_CONNECTOR: (_OUR_MODULE, HPU_CONNECTOR),
    }


def register_connectors() -> None:
    """``vllm.general_plugins`` entry: register our connector names with vLLM.

    Runs in every vLLM process, possibly more than once; a name that is already
    registered (by us or by a newer vLLM that ships it) is left alone.
    """
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.platforms import current_platform

    for name, (module, cls) in connector_targets(current_platform.is_cuda()).items():
        if name in KVConnectorFactory._registry:
            continue
        try:
            KVConnectorFactory.register_connector(name, module, cls)
        except ValueError:  # registered concurrently: same outcome
            pass


def prepare_process() -> None:
    """``vllm.platform_plugins`` entry: prepare the process for LMCache; claims no platform.

    Always returns ``None``: vllm-gaudi's ``hpu`` plugin or a built-in platform
    stays in charge (a second active platform plugin stops vLLM with
    ``RuntimeError: Only one platform plugin can be activated``). It does not
    touch ``current_platform`` (we are inside its resolution) and probes no
    device (that can break a later fork).

    What it does, each only where the user has not decided:

    * ``LMCACHE_PRE_CACHING_HASH_ALGORITHM=sha256_cbor``. LMCache 0.5.6 hashes
      chunks with Python's ``hash()`` by default and seeds the hash chain through
      vLLM's ``init_none_hash``, which derives it from ``hash(str)`` — different
      in every process unless ``PYTHONHASHSEED`` is fixed. The scheduler's lookup
      and the worker's store then disagree and nothing ever hits, silently
      (LMCache #1139/#2136). SHA-256 over CBOR is stable across processes,
      restarts and instances. Left alone when the variable is set, when
      ``PYTHONHASHSEED`` is set (the user chose the builtin hash knowingly), or
      when ``LMCACHE_CONFIG_FILE`` names the key (LMCache lets the environment
      override the file, so setting it would silently overrule the user).
      ``lmcache.pre_caching_hash_algorithm`` in ``kv_connector_extra_config``
      still wins: LMCache applies it after the environment.
    * ``LMCACHE_DEVICE_BACKEND=hpu`` on a Gaudi host (``habana_frameworks``
      installed). LMCache picks its device backend once, at import, by probing
      torch; with ``PT_HPU_GPU_MIGRATION=1`` (which LMCache's own Gaudi examples
      set) ``torch.cuda`` looks available and LMCache would pick CUDA for a
      process whose KV lives on HPU. Elsewhere LMCache's detection is right
      (CUDA/ROCm), and on CPU it must be left unset: LMCache reaches CPU only
      through its fallback, and ``LMCACHE_DEVICE_BACKEND=cpu`` makes
      ``import lmcache`` fail ("registered but not available").
    * ``LMCACHE_TRACK_USAGE=false``: otherwise LMCache starts an HTTP usage
      reporter in every process; inference hosts are often offline.

    Why here and not in the general plugin: platform resolution is the first
    point at which vLLM runs our code in each process, before any LMCache import
    and before process 0 spawns the engine core and workers (which then inherit
    the variables). It is also the only hook that runs on the CUDA route, where
    vLLM's in-tree connector, not ours, builds LMCache's config.
    """
    for key, value in _environment_defaults(os.environ).items():
        os.environ.setdefault(key, value)
    return None


def _environment_defaults(env: os._Environ | dict[str, str]) -> dict[str, str]:
    """The variables :func:`prepare_process` would set for this environment."""
    defaults: dict[str, str] = {}
    if (
        _HASH_ENV not in env
        and "PYTHONHASHSEED" not in env
        and not _config_file_sets(env.get("LMCACHE_CONFIG_FILE"), "pre_caching_hash_algorithm")
    ):
        defaults[_HASH_ENV] = _DETERMINISTIC_HASH
    if _DEVICE_BACKEND_ENV not in env:
        backend = _lmcache_backend_for_host()
        if backend is not None:
            defaults[_DEVICE_BACKEND_ENV] = backend
    if _USAGE_ENV not in env:
        defaults[_USAGE_ENV] = "false"
    return {k: v for k, v in defaults.items() if k not in env}


def _config_file_sets(path: str | None, key: str) -> bool:
    if not path:
        return False
    try:
        with open(path, encoding="utf-8") as f:
            return any(line.lstrip().startswith(f"{key}:") for line in f)
    except OSError:
        return False  # LMCache itself reports an unreadable config file


def _lmcache_backend_for_host() -> str | None:
    """The LMCache device backend to pin on this host, if LMCache could pick a wrong one."""
    if importlib.util.find_spec("habana_frameworks") is not None:
        return "hpu"
    return None
