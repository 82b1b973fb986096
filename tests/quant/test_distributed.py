"""Distributed calibration (quant/distributed.py): `rotq quantize` under torchrun with 2 gloo
ranks writes the same checkpoint as one process, bit for bit, when each process uses the same
number of threads (one here); and the sharding arithmetic behind it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rotq.quant.distributed import Ranks

TEXT = ("The quick brown fox jumps over the lazy dog. Paris is the capital of France. "
        "A rotation of the hidden state leaves the output of the network unchanged. ") * 60 + "\n"


@pytest.mark.parametrize("n,batch,world", [(64, 8, 2), (7, 2, 2), (9, 4, 2), (5, 1, 3), (16, 8, 3), (1, 8, 2)])
def test_shards_are_contiguous_whole_batches_covering_every_sample(n, batch, world):
    shards = [Ranks(r, world).shard(n, batch) for r in range(world)]
    assert [i for s in shards for i in range(s.start, s.stop)] == list(range(n))
    for s in shards:  # a rank may get nothing when there are fewer batches than ranks
        assert s.start == s.stop or (s.start % batch == 0 and (s.stop % batch == 0 or s.stop == n))
    sizes = [-(-(s.stop - s.start) // batch) for s in shards]  # batches per rank differ by at most one
    assert max(sizes) - min(sizes) <= 1


def _env():
    return os.environ | {"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def _quantize(argv: list[str], ranks: int) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                 "-m", "rotq.quant.cli"] if ranks > 1 else [sys.executable, "-m", "rotq.quant.cli"])
    return subprocess.run([*launcher, "quantize", *argv], env=_env(), capture_output=True, text=True, timeout=600)


def _files(out) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _without_clock(value):
    if isinstance(value, dict):
        return {k: _without_clock(v) for k, v in value.items() if k not in ("seconds", "peak_rss_mb", "processes")}
    if isinstance(value, list):
        return [_without_clock(v) for v in value]
    return value


@pytest.mark.parametrize("arch,nonpow2,extra", [
    # the W4A4KV4 default pipeline: learned rotation (3 sequences a step, split 2 + 1), fitted
    # activation clip, QEP with GPTAQ's asymmetric statistic D
    ("llama", False, ["--rotation-steps", "2", "--rotation-samples", "3", "--method", "qep+gptaq"]),
    # odd sample count (batches of 2, 2 and 1 + ... on uneven shards), odd sizes, weight-only GPTQ
    ("qwen2", True, ["--scheme", "w4a16", "--nsamples", "7", "--method", "gptq"]),
])
def test_two_ranks_write_the_single_process_checkpoint(tiny_model_dir, tmp_path, arch, nonpow2, extra):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    model = tiny_model_dir(arch, nonpow2=nonpow2)
    common = [str(model), "--calib", str(text), "--nsamples", "8", "--seqlen", "48", "--batch-size", "2", *extra]
    one, two = tmp_path / "one", tmp_path / "two"
    for out, ranks in ((one, 1), (two, 2)):
        run = _quantize([*common, "-o", str(out)], ranks)
        assert run.returncode == 0, run.stderr[-3000:]
    a, b = _files(one), _files(two)
    assert a.keys() == b.keys()
    for name in a:
        if name == "calibration_report.json":
            ra, rb = (json.loads(f[name]) for f in (a, b))
            assert rb["provenance"]["processes"] == 2 and "processes" not in ra["provenance"]
            assert _without_clock(ra) == _without_clock(rb)
        else:
            assert a[name] == b[name], f"{name} differs between 1 and 2 processes"
    assert not (tmp_path / "two.partial").exists()


def test_distributed_refusals(tiny_model_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    common = [str(tiny_model_dir("llama")), "--calib", str(text), "--seqlen", "32", "--scheme", "w4a16"]
    few = _quantize([*common, "-o", str(tmp_path / "few"), "--nsamples", "2", "--batch-size", "2"], 2)
    assert few.returncode != 0
    assert "2 processes need at least 2 batches of calibration sequences; got 2 sequences in batches of 2" \
        in few.stderr
    assert "rotq: error:" in few.stderr
    # torchrun reports the failed ranks with its own traceback; no frame of rotq's appears
    assert "quant/cli.py" not in few.stderr and "quant/pipeline.py" not in few.stderr
    resume = _quantize([*common, "-o", str(tmp_path / "resume"), "--nsamples", "4", "--resume"], 2)
    assert resume.returncode != 0 and "--resume works in one process only" in resume.stderr
    assert not (tmp_path / "few").exists() and not (tmp_path / "resume").exists()
