#!/usr/bin/env bash
# The one prepared command for a bare GPU machine (the device tool runs it in the repository root):
#   bash bench/fetch_gpu_wheels.sh          # here, once: the wheels the GPU machine lacks, into .whl/
#   run(command="bash bench/gpu_suite.sh", carry=[".whl"], timeout_s=540)
# Results land in $OUT when the device tool sets it (they come back), else in bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/grpo-site .whl/*.whl \
        || { echo "gpu-suite: installing the carried wheels failed"; exit 1; }
    export PYTHONPATH="/tmp/grpo-site${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
export PYTHONUNBUFFERED=1
mkdir -p "${OUT:-bench/results}"
python3 bench/gpu_suite.py --out "${OUT:-bench/results}" "$@" 2>&1 | tee "${OUT:-bench/results}/gpu-suite.log"
exit "${PIPESTATUS[0]}"
