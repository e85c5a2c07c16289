# SPDX-License-Identifier: Apache-2.0
"""Replay how a model runner drives a KV connector: a real vLLM ``Scheduler``, our real connector
(scheduler and worker roles, a real LMCache engine on a direct-I/O directory), CPU tensors.

Run as ``python runner_harness.py SPEC.json``; prints one JSON line. A separate
process, because LMCache's ZMQ servers may abort the interpreter at shutdown.

Two callers, chosen by ``spec["runner"]``:

``"gaudi"`` follows vllm-gaudi ``main`` @ 091bbadd (2026-08-21),
``vllm_gaudi/v1/worker/hpu_model_runner.py`` (read, not copied):

- ~L4404-4412 ``execute_model``: the forward context carries the prefill
  attention metadata only if ``scheduler_output.kv_connector_metadata`` is an
  ``LMCacheConnectorMetadata``; otherwise ``set_forward_context(None, ...)``.
- ~L917-929 ``maybe_setup_kv_connector``: ``bind_connector_metadata`` then
  ``start_load_kv(get_forward_context())``, always before the forward.
- ~L2321: the runner reads ``kv_connector_metadata.requests``.
- ~L4753-4756: ``wait_for_save`` then ``get_finished(finished_req_ids)`` (not
  ``get_transfer_results``); ~L4780-4790: ``KVConnectorOutput`` with
  ``finished_sending``/``finished_recving`` only (load errors, stats, events
  dropped); then ``clear_connector_metadata``.
- ~L7033-7052 ``get_kv_caches_4D`` (+ ``attention/ops/hpu_paged_attn.py:72``):
  per layer K and V allocated as ``((NB+1)*BS, NH, HS)`` (one pad block),
  viewed ``[-1, BS, NH, HS]``, trimmed to ``NB`` blocks, registered as a
  ``TensorTuple((K, V))`` (~L7372: a tuple with ``shape``/``device``/``dtype``/
  ``data_ptr``).

``"vllm"`` is vLLM 0.32's own runner: its ``KVConnectorModelRunnerMixin``
(``vllm/v1/worker/kv_connector_model_runner_mixin.py``) called as is, inside a
forward context with attention metadata, over vLLM-CPU's one-buffer layout.

"Forward" writes, into each block a step computes, bytes that are a function
of the request's tokens up to that block's end, so any block's expected
content is known. Before every load the harness snapshots all KV memory (pad
block included), and after it checks that exactly the blocks the scheduler
counted as computed were written, with exactly the expected bytes.
"""

import json
import os
import sys
import zlib
from pathlib import Path

import torch


class TensorTuple(tuple):
    """vllm-gaudi's per-layer ``(K, V)`` holder, as far as a connector sees it."""

    @property
    def shape(self):
        return (len(self), *self[0].shape)

    @property
    def device(self):
        return self[0].device

    @property
    def dtype(self):
        return self[0].dtype

    def data_ptr(self) -> int:
        return self[0].data_ptr()


def gaudi_kv(layers: int, blocks: int, block: int, heads: int, head: int, dtype):
    """Per layer ``TensorTuple((K, V))`` trimmed from buffers with a pad block; the full buffers."""
    kv, buffers = {}, []
    for i in range(layers):
        pair = []
        for _ in range(2):
            buf = torch.zeros(((blocks + 1) * block, heads, head), dtype=dtype)
            buffers.append(buf)
            pair.append(buf.view(-1, block, heads, head)[:blocks])
        kv[f"model.layers.{i}.self_attn.attn"] = TensorTuple(pair)
    return kv, buffers


def vllm_cpu_kv(layers: int, blocks: int, block: int, heads: int, head: int, dtype):
    """vLLM-CPU's per-layer ``[B, H, N, 2*D]`` views of one buffer; the buffer."""
    buf = torch.zeros((layers, blocks, heads, block, 2 * head), dtype=dtype)
    return {f"model.layers.{i}.self_attn.attn": buf[i] for i in range(layers)}, [buf]


def planes(kv) -> list[torch.Tensor]:
    """Block-indexed tensors (vllm-gaudi: K and V of each layer)."""
    return [t for entry in kv.values() for t in (entry if isinstance(entry, tuple) else (entry,))]


def block_bytes(tokens: list[int], end: int, plane: int, nbytes: int) -> torch.Tensor:
    """What "forward" writes into a block ending at token ``end`` of ``plane``."""
    seed = zlib.crc32(torch.tensor(tokens[:end], dtype=torch.int64).numpy().tobytes()) * 131 + plane
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)


