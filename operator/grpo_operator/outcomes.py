"""What the pods of a job came to, read from their status only: phases, reasons, exit codes and
conditions, never free text. Pure.

pod_outcome() reads one pod. attempt_outcome() reads an attempt: one pod, or with
spec.resources.nodes > 1 a gang of pods that train as one torchrun world, and folds theirs into
one outcome by these rules:

- Succeeded when pod index 0 succeeded: its rank 0 writes the final adapter, and the other pods
  exit 0 with it.
- Ended as soon as any pod failed or is gone. The cause is, first, a disruption on any pod of the
  attempt, even one still running: a gang whose member the cluster takes away fails with it (its
  peers lose the rendezvous and exit 1), and that collateral failure is not the job's fault. Then
  exit code 2 (bad input) on any pod: every rank reads the same spec, model and data. Then the
  first pod that failed.
- Terminating (to be waited for) while a pod is being deleted and none has ended.
- Running while every pod runs (a pod other than index 0 may already have exited 0); Pending
  otherwise.

For a single pod these rules give pod_outcome()'s answer: one pod is a gang of one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal, Mapping, Sequence

from grpo_operator.render import CONTAINER

EXIT_BAD_INPUT = 2
# A pod still Terminating this long after its deletionTimestamp (which already includes the
# grace period) is on a lost node and will never finish: its successor may start.
STUCK_TERMINATING_SECONDS = 300
# Pod status.reason values by which a kubelet or node controller ends a pod that did nothing
# wrong: node-pressure eviction, graceful node shutdown, node lost (older controllers).
DISRUPTED_POD_REASONS = ("Evicted", "Preempting", "Terminated", "Shutdown", "NodeShutdown", "NodeLost")
ALIVE = ("pending", "running")  # a pod that holds its node and may still train


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


@dataclass(frozen=True)
class AttemptOutcome(PodOutcome):
    pod: str = ""  # the pod the outcome is about: the one that ended the attempt, else index 0 or the first waiting
    running: int = 0  # the attempt's pods that run now


def parse_timestamp(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def timestamp(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


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
    """Where one pod stands.

    A pod that is gone was deleted by someone else (the operator deletes an attempt's pods only when
    it suspends or ends the job, or once the attempt has ended): a disruption, named by `last_seen`
    when that says more."""
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


def stuck(pod: Mapping[str, Any] | None, now: datetime) -> bool:
    """Terminating well past its deletion time (graceful period included): its node is lost."""
    deleting = ((pod or {}).get("metadata") or {}).get("deletionTimestamp")
    return bool(deleting) and (now - parse_timestamp(deleting)).total_seconds() > STUCK_TERMINATING_SECONDS


def settled_outcome(pod: Mapping[str, Any] | None, now: datetime, last_seen: Mapping[str, Any] | None = None
                    ) -> PodOutcome:
    """pod_outcome(), where a pod stuck terminating on a lost node counts as gone: it will never report."""
    outcome = pod_outcome(pod, last_seen)
    if outcome.state == "terminating" and stuck(pod, now):
        return PodOutcome("gone", "PodStuckTerminating", disruption="PodStuckTerminating")
    return outcome


def _evidence_of_disruption(outcome: PodOutcome, pod: Mapping[str, Any] | None) -> str | None:
    """A pod's sign that the cluster is taking it away, ended or not. A pod of the current attempt being
    deleted is one too: the operator never deletes those while the attempt runs."""
    if outcome.disruption:
        return outcome.disruption
    if outcome.state in ("running", "pending", "terminating"):
        return disruption_cause(pod) or ("PodDeleted" if outcome.state == "terminating" else None)
    return None


def attempt_outcome(
    names: Sequence[str],
    pods: Mapping[str, Mapping[str, Any]],
    now: datetime,
    last_seen: Mapping[str, Any] | None = None,
) -> AttemptOutcome:
    """The outcome of the attempt whose pods are `names` (by node index), given the job's pods by name
    and the last state of a pod that vanished (its watch's DELETED event), by the module's rules."""
    seen = (last_seen or {}).get("metadata", {}).get("name")
    outcomes = [settled_outcome(pods.get(name), now, last_seen if name == seen else None) for name in names]
    running = sum(outcome.state == "running" for outcome in outcomes)

    def about(index: int, **override: Any) -> AttemptOutcome:
        fields = {**vars(outcomes[index]), **override}
        return AttemptOutcome(**fields, pod=names[index], running=running)

    if outcomes[0].state == "succeeded":
        return about(0)
    ended = [i for i, outcome in enumerate(outcomes) if outcome.finished_badly]
    if ended:
        for i, outcome in enumerate(outcomes):
            cause = _evidence_of_disruption(outcome, pods.get(names[i]))
            if cause:
                state = outcome.state if outcome.finished_badly else outcomes[ended[0]].state
                return about(i, state=state, reason=cause, disruption=cause)
        bad_input = [i for i in ended if outcomes[i].exit_code == EXIT_BAD_INPUT]
        return about((bad_input or ended)[0])
    for i, outcome in enumerate(outcomes):
        if outcome.state == "terminating":
            return about(i)
    waiting = [i for i, o in enumerate(outcomes) if o.state != "running" and not (i and o.state == "succeeded")]
    return about(waiting[0]) if waiting else about(0)
