"""The bundle that carries vLLM to the GPU machine: what is trimmed, how it is split, and what the
machine refuses before it unpacks anything. A tiny fake bundle (wheels made here, no pip, no network)
goes through the same build and assemble code as the real one."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "bench" / "gpu_bundle.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_bundle", BUNDLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gpu_bundle = _load()
HERE = f"{sys.version_info.major}.{sys.version_info.minor}"
TORCH = importlib.metadata.version("torch").split("+")[0]
TRIM = ("fakevllm/_fa2_C.so", "fakevllm/third_party/headers", "fakebnb/lib_cuda1[12]*.so")
KEPT = ("fakevllm/__init__.py", "fakevllm/_fa3_C.so", "fakevllm/third_party/__init__.py",
        "fakebnb/lib_cuda130.so", "fakebnb/__init__.py")
TRIMMED = ("fakevllm/_fa2_C.so", "fakevllm/third_party/headers/cute.hpp", "fakebnb/lib_cuda118.so",
           "fakebnb/lib_cuda121.so")


def _wheel(folder: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for member, data in files.items():
            wheel.writestr(member, data)
        wheel.writestr(f"{name}-{version}.dist-info/METADATA", f"Name: {name}\nVersion: {version}\n")
    return path


def _fake_download(wheels: Path):
    def download(requirements, work, python):
        assert python == HERE
        return [next(wheels.glob(f"{r.split('==')[0]}-{r.split('==')[1]}-*.whl")) for r in requirements]
    return download


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A fake bundle of two wheels, incompressible enough to need several 64 KiB parts."""
    root = tmp_path_factory.mktemp("bundle")
    wheels = root / "wheels"
    wheels.mkdir()
    noise = os.urandom  # random bytes: xz cannot shrink them below the part size
    _wheel(wheels, "fakevllm", "0.26.0", {
        "fakevllm/__init__.py": b"VERSION = '0.26.0'\n", "fakevllm/_fa3_C.so": noise(150_000),
        "fakevllm/_fa2_C.so": noise(300_000), "fakevllm/third_party/__init__.py": b"",
        "fakevllm/third_party/headers/cute.hpp": b"// header\n" * 1000})
    _wheel(wheels, "fakebnb", "0.50.2", {
        "fakebnb/__init__.py": b"", "fakebnb/lib_cuda118.so": noise(1000), "fakebnb/lib_cuda121.so": noise(1000),
        "fakebnb/lib_cuda130.so": noise(20_000)})
    listing = root / "list.txt"
    listing.write_text("# why each is there\nfakevllm==0.26.0\n\nfakebnb==0.50.2  # the NF4 base\n")
    out = root / "parts"
    manifest = gpu_bundle.build(python=HERE, torch=TORCH, work=root / "work", out=out,
                                download=_fake_download(wheels), wheel_list=listing, trim=TRIM,
                                part_bytes=64 * 1024)
    return root / "work" / gpu_bundle.SITE, out, manifest


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_trim_list_removes_what_it_names_and_keeps_the_rest(built):
    site, _, _ = built
    for rel in TRIMMED:
        assert not (site / rel).exists(), rel
    for rel in KEPT:
        assert (site / rel).is_file(), rel
    assert (site / "fakebnb-0.50.2.dist-info" / "METADATA").is_file()


def test_a_trim_pattern_that_matches_nothing_fails_and_names_the_pattern(tmp_path):
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "_fa2_C.so").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"'vllm/_moe_C\*\.so' matches nothing"):
        gpu_bundle.apply_trim(tmp_path, ("vllm/_fa2_C.so", "vllm/_moe_C*.so"))


def test_parts_fit_the_limit_and_the_manifest_lists_each_with_its_sha256(built):
    _, out, manifest = built
    written = json.loads((out / "MANIFEST.json").read_text())
    assert written["python"] == HERE and written["torch"] == TORCH and written["vllm"] is None  # no vllm== line
    assert len(written["parts"]) >= 3
    for part in written["parts"]:
        path = out / part["name"]
        assert path.stat().st_size == part["bytes"] <= 64 * 1024
        assert gpu_bundle._sha256(path) == part["sha256"]
    assert sorted(p.name for p in out.glob("*.part*")) == [p["name"] for p in written["parts"]]
    assert not (out / gpu_bundle.ARCHIVE).exists()  # only the parts travel
    assert written["unpacked_bytes"] == sum(len(b) for b in _files(built[0]).values())
    assert {"archive_sha256", "built"} <= written.keys()


def test_assemble_reproduces_the_site_folder_exactly(built, tmp_path):
    site, out, _ = built
    assembled = gpu_bundle.assemble(out, tmp_path / "dest")
    assert assembled == tmp_path / "dest" / gpu_bundle.SITE
    assert _files(assembled) == _files(site)


def _stage(built, tmp_path: Path) -> Path:
    _, out, _ = built
    stage = tmp_path / "stage"
    stage.mkdir()
    for path in out.iterdir():
        (stage / path.name).write_bytes(path.read_bytes())
    return stage


def _assemble_cli(stage: Path, dest: Path, python: str = sys.executable) -> subprocess.CompletedProcess:
    return subprocess.run([python, str(BUNDLE), "assemble", str(stage), "--dest", str(dest)],
                          capture_output=True, text=True, timeout=120)


