"""The local kubelet double: pods of the API-server double run as local processes.

Real processes take real time, so these tests run on the real clock (no looptime).
"""

from __future__ import annotations

import base64
import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest

from k8s_doubles import eventually, stored
from local_kubelet import LocalKubelet

pytestmark = pytest.mark.asyncio

PY = sys.executable


async def create(apiserver, path: str, body: dict[str, Any]) -> None:
    response = await apiserver.post(path, json=body)
    assert response.status == 201, await response.text()


async def create_secret(apiserver, name: str, values: dict[str, str]) -> None:
    await create(apiserver, "/api/v1/namespaces/default/secrets", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in values.items()},
    })


async def create_pod(apiserver, name: str, command: list[str], **container: Any) -> None:
    await create(apiserver, "/api/v1/namespaces/default/pods", {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "main", "image": "local", "command": command, **container}],
            "volumes": [{"name": "cfg", "configMap": {"name": "cfg"}}, {"name": "work", "emptyDir": {}}],
        },
    })


def pod(apiserver, name: str) -> dict[str, Any]:
    return stored(apiserver, "v1/pods", "default", name) or {}


def terminated(apiserver, name: str) -> dict[str, Any] | None:
    statuses = pod(apiserver, name).get("status", {}).get("containerStatuses") or [{}]
    return statuses[0].get("state", {}).get("terminated")


SCRIPT = """
import os, pathlib, sys
print("config:", pathlib.Path(sys.argv[1]).read_text())
print("secret:", os.environ["TOKEN"], "plain:", os.environ["PLAIN"], "ns:", os.environ["NS"])
print("device:", os.environ["GRPO_DEVICE"])
pathlib.Path("out.txt").write_text("written in the workingDir")
"""


async def test_runs_the_pod_command_with_its_env_volumes_and_reports_success(apiserver, kubelet):
    await create(apiserver, "/api/v1/namespaces/default/configmaps", {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"greeting.txt": "hello"}})
    await create_secret(apiserver, "tok", {"TOKEN": "t0ken"})
    await create_pod(
        apiserver, "p1", [PY, "-c", SCRIPT, "/etc/cfg/greeting.txt"],
        workingDir="/work",
        env=[{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "tok", "key": "TOKEN"}}},
             {"name": "PLAIN", "value": "p"},
             {"name": "GRPO_DEVICE", "value": "cuda"},
             {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}],
        volumeMounts=[{"name": "cfg", "mountPath": "/etc/cfg"}, {"name": "work", "mountPath": "/work"}],
    )
    await eventually(lambda: pod(apiserver, "p1").get("status", {}).get("phase") == "Succeeded")
    assert terminated(apiserver, "p1")["exitCode"] == 0
    log = kubelet.log("default", "p1")
    assert "config: hello" in log
    assert "secret: t0ken plain: p ns: default" in log
    assert "device: cpu" in log  # the GPU the pod requires is, on this stand-in node, the CPU
    assert (kubelet.pod_dir("default", "p1") / "volumes" / "work" / "out.txt").exists()


async def test_mount_paths_in_arguments_are_rewritten(apiserver, kubelet):
    await create(apiserver, "/api/v1/namespaces/default/configmaps", {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"job.yaml": "kind: X"}})
    await create_pod(apiserver, "p2", [PY, "-c", "import sys; print(open(sys.argv[1]).read())", "/etc/grpo/job.yaml"],
                     volumeMounts=[{"name": "cfg", "mountPath": "/etc/grpo"}])
    await eventually(lambda: terminated(apiserver, "p2"))
    assert terminated(apiserver, "p2")["exitCode"] == 0
    assert "kind: X" in kubelet.log("default", "p2")


async def test_host_paths_stay_host_paths_wherever_the_checkout_lives(apiserver, kubelet):
    """Volumes mounted at the very top-level folders that hold this interpreter and this checkout
    (as /work or /home may be on some machine): the interpreter still runs, and only the pod's
    own path argument is rewritten into its volume."""
    tops = sorted({"/" + Path(PY).parts[1], "/" + Path(__file__).resolve().parts[1]})
    await create(apiserver, "/api/v1/namespaces/default/pods", {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p6"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{
                "name": "main", "image": "local", "workingDir": tops[0],
                "command": [PY, "-c", "import os, sys; open(sys.argv[1], 'w').write(os.getcwd())",
                            f"{tops[0]}/pod-file.txt"],
                "volumeMounts": [{"name": f"v{i}", "mountPath": top} for i, top in enumerate(tops)],
            }],
            "volumes": [{"name": f"v{i}", "emptyDir": {}} for i in range(len(tops))],
        },
    })
    await eventually(lambda: terminated(apiserver, "p6"))
    assert terminated(apiserver, "p6")["exitCode"] == 0, kubelet.log("default", "p6")
    written = kubelet.pod_dir("default", "p6") / "volumes" / "v0" / "pod-file.txt"
    assert written.read_text() == str(written.parent)  # the workingDir is the volume too


