"""`rotq eval --tasks`: lm-eval on local data through the PyTorch reference, checked against a
direct computation of the same log-likelihoods."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rotq.quant.cli import main
from rotq.quant.data import wikisum_articles
from rotq.quant.models import load_model
from rotq.quant.tasks import wikitext2_documents

pytest.importorskip("lm_eval")


def _bad(argv, capsys, match):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and match in err, err


def test_wikisum_task_equals_direct_loglikelihood(tiny_model_dir, tmp_path):
    """With windows longer than every document, lm-eval's rolling log-likelihood is one forward
    pass per document after the prefix token: recompute it and compare the byte perplexity."""
    model_dir = tiny_model_dir("llama")
    out = tmp_path / "tasks.json"
    assert main(["eval", str(model_dir), "--tasks", "wikisum", "--limit", "3", "--seqlen", "512",
                 "--json", str(out)]) == 0
    got = json.loads(out.read_text())["tasks"]["wikisum"]

    model, tokenizer = load_model(str(model_dir))
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    total_ll, total_bytes, total_words = 0.0, 0, 0
    for doc in wikisum_articles("test")[:3]:
        ids = tokenizer(doc, add_special_tokens=False).input_ids
        assert len(ids) < 512
        x = torch.tensor([[prefix] + ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(x).logits.double(), -1)
        total_ll += float(logp[0, :-1].gather(-1, x[0, 1:, None]).sum())
        total_bytes += len(doc.encode("utf-8"))
        total_words += len(doc.split())
    assert got["byte_perplexity"] == pytest.approx(math.exp(-total_ll / total_bytes), rel=1e-4)
    assert got["bits_per_byte"] == pytest.approx(-total_ll / total_bytes / math.log(2), rel=1e-4)
    assert got["word_perplexity"] == pytest.approx(math.exp(-total_ll / total_words), rel=1e-4)


def test_local_multiple_choice_task_from_tasks_dir(tiny_model_dir, tmp_path):
    data = tmp_path / "mc.jsonl"
    data.write_text("\n".join(json.dumps({"question": f"Question {i}: the capital of France is",
                                          "choices": [" Paris", " a dog", " blue"], "answer": 0})
                              for i in range(5)) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mc.yaml").write_text(
        f"task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n")
    out = tmp_path / "mc.json"
    assert main(["eval", str(tiny_model_dir("llama")), "--tasks", "tiny_mc", "--tasks-dir", str(tasks),
                 "--seqlen", "128", "--json", str(out)]) == 0
    acc = json.loads(out.read_text())["tasks"]["tiny_mc"]["acc"]
    assert acc in (0.0, 1.0)  # five identical questions: all right or all wrong


def test_wikitext2_documents_split_at_titles(tmp_path):
    raw = tmp_path / "wiki.test.raw"
    raw.write_text(" \r\n = Alpha = \r\n \r\n First text . \r\n = = Part = = \r\n More . \r\n"
                   " = Beta = \r\n \r\n Second text . \r\n")
    docs = wikitext2_documents(raw)
    assert len(docs) == 2
    assert docs[0].startswith("= Alpha =") and "= = Part = =" in docs[0] and "More ." in docs[0]
    assert docs[1].startswith("= Beta =") and docs[1].endswith("Second text .")


def test_task_errors_are_one_line(tiny_model_dir, tmp_path, capsys):
    model = str(tiny_model_dir("llama"))
    _bad(["eval", model, "--tasks", "hellaswag"], capsys, "unknown task(s) ['hellaswag']")
    _bad(["eval", model, "--tasks", "wikitext2"], capsys, "pass its path with --wikitext2 PATH")
    _bad(["eval", model, "--tasks", "wikisum", "--limit", "0"], capsys, "--limit must be positive")
    _bad(["eval", model, "--tasks", "wikisum", "--tasks-dir", str(tmp_path / "nope")], capsys, "not a directory")
