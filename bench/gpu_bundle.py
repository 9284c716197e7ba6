"""Carry vLLM and the wheels the lent GPU machine lacks to that machine, which has no network.

Every call to that machine carries the working tree plus named ignored paths, at most 64 MiB in all.
vLLM alone is a 304 MB wheel, so the wheels of bench/gpu_bundle.txt are unpacked here into one site
folder, trimmed of what a single sm_90 GPU never loads (TRIM), packed as tar.xz and split into parts
that each fit one call beside the tree. The machine collects the parts in .gpu_stage/ over several
calls and `assemble` puts the site folder back together there.

    python bench/gpu_bundle.py build --python 3.12 --torch 2.11.0 --out .gpu_parts   # here, with PyPI
    python3 bench/gpu_bundle.py assemble .gpu_stage                                  # there (gpu_suite.sh)
    python bench/gpu_bundle.py check SITE --python PY                                # the check alone

`assemble` needs only the standard library (pydantic and friends arrive in the bundle), and refuses a
bundle built for another Python or torch before it unpacks anything: a CPython 3.12 bundle of
compiled extensions imports garbage, or not at all, elsewhere.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEEL_LIST = ROOT / "bench" / "gpu_bundle.txt"
PART_BYTES = 58 * 2**20  # + the ~2.2 MiB tree stays under the device tool's 64 MiB per call
ARCHIVE = "grpo-bundle.tar.xz"
SITE = "site"  # the folder inside the archive (and under DEST) that goes on PYTHONPATH
DEFAULT_DEST = Path(tempfile.gettempdir()) / "grpo-bundle-site"
REHEARSAL_VENV = Path(os.environ.get("TMPDIR", "/tmp")) / "grpo-gpu-machine-venv"
# glibc of the machine's image is newer than 2.35; llguidance 1.7 has no wheel older than manylinux_2_31
PLATFORMS = [f"manylinux_2_{v}_x86_64" for v in (35, 34, 31, 28, 27, 24, 17)] + [
    "manylinux2014_x86_64", "manylinux1_x86_64"]

# What a single-GPU sm_90 run with LoRA, NF4, fp8 KV and sleep mode never loads, relative to the site
# folder. A pattern that matches nothing fails the build: a new vLLM layout must be looked at, not
# silently carried whole (it would no longer fit the calls).
TRIM = (
    "vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so",  # 305 MB; FA3 (_vllm_fa3_C) serves sm_90
    "vllm/_moe_C_stable_libtorch.abi3.so",  # mixture-of-experts kernels: our models are dense
    "vllm/_flashmla_C.abi3.so",  # MLA (DeepSeek) attention
    "vllm/_flashmla_extension_C.abi3.so",
    "vllm/_qutlass_C.abi3.so",  # FP4 (Blackwell) quantization; cuda.py imports it only if present
    "vllm/vllm-rs",  # the Rust front-end binary: the suite uses the Python LLM class in-process
    "vllm/third_party/deep_gemm",  # FP8 GEMM headers + one _C per Python; vLLM skips it when absent
    "vllm/third_party/fmha_sm100",  # sm_100 attention and its CUTLASS headers
    # bitsandbytes ships a library per CUDA/ROCm/XPU toolkit; torch 2.11.0+cu130 loads the cuda130 one
    "bitsandbytes/libbitsandbytes_cuda1[12]*.so",
    "bitsandbytes/libbitsandbytes_cuda132.so",
    "bitsandbytes/libbitsandbytes_rocm*.so",
    "bitsandbytes/libbitsandbytes_xpu*.so",
)


class Refused(Exception):
    """A bundle that must not be unpacked here; the message names what differs (exit 2)."""


# --- build ---------------------------------------------------------------------------------------


def read_wheel_list(path: Path = WHEEL_LIST) -> list[str]:
    """`name==version` lines, comments and blanks dropped."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def _wheel_matches(filename: str, requirement: str) -> bool:
    name, version = requirement.split("==")
    normal = name.lower().replace("-", "_").replace(".", "_")
    return filename.lower().startswith(f"{normal}-{version}-")


