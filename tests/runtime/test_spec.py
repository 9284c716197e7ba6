"""The GRPOJob contract: defaults, aliases, and error messages that name the field."""

import copy
from pathlib import Path

import pytest
import yaml

from grpo_runtime.spec import GRPOJob, SpecError, load_job, parse_job

REPO = Path(__file__).resolve().parents[2]

MINIMAL = {
    "apiVersion": "grpo.dev/v1alpha1",
    "kind": "GRPOJob",
    "metadata": {"name": "tiny"},
    "spec": {
        "model": {"name": "Qwen/Qwen2.5-0.5B-Instruct"},
        "dataset": {"source": "builtin:arithmetic"},
        "rewards": [{"name": "correct", "function": "builtin:exact_answer"}],
    },
}


def with_spec(**sections):
    doc = copy.deepcopy(MINIMAL)
    for key, value in sections.items():
        doc["spec"][key] = value
    return doc


def errors_of(doc) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_job(doc)
    return info.value.messages


def test_minimal_job_gets_documented_defaults():
    job = parse_job(MINIMAL)
    assert job.spec.generation.num_generations == 8
    assert job.spec.training.loss_type == "dapo"
    assert job.spec.training.kl_estimator == "k3_ratio"  # TRL's since use_bias_correction_kl
    assert job.spec.training.importance_sampling_level == "token"
    assert job.spec.training.sampling_correction == "auto" and job.spec.training.sampling_correction_max == 3.0
    assert job.spec.training.delta is None and job.spec.training.top_entropy_quantile == 1.0
    assert job.spec.training.gradient_checkpointing == "on"
    assert job.spec.lora.rank == 16
    assert job.spec.run_policy.backoff_limit == 3


def test_yaml_is_camel_case_python_is_snake_case():
    job = parse_job(with_spec(generation={"numGenerations": 4, "maxCompletionLength": 64}))
    assert job.spec.generation.num_generations == 4
    dumped = job.to_manifest()["spec"]["generation"]
    assert dumped["numGenerations"] == 4 and "num_generations" not in dumped


def test_manifest_round_trips():
    job = parse_job(MINIMAL)
    assert parse_job(job.to_manifest()) == job


