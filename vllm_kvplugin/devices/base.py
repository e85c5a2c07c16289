# SPDX-License-Identifier: Apache-2.0
"""The device contract with plain-torch defaults; device modules override only what differs.

Runs in the vLLM worker process.
"""

from __future__ import annotations

import torch


class DeviceOps:
    """What the KV mover needs to know about one kind of device.

    The defaults are generic torch (``torch.get_device_module``), which is right
    for most accelerators; subclasses state where their device differs.
    """

    def __init__(self, device_type: str):
        self.device_type = device_type

    def layout_tag(self) -> str:
        """What, besides vLLM's config, decides the byte layout of a KV block on this device.

        Part of every cache key, so that bytes never cross into an engine that
        would read them differently.
        """
        return self.device_type

    def needs_staging(self, kv_device: torch.device, host_device: torch.device) -> bool:
        """Whether KV blocks must pass through a device buffer on their way to or from host memory."""
        return kv_device != host_device

    def word_dtypes(self) -> tuple[torch.dtype, ...]:
        """Element types the KV mover may view whole blocks as, widest first.

        Index kernels cost per element, so wider words move blocks faster; only
        types this device's ``index_select``/``index_copy_`` support belong here.
        """
        return (torch.int64, torch.int32, torch.int16)

    def max_index_row(self) -> int | None:
        """Longest row, in elements, that this device's index kernels copy at full speed; None: any.

        The KV mover cuts longer rows into equal pieces (:class:`~vllm_kvplugin.kv.PagedKVBlocks`).
        """
        return None

    def prepare_kv_memory(self, kv_tensors: list[torch.Tensor], log) -> None:
        """Once, when vLLM registers its KV caches: make their memory fast to move blocks from. Nothing by default."""

    def pin_memory_available(self) -> bool:
        """Whether host buffers for this device should be page-locked."""
        return False

    def flush(self) -> None:
        """Make queued device work start now (HPU lazy mode needs an explicit ``mark_step``)."""

    def synchronize(self) -> None:
        """Block the calling host thread until this device's queued copies are done."""
        torch.get_device_module(self.device_type).synchronize()
