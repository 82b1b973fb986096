"""vLLM with the plugin attends over a checkpoint's full-precision prefix exactly as the
PyTorch reference does: with the int4 cache and with a 16-bit cache, in decode, prefill,
chunked prefill (a token budget of 48 per step) and with prefix caching (a prompt repeating
another's first 70 tokens reads pages an earlier request wrote), under tensor parallelism 2 (each
rank its KV heads' share of the prefix). The tiny random model's tokens are compared exactly."""

import pytest
import torch

pytest.importorskip("vllm")

from reference import reference_greedy, reference_logprobs  # noqa: E402  (tests/serving/reference.py)

from rotq.quant.cli import main  # noqa: E402
from rotq.quant.prefix import attach_prefix  # noqa: E402
from rotq.quant.reference_model import load_rotq  # noqa: E402
from rotq.serving.engine import EngineOptions, close_engine, greedy_tokens, make_engine, prompt_logprobs  # noqa: E402

PREFIX = "5,17,3"
TEXT = ("The quick brown fox jumps over the lazy dog. Paris is the capital and most populous city "
        "of France. A rotation of the hidden state leaves the output of the network unchanged. ") * 60
PAGED = dict(block_size=32, max_num_batched_tokens=48, max_model_len=128, kv_cache_memory_bytes=16 << 20)


def _quantize(model_dir, root, scheme):
    (root / "text.txt").write_text(TEXT)
    out = root / scheme
    assert main(["quantize", str(model_dir), "-o", str(out), "--scheme", scheme, "--rotation", "hadamard",
                 "--method", "gptq", "--calib", str(root / "text.txt"), "--nsamples", "8", "--seqlen", "64",
                 "--prefix", PREFIX]) == 0
    return out


def _requests():
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (1, 7, 37, 100)]
    shared = prompts[3][:70] + torch.randint(3, 512, (9,), generator=g).tolist()
    return prompts, shared, torch.randint(3, 512, (3, 97), generator=g)


def _check(checkpoint, options: EngineOptions):
    model, _, scheme = load_rotq(checkpoint)
    assert scheme.prefix is not None
    prompts, shared, windows = _requests()
    ref_tokens = reference_greedy(model, prompts + [shared], 12)
    ref_lp = reference_logprobs(model, windows)
    attach_prefix(model, None)
    without = reference_logprobs(model, windows)
    assert (without - ref_lp).abs().max() > 1e-2  # the prefix changes the outputs: the check has teeth
    llm = make_engine(str(checkpoint), options)
    try:
        assert greedy_tokens(llm, prompts, 12) == ref_tokens[:4]  # a batch of mixed lengths
        assert greedy_tokens(llm, [shared], 12) == ref_tokens[4:]  # its first 64 tokens' pages are cached
        lp = torch.stack(prompt_logprobs(llm, windows))
    finally:
        close_engine(llm)
    torch.testing.assert_close(lp, ref_lp, rtol=0, atol=2e-4)


@pytest.fixture(scope="module")
def tiny_prefixed(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix-vllm")
    return {s: _quantize(tiny_model_dir("llama"), root, s) for s in ("w4a4kv4", "w4a4")}


def test_prefix_through_the_int4_cache(tiny_prefixed):
    _check(tiny_prefixed["w4a4kv4"], EngineOptions(**PAGED))


def test_prefix_through_a_16_bit_cache(tiny_prefixed):
    _check(tiny_prefixed["w4a4"], EngineOptions(**PAGED))


def test_prefix_under_tensor_parallelism(tiny_prefixed):
    _check(tiny_prefixed["w4a4kv4"], EngineOptions(tensor_parallel_size=2, **PAGED))


def test_other_backends_refuse_a_prefixed_checkpoint(tiny_prefixed, monkeypatch, capfd):
    """Served without rotq's attention the prefix would be silently dropped: refused instead
    (the engine's worker raises; vLLM reports the failure and logs the worker's message)."""
    monkeypatch.setenv("ROTQ_KV4_BACKEND", "0")
    with pytest.raises(Exception):
        make_engine(str(tiny_prefixed["w4a4"]), EngineOptions(**PAGED))
    captured = capfd.readouterr()
    assert "CPU_ATTN backend cannot attend over" in captured.out + captured.err
