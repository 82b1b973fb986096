"""vLLM's name for the int4 KV cache, shared by the plugin (which serves it in rotq's own page
layout, serving/kv4_attention.py) and the offline engine (which asks for it). Imports nothing,
so the engine can name it without loading vLLM and the plugin without loading the engine."""

KV4_DTYPE = "int4_per_token_head"
