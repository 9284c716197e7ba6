"""Experiment tracking (TRL's `report_to`): MLflow and TensorBoard, from `spec.tracking`.

One small class per backend behind one protocol (start, log_params, log_metrics, log_artifact,
close), each wrapped in `Guarded`: a tracking server that is down never stops training. A failed
call is kept, in order, and sent again before the next one (so at each step: the retries back
off with the steps); the first failure of an outage is a warning, the recovery an info line.
the metrics/ log is written by the trainer either way.

Resume: MLflow's run id is kept with each checkpoint (`Trainer.checkpoint_extras`) and in
`tracking.json` under the output; a resumed pod reopens that run and skips the steps the run
already has, so no step is logged twice. TensorBoard's writer is opened with `purge_step`, so
`tensorboard --logdir` drops the events of steps that are being re-run.

Credentials come from the environment (MLFLOW_TRACKING_USERNAME/PASSWORD or TOKEN, set from
`spec.tracking.mlflow.credentialsSecret` in a pod): never logged, never in the params.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from grpo_runtime.messages import typed_first_line
from grpo_runtime.metrics_log import read_metrics
from grpo_runtime.spec import GRPOJob, MLflowSpec
from grpo_runtime.storage import LocalStorage, Storage

log = logging.getLogger(__name__)

TRACKING_FILE = "tracking.json"
TENSORBOARD_DIR = "tensorboard"
MAX_PENDING = 10_000  # queued calls kept through an outage; older ones are dropped (and said so)
_SECRET_ENV = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def scrub(text: str) -> str:
    """No credential in a message: env secret values and user:pass@ in URLs become ***."""
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return re.sub(r"(://)[^/@\s]+@", r"\1***@", text)


class Tracker(Protocol):
    name: str

    def start(self) -> None: ...
    def log_params(self, params: dict[str, str]) -> None: ...
    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...
    def log_artifact(self, local_path: str | Path, artifact_path: str) -> None: ...
    def close(self, ok: bool) -> None: ...


def spec_params(job: GRPOJob) -> dict[str, str]:
    """The job's spec, flattened to dotted camelCase keys (training.learningRate -> '5e-06');
    lists as JSON. Secret *names* only; a user:password@ in a URI becomes ***@."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        else:
            flat[prefix] = scrub(value if isinstance(value, str) else json.dumps(value))[:6000]

    walk("", job.to_manifest()["spec"])
    return flat


def numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a step's metrics line, but the step itself."""
    return {
        key: float(value)
        for key, value in metrics.items()
        if key != "step"
        and isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
    }


# ---------------------------------------------------------------------------------------------
# MLflow


