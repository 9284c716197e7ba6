#!/usr/bin/env bash
# Fetch the wheels of bench/gpu_wheels.txt into .whl/ (git-ignored; or the folder given), for CPython 3.12
# on manylinux x86-64: the lent GPU machine has no network, so they travel with the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-.whl}"
mkdir -p "$dest"
grep -v '^#' bench/gpu_wheels.txt | xargs python3 -m pip download -q --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest"
ls -l "$dest"
