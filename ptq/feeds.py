"""Calibration data as complete feeds, passed to the model as they are (any batch axis, no stacking): a folder
of ``.npz`` files, each one feed (``--calib-feeds``), or a Python function yielding feed dicts
(``--calib-reader module:function``, the convention of onnxruntime's CalibrationDataReader and NNCF's Dataset),
for stateful models and preprocessing of your own. Every feed is checked against the model's inputs: the names,
the dtype kind, the static dimensions, finite values.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .data import InputInfo, checked, shape_str
from .errors import InputError


def calibration_input(inputs: list[InputInfo], calib=None, feeds=None, reader=None):
    """What the calibration data is: the folder ``calib`` as given, or a FeedSource over ``feeds`` (a folder of
    .npz feeds) or ``reader`` (a function, or "module:function"); None when none is given. One at most."""
    given = [n for n, v in (("--calib", calib), ("--calib-feeds", feeds), ("--calib-reader", reader))
             if v is not None]
    if len(given) > 1:
        raise InputError(f"give one of {' / '.join(given)}, not several")
    if feeds is None and reader is None:
        if isinstance(calib, (str, Path)):
            note = batchless_note(Path(calib), inputs)
            if note:
                source = FeedSource(inputs, folder=calib)
                source.note = note
                return source
        return calib
    name = reader if isinstance(reader, str) else ""
    return FeedSource(inputs, folder=feeds, reader=load_reader(reader) if isinstance(reader, str) else reader,
                      name=name)


def batchless_note(folder: Path, inputs: list[InputInfo]) -> str | None:
    """A line for the report where every .npy / .npz sample in ``folder`` has exactly its input's rank and, on the
    input's batch axis, a size other than 1 (a model input with no batch axis, [T, 81], and files [1504, 81]):
    each file is then one complete feed. None otherwise (images, samples without the batch axis, mixed)."""
    if not folder.is_dir():
        return None
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".npy", ".npz") and p.is_file())
    if not files or (len(inputs) > 1 and any(p.suffix == ".npy" for p in files)):
        return None
    shapes = []
    for p in files:
        try:
            data = _load(p, inputs, header_only=True)
        except InputError:
            return None
        for info in inputs:
            if info.batch_axis is None:
                continue
            x = data.get(info.name)
            if x is None or x.ndim != len(info.shape) or x.shape[info.batch_axis] == 1:
                return None
            shapes.append(list(x.shape))
    return (f"each of the {len(files)} files is one complete feed: the samples have the input's full rank "
            f"({shapes[0]}, not one sample with a batch axis of 1), as --calib-feeds would take them")


def load_reader(spec: str) -> Callable:
    """'module:function' or 'path/to/file.py:function' -> the function (errors name what is missing)."""
    from .metric import load_function
    return load_function(spec, "--calib-reader")


class FeedSource:
    """Feeds from ``.npz`` files (``folder``) or from ``reader()`` (called anew for every pass over the data).

    ``files`` names the chosen feeds (paths, or indices into the reader's sequence); a batch is one feed.
    """

    note = None  # set where ptq chose complete feeds for a --calib folder (``batchless_note``)

    def __init__(self, inputs: list[InputInfo], folder=None, reader: Callable | None = None, name: str = ""):
        self.inputs, self.reader = inputs, reader
        self.name = name or (str(folder) if folder is not None else "--calib-reader")
        if folder is not None:
            folder = Path(folder)
            if not folder.is_dir():
                raise InputError(f"{folder}: no such folder")
            self.files = sorted(p for p in folder.rglob("*") if p.is_file() and (
                p.suffix == ".npz" or (p.suffix == ".npy" and len(inputs) == 1)))
            if not self.files:
                raise InputError(f"{folder}: no .npz feeds found (one complete feed per file; .npy for a model of "
                                 "one input)")
        else:
            try:
                count = sum(1 for _ in self._call())
            except InputError:
                raise
            except Exception as e:
                raise InputError(f"{self.name}: the reader failed ({type(e).__name__}: {e})") from None
            if count == 0:
                raise InputError(f"{self.name}: the reader yielded no feeds")
            self.files = list(range(count))

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, files) -> "FeedSource":
        other = copy.copy(self)
        other.files = list(files)
        return other

    def labels(self):
        return None

    def _call(self):
        feeds = self.reader()
        if isinstance(feeds, dict):
            raise InputError(f"{self.name}: the reader returned one dict; it must return or yield a sequence of "
                             "feed dicts")
        return iter(feeds)

    def batches(self, batch_size: int = 1) -> Iterator[tuple[list, dict[str, np.ndarray]]]:
        """One feed per batch, in the order of ``files``."""
        if self.reader is None:
            for p in self.files:
                yield [p], self.check(p, _load(p, self.inputs))
            return
        wanted = set(self.files)
        for k, feed in enumerate(self._call()):
            if k in wanted:
                yield [k], self.check(f"{self.name} feed #{k}", feed)

    def check(self, where, feed) -> dict[str, np.ndarray]:
        if not isinstance(feed, dict):
            raise InputError(f"{where}: a feed must be a dict of input name -> array, not {type(feed).__name__}")
        names = [i.name for i in self.inputs]
        missing, extra = [n for n in names if n not in feed], [k for k in feed if k not in names]
        if missing or extra:
            raise InputError(f"{where}: the model's inputs are {', '.join(names)}; the feed "
                             + (f"lacks {', '.join(missing)}" if missing else "")
                             + ("; " if missing and extra else "") + (f"has no input {', '.join(extra)}" if extra
                                                                      else ""))
        out = {}
        for info in self.inputs:
            x = np.asarray(feed[info.name])
            if x.ndim != len(info.shape) or any(w is not None and d != w for d, w in zip(x.shape, info.shape)):
                raise InputError(f"{where}: input '{info.name}' has shape {list(x.shape)}, the model expects "
                                 f"{shape_str(info.shape)}")
            out[info.name] = checked(where, info, x)
        return out


def _load(path: Path, inputs: list[InputInfo] | None = None, header_only: bool = False) -> dict:
    """The arrays of a .npz file by key, or a .npy file's array under the name of the model's only input
    (``header_only``: a .npy file memory-mapped, so only its header is read)."""
    try:
        if path.suffix == ".npy":
            return {(inputs[0].name if inputs else "x"): np.load(path, allow_pickle=False,
                                                                 mmap_mode="r" if header_only else None)}
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:
        raise InputError(f"{path}: cannot read .npz ({str(e).splitlines()[0][:120]})") from None
