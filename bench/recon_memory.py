"""Peak resident memory of block reconstruction, block by block. The model is quantized as `ptq run` would with
nearest rounding (the memory does not depend on the rounding), then block reconstruction runs a few steps per
block while a thread samples the process's RSS every 0.1 s; a block's peak is the highest sample within its time
(the report's seconds per block, in order). Whether `--memory-limit` bounds the stage is measured here, on real
models, not in the tests.

    python bench/recon_memory.py MODEL.onnx CALIB_DIR [--calib-size 1024] [--iters 3] [--memory-limit 2]
        [--weight-bits 4] [--act-bits 4] [--resize 256 --crop 224 --mean 0.5,0.5,0.5 --std 0.5,0.5,0.5]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ptq.data import Preprocess, calibration_sources, model_inputs  # noqa: E402
from ptq.model import load_model  # noqa: E402
from ptq.pipeline import Config, Context, prepare, run_steps  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Sampler:
    """(time, RSS MB) every ``every`` seconds in a daemon thread."""

    def __init__(self, every: float = 0.1):
        self.samples, self.every = [], every
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            self.samples.append((time.perf_counter(), rss_mb()))
            time.sleep(self.every)

    def peak(self, t0: float, t1: float) -> float:
        return max((r for t, r in self.samples if t0 <= t <= t1), default=float("nan"))


def floats(text: str) -> tuple:
    return tuple(float(v) for v in text.split(","))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("calib")
    ap.add_argument("--calib-size", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=3, help="Adam steps per block (memory does not grow with them)")
    ap.add_argument("--memory-limit", type=float, default=2.0)
    ap.add_argument("--weight-bits", type=int, default=4)
    ap.add_argument("--act-bits", type=int, default=4)
    ap.add_argument("--resize", type=int, default=0)
    ap.add_argument("--crop", type=int, default=0)
    ap.add_argument("--mean", type=floats)
    ap.add_argument("--std", type=floats)
    a = ap.parse_args(argv)
    sampler = Sampler()
    model = load_model(a.model)
    pre = Preprocess(resize=a.resize, crop=a.crop, **{k: v for k, v in (("mean", a.mean), ("std", a.std)) if v})
    cfg = Config(weight_bits=a.weight_bits, act_bits=a.act_bits, calib_size=a.calib_size, holdout=0,
                 memory_limit=a.memory_limit, adaround=False, block_recon=False).validate()
    calib, _ = calibration_sources(a.calib, model_inputs(model), pre, cfg)
    ctx = Context(calib, False)
    state = run_steps(prepare(model, cfg), ctx, {})
    state.config = dataclasses.replace(state.config, block_recon=True, recon_iters=a.iters)
    before, t0 = rss_mb(), time.perf_counter()
    state = run_steps(state, ctx, {}, ["block_reconstruction"])
    t1 = time.perf_counter()
    rec = state.report["block_reconstruction"]
    print(f"RSS before the stage {before:.0f} MB; peak during it {sampler.peak(t0, t1):.0f} MB "
          f"(--memory-limit {a.memory_limit} GB, {a.calib_size} images, {a.iters} steps per block, {t1 - t0:.0f} s)")
    print("| block | layers | samples | crop | per part | seconds | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    start = t1 - sum(b["seconds"] for b in rec["blocks"])  # blocks run back to back at the end of the stage
    for b in rec["blocks"]:
        end = start + b["seconds"]
        crop = "×".join(map(str, b["crop"])) if b.get("crop") else ""
        print(f"| {b['layers'][0]} | {len(b['layers'])} | {b.get('samples', '')} | {crop} | "
              f"{b.get('step_samples', b.get('skipped', ''))} | {b['seconds']} | {sampler.peak(start, end):.0f} |")
        start = end


if __name__ == "__main__":
    main()
