"""Text sources and the token tensors cut from them."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from rotq.quant.data import (
    calibration_batches,
    eval_windows,
    load_text,
    tokenize_text,
    wikisum_articles,
)
from rotq.quant.errors import RotqError

REPO_ROOT = Path(__file__).resolve().parents[2]
WIKITEXT2_TEST = REPO_ROOT / ".." / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def test_wikisum_split_sizes():
    test, train = wikisum_articles("test"), wikisum_articles("train")
    assert (len(test), len(train)) == (1004, 9029)
    assert not set(test) & set(train)
    assert load_text("wikisum", "test") == "\n\n".join(test)
    assert len(load_text("wikisum", "test")) == 494_274


def test_wikisum_split_override():
    assert load_text("wikisum:test", "train") == load_text("wikisum", "test")
    assert load_text("wikisum:train", "test") == load_text("wikisum", "train")
    with pytest.raises(RotqError, match="validation"):
        load_text("wikisum:validation", "test")


def test_wikitext2_offline_names_the_file_alternative(monkeypatch):
    fake = types.ModuleType("datasets")

    def load_dataset(*args, **kwargs):
        raise ConnectionError("offline")

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(RotqError, match="wiki.test.raw"):
        load_text("wikitext2", "test")


def test_text_file_crlf_is_normalised(tmp_path):
    path = tmp_path / "t.raw"
    path.write_bytes(b" = Title = \r\n Some text .\r\n")
    assert load_text(str(path), "test") == " = Title = \n Some text .\n"


def test_empty_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text(" \n\n\t")
    with pytest.raises(RotqError, match="empty"):
        load_text(str(path), "test")


def test_unknown_source(tmp_path):
    with pytest.raises(RotqError, match="c4.*wikisum"):
        load_text("c4", "train")
    with pytest.raises(RotqError, match="neither"):
        load_text(str(tmp_path), "test")  # a directory is not a text file


@pytest.mark.skipif(not WIKITEXT2_TEST.is_file(), reason=f"WikiText-2 raw test file not found at {WIKITEXT2_TEST}")
def test_wikitext2_raw_file():
    text = load_text(str(WIKITEXT2_TEST), "test")
    assert "\r\n" not in text
    assert text.startswith(" = Robert Boulter = \n")


def test_tokenize_text(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    ids = tokenize_text(tokenizer, "The quick brown fox")
    assert ids.dtype == torch.long and ids.dim() == 1
    assert ids.tolist() == tokenizer("The quick brown fox", add_special_tokens=False)["input_ids"]
    assert tokenizer.bos_token_id not in ids.tolist()
    with pytest.raises(RotqError, match="no tokens"):
        tokenize_text(tokenizer, "")


def test_calibration_batches_deterministic():
    ids = torch.arange(1000)
    a = calibration_batches(ids, nsamples=8, seqlen=64, seed=0)
    assert a.shape == (8, 64) and a.dtype == torch.long
    assert torch.equal(a, calibration_batches(ids, nsamples=8, seqlen=64, seed=0))
    assert not torch.equal(a, calibration_batches(ids, nsamples=8, seqlen=64, seed=1))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 63, dtype=torch.long))  # contiguous windows
    assert a.min() >= 0 and a.max() <= 998  # last start is len - seqlen - 1


def test_calibration_batches_needs_seqlen_plus_one_tokens():
    assert calibration_batches(torch.arange(65), 4, 64, 0).shape == (4, 64)
    with pytest.raises(RotqError, match="64 tokens.*65"):
        calibration_batches(torch.arange(64), 4, 64, 0)


def test_eval_windows():
    ids = torch.arange(1000)
    windows = eval_windows(ids, 3, 128)
    assert windows.shape == (3, 128)
    assert torch.equal(windows.flatten(), ids[:384])
    assert eval_windows(ids, None, 128).shape == (7, 128)  # tail of 104 tokens dropped
    with pytest.raises(RotqError, match="7 windows"):
        eval_windows(ids, 8, 128)
    with pytest.raises(RotqError, match="0 windows"):
        eval_windows(ids, None, 2048)
