"""What a GRPOJob's status should be, and what to do about it: a pure function.

`decide(job, pods, now, last_seen)` takes the job as the API server has it, its pods (every
attempt's; a single pod, or None, stands for a one-pod job's current pod), the time, and
(optionally) a pod as last seen before it vanished, and returns a Decision: the operator-owned
status (phase, conditions, observedGeneration, podName, attempt, restarts, disruptions, ranks,
runningPods, startTime, completionTime; never `progress`), the attempt whose pods to create, the
pods to delete, whether the job's TTL has run out, and the events to post. Calling it again with
the same inputs gives the same answer, and events are emitted only on transitions, so any handler
may call it any time.

Phases: Pending (pods created, not all running) -> Running -> Succeeded | Failed; Suspended
while runPolicy.suspend is true. A pod that fails with exit code 2 (bad input) fails the
job at once; any other failure of the training starts the next attempt, which resumes from
the last checkpoint, until `restarts` reaches runPolicy.backoffLimit.

An attempt is a set of pods: one, or with spec.resources.nodes > 1 one per node, a gang that
trains as one torchrun world (outcomes.attempt_outcome() says how it stands: Running only while
all of its pods run, ended as soon as one fails or is taken away, Succeeded when pod index 0
succeeds). The verdict on an ended attempt is taken once, when it ends, and written to the status
(restarts or disruptions counted, `attempt` moved on); then the pods of the ended attempt still
running are deleted, and the next attempt's pods are created only once every earlier pod has
ended, so two attempts never train, nor write checkpoints, at once. Meanwhile `podName` is absent:
the pods of `attempt` do not exist yet. (The verdict cannot wait for that moment: the pods the
operator deletes would by then look like pods someone else deleted.)

Disruptions are not failures (as a Kubernetes Job's podFailurePolicy treats the pod's
DisruptionTarget condition): a pod that ends because the cluster took it away -- preempted by
the scheduler, evicted (the Eviction API: a node drain, a queue manager; or the kubelet under
node pressure, reason Evicted), its node shut down or lost, or deleted by anyone but this
operator -- starts the next attempt without counting toward backoffLimit. They are counted in
`disruptions`, and the Disrupted condition and a Disrupted event name the cause. A DisruptionTarget
condition wins over the exit code (a preempted trainer dies of the SIGTERM it was sent), and in a
gang over the other pods' failures (they fail because their peer went). Suspending deletes the
pods without counting a restart; resuming starts a new attempt and resets startTime, from which
activeDeadlineSeconds counts (as Kubernetes Jobs do). A pod still terminating is waited for before
its successors are made, so two trainers never write the same checkpoints, unless it is stuck
(its node is lost).
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from grpo_runtime.spec import GRPOJob, SpecError, parse_job

from grpo_operator.outcomes import (  # pod_outcome and timestamp are also read from here
    ALIVE,
    EXIT_BAD_INPUT,
    attempt_outcome,
    parse_timestamp,
    pod_outcome,
    settled_outcome,
    timestamp,
)
from grpo_operator.render import pod_names

__all__ = ["TERMINAL", "Decision", "Event", "decide", "pod_outcome", "set_condition", "timestamp"]

TERMINAL = ("Succeeded", "Failed")
OPERATOR_FIELDS = (
    "phase",
    "conditions",
    "observedGeneration",
    "podName",
    "attempt",
    "restarts",
    "disruptions",
    "ranks",
    "runningPods",
    "startTime",
    "completionTime",
)


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass
class Decision:
    status: dict[str, Any]
    job: GRPOJob | None = None  # the validated job; None when the spec is invalid
    create_attempt: int | None = None  # create the pods of this attempt (and their support objects)
    delete_pods: list[str] = field(default_factory=list)
    delete_job: bool = False  # ttlSecondsAfterFinished has run out
    events: list[Event] = field(default_factory=list)

    @property
    def delete_pod(self) -> str | None:
        """The first pod to delete: a one-pod job's only one."""
        return self.delete_pods[0] if self.delete_pods else None

    def status_patch(self, current: Mapping[str, Any] | None) -> dict[str, Any]:
        """The merge patch that turns `current` into the decided status (empty: nothing to write;
        a None value removes the field)."""
        current = current or {}
        return {key: value for key, value in self.status.items() if current.get(key) != value}


