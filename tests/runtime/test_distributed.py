"""Data-parallel jobs (resources.gpus x resources.nodes ranks): the same update as one process, whatever the
world size; a rank that dies or hangs ends the job naming it, and the retry resumes.

The ranks are real processes that `grpo train` starts through torchrun and that talk over gloo on loopback:
what a GPU node does with NCCL, on CPUs.
"""

from __future__ import annotations

import pytest
import torch
import yaml

from grpo_runtime.distributed import World
from grpo_runtime.spec import parse_job
from grpo_runtime.trainer import split_micro_batches
from tests.runtime.test_trainer import grpo_train, read_metrics, tiny_job

# what may differ between two runs of the same job: time and memory
TIMING = {"tokens_per_second", "generation_seconds", "sync_seconds", "learner_seconds", "step_seconds",
          "peak_memory_mb", "eval/seconds", "latest_checkpoint"}


def job_doc(model_dir, output, *, gpus: int, rewards=None, **training) -> dict:
    """3 steps of 4 prompts x 4 completions in 4 micro-batches, with a KL term and two optimizer steps per
    batch (the old and reference passes run per rank), an evaluation every 2 steps on 6 held-out prompts
    (shares of 2, 2, 1, 1 over 4 ranks); completion lengths vary (EOS), so the ranks' token counts differ."""
    doc = tiny_job(model_dir, output, rewards=rewards, promptsPerStep=4, gradientAccumulationSteps=4, seed=3,
                   beta=0.04, numIterations=2, **training)
    doc["spec"]["resources"] = {"gpus": gpus, "rankTimeoutSeconds": 20}
    doc["spec"]["evaluation"] = {"heldOut": 6, "everySteps": 2}
    return doc


def run(tmp_path, doc, name: str, *extra, env=None):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return grpo_train(path, *extra, env=env)


def adapter(output):
    from safetensors.torch import load_file

    return load_file(str(output / "final" / "adapter_model.safetensors"))


def same_metrics(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys()
        for key in a.keys() - TIMING:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7, nan_ok=True), (a["step"], key)


def same_adapter(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    scale = max(t.abs().max().item() for t in want.values())
    assert scale > 0
    for name in want:
        assert (got[name] - want[name]).abs().max().item() <= 1e-5 * scale, name


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tmp_path_factory):
    """The reference: the job in one process."""
    tmp = tmp_path_factory.mktemp("one-process")
    done = run(tmp, job_doc(tiny_model_dir, tmp / "out", gpus=1), "job")
    assert done.returncode == 0, done.stderr[-3000:]
    return read_metrics(tmp / "out"), adapter(tmp / "out")


@pytest.mark.parametrize("ranks", [2, 4])
def test_n_ranks_train_the_same_adapter_as_one_process(tiny_model_dir, tmp_path, one_process, ranks):
    want_metrics, want_adapter = one_process
    done = run(tmp_path, job_doc(tiny_model_dir, tmp_path / "out", gpus=ranks), "job")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{ranks} ranks" in done.stderr
    got = read_metrics(tmp_path / "out")
    assert any("eval/accuracy" in line for line in got)
    assert all(line["grad_norm"] > 0 for line in got if "loss" in line)  # there was something to get wrong
    same_metrics(got, want_metrics)
    same_adapter(adapter(tmp_path / "out"), want_adapter)
    # rank 0 alone writes: one metrics record per step and evaluation, one samples file per step
    assert [line["step"] for line in got if "loss" in line] == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "out" / "samples").iterdir()) == sorted(
        [f"step-{s}.jsonl" for s in (1, 2, 3)] + [f"eval-step-{s}.jsonl" for s in (0, 2, 3)]
    )


FAULTY = [{"name": "correct", "function": "builtin:exact_answer"},
          {"name": "len7", "function": "tests.runtime.crash_rewards:rank_fault"}]
# rank 1 dies scoring step 3, after the step-2 checkpoint: the evaluations at steps 0 and 2 score too, so step 3's
# training call is its 5th
DIE_AT_STEP_3 = {"GRPO_TEST_FAULT": "die", "GRPO_TEST_FAULT_RANK": "1", "GRPO_TEST_FAULT_ON_CALL": "5"}


@pytest.fixture(scope="module")
def straight(tiny_model_dir, tmp_path_factory):
    """The faulty job's rewards without a fault, uninterrupted, on 2 ranks."""
    tmp = tmp_path_factory.mktemp("straight")
    done = run(tmp, job_doc(tiny_model_dir, tmp / "out", gpus=2, rewards=FAULTY), "job")
    assert done.returncode == 0, done.stderr[-3000:]
    return read_metrics(tmp / "out"), adapter(tmp / "out")


