"""vLLM serves rotq's quantized mixture-of-experts layers (serving/moe.py) computing what the
PyTorch reference computes: tiny random Qwen3-MoE (its second layer dense) and Mixtral, 8 experts
and 2 per token, at W4A16 and at W4A4 with the int4 KV cache, at TP 1 and 2 (each rank holds half
of every expert's intermediate row and all-gathers it before R4 and the activation quantizer), and
with expert parallelism (each rank whole experts); the routers stay 16-bit.

Engines are the cost (~20-30 s each on two cores): one live at a time, each configuration's checks
on one engine. The checkpoints are RTN without the weight clip search and with a fixed activation
clip, which keeps them quick (serving does not depend on how the codes were chosen). The fixed
clip 0.9 matters for another reason too: the first token attends only to itself, so its o_proj
input is its dequantized int4 V, and with the auto clip (0.7 on these models, a scale of max/10)
such values can sit exactly on a 4-bit rounding boundary, where vLLM and the reference round
differently in the last bit (a KV4 + A4 property of any model, not of the experts).
"""

import operator

import pytest
import torch

pytest.importorskip("vllm")

from reference import reference_greedy, reference_logprobs  # noqa: E402  (tests/serving/reference.py)

from rotq.quant.cli import main  # noqa: E402
from rotq.quant.reference_model import load_rotq  # noqa: E402
from rotq.serving.engine import (  # noqa: E402
    EngineOptions,
    close_engine,
    engine_kwargs,
    greedy_tokens,
    prompt_logprobs,
)

TEXT = ("The quick brown fox jumps over the lazy dog. Paris is the capital and most populous city "
        "of France. A rotation of the hidden state leaves the output of the network unchanged. ") * 60
FAST = {"w4a16": ["--w-clip-max-shrink", "0"], "w4a4kv4": ["--w-clip-max-shrink", "0", "--a-clip", "0.9"]}


@pytest.fixture(scope="module")
def checkpoints(tiny_model_dir, tmp_path_factory):
    """get(arch, scheme) -> (checkpoint, prompts, reference tokens, windows, reference logprobs), built once."""
    root = tmp_path_factory.mktemp("moe")
    (root / "text.txt").write_text(TEXT)
    built = {}

    def get(arch, scheme):
        if (arch, scheme) not in built:
            out = root / f"{arch}-{scheme}"
            assert main(["quantize", str(tiny_model_dir(arch)), "-o", str(out), "--scheme", scheme,
                         "--rotation", "hadamard", "--method", "rtn", "--calib", str(root / "text.txt"),
                         "--nsamples", "8", "--seqlen", "64", *FAST[scheme]]) == 0
            model, _, s = load_rotq(out)
            assert s.rotation.r4 and (s.activations is not None) == (scheme == "w4a4kv4")
            g = torch.Generator().manual_seed(0)
            prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (1, 7, 37)]
            windows = torch.randint(3, 512, (3, 61), generator=g)
            built[arch, scheme] = (out, prompts, reference_greedy(model, prompts, 12), windows,
                                   reference_logprobs(model, windows))
        return built[arch, scheme]

    return get


@pytest.fixture(scope="module")
def engine():
    """get(checkpoint, tp, ep=False) -> a vLLM engine; one live at a time, so a test can reuse the
    previous test's. Insecure serialization lets apply_model send a function to the workers."""
    from vllm import LLM

    live = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

        def get(out, tp, ep=False):
            if (out, tp, ep) not in live:
                for llm in live.values():
                    close_engine(llm)
                live.clear()
                options = EngineOptions(tensor_parallel_size=tp, max_model_len=128, kv_cache_memory_bytes=16 << 20)
                live[out, tp, ep] = LLM(model=str(out), skip_tokenizer_init=True, enable_expert_parallel=ep,
                                        **engine_kwargs(str(out), options))
            return live[out, tp, ep]

        yield get
        for llm in live.values():
            close_engine(llm)


def _check(llm, prompts, ref_tokens, windows, ref_lp):
    assert greedy_tokens(llm, prompts, 12) == ref_tokens
    lp = torch.stack(prompt_logprobs(llm, windows))
    torch.testing.assert_close(lp, ref_lp, rtol=0, atol=2e-4)


# The last case's engine is the router test's.
@pytest.mark.parametrize("arch,scheme,tp", [
    ("mixtral", "w4a16", 1), ("mixtral", "w4a16", 2), ("mixtral", "w4a4kv4", 1), ("mixtral", "w4a4kv4", 2),
    ("qwen3_moe", "w4a16", 1), ("qwen3_moe", "w4a16", 2), ("qwen3_moe", "w4a4kv4", 2), ("qwen3_moe", "w4a4kv4", 1),
])
def test_moe_matches_reference(checkpoints, engine, arch, scheme, tp):
    out, *expected = checkpoints(arch, scheme)
    _check(engine(out, tp), *expected)


def test_router_stays_unquantized_and_experts_are_rotq(checkpoints, engine):
    """Qwen3-MoE's router asks the quantization config for its method (Mixtral's does not): the
    scheme's ignore list keeps it a float linear. The W4A4 experts run on the int8 path (oneDNN),
    holding no float copy of their weights."""
    out, *_ = checkpoints("qwen3_moe", "w4a4kv4")
    (got,) = engine(out, 1).apply_model(operator.attrgetter(
        "model.layers.0.mlp.gate.quant_method.__class__.__name__", "model.layers.0.mlp.gate.weight.dtype",
        "model.layers.0.mlp.experts.routed_experts.quant_method.__class__.__name__",
        "model.layers.0.mlp.experts.routed_experts.quant_method.path"))
    assert got == ("UnquantizedLinearMethod", torch.float32, "RotqMoEMethod", "int8")


def test_moe_expert_parallel_matches_reference(checkpoints, engine):
    """--enable-expert-parallel on two ranks: four whole experts each, no gather, the runner sums."""
    out, *expected = checkpoints("mixtral", "w4a4kv4")
    llm = engine(out, 2, ep=True)
    assert llm.apply_model(operator.attrgetter(
        "model.layers.0.block_sparse_moe.experts.routed_experts.local_num_experts")) == [4, 4]
    _check(llm, *expected)