def set_condition(
    status: dict[str, Any], type_: str, value: bool, reason: str, message: str, now: datetime
) -> None:
    """Kubernetes-style: lastTransitionTime moves only when the condition's status changes."""
    conditions: list[dict[str, Any]] = status.setdefault("conditions", [])
    text = "True" if value else "False"
    for condition in conditions:
        if condition["type"] == type_:
            if condition["status"] != text:
                condition["lastTransitionTime"] = timestamp(now)
            condition.update(status=text, reason=reason, message=message)
            return
    conditions.append(
        {"type": type_, "status": text, "reason": reason, "message": message, "lastTransitionTime": timestamp(now)}
    )


def _validation_view(job: Mapping[str, Any]) -> dict[str, Any]:
    meta = job.get("metadata") or {}
    return {
        "apiVersion": job.get("apiVersion"),
        "kind": job.get("kind"),
        "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace")},
        "spec": job.get("spec"),
    }


def _raw_ttl(job: Mapping[str, Any]) -> int | None:
    ttl = ((job.get("spec") or {}).get("runPolicy") or {}).get("ttlSecondsAfterFinished")
    return ttl if isinstance(ttl, int) and not isinstance(ttl, bool) and ttl >= 0 else None


def _pods_by_name(pods: Sequence[Mapping[str, Any]] | Mapping[str, Any] | None) -> dict[str, Mapping[str, Any]]:
    if pods is None:
        return {}
    if isinstance(pods, Mapping):
        pods = [pods]
    return {pod["metadata"]["name"]: pod for pod in pods}


def _pods_phrase(names: Sequence[str]) -> str:
    return f"pod {names[0]}" if len(names) == 1 else f"pods {', '.join(names)}"


class _Machine:
    """One decision in the making; each method is one transition."""

    def __init__(self, decision: Decision, name: str, now: datetime, pods: Mapping[str, Mapping[str, Any]]):
        self.d, self.s, self.name, self.now, self.pods = decision, decision.status, name, now, pods
        self.nodes = 1  # spec.resources.nodes, once the spec is known valid

    def event(self, type_: Literal["Normal", "Warning"], reason: str, message: str) -> None:
        self.d.events.append(Event(type_, reason, message))

    def names(self, attempt: int) -> list[str]:
        return pod_names(self.name, attempt, self.nodes)

    def any_pod(self, states: Collection[str], *, besides: Collection[str] = ()) -> bool:
        """Whether a pod of the job (but those named in `besides`) is in one of `states` (a pod stuck
        terminating on a lost node counts as gone)."""
        return any(settled_outcome(pod, self.now).state in states for name, pod in self.pods.items()
                   if name not in besides)

    def delete_alive(self, *, besides: Collection[str] = ()) -> None:
        """Delete the job's pods (but those named in `besides`) that are still pending or running."""
        for name, pod in self.pods.items():
            if name not in besides and pod_outcome(pod).state in ALIVE and name not in self.d.delete_pods:
                self.d.delete_pods.append(name)

    def start_attempt(self, attempt: int, why: str) -> None:
        """Move on to `attempt`: its pods are created now, or once the earlier attempts' pods have ended
        (those still running are deleted now)."""
        names = self.names(attempt)
        self.s.update(phase="Pending", attempt=attempt)
        self.delete_alive(besides=names)
        if self.any_pod(("pending", "running", "terminating"), besides=names):
            self.s["podName"] = None
            set_condition(self.s, "Running", False, "PreviousAttemptEnding",
                          f"attempt {attempt} starts once the pods of earlier attempts have ended", self.now)
            return
        self.create_pods(attempt, why)

    def create_pods(self, attempt: int, why: str) -> None:
        names = self.names(attempt)
        self.d.create_attempt = attempt
        self.s.update(phase="Pending", attempt=attempt, podName=names[0])
        waiting = "waiting for it to run" if len(names) == 1 else "waiting for all of them to run"
        set_condition(self.s, "Running", False, "PodCreated", f"{_pods_phrase(names)} created, {waiting}", self.now)
        self.event("Normal", "PodCreated", f"created {_pods_phrase(names)} (attempt {attempt}){why}")

    def suspend(self) -> None:
        self.delete_alive()
        if self.s.get("phase") != "Suspended":
            self.event("Normal", "Suspended", "runPolicy.suspend is true: the pods are deleted until it is false")
        self.s["phase"] = "Suspended"
        set_condition(self.s, "Suspended", True, "Suspended", "runPolicy.suspend is true", self.now)
        set_condition(self.s, "Running", False, "Suspended", "the job is suspended", self.now)

    def resume(self, attempt: int) -> None:
        """Start (attempt 1) or resume (a later one, from the last checkpoint); startTime restarts."""
        self.s["startTime"] = timestamp(self.now)
        if self.s.get("phase") == "Suspended":
            set_condition(self.s, "Suspended", False, "Resumed", "runPolicy.suspend is false", self.now)
            self.event("Normal", "Resumed", "runPolicy.suspend is false: the job runs again")
        else:
            set_condition(self.s, "Suspended", False, "NotSuspended", "runPolicy.suspend is false", self.now)
        self.start_attempt(attempt, ", resuming from the last checkpoint" if attempt > 1 else "")

    def finish(self, phase: str, reason: str, message: str) -> None:
        self.s.update(phase=phase, completionTime=timestamp(self.now))
        set_condition(self.s, phase, True, reason, message, self.now)
        set_condition(self.s, "Running", False, phase, message, self.now)
        self.event("Normal" if phase == "Succeeded" else "Warning", reason, message)

    def running_pods(self) -> int:
        """Pods of the current attempt that run now."""
        names = self.names(int(self.s.get("attempt") or 0)) if self.s.get("podName") else []
        return sum(pod_outcome(self.pods.get(name)).state == "running" for name in names if name in self.pods)


