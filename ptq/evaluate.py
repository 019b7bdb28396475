"""Metrics of a quantized model against its FP32 original, both run in onnxruntime on the same samples:
top-1 / top-5 against labels, top-1 agreement with FP32, and per output the SQNR and cosine similarity.
Streaming: only running sums are kept.

The top-1 drop comes with its paired standard error: with d_i = [FP32 right on i] − [quantized right on i]
over m labelled samples, b of them +1 and c of them −1, the drop is 100·(b − c)/m and its standard error
100·√(s²/m) with s² = (b + c − (b − c)²/m)/(m − 1), the sample variance of d."""
from __future__ import annotations

import numpy as np
from scipy.special import ndtri
from tqdm import tqdm

from .errors import AccuracyGateError, InputError
from .external import folder
from .observe import session
from .patterns import class_score_outputs


MAX_SLICES = 4096  # per-slice fidelity for outputs with at most this many slices on their feature axis
MIN_SLICE_SAMPLES = 8  # slices are judged on at least this many samples
SLICE_FLOOR = 1e-3  # slices whose FP32 peak |value| is under this share of the output's peak are not judged


def _sqnr_cos(signal, noise, dot, nq):
    """SQNR (dB) and cosine from the sums Σr², Σ(r − q)², Σr·q, Σq² (arrays: one per slice)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        sqnr = np.where(noise == 0, np.inf, 10 * np.log10(np.maximum(signal, 1e-300) / np.maximum(noise, 1e-300)))
        cos = dot / np.sqrt(np.maximum(signal * nq, 1e-300))
    return sqnr, cos


def feature_axis(shape) -> int:
    """The axis an output's slices are taken on: its features. Axis 1 (channels, a detector head's rows), except
    for a 3-D output [N, L, F] whose last axis is the shorter: positions × features (a detector's anchors × class
    scores), where the last axis holds the features."""
    return 2 if len(shape) == 3 and shape[2] < shape[1] else 1


class _OutputStats:
    """Running sums of one output, over the whole tensor and per slice of its feature axis (``feature_axis``: a
    detector head's rows or class columns, an output's channels), where a large sub-range can hide a collapsed
    small one.

    A slice's SQNR is judged with its uncertainty: axis 0 holds the samples, and for each slice the running sums of
    each sample's signal s_i = Σ r² and noise e_i = Σ (r − q)², their squares and product give, by the delta
    method, the standard error of 10·log10(Σs / Σe): (10 / ln 10)·√((v_s / s̄² + v_e / ē² − 2·c_se / (s̄·ē)) / n)
    with v, c the sample (co)variances. The worst slice is the one whose SQNR is highest at its upper confidence
    bound (SQNR + z·SE, z for 95 % over all the slices, Bonferroni) among the slices lowest there: it is under a
    bound only when that bound is. Slices are judged with at least MIN_SLICE_SAMPLES samples, and only those whose
    FP32 peak |value| reaches SLICE_FLOOR of the output's peak (below, a slice is under 10 bits of the output's
    range: the scores of classes that never fire)."""

    def __init__(self):
        self.sums = np.zeros(4)  # Σr², Σ(r − q)², Σr·q, Σq²
        self.slices = None  # [4, S] per slice of the feature axis
        self.moments = None  # [5, S]: Σ s_i, Σ e_i, Σ s_i², Σ e_i², Σ s_i·e_i over samples i, per slice
        self.n = 0  # samples seen on axis 0
        self.peak = None  # [S] max |r| per slice
        self.axis = None  # the feature axis, moved to 1 below

    def update(self, ref: np.ndarray, q: np.ndarray):
        r, d = ref.astype(np.float64), q.astype(np.float64)
        self.axis = feature_axis(r.shape) if self.axis is None else self.axis
        if self.axis != 1 and r.ndim > self.axis:
            r, d = np.moveaxis(r, self.axis, 1), np.moveaxis(d, self.axis, 1)
        parts = (r * r, (r - d) ** 2, r * d, d * d)
        self.sums += [float(p.sum()) for p in parts]
        if r.ndim >= 2 and 1 < r.shape[1] <= MAX_SLICES and (self.slices is None or self.slices.shape[1]
                                                                 == r.shape[1]):
            axes = tuple(a for a in range(r.ndim) if a != 1)
            s = np.stack([p.sum(axis=axes) for p in parts])
            per_sample = tuple(a for a in range(2, r.ndim))
            si, ei = (p.sum(axis=per_sample) if per_sample else p for p in parts[:2])  # [B, S]
            m = np.stack([si.sum(0), ei.sum(0), (si * si).sum(0), (ei * ei).sum(0), (si * ei).sum(0)])
            peak = np.abs(r).max(axis=axes)
            self.slices = s if self.slices is None else self.slices + s
            self.moments = m if self.moments is None else self.moments + m
            self.n += r.shape[0]
            self.peak = peak if self.peak is None else np.maximum(self.peak, peak)

    def slice_se_db(self) -> np.ndarray:
        """[S] standard error of each slice's SQNR in dB (the delta method above; inf with under 2 samples)."""
        n = self.n
        if n < 2:
            return np.full(self.moments.shape[1], np.inf)
        s1, e1, s2, e2, se = self.moments
        sm, em = s1 / n, e1 / n
        vs, ve = (s2 - n * sm * sm) / (n - 1), (e2 - n * em * em) / (n - 1)
        cov = (se - n * sm * em) / (n - 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = (vs / np.maximum(sm * sm, 1e-300) + ve / np.maximum(em * em, 1e-300)
                   - 2 * cov / np.maximum(sm * em, 1e-300)) / n
        out = 10 / np.log(10) * np.sqrt(np.maximum(rel, 0.0))
        return np.where(em == 0, 0.0, out)

    def result(self) -> dict:
        sqnr, cos = _sqnr_cos(*self.sums)
        out = {"sqnr_db": round(float(sqnr), 2), "cosine": round(float(cos), 6)}
        if self.slices is not None and self.peak.max() > 0:
            live = self.peak >= SLICE_FLOOR * self.peak.max()
            if self.n < MIN_SLICE_SAMPLES:
                out["slices"] = f"not judged: {self.n} samples, under {MIN_SLICE_SAMPLES}"
            elif live.any():
                s_sqnr, s_cos = _sqnr_cos(*self.slices)
                se = self.slice_se_db()
                z = float(ndtri(1 - 0.05 / (2 * int(live.sum()))))
                upper = np.where(live, s_sqnr + z * se, np.inf)
                k = int(np.argmin(upper))
                out["worst_slice"] = {"axis": self.axis, "index": k, "of": int(self.slices.shape[1]),
                                      "sqnr_db": round(float(s_sqnr[k]), 2), "cosine": round(float(s_cos[k]), 6),
                                      "sqnr_db_se": round(float(se[k]), 2),
                                      "sqnr_db_upper": round(float(upper[k]), 2), "z": round(z, 2),
                                      "samples": self.n, "fp32_peak": float(f"{self.peak[k]:.4g}")}
        return out


class Accumulator:
    """Running counts of one FP32-vs-quantized comparison, batch by batch: per-output SQNR and cosine, top-1
    agreement on the classification output (the first of ``class_outputs`` that is [N, C] with C > 1; None:
    the first such output of any kind) and, with labels, top-1 / top-5 of both."""

    def __init__(self, names: list[str], labels: dict | None, class_outputs: list[str] | None = None):
        self.names, self.labels, self.class_outputs = names, labels, class_outputs
        self.stats = {n: _OutputStats() for n in names}
        self.cls = None
        self.samples = 0
        self.counts = {"n": 0, "agree": 0, "labelled": 0, "fp_top1": 0, "fp_top5": 0, "q_top1": 0, "q_top5": 0,
                       "fp_only": 0, "q_only": 0}

    def update(self, paths, out_fp, out_q):
        self.samples += len(paths)
        for n, a, b in zip(self.names, out_fp, out_q):
            self.stats[n].update(a, b)
        if self.cls is None:
            self.cls = next((k for k, a in enumerate(out_fp) if a.ndim == 2 and a.shape[1] > 1 and (
                self.class_outputs is None or self.names[k] in self.class_outputs)), -1)
        if self.cls < 0:
            return
        a, b = out_fp[self.cls], out_q[self.cls]
        c = self.counts
        c["n"] += len(paths)
        c["agree"] += int(np.sum(a.argmax(1) == b.argmax(1)))
        if self.labels:
            y = np.array([self.labels.get(p, -1) for p in paths])
            keep = y >= 0
            c["labelled"] += int(keep.sum())
            right = {}
            for tag, z in (("fp", a), ("q", b)):
                top5 = np.argsort(-z, axis=1)[:, :5]
                right[tag] = (top5[:, 0] == y) & keep
                c[f"{tag}_top1"] += int(np.sum(right[tag]))
                c[f"{tag}_top5"] += int(np.sum(np.any(top5 == y[:, None], axis=1) & keep))
            c["fp_only"] += int(np.sum(right["fp"] & ~right["q"]))
            c["q_only"] += int(np.sum(right["q"] & ~right["fp"]))

    def result(self) -> dict:
        c = self.counts
        result = {"samples": self.samples, "outputs": {n: s.result() for n, s in self.stats.items()}}
        if self.cls is not None and self.cls >= 0 and c["n"]:
            result["classification_output"] = self.names[self.cls]
            result["top1_agreement"] = round(100.0 * c["agree"] / c["n"], 2)
            result["compared"] = c["n"]
            if c["labelled"]:
                m = c["labelled"]
                result.update({"labelled": m,
                               "fp32_top1": round(100.0 * c["fp_top1"] / m, 2),
                               "fp32_top5": round(100.0 * c["fp_top5"] / m, 2),
                               "quant_top1": round(100.0 * c["q_top1"] / m, 2),
                               "quant_top5": round(100.0 * c["q_top5"] / m, 2)})
                result["top1_drop"] = round(result["fp32_top1"] - result["quant_top1"], 2)
                result["top1_drop_se"] = round(drop_standard_error(c["fp_only"], c["q_only"], m), 2)
        return result


def drop_standard_error(fp_only: int, q_only: int, m: int) -> float:
    """Paired standard error of the top-1 drop in points: b = fp_only samples only FP32 gets right, c = q_only
    only the quantized model gets right, of m; 100·√(s²/m), s² = (b + c − (b − c)²/m)/(m − 1)."""
    if m < 2:
        return float("nan")
    b, c = fp_only, q_only
    return 100.0 * float(np.sqrt(max(b + c - (b - c) ** 2 / m, 0.0) / (m - 1) / m))


def check_comparable(fp_model, q_model, fp_name="FP32 model", q_name="quantized model") -> None:
    """Refuse (InputError) two models that cannot be compared sample by sample: other input names, ranks or
    static sizes, or other output names."""
    def ins(m):
        inits = {t.name for t in m.graph.initializer}
        return {i.name: [d.dim_value or None for d in i.type.tensor_type.shape.dim] for i in m.graph.input
                if i.name not in inits}
    a, b = ins(fp_model), ins(q_model)
    if set(a) != set(b):
        raise InputError(f"{q_name}: its inputs ({', '.join(b)}) are not those of {fp_name} ({', '.join(a)})")
    for k in a:
        if len(a[k]) != len(b[k]) or any(x and y and x != y for x, y in zip(a[k], b[k])):
            raise InputError(f"{q_name}: input '{k}' has shape {b[k]}, {fp_name} has {a[k]}")
    oa, ob = [o.name for o in fp_model.graph.output], [o.name for o in q_model.graph.output]
    if oa != ob:
        raise InputError(f"{q_name}: its outputs ({', '.join(ob)}) are not those of {fp_name} ({', '.join(oa)})")


def evaluate(fp_model, q_model, source, batch_size: int = 16, labels: dict | None = None,
             progress: bool = False, desc: str = "evaluating") -> dict:
    """Run both models over ``source`` (a model kept on disk: the FP32 one first, then the quantized one, so that
    one session's weights are in memory at a time); returns samples, per-output fidelity and, for a
    classification output ([N, C] class scores of a Gemm / MatMul, ptq.patterns.class_score_outputs), top-1
    agreement and — with labels — top-1 / top-5 of both."""
    on_disk = hasattr(fp_model, "graph") and folder(fp_model) is not None
    fp = session(fp_model, arena=False)
    names = [o.name for o in fp.get_outputs()]
    acc = Accumulator(names, labels, class_score_outputs(fp_model) if hasattr(fp_model, "graph") else None)
    with tqdm(total=len(source) * (2 if on_disk else 1), desc=desc, unit="img", disable=not progress,
              leave=False) as bar:
        if on_disk:  # weights kept on disk (over 2 GB): one session at a time, the FP32 outputs kept meanwhile
            fp_out = []
            for paths, feed in source.batches(batch_size):
                fp_out.append(fp.run(names, feed))
                bar.update(len(paths))
            del fp
        q = session(q_model, arena=False)
        for k, (paths, feed) in enumerate(source.batches(batch_size)):
            acc.update(paths, fp_out[k] if on_disk else fp.run(names, feed), q.run(names, feed))
            bar.update(len(paths))
    return acc.result()


def fidelity_flags(result: dict, min_sqnr_db: float, min_cosine: float) -> list[tuple[str, str]]:
    """(output, one line) per output of ``result`` (ptq.evaluate's) whose SQNR or cosine over the whole tensor is
    under the bound, or whose worst slice (of its feature axis) is under the SQNR bound with 95 % confidence (its
    upper bound is, ``_OutputStats``): the quantized model is broken there, whatever else looks fine."""
    flags = []
    for name, o in (result or {}).get("outputs", {}).items():
        if o["sqnr_db"] < min_sqnr_db or o["cosine"] < min_cosine:
            flags.append((name, f"output '{name}': SQNR {o['sqnr_db']} dB, cosine {o['cosine']} against FP32 "
                                f"(bounds {min_sqnr_db:g} dB, {min_cosine:g})"))
        elif "worst_slice" in o and o["worst_slice"].get("sqnr_db_upper", o["worst_slice"]["sqnr_db"]) < min_sqnr_db:
            w = o["worst_slice"]
            flags.append((name, f"output '{name}': slice {w['index']} of {w['of']} on axis {w['axis']} (FP32 peak "
                                f"{w['fp32_peak']:g}) at SQNR {w['sqnr_db']} ± {w.get('sqnr_db_se', 0)} dB on "
                                f"{w.get('samples', '?')} samples (bound {min_sqnr_db:g} dB, beyond its 95 % "
                                f"interval), though the whole tensor has {o['sqnr_db']} dB"))
    return flags


def parse_max_drop(text: str | None):
    """'0.5' -> (0.5, False) points of top-1; '2%' -> (2.0, True) relative to the FP32 top-1."""
    if text is None:
        return None
    t = str(text).strip()
    rel = t.endswith("%")
    try:
        value = float(t[:-1] if rel else t)
    except ValueError:
        raise InputError(f"--max-drop takes a number of top-1 points or a percentage like 2%, not {text!r}") from None
    if value < 0:
        raise InputError(f"--max-drop must be >= 0, not {text!r}")
    return value, rel


def gate_verdict(result: dict, max_drop) -> dict:
    """The accuracy gate as fields: passed, what was measured, drop, allowed, unit, standard error and samples,
    and ``line``, the one-line verdict. With labels the drop is FP32 top-1 − quantized top-1 (points, with its
    paired standard error); without, 100 − top-1 agreement with FP32 (standard error 100·√(p(1 − p)/n) of the
    disagreement rate p on n samples); with a user metric (a ptq.metric.Scorer result) the FP32 score minus the
    quantized one. InputError when ``result`` has nothing the gate can read."""
    bound, rel = max_drop
    se, samples = float("nan"), result.get("samples")
    if result.get("metric") == "user metric":  # a Scorer's result: score and drop of the user's function
        drop, what = result["drop"], "metric drop"
        if rel:
            drop, what = 100.0 * drop / max(abs(result["score"] + result["drop"]), 1e-9), "relative metric drop"
    elif "top1_drop" in result:
        drop, what, samples = result["top1_drop"], "top-1 drop", result["labelled"]
        se = result.get("top1_drop_se", float("nan"))
        if rel:
            drop, what = 100.0 * drop / max(result["fp32_top1"], 1e-9), "relative top-1 drop"
            se = 100.0 * se / max(result["fp32_top1"], 1e-9)
    elif "top1_agreement" in result:
        drop, what = 100.0 - result["top1_agreement"], "top-1 disagreement with FP32"
        samples = result.get("compared", samples)
        if rel:
            raise InputError("a relative --max-drop needs labels (labels.txt or class subfolders)")
        if samples:
            p = drop / 100.0
            se = 100.0 * float(np.sqrt(p * (1 - p) / samples))
    else:
        raise InputError("--max-drop needs a classification output ([N, C] class scores) in the model")
    unit = "%" if rel else " points"
    noise = (f"standard error ±{se:.2f}{unit}" if np.isfinite(se) else "") + (
        f"{', ' if np.isfinite(se) else ''}on {samples} samples" if samples else "")
    passed = bool(drop <= bound)
    if passed:
        line = f"accuracy gate passed: {what} {drop:.2f}{unit} <= allowed {bound:g}{unit}" + (
            f" ({noise})" if noise else "")
    else:
        line = (f"accuracy gate failed: {what} {drop:.2f}{unit} > allowed {bound:g}{unit} "
                f"(over by {drop - bound:.2f}{'; ' + noise if noise else ''})")
    return {"passed": passed, "measure": what, "drop": round(float(drop), 4), "allowed": bound,
            "unit": unit.strip(), "standard_error": round(float(se), 4) if np.isfinite(se) else None,
            "samples": samples, "line": line}


def check_gate(result: dict, max_drop) -> str | None:
    """Raise AccuracyGateError when the drop exceeds the bound; return the one-line verdict otherwise
    (``gate_verdict``)."""
    if max_drop is None:
        return None
    verdict = gate_verdict(result, max_drop)
    if not verdict["passed"]:
        raise AccuracyGateError(verdict["line"])
    return verdict["line"]


def latency_ms(model, feed: dict, runs: int = 50, warmup: int = 5) -> float:
    """Median wall time of one onnxruntime CPU run of ``model`` (a ModelProto or a path) on ``feed``, in ms."""
    return latencies_ms([model], feed, runs, warmup)[0]


def latencies_ms(models: list, feed: dict, runs: int = 50, warmup: int = 5, interleave: bool = True) -> list[float]:
    """Median wall time (ms) of one onnxruntime CPU run of each model on ``feed``, the models' runs interleaved
    (one of each per round), so that a machine slowing down or speeding up meanwhile shifts all of them alike;
    ``interleave=False``: one model after the other, one session alive at a time (models too large to hold
    together)."""
    import time

    def timed(sessions):
        for _ in range(warmup):
            for s in sessions:
                s.run(None, feed)
        ts = [[] for _ in sessions]
        for _ in range(runs):
            for s, t_list in zip(sessions, ts):
                t = time.perf_counter()
                s.run(None, feed)
                t_list.append(time.perf_counter() - t)
        return [float(np.median(t)) * 1000 for t in ts]

    def load(m):
        return session(m if not hasattr(m, "__fspath__") else str(m))
    if interleave:
        return timed([load(m) for m in models])
    return [timed([load(m)])[0] for m in models]
