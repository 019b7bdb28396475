"""Metrics of a quantized model against its FP32 original, both run in onnxruntime on the same samples:
top-1 / top-5 against labels, top-1 agreement with FP32, and per output the SQNR and cosine similarity.
Streaming: only running sums are kept."""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

from .errors import AccuracyGateError, InputError
from .observe import session


class _OutputStats:
    def __init__(self):
        self.signal = self.noise = self.dot = self.nq = 0.0

    def update(self, ref: np.ndarray, q: np.ndarray):
        ref, q = ref.astype(np.float64).ravel(), q.astype(np.float64).ravel()
        self.signal += float(ref @ ref)
        self.noise += float((ref - q) @ (ref - q))
        self.dot += float(ref @ q)
        self.nq += float(q @ q)

    def result(self) -> dict:
        sqnr = float("inf") if self.noise == 0 else 10 * np.log10(max(self.signal, 1e-300) / self.noise)
        cos = self.dot / np.sqrt(max(self.signal * self.nq, 1e-300))
        return {"sqnr_db": round(sqnr, 2), "cosine": round(float(cos), 6)}


def evaluate(fp_model, q_model, source, batch_size: int = 16, labels: dict | None = None,
             progress: bool = False, desc: str = "evaluating") -> dict:
    """Run both models over ``source``; returns samples, per-output fidelity and, for a classification output
    ([N, C] logits, the first such output), top-1 agreement and — with labels — top-1 / top-5 of both."""
    fp, q = session(fp_model), session(q_model)
    names = [o.name for o in fp.get_outputs()]
    stats = {n: _OutputStats() for n in names}
    cls = None
    counts = {"n": 0, "agree": 0, "labelled": 0, "fp_top1": 0, "fp_top5": 0, "q_top1": 0, "q_top5": 0}
    with tqdm(total=len(source), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for paths, feed in source.batches(batch_size):
            out_fp, out_q = fp.run(names, feed), q.run(names, feed)
            for n, a, b in zip(names, out_fp, out_q):
                stats[n].update(a, b)
            if cls is None:
                cls = next((k for k, a in enumerate(out_fp) if a.ndim == 2 and a.shape[1] > 1), -1)
            if cls >= 0:
                a, b = out_fp[cls], out_q[cls]
                counts["n"] += len(paths)
                counts["agree"] += int(np.sum(a.argmax(1) == b.argmax(1)))
                if labels:
                    y = np.array([labels.get(p, -1) for p in paths])
                    keep = y >= 0
                    counts["labelled"] += int(keep.sum())
                    for tag, z in (("fp", a), ("q", b)):
                        top5 = np.argsort(-z, axis=1)[:, :5]
                        counts[f"{tag}_top1"] += int(np.sum((top5[:, 0] == y) & keep))
                        counts[f"{tag}_top5"] += int(np.sum(np.any(top5 == y[:, None], axis=1) & keep))
            bar.update(len(paths))
    result = {"samples": len(source), "outputs": {n: s.result() for n, s in stats.items()}}
    if cls is not None and cls >= 0 and counts["n"]:
        result["classification_output"] = names[cls]
        result["top1_agreement"] = round(100.0 * counts["agree"] / counts["n"], 2)
        if counts["labelled"]:
            m = counts["labelled"]
            result.update({"labelled": m,
                           "fp32_top1": round(100.0 * counts["fp_top1"] / m, 2),
                           "fp32_top5": round(100.0 * counts["fp_top5"] / m, 2),
                           "quant_top1": round(100.0 * counts["q_top1"] / m, 2),
                           "quant_top5": round(100.0 * counts["q_top5"] / m, 2)})
            result["top1_drop"] = round(result["fp32_top1"] - result["quant_top1"], 2)
    return result


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


def check_gate(result: dict, max_drop) -> str | None:
    """Raise AccuracyGateError when the drop exceeds the bound; return a one-line verdict otherwise.

    With labels the drop is FP32 top-1 − quantized top-1 (points); without, 100 − top-1 agreement."""
    if max_drop is None:
        return None
    bound, rel = max_drop
    if "top1_drop" in result:
        drop, what = result["top1_drop"], "top-1 drop"
        if rel:
            drop, what = 100.0 * drop / max(result["fp32_top1"], 1e-9), "relative top-1 drop"
    elif "top1_agreement" in result:
        drop, what = 100.0 - result["top1_agreement"], "top-1 disagreement with FP32"
        if rel:
            raise InputError("a relative --max-drop needs labels (labels.txt or class subfolders)")
    else:
        raise InputError("--max-drop needs a classification output ([N, C] logits) in the model")
    unit = "%" if rel else " points"
    if drop > bound:
        raise AccuracyGateError(f"accuracy gate failed: {what} {drop:.2f}{unit} > allowed {bound:g}{unit} "
                                f"(over by {drop - bound:.2f})")
    return f"accuracy gate passed: {what} {drop:.2f}{unit} <= allowed {bound:g}{unit}"
