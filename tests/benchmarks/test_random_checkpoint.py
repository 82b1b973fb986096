"""benchmarks/random_checkpoint.py: every shape writes exactly the tensors, under the names and
shapes, that the architecture's Hugging Face model (and rotq's loader) expects."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from rotq.quant.arch import checkpoint_name, unfold_experts

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("random_checkpoint", ROOT / "benchmarks" / "random_checkpoint.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


@pytest.mark.parametrize("shape", sorted(bench.SHAPES))
def test_layer_shapes_are_the_models(shape):
    c = dict(bench.SHAPES[shape], num_hidden_layers=2)
    model_type = c.pop("model_type", "llama")
    config = AutoConfig.for_model(model_type, **c, architectures=[bench.ARCHITECTURES[model_type]],
                                  tie_word_embeddings=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    unfold_experts(model)
    expected = {checkpoint_name(config, k): tuple(v.shape) for k, v in model.state_dict().items()
                if k.startswith("model.layers.1.")}
    assert bench.layer_shapes(dict(bench.SHAPES[shape]), 1) == expected
