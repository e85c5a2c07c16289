# SPDX-License-Identifier: Apache-2.0
"""CPU (vLLM-CPU): copies are synchronous, host and device memory are the same.

Runs in the vLLM worker process.
"""

from __future__ import annotations

import torch

from vllm_kvplugin.devices.base import DeviceOps


class CpuOps(DeviceOps):
    def layout_tag(self) -> str:
        # vLLM-CPU's attention kernels pack K/V inside a block per ISA (AVX2,
        # AVX512, AMX, NEON...): bytes stored on one machine are garbage on another.
        return f"cpu-{torch.backends.cpu.get_cpu_capability().lower()}"

    def word_dtypes(self) -> tuple[torch.dtype, ...]:
        # 16-byte elements: CPU index kernels move them with one vector load/store each.
        return (torch.complex128, torch.int64, torch.int32, torch.int16)

    def max_index_row(self) -> int:
        # ATen's CPU index_select copies rows shorter than its GRAIN_SIZE (32768 elements)
        # in one parallel memcpy loop, and longer ones one serial copy kernel per row:
        # 512 KiB rows (Llama-8B, block 128) ran at 73% of copy_ whole, 114% cut in two.
        return 32767

    def prepare_kv_memory(self, kv_tensors: list[torch.Tensor], log) -> None:
        """Huge pages under the KV cache (:mod:`vllm_kvplugin.kv.huge_pages`)."""
        from vllm_kvplugin.kv.huge_pages import back_with_huge_pages

        back_with_huge_pages(kv_tensors, log)

    def synchronize(self) -> None:
        """Nothing to wait for: CPU copies finish before they return."""


DEVICE_OPS = CpuOps