def pip_download(requirements: list[str], work: Path, python: str) -> list[Path]:
    """The wheel of each requirement for the target CPython on manylinux x86-64, no dependencies
    (the list is the whole set); a wheel already in `work` is reused."""
    work.mkdir(parents=True, exist_ok=True)
    missing = [r for r in requirements if not any(_wheel_matches(w.name, r) for w in work.glob("*.whl"))]
    if missing:
        platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
             "--python-version", python, "--implementation", "cp", *platforms, "-d", str(work), *missing],
            check=True,
        )
    wheels = []
    for requirement in requirements:
        found = [w for w in work.glob("*.whl") if _wheel_matches(w.name, requirement)]
        if not found:
            raise SystemExit(f"gpu-bundle: no wheel for {requirement} in {work}")
        wheels.append(sorted(found)[-1])
    return wheels


def unpack_wheels(wheels: Iterable[Path], site: Path) -> None:
    """A wheel is a zip laid out as site-packages; keep the executable bits (.so, binaries)."""
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            for info in archive.infolist():
                path = archive.extract(info, site)
                mode = info.external_attr >> 16
                if mode and not info.is_dir():
                    os.chmod(path, mode & 0o777)


def apply_trim(site: Path, patterns: Iterable[str] = TRIM) -> int:
    """Delete what each pattern matches; the bytes removed. A pattern matching nothing is an error."""
    removed = 0
    for pattern in patterns:
        matches = sorted(site.glob(pattern))
        if not matches:
            raise ValueError(f"trim pattern {pattern!r} matches nothing in {site}: has the layout changed?")
        for path in matches:
            removed += _size(path)
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return removed


def _size(path: Path) -> int:
    if path.is_file() or path.is_symlink():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file())