class MLflowTracker:
    """One MLflow run per job, through MlflowClient (no global active run)."""

    name = "MLflow"

    def __init__(self, spec: MLflowSpec, job: GRPOJob, run_id: str | None, on_run: Callable[[str], None]):
        # MLflow's own HTTP retries would stall a step for minutes while the server is down;
        # Guarded retries at the next step instead.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow.tracking import MlflowClient

        self.spec, self.job, self.on_run = spec, job, on_run
        self.client = MlflowClient(tracking_uri=spec.tracking_uri)
        self.run_id = run_id
        self.resumed = run_id is not None
        self.last_step = -1  # steps up to this one are in the run already (a resumed run); step 0 is the eval baseline

    def start(self) -> None:
        if self.run_id is not None:
            try:
                run = self.client.get_run(self.run_id)
                gone = run.info.lifecycle_stage == "deleted"
            except Exception as exc:
                if "RESOURCE_DOES_NOT_EXIST" not in str(getattr(exc, "error_code", "")):
                    raise  # an outage: Guarded retries
                gone = True
            if gone:
                log.warning("MLflow: run %s was deleted on the server; starting a new run", self.run_id)
                self.run_id, self.resumed = None, False
                return self.start()
            self.last_step = max(
                (m.step for key in run.data.metrics for m in self.client.get_metric_history(self.run_id, key)),
                default=-1,
            )
            self.client.update_run(self.run_id, status="RUNNING")
            log.info("MLflow: continuing run %s (it has steps up to %d)", self.run_id, self.last_step)
        else:
            experiment = self.client.get_experiment_by_name(self.spec.experiment_name)
            experiment_id = (
                experiment.experiment_id if experiment else self.client.create_experiment(self.spec.experiment_name)
            )
            meta = self.job.metadata
            tags = {"grpo.dev/job": meta.name, "grpo.dev/namespace": meta.namespace or ""}
            run = self.client.create_run(experiment_id, run_name=self.spec.run_name or meta.name, tags=tags)
            self.run_id = run.info.run_id
            log.info("MLflow: run %s in experiment %r at %s", self.run_id, self.spec.experiment_name, scrub(self.spec.tracking_uri))
        self.on_run(self.run_id)

    def log_params(self, params: dict[str, str]) -> None:
        if self.resumed:
            return  # the run has them: MLflow refuses to change a param
        from mlflow.entities import Param

        items = [Param(key, value) for key, value in params.items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if step <= self.last_step:
            return  # logged by the attempt before this one: no duplicate step
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(key, value, now, step) for key, value in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def log_artifact(self, local_path: str | Path, artifact_path: str) -> None:
        if Path(local_path).is_dir():
            self.client.log_artifacts(self.run_id, str(local_path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")


def _mlflow_permanent(exc: BaseException) -> bool:
    """A 4xx answer (but 408/429) will not get better by retrying: a bad call, not an outage."""
    code = getattr(exc, "get_http_status_code", lambda: 500)()
    return 400 <= code < 500 and code not in (401, 403, 408, 429)


# ---------------------------------------------------------------------------------------------
# TensorBoard


class TensorBoardTracker:
    """Event files under <output>/tensorboard/, by torch.utils.tensorboard's SummaryWriter
    (tensorboard's own event writer). A local output is written in place; for object storage
    the files are written to a local folder and uploaded after every step (a few KB each)."""

    name = "TensorBoard"

    def __init__(self, storage: Storage, resume_step: int):
        self.storage, self.resume_step = storage, resume_step
        self.local = isinstance(storage, LocalStorage)
        self._tmp = None if self.local else tempfile.TemporaryDirectory(prefix="grpo-tb-")
        self.log_dir = Path(storage.root) / TENSORBOARD_DIR if self.local else Path(self._tmp.name)
        self.writer = None

    def start(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: on resume, events from the re-run steps (from this step on) are dropped by readers
        purge = self.resume_step + 1 if self.resume_step else None
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge)

    def log_params(self, params: dict[str, str]) -> None:
        table = "\n".join(f"| {key} | {value} |" for key, value in params.items())
        self.writer.add_text("spec", "| field | value |\n|---|---|\n" + table, global_step=self.resume_step)
        self._flush()

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)
        self._flush()

    def log_artifact(self, local_path: str | Path, artifact_path: str) -> None:
        pass  # TensorBoard keeps no files; the adapter is in final/ beside it

    def close(self, ok: bool) -> None:
        self.writer.close()
        self._upload()
        if self._tmp is not None:
            self._tmp.cleanup()

    def _flush(self) -> None:
        self.writer.flush()
        self._upload()

    def _upload(self) -> None:
        if self.local:
            return
        for path in sorted(self.log_dir.rglob("*")):
            if path.is_file():
                self.storage.upload_file(path, f"{TENSORBOARD_DIR}/{path.relative_to(self.log_dir).as_posix()}")


# ---------------------------------------------------------------------------------------------
# Never let tracking stop training


class Guarded:
    """Runs a tracker's calls in order; a failing call waits, with those after it, for a later
    call. Retries back off (5 s, 10 s, ... up to 5 minutes between tries), so a server that does
    not answer costs a step one timeout now and then, not one every step. Never raises.
    `finish()` makes a few last tries, then gives up."""

    def __init__(
        self,
        tracker: Any,
        permanent: Callable[[BaseException], bool] = lambda exc: False,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.tracker, self.permanent, self.clock = tracker, permanent, clock
        self.pending: list[tuple[str, Callable[[], None]]] = [("start", tracker.start)]
        self.failing = False
        self.failures = 0  # consecutive failed tries
        self.retry_at = 0.0
        self.dropped = 0

    def call(self, what: str, fn: Callable[[], None]) -> None:
        self.pending.append((what, fn))
        if len(self.pending) > MAX_PENDING:
            del self.pending[1:2]  # keep `start` (first), drop the oldest after it
            self.dropped += 1
        self.drain()

    def drain(self, force: bool = False) -> bool:
        """Send what is queued (unless backing off); True when nothing is left."""
        if self.failing and not force and self.clock() < self.retry_at:
            return not self.pending
        while self.pending:
            what, fn = self.pending[0]
            try:
                fn()
            except Exception as exc:  # noqa: BLE001  (any failure: report, keep training)
                message = scrub(typed_first_line(exc))
                if self.permanent(exc) and what != "start":
                    log.warning("%s refused %s (dropped; training goes on): %s", self.tracker.name, what, message)
                    self.pending.pop(0)
                    continue
                log.log(
                    logging.DEBUG if self.failing else logging.WARNING,
                    "%s: %s failed (training goes on, %d call(s) kept to retry at a later step; "
                    "metrics/ has every step): %s",
                    self.tracker.name,
                    what,
                    len(self.pending),
                    message,
                )
                self.failing = True
                self.failures += 1
                self.retry_at = self.clock() + min(300.0, 5.0 * 2 ** (self.failures - 1))
                return False
            self.pending.pop(0)
            if self.failing:
                log.info("%s works again; sending the calls kept meanwhile", self.tracker.name)
                self.failing, self.failures = False, 0
        return True

    def finish(self, ok: bool, tries: int = 3, wait_s: float = 2.0) -> bool:
        self.pending.append(("close", lambda: self.tracker.close(ok)))
        for attempt in range(tries):
            if self.drain(force=True):
                return True
            if attempt + 1 < tries:
                time.sleep(wait_s * (attempt + 1))
        log.warning(
            "%s: gave up on %d call(s) at the end (metrics/ has every step)%s",
            self.tracker.name,
            len(self.pending),
            f"; {self.dropped} older call(s) were dropped during the outage" if self.dropped else "",
        )
        return False


class Tracking:
    """The job's trackers as one Trainer.on_step callback, plus the end of the run."""

    def __init__(self, job: GRPOJob, trackers: list[Guarded], storage: Storage):
        self.job, self.trackers, self.storage = job, trackers, storage
        params = spec_params(job)
        for guarded in trackers:
            guarded.call("log_params", lambda g=guarded: g.tracker.log_params(params))

    def __call__(self, metrics: dict[str, Any]) -> None:
        step, numbers = int(metrics["step"]), numeric_metrics(metrics)
        for guarded in self.trackers:
            guarded.call(f"metrics of step {step}", lambda g=guarded: g.tracker.log_metrics(step, numbers))

    def finish(self, ok: bool, tries: int = 3, wait_s: float = 2.0) -> None:
        """At the end: the final adapter and the reward report as artifacts, then close the runs."""
        with tempfile.TemporaryDirectory(prefix="grpo-artifacts-") as tmp:
            if ok:
                self._artifacts(Path(tmp))
            for guarded in self.trackers:
                guarded.finish(ok, tries=tries, wait_s=wait_s)

    def _artifacts(self, tmp: Path) -> None:
        from grpo_runtime.report import plot_rewards

        files: list[tuple[Path, str]] = []
        try:
            if self.storage.list("final/"):
                self.storage.download_dir("final", tmp / "final")
                files.append((tmp / "final", "final"))
            steps = read_metrics(self.storage)
            if steps:
                files.append((plot_rewards(steps, tmp / "rewards.png"), "report"))
        except Exception as exc:  # noqa: BLE001  (the run is done; artifacts are a nicety)
            log.warning("tracking: could not gather the artifacts: %s", scrub(str(exc)))
        for guarded in self.trackers:
            for path, where in files:
                guarded.call(f"artifact {where}", lambda g=guarded, p=path, w=where: g.tracker.log_artifact(p, w))


def read_run_id(storage: Storage, extras: dict[str, Any], resume: bool) -> str | None:
    """The MLflow run to continue: the checkpoint's, else tracking.json's (a pod that died before
    its first checkpoint); None for a fresh start."""
    if not resume:
        return None
    run_id = (extras.get("tracking") or {}).get("mlflowRunId")
    if run_id:
        return run_id
    try:
        if storage.exists(TRACKING_FILE):
            return json.loads(storage.read_bytes(TRACKING_FILE)).get("mlflowRunId")
    except Exception as exc:  # noqa: BLE001
        log.warning("tracking: unreadable %s (a new run is started): %s", TRACKING_FILE, exc)
    return None


def open_tracking(job: GRPOJob, storage: Storage, *, step: int, extras: dict[str, Any]) -> Tracking | None:
    """The trackers `spec.tracking` asks for, or None. `step` is where training starts (after a
    resume); `extras` is the trainer's checkpoint_extras, where the MLflow run id is kept."""
    spec = job.spec.tracking
    trackers: list[Guarded] = []
    if spec.mlflow is not None:
        def remember(run_id: str) -> None:
            extras["tracking"] = {"mlflowRunId": run_id}
            storage.write_bytes(TRACKING_FILE, json.dumps({"mlflowRunId": run_id}).encode())

        run_id = read_run_id(storage, extras, job.spec.checkpoint.resume)
        trackers.append(Guarded(MLflowTracker(spec.mlflow, job, run_id, remember), _mlflow_permanent))
    if spec.tensorboard.enabled:
        trackers.append(Guarded(TensorBoardTracker(storage, step)))
    return Tracking(job, trackers, storage) if trackers else None
