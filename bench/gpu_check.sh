#!/usr/bin/env bash
# The CUDA path on a machine with an NVIDIA GPU: the engine's device tests, the end-to-end tests (the
# server's --device auto picks CUDA there) and bench.engine on CUDA beside the CPU.
#
#   PY=.venv/bin/python bash bench/gpu_check.sh      # PY: a Python whose torch is a CUDA build
#
# `make setup` installs the CPU build of torch; on a GPU machine install torch==2.13.0 from the CUDA
# index into the venv first. Prints the pytest summaries and one JSON object per bench run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" - <<'PYEOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device (a CPU build, or no GPU)")
print("gpu_check:", torch.cuda.get_device_name(0), "torch", torch.__version__, flush=True)
PYEOF
"$PY" -m pytest -q tests/test_device.py tests/test_paged.py tests/test_e2e.py tests/test_steering.py \
    tests/test_served_step.py tests/test_served_unbiased.py -x ${PYTEST_ARGS:-}
for device in cuda cpu; do
    "$PY" -m bench.engine --device "$device" --dtype auto
done
