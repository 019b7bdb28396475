"""Batch-1 latency of several ONNX models on one random feed, timed in one process with their runs interleaved
(ptq.evaluate.latencies_ms), each relative to the first: the way to compare two layouts of one quantized model
against its FP32 model without a machine's drift between separate runs.

    python bench/latency.py FP32.onnx A.onnx [B.onnx ...] [--shape 1,3,320,320] [--runs 200]

Dynamic dimensions are 1 unless --shape gives the first input's shape; other inputs take their static shape.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ptq.evaluate import latencies_ms  # noqa: E402

TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def random_feed(path: str, shape: list[int] | None) -> dict:
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {}
    for k, i in enumerate(s.get_inputs()):
        dims = shape if k == 0 and shape else [d if isinstance(d, int) else 1 for d in i.shape]
        feed[i.name] = rng.standard_normal(dims).astype(TYPES.get(i.type, np.float32))
    return feed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--shape", type=lambda s: [int(v) for v in s.split(",")])
    ap.add_argument("--runs", type=int, default=200)
    a = ap.parse_args()
    ms = latencies_ms(a.models, random_feed(a.models[0], a.shape), a.runs, warmup=20)
    for path, t in zip(a.models, ms):
        print(f"{t:8.3f} ms  {t / ms[0]:.3f}x  {path}")


if __name__ == "__main__":
    main()
