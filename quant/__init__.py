"""rotq.quant: load, rotate and calibrate a causal LM layer by layer (GPTQ family).

The Python API: ``quantize``, ``Recipe``, ``evaluate``, ``evaluate_tasks``, ``RotqError``. They are
imported on first use, so that ``import rotq.quant.scheme`` (a primitive that kernels and serving
share) does not load the calibration stack.
"""

_API = {"quantize": "rotq.quant.api", "make_recipe": "rotq.quant.api", "Recipe": "rotq.quant.recipe",
        "evaluate": "rotq.quant.evaluation", "evaluate_tasks": "rotq.quant.evaluation",
        "Evaluation": "rotq.quant.evaluation", "RotqError": "rotq.quant.errors"}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'rotq.quant' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_API[name]), name)
