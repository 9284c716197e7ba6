"""lifecycle.decide() for a job of several nodes: an attempt is a gang of pods that run, end and are
replaced together (pure, no cluster)."""

from __future__ import annotations

import copy

from grpo_operator.lifecycle import decide, timestamp
from test_lifecycle import T0, condition, make_job, pod, reasons, seconds


def gang_job(nodes=2, gpus=1, run_policy=None, **spec):
    return make_job(run_policy, resources={"nodes": nodes, "gpus": gpus},
                    training={"promptsPerStep": 4 * nodes * gpus}, **spec)


def member(attempt, index, phase="Running", **kwargs):
    return pod(name=f"j-attempt-{attempt}-{index}", phase=phase, **kwargs)


def preempted(attempt, index, phase="Running", **kwargs):
    body = member(attempt, index, phase, **kwargs)
    body["status"]["conditions"] = [{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler",
                                     "message": "Kubernetes default scheduler: preempted"}]
    return body


def step(job, pods, now, last_seen=None):
    """Decide, and apply the status as the operator would (merge patch: None removes a field)."""
    decision = decide(job, pods, now, last_seen)
    job = copy.deepcopy(job)
    merged = {**job.get("status", {}), **decision.status_patch(job.get("status"))}
    job["status"] = {key: value for key, value in merged.items() if value is not None}
    return job, decision


def running_gang(nodes=2, run_policy=None):
    job, _ = step(gang_job(nodes, run_policy=run_policy), [], T0)
    job, _ = step(job, [member(1, i) for i in range(nodes)], seconds(5))
    assert job["status"]["phase"] == "Running"
    return job


def test_a_new_gang_job_creates_every_pod_of_attempt_one():
    job, decision = step(gang_job(nodes=3, gpus=4), [], T0)
    assert decision.create_attempt == 1
    assert job["status"]["podName"] == "j-attempt-1-0"  # pod 0, where the rendezvous is
    assert (job["status"]["ranks"], job["status"]["runningPods"]) == (12, 0)
    assert reasons(decision) == ["PodCreated"]
    assert "j-attempt-1-0, j-attempt-1-1, j-attempt-1-2" in decision.events[0].message


def test_running_only_when_every_pod_runs():
    job, _ = step(gang_job(nodes=3), [], T0)
    job, decision = step(job, [member(1, 0), member(1, 1, "Pending", waiting="ImagePullBackOff"), member(1, 2)],
                         seconds(5))
    assert job["status"]["phase"] == "Pending" and job["status"]["runningPods"] == 2
    waiting = condition(job, "Running")
    assert (waiting["status"], waiting["reason"]) == ("False", "ImagePullBackOff")
    assert "2 of 3 pods" in waiting["message"] and "j-attempt-1-1" in waiting["message"]
    assert decision.events == []
    job, decision = step(job, [member(1, i) for i in range(3)], seconds(9))
    assert job["status"]["phase"] == "Running" and job["status"]["runningPods"] == 3
    assert condition(job, "Running")["status"] == "True" and reasons(decision) == ["Running"]


def test_one_failed_pod_fails_the_attempt_the_others_are_deleted_then_the_next_attempt_starts():
    job = running_gang(nodes=3)
    job, decision = step(job, [member(1, 0), member(1, 1, "Failed", exit_code=1), member(1, 2)], seconds(10))
    assert (job["status"]["attempt"], job["status"]["restarts"], job["status"]["disruptions"]) == (2, 1, 0)
    assert sorted(decision.delete_pods) == ["j-attempt-1-0", "j-attempt-1-2"]
    assert decision.create_attempt is None  # not while attempt 1's pods still run: they would write checkpoints
    assert "podName" not in job["status"] and job["status"]["phase"] == "Pending"
    assert condition(job, "Running")["reason"] == "PreviousAttemptEnding"
    assert reasons(decision) == ["Restarting"] and "pod j-attempt-1-1" in decision.events[0].message

    ending = [member(1, 0, deleting=True), member(1, 1, "Failed", exit_code=1), member(1, 2, deleting=True)]
    job, decision = step(job, ending, seconds(11))
    assert decision.create_attempt is None and decision.delete_pods == [] and decision.events == []

    # The pods the operator deleted are gone: that is no disruption, and the failure is not counted twice.
    job, decision = step(job, [member(1, 1, "Failed", exit_code=1)], seconds(20))
    assert decision.create_attempt == 2 and reasons(decision) == ["PodCreated"]
    assert job["status"]["podName"] == "j-attempt-2-0"
    assert (job["status"]["restarts"], job["status"]["disruptions"]) == (1, 0)
    job, decision = step(job, [member(1, 1, "Failed", exit_code=1), member(2, 0), member(2, 1), member(2, 2)],
                         seconds(30))
    assert job["status"]["phase"] == "Running" and decision.delete_pods == []


