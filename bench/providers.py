"""Batch-1 latency of ptq's int8 models against FP32 on another onnxruntime execution provider (OpenVINO), beside
the CPU provider, in one process: paired, interleaved rounds (ptq.speed's method, repeated here so that the script
runs in an environment of its own, whose onnxruntime is the provider's build).

    python -m venv /tmp/ov && /tmp/ov/bin/pip install onnxruntime-openvino numpy
    ptq run efficientnet_lite0.onnx --calib DIR --preset efficientnet-lite --placement all -o /tmp/l0.int8.onnx
    /tmp/ov/bin/python bench/providers.py efficientnet_lite0=M.onnx,/tmp/l0.int8.onnx [NAME=FP32,INT8[,1x3x48x192] ...]

Rows go to bench/provider_results.json and the "Execution providers" section of bench/results.md (re-rendered by
bench/run.py's writer)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "provider_results.json"
ROUNDS = 60


def feed_for(session, shape=None) -> dict:
    """One batch-1 sample, uniform in [0, 1): of ``shape`` (the first input's), else of the inputs' shapes with
    their dynamic dimensions 1."""
    rng = np.random.default_rng(0)
    out = {}
    for k, i in enumerate(session.get_inputs()):
        shape = shape if shape and k == 0 else [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
        out[i.name] = rng.random(shape, dtype=np.float32)
    return out


def paired(fp: str, q: str, provider: str, shape=None) -> dict:
    """Geometric mean of t_int8 / t_fp32 over ROUNDS paired rounds (alternating order) and its 95 % interval."""
    opts = ort.SessionOptions()
    sessions = [ort.InferenceSession(p, opts, providers=[provider]) for p in (fp, q)]
    feed = feed_for(sessions[0], shape)
    for s in sessions:
        for _ in range(3):
            s.run(None, feed)
    t = np.zeros((ROUNDS, 2))
    for i in range(ROUNDS):
        for k in ((0, 1) if i % 2 == 0 else (1, 0)):
            t0 = time.perf_counter()
            sessions[k].run(None, feed)
            t[i, k] = time.perf_counter() - t0
    logs = np.log(t[:, 1] / t[:, 0])
    half = 1.96 * logs.std(ddof=1) / np.sqrt(ROUNDS)
    return {"fp32_ms": round(float(np.median(t[:, 0])) * 1000, 3),
            "int8_ms": round(float(np.median(t[:, 1])) * 1000, 3),
            "ratio": round(float(np.exp(logs.mean())), 3),
            "ratio_ci": [round(float(np.exp(logs.mean() - half)), 3), round(float(np.exp(logs.mean() + half)), 3)]}


def table(rows=None) -> list[str]:
    rows = rows if rows is not None else (json.loads(RESULTS.read_text()) if RESULTS.exists() else [])
    if not rows:
        return []
    lines = ["", "## Execution providers: the same int8 model on another onnxruntime build", "",
             "Written by bench/providers.py, in an environment whose onnxruntime is the provider's build "
             "(onnxruntime-openvino from the registry); ptq's model built with `--placement all` (every layer int8), "
             "batch 1, paired interleaved rounds.", "",
             "| model | provider | onnxruntime | FP32 ms | int8 ms | int8 × FP32 (95 % interval) | measured |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['provider']} | {r['onnxruntime']} | {r['fp32_ms']} | {r['int8_ms']} | "
                     f"{r['ratio']} ({r['ratio_ci'][0]}–{r['ratio_ci'][1]}) | {r['when']} |")
    return lines


def main(pairs: list[str]) -> int:
    rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    keep = {(r["model"], r["provider"]): r for r in rows}
    for spec in pairs:
        name, paths = spec.split("=", 1)
        fp, q, *shape = paths.split(",")
        shape = [int(d) for d in shape[0].split("x")] if shape else None
        for provider in ("OpenVINOExecutionProvider", "CPUExecutionProvider"):
            if provider not in ort.get_available_providers():
                continue
            r = {"model": name, "provider": provider, "onnxruntime": ort.__version__, **paired(fp, q, provider, shape),
                 "when": time.strftime("%Y-%m-%d")}
            keep[(name, provider)] = r
            print(r, flush=True)
    RESULTS.write_text(json.dumps(sorted(keep.values(), key=lambda r: (r["model"], r["provider"])), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