def pack(site: Path, out: Path, part_bytes: int = PART_BYTES) -> list[Path]:
    """site/ as one tar.xz (preset 9; multithreaded xz when installed, whose blocks also let `xz -d
    -T0` unpack in parallel), split into parts of at most `part_bytes`."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{ARCHIVE}.part*"):
        old.unlink()
    archive = out / ARCHIVE
    xz = shutil.which("xz")
    with archive.open("wb") as sink:
        if xz:
            proc = subprocess.Popen([xz, "-T0", "-9", "-c"], stdin=subprocess.PIPE, stdout=sink)
            with tarfile.open(fileobj=proc.stdin, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                tar.add(site, arcname=SITE)
            proc.stdin.close()
            if proc.wait():
                raise SystemExit(f"gpu-bundle: xz exited {proc.returncode}")
        else:
            with tarfile.open(fileobj=sink, mode="w|xz", preset=9, format=tarfile.PAX_FORMAT) as tar:
                tar.add(site, arcname=SITE)
    parts = []
    with archive.open("rb") as source:
        while chunk := source.read(part_bytes):
            part = out / f"{ARCHIVE}.part{len(parts):02d}"
            part.write_bytes(chunk)
            parts.append(part)
    archive.unlink()
    return parts


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(out: Path, parts: list[Path], *, python: str, torch: str, vllm: str | None,
                   unpacked_bytes: int) -> dict:
    whole, listed = hashlib.sha256(), []
    for part in parts:  # one read of each part for both digests
        digest = hashlib.sha256()
        with part.open("rb") as f:
            while chunk := f.read(2**20):
                digest.update(chunk)
                whole.update(chunk)
        listed.append({"name": part.name, "bytes": part.stat().st_size, "sha256": digest.hexdigest()})
    manifest = {
        "python": python,
        "torch": torch,
        "vllm": vllm,
        "archive": ARCHIVE,
        "archive_sha256": whole.hexdigest(),
        "unpacked_bytes": unpacked_bytes,
        "parts": listed,
        "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def build(*, python: str, torch: str, work: Path, out: Path,
          download: Callable[[list[str], Path, str], list[Path]] = pip_download,
          wheel_list: Path = WHEEL_LIST, trim: Iterable[str] = TRIM, part_bytes: int = PART_BYTES,
          check: Callable[[Path], None] | None = None) -> dict:
    """download -> unpack -> trim -> check -> pack -> MANIFEST.json; prints the sizes and stage times."""
    times: dict[str, float] = {}

    def stage(name: str, started: float) -> None:
        times[name] = time.perf_counter() - started

    requirements = read_wheel_list(wheel_list)
    t = time.perf_counter()
    wheels = download(requirements, work, python)
    stage("download", t)

    site = work / SITE
    if site.exists():
        shutil.rmtree(site)
    t = time.perf_counter()
    unpack_wheels(wheels, site)
    stage("unpack", t)
    raw = _size(site)

    t = time.perf_counter()
    trimmed = apply_trim(site, trim)
    stage("trim", t)
    per_package = {p.name: _size(p) for p in site.iterdir()}

    if check is not None:
        t = time.perf_counter()
        check(site)
        stage("check", t)

    t = time.perf_counter()
    parts = pack(site, out, part_bytes)
    stage("pack", t)
    vllm = next((r.split("==")[1] for r in requirements if r.startswith("vllm==")), None)
    unpacked = _size(site)
    manifest = write_manifest(out, parts, python=python, torch=torch, vllm=vllm, unpacked_bytes=unpacked)

    print(_size_table(raw, trimmed, per_package, unpacked, manifest))
    print("stage times: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in times.items()))
    print(f"gpu-bundle: {len(parts)} parts and MANIFEST.json in {out}")
    manifest["times"] = times
    return manifest


def _size_table(raw: int, trimmed: int, per_package: dict[str, int], unpacked: int, manifest: dict) -> str:
    mb = lambda n: f"{n / 1e6:.1f} MB"  # noqa: E731
    rows = ["| what | size |", "|---|---|",
            f"| wheels unpacked | {mb(raw)} |", f"| trimmed away | {mb(trimmed)} |"]
    top = sorted(per_package.items(), key=lambda kv: -kv[1])
    shown = [(name, n) for name, n in top if not name.endswith((".dist-info", ".libs"))][:12]
    rows += [f"| {name}/ | {mb(n)} |" for name, n in shown]
    rest = unpacked - sum(n for _, n in shown)
    rows += [f"| everything else (dist-info, .libs, small packages) | {mb(rest)} |",
             f"| **unpacked bundle** | **{mb(unpacked)}** |"]
    packed = sum(p["bytes"] for p in manifest["parts"])
    rows.append(f"| **packed ({manifest['archive']}, xz -9)** | **{mb(packed)}** ({packed / 2**20:.1f} MiB) |")
    rows += [f"| {p['name']} | {mb(p['bytes'])} ({p['bytes'] / 2**20:.1f} MiB) |" for p in manifest["parts"]]
    return "\n".join(rows)


# --- assemble (runs on the GPU machine: standard library only) -----------------------------------


def _installed_torch() -> str | None:
    """torch's version without its local part (+cu130), read from its metadata: importing torch
    here would cost seconds, and a CUDA init, before the bundle is even accepted."""
    try:
        return importlib.metadata.version("torch").split("+")[0]
    except importlib.metadata.PackageNotFoundError:
        return None


def verify(stage: Path) -> dict:
    """The manifest, once the Python, torch and every part are the ones it was built for."""
    manifest_path = stage / "MANIFEST.json"
    if not manifest_path.is_file():
        raise Refused(f"gpu-bundle: no MANIFEST.json in {stage}")
    manifest = json.loads(manifest_path.read_text())
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if manifest["python"] != here:
        raise Refused(f"gpu-bundle: built for Python {manifest['python']}, this is Python {here} ({sys.executable})")
    torch = _installed_torch()
    if torch != manifest["torch"]:
        raise Refused(f"gpu-bundle: built for torch {manifest['torch']}, this Python has torch "
                      f"{torch or 'not installed'}")
    for part in manifest["parts"]:
        path = stage / part["name"]
        if not path.is_file():
            raise Refused(f"gpu-bundle: part {part['name']} is missing from {stage}")
        if path.stat().st_size != part["bytes"] or _sha256(path) != part["sha256"]:
            raise Refused(f"gpu-bundle: part {part['name']} is corrupt (sha256 differs from MANIFEST.json)")
    return manifest


class _Concatenated(io.RawIOBase):
    """The parts read back as one stream, without writing the whole archive to disk again."""

    def __init__(self, paths: list[Path]):
        self._paths, self._file = list(paths), None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while True:
            if self._file is None:
                if not self._paths:
                    return 0
                self._file = self._paths.pop(0).open("rb")
            n = self._file.readinto(buffer)
            if n:
                return n
            self._file.close()
            self._file = None


def assemble(stage: Path, dest: Path = DEFAULT_DEST) -> Path:
    """Verify, then unpack into dest (emptied first); the site folder to put on PYTHONPATH."""
    manifest = verify(stage)
    if stage.resolve() == dest.resolve() or stage.resolve().is_relative_to(dest.resolve()):
        raise Refused(f"gpu-bundle: the destination {dest} holds the parts in {stage} (it is emptied first): give another --dest")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    stream = io.BufferedReader(_Concatenated([stage / p["name"] for p in manifest["parts"]]), 2**20)
    xz = shutil.which("xz")
    # xz -d -T0 decompresses the blocks of a multithreaded archive in parallel; lzma is the fallback
    proc = subprocess.Popen([xz, "-d", "-T0", "-c"], stdin=subprocess.PIPE, stdout=subprocess.PIPE) if xz else None
    if proc:
        import threading

        def feed():
            shutil.copyfileobj(stream, proc.stdin, 2**20)
            proc.stdin.close()

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        source, mode = proc.stdout, "r|"
    else:
        source, mode = stream, "r|xz"
    with tarfile.open(fileobj=source, mode=mode) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:  # pragma: no cover - Pythons before 3.11.4
            tar.extractall(dest)
    if proc:
        feeder.join()
        if proc.wait():
            raise SystemExit(f"gpu-bundle: xz -d exited {proc.returncode}")
    return dest / SITE


# --- check (a CPU smoke of a CUDA build) -----------------------------------------------------------


def ensure_rehearsal_venv(venv: Path = REHEARSAL_VENV, python: str = "python3.12") -> Path:
    """The venv bench/gpu_rehearsal.sh rehearses in: the GPU machine's versions, from PyPI."""
    if not (venv / "bin" / "python").exists():
        subprocess.run(["bash", str(ROOT / "bench" / "gpu_rehearsal.sh"), "--venv-only", str(venv)],
                       env={**os.environ, "PYTHON": python}, check=True)
    return venv / "bin" / "python"