def forward(kv, tokens, block_ids, start: int, end: int, block: int) -> None:
    """Write the KV of tokens ``[start, end)`` (whole blocks from ``start``) into the request's blocks."""
    for b in range(start // block, -(-end // block)):
        for p, plane in enumerate(planes(kv)):
            dst = plane[block_ids[b]].view(torch.uint8).view(-1)
            dst.copy_(block_bytes(tokens, min((b + 1) * block, end), p, dst.numel()))


def loads_exact(kv, tokens, block_ids, computed: int, block: int) -> bool:
    """After the load: the blocks under ``computed`` tokens hold exactly the expected bytes."""
    return all(
        torch.equal(plane[block_ids[b]].view(torch.uint8).view(-1),
                    block_bytes(tokens, (b + 1) * block, p, plane[0].numel() * plane.element_size()))
        for b in range(computed // block) for p, plane in enumerate(planes(kv))
    )


def changed_blocks(before) -> set[int]:
    """Blocks (pad block included) whose bytes differ from the snapshot."""
    changed: set[int] = set()
    for snap, now in before:
        changed |= set(torch.nonzero((snap != now).flatten(1).any(1)).flatten().tolist())
    return changed


def snapshot(kv, buffers, block: int):
    """Every KV byte as ``(copy, live)`` pairs of ``[blocks, bytes]`` (vllm-gaudi: pad block included)."""
    if len(buffers) == 1:  # vLLM-CPU: one buffer of per-layer planes
        return [(p.view(torch.uint8).clone(), p.view(torch.uint8)) for p in planes(kv)]
    rows = [buf.view(torch.uint8).view(buf.shape[0] // block, -1) for buf in buffers]
    return [(r.clone(), r) for r in rows]


def main(spec: dict) -> dict:
    from vllm.config import set_current_vllm_config
    from vllm.distributed.kv_transfer.kv_transfer_state import ensure_kv_transfer_initialized, get_kv_transfer_group
    from vllm.distributed.parallel_state import ensure_model_parallel_initialized, init_distributed_environment
    from vllm.engine.arg_utils import EngineArgs
    from vllm.forward_context import get_forward_context, set_forward_context
    from vllm.sampling_params import SamplingParams
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
    from vllm.v1.request import Request
    from vllm.v1.structured_output import StructuredOutputManager
    from vllm.v1.worker.kv_connector_model_runner_mixin import KVConnectorModelRunnerMixin

    try:
        from lmcache.integration.vllm.vllm_v1_adapter import LMCacheConnectorMetadata
    except ImportError:  # as vllm-gaudi does
        LMCacheConnectorMetadata = None

    block, layers, heads, head, num_blocks = spec["block_size"], 4, 2, 32, spec["num_blocks"]
    dtype = getattr(torch, spec.get("dtype", "float32"))
    kv_transfer = {
        "kv_connector": spec.get("connector", "LMCacheHPUConnector"), "kv_role": "kv_both",
        "kv_connector_extra_config": {
            "lmcache.chunk_size": spec["chunk_size"], "lmcache.local_cpu": False, "lmcache.max_local_cpu_size": 0.2,
            "kvplugin.directio.path": spec["directory"], "kvplugin.directio.max_size_gb": 0.5,
        },
    }  # vLLM's default kv_load_failure_policy
    vllm_config = EngineArgs(
        model=spec["model"], dtype=spec.get("dtype", "float32"), block_size=block, max_model_len=4096,
        enforce_eager=True, enable_prefix_caching=False, max_num_batched_tokens=4096, max_num_seqs=8,
        kv_transfer_config=kv_transfer,
    ).create_engine_config()
    vllm_config.cache_config.num_gpu_blocks = num_blocks  # what the engine core sets after profiling
    names = [f"model.layers.{i}.self_attn.attn" for i in range(layers)]
    attn = FullAttentionSpec(block_size=block, num_kv_heads=heads, head_size=head, dtype=dtype)
    kv_cache_config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                                    kv_cache_groups=[KVCacheGroupSpec(names, attn)])
    with set_current_vllm_config(vllm_config):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"file://{spec['workdir']}/dist")
        ensure_model_parallel_initialized(1, 1)
        ensure_kv_transfer_initialized(vllm_config, kv_cache_config)
    worker = get_kv_transfer_group()
    make_kv = gaudi_kv if spec["runner"] == "gaudi" else vllm_cpu_kv
    kv, buffers = make_kv(layers, num_blocks, block, heads, head, dtype)
    worker.register_kv_caches(kv)
    scheduler = Scheduler(vllm_config, kv_cache_config, StructuredOutputManager(vllm_config),
                          block_size=block, log_stats=True)

    def worker_step(out):
        """One step of the chosen runner; returns (KVConnectorOutput, load checks)."""
        metadata = out.kv_connector_metadata
        tracked = [(r.req_id, r.block_ids[0], r.num_computed_tokens) for r in out.scheduled_new_reqs]
        before = snapshot(kv, buffers, block)
        checks = {}

        def check_loads():
            """Right after the step's loads, before its forward."""
            loaded = set()
            for req_id, blocks, computed in tracked:
                checks[req_id] = loads_exact(kv, prompts[req_id], blocks, computed, block)
                loaded |= set(blocks[: -(-computed // block)])  # a full hit counts len - 1 tokens
            checks["only_loaded_blocks_written"] = changed_blocks(before) <= loaded

        if spec["runner"] == "gaudi":
            lmcache_type = LMCacheConnectorMetadata is not None and isinstance(metadata, LMCacheConnectorMetadata)
            with set_forward_context({"prefill": True} if lmcache_type and spec.get("gate", True) else None,
                                     vllm_config):
                worker.bind_connector_metadata(metadata)
                worker.start_load_kv(get_forward_context())
            checks["metadata_is_lmcache_type"] = lmcache_type
            checks["metadata_requests"] = len(metadata.requests)  # the runner reads it (~L2321)
            check_loads()
            run_forward(out, tracked)
            worker.wait_for_save()
            sending, recving = worker.get_finished(out.finished_req_ids)
            connector_output = KVConnectorOutput(finished_sending=sending, finished_recving=recving)
            worker.clear_connector_metadata()
        else:
            with set_forward_context({"prefill": True}, vllm_config):
                with KVConnectorModelRunnerMixin._get_kv_connector_output(out) as connector_output:
                    check_loads()
                    run_forward(out, tracked)
        return connector_output, checks

    def run_forward(out, tracked):
        for req_id, blocks, computed in tracked:
            forward(kv, prompts[req_id], blocks, computed, computed + out.num_scheduled_tokens[req_id], block)

    def run_pass(tag: str) -> dict:
        for i, tokens in enumerate(spec["prompts"]):
            req_id = f"{tag}-{i}"
            prompts[req_id] = tokens
            scheduler.add_request(Request(req_id, tokens, SamplingParams(max_tokens=1), None))
        result = {"cached": {}, "steps": []}
        for _ in range(50):
            out = scheduler.schedule()
            for r in out.scheduled_new_reqs:
                result["cached"][r.req_id] = r.num_computed_tokens
            connector_output, checks = worker_step(out)
            if out.scheduled_new_reqs:
                result["steps"].append(checks)
            ids = list(out.num_scheduled_tokens)
            mro = ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                                    sampled_token_ids=[[7] for _ in ids], kv_connector_output=connector_output)
            scheduler.update_from_output(out, mro)
            if not scheduler.has_requests():
                break
        return result

    prompts: dict[str, list[int]] = {}
    first = run_pass("cold")
    wait_for_files(spec)
    for buf in buffers:  # stale garbage: a skipped load would leave this under "computed" tokens
        buf.view(torch.uint8).fill_(0xA5)
    damaged = damage_files(spec)
    second = run_pass("warm")
    return {"first": first, "second": second, "damaged": damaged,
            "files_after": len(list(Path(spec["directory"]).rglob("*.kvchunk")))}


def wait_for_files(spec) -> None:
    """The tier writes asynchronously: wait until the chunk files stop changing."""
    import time

    last, stable = None, 0
    while stable < 5:
        now = sorted(str(p) for p in Path(spec["directory"]).rglob("*.kvchunk"))
        stable = stable + 1 if now == last else 0
        last = now
        time.sleep(0.1)


def damage_files(spec) -> int:
    """Flip a payload byte of every third chunk file, truncate every third, leave the rest (``spec["damage"]``)."""
    if not spec.get("damage"):
        return 0
    files = sorted(Path(spec["directory"]).rglob("*.kvchunk"))[::3] + sorted(Path(spec["directory"]).rglob("*.kvchunk"))[1::3]
    for i, path in enumerate(files):
        if i % 2:
            os.truncate(path, path.stat().st_size // 2)
        else:
            with open(path, "r+b") as f:
                f.seek(path.stat().st_size - 100)
                byte = f.read(1)
                f.seek(-1, 1)
                f.write(bytes([byte[0] ^ 0xFF]))
    return len(files)


if __name__ == "__main__":
    code = 1
    try:
        print(json.dumps(main(json.loads(Path(sys.argv[1]).read_text()))), flush=True)
        code = 0
    finally:  # LMCache's threads and ZMQ sockets would keep the interpreter alive
        sys.stderr.flush()
        os._exit(code)
