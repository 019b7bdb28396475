"""Calibration and evaluation data: image folders with a preprocessing spec, or folders of .npy / .npz samples.

A source yields samples (dict input name -> array without the batch axis), checked against the model's inputs,
and groups them into batches; nothing is held beyond one batch, so memory does not grow with the data set.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx

from .errors import InputError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}
ARRAY_SUFFIXES = {".npy", ".npz"}
_DTYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
           onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.INT64: np.int64,
           onnx.TensorProto.INT32: np.int32, onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.INT8: np.int8,
           onnx.TensorProto.BOOL: np.bool_}


@dataclass
class InputInfo:
    """A model input: its dtype, its dims (int: static, None: dynamic) and the axis that samples are stacked on
    (``batch_axis``; None for a scalar input, which is passed as it is)."""

    name: str
    dtype: type
    shape: list  # int for a static dimension, None for a dynamic one
    batch_axis: int | None = 0

    @property
    def static_batch(self) -> int | None:
        """The batch size the model fixes for this input (a static export), else None."""
        return None if self.batch_axis is None else self.shape[self.batch_axis]


def model_inputs(model: onnx.ModelProto) -> list[InputInfo]:
    """The graph inputs that are not initializers. The batch axis of an input is its first dynamic dimension
    (``state [2, N, 128]``: axis 1), axis 0 where every dimension is static (a static-batch export), none for a
    scalar."""
    inits = {t.name for t in model.graph.initializer}
    out = []
    for i in model.graph.input:
        if i.name in inits:
            continue
        tt = i.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim]
        axis = None if not dims else next((k for k, d in enumerate(dims) if d is None), 0)
        out.append(InputInfo(i.name, _DTYPES.get(tt.elem_type, np.float32), dims, axis))
    return out


def static_batch(inputs: list[InputInfo]) -> int | None:
    """The batch size the model fixes (every batched input static on its batch axis), else None."""
    static = {i.static_batch for i in inputs if i.batch_axis is not None}
    if not static or None in static:
        return None
    if len(static) > 1:
        raise InputError(f"the model's inputs fix different batch sizes ({sorted(static)}): cannot feed it")
    return static.pop()


@dataclass
class Preprocess:
    """How an image file becomes a model input: resize the short side to ``resize`` (0: no resize), center-crop
    ``crop`` (0: none), then x = (pixel · scale − mean) / std per channel, in ``color`` order and ``layout``."""

    resize: int = 0
    crop: int = 0
    mean: tuple = (0.0, 0.0, 0.0)
    std: tuple = (1.0, 1.0, 1.0)
    scale: float = 1 / 255
    layout: str = "nchw"
    color: str = "rgb"
    interp: str = "bilinear"

    def __post_init__(self):
        if self.layout not in ("nchw", "nhwc"):
            raise InputError(f"--layout must be nchw or nhwc, not {self.layout!r}")
        if self.color not in ("rgb", "bgr"):
            raise InputError(f"--color must be rgb or bgr, not {self.color!r}")
        if self.interp not in ("bilinear", "bicubic", "nearest"):
            raise InputError(f"--interp must be bilinear, bicubic or nearest, not {self.interp!r}")
        if len(self.mean) not in (1, 3) or len(self.std) not in (1, 3) or min(self.std) <= 0:
            raise InputError("--mean and --std take 1 or 3 numbers, and std must be > 0")
        for name in ("resize", "crop"):  # pixels
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InputError(f"--{name} must be a whole number of pixels >= 0 (0: none), not {v!r}")
        if not (isinstance(self.scale, (int, float)) and np.isfinite(self.scale) and self.scale > 0):
            raise InputError(f"--scale must be a number > 0, not {self.scale!r}")


PRESETS = {
    "imagenet": Preprocess(resize=256, crop=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    "inception": Preprocess(resize=256, crop=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    "efficientnet-lite": Preprocess(resize=256, crop=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    "ppocr-det": Preprocess(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), color="bgr"),
}


def load_image(path: Path, pre: Preprocess, hw: tuple | None = None) -> np.ndarray:
    """Read and preprocess one image -> float32 [3, H, W] (nchw) or [H, W, 3] (nhwc)."""
    try:
        from PIL import Image
    except ImportError:
        raise InputError("reading image folders needs Pillow: pip install 'ptq[images]' "
                         "(or give a folder of .npy/.npz samples)") from None
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}[pre.interp]
            resize, crop = pre.resize, pre.crop
            if not resize and not crop and hw:  # default: fill the model's static input size
                resize, crop = max(hw), None
            if resize:
                w, h = im.size
                k = resize / min(w, h)
                im = im.resize((max(1, round(w * k)), max(1, round(h * k))), resample)
            if crop or (crop is None and hw):
                ch, cw = (crop, crop) if crop else hw
                w, h = im.size
                if cw > w or ch > h:
                    raise InputError(f"{path}: image {w}x{h} is smaller than the crop {cw}x{ch}")
                left, top = int(round((w - cw) / 2.0)), int(round((h - ch) / 2.0))
                im = im.crop((left, top, left + cw, top + ch))
            x = np.asarray(im, dtype=np.float32)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{path}: cannot read image ({str(e).splitlines()[0][:120]})") from None
    if pre.color == "bgr":
        x = x[..., ::-1]
    x = (x * np.float32(pre.scale) - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    if pre.layout == "nchw":
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x, dtype=np.float32)


@dataclass
class DataSource:
    """Samples from a folder, checked against the model's inputs.

    ``files`` is the chosen subset (a seeded random choice of ``size`` files when the folder has more), in a
    fixed order; labels (when ``labels.txt`` or class subfolders exist) are looked up by file.
    """

    folder: Path
    inputs: list[InputInfo]
    preprocess: Preprocess = field(default_factory=Preprocess)
    size: int = 0
    seed: int = 0
    files: list[Path] = field(init=False)
    kind: str = field(init=False)

    def __post_init__(self):
        self.folder = Path(self.folder)
        if not self.folder.exists():
            raise InputError(f"{self.folder}: no such folder")
        if not self.folder.is_dir():
            raise InputError(f"{self.folder}: not a folder")
        try:
            files = sorted(p for p in self.folder.rglob("*") if p.is_file()
                           and p.suffix.lower() in IMAGE_SUFFIXES | ARRAY_SUFFIXES)
        except PermissionError:
            raise InputError(f"{self.folder}: cannot read the folder (permission denied)") from None
        if not files:
            raise InputError(f"{self.folder}: no samples found (expected images .jpg/.png/.bmp "
                             f"or arrays .npy/.npz)")
        arrays = [p for p in files if p.suffix.lower() in ARRAY_SUFFIXES]
        self.kind = "arrays" if arrays else "images"
        files = arrays if arrays else files
        if self.kind == "images" and len(self.inputs) != 1:
            raise InputError(f"{self.folder}: the model has {len(self.inputs)} inputs; image folders feed "
                             f"single-input models, give .npz samples (one key per input) instead")
        self.files = choose(files, self.size, self.seed)

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, files: list[Path]) -> "DataSource":
        """The same source over other files (e.g. a held-back part)."""
        other = copy.copy(self)
        other.files = list(files)
        return other

    def read(self, path: Path) -> dict[str, np.ndarray]:
        """One sample: input name -> array with a leading batch axis of 1, checked against the model."""
        if self.kind == "images":
            info = self.inputs[0]
            hw = None
            if len(info.shape) == 4 and info.batch_axis == 0:
                hw = tuple(info.shape[2:4] if self.preprocess.layout == "nchw" else info.shape[1:3])
                hw = hw if all(hw) else None
            sample = {info.name: load_image(path, self.preprocess, hw)}
        elif path.suffix.lower() == ".npy":
            if len(self.inputs) != 1:
                raise InputError(f"{path}: the model has {len(self.inputs)} inputs; use .npz files with keys "
                                 + ", ".join(i.name for i in self.inputs))
            sample = {self.inputs[0].name: _load_array(path)}
        else:
            sample = _load_npz(path, [i.name for i in self.inputs])
        return {i.name: _fit(path, i, sample[i.name]) for i in self.inputs}

    def samples(self) -> Iterator[tuple[Path, dict[str, np.ndarray]]]:
        for p in self.files:
            yield p, self.read(p)

    def batches(self, batch_size: int) -> Iterator[tuple[list[Path], dict[str, np.ndarray]]]:
        """Batches of up to batch_size samples, stacked on each input's batch axis; a batch ends early where a
        sample's shape (or a scalar input's value) changes. A model with a static batch size N gets batches of
        exactly N (``batch_size`` is ignored); the last samples, fewer than N, are left out (``left_out``)."""
        fixed = static_batch(self.inputs)
        static = fixed is not None
        batch_size = fixed or batch_size
        self.left_out = 0
        paths, group = [], []
        for p, s in self.samples():
            if group and not _compatible(s, group[0], self.inputs):
                if static:
                    self.left_out += len(group)
                else:
                    yield paths, _stack(group, self.inputs)
                paths, group = [], []
            paths.append(p)
            group.append(s)
            if len(group) == batch_size:
                yield paths, _stack(group, self.inputs)
                paths, group = [], []
        if group:
            if static:
                self.left_out += len(group)
            else:
                yield paths, _stack(group, self.inputs)

    def labels(self) -> dict[Path, int] | None:
        """Class index per file from ``labels.txt`` (``FILE INDEX`` lines) or one subfolder per class."""
        lf = self.folder / "labels.txt"
        if lf.exists():
            table = {}
            for n, line in enumerate(lf.read_text().splitlines(), 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                    raise InputError(f"{lf}:{n}: expected 'FILE CLASS_INDEX', got {line.strip()!r}")
                table[parts[0]] = int(parts[1])
            out = {}
            for p in self.files:
                key = p.relative_to(self.folder).as_posix()
                if key in table or p.name in table:
                    out[p] = table.get(key, table.get(p.name))
            return out or None
        subdirs = sorted({p.relative_to(self.folder).parts[0] for p in self.files
                          if len(p.relative_to(self.folder).parts) > 1})
        if len(subdirs) > 1 and all(len(p.relative_to(self.folder).parts) > 1 for p in self.files):
            index = {d: k for k, d in enumerate(subdirs)}
            return {p: index[p.relative_to(self.folder).parts[0]] for p in self.files}
        return None


def _compatible(a: dict, b: dict, inputs: list[InputInfo]) -> bool:
    """Whether samples a and b can share a batch: equal shapes, and equal values of scalar inputs."""
    for i in inputs:
        x, y = a[i.name], b[i.name]
        if x.shape != y.shape or (i.batch_axis is None and not np.array_equal(x, y)):
            return False
    return True


def _stack(group: list[dict], inputs: list[InputInfo]) -> dict[str, np.ndarray]:
    """Samples concatenated on each input's batch axis; a scalar input takes the (common) value."""
    return {i.name: group[0][i.name] if i.batch_axis is None or len(group) == 1
            else np.concatenate([g[i.name] for g in group], axis=i.batch_axis) for i in inputs}


