"""What a default W8A8 run costs, against onnxruntime's own quantize_static (QDQ, per-channel, MinMax) on the same
images, the two alternating in one run (medians of --repeat runs each; ptq with an empty placement cache, as a
first run): wall time, CPU time (user + system, every thread) and peak RSS of each quantization process alone;
and how both grow with the calibration set (256 -> 1000 images) and the model (the
2.7 GB model's cost is in the zoo table).

    python bench/cost.py [--images 256,1000] [--models efficientnet_lite0,efficientnet_lite2]

Both tools read the same JPEG files with the same preprocessing (ptq's, for onnxruntime through a
CalibrationDataReader), so both decode them. Rows go to bench/cost_results.json and the "Cost" section of
bench/results.md."""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "bench"
RESULTS = ROOT / "bench" / "cost_results.json"
PRESET = {"efficientnet_lite0": "efficientnet-lite", "efficientnet_lite1": "efficientnet-lite",
          "efficientnet_lite2": "efficientnet-lite"}

ORT_SCRIPT = """
import sys, numpy as np
from pathlib import Path
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from ptq.data import DataSource, PRESETS, model_inputs
from ptq.model import load_model
model, out, folder, n, preset = sys.argv[1:6]
files = sorted(Path(folder).glob("*.JPEG"))
pick = sorted(np.random.default_rng(0).choice(len(files), int(n), replace=False))
src = DataSource(folder, model_inputs(load_model(model)), PRESETS[preset]).subset([files[i] for i in pick])
class Reader(CalibrationDataReader):
    def __init__(self):
        self.it = src.batches(1)
    def get_next(self):
        b = next(self.it, None)
        return None if b is None else b[1]
quantize_static(model, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax)
"""


def measured(cmd: list[str]) -> dict:
    """Run ``cmd`` in a process of its own: wall s, CPU s (user + system of it and its threads), peak RSS MB."""
    wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
               "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True); "
               "w = time.perf_counter() - t; u = resource.getrusage(resource.RUSAGE_CHILDREN); "
               "print(w, u.ru_utime + u.ru_stime, u.ru_maxrss / 1024); sys.stderr.write(r.stderr[-2000:]); "
               "sys.exit(r.returncode)")
    with tempfile.TemporaryDirectory() as cache:  # a first run: no placement decision cached from before
        p = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True,
                           env={**os.environ, "PTQ_CACHE": cache})
    if p.returncode != 0:
        raise RuntimeError(p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}")
    wall, cpu, rss = (float(v) for v in p.stdout.split()[-3:])
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "peak_rss_mb": round(rss)}


def median(runs: list[dict]) -> dict:
    """Each measure's median over the runs."""
    import numpy as np
    return {k: round(float(np.median([r[k] for r in runs])), 1 if k != "peak_rss_mb" else None) for k in runs[0]}


def imagenet_rows(models, sizes, work: Path, repeat: int = 3) -> list[dict]:
    rows = []
    calib_all = SHARED / "data" / "imagenet-calib"
    files = sorted(calib_all.glob("*.JPEG"))
    import numpy as np
    for name in models:
        path = SHARED / "models" / f"{name}.onnx"
        for n in sizes:
            folder = work / f"calib{n}"
            if not folder.exists():
                folder.mkdir()
                for i in sorted(np.random.default_rng(0).choice(len(files), n, replace=False)):
                    (folder / files[i].name).symlink_to(files[i])
            runs = {"ptq": [], "ort": []}
            for _ in range(repeat):  # alternating, so the machine's drift falls on both tools alike
                runs["ptq"].append(measured([sys.executable, "-m", "ptq", "run", str(path), "--calib", str(folder),
                                             "--preset", PRESET[name], "--calib-size", str(n), "-o",
                                             str(work / f"{name}.{n}.onnx"), "-q"]))
                runs["ort"].append(measured([sys.executable, "-c", ORT_SCRIPT, str(path),
                                             str(work / f"{name}.{n}.ort.onnx"), str(calib_all), str(n),
                                             PRESET[name]]))
            rows.append({"model": name, "size_mb": round(path.stat().st_size / 1e6, 1), "images": n,
                         "repeats": repeat, **{tool: median(r) for tool, r in runs.items()},
                         "wall_ratios": [round(p["wall_s"] / o["wall_s"], 2)
                                         for p, o in zip(runs["ptq"], runs["ort"])]})
            print(rows[-1], flush=True)
    return rows


def table(rows=None) -> list[str]:
    rows = rows if rows is not None else (json.loads(RESULTS.read_text()) if RESULTS.exists() else [])
    if not rows:
        return []
    lines = ["", "## Cost: a default W8A8 run against onnxruntime quantize_static", "",
             "Written by bench/cost.py: each quantization alone in its own process, the two tools alternating, "
             "medians of the repeats (wall s / CPU s, user + system of every thread / peak RSS MB); ptq's placement "
             "cache empty (a first run); both decode the same JPEG files with the "
             "same preprocessing. onnxruntime: QDQ, per-channel S8 weights, U8 activations, MinMax.", "",
             "| model | size MB | images | ptq wall s | ptq CPU s | ptq peak RSS MB | onnxruntime wall s | "
             "onnxruntime CPU s | onnxruntime peak RSS MB | ptq / onnxruntime wall, CPU | measured |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, o = r["ptq"], r["ort"] or {}
        ratio = (f"{p['wall_s'] / o['wall_s']:.2f}, {p['cpu_s'] / o['cpu_s']:.2f}" if o else "—")
        lines.append(f"| {r['model']} | {r['size_mb']} | {r['images'] or '—'} | {p['wall_s']} | {p['cpu_s']} | "
                     f"{p['peak_rss_mb']} | {o.get('wall_s', '—')} | {o.get('cpu_s', '—')} | "
                     f"{o.get('peak_rss_mb', '—')} | {ratio} | {r.get('when', '')} |")
    return lines


def write(rows: list[dict]) -> None:
    old = {(r["model"], r["images"]): r for r in (json.loads(RESULTS.read_text()) if RESULTS.exists() else [])}
    stamp = time.strftime("%Y-%m-%d") + f", {os.cpu_count()} cores"
    for r in rows:
        old[(r["model"], r["images"])] = {**r, "when": stamp}
    rows = sorted(old.values(), key=lambda r: (r["size_mb"], r["images"] or 0))
    RESULTS.write_text(json.dumps(rows, indent=1))
    results = ROOT / "bench" / "results.md"
    text = results.read_text()
    start = text.find("\n## Cost:")
    if start >= 0:
        end = text.find("\n## ", start + 5)
        text = text[:start] + (text[end:] if end >= 0 else "\n")
    results.write_text(text.rstrip("\n") + "\n" + "\n".join(table(rows)) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", default="256,1000")  # the calibration folder holds 1000 images
    ap.add_argument("--models", default="efficientnet_lite0")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each tool, alternating; the table has medians")
    a = ap.parse_args()
    if not SHARED.exists():
        print(f"{SHARED} is absent: nothing to measure")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        rows = imagenet_rows(a.models.split(","), [int(v) for v in a.images.split(",")], Path(tmp), a.repeat)
    write(rows)
    return 0


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    sys.exit(main())