def check(site: Path, python: str) -> None:
    """Run the checks in `python` (which has the target torch) with the bundle on its path; raise if any fails.

    (a) the imports a LoRA / NF4 / sleep-mode engine and TRL need, (b) EngineArgs.create_engine_config()
    for the engine's own three CUDA configurations, (c) tests/runtime/test_vllm_api.py. This machine has
    no GPU and no driver, so this is a CPU smoke of a CUDA build: it PATCHES vLLM's platform detection
    (`_force_cuda_platform`: CudaPlatform, capability 9.0) and puts a stub libcuda.so.1 (gcc-built,
    every function answers 'no device') on LD_LIBRARY_PATH so the extension libraries load. Nothing runs
    on a device; the GPU suite's part e does that on the machine."""
    env = dict(os.environ)
    stub = _stub_libcuda(Path(tempfile.mkdtemp(prefix="grpo-libcuda-")), site)
    # no __pycache__ written into the site folder: it is packed after the check
    env.update(PYTHONPATH=f"{site}:{ROOT / 'runtime'}:{ROOT}", VLLM_USE_FLASHINFER_SAMPLER="0", PYTHONDONTWRITEBYTECODE="1",
               CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false",
               LD_LIBRARY_PATH=f"{stub}:{env.get('LD_LIBRARY_PATH', '')}")
    env.pop("TRITON_INTERPRET", None)
    print(f"gpu-bundle check: {python}, PYTHONPATH={env['PYTHONPATH']}, stub libcuda.so.1 in {stub}", flush=True)
    started = time.perf_counter()
    inner = subprocess.run([python, str(Path(__file__).resolve()), "_check_inside", str(site)], env=env)
    print(f"gpu-bundle check: (a) imports and (b) engine configs took {time.perf_counter() - started:.0f} s")
    started = time.perf_counter()
    tests = subprocess.run(
        [python, "-c", _PYTEST_WITH_CUDA_FORCED, "-q", "-p", "no:cacheprovider", "tests/runtime/test_vllm_api.py"],
        env=env, cwd=ROOT)
    print(f"gpu-bundle check: (c) tests/runtime/test_vllm_api.py exit {tests.returncode}, "
          f"{time.perf_counter() - started:.0f} s")
    if inner.returncode or tests.returncode:
        raise SystemExit(f"gpu-bundle check failed: (a)+(b) exit {inner.returncode}, (c) exit {tests.returncode}")


# pytest in the target Python, with vLLM's platform forced to CUDA first (test_vllm_api's EngineArgs
# are built for cuda=True; on a machine without a driver vLLM would pick no platform at all)
_PYTEST_WITH_CUDA_FORCED = (
    "import sys; sys.path.insert(0, %r); import gpu_bundle; gpu_bundle._force_cuda_platform(); "
    "import pytest; sys.exit(pytest.main(sys.argv[1:]))" % str(Path(__file__).resolve().parent)
)