def _advance(m: _Machine, job: GRPOJob, last_seen: Mapping[str, Any] | None) -> None:
    """A valid job that has not finished yet."""
    s, policy, now = m.s, job.spec.run_policy, m.now
    attempt, restarts = int(s.get("attempt") or 0), int(s.get("restarts") or 0)
    disruptions = int(s.get("disruptions") or 0)
    s["restarts"], s["disruptions"] = restarts, disruptions

    if job.spec.output.uri:
        set_condition(s, "OutputPersistent", True, "OutputURI", f"output goes to {job.spec.output.uri}", now)
    elif not any(c["type"] == "OutputPersistent" for c in s.get("conditions", [])):
        message = (
            "spec.output.uri is unset: checkpoints and metrics live in the pod's emptyDir and are lost "
            "with the pod; a retry starts from step 0"
        )
        set_condition(s, "OutputPersistent", False, "NoOutputURI", message, now)
        m.event("Warning", "EphemeralOutput", message)

    if attempt == 0 or s.get("phase") == "Suspended":
        if policy.suspend or m.any_pod(ALIVE):
            m.suspend()  # (again, if an earlier deletion did not land)
        elif not m.any_pod(("terminating",)):  # a terminating pod is waited for
            m.resume(attempt + 1)
        return

    names = m.names(attempt)
    m.delete_alive(besides=names)  # an ended attempt's pods that still run
    if not s.get("podName"):  # the verdict is in: this attempt's pods wait for the earlier ones to end
        if policy.suspend:
            m.suspend()
        elif not m.any_pod(("pending", "running", "terminating"), besides=names):
            m.create_pods(attempt, ", resuming from the last checkpoint")
        else:
            _check_deadline(m, policy.active_deadline_seconds)
        return

    outcome = attempt_outcome(names, m.pods, now, last_seen)
    if outcome.state == "succeeded":
        m.finish("Succeeded", "Succeeded", f"pod {outcome.pod} completed")
        return
    if outcome.state == "terminating":
        _check_deadline(m, policy.active_deadline_seconds)
        return  # wait until it is gone: its successor must not write the same checkpoints
    if policy.suspend:
        m.suspend()
        return
    if outcome.finished_badly and outcome.disruption:
        s["disruptions"] = disruptions + 1
        message = (
            f"attempt {attempt} (pod {outcome.pod}) was disrupted: {outcome.disruption}; not a failure, not "
            f"counted toward backoffLimit (disruption {disruptions + 1}); resuming from the last checkpoint"
        )
        set_condition(s, "Disrupted", True, outcome.disruption, message, now)
        m.event("Warning", "Disrupted", message)
        m.start_attempt(attempt + 1, f", after disruption {disruptions + 1} ({outcome.disruption})")
        return
    if outcome.finished_badly:
        what = f"attempt {attempt} (pod {outcome.pod}) failed: {outcome.describe()}"
        if outcome.exit_code == EXIT_BAD_INPUT:
            m.finish("Failed", "BadInput", f"{what}; exit code 2 means bad input (spec, model, data): not retried")
        elif restarts < policy.backoff_limit:
            s["restarts"] = restarts + 1
            m.event(
                "Warning",
                "Restarting",
                f"{what}; restart {restarts + 1} of {policy.backoff_limit}, resuming from the last checkpoint",
            )
            m.start_attempt(attempt + 1, f", restart {restarts + 1} of {policy.backoff_limit}")
        else:
            m.finish("Failed", "BackoffLimitExceeded", f"{what}; backoffLimit {policy.backoff_limit} reached")
        return

    if outcome.state == "running":
        running = f"pod {names[0]} is running" if len(names) == 1 else f"all {len(names)} pods of attempt {attempt} run"
        if s.get("phase") != "Running":
            m.event("Normal", "Running", running)
        s["phase"] = "Running"
        set_condition(s, "Running", True, "PodRunning", running, now)
    else:
        s["phase"] = "Pending"
        waiting = (f"pod {names[0]} is not running yet" if len(names) == 1 else
                   f"{outcome.running} of {len(names)} pods of attempt {attempt} run; pod {outcome.pod} does not yet")
        set_condition(s, "Running", False, outcome.reason, waiting, now)

    _check_deadline(m, policy.active_deadline_seconds)


