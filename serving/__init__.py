"""rotq.serving: the vLLM plugin (quant_method "rotq"); the only package that imports vLLM."""
