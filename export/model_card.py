"""The model card (README.md) of an export, so that OUT can be pushed to the Hugging Face hub as it is.

The front matter holds the hub's metadata (base model, quantized relation, tags, model-index); the body
the scheme in words, how to serve it and the recipe as YAML for ``rotq quantize --recipe``.
:func:`add_evaluation` (``rotq eval --model-card``) rewrites only the front matter and the marked table.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path

import yaml

from rotq.quant.errors import RotqError
from rotq.quant.scheme import Scheme

BEGIN, END = "<!-- rotq:evaluation -->", "<!-- /rotq:evaluation -->"
# What a card keeps of `rotq eval --json`; text, engine, windows and seqlen identify a run.
EVALUATION_KEYS = ("text", "ppl", "engine", "windows", "seqlen", "tokens", "nll")
_key = itemgetter("text", "engine", "windows", "seqlen")


@dataclass(frozen=True)
class ModelCard:
    """What the card states about one export; ``base_model`` is a hub id, None when unknown."""

    base_model: str | None
    scheme: Scheme
    scheme_name: str
    format: str  # "rotq" | "compressed-tensors"
    recipe: dict  # every option with its value, as `rotq quantize --recipe` reads it
    calibration: dict
    method: str
    rotation: str
    evaluations: tuple[dict, ...] = ()


def render(card: ModelCard) -> str:
    """The README.md text: front matter, then the body with the evaluation table between markers."""
    name = f"{card.base_model.rsplit('/', 1)[-1]}-{card.scheme_name}" if card.base_model else card.scheme_name
    front = {"base_model": card.base_model} if card.base_model else {}
    front |= {"base_model_relation": "quantized", "library_name": "vllm", "pipeline_tag": "text-generation",
              "tags": _tags(card)}
    evaluations = [_checked(e) for e in card.evaluations]
    if evaluations:
        front["model-index"] = [{"name": name, "results": [_result(e) for e in evaluations]}]
    base = f"[{card.base_model}](https://huggingface.co/{card.base_model})" if card.base_model else "a local model"
    s = card.scheme
    body = [
        "", f"# {name} (rotq)", "",
        f"{base} quantized to **{card.scheme_name.upper()}** with rotq: "
        f"method `{card.method}`, rotation `{card.rotation}`, {card.format} format.", "",
        "## Scheme", "",
        f"- Weights: {_weights(s)}",
        f"- Activations: {_dynamic(s.activations, 'per token')}",
        f"- KV cache: {_dynamic(s.kv_cache, 'per (token, head)')}",
        f"- Rotations: {_rotations(s)}",
        f"- Kept in 16-bit: {', '.join(f'`{m}`' for m in s.ignore) or 'nothing'}", "",
        "## Serving", "", *_serving(card), "",
        "## Recipe", "",
        "Every option of the run: save this block as `recipe.yaml` and run `rotq quantize "
        f"{card.base_model or 'MODEL'} -o OUT --recipe recipe.yaml` to make this checkpoint again.", "",
        "```yaml", yaml.safe_dump(card.recipe, sort_keys=False).rstrip("\n"), "```", "",
        "## Calibration data", "",
        *(f"- {k}: {v}" for k, v in card.calibration.items()), "",
        "## Evaluation", "",
        BEGIN, _table(evaluations), END, "",
    ]
    return _join(front, "\n".join(body))


def write(card: ModelCard, directory: Path) -> Path:
    """Write ``directory/README.md`` (atomically) and return its path."""
    path = Path(directory) / "README.md"
    _replace(path, render(card))
    return path


def add_evaluation(directory: Path, evaluation: dict) -> None:
    """Add ``evaluation`` to the card in ``directory`` (or replace the one with the same text, engine,
    windows and seqlen) in both model-index and the marked table; the rest of the file is kept."""
    path = Path(directory) / "README.md"
    if not path.is_file():
        raise RotqError(f"{path} does not exist: `rotq quantize` writes the model card into its output; "
                        "pass that output directory, or re-export this checkpoint")
    front, body = _split(path, path.read_text(encoding="utf-8"))
    new = _checked(evaluation)
    index = front.get("model-index") or [{"name": Path(directory).resolve().name, "results": []}]
    runs = {_key(e): e for e in map(_evaluation, index[0]["results"])}
    evaluations = list((runs | {_key(new): new}).values())  # a known run keeps its place
    index[0]["results"] = [_result(e) for e in evaluations]
    front["model-index"] = index
    head, rest = body.split(BEGIN, 1)
    body = f"{head}{BEGIN}\n{_table(evaluations)}\n{END}{rest.split(END, 1)[1]}"
    _replace(path, _join(front, body))


def _tags(card: ModelCard) -> list[str]:
    s = card.scheme
    bits = sorted({f"int{a.bits}" for a in (s.weights, s.activations, s.kv_cache) if a is not None})
    rotation = [s.rotation.kind] if s.rotation.kind != "none" else []
    return ["rotq", card.scheme_name, *bits, "quantized", "vllm", *rotation,
            *(["compressed-tensors"] if card.format == "compressed-tensors" else [])]


def _weights(s: Scheme) -> str:
    w = s.weights
    scale = "one scale per output channel" if w.group_size is None else f"one scale per group of {w.group_size}"
    kind = "symmetric" if w.symmetric else "asymmetric (integer zero point)"
    return f"INT{w.bits}, {kind}, {scale}" + (", range chosen by an MSE clip search" if w.clip_search else "")


def _dynamic(args, granularity: str) -> str:
    if args is None:
        return "16-bit (not quantized)"
    kind = "symmetric" if args.symmetric else "asymmetric"
    return f"INT{args.bits}, dynamic {granularity}, {kind}, clip ratio {args.clip_ratio:g}"


def _rotations(s: Scheme) -> str:
    r = s.rotation  # kind "none" sets none of r1..r4
    made = "learned by SpinQuant from random Hadamards" if r.kind == "spinquant" else "random Hadamard"
    parts = [(r.r1, f"R1 on the residual stream ({made} of seed {r.seed}, folded into the weights)"),
             (r.r2, "R2 per attention head on V and O (folded)"),
             (r.r3, "R3 online Hadamard on Q and K after RoPE"),
             (r.r4, "R4 online Hadamard on the input of down_proj")]
    return "; ".join(text for on, text in parts if on) or "none"


def _serving(card: ModelCard) -> list[str]:
    serve = "vllm serve MODEL    # MODEL: this repository's id or a local copy"
    if card.format == "compressed-tensors":
        return ["Stock vLLM reads this compressed-tensors checkpoint:", "", "```bash", serve, "```"]
    if card.scheme.kv_cache is not None and card.scheme.kv_cache.bits == 4:  # rotq's int4 paged cache
        serve = serve.replace("MODEL ", "MODEL --kv-cache-dtype int4_per_token_head --attention-backend CUSTOM ")
    return ["The rotq format needs rotq's vLLM plugin, which vLLM loads by itself once installed "
            "(it picks `quant_method: rotq` from config.json):", "", "```bash", "pip install rotq", serve,
            "rotq serve DIR    # or: a local copy, on any machine (CPU too), flags added for you", "```"]


def _checked(evaluation: dict) -> dict:
    missing = [k for k in EVALUATION_KEYS if k not in evaluation]
    if missing:
        raise RotqError(f"evaluation {evaluation} lacks {missing}; pass what `rotq eval --json` writes")
    return {k: evaluation[k] for k in EVALUATION_KEYS}


def _result(e: dict) -> dict:
    """A model-index entry; the metric's args keep what the table shows, to rebuild it."""
    return {"task": {"type": "text-generation", "name": "Text Generation"},
            "dataset": {"type": e["text"], "name": e["text"]},
            "metrics": [{"type": "perplexity", "value": e["ppl"],
                         "name": f"perplexity ({e['engine']}, {e['windows']} x {e['seqlen']})",
                         "args": {k: e[k] for k in EVALUATION_KEYS[2:]}}]}


