#!/usr/bin/env bash
# Rehearse the GPU suite on CPU under the lent GPU machine's own software, before a GPU is at hand.
#
#   PYTHON=python3.12 bash bench/gpu_rehearsal.sh [venv folder]     # ~3 GB of downloads, a few minutes
#
# The test suite runs `gpu_suite.py --smoke` in the project's own environment, where every extra is
# installed; the GPU machine has none of them, and older torch, transformers and Triton. This builds a
# venv with the versions /work/.library/device/KINDS.md lists for that machine's image (CPython 3.12,
# torch 2.11, transformers 5.17, triton 3.6, accelerate 1.15), nothing of ours but the carried wheels
# (bench/gpu_wheels.txt), and runs the suite exactly as bench/gpu_suite.sh runs it there, at tiny shapes.
# Expected: parts a-d pass and part e is "not run" (no vLLM there), exit code 3.
# What it found the first time: torch 2.11's checkpoint saves an empty dummy beside each layer input,
# which the offload counted and moved (see grpo_runtime/offload.py).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-${TMPDIR:-/tmp}/grpo-gpu-machine-venv}"
python="${PYTHON:-python3.12}"
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
    # PyPI's torch 2.11 is the CUDA build (its CUDA libraries come along); it runs on CPU too.
    "$venv/bin/pip" install -q "torch==2.11.0" "triton==3.6.0" "transformers==5.17.0" "accelerate==1.15.0" \
        "safetensors==0.8.0" "tokenizers==0.23.2" "huggingface_hub==1.33.0" pyyaml psutil
    # numpy 2.5 (the machine's) breaks triton 3.6's *interpreter* (int() of a 1-element array), which
    # only --smoke uses; compiled kernels on the GPU never reach it.
    "$venv/bin/pip" install -q "numpy==2.3.5"
    # What the machine lacks must come from the carried wheels alone, as it will there.
    "$venv/bin/pip" uninstall -q -y pydantic pydantic-core annotated-types typing-inspection bitsandbytes peft \
        vllm boto3 2>/dev/null || true
fi
[ -n "$(ls .whl/*.whl 2>/dev/null)" ] || bash bench/fetch_gpu_wheels.sh
out="$(mktemp -d)"
set +e
PATH="$venv/bin:$PATH" OUT="$out" TRITON_INTERPRET=1 bash bench/gpu_suite.sh --smoke
rc=$?
set -e
echo "gpu-rehearsal: exit $rc (3 expected: parts a-d passed, part e not run); results in $out"
exit "$rc"
