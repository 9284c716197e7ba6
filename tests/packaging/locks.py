"""The images' lock files (requirements/*.lock, made by `uv pip compile`): reading them, and
checking them against pyproject.toml without resolving anything (offline)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.packaging.helpers import REPO

PYPROJECT = REPO / "pyproject.toml"
# The extras each image installs; its lock is requirements/<image>.lock (the Dockerfile's targets).
IMAGE_EXTRAS = {"operator": {"operator"}, "runtime": {"runtime", "gpu"}}
# Both images: Linux x86-64, CPython 3.12 (the runtime image's Ubuntu 24.04 python3 is 3.12.3).
MARKER_ENV = {
    "implementation_name": "cpython",
    "implementation_version": "3.12.3",
    "os_name": "posix",
    "platform_machine": "x86_64",
    "platform_python_implementation": "CPython",
    "platform_release": "",
    "platform_system": "Linux",
    "platform_version": "",
    "python_full_version": "3.12.3",
    "python_version": "3.12",
    "sys_platform": "linux",
}


def lock_path(image: str) -> Path:
    return REPO / "requirements" / f"{image}.lock"


def pins(lock: str) -> dict[str, Version]:
    """Normalised name -> pinned version (uv writes `name==version \\` at the start of a line)."""
    found = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)", lock, re.MULTILINE)
    return {canonicalize_name(name): Version(version) for name, version in found}


def lock_command(lock: str) -> str:
    """The `uv pip compile ...` line uv writes in the header: how to regenerate the lock."""
    match = re.search(r"^#\s+(uv pip compile .*)$", lock, re.MULTILINE)
    assert match, "the lock's header does not say which uv command made it"
    return match.group(1)


def lock_extras(lock: str) -> set[str]:
    return set(re.findall(r"--extra[ =](\S+)", lock_command(lock)))


def drift(pyproject: str, lock: str) -> list[str]:
    """What disagrees between pyproject.toml's text and a lock's text; [] when they agree.

    Every requirement the lock's extras (and the base dependencies) make, with markers true on
    the images' platform, must be pinned at a version its specifier allows; and no requirement
    anywhere in pyproject (other extras too: the test env installs them all) may exclude a version
    the lock pins, or tests would run a version the image does not have.
    """
    project = tomllib.loads(pyproject)["project"]
    groups = {"": project.get("dependencies", []), **project.get("optional-dependencies", {})}
    extras, pinned = lock_extras(lock), pins(lock)
    problems = [f"the lock was made from extra {e!r}, which pyproject.toml lacks" for e in extras - set(groups)]
    for group, requirements in groups.items():
        for line in requirements:
            req = Requirement(line)
            if req.marker and not req.marker.evaluate({**MARKER_ENV, "extra": group}):
                continue
            name, where = canonicalize_name(req.name), f"pyproject {group or 'dependencies'}: {req}"
            if name in pinned and not req.specifier.contains(pinned[name], prereleases=True):
                problems.append(f"{where}, but the lock pins {name}=={pinned[name]}")
            elif name not in pinned and (group == "" or group in extras):
                problems.append(f"{where}, not pinned in the lock")
    return problems
