#!/usr/bin/env bash
# Rehearse the GPU suite on CPU under the lent GPU machine's own software, before a GPU is at hand.
#
#   PYTHON=python3.12 bash bench/gpu_rehearsal.sh [venv folder]      # ~3 GB of downloads, a few minutes
#   PYTHON=python3.12 bash bench/gpu_rehearsal.sh --venv-only [venv]  # only build the venv (gpu_bundle.py check uses it)
#
# The test suite runs `gpu_suite.py --smoke` in the project's own environment, where every extra is
# installed; the GPU machine has none of them, and older torch, transformers and Triton. This builds a
# venv with the versions /work/.library/device/KINDS.md lists for that machine's image (CPython 3.12,
# torch 2.11, transformers 5.17, triton 3.6, accelerate 1.15, and the machine's packages vLLM, TRL and
# datasets import), nothing of ours but the carried bundle (bench/gpu_bundle.py: the site folder of the
# last build, else assembled from .gpu_parts/ as the machine assembles it from .gpu_stage/), and runs the
# suite exactly as bench/gpu_suite.sh runs it there, at tiny shapes.
# Expected: parts a-d and f pass; the vLLM parts are "not run" (the bundle's vLLM is the CUDA build, which
# no CPU here can start; bench/gpu_bundle.py check covers its configuration instead), exit code 3.
# What it found the first time: torch 2.11's checkpoint saves an empty dummy beside each layer input,
# which the offload counted and moved (see grpo_runtime/offload.py).
set -euo pipefail
cd "$(dirname "$0")/.."
venv_only=0
if [ "${1:-}" = "--venv-only" ]; then venv_only=1; shift; fi
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
fi
if [ ! -e "$venv/.machine-packages" ]; then
    # What the machine's image has and vLLM, TRL or datasets import (KINDS.md gives no versions: the
    # newest, which is what a fresh image holds), and pytest for the bundle's API test.
    "$venv/bin/pip" install -q regex requests tqdm sentencepiece py-cpuinfo protobuf aiohttp prometheus-client \
        pillow tiktoken filelock opencv-python-headless six "setuptools<81" einops cloudpickle numba msgpack uvloop \
        anyio httpx jinja2 pandas pyarrow xxhash "fsspec<=2026.9.0" annotated-doc scipy pytest "numpy==2.3.5"
    touch "$venv/.machine-packages"
fi
# What the machine lacks must come from the carried bundle alone, as it will there.
grep -v '^#' bench/gpu_bundle.txt | grep -v typing-extensions | cut -d= -f1 | grep . \
    | xargs "$venv/bin/pip" uninstall -q -y boto3 2>/dev/null || true
[ "$venv_only" = 1 ] && exit 0

work="${GPU_BUNDLE_WORK:-${TMPDIR:-/tmp}/gpu-bundle-work}"
if [ -d "$work/site/vllm" ]; then
    site="$work/site"
elif [ -f .gpu_parts/MANIFEST.json ]; then
    site="$(PATH="$venv/bin:$PATH" python3 bench/gpu_bundle.py assemble .gpu_parts | tail -n 1)"
else
    echo "gpu-rehearsal: no bundle: run python bench/gpu_bundle.py build --python 3.12 --torch 2.11.0 first" >&2
    exit 1
fi
out="$(mktemp -d)"
set +e
PYTHONPATH="$site" PATH="$venv/bin:$PATH" OUT="$out" TRITON_INTERPRET=1 bash bench/gpu_suite.sh --smoke
rc=$?
set -e
echo "gpu-rehearsal: exit $rc (3 expected: parts a-d and f passed, the vLLM parts need a GPU); results in $out"
exit "$rc"
