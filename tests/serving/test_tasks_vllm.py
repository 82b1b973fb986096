"""`rotq eval --tasks --engine vllm` scores what the PyTorch reference scores: the same rolling
windows and the same multiple-choice log-likelihoods, through vLLM with the rotq plugin."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm")
pytest.importorskip("lm_eval")

from rotq.quant.cli import main  # noqa: E402

TEXT = ("The quick brown fox jumps over the lazy dog. Paris is the capital and most populous city "
        "of France. A rotation of the hidden state leaves the output of the network unchanged. ") * 40


def test_vllm_tasks_match_the_reference(tiny_model_dir, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    ckpt = tmp_path / "w4a16kv4"
    assert main(["quantize", str(tiny_model_dir("llama")), "-o", str(ckpt), "--scheme", "w4a16kv4",
                 "--calib", str(calib), "--nsamples", "4", "--seqlen", "64"]) == 0
    data = tmp_path / "mc.jsonl"
    data.write_text("\n".join(json.dumps({"question": q, "choices": [" Paris", " a dog", " blue", " seven"],
                                          "answer": i % 4})
                              for i, q in enumerate(["The capital of France is", "A quick brown fox is",
                                                     "The sky is", "Three plus four is"])) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mc.yaml").write_text(
        f"task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n")
    results = {}
    for engine in ("torch", "vllm"):
        out = tmp_path / f"{engine}.json"
        # windows of 128 tokens: the longer articles span several rolling windows
        assert main(["eval", str(ckpt), "--tasks", "wikisum,tiny_mc", "--tasks-dir", str(tasks), "--limit", "4",
                     "--seqlen", "128", "--engine", engine, "--json", str(out)]) == 0
        results[engine] = json.loads(out.read_text())["tasks"]
    torch_r, vllm_r = results["torch"], results["vllm"]
    assert vllm_r["wikisum"]["bits_per_byte"] == pytest.approx(torch_r["wikisum"]["bits_per_byte"], rel=1e-4)
    assert vllm_r["wikisum"]["word_perplexity"] == pytest.approx(torch_r["wikisum"]["word_perplexity"], rel=1e-3)
    assert vllm_r["tiny_mc"]["acc"] == torch_r["tiny_mc"]["acc"]
