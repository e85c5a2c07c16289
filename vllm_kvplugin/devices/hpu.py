# SPDX-License-Identifier: Apache-2.0
"""Intel Gaudi (HPU, via vllm-gaudi and the habana bridge).

Runs in the vLLM worker process. ``habana_frameworks`` is imported on first use,
so this module imports (and is tested) on hosts without Gaudi.
"""

from __future__ import annotations

from vllm_kvplugin.devices.base import DeviceOps


def _habana_core():
    try:
        import habana_frameworks.torch.core as htcore
    except ImportError as e:  # pragma: no cover - only on hosts without the bridge
        raise ImportError(
            "HPU KV transfer needs the Intel Gaudi PyTorch bridge (habana_frameworks), "
            "which ships with Intel's Gaudi software stack, not with pip"
        ) from e
    return htcore


class HpuOps(DeviceOps):
    def pin_memory_available(self) -> bool:
        # vllm-gaudi reports pinned memory unavailable and keeps pageable buffers.
        return False

    def word_dtypes(self):
        import torch

        # Gaudi's index_copy_ has no 64-bit integer kernel (bridge 1.19 operator table).
        return (torch.int32, torch.int16)

    def flush(self) -> None:
        # Lazy mode accumulates ops into a graph until mark_step; without it the
        # index ops of a transfer would not run before the host reads the buffer.
        _habana_core().mark_step()

    def synchronize(self) -> None:
        import torch

        self.flush()
        torch.hpu.current_stream().synchronize()


DEVICE_OPS = HpuOps