# the cu* entry points vLLM's extension libraries are linked against (nm -D --undefined-only on
# _C_stable_libtorch, _vllm_fa3_C, cumem_allocator): each answers CUDA_ERROR_NO_DEVICE (100)
_STUB_SYMBOLS_FROM = ("vllm/_C_stable_libtorch.abi3.so", "vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so",
                      "vllm/cumem_allocator.abi3.so")


def _stub_libcuda(folder: Path, site: Path) -> Path:
    """A libcuda.so.1 whose every cu* function fails with 'no device': lets the CUDA extension
    libraries load on a machine without the driver. Needs gcc; without it the folder stays empty."""
    names: set[str] = set()
    for rel in _STUB_SYMBOLS_FROM:
        lib = site / rel
        if lib.is_file() and shutil.which("nm"):
            out = subprocess.run(["nm", "-D", "--undefined-only", str(lib)], capture_output=True, text=True).stdout
            names |= {line.split()[-1].split("@")[0] for line in out.splitlines() if line.split()[-1].startswith("cu")}
    names = {n for n in names if n.startswith("cu") and not n.startswith(("cuda", "cublas", "cudnn", "cufft"))}
    source = "\n".join(f"int {name}(void) {{ return 100; }}" for name in sorted(names)) or "int cuInit(void){return 100;}"
    (folder / "stub.c").write_text(source + "\n")
    if shutil.which("gcc"):
        subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(folder / "libcuda.so.1"),
                        str(folder / "stub.c")], check=True)
    return folder


def _force_cuda_platform() -> None:
    """Make vLLM believe it runs on one sm_90 GPU (H100/H200), on a CPU-only machine.

    This patches vLLM's platform detection and the device queries the configuration reads: it is a
    smoke of the CUDA build's configuration code, not a run (nothing touches a GPU)."""
    import vllm.platforms as platforms
    from vllm.platforms import cuda
    from vllm.platforms.interface import DeviceCapability

    platform = cuda.CudaPlatform
    platform.get_device_capability = classmethod(lambda cls, device_id=0: DeviceCapability(9, 0))
    platform.has_device_capability = classmethod(
        lambda cls, capability, device_id=0: (9, 0) >= (tuple(capability) if not isinstance(capability, int)
                                                        else divmod(capability, 10)))
    platform.is_device_capability = classmethod(
        lambda cls, capability, device_id=0: (tuple(capability) if not isinstance(capability, int)
                                              else divmod(capability, 10)) == (9, 0))
    platform.get_device_name = classmethod(lambda cls, device_id=0: "NVIDIA H100 80GB HBM3")
    platform.get_device_total_memory = classmethod(lambda cls, device_id=0: 80 * 2**30)
    platform.is_fully_connected = classmethod(lambda cls, device_ids: True)
    platforms._current_platform = platform()
    print("gpu-bundle check: vLLM's platform FORCED to CudaPlatform, capability (9, 0) (CPU smoke of a CUDA build)",
          flush=True)


def _check_inside(site: Path) -> int:
    """In the target Python: (a) the imports, (b) EngineArgs.create_engine_config for our three
    engine configurations with the CUDA platform forced."""
    failures = 0
    print(f"gpu-bundle check (a): imports, python {sys.version.split()[0]}", flush=True)
    # first: vLLM modules bind `current_platform` when imported, so it must be CUDA before any of them loads
    started = time.perf_counter()
    _force_cuda_platform()
    print(f"  ok    import vllm + its CUDA platform ({time.perf_counter() - started:.1f} s)", flush=True)
    # the extension libraries a LoRA / NF4 / sleep-mode engine on sm_90 loads (against the stub libcuda.so.1)
    modules = ("vllm", "vllm._C_stable_libtorch", "vllm.vllm_flash_attn._vllm_fa3_C", "vllm.cumem_allocator",
               "vllm.device_allocator.cumem", "grpo_runtime.engines.vllm", "bitsandbytes", "trl",
               "trl.trainer.grpo_trainer", "datasets")
    for module in modules:
        started = time.perf_counter()
        try:
            imported = __import__(module, fromlist=["_"])
            version = getattr(imported, "__version__", "")
            print(f"  ok    import {module} {version} ({time.perf_counter() - started:.1f} s)", flush=True)
        except Exception as error:  # noqa: BLE001 - every failure is reported, then counted
            failures += 1
            print(f"  FAIL  import {module}: {type(error).__name__}: {error}", flush=True)
    try:
        failures += _engine_configs()
    except Exception as error:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        print(f"  FAIL  (b) could not run: {type(error).__name__}: {error}", flush=True)
        failures += 1
    print(f"gpu-bundle check (a)+(b): {'passed' if not failures else f'{failures} failed'}", flush=True)
    return 1 if failures else 0


