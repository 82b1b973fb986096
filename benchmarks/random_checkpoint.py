"""Write a random Llama- or Qwen3-MoE-shaped checkpoint (sharded bf16 safetensors + config +
tokenizer) for testing calibration at scale without downloading a model.

One decoder layer per shard, each tensor generated, written and freed in turn, so writing an
8B-shaped model needs about one layer of memory. Weights are N(0, 0.02²) (the Llama init), norms
one. The tokenizer is the built-in SmolLM2's (its ids are below every shape's vocabulary), so
`rotq quantize` can calibrate on real text. ``--layers N`` keeps only the first N decoder layers
(Qwen3-30B-A3B's 48 would take 58 GB of disk; offloaded calibration holds one layer at a time,
so its peak memory does not depend on the depth and its time grows linearly with it).

    python benchmarks/random_checkpoint.py llama3-8b -o /tmp/llama3-8b-random
    python benchmarks/random_checkpoint.py qwen3-30b-a3b --layers 2 -o /tmp/qwen3-30b-a3b-random
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    "llama3-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    # Qwen3-30B-A3B: 128 experts of intermediate 768, 8 per token; head_dim 128 with 32 heads on hidden 2048
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                          num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
                          mlp_only_layers=[], num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                          head_dim=128, vocab_size=151936, rope_theta=1000000.0, max_position_embeddings=40960),
}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


def layer_shapes(c: dict, i: int) -> dict[str, tuple[int, ...]]:
    d, f = c["hidden_size"], c["intermediate_size"]
    hd = c.get("head_dim") or d // c["num_attention_heads"]
    p = f"model.layers.{i}."
    shapes = {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
              p + "self_attn.q_proj.weight": (c["num_attention_heads"] * hd, d),
              p + "self_attn.k_proj.weight": (c["num_key_value_heads"] * hd, d),
              p + "self_attn.v_proj.weight": (c["num_key_value_heads"] * hd, d),
              p + "self_attn.o_proj.weight": (d, c["num_attention_heads"] * hd)}
    if c.get("model_type") != "qwen3_moe":
        return shapes | {p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                         p + "mlp.down_proj.weight": (d, f)}
    shapes |= {p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
               p + "mlp.gate.weight": (c["num_experts"], d)}  # the router
    fe = c["moe_intermediate_size"]
    for e in range(c["num_experts"]):
        q = f"{p}mlp.experts.{e}."
        shapes |= {q + "gate_proj.weight": (fe, d), q + "up_proj.weight": (fe, d), q + "down_proj.weight": (d, fe)}
    return shapes


def tensor(name: str, shape, g: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)


def write(shape: str, out: Path, seed: int, layers: int | None = None) -> None:
    from rotq.quant.models import resolve_model_dir

    c = dict(SHAPES[shape])
    if layers is not None:
        c["num_hidden_layers"] = layers
    if out.exists():
        sys.exit(f"{out} already exists; choose a new path")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    groups = [{"model.embed_tokens.weight": (c["vocab_size"], c["hidden_size"]),
               "model.norm.weight": (c["hidden_size"],), "lm_head.weight": (c["vocab_size"], c["hidden_size"])}]
    groups += [layer_shapes(c, i) for i in range(c["num_hidden_layers"])]
    weight_map, total, n = {}, 0, len(groups)
    for k, group in enumerate(groups, 1):
        file = f"model-{k:05d}-of-{n:05d}.safetensors"
        tensors = {name: tensor(name, s, g) for name, s in group.items()}
        save_file(tensors, tmp / file, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, file))
        print(f"\rwrote shard {k}/{n}", end="", flush=True)
    print()
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    model_type = c.pop("model_type", "llama")
    config = {"architectures": [ARCHITECTURES[model_type]], "model_type": model_type, "hidden_act": "silu",
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
              "bos_token_id": 1, "eos_token_id": 2, "dtype": "bfloat16", **c}
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    builtin = resolve_model_dir("smollm2-135m")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(builtin / name, tmp / name)
    tmp.rename(out)
    print(f"{out}: {shape}, {total / 1e9:.2f} GB in {n} shards")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("shape", choices=sorted(SHAPES))
    p.add_argument("-o", "--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers")
    a = p.parse_args()
    t0 = time.perf_counter()
    write(a.shape, a.out, a.seed, a.layers)
    print(f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