async def test_non_zero_exit_fails_the_pod_with_its_exit_code(apiserver, kubelet):
    await create(apiserver, "/api/v1/namespaces/default/configmaps", {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {}})
    await create_pod(apiserver, "p3", [PY, "-c", "raise SystemExit(3)"])
    await eventually(lambda: pod(apiserver, "p3").get("status", {}).get("phase") == "Failed")
    assert terminated(apiserver, "p3")["exitCode"] == 3
    assert terminated(apiserver, "p3")["reason"] == "Error"


async def test_missing_secret_waits_like_a_kubelet(apiserver, kubelet):
    await create(apiserver, "/api/v1/namespaces/default/configmaps", {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {}})
    await create_pod(apiserver, "p4", [PY, "-c", "import os; print(os.environ['K'])"],
                     env=[{"name": "K", "valueFrom": {"secretKeyRef": {"name": "late", "key": "K"}}}])

    def waiting_reason():
        statuses = pod(apiserver, "p4").get("status", {}).get("containerStatuses") or [{}]
        return statuses[0].get("state", {}).get("waiting", {}).get("reason")

    await eventually(lambda: waiting_reason() == "CreateContainerConfigError")
    await create_secret(apiserver, "late", {"K": "arrived"})
    await eventually(lambda: terminated(apiserver, "p4"))
    assert "arrived" in kubelet.log("default", "p4")


async def test_deleting_the_pod_kills_its_process(apiserver, kubelet):
    await create(apiserver, "/api/v1/namespaces/default/configmaps", {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {}})
    await create_pod(apiserver, "p5", [PY, "-c", "import time; time.sleep(600)"])
    await eventually(lambda: ("default", "p5") in kubelet.processes)
    response = await apiserver.delete("/api/v1/namespaces/default/pods/p5")
    assert response.status == 200
    process = kubelet.processes[("default", "p5")]
    await eventually(lambda: process.returncode is not None, timeout=10)


async def test_secret_values_never_reach_status_events_or_logs(apiserver, operator, kubeconfig, tmp_path, caplog):
    """The operator passes a secretKeyRef; only the kubelet (and the process) ever see the values."""
    caplog.set_level(logging.DEBUG)
    values = {"AWS_ACCESS_KEY_ID": "AKIA-very-secret-id", "AWS_SECRET_ACCESS_KEY": "s3cr3t/Value+xyz"}
    await create_secret(apiserver, "s3-creds", values)
    check = "import os,sys; sys.exit(0 if os.environ['AWS_SECRET_ACCESS_KEY'] == 's3cr3t/Value+xyz' else 3)"
    job = {
        "apiVersion": "grpo.dev/v1alpha1", "kind": "GRPOJob", "metadata": {"name": "creds"},
        "spec": {"model": {"name": "tiny"}, "dataset": {"source": "builtin:arithmetic"},
                 "rewards": [{"name": "a", "function": "builtin:exact_answer"}],
                 "output": {"uri": "s3://b/p", "credentialsSecret": "s3-creds"}},
    }
    async with LocalKubelet(str(apiserver.url), root=tmp_path / "k", argv=lambda pod: [PY, "-c", check]) as kubelet:
        async with operator():
            await create(apiserver, "/apis/grpo.dev/v1alpha1/namespaces/default/grpojobs", job)
            await eventually(lambda: (stored(apiserver, "grpo.dev/v1alpha1/grpojobs", "default", "creds") or {})
                             .get("status", {}).get("phase") == "Succeeded")
        assert kubelet.exit_codes[("default", "creds-attempt-1")] == 0  # the process did get the values
    seen = json.dumps([obj.raw for obj in apiserver.objects.values() if not obj.deleted and
                       obj.get("kind") != "Secret"]) + caplog.text
    for value in values.values():
        assert value not in seen
        assert base64.b64encode(value.encode()).decode() not in seen


