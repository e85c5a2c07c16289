# SPDX-License-Identifier: Apache-2.0
"""Device modules: chosen by torch.device.type, importable without their hardware."""

import importlib.util

import pytest
import torch

from vllm_kvplugin.devices import DeviceOps, device_ops
from vllm_kvplugin.devices.cpu import CpuOps
from vllm_kvplugin.devices.cuda import CudaOps
from vllm_kvplugin.devices.hpu import HpuOps
from vllm_kvplugin.kv import PagedKVBlocks

HAS_HABANA = importlib.util.find_spec("habana_frameworks") is not None


def test_registry_is_keyed_on_torch_device_type():
    assert isinstance(device_ops("cpu"), CpuOps)
    assert isinstance(device_ops("cuda"), CudaOps)
    assert isinstance(device_ops("hpu"), HpuOps)
    generic = device_ops("xpu")
    assert type(generic) is DeviceOps and generic.layout_tag() == "xpu"


def test_cpu_layout_tag_names_the_isa_that_packs_vllm_cpu_blocks():
    tag = device_ops("cpu").layout_tag()
    assert tag == "cpu-" + torch.backends.cpu.get_cpu_capability().lower()
    assert not device_ops("cpu").needs_staging(torch.device("cpu"), torch.device("cpu"))


def test_cuda_tag_distinguishes_rocm():
    assert device_ops("cuda").layout_tag() == ("rocm" if torch.version.hip else "cuda")


@pytest.mark.skipif(HAS_HABANA, reason="checks the message on hosts without the Gaudi bridge")
def test_hpu_module_imports_without_gaudi_and_names_what_is_missing():
    ops = device_ops("hpu")
    assert not ops.pin_memory_available()  # vllm-gaudi keeps pageable host buffers
    with pytest.raises(ImportError, match="habana_frameworks"):
        ops.flush()


def _round_trip_on(device: str) -> None:
    src = torch.randint(-128, 128, (3, 6, 2, 16, 64), dtype=torch.int8).to(device).view(torch.bfloat16)
    dst = torch.zeros_like(src)
    ids = torch.tensor([4, 1], device=device)
    a, b = PagedKVBlocks(list(src)), PagedKVBlocks(list(dst))
    host = torch.empty(2 * a.block_bytes, dtype=torch.int8, device=device)
    a.gather(ids, host)
    device_ops(device).synchronize()
    b.scatter(ids, host)
    device_ops(device).synchronize()
    assert torch.equal(dst[:, [4, 1]].cpu(), src[:, [4, 1]].cpu())
    assert not dst[:, [0, 2, 3, 5]].any()


@pytest.mark.hpu
@pytest.mark.skipif(not HAS_HABANA, reason="needs an Intel Gaudi device (habana_frameworks)")
def test_mover_round_trip_on_hpu():
    import habana_frameworks.torch  # noqa: F401

    _round_trip_on("hpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm device")
def test_mover_round_trip_on_cuda_or_rocm():
    _round_trip_on("cuda")