def _evaluation(result: dict) -> dict:
    metric = result["metrics"][0]
    return _checked({"text": result["dataset"]["name"], "ppl": metric["value"], **metric.get("args", {})})


def _table(evaluations: list[dict]) -> str:
    if not evaluations:
        return "No evaluation recorded yet: `rotq eval DIR --ppl wikitext2 --model-card` adds one."
    rows = [f"| {e['text']} | {e['engine']} | {e['windows']} x {e['seqlen']} | {e['tokens']} | {e['ppl']:.4f} |"
            for e in evaluations]
    return "\n".join(["| text | engine | windows x seqlen | tokens | perplexity |", "|---|---|---|---|---|", *rows])


def _join(front: dict, body: str) -> str:
    return f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n{body}"


def _split(path: Path, text: str) -> tuple[dict, str]:
    """(front matter, body after it) of a card rotq wrote; anything else is refused."""
    head, sep, body = text[4:].partition("\n---\n") if text.startswith("---\n") else ("", "", "")
    if not sep or BEGIN not in body or END not in body.split(BEGIN, 1)[1]:
        raise RotqError(f"{path} was not written by rotq (no front matter or no {BEGIN} ... {END} markers); "
                        "add the evaluation by hand, or move the file away and re-export to get rotq's card")
    try:
        front = yaml.safe_load(head) or {}
    except yaml.YAMLError as e:
        raise RotqError(f"{path}: its front matter is not valid YAML ({e}); fix it or re-export") from None
    return front, body


def _replace(path: Path, text: str) -> None:
    """Write a temporary file beside ``path``, then rename it: a crash leaves the old card or the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
