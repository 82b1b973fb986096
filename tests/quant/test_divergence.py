"""KL divergence and top-1 agreement against the full-precision model (rotq eval --kl-vs)."""

import json
import math

import pytest
import torch

from rotq.quant.cli import main
from rotq.quant.divergence import divergence, token_divergence
from rotq.quant.models import load_model


def test_token_divergence_matches_the_definition():
    g = torch.Generator().manual_seed(0)
    logits, ref = torch.randn(3, 5, 11, generator=g), torch.randn(3, 5, 11, generator=g) * 2
    kl, same = token_divergence(logits, ref)
    for i in range(3):
        for t in range(5):
            p = [math.exp(v) for v in ref[i, t].double().tolist()]
            q = [math.exp(v) for v in logits[i, t].double().tolist()]
            p, q = [v / sum(p) for v in p], [v / sum(q) for v in q]
            assert kl[i, t].item() == pytest.approx(sum(a * math.log(a / b) for a, b in zip(p, q)), rel=1e-9)
            assert bool(same[i, t]) == (logits[i, t].argmax() == ref[i, t].argmax())
    assert (kl > 0).all()
    shifted, _ = token_divergence(logits + 3.0, ref - 1.0)  # logits are defined up to a constant
    torch.testing.assert_close(shifted, kl)


def test_a_model_against_itself(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir("llama")))
    windows = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(1))
    result = divergence(model, model, windows, progress=False)
    assert result.kl == pytest.approx(0, abs=1e-12) and result.top1_agreement == 1 and result.tokens == 32


def test_cli_reports_divergence_of_a_quantized_model(tiny_model_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("A rotation of the hidden state leaves the output unchanged. Paris is in France. " * 80)
    fp = str(tiny_model_dir("llama"))
    out = tmp_path / "q"
    assert main(["quantize", fp, "-o", str(out), "--calib", str(text), "--nsamples", "4", "--seqlen", "32",
                 "--method", "rtn"]) == 0
    report = tmp_path / "eval.json"
    assert main(["eval", str(out), "--ppl", str(text), "--windows", "3", "--seqlen", "32", "--kl-vs", fp,
                 "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["kl_vs_reference"] > 0 and 0 <= result["top1_agreement"] < 1
    assert result["kl_tokens"] == result["tokens"] == 3 * 31
    assert "top-1 agreement" in capsys.readouterr().out
    assert main(["eval", str(out), "--ppl", str(text), "--kl-vs", fp, "--engine", "vllm"]) == 2
    assert "only the torch engine" in capsys.readouterr().err