def _load_array(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:
        raise InputError(f"{path}: cannot read .npy ({str(e).splitlines()[0][:120]})") from None


def _load_npz(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as e:
        raise InputError(f"{path}: cannot read .npz ({str(e).splitlines()[0][:120]})") from None
    if len(names) == 1 and len(data) == 1 and names[0] not in data:
        return {names[0]: next(iter(data.values()))}
    missing = [n for n in names if n not in data]
    if missing:
        raise InputError(f"{path}: missing key(s) {', '.join(missing)} (the model's inputs are "
                         f"{', '.join(names)}; the file has {', '.join(data) or 'none'})")
    return data


def _fit(path: Path, info: InputInfo, x: np.ndarray) -> np.ndarray:
    """Check a sample against the input's rank, static dims and dtype; return it with a batch axis of 1 (on the
    input's batch axis), or as a 0-d array for a scalar input."""
    x = np.asarray(x)
    rank = len(info.shape)
    if info.batch_axis is None:  # a scalar input: one value, passed as it is
        if x.size != 1:
            raise InputError(f"{path}: input '{info.name}' is a scalar, the sample has shape {list(x.shape)}")
        x = x.reshape(())
    elif x.ndim == rank - 1:
        x = np.expand_dims(x, info.batch_axis)
    elif not (x.ndim == rank and x.shape[info.batch_axis] == 1):
        raise InputError(f"{path}: sample for input '{info.name}' has shape {list(x.shape)}, the model expects "
                         f"{shape_str(info.shape)} (one sample per file, batch on axis {info.batch_axis}; where "
                         "each file is one complete feed, give the folder as --calib-feeds DIR)")
    for k, (d, want) in enumerate(zip(x.shape, info.shape)):
        if k != info.batch_axis and want is not None and d != want:
            raise InputError(f"{path}: sample for input '{info.name}' has shape {list(x.shape)}, the model "
                             f"expects {shape_str(info.shape)}")
    return checked(path, info, x)


def checked(where, info: InputInfo, x: np.ndarray) -> np.ndarray:
    """``x`` in the input's dtype; InputError where its kind does not fit (integers for a float input are refused:
    they are most often unnormalized pixels, 0-255) or a float value is inf / nan."""
    want = np.dtype(info.dtype).kind
    if x.dtype.kind != want:
        hint = (" (save the preprocessed samples as float, e.g. x.astype(np.float32) / 255 and the model's "
                "normalization, or give an image folder with --preset / --mean / --std)"
                if want == "f" and x.dtype.kind in "iub" else "")
        raise InputError(f"{where}: input '{info.name}' is {x.dtype}, the model expects "
                         f"{np.dtype(info.dtype).name}{hint}")
    x = x.astype(info.dtype, copy=False)
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        bad = int(x.size - np.count_nonzero(np.isfinite(x)))
        raise InputError(f"{where}: input '{info.name}' has {bad} non-finite value(s) (inf or nan)")
    return x


def shape_str(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def choose(files: list, size: int, seed: int) -> list:
    """A seeded choice of ``size`` of ``files`` in their order (all when size is 0 or not smaller)."""
    if size and size < len(files):
        pick = np.random.default_rng(seed).choice(len(files), size, replace=False)
        return [files[i] for i in sorted(pick)]
    return list(files)


def calibration_sources(calib, inputs, preprocess: Preprocess, config):
    """(range-setting source, held-back source or None): ``config.calib_size`` samples for range setting plus up
    to ``config.holdout`` others held back to measure fidelity (at most a quarter of a small folder). ``calib``
    is a folder (a DataSource is made of it) or a source object (ptq.feeds.FeedSource)."""
    full = DataSource(calib, inputs, preprocess) if isinstance(calib, (str, Path)) else calib
    n = len(full)
    holdout = min(config.holdout, n // 4)
    calib_n = min(config.calib_size, n - holdout)
    src = full.subset(choose(full.files, calib_n + holdout, config.seed))
    if holdout == 0:
        return src, None
    held = set(np.random.default_rng(config.seed + 1).permutation(len(src.files))[:holdout].tolist())
    return (src.subset([f for k, f in enumerate(src.files) if k not in held]),
            src.subset([f for k, f in enumerate(src.files) if k in held]))


def require_calibration(ctx, stage: str) -> None:
    """Stop a stage that needs calibration data when the run has none."""
    if ctx is None or ctx.calib is None:
        raise InputError(f"{stage} needs calibration data (--calib)")
