"""vLLM general plugin: makes quant_method "rotq" known in every vLLM process.

Registered as entry point ``rotq`` in group ``vllm.general_plugins`` (pyproject.toml); vLLM
calls :func:`register` once per process (front-end, engine core, each worker). Importing
``rotq.serving.config`` runs ``@register_quantization_config("rotq")``; the int4 KV cache's
attention backend is registered too (``rotq.serving.kv4_attention``). Nothing is compiled.
"""


def register() -> None:
    import rotq.serving.config  # noqa: F401  (registration happens at import)
    from rotq.serving.kv4_attention import register_backends

    register_backends()
