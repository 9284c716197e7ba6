#!/usr/bin/env bash
# Fetch the wheels of bench/gpu_wheels.txt into .whl/ (git-ignored), for CPython 3.12 on manylinux x86-64:
# the lent GPU machine has no network, so they travel with the working tree (the device tool's `carry`).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -v '^#' bench/gpu_wheels.txt | xargs python3 -m pip download -q --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl
ls -l .whl
