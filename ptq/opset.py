"""Old opsets: a model at opset 7-12 is converted to opset 13 (per-channel DequantizeLinear needs it) with onnx's
version converter, and the conversion is checked numerically: both models run in onnxruntime on up to
``CHECK_SAMPLES`` calibration samples and every output must agree to within ``RTOL`` of its peak |value|. A
conversion that changes the outputs, or fails, is refused naming what to do; one that keeps them replaces the
model for everything after (the reference, the fidelity and the evaluation), and the report says so."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import version_converter

from .errors import InputError, first_line
from .model import default_opset

TARGET_OPSET = 13
CHECK_SAMPLES = 8
RTOL = 1e-4


def upgraded(model: onnx.ModelProto, source, batch_size: int = 8) -> tuple[onnx.ModelProto, str | None]:
    """(the model at opset >= 13, a line for the report or None when nothing was converted). ``source``: the
    calibration samples the check runs on (a DataSource / FeedSource), or None (then random normal inputs of the
    model's static shapes; a model with dynamic shapes and no data is refused)."""
    old = default_opset(model)
    if old >= TARGET_OPSET:
        return model, None
    try:
        new = version_converter.convert_version(model, TARGET_OPSET)
        onnx.checker.check_model(new)
    except Exception as e:  # the converter raises RuntimeError / ValidationError / others by op
        raise InputError(f"cannot convert the model from opset {old} to {TARGET_OPSET} (needed for per-channel "
                         f"quantization): {first_line(e)}; convert it yourself (onnx.version_converter, or "
                         "re-export at opset 13 or later)") from None
    worst, samples = largest_difference(model, new, check_feeds(model, source, batch_size))
    if worst > RTOL:
        raise InputError(f"converting the model from opset {old} to {TARGET_OPSET} changes its outputs (largest "
                         f"difference {worst:.2e} of the output's peak on {samples} samples); re-export it at opset "
                         "13 or later")
    return new, (f"converted from opset {old} to {TARGET_OPSET} (onnx.version_converter); outputs equal on "
                 f"{samples} samples (largest difference {worst:.1e} of each output's peak)")


def check_feeds(model, source, batch_size):
    """(samples, feed) pairs to check a rewritten model on: up to CHECK_SAMPLES of ``source``, or one random feed
    of the static shapes."""
    if source is not None:
        taken = 0
        for paths, feed in source.batches(min(batch_size, CHECK_SAMPLES)):
            yield len(paths), feed
            taken += len(paths)
            if taken >= CHECK_SAMPLES:
                return
        return
    from .data import model_inputs
    rng = np.random.default_rng(0)
    feed = {}
    for info in model_inputs(model):
        if any(d is None for k, d in enumerate(info.shape) if k != info.batch_axis):
            raise InputError(f"checking the conversion from opset {default_opset(model)} needs calibration data: "
                             f"input '{info.name}' has dynamic dimensions; give --calib")
        shape = [1 if (k == info.batch_axis or d is None) else d for k, d in enumerate(info.shape)]
        feed[info.name] = rng.normal(size=shape).astype(info.dtype)
    yield 1, feed


def largest_difference(a, b, feeds) -> tuple[float, int]:
    """(max over outputs and feeds of max |a − b| / max |a|, samples compared): how far a rewritten model ``b``
    is from ``a`` (inf where an output's shape differs)."""
    from .observe import session
    sa, sb = session(a, arena=False), session(b, arena=False)
    names = [o.name for o in sa.get_outputs()]
    worst, samples = 0.0, 0
    for count, feed in feeds:
        for x, y in zip(sa.run(names, feed), sb.run(names, feed)):
            x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
            if x.shape != y.shape:
                return float("inf"), samples
            if x.size:
                worst = max(worst, float(np.max(np.abs(x - y))) / max(float(np.max(np.abs(x))), 1e-30))
        samples += count
    return worst, samples
