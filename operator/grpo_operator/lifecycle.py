"""What a GRPOJob's status should be, and what to do about it: a pure function.

`decide(job, pod, now, last_seen)` takes the job as the API server has it, its current
attempt's pod (None when absent), the time, and (optionally) the pod as last seen before it
vanished, and returns a Decision: the operator-owned status (phase, conditions,
observedGeneration, podName, attempt, restarts, disruptions, startTime, completionTime; never
`progress`), the pod to create or delete, whether the job's TTL has run out, and the events
to post. Calling it again with the same inputs gives the same
answer, and events are emitted only on transitions, so any handler may call it any time.

Phases: Pending (pod created, not running) -> Running -> Succeeded | Failed; Suspended
while runPolicy.suspend is true. A pod that fails with exit code 2 (bad input) fails the
job at once; any other failure of the training starts the next attempt, which resumes from
the last checkpoint, until `restarts` reaches runPolicy.backoffLimit.

Disruptions are not failures (as a Kubernetes Job's podFailurePolicy treats the pod's
DisruptionTarget condition): a pod that ends because the cluster took it away -- preempted by
the scheduler, evicted (the Eviction API: a node drain, a queue manager; or the kubelet under
node pressure, reason Evicted), its node shut down or lost, or deleted by anyone but this
operator -- starts the next attempt without counting toward backoffLimit. They are counted in
`disruptions`, and the Disrupted condition and a Disrupted event name the cause. A DisruptionTarget
condition wins over the exit code (a preempted trainer dies of the SIGTERM it was sent). Suspending deletes the pod without counting a restart; resuming
starts a new attempt and resets startTime, from which activeDeadlineSeconds counts (as
Kubernetes Jobs do). A pod still terminating is waited for before its successor is made,
so two trainers never write the same checkpoints, unless it is stuck (its node is lost).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal, Mapping

from grpo_runtime.spec import GRPOJob, SpecError, parse_job

from grpo_operator.render import CONTAINER, pod_name

TERMINAL = ("Succeeded", "Failed")
EXIT_BAD_INPUT = 2
# A pod still Terminating this long after its deletionTimestamp (which already includes the
# grace period) is on a lost node and will never finish: its successor may start.
STUCK_TERMINATING_SECONDS = 300
# Pod status.reason values by which a kubelet or node controller ends a pod that did nothing
# wrong: node-pressure eviction, graceful node shutdown, node lost (older controllers).
DISRUPTED_POD_REASONS = ("Evicted", "Preempting", "Terminated", "Shutdown", "NodeShutdown", "NodeLost")
OPERATOR_FIELDS = (
    "phase",
    "conditions",
    "observedGeneration",
    "podName",
    "attempt",
    "restarts",
    "disruptions",
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
    create_attempt: int | None = None  # create the pod of this attempt (and its support objects)
    delete_pod: str | None = None
    delete_job: bool = False  # ttlSecondsAfterFinished has run out
    events: list[Event] = field(default_factory=list)

    def status_patch(self, current: Mapping[str, Any] | None) -> dict[str, Any]:
        """The merge patch that turns `current` into the decided status (empty: nothing to write)."""
        current = current or {}
        return {key: value for key, value in self.status.items() if current.get(key) != value}


@dataclass(frozen=True)
class PodOutcome:
    state: Literal["pending", "running", "terminating", "succeeded", "failed", "gone"]
    reason: str = ""
    exit_code: int | None = None
    disruption: str | None = None  # why the cluster took the pod away (then not a failure)

    @property
    def finished_badly(self) -> bool:
        return self.state in ("failed", "gone")

    def describe(self) -> str:
        code = f", exit code {self.exit_code}" if self.exit_code is not None else ""
        return f"{self.reason}{code}"


def timestamp(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_timestamp(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _terminated(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == CONTAINER:
            return (status.get("state") or {}).get("terminated")
    return None


def _waiting_reason(pod: Mapping[str, Any]) -> str | None:
    status = pod.get("status") or {}
    for container in status.get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting")
        if waiting and waiting.get("reason"):
            return str(waiting["reason"])  # e.g. ImagePullBackOff, CreateContainerConfigError
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return str(condition.get("reason") or "Unschedulable")
    return None


def disruption_cause(pod: Mapping[str, Any] | None) -> str | None:
    """The cause when the cluster is ending (or ended) the pod: its DisruptionTarget condition's
    reason (PreemptionByScheduler, EvictionByEvictionAPI, DeletionByTaintManager, DeletionByPodGC,
    TerminationByKubelet, ...), else a kubelet's pod reason such as Evicted; None otherwise."""
    status = (pod or {}).get("status") or {}
    for condition in status.get("conditions") or []:
        if condition.get("type") == "DisruptionTarget" and condition.get("status") == "True":
            return str(condition.get("reason") or "DisruptionTarget")
    if status.get("reason") in DISRUPTED_POD_REASONS:
        return str(status["reason"])
    return None


