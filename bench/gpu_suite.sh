#!/usr/bin/env bash
# The one prepared command for a bare GPU machine (the device tool runs it in the repository root).
# That machine has no network and each call carries at most 64 MiB, so vLLM and the wheels it lacks
# travel as a bundle in parts (bench/gpu_bundle.py), collected in .gpu_stage/ over several calls:
#   python bench/gpu_bundle.py build --python 3.12 --torch 2.11.0 --out .gpu_parts      # here, once
#   run(command="mkdir -p .gpu_stage && mv .gpu_parts/* .gpu_stage/", carry=[".gpu_parts/MANIFEST.json",
#       ".gpu_parts/grpo-bundle.tar.xz.part00"])                                           # one call per part
#   run(command="mv .gpu_parts/* .gpu_stage/ && ls -l .gpu_stage", carry=[".gpu_parts/grpo-bundle.tar.xz.part01"],
#       timeout_s=60)                                                                       # the last part
#   run(command="bash bench/gpu_suite.sh --parts e,g,h --budget-s 400", timeout_s=540)      # at once: the stage is
#       kept only while the machine stays warm (30 s); a part not started within the budget is reported not run
# Results land in $OUT when the device tool sets it (they come back), else in bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -f .gpu_stage/MANIFEST.json ]; then
    started=$SECONDS
    # refuses (exit 2, one line naming both versions or the part) before unpacking anything
    site="$(python3 bench/gpu_bundle.py assemble .gpu_stage)" \
        || { echo "gpu-suite: the bundle in .gpu_stage/ was refused; the suite did not run" >&2; exit 2; }
    site="$(printf '%s\n' "$site" | tail -n 1)"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu-suite: bundle unpacked to $site in $((SECONDS - started)) s"
fi
# vLLM's sampler imports flashinfer unless told not to; the bundle does not carry it
if ! python3 -c "import flashinfer" >/dev/null 2>&1; then
    export VLLM_USE_FLASHINFER_SAMPLER=0
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
export PYTHONUNBUFFERED=1
mkdir -p "${OUT:-bench/results}"
python3 bench/gpu_suite.py --out "${OUT:-bench/results}" "$@" 2>&1 | tee "${OUT:-bench/results}/gpu-suite.log"
exit "${PIPESTATUS[0]}"