def test_a_corrupt_part_is_refused_by_name_before_anything_is_unpacked(built, tmp_path):
    stage = _stage(built, tmp_path)
    part = stage / f"{gpu_bundle.ARCHIVE}.part01"
    data = bytearray(part.read_bytes())
    data[100] ^= 0xFF
    part.write_bytes(bytes(data))
    run = _assemble_cli(stage, tmp_path / "dest")
    assert run.returncode == 2
    assert f"part {part.name} is corrupt" in run.stderr
    assert not (tmp_path / "dest").exists()


def test_a_missing_part_is_refused_by_name(built, tmp_path):
    stage = _stage(built, tmp_path)
    (stage / f"{gpu_bundle.ARCHIVE}.part02").unlink()
    run = _assemble_cli(stage, tmp_path / "dest")
    assert run.returncode == 2 and f"part {gpu_bundle.ARCHIVE}.part02 is missing" in run.stderr
    assert not (tmp_path / "dest").exists()


def test_a_destination_holding_the_parts_is_refused_before_it_is_emptied(built, tmp_path):
    """assemble empties its destination first: given the parts' own folder (or one above it) it would delete
    the bundle it is about to unpack."""
    stage = _stage(built, tmp_path)
    before = _files(stage)
    for dest in (stage, tmp_path):
        run = _assemble_cli(stage, dest)
        assert run.returncode == 2 and f"the destination {dest} holds the parts" in run.stderr
    assert _files(stage) == before


@pytest.mark.parametrize(("key", "theirs", "words"), [
    ("python", "3.9", ["built for Python 3.9", f"this is Python {HERE}"]),
    ("torch", "2.0.1", ["built for torch 2.0.1", f"this Python has torch {TORCH}"]),
])
def test_a_bundle_for_another_python_or_torch_is_refused_naming_both_versions(built, tmp_path, key, theirs, words):
    stage = _stage(built, tmp_path)
    manifest = json.loads((stage / "MANIFEST.json").read_text())
    manifest[key] = theirs
    (stage / "MANIFEST.json").write_text(json.dumps(manifest))
    run = _assemble_cli(stage, tmp_path / "dest")
    assert run.returncode == 2, run.stdout + run.stderr
    for word in words:
        assert word in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1  # one line, no traceback
    assert not (tmp_path / "dest").exists()


def test_assemble_needs_only_the_standard_library(built, tmp_path):
    """The GPU machine has no pydantic until the bundle is unpacked: `-S -I` hides every site-packages
    (and so torch: the refusal then says torch is not installed, which it must say without importing it)."""
    stage = _stage(built, tmp_path)
    run = subprocess.run([sys.executable, "-S", "-I", str(BUNDLE), "assemble", str(stage), "--dest",
                          str(tmp_path / "dest")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and f"built for torch {TORCH}, this Python has torch not installed" in run.stderr


def test_the_launcher_stops_on_a_refused_bundle_without_starting_the_suite(built, tmp_path):
    """bench/gpu_suite.sh on a stage with a corrupt part: the refusal, exit 2, no suite run."""
    repo = tmp_path / "repo"
    (repo / "bench").mkdir(parents=True)
    for name in ("gpu_suite.sh", "gpu_bundle.py"):
        (repo / "bench" / name).write_bytes((ROOT / "bench" / name).read_bytes())
    (repo / "bench" / "gpu_suite.py").write_text("raise SystemExit('the suite started')\n")
    stage = _stage(built, tmp_path)
    stage.rename(repo / ".gpu_stage")
    (repo / ".gpu_stage" / f"{gpu_bundle.ARCHIVE}.part00").write_bytes(b"not the part")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)  # the launcher calls python3, as on the machine
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(tmp_path / "out")}
    run = subprocess.run(["bash", str(repo / "bench" / "gpu_suite.sh")], capture_output=True, text=True,
                         env=env, timeout=120)
    assert run.returncode == 2
    assert f"part {gpu_bundle.ARCHIVE}.part00 is corrupt" in run.stderr
    assert "the suite started" not in run.stdout + run.stderr and not (tmp_path / "out").exists()


def test_the_bundle_list_pins_the_runtime_locks_versions_and_what_the_gpu_needs():
    wanted = dict(line.split("==") for line in gpu_bundle.read_wheel_list())
    assert {"vllm", "pydantic", "pydantic-core", "bitsandbytes", "peft", "trl", "datasets"} <= wanted.keys()
    pinned = {}
    for line in (ROOT / "requirements" / "runtime.lock").read_text().splitlines():
        if "==" in line and not line.startswith((" ", "#")):
            name, version = line.split("==")
            pinned[name.strip().lower().replace("_", "-")] = version.split()[0].rstrip("\\").strip()
    for name in ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "bitsandbytes", "peft",
                 "datasets", "multiprocess", "dill"):
        assert wanted[name] == pinned[name], f"bench/gpu_bundle.txt pins {name}=={wanted[name]}, the lock {pinned[name]}"
    # TRL as in the dev environment, whose GRPOTrainer the step-vs-TRL tests compare against
    assert wanted["trl"] == importlib.metadata.version("trl")