def _check_deadline(m: _Machine, deadline: int | None) -> None:
    if deadline and m.s.get("startTime"):
        elapsed = (m.now - parse_timestamp(m.s["startTime"])).total_seconds()
        if elapsed >= deadline:
            m.delete_alive()
            m.finish("Failed", "DeadlineExceeded", f"activeDeadlineSeconds {deadline} exceeded (ran {elapsed:.0f} s)")


def _finished(m: _Machine, job: Mapping[str, Any]) -> None:
    """A finished job: make sure none of its pods is left running, and apply its TTL."""
    m.delete_alive()
    ttl = _raw_ttl(job)
    if ttl is not None:
        finished_at = parse_timestamp(m.s.get("completionTime") or timestamp(m.now))
        if (m.now - finished_at).total_seconds() >= ttl:
            m.d.delete_job = True
            m.event("Normal", "TTLExpired", f"deleting the job {ttl} s after it finished (ttlSecondsAfterFinished)")


def decide(
    job: Mapping[str, Any],
    pods: Sequence[Mapping[str, Any]] | Mapping[str, Any] | None,
    now: datetime,
    last_seen: Mapping[str, Any] | None = None,
) -> Decision:
    """The job's next status and actions, given its pods (every attempt's; None: none), the time, and a
    pod as last seen (a watch's DELETED event) when it is gone: that says why it went."""
    meta = job.get("metadata") or {}
    current = job.get("status") or {}
    status = copy.deepcopy({key: current[key] for key in OPERATOR_FIELDS if key in current})
    if meta.get("generation") is not None:
        status["observedGeneration"] = meta["generation"]
    decision = Decision(status=status)
    machine = _Machine(decision, meta.get("name", ""), now, _pods_by_name(pods))

    try:
        decision.job = parse_job(_validation_view(job))
    except SpecError as exc:
        if status.get("phase") not in TERMINAL:
            machine.finish("Failed", "InvalidSpec", "; ".join(exc.messages))
    else:
        resources = decision.job.spec.resources
        machine.nodes = resources.nodes
        status["ranks"] = resources.world_size
        if status.get("phase") not in TERMINAL:
            _advance(machine, decision.job, last_seen)

    if status.get("phase") in TERMINAL:
        _finished(machine, job)
    if machine.nodes > 1:
        status["runningPods"] = machine.running_pods()
    return decision
