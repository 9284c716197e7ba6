# syntax=docker/dockerfile:1
# Two images from one distribution (pyproject.toml), each with only the extras it needs:
#
#   docker build --target operator -t ghcr.io/grpo-dev/grpo-operator:0.1.0 .
#   docker build --target runtime  -t ghcr.io/grpo-dev/grpo-runtime:0.1.0 .
#
# operator: slim Python, requirements/operator.lock (extra `operator`: kopf, kubernetes client):
#           no torch. Runs `grpo operator`.
# runtime:  CUDA, requirements/runtime.lock (extras `runtime,gpu`: torch with CUDA, transformers,
#           peft, vLLM, bitsandbytes, triton). Runs `grpo train FILE`; the operator's pods pass
#           /etc/grpo/job.yaml.
# Each image installs exactly its lock (uv-generated from pyproject.toml, hashed, wheels only;
# docs/testing.md, "Regenerating the locks"), then our wheel without dependencies: an unlocked `pip install`
# once resolved to an old vLLM and a CUDA 12.8 torch on this CUDA 13 base.
# tests/packaging/test_dockerfile.py checks the targets, locks and users against the repo, and
# tests/packaging/test_locks.py the locks against pyproject.toml and the imports.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04

# ---------------------------------------------------------------- build: one wheel for both
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY runtime/ runtime/
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------- operator
FROM ${PYTHON_IMAGE} AS operator
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=build /wheels /wheels
# The operator extra only: the controller never imports torch. Locked: kopf==1.45.2,
# kubernetes==37.0.1, pydantic==2.14.4, prometheus-client==0.26.0.
COPY requirements/operator.lock /tmp/requirements.lock
RUN pip install --no-deps --require-hashes --only-binary :all: -r /tmp/requirements.lock \
    && pip install --no-deps /wheels/grpo_operator-*.whl \
    && pip check \
    && rm -rf /wheels /tmp/requirements.lock \
    && useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin grpo
# Numeric, so that the chart's runAsNonRoot can verify it (runAsUser 10001 in the Deployment).
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["grpo", "operator"]

# ---------------------------------------------------------------- runtime
FROM ${CUDA_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Ubuntu 24.04's Python 3.12, and a C compiler: Triton builds its kernel launchers at run time.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
COPY --from=build /wheels /wheels
# runtime + gpu extras. vLLM pins the torch it was built with, and PyPI's Linux x86-64 torch
# wheels are the CUDA builds (CUDA 13 user-space libraries as wheels; the node's driver must
# support CUDA 13). Locked: vllm==0.33.0, torch==2.14.0 with cuda-toolkit==13.0.3.0 (CUDA 13.0),
# transformers==5.19.0, peft==0.21.2, bitsandbytes==0.50.2, triton==3.8.0.
COPY requirements/runtime.lock /tmp/requirements.lock
RUN pip install --no-deps --require-hashes --only-binary :all: -r /tmp/requirements.lock \
    && pip install --no-deps /wheels/grpo_operator-*.whl \
    && pip check \
    && rm -rf /wheels /tmp/requirements.lock
# The training pods run as uid 1000 (operator/grpo_operator/render.py RUNTIME_UID); the CUDA
# image's Ubuntu base already has a uid-1000 user (`ubuntu`), replaced by ours.
RUN (userdel --remove ubuntu 2>/dev/null || true) \
    && useradd --uid 1000 --user-group --create-home --home-dir /home/grpo --shell /bin/bash grpo \
    && mkdir -p /workspace \
    && chown 1000:1000 /workspace
# Model, kernel and compile caches go under the working directory (an emptyDir in the pod).
ENV HOME=/home/grpo XDG_CACHE_HOME=/workspace/.cache HF_HOME=/workspace/.cache/huggingface \
    TRITON_CACHE_DIR=/workspace/.cache/triton VLLM_CACHE_ROOT=/workspace/.cache/vllm \
    GRPO_CACHE_DIR=/workspace/.cache/grpo/models
WORKDIR /workspace
USER 1000:1000
ENTRYPOINT ["grpo", "train"]
