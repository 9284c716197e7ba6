"""lifecycle.decide(): every phase transition of a GRPOJob, as a pure function (no cluster)."""

from __future__ import annotations

import copy
from datetime import datetime, timedelta, timezone

from grpo_operator.lifecycle import decide, pod_outcome, set_condition, timestamp

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)


def seconds(n: float) -> datetime:
    return T0 + timedelta(seconds=n)


def make_job(run_policy=None, output=None, meta_generation=1, **spec):
    body = {
        "apiVersion": "grpo.dev/v1alpha1",
        "kind": "GRPOJob",
        "metadata": {"name": "j", "namespace": "ns", "uid": "u-1", "generation": meta_generation},
        "spec": {
            "model": {"name": "m"},
            "dataset": {"source": "builtin:arithmetic"},
            "rewards": [{"name": "answer", "function": "builtin:exact_answer"}],
            "output": output if output is not None else {"uri": "s3://runs/j"},
            **spec,
        },
    }
    if run_policy:
        body["spec"]["runPolicy"] = run_policy
    return body


def pod(name="j-attempt-1", phase="Pending", exit_code=None, reason=None, waiting=None, deleting=False):
    status = {"phase": phase}
    if exit_code is not None:
        status["containerStatuses"] = [
            {"name": "trainer", "state": {"terminated": {"exitCode": exit_code, "reason": "Error"}}}
        ]
    if waiting:
        status["containerStatuses"] = [{"name": "trainer", "state": {"waiting": {"reason": waiting}}}]
    if reason:
        status["reason"] = reason
    meta = {"name": name, "namespace": "ns"}
    if deleting:
        meta["deletionTimestamp"] = timestamp(T0)
    return {"metadata": meta, "status": status}


def step(job, pod_, now):
    """Decide, and apply the status as the operator would (merge patch)."""
    decision = decide(job, pod_, now)
    job = copy.deepcopy(job)
    job["status"] = {**job.get("status", {}), **decision.status_patch(job.get("status"))}
    return job, decision


def condition(job, type_):
    return next(c for c in job["status"]["conditions"] if c["type"] == type_)


def reasons(decision):
    return [event.reason for event in decision.events]


def running_job(run_policy=None, output=None):
    job, _ = step(make_job(run_policy, output), None, T0)
    job, _ = step(job, pod(phase="Running"), seconds(5))
    return job


def test_new_job_creates_attempt_one():
    job, decision = step(make_job(), None, T0)
    assert decision.create_attempt == 1
    assert job["status"]["phase"] == "Pending"
    assert job["status"]["podName"] == "j-attempt-1"
    assert (job["status"]["attempt"], job["status"]["restarts"]) == (1, 0)
    assert job["status"]["startTime"] == timestamp(T0)
    assert job["status"]["observedGeneration"] == 1
    assert reasons(decision) == ["PodCreated"]
    assert condition(job, "OutputPersistent")["status"] == "True"


def test_same_inputs_same_answer_and_nothing_to_write():
    job, _ = step(make_job(), None, T0)
    job, first = step(job, pod(phase="Running"), seconds(5))
    again = decide(job, pod(phase="Running"), seconds(9))
    assert reasons(first) == ["Running"]
    assert again.status_patch(job["status"]) == {}
    assert again.events == [] and again.create_attempt is None and again.delete_pod is None


