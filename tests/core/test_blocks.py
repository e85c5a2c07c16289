# SPDX-License-Identifier: Apache-2.0
"""Property tests of the whole-block KV mover: torch only, every layout vLLM and vllm-gaudi hand over."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_kvplugin.bench.layouts import LAYOUTS
from vllm_kvplugin.bench.layouts import vllm_style_views as unified_views
from vllm_kvplugin.kv import PagedKVBlocks

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn]


def random_bytes(numel: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A dense tensor of ``dtype`` whose bytes are random (so every byte is checked)."""
    nbytes = numel * torch.empty(0, dtype=dtype).element_size()
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-128, 128, (nbytes,), dtype=torch.int8, generator=g).view(dtype)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int8)


def block_ids_strategy(num_blocks: int):
    return st.lists(st.integers(0, num_blocks - 1), min_size=1, max_size=num_blocks, unique=True)


@st.composite
def unified_case(draw):
    layout = draw(st.sampled_from(LAYOUTS))
    dtype = draw(st.sampled_from(DTYPES))
    L = draw(st.integers(1, 4))
    B = draw(st.integers(2, 9))
    H = draw(st.integers(1, 4))
    N = draw(st.sampled_from([1, 2, 16, 32]))
    C = draw(st.sampled_from([2, 8, 64]))  # K and V packed: 2 * head_size elements (MLA: any)
    ids = draw(block_ids_strategy(B))
    return layout, dtype, (L, B, H, N, C), ids


def physical_block_bytes(raw: torch.Tensor, byte_views, plane: int, block: int) -> torch.Tensor:
    """A block's bytes in address order, computed independently of the mover.

    ``byte_views`` are the same per-layer views built over a tensor holding each
    byte's own address, so sorting a block's addresses gives its memory order.
    """
    return raw[byte_views[plane][block].reshape(-1).sort().values]


WORDS = (torch.complex128, torch.int64, torch.int32)


@settings(max_examples=150, deadline=None)
@given(unified_case(), st.integers(0, 2**16), st.booleans(), st.sampled_from([None, 1, 3, 7, 64]))
def test_unified_round_trip_is_byte_exact_and_touches_nothing_else(case, seed, wide, max_row_words):
    """Host order is fixed whatever the word type or row cutting (``max_row_words``): stored bytes stay portable."""
    layout, dtype, dims, ids = case
    L, B, H, N, C = dims
    elsize = torch.empty(0, dtype=dtype).element_size()
    src_buf = random_bytes(L * B * H * N * C, dtype, seed)
    src_views = unified_views(src_buf, layout, *dims)
    dst_views = unified_views(random_bytes(L * B * H * N * C, dtype, seed + 1), layout, *dims)
    before = [as_bytes(v).clone() for v in dst_views]
    words = WORDS if wide else ()
    src, dst = PagedKVBlocks(src_views, words, max_row_words), PagedKVBlocks(dst_views, words, max_row_words)
    assert src.fused
    if layout.startswith("LB") or (layout.startswith("BL") and L > 1):
        # Every block of a layer is one dense run: one op over whole rows.
        assert src.mode == ("plane-major rows" if layout.startswith("LB") else "block-major rows")

    block_ids = torch.tensor(ids)
    host = torch.empty(len(ids) * src.block_bytes, dtype=torch.int8)
    src.gather(block_ids, host)
    raw = src_buf.view(torch.int8)
    addresses = unified_views(torch.arange(raw.numel()), layout, L, B, H, N, C * elsize)
    blocks = lambda pairs: torch.cat([physical_block_bytes(raw, addresses, p, b) for p, b in pairs])
    if src.mode == "block-major rows":  # host order [n, L, block]
        expected = blocks((l, b) for b in ids for l in range(L))
    else:  # host order [L, n, block]
        expected = blocks((l, b) for l in range(L) for b in ids)
    assert torch.equal(host, expected)

    dst.scatter(block_ids, host)
    for layer, (s, d, b) in enumerate(zip(src_views, dst_views, before)):
        for blk in range(B):
            want = as_bytes(s[blk]) if blk in ids else b[blk]
            assert torch.equal(as_bytes(d[blk]), want), (layer, blk)


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(DTYPES),
    st.integers(1, 3),
    st.integers(2, 8),
    st.sampled_from([16, 128]),
    st.integers(1, 4),
    st.sampled_from([8, 64]),
    st.booleans(),
    st.data(),
)
def test_gaudi_kv_tuples_round_trip(dtype, L, B, N, H, D, mla, data):
    """vllm-gaudi: per layer (K, V) allocated separately, each [B, N, H, D]; MLA has V=None."""
    ids = data.draw(block_ids_strategy(B))

    def layers(seed):
        out = []
        for l in range(L):
            k = random_bytes(B * N * H * D, dtype, seed + 2 * l).view(B, N, H, D)
            v = None if mla else random_bytes(B * N * H * D, dtype, seed + 2 * l + 1).view(B, N, H, D)
            out.append((k, v, None, None))
        return out

    src_layers, dst_layers = layers(0), layers(1000)
    snapshot = [[as_bytes(t).clone() for t in layer[:2] if t is not None] for layer in dst_layers]
    src, dst = PagedKVBlocks(src_layers, WORDS), PagedKVBlocks(dst_layers, WORDS)
    assert src.num_planes == L * (1 if mla else 2)
    assert src.mode == ("per-plane" if src.num_planes > 1 else "plane-major rows")  # separate allocations

    block_ids = torch.tensor(ids)
    host = torch.empty(len(ids) * src.block_bytes, dtype=torch.int8)
    src.gather(block_ids, host)
    dst.scatter(block_ids, host)
    for s_layer, d_layer, snap in zip(src_layers, dst_layers, snapshot):
        planes = [(s, d) for s, d in zip(s_layer[:2], d_layer[:2]) if s is not None]
        for (s, d), before in zip(planes, snap):
            for blk in range(B):
                want = as_bytes(s[blk]) if blk in ids else before[blk]
                assert torch.equal(as_bytes(d[blk]), want)


