"""spec.tracking: MLflow (a real tracking server on loopback) and TensorBoard event files, a
resumed pod continuing the same run, and a tracking server that is down never stopping training."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from grpo_runtime.spec import SpecError, parse_job
from grpo_runtime.tracking import Guarded
from tests.runtime.test_trainer import REPO, grpo_train, read_metrics, run_in_process, tiny_job, write_job

# a subprocess imports this tree's packages (as the in-process tests do), not an installed copy
TREE = {"PYTHONPATH": f"{REPO}:{REPO / 'runtime'}:{REPO / 'operator'}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 with a sqlite store and proxied artifacts."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, cwd=root,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # up to ~5 minutes on a busy 2-core box: migrations and imports
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited:\n{(root / 'server.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2).read()
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("mlflow server did not answer /health")
        yield uri
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def tracked_job(model_dir, out, uri, *, experiment, tensorboard=True, **training):
    doc = tiny_job(model_dir, out, **training)
    doc["spec"]["tracking"] = {
        "mlflow": {"trackingUri": uri, "experimentName": experiment},
        "tensorboard": {"enabled": tensorboard},
    }
    return doc


def only_run(client, experiment):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def tensorboard_scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


# ------------------------------------------------------------------------------- the spec


def test_tracking_is_off_by_default_and_names_bad_fields():
    from tests.runtime.test_spec import MINIMAL, with_spec

    job = parse_job(MINIMAL)
    assert job.spec.tracking.mlflow is None and job.spec.tracking.tensorboard.enabled is False
    job = parse_job(with_spec(tracking={"mlflow": {"trackingUri": "http://mlflow:5000", "credentialsSecret": "mlf"}}))
    assert job.spec.tracking.mlflow.experiment_name == "grpo"
    assert job.to_manifest()["spec"]["tracking"]["mlflow"]["credentialsSecret"] == "mlf"
    with pytest.raises(SpecError) as info:
        parse_job(with_spec(tracking={"mlflow": {"experimentName": "x"}, "tensorbord": {}}))
    assert set(info.value.messages) == {
        "spec.tracking.mlflow.trackingUri: required field is missing",
        "spec.tracking.tensorbord: unknown field",
    }


# ------------------------------------------------------------------------------- MLflow + TensorBoard


def test_a_run_gets_the_spec_every_step_the_adapter_and_the_report(tiny_model_dir, tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    assert run_in_process(tracked_job(tiny_model_dir, out, mlflow_server, experiment="one-run")) == 0
    steps = read_metrics(out)
    client = MlflowClient(mlflow_server)
    run = only_run(client, "one-run")
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    assert run.data.tags["grpo.dev/job"] == "tiny"
    params = run.data.params
    assert params["training.maxSteps"] == "3" and params["model.name"] == str(tiny_model_dir)
    assert json.loads(params["rewards"])[1]["name"] == "short"
    for key in ("reward", "rewards/correct/mean", "rewards/short/mean", "kl", "tokens_per_second"):
        assert history(client, run.info.run_id, key) == [(m["step"], pytest.approx(m[key])) for m in steps], key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "final")}
    assert "final/adapter_model.safetensors" in artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "report")] == ["report/rewards.png"]
    # the run id is kept with the checkpoint and beside the outputs
    state = torch.load(out / "checkpoints" / "step-3" / "trainer_state.pt", weights_only=False)
    assert state["extras"]["tracking"]["mlflowRunId"] == run.info.run_id
    assert json.loads((out / "tracking.json").read_text())["mlflowRunId"] == run.info.run_id
    # TensorBoard: event files under output/tensorboard, read back by tensorboard's own reader
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert tensorboard_scalars(out / "tensorboard", "reward") == [(m["step"], pytest.approx(m["reward"])) for m in steps]


def test_a_resumed_pod_continues_the_same_run_without_duplicate_steps(tiny_model_dir, tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    rewards = [{"name": "len7", "function": "tests.runtime.crash_rewards:die_on_call"}]
    out = tmp_path / "run"
    doc = tracked_job(tiny_model_dir, out, mlflow_server, experiment="resumed", rewards=rewards, maxSteps=4)
    job = write_job(tmp_path, doc)
    killed = grpo_train(job, env={**TREE, "GRPO_TEST_DIE_ON_CALL": "4"})  # dies inside step 4, after step-2's checkpoint
    assert killed.returncode == 137
    client = MlflowClient(mlflow_server)
    first = only_run(client, "resumed")
    assert [s for s, _ in history(client, first.info.run_id, "reward")] == [1, 2, 3]

    resumed = grpo_train(job, env=TREE)
    assert resumed.returncode == 0, resumed.stderr
    run = only_run(client, "resumed")  # the same run, not a second one
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    assert [s for s, _ in history(client, run.info.run_id, "reward")] == [1, 2, 3, 4]  # step 3 not logged twice
    assert f"continuing run {run.info.run_id}" in resumed.stderr
    # TensorBoard drops the re-run step's old events (purge_step): every step once, the new values
    got = read_metrics(out)
    assert tensorboard_scalars(out / "tensorboard", "reward") == [(m["step"], pytest.approx(m["reward"])) for m in got]


def test_a_run_deleted_on_the_server_gives_a_new_run_and_eval_metrics_pass_through(tmp_path, mlflow_server):
    """Straight through Tracking (no training): the run id of tracking.json names a deleted run."""
    from mlflow.tracking import MlflowClient

    from grpo_runtime.storage import LocalStorage
    from grpo_runtime.tracking import open_tracking

    client = MlflowClient(mlflow_server)
    stale = client.create_run(client.create_experiment("deleted-run")).info.run_id
    client.delete_run(stale)
    storage = LocalStorage(tmp_path)
    storage.write_bytes("tracking.json", json.dumps({"mlflowRunId": stale}).encode())
    job = parse_job(tracked_job("m", tmp_path, mlflow_server, experiment="deleted-run", tensorboard=False))
    extras: dict = {}
    tracking = open_tracking(job, storage, step=0, extras=extras)
    tracking({"step": 1, "reward": 0.5, "eval/accuracy": 0.25, "eval/rewards/correct/mean": 0.25, "latest_checkpoint": None})
    tracking.finish(ok=True, wait_s=0)
    run_id = extras["tracking"]["mlflowRunId"]
    assert run_id != stale and json.loads(storage.read_bytes("tracking.json"))["mlflowRunId"] == run_id
    assert history(client, run_id, "eval/accuracy") == [(1, 0.25)]
    assert history(client, run_id, "reward") == [(1, 0.5)]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_tensorboard_events_land_in_s3(tiny_model_dir, tmp_path, s3_bucket):
    import boto3

    doc = tiny_job(tiny_model_dir, s3_bucket.uri("jobs/tb"), maxSteps=2)
    doc["spec"]["output"]["endpoint"] = s3_bucket.endpoint
    doc["spec"]["tracking"] = {"tensorboard": {"enabled": True}}
    assert run_in_process(doc) == 0
    client = boto3.client("s3", endpoint_url=s3_bucket.endpoint, region_name="us-east-1")
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket.name, Prefix="jobs/tb/tensorboard/")["Contents"]]
    assert keys and all(k.split("/")[-1].startswith("events.out.tfevents.") for k in keys)
    local = tmp_path / "tb"
    local.mkdir()
    for key in keys:
        client.download_file(s3_bucket.name, key, str(local / key.split("/")[-1]))
    from grpo_runtime import metrics_log
    from grpo_runtime.storage import open_storage

    metrics = metrics_log.read_metrics(open_storage(f"s3://{s3_bucket.name}/jobs/tb", endpoint=s3_bucket.endpoint))
    assert tensorboard_scalars(local, "kl") == [(m["step"], pytest.approx(m["kl"])) for m in metrics]


# ------------------------------------------------------------------------------- a server that is down


def test_a_tracking_server_that_is_down_never_stops_training(tiny_model_dir, tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "grpo")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cr3t-mlflow-password")
    out = tmp_path / "run"
    down = f"http://grpo:s3cr3t-mlflow-password@127.0.0.1:{free_port()}"  # nothing listens there
    caplog.set_level(logging.INFO)
    assert run_in_process(tracked_job(tiny_model_dir, out, down, experiment="x", tensorboard=False)) == 0
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3]  # the metrics log has every step
    warnings = [r.getMessage() for r in caplog.records if r.name == "grpo_runtime.tracking" and r.levelno == logging.WARNING]
    assert any("MLflow: start failed (training goes on" in w for w in warnings), warnings
    assert any("gave up on" in w for w in warnings), warnings
    assert len([w for w in warnings if "failed (training goes on" in w]) == 1  # once per outage, not every step
    assert "s3cr3t-mlflow-password" not in caplog.text
    assert not (out / "tracking.json").exists()


def test_params_are_the_spec_without_credentials_in_uris():
    from tests.runtime.test_spec import with_spec

    from grpo_runtime.tracking import spec_params

    job = parse_job(with_spec(tracking={"mlflow": {"trackingUri": "https://bob:hunter22@mlflow.example:5000"}},
                              training={"learningRate": 1e-5}))  # fmt: skip
    params = spec_params(job)
    assert params["training.learningRate"] == "1e-05" and params["model.name"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert params["tracking.mlflow.trackingUri"] == "https://***@mlflow.example:5000"
    assert not any("hunter22" in value for value in params.values())


class Flaky:
    """A tracker whose server is down for the first `down` calls."""

    name = "Flaky"

    def __init__(self, down: int):
        self.down, self.calls, self.received = down, 0, []

    def _call(self, what):
        self.calls += 1
        if self.calls <= self.down:
            raise ConnectionError("connection refused")
        self.received.append(what)

    def start(self):
        self._call("start")

    def log_params(self, params):
        self._call("params")

    def log_metrics(self, step, metrics):
        self._call(step)

    def log_artifact(self, path, where):
        self._call(where)

    def close(self, ok):
        self._call("close")


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_calls_made_while_the_server_is_down_are_retried_in_order(caplog):
    caplog.set_level(logging.INFO)
    tracker, clock = Flaky(down=3), Clock()
    guarded = Guarded(tracker, clock=clock)
    guarded.call("log_params", lambda: tracker.log_params({}))  # try 1 fails: the next try in 5 s
    for step in (1, 2, 3, 4):
        clock.now += 4.0  # a step takes 4 s
        guarded.call(f"metrics of step {step}", lambda s=step: tracker.log_metrics(s, {"reward": 1.0}))
    # tries at 0 s, 8 s (5 s later at the earliest), 16 s (10 s after the second failure: not yet)
    assert tracker.calls == 2 and tracker.received == []
    clock.now += 20.0
    guarded.call("metrics of step 5", lambda: tracker.log_metrics(5, {"reward": 1.0}))  # fails (3rd try)
    clock.now += 30.0
    guarded.call("metrics of step 6", lambda: tracker.log_metrics(6, {"reward": 1.0}))  # works, sends all
    assert tracker.received == ["start", "params", 1, 2, 3, 4, 5, 6]
    assert guarded.finish(ok=True, wait_s=0)
    assert tracker.received[-1] == "close"
    messages = [r.getMessage() for r in caplog.records]
    assert sum("failed (training goes on" in m for m in messages if "Flaky" in m) == 1
    assert any("Flaky works again" in m for m in messages)


def test_a_server_down_to_the_end_is_given_up_on_without_raising():
    tracker = Flaky(down=10**6)
    guarded = Guarded(tracker)
    guarded.call("metrics of step 1", lambda: tracker.log_metrics(1, {}))
    assert guarded.finish(ok=True, tries=2, wait_s=0) is False
    assert tracker.received == [] and tracker.calls == 3  # once at the step, twice at the end
