"""pytest fixtures around the Kubernetes doubles; reusable from other test folders:

    sys.path.insert(0, str(Path(__file__).parents[1] / "operator"))
    from k8s_fixtures import *  # noqa: F403  (apiserver, kubeconfig, operator, kubelet, ...)

bare_apiserver  ApiServerDouble on a real local HTTP port with the bundled built-in resources only
apiserver   the same, with the GRPOJob CRD created (as `helm install` does)
kubeconfig  a kubeconfig file for it, exported as $KUBECONFIG (kopf, kubernetes client, kubectl)
operator    a factory: `async with operator(**settings) as memo:` runs the real operator (the
            supervisor, which runs kopf) in this loop; memo.supervisor is that supervisor
kubelet     LocalKubelet watching the double's pods: runs their commands as local processes
            (`grpo train /etc/grpo/job.yaml` becomes `python -m grpo_runtime.cli train <dir>/job.yaml`
            with the pod's env, so the runtime's status sink reaches the double through $KUBECONFIG)

The whole path, as an end-to-end test would write it (real processes: no looptime):

    async def test_train(apiserver, operator, kubelet):
        async with operator(s3_endpoint=moto_url):           # spec.output.endpoint default
            await apiserver.post("/apis/grpo.dev/v1alpha1/namespaces/default/grpojobs", json=job)
            await eventually(lambda: phase(...) == "Succeeded", timeout=600)
        kubelet.log("default", "<job>-attempt-1")            # what `grpo train` printed
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import kmock
import pytest
import pytest_asyncio

from grpo_operator.crd import crd
from grpo_operator.metrics import Metrics
from grpo_operator.settings import Settings
from k8s_doubles import ApiServerDouble, loop_clock, operator_task, write_kubeconfig
from local_kubelet import LocalKubelet

__all__ = ["bare_apiserver", "apiserver", "kubeconfig", "operator", "kubelet"]


@pytest_asyncio.fixture
async def bare_apiserver() -> AsyncIterator[ApiServerDouble]:
    async with ApiServerDouble() as server, kmock.Server(server):
        with warnings.catch_warnings():  # kmock 0.8 reads its bundle with a deprecated importlib call
            warnings.simplefilter("ignore", DeprecationWarning)
            server.resources.load_bundled()
        yield server


@pytest_asyncio.fixture
async def apiserver(bare_apiserver: ApiServerDouble) -> ApiServerDouble:
    response = await bare_apiserver.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", json=crd())
    assert response.status == 201, await response.text()
    return bare_apiserver


@pytest.fixture
def kubeconfig(bare_apiserver: ApiServerDouble, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import kubernetes.config.kube_config

    path = write_kubeconfig(tmp_path / "kubeconfig", str(bare_apiserver.url))
    monkeypatch.setenv("KUBECONFIG", str(path))
    # The sync client reads $KUBECONFIG once, at import; kopf's default login (login_via_client)
    # then loads that stale path. A test process sees many servers: point it at this one.
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))
    return path


@pytest.fixture
def operator(kubeconfig: Path) -> Callable[..., Any]:
    """`async with operator(namespaces=("default",), **Settings fields) as memo:`; memo.metrics etc."""

    @contextlib.asynccontextmanager
    async def run(namespaces: tuple[str, ...] = ("default",), **fields: Any) -> AsyncIterator[Any]:
        import kopf

        settings = Settings(namespaces=namespaces, health_port=0, clock=loop_clock(), **fields)
        memo = kopf.Memo(settings=settings, metrics=Metrics())
        async with operator_task(settings=settings, memo=memo) as supervisor:
            memo.supervisor = supervisor
            yield memo

    return run


@pytest_asyncio.fixture
async def kubelet(bare_apiserver: ApiServerDouble, kubeconfig: Path, tmp_path: Path) -> AsyncIterator[LocalKubelet]:
    async with LocalKubelet(str(bare_apiserver.url), root=tmp_path / "kubelet", env={"KUBECONFIG": str(kubeconfig)}) as k:
        yield k
