"""Models whose weights stay on disk: ONNX external data over ``LARGE_BYTES`` is not loaded into the ModelProto
(protobuf cannot hold more than 2 GB, and a copy per stage would not fit in memory either).

The model's folder is recorded in its metadata (``KEY``), so every copy of the model knows it. Initializers are
read from the files when asked for (``read``), one at a time; a stage's new large initializer is written to a
file in a hidden working folder inside the model's folder (``external_tensor``; removed when the process ends),
so the proto stays small — inside, because onnxruntime refuses external data outside the folder it is given
(links included). Where the model's folder is read-only, new initializers stay in the proto. onnxruntime
sessions are told the folder (``session_options``). ``self_contained`` gives the copy to save: external tensors
loaded, the key dropped."""
from __future__ import annotations

import atexit
import itertools
import os
import shutil
import tempfile

import numpy as np
import onnx
from onnx import helper

KEY = "ptq.external_data_folder"
LARGE_BYTES = 1 << 30  # external data above this stays on disk
MIN_EXTERNAL = 1 << 20  # new initializers of a model kept on disk go to files from this size
_serial = itertools.count()


def is_external(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL


def _info(t: onnx.TensorProto) -> dict:
    return {e.key: e.value for e in t.external_data}


def external_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers stored as external data."""
    total = 0
    for t in model.graph.initializer:
        if is_external(t):
            length = _info(t).get("length")
            count = int(np.prod(t.dims)) if t.dims else 1
            total += int(length) if length else count * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


def total_bytes(model: onnx.ModelProto) -> int:
    """The model's size: its proto and its external data."""
    return model.ByteSize() + external_bytes(model)


def keep_on_disk(model: onnx.ModelProto, base_dir: str) -> None:
    """Mark ``model`` (loaded without its external data) as kept on disk in ``base_dir``."""
    base = os.path.abspath(base_dir)
    for p in model.metadata_props:
        if p.key == KEY:
            p.value = base
            break
    else:
        model.metadata_props.add(key=KEY, value=base)


_work: dict[str, str | None] = {}  # model folder -> its working folder (None: cannot write there)


def _working_folder(base: str) -> str | None:
    if base not in _work:
        try:
            _work[base] = tempfile.mkdtemp(prefix=".ptq-weights-", dir=base)
            atexit.register(shutil.rmtree, _work[base], True)
        except OSError:
            _work[base] = None
    return _work[base]


def folder(model: onnx.ModelProto) -> str | None:
    """The folder of a model kept on disk (its external data locations are relative to it), else None."""
    for p in model.metadata_props:
        if p.key == KEY:
            return p.value
    return None


def read(t: onnx.TensorProto, base: str) -> np.ndarray:
    """An external initializer's value, read from its file (little-endian raw data, as ONNX stores it)."""
    info = _info(t)
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).newbyteorder("<")
    count = int(info["length"]) // dtype.itemsize if "length" in info else -1
    a = np.fromfile(os.path.join(base, info["location"]), dtype=dtype, count=count, offset=int(info.get("offset", 0)))
    return a.astype(dtype.newbyteorder("="), copy=False).reshape(tuple(t.dims))


def external_tensor(model: onnx.ModelProto, name: str, value: np.ndarray) -> onnx.TensorProto | None:
    """For a model kept on disk and a value of at least MIN_EXTERNAL bytes: the value written to a new file in the
    working folder, as an external TensorProto; else None (the caller stores it in the proto)."""
    base = folder(model)
    value = np.ascontiguousarray(value)
    if base is None or value.nbytes < MIN_EXTERNAL:
        return None
    work = _working_folder(base)
    if work is None:
        return None
    location = os.path.join(os.path.basename(work), f"t{next(_serial)}.bin")
    value.astype(value.dtype.newbyteorder("<"), copy=False).tofile(os.path.join(base, location))
    t = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(value.dtype), dims=value.shape,
                         data_location=onnx.TensorProto.EXTERNAL)
    for key, v in (("location", location), ("offset", "0"), ("length", str(value.nbytes))):
        e = t.external_data.add()
        e.key, e.value = key, v
    return t


def session_options(model: onnx.ModelProto, opts) -> None:
    """Tell an onnxruntime session built from ``model``'s bytes where its external data lives."""
    work = folder(model) if isinstance(model, onnx.ModelProto) else None
    if work is not None:
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", work)


def self_contained(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every external initializer loaded and the working-folder key dropped (what is saved);
    ``model`` itself when it has neither."""
    work = folder(model)
    if work is None:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if is_external(t):
            value = read(t, work)
            t.ClearField("external_data")
            t.data_location = onnx.TensorProto.DEFAULT
            t.raw_data = value.astype(value.dtype.newbyteorder("<"), copy=False).tobytes()
    keep = [p for p in out.metadata_props if p.key != KEY]
    del out.metadata_props[:]
    out.metadata_props.extend(keep)
    return out
