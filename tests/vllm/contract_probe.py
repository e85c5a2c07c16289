# SPDX-License-Identifier: Apache-2.0
"""Check our connector classes against the ``KVConnectorBase_V1`` of the vLLM importable here.

Run as ``python contract_probe.py`` (with ``PYTHONPATH`` pointing at another
vLLM's Python tree to check that one); prints one JSON line: the vLLM
version, and every problem found. A method we (or LMCache's dynamic connector,
which we subclass) override must exist in the base class with the same kind
(instance/class/static method) and accept every argument the base declares;
no abstract method may be left unimplemented.
"""

import inspect
import json
import os
import sys

# Hooks we define for a newer vLLM than the one being checked: (name, first vLLM that calls it).
LATER_HOOKS = {"supports_sleep_mode": "0.33"}


def kind(cls, name: str) -> str:
    for klass in cls.__mro__:
        if name in vars(klass):
            attr = vars(klass)[name]
            return type(attr).__name__ if isinstance(attr, (classmethod, staticmethod, property)) else "method"
    return "missing"


def accepts(ours: inspect.Signature, base: inspect.Signature) -> list[str]:
    """Base parameters our signature cannot take (by name or position), if any."""
    params = list(ours.parameters.values())
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    var_pos = any(p.kind is p.VAR_POSITIONAL for p in params)
    names = {p.name: p for p in params}
    missing = []
    for i, p in enumerate(base.parameters.values()):
        if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            if p.kind is p.VAR_KEYWORD and not var_kw:
                missing.append("**" + p.name)
            continue
        if p.name in names or (p.kind is p.VAR_KEYWORD and var_kw):
            continue
        if p.kind is p.POSITIONAL_ONLY and (i < len(params) or var_pos):
            continue
        if not var_kw:
            missing.append(p.name)
    return missing


def main() -> dict:
    import torch  # noqa: F401 - before LMCache
    import vllm
    from lmcache.integration.vllm.lmcache_connector_v1 import LMCacheConnectorV1Dynamic
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    from vllm_kvplugin.connector import LMCacheHPUConnector, LMCachePortableConnector

    problems, checked = [], []
    for cls in (LMCachePortableConnector, LMCacheHPUConnector):
        if getattr(cls, "__abstractmethods__", None):
            problems.append(f"{cls.__name__}: abstract methods left: {sorted(cls.__abstractmethods__)}")
    overridden = {
        name for klass in (LMCachePortableConnector, LMCacheHPUConnector, LMCacheConnectorV1Dynamic)
        for name, attr in vars(klass).items() if callable(attr) or isinstance(attr, (classmethod, staticmethod))
    }
    for name in sorted(overridden):
        if name.startswith("__") or (name.startswith("_") and not hasattr(KVConnectorBase_V1, name)):
            continue  # our own helpers
        if not hasattr(KVConnectorBase_V1, name) and name in LATER_HOOKS:
            continue
        if not hasattr(KVConnectorBase_V1, name):
            problems.append(f"{name}: overridden, but vLLM's base class has no such method (removed or renamed?)")
            continue
        base_kind, our_kind = kind(KVConnectorBase_V1, name), kind(LMCachePortableConnector, name)
        if base_kind != our_kind:
            problems.append(f"{name}: {our_kind} here, {base_kind} in vLLM's base class")
            continue
        base_sig = inspect.signature(getattr(KVConnectorBase_V1, name))
        our_sig = inspect.signature(getattr(LMCachePortableConnector, name))
        missing = accepts(our_sig, base_sig)
        if missing:
            problems.append(f"{name}{our_sig} cannot take {missing} of vLLM's {name}{base_sig}")
        checked.append(name)
    new_in_base = sorted(
        n for n, a in vars(KVConnectorBase_V1).items() if callable(a) and not n.startswith("_") and n not in overridden
    )
    sleep = getattr(KVConnectorBase_V1, "supports_sleep_mode", None)
    return {
        "vllm": vllm.__version__, "vllm_path": os.path.dirname(vllm.__file__), "problems": problems,
        "checked": checked, "inherited_defaults": new_in_base,
        "supports_sleep_mode": LMCachePortableConnector.supports_sleep_mode(None) if sleep else None,
    }


if __name__ == "__main__":
    print(json.dumps(main()), flush=True)
    sys.stdout.flush()
    os._exit(0)