def _engine_configs() -> int:
    import torch
    from vllm.engine.arg_utils import EngineArgs

    from grpo_runtime.engines.vllm import LORA, MERGED, engine_sizing, llm_kwargs
    from grpo_runtime.model import load_policy
    from grpo_runtime.spec import GenerationSpec, LoraSpec, ModelSpec
    from tests.runtime.tiny_model import build_tiny_model

    torch.set_num_threads(1)
    model_dir = build_tiny_model(Path(tempfile.mkdtemp(prefix="grpo-tiny-")))
    policy = load_policy(ModelSpec(name=str(model_dir), dtype="bfloat16"), LoraSpec(rank=16, alpha=32), seed=0)
    failures = 0
    print("gpu-bundle check (b): EngineArgs(**llm_kwargs).create_engine_config(), CUDA platform forced", flush=True)
    for name, mode, eager, nf4, fp8 in (("lora-nf4-fp8-cudagraphs", LORA, False, True, True),
                                        ("lora-eager", LORA, True, False, False),
                                        ("merged", MERGED, False, False, False)):
        # the tiny model has 512 positions: 128 + 256 tokens per sequence
        spec = GenerationSpec(engine="vllm", num_generations=8, max_prompt_length=128, max_completion_length=256,
                              enforce_eager=eager, float8_kv_cache=fp8)
        sizing = engine_sizing(spec, prompts_per_step=4, kv_bytes_per_token=1024)
        # the NF4 base is the learner's own weights written out; the tiny model's folder stands in
        kwargs = llm_kwargs(spec, policy, ModelSpec(name=policy.source), sizing=sizing, mode=mode, cuda=True,
                            model_path=policy.source)
        if nf4:
            kwargs["quantization"] = "bitsandbytes"
        try:
            config = EngineArgs(**kwargs).create_engine_config()
            print(f"  ok    {name}: quantization={config.model_config.quantization} "
                  f"kv_cache_dtype={config.cache_config.cache_dtype} "
                  f"cudagraph_mode={config.compilation_config.cudagraph_mode} "
                  f"enable_sleep_mode={config.model_config.enable_sleep_mode} "
                  f"lora={config.lora_config is not None}", flush=True)
        except Exception as error:  # noqa: BLE001
            failures += 1
            import traceback

            traceback.print_exc()
            print(f"  FAIL  {name}: {type(error).__name__}: {error}", flush=True)
    return failures


# --- command line --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    b = commands.add_parser("build", help="download, unpack, trim, check, pack, split")
    b.add_argument("--python", required=True, help="the target CPython, major.minor (3.12)")
    b.add_argument("--torch", required=True, help="the target torch without its local suffix (2.11.0)")
    b.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "gpu-bundle-work")
    b.add_argument("--out", type=Path, default=ROOT / ".gpu_parts")
    b.add_argument("--check-python", help=f"a Python with the target torch (default: {REHEARSAL_VENV}/bin/python)")
    b.add_argument("--no-check", action="store_true")
    a = commands.add_parser("assemble", help="verify the parts in STAGE_DIR and unpack them; prints the site path")
    a.add_argument("stage", type=Path)
    a.add_argument("--dest", type=Path, default=DEFAULT_DEST)
    c = commands.add_parser("check", help="the bundle's checks in a Python with the target torch")
    c.add_argument("site", type=Path)
    c.add_argument("--python", help=f"default: {REHEARSAL_VENV}/bin/python (created if missing)")
    inside = commands.add_parser("_check_inside")
    inside.add_argument("site", type=Path)
    args = parser.parse_args(argv)

    if args.command == "assemble":
        started = time.perf_counter()
        try:
            site = assemble(args.stage, args.dest)
        except Refused as refusal:
            print(refusal, file=sys.stderr)
            return 2
        print(f"gpu-bundle: unpacked in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        print(site)
        return 0
    if args.command == "_check_inside":
        return _check_inside(args.site)
    if args.command == "check":
        check(args.site.resolve(), args.python or str(ensure_rehearsal_venv()))
        return 0
    def run_check(site: Path) -> None:
        check(site.resolve(), args.check_python or str(ensure_rehearsal_venv()))

    build(python=args.python, torch=args.torch, work=args.work, out=args.out,
          check=None if args.no_check else run_check)
    return 0


if __name__ == "__main__":
    sys.exit(main())