async def test_pods_named_through_a_headless_service_resolve_to_this_host(apiserver, kubelet):
    """The stand-in for cluster DNS: where every pod is a local process, a pod's DNS name is 127.0.0.1."""
    await create(apiserver, "/api/v1/namespaces/default/services", {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "gang-nodes"},
        "spec": {"clusterIP": "None", "selector": {"job": "gang"}, "publishNotReadyAddresses": True}})
    await create(apiserver, "/api/v1/namespaces/default/services", {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "virtual"},
        "spec": {"clusterIP": "10.0.0.7", "selector": {"job": "gang"}, "ports": [{"port": 80}]}})

    async def create_member(name: str, env: list[dict[str, str]], command: list[str]) -> None:
        await create(apiserver, "/api/v1/namespaces/default/pods", {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"job": "gang"}},
            "spec": {"restartPolicy": "Never", "hostname": name, "subdomain": "gang-nodes",
                     "containers": [{"name": "main", "image": "local", "command": command, "env": env}]}})

    await create_member("m-0", [], [PY, "-c", "import time; time.sleep(600)"])
    await eventually(lambda: pod(apiserver, "m-0").get("status", {}).get("phase") == "Running")
    names = {"MASTER": "m-0.gang-nodes.default.svc", "FQDN": "m-0.gang-nodes.default.svc.cluster.local",
             "NOBODY": "m-9.gang-nodes.default.svc", "VIRTUAL": "m-0.virtual.default.svc", "PLAIN": "example.com"}
    script = "import json, os; print(json.dumps({k: os.environ[k] for k in %r}))" % sorted(names)
    await create_member("m-1", [{"name": k, "value": v} for k, v in names.items()], [PY, "-c", script])
    await eventually(lambda: terminated(apiserver, "m-1"))
    resolved = json.loads(kubelet.log("default", "m-1"))
    assert resolved == {"MASTER": "127.0.0.1", "FQDN": "127.0.0.1", "NOBODY": names["NOBODY"],
                        "VIRTUAL": names["VIRTUAL"], "PLAIN": "example.com"}


CHILD = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(child.pid, flush=True)
time.sleep(600)
"""


async def pod_with_a_child(apiserver, kubelet, name: str) -> int:
    """A pod whose container starts a child process (as torchrun starts its ranks); the child's pid."""
    await create(apiserver, "/api/v1/namespaces/default/pods", {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"restartPolicy": "Never",
                 "containers": [{"name": "main", "image": "local", "command": [PY, "-c", CHILD]}]}})
    return int(await eventually(lambda: kubelet.log("default", name).strip()))


async def test_killing_a_container_kills_every_process_of_it_with_code_137(apiserver, kubelet):
    """As a container runtime: no child (a torchrun rank) outlives its container, and SIGKILL reads 137."""
    child = await pod_with_a_child(apiserver, kubelet, "p7")
    kubelet.kill("default", "p7")
    await eventually(lambda: terminated(apiserver, "p7"))
    assert terminated(apiserver, "p7")["exitCode"] == 137 and pod(apiserver, "p7")["status"]["phase"] == "Failed"
    await eventually(lambda: not _alive(child), timeout=10)


async def test_a_deleted_pods_children_end_with_it(apiserver, kubelet):
    child = await pod_with_a_child(apiserver, kubelet, "p8")
    response = await apiserver.delete("/api/v1/namespaces/default/pods/p8")
    assert response.status == 200
    await eventually(lambda: not _alive(child), timeout=10)  # its parent took SIGTERM; the child went with it


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"  # a zombie has ended, its parent not yet told
    except FileNotFoundError:
        return False


LINGERING_LISTENER = """
import signal, socket, sys, time
server = socket.create_server(("127.0.0.1", int(sys.argv[1])))
def linger(*_):
    time.sleep(1.5)  # a trainer's graceful exit, still holding its port
    sys.exit(0)
signal.signal(signal.SIGTERM, linger)
print("listening", flush=True)
time.sleep(600)
"""


async def test_a_pod_waits_for_a_deleted_pod_that_held_its_port(apiserver, kubelet):
    """On a node each pod has its own network; here a gang's next attempt takes the port its last one held."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def create_listener(name: str) -> None:
        await create(apiserver, "/api/v1/namespaces/default/pods", {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": "Never", "containers": [{
                "name": "main", "image": "local", "command": [PY, "-c", LINGERING_LISTENER, str(port)],
                "ports": [{"name": "rendezvous", "containerPort": port}]}]}})

    await create_listener("old")
    await eventually(lambda: "listening" in kubelet.log("default", "old"))
    response = await apiserver.delete("/api/v1/namespaces/default/pods/old")
    assert response.status == 200
    await create_listener("new")
    await eventually(lambda: "listening" in kubelet.log("default", "new"), timeout=20)
    assert kubelet.processes[("default", "old")].returncode == 0  # it had let go of the port first