def test_mla_views_round_trip():
    """MLA: one latent 'head', [B, 1, N, 576] views (REFERENCE §4), bf16, block 64."""
    dims = (3, 6, 1, 64, 576)
    for layout in ("LBNHC", "BLHNC"):
        src_views = unified_views(random_bytes(3 * 6 * 64 * 576, torch.bfloat16, 1), layout, *dims)
        dst_views = unified_views(torch.zeros(3 * 6 * 64 * 576, dtype=torch.bfloat16), layout, *dims)
        ids = torch.tensor([4, 0, 3])
        src = PagedKVBlocks(src_views)
        host = torch.empty(3 * src.block_bytes, dtype=torch.int8)
        src.gather(ids, host)
        PagedKVBlocks(dst_views).scatter(ids, host)
        for s, d in zip(src_views, dst_views):
            assert torch.equal(as_bytes(d[ids]), as_bytes(s[ids]))
            assert not d[[1, 2, 5]].any()


def test_unevenly_spaced_layers_fall_back_to_per_plane_moves():
    buffer = random_bytes(4 * 64, torch.float16, 3)
    views = [buffer[0:64].view(4, 1, 2, 8), buffer[128:192].view(4, 1, 2, 8), buffer[192:256].view(4, 1, 2, 8)]
    blocks = PagedKVBlocks(views, WORDS)
    assert not blocks.fused and blocks.mode == "per-plane"
    host = torch.empty(2 * blocks.block_bytes, dtype=torch.int8)
    blocks.gather(torch.tensor([3, 1]), host)
    assert torch.equal(host, torch.cat([as_bytes(v[[3, 1]]).reshape(-1) for v in views]))


def test_misaligned_host_buffer_falls_back_to_bytes_and_stays_exact():
    views = unified_views(random_bytes(2 * 4 * 2 * 16 * 8, torch.bfloat16, 5), "LBHNC", 2, 4, 2, 16, 8)
    blocks = PagedKVBlocks(views, WORDS)
    ids = torch.tensor([2, 0])
    aligned = torch.empty(2 * blocks.block_bytes, dtype=torch.int8)
    blocks.gather(ids, aligned)
    misaligned = torch.empty(2 * blocks.block_bytes + 1, dtype=torch.int8)[1:]  # odd address
    blocks.gather(ids, misaligned)
    assert torch.equal(misaligned, aligned)


def test_bad_inputs_are_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="no KV tensors"):
        PagedKVBlocks([])
    with pytest.raises(ValueError, match="disagree"):
        PagedKVBlocks([torch.zeros(4, 1, 2, 8), torch.zeros(5, 1, 2, 8)])
    with pytest.raises(ValueError, match="innermost"):
        PagedKVBlocks([torch.zeros(4, 1, 8, 2).transpose(2, 3)])
    blocks = PagedKVBlocks([torch.zeros(4, 1, 2, 8)])
    with pytest.raises(ValueError, match="host buffer holds"):
        blocks.gather(torch.tensor([0, 1]), torch.empty(10, dtype=torch.int8))