@pytest.mark.parametrize(
    "doc, expected",
    [
        (with_spec(generation={"numGenerations": 1}), "spec.generation.numGenerations: must be >= 2, got 1"),
        (with_spec(training={"lossType": "ppo"}), "spec.training.lossType: must be one of"),
        (with_spec(training={"maxSteps": "many"}), "spec.training.maxSteps: input should be a valid integer"),
        (with_spec(lora={"rank": 16, "rnak": 8}), "spec.lora.rnak: unknown field"),
        (with_spec(generation={"topP": 1.5}), "spec.generation.topP: must be <= 1.0, got 1.5"),
        (with_spec(dataset={"source": "data.csv"}), "spec.dataset.source: must be builtin:NAME, hf://DATASET or a path"),
        (with_spec(dataset={"source": "builtin:gsm9k"}), "spec.dataset.source: unknown builtin dataset 'gsm9k'"),
        (with_spec(rewards=[]), "spec.rewards: at least one reward is needed (or an environment whose get_reward scores)"),
        (
            with_spec(rewards=[{"name": "r", "function": "no_colon"}]),
            "spec.rewards[0].function: must be builtin:NAME or module:function, got 'no_colon'",
        ),
        (
            with_spec(rewards=[{"name": "r", "function": "builtin:nope"}]),
            "spec.rewards[0].function: unknown builtin reward 'nope'",
        ),
        (
            with_spec(
                rewards=[
                    {"name": "r", "function": "builtin:format"},
                    {"name": "r", "function": "builtin:length"},
                ]
            ),
            "spec.rewards: duplicate reward name 'r'",
        ),
        (with_spec(output={"uri": "s3:///prefix"}), "spec.output.uri: s3 URI needs a bucket"),
        (with_spec(runPolicy={"backoffLimit": -1}), "spec.runPolicy.backoffLimit: must be >= 0, got -1"),
        (with_spec(training={"lossType": "cispo"}), "spec.training: lossType cispo caps the ratio itself at epsilonHigh"),
        (
            with_spec(training={"multiObjectiveAggregation": "normalize_then_sum", "scaleRewards": "batch"}),
            "spec.training.scaleRewards: batch does not apply with multiObjectiveAggregation normalize_then_sum",
        ),
        (
            with_spec(training={"useAdaptiveEntropy": True, "entropyCoefMin": 0.5, "entropyCoefMax": 0.1}),
            "spec.training: entropyCoefMin must not be above entropyCoefMax",
        ),
        (with_spec(training={"klEstimator": "k2"}), "spec.training.klEstimator: must be one of 'k3_ratio' or 'k3'"),
        (with_spec(training={"importanceSamplingLevel": "group"}), "spec.training.importanceSamplingLevel: must be"),
        (with_spec(training={"delta": 0.9}), "spec.training.delta: must be > 1.0, got 0.9"),
        (with_spec(training={"samplingCorrection": "tis"}), "spec.training.samplingCorrection: must be one of"),
        (
            with_spec(training={"samplingCorrectionMin": 2.0, "samplingCorrectionMax": 1.5}),
            "spec.training: samplingCorrectionMin must be below samplingCorrectionMax",
        ),
        (with_spec(training={"topEntropyQuantile": 1.2}), "spec.training.topEntropyQuantile: must be <= 1.0, got 1.2"),
        ({**MINIMAL, "apiVersion": "grpo.dev/v2"}, "apiVersion: must be one of 'grpo.dev/v1alpha1'"),
        ({**MINIMAL, "kind": "Job"}, "kind: must be one of 'GRPOJob'"),
        ({**MINIMAL, "metadata": {"name": "Not_A_Label"}}, "metadata.name: must be a DNS label"),
        ({k: v for k, v in MINIMAL.items() if k != "spec"}, "spec: required field is missing"),
        (
            with_spec(model={"name": "m", "maxSeqLength": 100}),
            "spec: generation.maxPromptLength + maxCompletionLength = 768 exceeds model.maxSeqLength = 100",
        ),
    ],
)
def test_bad_input_names_the_field(doc, expected):
    messages = errors_of(doc)
    assert any(message.startswith(expected) for message in messages), messages


def test_every_error_is_reported_not_just_the_first():
    doc = with_spec(generation={"numGenerations": 1, "temperature": 0}, training={"beta": -1})
    messages = errors_of(doc)
    assert len(messages) == 3
    assert {m.split(":")[0] for m in messages} == {
        "spec.generation.numGenerations",
        "spec.generation.temperature",
        "spec.training.beta",
    }


def test_load_job_refuses_empty_and_non_yaml_files(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("\n# nothing\n")
    with pytest.raises(SpecError, match="file is empty"):
        load_job(empty)
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_job(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(SpecError, match="expected a GRPOJob mapping, got str"):
        load_job(scalar)
    with pytest.raises(SpecError, match="cannot read file"):
        load_job(tmp_path / "missing.yaml")


def test_load_job_picks_the_grpojob_from_a_multi_document_file(tmp_path):
    path = tmp_path / "bundle.yaml"
    path.write_text(yaml.safe_dump_all([{"apiVersion": "v1", "kind": "Secret"}, MINIMAL]))
    assert load_job(path).metadata.name == "tiny"


def test_spec_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, grpo_runtime.spec; assert 'torch' not in sys.modules, 'spec imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("path", sorted((REPO / "examples").rglob("*.yaml")), ids=lambda p: p.name)
def test_examples_are_valid(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict) and d.get("kind") == "GRPOJob"]
    for doc in docs:
        assert isinstance(parse_job(doc), GRPOJob)
