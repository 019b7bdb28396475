"""All-or-nothing output files: a model and its reports are written to temporary names beside their targets and
renamed together at the end, so a failure, an interrupt or a concurrent run never leaves a model without its own
reports (or half a file).

``OutputSet(targets, inputs)`` checks at once, before any work, that every target can be written and that none is
one of the ``inputs`` (the same file by inode: another spelling or a hard link of the input model). ``stage_*``
writes a temporary file (with the permissions the user's umask gives, not mkstemp's 0600); ``commit`` renames
them all while holding an exclusive lock on each target folder (two runs writing one set of names commit one
after the other, so the last one's set is what remains) and with SIGINT / SIGTERM put off until it is done;
leaving the ``with`` block without ``commit`` removes the temporary files.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

import onnx

from .errors import InputError

TWO_GB = 2**31 - 1
_HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _folder(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_writable(path: str | os.PathLike) -> None:
    """Fail early, before any work, when ``path`` cannot be written."""
    path = Path(path)
    directory = _folder(path)
    if not directory.is_dir():
        raise InputError(f"{path}: output folder {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise InputError(f"{path}: output folder {directory} is not writable")
    if path.exists() and (path.is_dir() or not os.access(path, os.W_OK)):
        raise InputError(f"{path}: cannot overwrite")


class OutputSet:
    """Temporary files that become ``targets`` together (see the module docstring)."""

    def __init__(self, targets, inputs=()):
        self.targets = [Path(t) for t in targets]
        if len({os.path.abspath(t) for t in self.targets}) != len(self.targets):
            raise InputError(f"{self.targets[0]}: two outputs of this run would have the same name")
        for t in self.targets:
            check_writable(t)
            for i in inputs:
                if i is not None and t.exists() and Path(i).exists() and os.path.samefile(t, i):
                    raise InputError(f"{t}: the output would overwrite the input {i}; choose another -o")
        self._temps: dict[Path, Path] = {}  # target -> its temporary file
        self._dirs: list[Path] = []  # temporary folders (a large model's external data)
        self._mode = 0o666 & ~_umask()

    def _temp(self, target: Path) -> Path:
        if target in self._temps:
            raise ValueError(f"{target} staged twice")
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=_folder(target))
        os.fchmod(fd, self._mode)
        os.close(fd)
        self._temps[target] = Path(tmp)
        return Path(tmp)

    def stage_bytes(self, target, data: bytes) -> None:
        tmp = self._temp(Path(target))
        with open(tmp, "wb") as f:
            f.write(data)

    def stage_text(self, target, text: str) -> None:
        self.stage_bytes(target, text.encode("utf-8"))

    def stage_model(self, target, model: onnx.ModelProto, external_data: bool = False) -> str:
        """The model at ``target``; over 2 GB, or with ``external_data``, its tensors go to ``<target name>.data``
        beside it (external data). Returns the SHA-256 of the model file."""
        target = Path(target)
        if model.ByteSize() <= TWO_GB and not external_data:
            data = model.SerializeToString()
            self.stage_bytes(target, data)
            return hashlib.sha256(data).hexdigest()
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=_folder(target)))
        self._dirs.append(work)
        data_name = target.name + ".data"
        onnx.save_model(model, str(work / target.name), save_as_external_data=True, location=data_name)
        for name, final in ((target.name, target), (data_name, target.with_name(data_name))):
            if not (work / name).exists():  # no tensor was large enough to go to the data file
                continue
            os.chmod(work / name, self._mode)
            self._temps[final] = work / name
        with open(work / target.name, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    def commit(self) -> None:
        """Rename every staged file onto its target, as one step for signals and for concurrent runs: SIGINT /
        SIGTERM arriving meanwhile are recorded and raised again once every file is in place (Python runs signal
        handlers in the main thread, whichever thread the signal reached, so the handlers are swapped, not the
        thread's signal mask; from another thread nothing is held)."""
        locks, pending, previous = [], [], {}
        if threading.current_thread() is threading.main_thread():
            for sig in _HELD_SIGNALS:
                previous[sig] = signal.signal(sig, lambda signum, frame: pending.append(signum))
        try:
            for d in sorted({os.path.abspath(_folder(t)) for t in self._temps}):
                fd = os.open(d, os.O_RDONLY)
                locks.append(fd)
                fcntl.flock(fd, fcntl.LOCK_EX)
            for target, tmp in self._temps.items():
                os.replace(tmp, target)
            self._temps.clear()
        finally:
            for fd in locks:
                os.close(fd)  # closing releases the lock
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self.discard()
        for sig in dict.fromkeys(pending):
            signal.raise_signal(sig)

    def discard(self) -> None:
        """Remove every temporary file not yet committed."""
        for tmp in self._temps.values():
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        self._temps.clear()
        for d in self._dirs:
            shutil.rmtree(d, ignore_errors=True)
        self._dirs.clear()

    def __enter__(self) -> "OutputSet":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()
