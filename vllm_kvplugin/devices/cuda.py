# SPDX-License-Identifier: Apache-2.0
"""CUDA and ROCm (torch calls both "cuda"): pinned host buffers, stream synchronisation.

Runs in the vLLM worker process.
"""

from __future__ import annotations

import torch

from vllm_kvplugin.devices.base import DeviceOps


class CudaOps(DeviceOps):
    def layout_tag(self) -> str:
        # ROCm attention backends pack head slots differently from CUDA ones.
        return "rocm" if torch.version.hip else "cuda"

    def pin_memory_available(self) -> bool:
        return True

    def synchronize(self) -> None:
        # Only the current stream: the mover's copies are queued there, and a
        # device-wide synchronize would also wait for unrelated compute.
        torch.cuda.current_stream().synchronize()


DEVICE_OPS = CudaOps
