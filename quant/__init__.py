"""rotq.quant: load, rotate and calibrate a causal LM layer by layer (GPTQ family)."""
