# SPDX-License-Identifier: Apache-2.0
"""Property tests of the KV mover on MLA caches: torch only, vLLM's and vllm-gaudi's shapes.

MLA stores one latent vector per token (``kv_lora_rank + qk_rope_head_dim``
elements, no separate V), so vLLM hands a connector one ``[B, 1, N, C]`` view
per layer (C = 576 for DeepSeek-V2/V3; ``fp8_ds_mla`` packs 656 bytes), which
attention kernels and ``save_kv_layer`` see squeezed as ``[B, N, C]``.
vllm-gaudi allocates each layer's latent cache flat, ``[(B + 1) * N, C]`` with
a trailing pad block, and hands ``(K, None)`` with K viewed ``[B, N, C]``
(REFERENCE §4).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.core.test_blocks import as_bytes, random_bytes
from tests.core.test_blocks import block_ids_strategy as block_ids
from vllm_kvplugin.bench.layouts import LAYOUTS, vllm_style_views
from vllm_kvplugin.kv import PagedKVBlocks

WORDS = (torch.complex128, torch.int64, torch.int32)
# (element type, latent size C): DeepSeek-V2/V3 576 in 16/32-bit, fp8_ds_mla 656 bytes, and
# the other latent sizes vLLM's MLA backends accept.
LATENTS = [(torch.bfloat16, 576), (torch.float16, 576), (torch.float32, 576), (torch.uint8, 656),
           (torch.bfloat16, 320), (torch.bfloat16, 512)]


def round_trip(src_layers, dst_layers, ids, mover=PagedKVBlocks) -> tuple[torch.Tensor, list[str]]:
    """Gather ``ids`` from ``src_layers``, scatter into ``dst_layers``; the host bytes and every wrong block."""
    planes = lambda layers: [t for e in layers for t in ((e,) if isinstance(e, torch.Tensor) else e[:1])]
    before = [as_bytes(p).clone() for p in planes(dst_layers)]
    src = mover(src_layers, WORDS)
    host = torch.empty(len(ids) * src.block_bytes, dtype=torch.int8)
    src.gather(torch.tensor(ids), host)
    mover(dst_layers, WORDS).scatter(torch.tensor(ids), host)
    wrong = []
    for plane, (s, d, b) in enumerate(zip(planes(src_layers), planes(dst_layers), before)):
        for blk in range(s.shape[0]):
            want = as_bytes(s[blk]) if blk in ids else b[blk]
            if not torch.equal(as_bytes(d[blk]), want):
                wrong.append(f"plane {plane} block {blk}")
    return host, wrong


@st.composite
def vllm_mla_case(draw):
    dtype, C = draw(st.sampled_from(LATENTS))
    L, B, N = draw(st.integers(1, 4)), draw(st.integers(2, 8)), draw(st.sampled_from([16, 32, 64]))
    return draw(st.sampled_from(LAYOUTS)), dtype, (L, B, 1, N, C), draw(block_ids(B))


@settings(max_examples=80, deadline=None)
@given(vllm_mla_case(), st.integers(0, 2**16))
def test_vllm_mla_views_round_trip_byte_exact_squeezed_or_not(case, seed):
    layout, dtype, dims, ids = case
    L, B, _, N, C = dims
    numel = L * B * N * C
    src = vllm_style_views(random_bytes(numel, dtype, seed), layout, *dims)
    dst = vllm_style_views(random_bytes(numel, dtype, seed + 1), layout, *dims)
    host, wrong = round_trip(src, dst, ids)
    assert not wrong
    # Block b of layer l is N*C contiguous elements whatever the layout (H = 1).
    if PagedKVBlocks(src).mode == "block-major rows":
        order = [(l, b) for b in ids for l in range(L)]
    else:
        order = [(l, b) for l in range(L) for b in ids]
    assert torch.equal(host, torch.cat([as_bytes(src[l][b]).reshape(-1) for l, b in order]))
    # The squeezed [B, N, C] views (what MLA kernels and save_kv_layer see) move the same bytes.
    squeezed_host, wrong = round_trip([v.squeeze(1) for v in src], [v.squeeze(1) for v in dst], ids)
    assert not wrong and torch.equal(squeezed_host, host)


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from([(torch.bfloat16, 576), (torch.float32, 576), (torch.uint8, 656)]),
    st.integers(1, 3), st.integers(2, 6), st.sampled_from([16, 128]),
    st.sampled_from(["tuple", "tensor", "4d"]), st.data(),
)
def test_gaudi_mla_caches_round_trip_and_never_touch_the_pad_block(latent, L, B, N, form, data):
    """vllm-gaudi MLA: per layer one flat ``[(B+1)*N, C]`` latent cache, V = None, last block = pad."""
    dtype, C = latent
    ids = data.draw(block_ids(B))

    def layers(seed):
        flats = [random_bytes((B + 1) * N * C, dtype, seed + l).view((B + 1) * N, C) for l in range(L)]
        k = [f.view(-1, N, C)[:B] if form != "4d" else f.view(-1, N, 1, C)[:B] for f in flats]
        return flats, [t if form == "tensor" else (t, None, None, None) for t in k]

    (_, src), (dst_flats, dst) = layers(0), layers(100)
    pads = [as_bytes(f[B * N:]).clone() for f in dst_flats]
    assert PagedKVBlocks(src).num_planes == L
    _, wrong = round_trip(src, dst, ids)
    assert not wrong
    for f, pad in zip(dst_flats, pads):
        assert torch.equal(as_bytes(f[B * N:]), pad)


class ReversedScatter(PagedKVBlocks):
    """A broken mover: scatters each chunk's blocks in reverse order."""

    def scatter(self, block_ids, src):
        super().scatter(block_ids.flip(0), src)


@pytest.mark.parametrize("layout", ["LBNHC", "BLHNC"])
def test_control_a_mover_that_misplaces_blocks_is_caught(layout):
    dims = (2, 5, 1, 16, 576)
    src = vllm_style_views(random_bytes(2 * 5 * 16 * 576, torch.bfloat16, 9), layout, *dims)
    dst = vllm_style_views(torch.zeros(2 * 5 * 16 * 576, dtype=torch.bfloat16), layout, *dims)
    _, wrong = round_trip(src, dst, [3, 1], mover=ReversedScatter)
    assert wrong  # the same check that passes above notices misplaced blocks