def test_an_evicted_pod_restarts_the_gang_without_counting_a_failure():
    job = running_gang(run_policy={"backoffLimit": 0})
    job, decision = step(job, [member(1, 0), member(1, 1, "Failed", reason="Evicted")], seconds(10))
    assert (job["status"]["restarts"], job["status"]["disruptions"]) == (0, 1)
    assert condition(job, "Disrupted")["reason"] == "Evicted"
    assert decision.delete_pods == ["j-attempt-1-0"] and reasons(decision) == ["Disrupted"]
    job, decision = step(job, [member(1, 1, "Failed", reason="Evicted")], seconds(12))
    assert decision.create_attempt == 2 and job["status"]["phase"] == "Pending"


def test_a_preempted_pods_peers_failing_with_it_is_still_a_disruption():
    """The scheduler marks pod 0 and deletes it; pod 1's trainer loses its peer and exits 1 first."""
    job = running_gang(run_policy={"backoffLimit": 0})
    job, decision = step(job, [preempted(1, 0, deleting=True), member(1, 1, "Failed", exit_code=1)], seconds(10))
    assert (job["status"]["restarts"], job["status"]["disruptions"]) == (0, 1)
    assert condition(job, "Disrupted")["reason"] == "PreemptionByScheduler"
    assert decision.create_attempt is None  # pod 0 still terminates
    job, decision = step(job, [member(1, 1, "Failed", exit_code=1)], seconds(70))
    assert decision.create_attempt == 2 and job["status"]["disruptions"] == 1


def test_a_vanished_pod_is_a_disruption_named_by_its_last_state():
    job = running_gang()
    job, decision = step(job, [member(1, 1)], seconds(10), last_seen=preempted(1, 0))
    assert job["status"]["disruptions"] == 1 and condition(job, "Disrupted")["reason"] == "PreemptionByScheduler"
    assert decision.delete_pods == ["j-attempt-1-1"]
    job, decision = step(job, [member(1, 1)], seconds(10))  # its deletion not seen yet: asked again
    assert decision.delete_pods == ["j-attempt-1-1"] and decision.events == [] and job["status"]["disruptions"] == 1


def test_exit_code_2_on_any_pod_is_bad_input_and_no_pod_is_left_running():
    job = running_gang(nodes=3)
    pods = [member(1, 0, "Failed", exit_code=1), member(1, 1), member(1, 2, "Failed", exit_code=2)]
    job, decision = step(job, pods, seconds(10))
    assert job["status"]["phase"] == "Failed" and condition(job, "Failed")["reason"] == "BadInput"
    assert "j-attempt-1-2" in condition(job, "Failed")["message"]
    assert decision.delete_pods == ["j-attempt-1-1"] and decision.create_attempt is None


def test_backoff_limit_counts_attempts_not_pods():
    job = running_gang(run_policy={"backoffLimit": 1})
    both_failed = [member(1, 0, "Failed", exit_code=1), member(1, 1, "Failed", exit_code=1)]
    job, decision = step(job, both_failed, seconds(10))
    assert decision.create_attempt == 2 and job["status"]["restarts"] == 1
    job, _ = step(job, both_failed + [member(2, 0), member(2, 1)], seconds(20))
    job, decision = step(job, both_failed + [member(2, 0), member(2, 1, "Failed", exit_code=137)], seconds(30))
    assert job["status"]["phase"] == "Failed" and condition(job, "Failed")["reason"] == "BackoffLimitExceeded"
    assert decision.delete_pods == ["j-attempt-2-0"]


