# SPDX-License-Identifier: Apache-2.0
"""Device modules, one per ``torch.device.type``, chosen from a registry.

Runs in the vLLM worker process. Core code never asks "is this an HPU?": it
asks :func:`device_ops` for the object that knows, and that object imports its
device package (``habana_frameworks``, ...) only when it is first used.
"""

from __future__ import annotations

import importlib
from functools import cache

import torch

from vllm_kvplugin.devices.base import DeviceOps

# torch.device.type -> module holding a ``DEVICE_OPS`` class. ROCm is "cuda" in torch.
_REGISTRY = {
    "cpu": "vllm_kvplugin.devices.cpu",
    "cuda": "vllm_kvplugin.devices.cuda",
    "hpu": "vllm_kvplugin.devices.hpu",
}


@cache
def device_ops(device_type: str) -> DeviceOps:
    """The :class:`DeviceOps` for ``device_type`` (``torch.device.type``); generic torch if unknown."""
    module = _REGISTRY.get(device_type)
    if module is None:
        return DeviceOps(device_type)
    return importlib.import_module(module).DEVICE_OPS(device_type)


def for_tensor(t: torch.Tensor) -> DeviceOps:
    return device_ops(t.device.type)


__all__ = ["DeviceOps", "device_ops", "for_tensor"]
