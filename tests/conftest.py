"""Shared fixtures: tiny random models of every supported architecture, built offline.

Usage in any test:

    def test_something(tiny_model_dir):
        model_dir = tiny_model_dir("qwen3")                # Path of a saved HF directory
        odd_dir = tiny_model_dir("llama", nonpow2=True)    # hidden 144, 9 heads x 16, 3 KV heads
        model, tokenizer = rotq.quant.models.load_model(str(model_dir))

Directories are built once per session and shared: copy one before modifying it on disk.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter on CPU machines
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY_ARCHS = ("llama", "qwen2", "qwen3", "mistral")
TINY_MOE_ARCHS = ("qwen3_moe", "mixtral")  # mixtures of experts: 8 experts, 2 per token
TINY_VOCAB = 512
# Power-of-two sizes (head_dim 64) and non-power-of-two ones (hidden 36*4, heads 9 and 3, intermediate 12*32).
_SIZES = {
    False: dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64, intermediate_size=512),
    True: dict(hidden_size=144, num_attention_heads=9, num_key_value_heads=3, head_dim=16, intermediate_size=384),
}
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital and most populous city of France.",
    "A rotation of the hidden state leaves the output of the network unchanged.",
    "Quantization maps weights and activations to four-bit integers with a scale per group.",
    "The river flows through the valley, past the old mill and into the sea.",
    "In 1905, Albert Einstein published four papers that changed physics.",
]


def _config(arch: str, nonpow2: bool):
    """Tiny config; llama ties embeddings like SmolLM2, the others keep a separate lm_head."""
    from transformers import LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    common = dict(
        vocab_size=TINY_VOCAB, num_hidden_layers=2, max_position_embeddings=512, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, **_SIZES[nonpow2],
    )
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=True)
    if arch == "qwen2":  # q/k/v carry biases in Qwen2
        return Qwen2Config(**common, tie_word_embeddings=False, use_sliding_window=False)
    if arch == "qwen3":  # per-head q_norm/k_norm
        return Qwen3Config(**common, tie_word_embeddings=False, use_sliding_window=False)
    if arch == "mistral":
        return MistralConfig(**common, tie_word_embeddings=False, sliding_window=None)
    # MoE: each expert's intermediate is the dense one / 4 (non-powers of two: 96 = 3 x 32); Qwen3-MoE's
    # second layer is dense (mlp_only_layers), as some Qwen3-MoE checkpoints have
    expert = _SIZES[nonpow2]["intermediate_size"] // 4
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(**common, tie_word_embeddings=False, use_sliding_window=False, num_experts=8,
                              num_experts_per_tok=2, moe_intermediate_size=expert, norm_topk_prob=True,
                              mlp_only_layers=[1])
    if arch == "mixtral":
        common["intermediate_size"] = expert
        return MixtralConfig(**common, tie_word_embeddings=False, sliding_window=None, num_local_experts=8,
                             num_experts_per_tok=2)
    raise ValueError(f"unknown tiny architecture {arch!r}; choose from {TINY_ARCHS + TINY_MOE_ARCHS}")


def _tokenizer():
    """Byte-level BPE trained on a few sentences: any text tokenizes, and ids stay below TINY_VOCAB."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def build_tiny_model(arch: str, out_dir: Path, nonpow2: bool = False) -> Path:
    """Save a seeded random model and its tokenizer to out_dir.

    Norm weights and biases are perturbed away from their 1/0 init so that norm fusion and
    bias handling bugs change the outputs instead of hiding behind identities.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(arch, nonpow2), dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                param.normal_(0.0, 0.02)  # transformers leaves fused expert weights uninitialised
            elif name.endswith("norm.weight"):
                param.add_(0.2 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.05)
    model.save_pretrained(out_dir)
    _tokenizer().save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """make(arch, nonpow2=False) -> Path of a saved tiny model (arch in TINY_ARCHS or TINY_MOE_ARCHS),
    built once per session."""
    built: dict[tuple[str, bool], Path] = {}

    def make(arch: str, nonpow2: bool = False) -> Path:
        key = (arch, nonpow2)
        if key not in built:
            out = tmp_path_factory.mktemp(f"tiny-{arch}{'-nonpow2' if nonpow2 else ''}")
            built[key] = build_tiny_model(arch, out, nonpow2)
        return built[key]

    return make
