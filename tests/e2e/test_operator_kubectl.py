"""A real kubectl (v1.33) against the API-server double, with the real operator running.

kubectl applies a GRPOJob, the operator creates its pod, `kubectl get grpojobs` prints the
CRD's printer columns (served as a Table by the double, as the API server does),
`kubectl explain` shows the spec's field descriptions, and `kubectl delete` cascades to the
pod through ownerReference garbage collection.

kubectl comes from `python tests/tools/fetch_k8s_binaries.py` (README set-up); without it
these tests fail, saying so.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))

from k8s_doubles import eventually, stored, stored_all  # noqa: E402
from k8s_fixtures import *  # noqa: E402,F403  (apiserver, kubeconfig, operator, kubelet)
from local_kubelet import LocalKubelet  # noqa: E402

pytestmark = pytest.mark.asyncio

KUBECTL = Path(__file__).resolve().parents[2] / ".tools" / "bin" / "kubectl"

MANIFEST = """\
apiVersion: grpo.dev/v1alpha1
kind: GRPOJob
metadata:
  name: kubectl-demo
spec:
  model:
    name: HuggingFaceTB/SmolLM2-135M-Instruct
  dataset:
    source: builtin:arithmetic
  rewards:
    - name: answer
      function: builtin:exact_answer
  training:
    maxSteps: 10
  output:
    uri: s3://grpo-runs/kubectl-demo
"""


@pytest.fixture
def kubectl_binary() -> Path:
    if not os.access(KUBECTL, os.X_OK):
        pytest.fail(f"{KUBECTL} is missing: run `python tests/tools/fetch_k8s_binaries.py` first (README set-up)")
    return KUBECTL


@pytest.fixture
def kubectl(kubectl_binary: Path, kubeconfig: Path, tmp_path: Path):
    """`await kubectl("get", "grpojobs")` -> stdout; fails the test on a non-zero exit."""
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),  # its discovery cache, not the user's
        "KUBECONFIG": str(kubeconfig),
    }

    async def run(*args: str, check: bool = True) -> str:
        # Asynchronously: the double serves kubectl from this very event loop.
        process = await asyncio.create_subprocess_exec(
            str(kubectl_binary), *args, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), timeout=60)
        if check and process.returncode != 0:
            pytest.fail(f"kubectl {' '.join(args)} exited {process.returncode}:\n{err.decode()}")
        return out.decode() + (err.decode() if not check else "")

    return run


def job_status(apiserver) -> dict:
    return (stored(apiserver, "grpo.dev/v1alpha1/grpojobs", "default", "kubectl-demo") or {}).get("status") or {}


async def test_apply_get_delete_with_real_kubectl(apiserver, operator, kubectl, kubeconfig, tmp_path):
    manifest = tmp_path / "grpojob.yaml"
    manifest.write_text(MANIFEST)
    async with LocalKubelet(str(apiserver.url), root=tmp_path / "kubelet", run=False), operator():
        out = await kubectl("apply", "-f", str(manifest))
        assert "grpojob.grpo.dev/kubectl-demo created" in out
        await eventually(lambda: job_status(apiserver).get("phase") == "Running")

        # The runtime's progress report, as the pod's sink would patch it.
        progress = {"status": {"progress": {"step": 3, "totalSteps": 10, "reward": 0.625,
                                            "eval": {"step": 2, "accuracy": 0.375}}}}
        response = await apiserver.patch(
            "/apis/grpo.dev/v1alpha1/namespaces/default/grpojobs/kubectl-demo/status",
            data=json.dumps(progress), headers={"Content-Type": "application/merge-patch+json"},
        )
        assert response.status == 200

        table = (await kubectl("get", "grpojobs")).splitlines()
        assert table[0].split() == ["NAME", "PHASE", "GPUS", "STEP", "REWARD", "EVAL", "AGE"]
        assert table[1].split()[:6] == ["kubectl-demo", "Running", "1", "3", "0.625", "0.375"]

        wide = (await kubectl("get", "grpo", "-o", "wide")).splitlines()  # the short name
        assert wide[0].split() == ["NAME", "PHASE", "GPUS", "STEP", "TOTAL", "REWARD", "EVAL", "RESTARTS",
                                   "DISRUPTIONS", "POD", "AGE"]
        assert wide[1].split()[:10] == ["kubectl-demo", "Running", "1", "3", "10", "0.625", "0.375", "0", "0",
                                        "kubectl-demo-attempt-1"]

        explained = await kubectl("explain", "grpojob.spec.generation.numGenerations")
        assert "Completions sampled per prompt (the GRPO group size G)." in explained

        pods = await kubectl("get", "pods", "-l", "grpo.dev/job-name=kubectl-demo", "-o", "name")
        assert pods.split() == ["pod/kubectl-demo-attempt-1"]

        out = await kubectl("delete", "-f", str(manifest), "--timeout=60s")
        assert 'grpojob.grpo.dev "kubectl-demo" deleted' in out
        assert stored(apiserver, "grpo.dev/v1alpha1/grpojobs", "default", "kubectl-demo") is None
        await eventually(lambda: not stored_all(apiserver, "v1/pods", "default"))
        assert stored(apiserver, "v1/configmaps", "default", "kubectl-demo-spec") is None
        assert (await kubectl("get", "pods", "-o", "name")).strip() == ""
