"""The metric that the debugging flow and auto-fix steer by, and a scorer that runs the FP32 model only once.

The metric (white paper §3.7 leaves it to the user): top-1 against labels when the data has them; else top-1
agreement with FP32 (for a class-score output); else output SQNR; or a user function named
``module:function`` called as f(fp32_outputs, quantized_outputs, labels) -> float (higher is better; the outputs
are dicts of name -> array over all samples, or the list of per-batch arrays where their shapes vary between
batches; labels an int array or None). Its *drop* is the FP32 model's
score minus the quantized model's (for SQNR: none — SQNR ranks but cannot gate).
"""
from __future__ import annotations

import importlib

import numpy as np
from tqdm import tqdm

from .errors import InputError
from .evaluate import Accumulator
from .observe import session
from .patterns import class_score_outputs

CACHE_BYTES = 768 << 20  # keep decoded input batches in memory up to this size, else re-read them


def load_user_metric(spec: str):
    """'pkg.module:function' (found from the current folder too) or 'path/to/file.py:function' -> the function."""
    return load_function(spec, "--metric")


def load_function(spec: str, option: str):
    """'pkg.module:function' (found from the current folder too) or 'path/to/file.py:function' -> the function
    (InputError naming ``option`` and what is missing)."""
    if ":" not in spec:
        raise InputError(f"{option} takes module:function, not {spec!r}")
    mod_name, fn_name = spec.rsplit(":", 1)
    try:
        if mod_name.endswith(".py"):  # a file: path/to/metric.py:function
            from importlib import util as importlib_util
            from pathlib import Path
            if not Path(mod_name).is_file():
                raise InputError(f"{option} {spec}: no such file {mod_name}")
            module_spec = importlib_util.spec_from_file_location(Path(mod_name).stem, mod_name)
            mod = importlib_util.module_from_spec(module_spec)
            module_spec.loader.exec_module(mod)
        else:  # a module on the path, the current folder included (as `python -m` would find it)
            import sys
            if "" not in sys.path and "." not in sys.path:
                sys.path.insert(0, "")
            mod = importlib.import_module(mod_name)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{option} {spec}: cannot import {mod_name} ({type(e).__name__}: {e})") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise InputError(f"{option} {spec}: {mod_name} has no function {fn_name}")
    return fn


def gathered(names: list[str], outs: list[list[np.ndarray]]) -> dict:
    """Output name -> the batches' arrays concatenated on axis 0, or the list of per-batch arrays where their
    shapes differ beyond axis 0 (a detector's variable number of boxes, a sequence model's lengths)."""
    out = {}
    for k, n in enumerate(names):
        parts = [o[k] for o in outs]
        same = len({(p.ndim,) + p.shape[1:] for p in parts}) == 1
        out[n] = np.concatenate(parts) if same and parts[0].ndim else parts
    return out


class Scorer:
    """A data source with the FP32 model's outputs on it, computed once; ``score(q_model)`` runs only the
    quantized model. Input batches stay in memory when they fit in CACHE_BYTES (else they are re-read)."""

    def __init__(self, fp_model, source, batch_size: int = 16, user_metric=None, progress: bool = False):
        self.source, self.batch_size, self.user = source, batch_size, user_metric
        self.labels = source.labels() if hasattr(source, "labels") else None
        s = session(fp_model)
        self.names = [o.name for o in s.get_outputs()]
        self.cache, self.fp_out, size = [], [], 0
        with tqdm(total=len(source), desc="FP32 reference", unit="img", disable=not progress, leave=False) as bar:
            for paths, feed in source.batches(batch_size):
                self.fp_out.append(s.run(self.names, feed))
                size += sum(v.nbytes for v in feed.values())
                self.cache.append((paths, feed) if size <= CACHE_BYTES else (paths, None))
                bar.update(len(paths))
        self.class_outputs = class_score_outputs(fp_model)
        self.reference = self._metric(self.fp_out, self.fp_out, self._accumulator())[1]
        self.kind = self.reference[1]

    def batches(self):
        if all(f is not None for _, f in self.cache):
            yield from self.cache
        else:
            yield from self.source.batches(self.batch_size)

    def score(self, q_model, exact: bool = True) -> dict:
        """The evaluation dict of ptq.evaluate plus ``metric`` (name), ``score`` and ``drop``. ``exact``: the
        model runs with its Q/DQ exactly as written (see ptq.observe.session), so a partly quantized model means
        what it says; else as onnxruntime runs it by default (fused integer kernels), as the accuracy gate does."""
        s = session(q_model, exact_qdq=exact)
        outs = [s.run(self.names, feed) for _, feed in self.batches()]
        result, _ = self._metric(self.fp_out, outs, self._accumulator())
        return result

    def _accumulator(self) -> Accumulator:
        return Accumulator(self.names, self.labels, self.class_outputs)

    def _metric(self, fp_out, q_out, acc):
        for (paths, _), a, b in zip(self.cache, fp_out, q_out):
            acc.update(paths, a, b)
        r = acc.result()
        if self.user is not None:
            lab = None
            if self.labels:
                lab = np.array([self.labels.get(p, -1) for paths, _ in self.cache for p in paths])
            value, kind = float(self.user(gathered(self.names, fp_out), gathered(self.names, q_out), lab)), \
                "user metric"
        elif "quant_top1" in r:
            value, kind = r["quant_top1"], "top-1 %"
        elif "top1_agreement" in r:
            value, kind = r["top1_agreement"], "top-1 agreement %"
        else:
            value, kind = float(np.mean([o["sqnr_db"] for o in r["outputs"].values()])), "output SQNR dB"
        r["metric"], r["score"] = kind, value
        if hasattr(self, "reference"):
            ref = self.reference[0]
            r["drop"] = None if kind == "output SQNR dB" else round(ref - value, 4)
        return r, (value, kind)
