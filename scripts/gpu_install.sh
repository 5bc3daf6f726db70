#!/usr/bin/env bash
# On the GPU machine: install the wheels that scripts/gpu_carry.sh prepared (copied into DIR) into /tmp/site.
#   bash scripts/gpu_install.sh /tmp/carry && export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
DIR=${1:?usage: gpu_install.sh DIR}
cd "$DIR"
for first in *.piece-aa; do  # reassemble the wheels that travelled in pieces
    [ -e "$first" ] || continue
    wheel=${first%.piece-aa}
    cat "$wheel".piece-* > "$wheel" && rm "$wheel".piece-*
done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ./*.whl
PYTHONPATH=/tmp/site python3 -c "import ray, deepspeed, datasets, transformers, torch; print('ready: torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'ray', ray.__version__, 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__)"