def test_invalid_spec_fails_with_the_field_path_and_no_pod():
    bad = make_job(generation={"maxPromptLength": 4000, "maxCompletionLength": 200})
    job, decision = step(bad, None, T0)
    assert decision.create_attempt is None and decision.job is None
    assert job["status"]["phase"] == "Failed"
    failed = condition(job, "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert "maxPromptLength + maxCompletionLength = 4200 exceeds model.maxSeqLength = 2048" in failed["message"]
    assert reasons(decision) == ["InvalidSpec"]
    assert job["status"]["completionTime"] == timestamp(T0)
    again = decide(job, None, seconds(60))
    assert again.events == [] and again.status_patch(job["status"]) == {}


def test_invalid_field_names_its_path():
    job, _ = step(make_job(generation={"numGenerations": 1}), None, T0)
    assert "spec.generation.numGenerations: must be >= 2, got 1" in condition(job, "Failed")["message"]


def test_pod_phases_map_to_job_phases():
    job, _ = step(make_job(), None, T0)
    job, decision = step(job, pod(phase="Pending", waiting="ImagePullBackOff"), seconds(1))
    assert job["status"]["phase"] == "Pending"
    assert condition(job, "Running")["reason"] == "ImagePullBackOff"
    job, decision = step(job, pod(phase="Running"), seconds(2))
    assert job["status"]["phase"] == "Running" and condition(job, "Running")["status"] == "True"
    job, decision = step(job, pod(phase="Succeeded", exit_code=0), seconds(3))
    assert job["status"]["phase"] == "Succeeded"
    assert condition(job, "Succeeded")["status"] == "True"
    assert condition(job, "Running")["status"] == "False"
    assert job["status"]["completionTime"] == timestamp(seconds(3))
    assert reasons(decision) == ["Succeeded"]


def test_failed_pod_starts_the_next_attempt_which_resumes():
    job = running_job()
    job, decision = step(job, pod(phase="Failed", exit_code=1), seconds(10))
    assert decision.create_attempt == 2
    assert job["status"]["podName"] == "j-attempt-2"
    assert (job["status"]["attempt"], job["status"]["restarts"]) == (2, 1)
    assert job["status"]["phase"] == "Pending"
    assert reasons(decision) == ["Restarting", "PodCreated"]
    assert "exit code 1" in decision.events[0].message and "restart 1 of 3" in decision.events[0].message
    # the old attempt's late events do not matter: the job looks at its current pod only
    again = decide(job, pod(name="j-attempt-2", phase="Pending"), seconds(11))
    assert again.create_attempt is None and again.events == []


def test_exit_code_2_is_bad_input_and_never_retried():
    job, decision = step(running_job(), pod(phase="Failed", exit_code=2), seconds(10))
    assert decision.create_attempt is None
    assert job["status"]["phase"] == "Failed"
    assert condition(job, "Failed")["reason"] == "BadInput"
    assert job["status"]["restarts"] == 0


def test_backoff_limit_exhausted_fails_with_the_last_reason():
    job = running_job(run_policy={"backoffLimit": 2})
    for attempt in (1, 2):
        failed = pod(name=f"j-attempt-{attempt}", phase="Failed", exit_code=137)
        job, decision = step(job, failed, seconds(10 * attempt))
        assert decision.create_attempt == attempt + 1
    job, decision = step(job, pod(name="j-attempt-3", phase="Failed", exit_code=1), seconds(40))
    assert decision.create_attempt is None
    assert job["status"]["phase"] == "Failed"
    failed = condition(job, "Failed")
    assert failed["reason"] == "BackoffLimitExceeded"
    assert "attempt 3" in failed["message"] and "exit code 1" in failed["message"]
    assert job["status"]["restarts"] == 2


def test_backoff_limit_zero_fails_at_the_first_failure():
    job, decision = step(running_job(run_policy={"backoffLimit": 0}), pod(phase="Failed", exit_code=1), seconds(9))
    assert job["status"]["phase"] == "Failed" and decision.create_attempt is None


def disrupted(reason="PreemptionByScheduler", **kwargs):
    """A pod the cluster took away: the DisruptionTarget condition the scheduler, the Eviction API,
    the taint manager or the kubelet set before it ends the pod."""
    body = pod(**kwargs)
    body["status"]["conditions"] = [{"type": "DisruptionTarget", "status": "True", "reason": reason,
                                     "message": "Kubernetes default scheduler: preempted"}]
    return body


def test_eviction_is_a_disruption_not_a_failure():
    job, decision = step(running_job(run_policy={"backoffLimit": 0}), pod(phase="Failed", reason="Evicted"), seconds(9))
    assert decision.create_attempt == 2
    assert (job["status"]["restarts"], job["status"]["disruptions"]) == (0, 1)
    assert condition(job, "Disrupted")["reason"] == "Evicted"
    assert reasons(decision) == ["Disrupted", "PodCreated"] and "Evicted" in decision.events[0].message


def test_vanished_pod_is_a_disruption():
    job, decision = step(running_job(run_policy={"backoffLimit": 0}), None, seconds(9))
    assert decision.create_attempt == 2 and job["status"]["disruptions"] == 1 and job["status"]["restarts"] == 0
    assert condition(job, "Disrupted")["reason"] == "PodDeleted"
    assert "PodDeleted" in decision.events[0].message


def test_a_deleted_pods_last_state_names_the_cause():
    """The pod's DELETED event carries its last state: a preemption, not just 'deleted'."""
    last = disrupted("PreemptionByScheduler", phase="Running")
    decision = decide(running_job(), None, seconds(9), last_seen=last)
    assert decision.create_attempt == 2
    assert decision.status["disruptions"] == 1
    assert next(c for c in decision.status["conditions"] if c["type"] == "Disrupted")["reason"] == "PreemptionByScheduler"
    older = disrupted("PreemptionByScheduler", name="j-attempt-0", phase="Running")  # not the current attempt's
    decision = decide(running_job(), None, seconds(9), last_seen=older)
    assert next(c for c in decision.status["conditions"] if c["type"] == "Disrupted")["reason"] == "PodDeleted"


def test_disruption_target_wins_over_the_exit_code():
    """A preempted or drained trainer dies of its SIGTERM (143): still a disruption."""
    for cause in ("PreemptionByScheduler", "EvictionByEvictionAPI", "DeletionByTaintManager", "TerminationByKubelet"):
        job, decision = step(running_job(run_policy={"backoffLimit": 0}),
                             disrupted(cause, phase="Failed", exit_code=143), seconds(9))
        assert decision.create_attempt == 2 and job["status"]["phase"] == "Pending", cause
        assert condition(job, "Disrupted")["reason"] == cause
        assert job["status"]["restarts"] == 0


def test_many_disruptions_never_fail_the_job_but_failures_still_count():
    job = running_job(run_policy={"backoffLimit": 1})
    for attempt in (1, 2, 3):
        job, decision = step(job, disrupted(name=f"j-attempt-{attempt}", phase="Failed", exit_code=143),
                             seconds(10 * attempt))
        assert decision.create_attempt == attempt + 1
        job, _ = step(job, pod(name=f"j-attempt-{attempt + 1}", phase="Running"), seconds(10 * attempt + 5))
    assert (job["status"]["restarts"], job["status"]["disruptions"]) == (0, 3)
    job, decision = step(job, pod(name="j-attempt-4", phase="Failed", exit_code=1), seconds(50))
    assert decision.create_attempt == 5 and job["status"]["restarts"] == 1  # a crash counts
    job, _ = step(job, pod(name="j-attempt-5", phase="Running"), seconds(55))
    job, _ = step(job, pod(name="j-attempt-5", phase="Failed", exit_code=1), seconds(60))
    assert job["status"]["phase"] == "Failed" and condition(job, "Failed")["reason"] == "BackoffLimitExceeded"
    assert job["status"]["disruptions"] == 3


def test_terminating_pod_is_waited_for_before_the_next_attempt():
    job = running_job()
    decision = decide(job, pod(phase="Running", deleting=True), seconds(9))
    assert decision.create_attempt is None and decision.events == []


def test_a_pod_stuck_terminating_on_a_lost_node_is_replaced():
    job = running_job()
    stuck = pod(phase="Running", deleting=True)  # deletionTimestamp = T0
    assert decide(job, stuck, seconds(299)).create_attempt is None
    decision = decide(job, stuck, seconds(301))
    assert decision.create_attempt == 2 and "PodStuckTerminating" in decision.events[0].message
    assert decision.status["disruptions"] == 1 and decision.status["restarts"] == 0  # its node was lost


def test_deadline_counts_while_a_pod_terminates():
    job = running_job(run_policy={"activeDeadlineSeconds": 60})
    job, decision = step(job, pod(phase="Running", deleting=True), seconds(61))
    assert job["status"]["phase"] == "Failed" and decision.delete_pod is None


def test_suspend_deletes_the_pod_and_resume_starts_a_new_attempt():
    job = running_job()
    job["spec"]["runPolicy"] = {"suspend": True}
    job, decision = step(job, pod(phase="Running"), seconds(20))
    assert decision.delete_pod == "j-attempt-1"
    assert job["status"]["phase"] == "Suspended"
    assert condition(job, "Suspended")["status"] == "True"
    assert reasons(decision) == ["Suspended"]

    job, decision = step(job, None, seconds(25))  # the pod is gone; still suspended
    assert decision.create_attempt is None and decision.events == []
    assert job["status"]["restarts"] == 0

    job["spec"]["runPolicy"] = {"suspend": False}
    job, decision = step(job, None, seconds(100))
    assert decision.create_attempt == 2
    assert job["status"]["phase"] == "Pending"
    assert job["status"]["startTime"] == timestamp(seconds(100))
    assert condition(job, "Suspended")["status"] == "False"
    assert reasons(decision) == ["Resumed", "PodCreated"]
    assert job["status"]["restarts"] == 0  # suspension is not a failure


def test_resume_waits_for_the_suspended_pod_to_terminate():
    job = running_job()
    job["spec"]["runPolicy"] = {"suspend": True}
    job, _ = step(job, pod(phase="Running"), seconds(20))
    job["spec"]["runPolicy"] = {"suspend": False}
    decision = decide(job, pod(phase="Running", deleting=True), seconds(21))
    assert decision.create_attempt is None


def test_created_suspended_waits_without_a_pod():
    job, decision = step(make_job(run_policy={"suspend": True}), None, T0)
    assert decision.create_attempt is None
    assert job["status"]["phase"] == "Suspended"
    assert "startTime" not in job["status"]
    job["spec"]["runPolicy"] = {"suspend": False}
    job, decision = step(job, None, seconds(30))
    assert decision.create_attempt == 1
    assert job["status"]["startTime"] == timestamp(seconds(30))


def test_active_deadline_fails_the_job_and_deletes_its_pod():
    job = running_job(run_policy={"activeDeadlineSeconds": 60})
    job, decision = step(job, pod(phase="Running"), seconds(59))
    assert job["status"]["phase"] == "Running"
    job, decision = step(job, pod(phase="Running"), seconds(60))
    assert job["status"]["phase"] == "Failed"
    assert condition(job, "Failed")["reason"] == "DeadlineExceeded"
    assert decision.delete_pod == "j-attempt-1"


def test_finished_job_never_leaves_its_pod_running():
    job, _ = step(running_job(), pod(phase="Failed", exit_code=2), seconds(10))
    assert decide(job, pod(phase="Running"), seconds(11)).delete_pod == "j-attempt-1"
    assert decide(job, pod(phase="Failed", exit_code=2), seconds(11)).delete_pod is None  # kept for its logs


def test_ttl_deletes_the_finished_job_after_its_time():
    job = running_job(run_policy={"ttlSecondsAfterFinished": 300})
    job, decision = step(job, pod(phase="Succeeded", exit_code=0), seconds(100))
    assert not decision.delete_job
    assert not decide(job, None, seconds(399)).delete_job
    late = decide(job, None, seconds(400))
    assert late.delete_job and reasons(late) == ["TTLExpired"]


def test_ttl_applies_to_invalid_jobs_too():
    bad = make_job(run_policy={"ttlSecondsAfterFinished": 0}, generation={"numGenerations": 1})
    assert decide(bad, None, T0).delete_job


def test_no_output_uri_warns_once_that_checkpoints_are_ephemeral():
    job, decision = step(make_job(output={}), None, T0)
    assert "EphemeralOutput" in reasons(decision)
    assert condition(job, "OutputPersistent")["status"] == "False"
    assert condition(job, "OutputPersistent")["reason"] == "NoOutputURI"
    job, decision = step(job, pod(phase="Running"), seconds(5))
    assert "EphemeralOutput" not in reasons(decision)


def test_observed_generation_follows_the_spec_generation():
    job, _ = step(make_job(), None, T0)
    job["metadata"]["generation"] = 2
    job, _ = step(job, pod(phase="Pending"), seconds(1))
    assert job["status"]["observedGeneration"] == 2


def test_last_transition_time_moves_only_when_the_status_changes():
    status: dict = {}
    set_condition(status, "Running", False, "PodCreated", "created", T0)
    set_condition(status, "Running", False, "ImagePullBackOff", "pulling", seconds(10))
    assert status["conditions"][0]["lastTransitionTime"] == timestamp(T0)
    assert status["conditions"][0]["reason"] == "ImagePullBackOff"
    set_condition(status, "Running", True, "PodRunning", "running", seconds(20))
    assert status["conditions"][0]["lastTransitionTime"] == timestamp(seconds(20))
    set_condition(status, "Running", True, "PodRunning", "running", seconds(30))
    assert status["conditions"][0]["lastTransitionTime"] == timestamp(seconds(20))


def test_running_condition_keeps_its_time_across_reconciles():
    job = running_job()
    since = condition(job, "Running")["lastTransitionTime"]
    job, _ = step(job, pod(phase="Running"), seconds(500))
    assert condition(job, "Running")["lastTransitionTime"] == since


def test_pod_outcome_reads_reasons_and_exit_codes_only():
    assert pod_outcome(None).state == "gone"
    assert pod_outcome(pod(phase="Failed", exit_code=137)).describe() == "Error, exit code 137"
    assert pod_outcome(pod(phase="Failed", reason="Evicted")).exit_code is None
    assert pod_outcome(pod(phase="Failed", reason="Evicted")).disruption == "Evicted"
    assert pod_outcome(pod(phase="Failed", exit_code=1)).disruption is None
    assert pod_outcome(pod(phase="Failed", reason="OOMKilled")).disruption is None  # the trainer's own fault
    assert pod_outcome(pod(phase="Unknown")).state == "pending"