@pytest.mark.parametrize("retry_ranks", [2, 1])
def test_a_rank_that_dies_ends_the_job_naming_it_and_the_retry_resumes(tiny_model_dir, tmp_path, straight,
                                                                        retry_ranks):
    """Rank 1 dies: exit 1 naming rank 1, the other rank stopped, the step-2 checkpoint intact. The retry, on as
    many ranks or on another number (the sampler's cursor counts the step's prompts, not a rank's), resumes there
    and ends as the uninterrupted run does."""
    died = run(tmp_path, job_doc(tiny_model_dir, tmp_path / "out", gpus=2, rewards=FAULTY), "died", env=DIE_AT_STEP_3)
    assert died.returncode == 1, died.stderr[-3000:]
    assert "rank 1 of 2 failed first (exit code 137)" in died.stderr
    assert [line["step"] for line in read_metrics(tmp_path / "out") if "loss" in line] == [1, 2]

    again = run(tmp_path, job_doc(tiny_model_dir, tmp_path / "out", gpus=retry_ranks, rewards=FAULTY), "again")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from checkpoints/step-2" in again.stderr
    want_metrics, want_adapter = straight
    same_metrics(read_metrics(tmp_path / "out"), want_metrics)
    same_adapter(adapter(tmp_path / "out"), want_adapter)


def test_a_rank_that_hangs_ends_the_job_after_the_rank_timeout(tiny_model_dir, tmp_path):
    """Rank 1 hangs inside step 1 (alive, so torchrun sees nothing wrong): rank 0 gives up at the step's exchange
    after resources.rankTimeoutSeconds, naming itself as the one that failed first, and the job exits 1."""
    doc = job_doc(tiny_model_dir, tmp_path / "out", gpus=2, rewards=FAULTY)
    doc["spec"].pop("evaluation")
    doc["spec"]["resources"]["rankTimeoutSeconds"] = 10
    hung = run(tmp_path, doc, "job", env={"GRPO_TEST_FAULT": "hang", "GRPO_TEST_FAULT_RANK": "1",
                                           "GRPO_TEST_FAULT_ON_CALL": "1"})
    assert hung.returncode == 1, hung.stderr[-3000:]
    assert "rank 0 of 2 failed:" in hung.stderr  # its own line: what timed out
    assert "rank 0 of 2 failed first (exit code 1)" in hung.stderr


def test_a_step_splits_into_whole_prompts_and_micro_batches_per_rank():
    """Each rank takes whole prompts (contiguous shares) and the same number of the step's micro-batches."""
    assert [list(World(r, 4).share(10)) for r in range(4)] == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert [len(World(r, 3).share(2)) for r in range(3)] == [1, 1, 0]
    parts = split_micro_batches(16, 1, ranks=4)  # one micro-batch asked for: one per rank
    assert [len(p) for p in parts] == [4, 4, 4, 4]
    assert len(split_micro_batches(16, 6, ranks=4)) == 8  # rounded up to a multiple of the ranks
    assert len(split_micro_batches(8, 16, ranks=4)) == 8  # never more than the completions
    assert torch.cat(split_micro_batches(16, 6, ranks=4)).tolist() == list(range(16))


def test_prompts_that_do_not_split_over_the_ranks_are_refused(tiny_model_dir, tmp_path):
    from grpo_runtime.spec import SpecError

    doc = job_doc(tiny_model_dir, tmp_path, gpus=2)
    doc["spec"]["resources"]["nodes"] = 2
    doc["spec"]["training"]["promptsPerStep"] = 6
    with pytest.raises(SpecError, match=r"promptsPerStep: 6 prompts do not split evenly over 4 ranks"):
        parse_job(doc)


@pytest.mark.vllm
def test_ranks_with_vllm_engines_train_the_same_adapter_as_one_process(tmp_path):
    """Each rank builds its own vLLM engine in its own process (external_launcher, as TRL's colocate mode), on its
    share of the prompts: the same metrics and adapter as one process with one engine."""
    from tests.runtime.test_engine_vllm import build_vllm_tiny_model

    model = build_vllm_tiny_model(tmp_path / "model")
    results = []
    for ranks in (1, 2):
        doc = job_doc(model, tmp_path / f"out{ranks}", gpus=ranks)
        doc["spec"]["generation"]["engine"] = "vllm"
        doc["spec"].pop("evaluation")
        done = run(tmp_path, doc, f"job{ranks}")
        assert done.returncode == 0, done.stderr[-3000:]
        assert "Traceback" not in done.stderr  # the engines and the process group shut down cleanly, in order
        results.append((read_metrics(tmp_path / f"out{ranks}"), adapter(tmp_path / f"out{ranks}")))
    (want_metrics, want_adapter), (got_metrics, got_adapter) = results
    assert all("sampling_weight" in line for line in got_metrics)  # vLLM's log-probs reached the loss
    same_metrics(got_metrics, want_metrics)
    same_adapter(got_adapter, want_adapter)