def pod_outcome(pod: Mapping[str, Any] | None, last_seen: Mapping[str, Any] | None = None) -> PodOutcome:
    """Where the attempt's pod stands. Only reasons and exit codes are read, never free text.

    A pod that is gone was deleted by someone else (the operator deletes pods only when it
    suspends or ends the job): a disruption, named by `last_seen` when that says more."""
    if pod is None:
        cause = disruption_cause(last_seen) or "PodDeleted"
        return PodOutcome("gone", cause, disruption=cause)
    status = pod.get("status") or {}
    phase = status.get("phase")
    terminated = _terminated(pod)
    exit_code = terminated.get("exitCode") if terminated else None
    if phase == "Succeeded":
        return PodOutcome("succeeded", "Completed", exit_code)
    if phase == "Failed":
        cause = disruption_cause(pod)
        reason = cause or status.get("reason") or (terminated or {}).get("reason") or "PodFailed"
        return PodOutcome("failed", str(reason), exit_code, disruption=cause)
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return PodOutcome("terminating", "Terminating")
    if phase == "Running":
        return PodOutcome("running", "Running")
    return PodOutcome("pending", _waiting_reason(pod) or "PodPending")


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


class _Machine:
    """One decision in the making; each method is one transition."""

    def __init__(self, decision: Decision, name: str, now: datetime):
        self.d, self.s, self.name, self.now = decision, decision.status, name, now

    def event(self, type_: Literal["Normal", "Warning"], reason: str, message: str) -> None:
        self.d.events.append(Event(type_, reason, message))

    def start_attempt(self, attempt: int, why: str) -> None:
        name = pod_name(self.name, attempt)
        self.d.create_attempt = attempt
        self.s.update(phase="Pending", attempt=attempt, podName=name)
        set_condition(self.s, "Running", False, "PodCreated", f"pod {name} created, waiting for it to run", self.now)
        self.event("Normal", "PodCreated", f"created pod {name} (attempt {attempt}){why}")

    def suspend(self, pod: Mapping[str, Any] | None, outcome: PodOutcome) -> None:
        if pod is not None and outcome.state in ("pending", "running"):
            self.d.delete_pod = pod["metadata"]["name"]
        if self.s.get("phase") != "Suspended":
            self.event("Normal", "Suspended", "runPolicy.suspend is true: the pod is deleted until it is false")
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