def test_succeeded_when_pod_0_succeeded():
    job = running_gang(nodes=3)
    job, decision = step(job, [member(1, 0), member(1, 1, "Succeeded", exit_code=0), member(1, 2)], seconds(10))
    assert job["status"]["phase"] == "Running" and decision.events == []  # rank 0 still writes the adapter
    pods = [member(1, 0, "Succeeded", exit_code=0), member(1, 1, "Succeeded", exit_code=0), member(1, 2)]
    job, decision = step(job, pods, seconds(11))
    assert job["status"]["phase"] == "Succeeded" and "j-attempt-1-0" in condition(job, "Succeeded")["message"]
    assert decision.delete_pods == ["j-attempt-1-2"]  # a finished job holds no GPU (Kueue's quota is given back)
    assert job["status"]["runningPods"] == 1
    job, _ = step(job, pods[:2], seconds(12))
    assert job["status"]["runningPods"] == 0 and job["status"]["phase"] == "Succeeded"


def test_suspend_deletes_every_pod_and_resume_waits_for_all_of_them():
    job = running_gang()
    job["spec"]["runPolicy"] = {"suspend": True}
    job, decision = step(job, [member(1, 0), member(1, 1)], seconds(20))
    assert sorted(decision.delete_pods) == ["j-attempt-1-0", "j-attempt-1-1"]
    assert job["status"]["phase"] == "Suspended"
    job["spec"]["runPolicy"] = {"suspend": False}
    job, decision = step(job, [member(1, 1, deleting=True)], seconds(21))
    assert decision.create_attempt is None and job["status"]["phase"] == "Suspended"
    job, decision = step(job, [], seconds(30))
    assert decision.create_attempt == 2 and reasons(decision) == ["Resumed", "PodCreated"]
    assert job["status"]["restarts"] == 0 and job["status"]["startTime"] == timestamp(seconds(30))


def test_suspended_while_the_ended_attempt_drains():
    job = running_gang()
    job, _ = step(job, [member(1, 0), member(1, 1, "Failed", exit_code=1)], seconds(10))
    job["spec"]["runPolicy"] = {"suspend": True}
    job, decision = step(job, [member(1, 0), member(1, 1, "Failed", exit_code=1)], seconds(11))
    assert job["status"]["phase"] == "Suspended" and decision.delete_pods == ["j-attempt-1-0"]
    job["spec"]["runPolicy"] = {"suspend": False}
    job, decision = step(job, [member(1, 1, "Failed", exit_code=1)], seconds(40))
    assert decision.create_attempt == 3 and job["status"]["podName"] == "j-attempt-3-0"
    assert job["status"]["restarts"] == 1


def test_the_deadline_deletes_every_pod():
    job = running_gang(run_policy={"activeDeadlineSeconds": 60})
    job, decision = step(job, [member(1, 0), member(1, 1)], seconds(61))
    assert job["status"]["phase"] == "Failed" and condition(job, "Failed")["reason"] == "DeadlineExceeded"
    assert sorted(decision.delete_pods) == ["j-attempt-1-0", "j-attempt-1-1"]


def test_a_pod_stuck_terminating_on_a_lost_node_is_not_waited_for():
    job = running_gang()
    job, decision = step(job, [member(1, 0), member(1, 1, deleting=True)], seconds(299))
    assert decision.events == [] and decision.create_attempt is None
    job, decision = step(job, [member(1, 0), member(1, 1, deleting=True)], seconds(301))
    assert job["status"]["disruptions"] == 1 and condition(job, "Disrupted")["reason"] == "PodStuckTerminating"
    assert decision.delete_pods == ["j-attempt-1-0"]
    job, decision = step(job, [member(1, 1, deleting=True)], seconds(310))
    assert decision.create_attempt == 2
