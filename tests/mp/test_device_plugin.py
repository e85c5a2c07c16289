# SPDX-License-Identifier: Apache-2.0
"""Our LMCache device plugin moves exactly LMCache's chunk bytes, and LMCache finds it once claimed.

The reference is LMCache's own torch implementation (``CpuDeviceOps``, what
LMCache runs for CPU workers without the plugin), called with the same
arguments as LMCache's engine-driven transfer context calls it.
"""

import os
import subprocess
import sys

import pytest
import torch
from lmcache.lmcache_native import EngineKVFormat, PageBufferShapeDesc, TransferDirection
from lmcache.v1.platform.devices.cpu.device_ops import CpuDeviceOps

from vllm_kvplugin.mp.device_plugin import PortableCpuOps, handles

FUSED_HND, FUSED_NHD, KV_PAIRS = (EngineKVFormat.NL_X_NB_NH_BS_CS, EngineKVFormat.NL_X_NB_BS_NH_CS,
                                  EngineKVFormat.NL_X_TWO_X_NB_BS_NH_HS)
CHUNK = 256


def paged_layers(fmt, nl, nb, bs, nh, hs, dtype, seed):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    if fmt == KV_PAIRS:
        return [(rand(nb, bs, nh, hs), rand(nb, bs, nh, hs)) for _ in range(nl)]
    return [rand(nb, nh, bs, 2 * hs) if fmt == FUSED_HND else rand(nb, bs, nh, 2 * hs) for _ in range(nl)]


def chunk_objects(fmt, n, nl, nh, hs, dtype):
    if fmt == KV_PAIRS:
        return [torch.zeros(2, nl, CHUNK, nh * hs, dtype=dtype) for _ in range(n)]
    return [torch.zeros(nl, CHUNK, nh * 2 * hs, dtype=dtype) for _ in range(n)]


def shape_desc(fmt, nl, nb, bs, nh, hs, dtype):
    d = PageBufferShapeDesc()
    d.kv_size, d.nl, d.nb, d.bs, d.nh = (2 if fmt == KV_PAIRS else 1), nl, nb, bs, nh
    d.hs = hs if fmt == KV_PAIRS else 2 * hs
    d.element_size, d.block_stride_elems, d.dtype = dtype.itemsize, 0, dtype
    return d


def move(ops, fmt, layers, objects, ids, direction, desc, skip=0):
    ops.multi_layer_block_kv_transfer(layers, objects, ids, "cpu", direction, desc, CHUNK, fmt, skip)


SHAPES = [  # layers, KV heads, head size, block size, dtype
    (4, 2, 32, 32, torch.float32),
    (3, 8, 128, 16, torch.bfloat16),
    (2, 1, 64, 128, torch.float16),
    (5, 4, 80, 64, torch.bfloat16),
]


@pytest.mark.parametrize("fmt", [FUSED_HND, FUSED_NHD, KV_PAIRS], ids=["hnd", "nhd", "kv-pairs"])
@pytest.mark.parametrize("nl, nh, hs, bs, dtype", SHAPES)
def test_same_chunk_bytes_as_lmcache_and_a_round_trip(fmt, nl, nh, hs, bs, dtype):
    per_chunk = CHUNK // bs
    nb = 3 * per_chunk + 5
    layers = paged_layers(fmt, nl, nb, bs, nh, hs, dtype, seed=nl * 100 + bs)
    g = torch.Generator().manual_seed(bs)
    ids = torch.randperm(nb, generator=g)[: 2 * per_chunk + per_chunk // 2].tolist()  # last chunk partial
    desc = shape_desc(fmt, nl, nb, bs, nh, hs, dtype)
    assert handles(layers, chunk_objects(fmt, 1, nl, nh, hs, dtype), fmt)

    theirs, ours = chunk_objects(fmt, 3, nl, nh, hs, dtype), chunk_objects(fmt, 3, nl, nh, hs, dtype)
    move(CpuDeviceOps(), fmt, layers, theirs, ids, TransferDirection.D2H, desc)
    move(PortableCpuOps(), fmt, layers, ours, ids, TransferDirection.D2H, desc)
    for a, b in zip(theirs, ours):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))

    skip = per_chunk + 1  # the engine already holds the first blocks: LMCache leaves them alone
    restored_theirs = paged_layers(fmt, nl, nb, bs, nh, hs, dtype, seed=7)
    restored_ours = paged_layers(fmt, nl, nb, bs, nh, hs, dtype, seed=7)
    move(CpuDeviceOps(), fmt, restored_theirs, ours, ids, TransferDirection.H2D, desc, skip)
    move(PortableCpuOps(), fmt, restored_ours, ours, ids, TransferDirection.H2D, desc, skip)
    flat = lambda ls: torch.cat([t.reshape(-1).view(torch.uint8) for layer in ls  # noqa: E731
                                 for t in (layer if isinstance(layer, tuple) else (layer,))])
    assert torch.equal(flat(restored_theirs), flat(restored_ours))
    loaded = torch.tensor(ids[skip:])
    for src, dst in zip(layers, restored_ours):
        for s, d in zip(*(x if isinstance(x, tuple) else (x,) for x in (src, dst))):
            assert torch.equal(s[loaded], d[loaded])


def test_other_layouts_and_pointer_calls_go_to_lmcache():
    layers = [torch.zeros(4, 2, 16, 64)]
    assert not handles(layers, [torch.zeros(1, 256, 128)], EngineKVFormat.NL_X_TWO_NB_BS_NH_HS)
    assert not handles(layers, [12345], EngineKVFormat.NL_X_NB_NH_BS_CS)  # raw pointers
    assert not handles(torch.zeros(3, dtype=torch.int64), [torch.zeros(1)], EngineKVFormat.NL_X_NB_NH_BS_CS)
    assert not handles(layers, [torch.zeros(256, 2, 64).transpose(0, 1)], EngineKVFormat.NL_X_NB_NH_BS_CS)


def test_lmcache_uses_the_plugin_only_once_claimed():
    """Registered by our entry point; LMCache's own CPU ops until the MP connector claims CPU transfers."""
    script = (
        "import torch\n"
        "from lmcache.v1.platform import resolve_device_ops, torch_dev\n"
        "from vllm_kvplugin.mp.device_plugin import claim_cpu_transfers\n"
        "print(type(resolve_device_ops('cpu')).__name__, type(torch_dev).__name__)\n"
        "claim_cpu_transfers()\n"
        "print(type(resolve_device_ops('cpu')).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if k != "LMCACHE_DEVICE_BACKEND"}).stdout
    assert out.split() == ["CpuDeviceOps", "StubCPUDevice", "PortableCpuOps"]


def test_lmcaches_choice_of_the_claimed_backend_is_logged_once_not_on_every_transfer():
    script = (
        "import torch\n"
        "from lmcache.v1.platform import resolve_device_ops\n"
        "from vllm_kvplugin.mp.device_plugin import claim_cpu_transfers\n"
        "claim_cpu_transfers()\n"
        "claim_cpu_transfers()\n"
        "print(*[type(resolve_device_ops('cpu')).__name__ for _ in range(3)])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          env={k: v for k, v in os.environ.items() if k != "LMCACHE_DEVICE_BACKEND"})
    assert done.stdout.split()[-3:] == ["PortableCpuOps"] * 3
    assert (done.stdout + done.stderr).count("Auto-selected backend [kvplugin_cpu]") == 1