def _advance(m: _Machine, job: GRPOJob, pod: Mapping[str, Any] | None, last_seen: Mapping[str, Any] | None) -> None:
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

    if last_seen is not None and (last_seen.get("metadata") or {}).get("name") != s.get("podName"):
        last_seen = None  # an earlier attempt's pod
    outcome = pod_outcome(pod, last_seen) if attempt else PodOutcome("gone")
    if outcome.state == "terminating" and _stuck(pod, now):
        # Its node is gone: it will never report.
        outcome = PodOutcome("gone", "PodStuckTerminating", disruption="PodStuckTerminating")
    if attempt == 0 or s.get("phase") == "Suspended":
        if policy.suspend or outcome.state in ("pending", "running"):
            m.suspend(pod, outcome)  # (again, if an earlier deletion did not land)
        elif outcome.state != "terminating":  # a terminating pod is waited for
            m.resume(attempt + 1)
        return

    if outcome.state == "succeeded":
        m.finish("Succeeded", "Succeeded", f"pod {s['podName']} completed")
        return
    if outcome.state == "terminating":
        _check_deadline(m, policy.active_deadline_seconds, pod)
        return  # wait until it is gone: its successor must not write the same checkpoints
    if policy.suspend:
        m.suspend(pod, outcome)
        return
    if outcome.finished_badly and outcome.disruption:
        s["disruptions"] = disruptions + 1
        message = (
            f"attempt {attempt} (pod {s['podName']}) was disrupted: {outcome.disruption}; not a failure, not "
            f"counted toward backoffLimit (disruption {disruptions + 1}); resuming from the last checkpoint"
        )
        set_condition(s, "Disrupted", True, outcome.disruption, message, now)
        m.event("Warning", "Disrupted", message)
        m.start_attempt(attempt + 1, f", after disruption {disruptions + 1} ({outcome.disruption})")
        return
    if outcome.finished_badly:
        what = f"attempt {attempt} (pod {s['podName']}) failed: {outcome.describe()}"
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
        if s.get("phase") != "Running":
            m.event("Normal", "Running", f"pod {s['podName']} is running")
        s["phase"] = "Running"
        set_condition(s, "Running", True, "PodRunning", f"pod {s['podName']} is running", now)
    else:
        s["phase"] = "Pending"
        set_condition(s, "Running", False, outcome.reason, f"pod {s['podName']} is not running yet", now)

    _check_deadline(m, policy.active_deadline_seconds, pod)


def _stuck(pod: Mapping[str, Any] | None, now: datetime) -> bool:
    """Terminating well past its deletion time (graceful period included): its node is lost."""
    deleting = ((pod or {}).get("metadata") or {}).get("deletionTimestamp")
    return bool(deleting) and (now - parse_timestamp(deleting)).total_seconds() > STUCK_TERMINATING_SECONDS


def _check_deadline(m: _Machine, deadline: int | None, pod: Mapping[str, Any] | None) -> None:
    if deadline and m.s.get("startTime"):
        elapsed = (m.now - parse_timestamp(m.s["startTime"])).total_seconds()
        if elapsed >= deadline:
            if pod is not None and pod_outcome(pod).state in ("pending", "running"):
                m.d.delete_pod = pod["metadata"]["name"]
            m.finish("Failed", "DeadlineExceeded", f"activeDeadlineSeconds {deadline} exceeded (ran {elapsed:.0f} s)")


def _finished(m: _Machine, job: Mapping[str, Any], pod: Mapping[str, Any] | None) -> None:
    """A finished job: make sure its pod is not left running, and apply its TTL."""
    if pod is not None and pod_outcome(pod).state in ("pending", "running"):
        m.d.delete_pod = pod["metadata"]["name"]
    ttl = _raw_ttl(job)
    if ttl is not None:
        finished_at = parse_timestamp(m.s.get("completionTime") or timestamp(m.now))
        if (m.now - finished_at).total_seconds() >= ttl:
            m.d.delete_job = True
            m.event("Normal", "TTLExpired", f"deleting the job {ttl} s after it finished (ttlSecondsAfterFinished)")


def decide(
    job: Mapping[str, Any],
    pod: Mapping[str, Any] | None,
    now: datetime,
    last_seen: Mapping[str, Any] | None = None,
) -> Decision:
    """The job's next status and actions, given its current pod (None: absent), the time, and the
    pod as last seen (a watch's DELETED event) when it is gone: that says why it went."""
    meta = job.get("metadata") or {}
    current = job.get("status") or {}
    status = copy.deepcopy({key: current[key] for key in OPERATOR_FIELDS if key in current})
    if meta.get("generation") is not None:
        status["observedGeneration"] = meta["generation"]
    decision = Decision(status=status)
    machine = _Machine(decision, meta.get("name", ""), now)

    try:
        decision.job = parse_job(_validation_view(job))
    except SpecError as exc:
        if status.get("phase") not in TERMINAL:
            machine.finish("Failed", "InvalidSpec", "; ".join(exc.messages))
    else:
        if status.get("phase") not in TERMINAL:
            _advance(machine, decision.job, pod, last_seen)

    if status.get("phase") in TERMINAL:
        _finished(machine, job, pod)
    return decision
