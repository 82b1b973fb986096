"""The Python API of evaluation: perplexity (and KL against the full-precision model) of a model
or a rotq checkpoint, through the PyTorch reference or vLLM with the rotq plugin, and lm-eval
tasks on local data. ``rotq eval`` is a thin layer over these functions.

    from rotq.quant import evaluate
    result = evaluate("out", "wikitext2:/data/wiki.test.raw", windows=40, seqlen=2048)
    result.ppl

The protocol (windows, no BOS, which split) is described in docs/evaluation.md.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from rotq.quant.errors import RotqError

ENGINES = ("torch", "vllm")


@dataclass(frozen=True)
class Evaluation:
    """Perplexity of ``model`` on ``text``: exp(mean NLL) over ``windows`` x (``seqlen`` - 1)
    predicted tokens; with a reference model, the mean KL(P_ref || P) and top-1 agreement."""

    model: str
    text: str
    engine: str
    quantized: bool
    ppl: float
    nll: float
    tokens: int
    windows: int
    seqlen: int
    kl_vs_reference: float | None = None
    top1_agreement: float | None = None
    kl_tokens: int | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def evaluate(model: str | Path, text: str = "wikisum", *, windows: int | None = None, seqlen: int = 2048,
             batch_size: int = 1, device: str = "cpu", engine: str = "torch", tp: int = 1,
             kl_vs: str | Path | None = None) -> Evaluation:
    """Perplexity of ``model`` (HF directory, hub id, builtin name or rotq checkpoint) on ``text``
    (wikisum, wikitext2 or a file path; the test split), over the first ``windows`` windows of
    ``seqlen`` tokens (None: all). ``kl_vs``: also compare with this full-precision model (torch
    engine)."""
    from rotq.quant.data import load_text

    _check_engine(engine, device, tp, windows)
    if kl_vs is not None and engine != "torch":
        raise RotqError("--kl-vs compares full distributions, which only the torch engine gives; drop --engine vllm")
    loaded = load_text(text, "test")
    if engine == "vllm":
        quantized, result = _vllm_perplexity(str(model), loaded, windows, seqlen, tp)
        extra = {}
    else:
        quantized, result, extra = _torch_perplexity(str(model), loaded, windows, seqlen, batch_size, device, kl_vs)
    return Evaluation(str(model), text, engine, quantized, result.ppl, result.nll, result.tokens, result.windows,
                      result.seqlen, **extra)


def evaluate_tasks(model: str | Path, tasks: list[str], *, tasks_dir: str | Path | None = None,
                   wikitext2: str | Path | None = None, limit: int | None = None, seqlen: int = 2048,
                   batch_size: int = 1, device: str = "cpu", engine: str = "torch", tp: int = 1) -> dict:
    """lm-eval tasks on local data: {task: {metric: value}} (see quant/tasks.py)."""
    from rotq.quant.models import resolve_model_dir
    from rotq.quant.tasks import local_tasks, run_tasks, torch_lm

    _check_engine(engine, device, tp, None)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local json tasks only: never wait on a hub
    with local_tasks(tasks, tasks_dir, wikitext2, limit) as manager:
        if engine == "vllm":
            from rotq.serving.lm_eval_vllm import VLLMTasksLM

            os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
            lm = VLLMTasksLM(str(resolve_model_dir(str(model))), tp, seqlen)
            try:
                return run_tasks(lm, tasks, manager, limit)
            finally:
                lm.close()
        net, tokenizer, _ = load_for_eval(str(model))
        net.to(device)
        check_seqlen(net.config, seqlen)
        return run_tasks(torch_lm(net, tokenizer, batch_size, seqlen), tasks, manager, limit)


def load_for_eval(spec: str):
    """(model, tokenizer, scheme or None): a plain model, or the PyTorch reference of a rotq
    checkpoint (dequantized weights, online ops installed)."""
    from rotq.export.rotq_format import is_rotq_checkpoint
    from rotq.quant.models import load_model
    from rotq.quant.reference_model import load_rotq

    if is_rotq_checkpoint(spec):
        return load_rotq(spec)
    model, tokenizer = load_model(spec)
    return model, tokenizer, None


def record_in_model_card(checkpoint: str | Path, evaluation: Evaluation) -> None:
    """Add (or update) ``evaluation`` in the checkpoint's model card (README.md written by quantize)."""
    from rotq.export.model_card import add_evaluation

    add_evaluation(Path(checkpoint), evaluation.to_dict())


