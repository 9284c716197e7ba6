"""Operator settings from the environment, and `grpo operator` as the chart runs it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import pytest

from grpo_operator.crd import crd
from grpo_operator.main import run_operator
from grpo_operator.metrics import Metrics
from grpo_operator.settings import DEFAULT_RUNTIME_IMAGE, Settings, SettingsError
from k8s_doubles import eventually, stored

pytestmark = pytest.mark.asyncio


async def test_defaults():
    settings = Settings.from_env({})
    assert settings.clusterwide and settings.namespaces == ()
    assert settings.log_level == "INFO"
    assert settings.liveness_endpoint == "http://0.0.0.0:8080/healthz"
    assert settings.metrics_port == 0
    assert settings.runtime_image == DEFAULT_RUNTIME_IMAGE == "ghcr.io/grpo-dev/grpo-runtime:0.1.0"
    assert settings.s3_endpoint is None


async def test_every_variable():
    settings = Settings.from_env({
        "GRPO_WATCH_NAMESPACES": " team-a, team-b ,", "GRPO_LOG_LEVEL": "debug", "GRPO_HEALTH_PORT": "0",
        "GRPO_METRICS_PORT": "9090", "GRPO_RUNTIME_IMAGE": "reg/rt:2", "GRPO_S3_ENDPOINT": "http://minio:9000",
    })
    assert settings.namespaces == ("team-a", "team-b") and not settings.clusterwide
    assert settings.log_level == "DEBUG"
    assert settings.liveness_endpoint is None
    assert settings.metrics_port == 9090
    assert (settings.runtime_image, settings.s3_endpoint) == ("reg/rt:2", "http://minio:9000")
    assert Settings.from_env({"GRPO_MODEL_CACHE": " shared-models "}).model_cache == "shared-models"


@pytest.mark.parametrize("env, message", [
    ({"GRPO_HEALTH_PORT": "http"}, "GRPO_HEALTH_PORT: must be a port number"),
    ({"GRPO_METRICS_PORT": "70000"}, "GRPO_METRICS_PORT: must be between 0 and 65535"),
    ({"GRPO_LOG_LEVEL": "LOUD"}, "GRPO_LOG_LEVEL: must be one of"),
])
async def test_bad_variables_are_named(env, message):
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)


async def test_bad_settings_exit_2_with_the_message(monkeypatch, capsys):
    monkeypatch.setenv("GRPO_HEALTH_PORT", "eighty")
    assert run_operator() == 2
    assert "GRPO_HEALTH_PORT" in capsys.readouterr().err


async def test_metrics_count_jobs_by_phase_and_pods_created():
    metrics = Metrics()
    metrics.job_phase("ns", "a", "Running")
    metrics.job_phase("ns", "b", "Running")
    metrics.job_phase("ns", "b", "Failed")
    metrics.pod_created()
    metrics.job_phase("ns", "c", "Pending")
    metrics.job_phase("ns", "c", None)
    text = metrics.text()
    assert 'grpo_jobs{phase="Running"} 1.0' in text
    assert 'grpo_jobs{phase="Failed"} 1.0' in text
    assert 'grpo_jobs{phase="Pending"} 0.0' in text
    assert "grpo_pods_created_total 1.0" in text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_grpo_operator_waits_for_its_crd_serves_health_and_metrics_and_stops_cleanly(bare_apiserver, kubeconfig):
    """The chart's command, `grpo operator`, in a process of its own, configured by env only,
    started before its CRD exists (GitOps sync order, helm install --skip-crds)."""
    apiserver = bare_apiserver
    health, metrics = free_port(), free_port()
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "GRPO_WATCH_NAMESPACES": "default",
           "GRPO_HEALTH_PORT": str(health), "GRPO_METRICS_PORT": str(metrics),
           "GRPO_RUNTIME_IMAGE": "registry.local/grpo-runtime:test"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "grpo_runtime.cli", "operator", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with aiohttp.ClientSession() as http:
            async def get(url: str) -> tuple[int, str]:
                try:
                    async with http.get(url) as response:
                        return response.status, await response.text()
                except aiohttp.ClientError:
                    return 0, ""

            async def wait_for(url: str, status: int = 200) -> str:
                for _ in range(300):
                    answer, text = await get(url)
                    if answer == status:
                        return text
                    await asyncio.sleep(0.1)
                raise AssertionError(f"{url} never answered {status}")

            await wait_for(f"http://127.0.0.1:{health}/healthz")  # alive ...
            not_ready = json.loads(await wait_for(f"http://127.0.0.1:{health}/readyz", 503))  # ... not ready
            assert not_ready["reason"] == "CRDMissing"
            response = await apiserver.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", json=crd())
            assert response.status == 201
            ready = json.loads(await wait_for(f"http://127.0.0.1:{health}/readyz"))
            assert ready == {"ready": True, "reason": "CRDEstablished",
                             "message": "CustomResourceDefinition grpojobs.grpo.dev is established"}
            job = {"apiVersion": "grpo.dev/v1alpha1", "kind": "GRPOJob", "metadata": {"name": "proc"},
                   "spec": {"model": {"name": "tiny"}, "dataset": {"source": "builtin:arithmetic"},
                            "rewards": [{"name": "a", "function": "builtin:exact_answer"}]}}
            response = await apiserver.post("/apis/grpo.dev/v1alpha1/namespaces/default/grpojobs", json=job)
            assert response.status == 201
            pod = await eventually(lambda: stored(apiserver, "v1/pods", "default", "proc-attempt-1"))
            assert pod["spec"]["containers"][0]["image"] == "registry.local/grpo-runtime:test"
            text = await wait_for(f"http://127.0.0.1:{metrics}/metrics")
            assert "grpo_pods_created_total 1.0" in text
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    log = output.decode()
    assert process.returncode == 0, log[-3000:]
    assert "Activity 'cleanup' succeeded" in log and log.rstrip().endswith("grpo_operator: stopped")
    assert " ERROR " not in log and "Traceback" not in log, log[-3000:]
