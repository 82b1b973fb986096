"""compressed-tensors checkpoints that stock vLLM serves without the rotq plugin.

What each export keeps and loses (vLLM 0.32; docs/design.md, "Checkpoint formats"):

* **W4A16** (``pack-quantized`` int weights, symmetric, per channel or group): served by
  vLLM's mixed-precision kernels on CUDA and by ``CPUWNA16LinearKernel`` on CPU (K and N
  multiples of 32). R1/R2 are folded into the weights. The online R4 before down_proj becomes a
  ``transform_config`` entry (type ``random-matrix``: the ±1 Hadamard stored per layer as
  ``...down_proj.R4_input.weight``, applied as a dense GEMM); vLLM applies such transforms at
  **tensor parallelism 1 only**. Numerics equal the rotq format's.
* **W4A4** (same weights + dynamic symmetric per-token int4 activations, ``pack-quantized``
  forced): vLLM runs it only with the optional Humming kernels on CUDA
  (``--linear-backend humming``); no CPU kernel exists. It **loses** the activation clip ratio
  (compressed-tensors has none: clip 1.0 instead of the scheme's), asymmetric activations, R3
  and the calibrated KV4 cache, and R4 beyond TP 1. Prefer the rotq format for W4A4.

Asymmetric weights are not exported here (use the rotq format).
"""

from __future__ import annotations

import torch

from rotq.export.checkpoint import packed_tensors, write_checkpoint
from rotq.quant.arch import moe_family
from rotq.quant.errors import RotqError
from rotq.quant.hadamard import hadamard_matrix
from rotq.quant.quantizer import QuantizedWeight
from rotq.quant.scheme import Scheme

R4_SCHEME = "R4"


def check_exportable(scheme: Scheme, config=None) -> None:
    """Fail before calibration when the scheme has no compressed-tensors form (for the model
    of ``config``, when given)."""
    w, a = scheme.weights, scheme.activations
    if config is not None and moe_family(config) is not None and (a is not None or scheme.rotation.r4):
        raise RotqError("compressed-tensors export of a mixture of experts covers weight-only schemes without the "
                        "online R4 (vLLM's compressed-tensors MoE methods quantize no activations and apply no "
                        "transform to experts); use --format rotq, or a w4a16 scheme with --rotation none")
    if w.bits not in (4, 8) or not w.symmetric:
        raise RotqError(f"compressed-tensors export needs symmetric 4- or 8-bit weights, the scheme has "
                        f"{w.bits}-bit {'symmetric' if w.symmetric else 'asymmetric'}; use --format rotq")
    if a is not None and (not a.symmetric or a.bits not in (4, 8)):
        raise RotqError("compressed-tensors export needs symmetric 4- or 8-bit per-token activations; "
                        "use --format rotq")
    if scheme.prefix is not None:
        raise RotqError("compressed-tensors cannot carry rotq's full-precision attention prefix (stock vLLM would "
                        "serve the model without it); use --prefix none or --format rotq")
    if scheme.kv_cache is not None:
        raise RotqError("compressed-tensors cannot carry rotq's calibrated int4 KV cache (its kv_cache_scheme "
                        "is 8-bit float only); export a scheme without KV quantization (e.g. w4a4, w4a16) "
                        "or use --format rotq")


def quantization_config(scheme: Scheme) -> dict:
    w, a = scheme.weights, scheme.activations
    weights = {"num_bits": w.bits, "type": "int", "symmetric": True, "dynamic": False,
               "strategy": "group" if w.group_size else "channel", "group_size": w.group_size}
    activations = None if a is None else {"num_bits": a.bits, "type": "int", "symmetric": True,
                                          "strategy": "token", "dynamic": True}
    config = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                      "input_activations": activations, "format": "pack-quantized"}},
        "ignore": list(scheme.ignore),
    }
    if scheme.rotation.r4:
        config["transform_config"] = {"config_groups": {R4_SCHEME: {
            "type": "random-matrix", "head_dim": None,
            "apply": [{"targets": ["re:.*mlp.down_proj$"], "location": "input", "inverse": False}],
        }}}
    return config


def save_compressed_tensors(model, weights: dict[str, QuantizedWeight], tokenizer, scheme: Scheme,
                            out, max_shard_size: str = "5GB", files: dict[str, str] | None = None) -> None:
    """Write the calibrated model as a compressed-tensors checkpoint, atomically; ``files``:
    further text files by name (the model card)."""
    check_exportable(scheme, model.config)
    r4 = hadamard_matrix(model.config.intermediate_size, torch.float32) if scheme.rotation.r4 else None

    def extra(name, qw):
        out = {f"{name}.weight_shape": torch.tensor(list(qw.codes.shape), dtype=torch.int64)}
        if r4 is not None and name.endswith("mlp.down_proj"):
            out[f"{name}.{R4_SCHEME}_input.weight"] = r4.clone()  # vLLM divides by sqrt(n) at load
        return out

    state = packed_tensors(model, weights, scheme, extra)
    with write_checkpoint(model, state, tokenizer, quantization_config(scheme), out, max_shard_size, files):
        pass