def check_seqlen(config, seqlen: int) -> None:
    limit = getattr(config, "max_position_embeddings", None)
    if seqlen <= 1 or (limit is not None and seqlen > limit):
        raise RotqError(f"seqlen {seqlen} is outside this model's range 2..{limit} (max_position_embeddings); "
                        "choose a shorter --seqlen")


def _check_engine(engine: str, device: str, tp: int, windows: int | None) -> None:
    from rotq.quant.distributed import check_device

    if engine not in ENGINES:
        raise RotqError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if windows is not None and windows <= 0:
        raise RotqError(f"--windows must be positive, got {windows}")
    if tp < 1:
        raise RotqError(f"--tp must be positive, got {tp}")
    if check_device(device) != "cpu" and engine == "vllm":
        raise RotqError("--device places the torch engine's model; vLLM picks its own device: drop --device")


def _torch_perplexity(spec: str, text: str, windows, seqlen: int, batch_size: int, device: str, kl_vs):
    from rotq.quant.data import eval_windows, tokenize_text
    from rotq.quant.perplexity import perplexity

    model, tokenizer, scheme = load_for_eval(spec)
    model.to(device)
    check_seqlen(model.config, seqlen)
    ids = eval_windows(tokenize_text(tokenizer, text), windows, seqlen)
    result = perplexity(model, ids, batch_size)
    extra = {}
    if kl_vs is not None:
        extra = _divergence(model, tokenizer, spec, str(kl_vs), ids, batch_size, device).to_dict()
    return scheme is not None, result, extra


def _divergence(model, tokenizer, spec: str, reference_spec: str, windows, batch_size: int, device: str):
    """KL and top-1 agreement against the reference, which must share the tokenizer."""
    from rotq.quant.divergence import divergence
    from rotq.quant.models import load_model

    reference, ref_tokenizer = load_model(reference_spec)
    reference.to(device)
    if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise RotqError(f"--kl-vs {reference_spec} has a different tokenizer than {spec}; compare a quantized model "
                        "with the model it was made from")
    return divergence(model, reference, windows, batch_size)


def _vllm_perplexity(spec: str, text: str, windows, seqlen: int, tp: int):
    """Perplexity through vLLM (prompt logprobs) on the same windows as the torch engine."""
    from transformers import AutoConfig, AutoTokenizer

    from rotq.export.rotq_format import is_rotq_checkpoint, read_scheme
    from rotq.quant.data import eval_windows, tokenize_text
    from rotq.quant.models import resolve_model_dir
    from rotq.quant.perplexity import PerplexityResult
    from rotq.serving.engine import EngineOptions, close_engine, make_engine, vllm_perplexity

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    model_dir = resolve_model_dir(spec)
    quantized = is_rotq_checkpoint(model_dir)
    if quantized:
        read_scheme(model_dir)  # a bad schema fails here, with its field named, not inside vLLM
    check_seqlen(AutoConfig.from_pretrained(model_dir), seqlen)
    ids = eval_windows(tokenize_text(AutoTokenizer.from_pretrained(model_dir), text), windows, seqlen)
    llm = make_engine(str(model_dir), EngineOptions(tensor_parallel_size=tp, max_model_len=seqlen + 1))
    try:
        return quantized, PerplexityResult.from_nll(*vllm_perplexity(llm, ids))
    finally:
        close_engine(llm)
