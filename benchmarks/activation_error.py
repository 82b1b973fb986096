"""Where the activation error of W4A4KV4 comes from: the loss of the rotated model with
full-precision weights and only the activation and KV quantizers on (W16A4KV4), on
calibration text, for activation clip ratios and with the first token of every window kept out
of the activation (or KV) quantizer. The first token of a window becomes an attention sink with
massive activations; keeping it in full precision measures what the sink costs.

    python benchmarks/activation_error.py --json benchmarks/results/activation_error.json

Calibration text only (wikisum train, the first windows): this guides the calibration stage and
must not see test text.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from rotq.quant import online
from rotq.quant.data import eval_windows, load_text, tokenize_text
from rotq.quant.hadamard import apply_hadamard
from rotq.quant.models import load_model
from rotq.quant.perplexity import perplexity
from rotq.quant.pipeline import prepare_model
from rotq.quant.quantizer import fake_quantize_activation, fake_quantize_kv
from rotq.quant.scheme import preset

KEEP = {"act": 0, "kv": 0}  # leading tokens of each window kept in full precision


class SinkAwareTransform(online.InputTransform):
    """The online input transform, with the first KEEP["act"] tokens left unquantized."""

    def __call__(self, module, inputs):
        x = inputs[0]
        if self.hadamard_size:
            x = apply_hadamard(x, self.hadamard_size)
        if self.act is not None:
            q = fake_quantize_activation(x, self.act)
            q[:, : KEEP["act"]] = x[:, : KEEP["act"]]
            x = q
        return (x, *inputs[1:])


def sink_aware_attention(module, query, key, value, attention_mask, **kwargs):
    if getattr(module, "rotq_r3", False):
        query, key = apply_hadamard(query), apply_hadamard(key)
    kv = getattr(module, "rotq_kv", None)
    if kv is not None:
        k, v = fake_quantize_kv(key, kv), fake_quantize_kv(value, kv)
        n = KEEP["kv"]
        k[:, :, :n], v[:, :, :n] = key[:, :, :n], value[:, :, :n]
        key, value = k, v
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--clips", default="0.7,0.8,0.9,1.0")
    p.add_argument("--json", type=Path, required=True)
    a = p.parse_args()
    online.InputTransform = SinkAwareTransform  # install_layer_ops builds these
    AttentionInterface.register(online.ATTN_IMPLEMENTATION, sink_aware_attention)
    model, tok = load_model(a.model)
    base = preset("w4a4kv4", "hadamard")
    prepare_model(model, base)
    windows = eval_windows(tokenize_text(tok, load_text("wikisum", "train")), a.windows, a.seqlen)
    variants = [("full precision", None, 0, 0)]
    variants += [(f"A4KV4, clip {c}", float(c), 0, 0) for c in a.clips.split(",")]
    best = 0.8
    variants += [(f"A4KV4, clip {best}, token 0 activations 16-bit", best, 1, 0),
                 (f"A4KV4, clip {best}, token 0 activations and KV 16-bit", best, 1, 1)]
    rows = []
    for name, clip, keep_act, keep_kv in variants:
        scheme = base.replace(activations=None, kv_cache=None) if clip is None else base.replace(
            activations=dataclasses.replace(base.activations, clip_ratio=clip))
        online.install_online_ops(model, scheme)
        KEEP.update(act=keep_act, kv=keep_kv)
        t0 = time.perf_counter()
        ppl = perplexity(model, windows, progress=False).ppl
        rows.append({"variant": name, "ppl": ppl, "seconds": time.perf_counter() - t0})
        print(f"| {name} | {ppl:.2f} |", flush=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {platform.machine()}",
            "text": f"wikisum train, first {a.windows} x {a.seqlen}", "threads": torch.get_num_threads()}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
