"""Benchmark: ptq against onnxruntime's quantize_static on the real models and ImageNet images of
../shared/bench; writes bench/results.md.

    python bench/run.py [--models efficientnet_lite0 ...] [--suites core,ort] [--val-limit N]

Quantization runs as a subprocess (`ptq run`, or bench/ort_baseline.py) so that its wall time and peak RSS are
measured alone; evaluation runs both models in onnxruntime on the same preprocessed validation images.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "bench"
CACHE = ROOT / "bench" / ".cache"
sys.path.insert(0, str(ROOT))

from ptq.data import Preprocess, load_image  # noqa: E402
from ptq.evaluate import evaluate, latency_ms as ptq_latency_ms  # noqa: E402
from ptq.model import load_model  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from latency import random_feed  # noqa: E402

NORM_05 = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
NORM_0498 = dict(mean=(0.498, 0.498, 0.498), std=(0.502, 0.502, 0.502))
MODELS = {  # name: (calibration preprocessing, validation preprocessing) — from ../shared/bench/README.md
    "efficientnet_lite0": (Preprocess(resize=256, crop=224, **NORM_05), Preprocess(crop=224, **NORM_05)),
    "efficientnet_lite0_bn": (Preprocess(resize=256, crop=224, **NORM_05), Preprocess(crop=224, **NORM_05)),
    "efficientnet_lite1": (Preprocess(resize=272, crop=240, interp="bicubic", **NORM_0498),
                           Preprocess(resize=272, crop=240, interp="bicubic", **NORM_0498)),
    "efficientnet_lite2": (Preprocess(resize=292, crop=260, interp="bicubic", **NORM_0498),
                           Preprocess(resize=292, crop=260, interp="bicubic", **NORM_0498)),
}
PRESET_FLAGS = {p: [] for p in MODELS}


def flags_for(pre: Preprocess) -> list[str]:
    return ["--resize", str(pre.resize), "--crop", str(pre.crop), "--interp", pre.interp,
            "--mean", ",".join(map(str, pre.mean)), "--std", ",".join(map(str, pre.std))]


@dataclass
class Row:
    model: str
    tool: str
    config: str
    top1: float = float("nan")
    top5: float = float("nan")
    drop: float = float("nan")
    agree: float = float("nan")
    seconds: float = float("nan")
    rss_mb: float = float("nan")
    size_mb: float = float("nan")
    latency: float = float("nan")
    note: str = ""
    drop_se: float = float("nan")  # paired standard error of the drop (rows measured since 2026-11-24)
    saturating: bool | None = None  # measured where onnxruntime saturates u8×s8 (ptq.runtime); None: not recorded
    latency_ci: list | None = None  # the latency's 95 % interval (paired rounds); None: a median ratio, no interval


class ArraySource:
    """Preprocessed images in a memory-mapped .npy, served in batches like ptq.data.DataSource."""

    def __init__(self, path: Path, names: list[str], labels: dict[str, int] | None, input_name: str):
        self.x = np.load(path, mmap_mode="r")
        self.names = names
        self.input_name = input_name
        self._labels = labels

    def __len__(self):
        return len(self.names)

    def batches(self, batch_size):
        for k in range(0, len(self.names), batch_size):
            yield self.names[k:k + batch_size], {self.input_name: np.ascontiguousarray(self.x[k:k + batch_size])}

    def labels(self):
        return self._labels


def cached_images(tag: str, files: list[Path], pre: Preprocess) -> Path:
    """Preprocess once into bench/.cache/<tag>.npy (float32 [N, 3, H, W])."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"{tag}.npy"
    if path.exists():
        return path
    first = load_image(files[0], pre)
    tmp = CACHE / f".{tag}.tmp.npy"
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(files),) + first.shape)
    for k, f in enumerate(files):
        arr[k] = load_image(f, pre)
    arr.flush()
    del arr
    os.replace(tmp, path)
    return path


def run_measured(cmd: list[str]) -> tuple[float, str]:
    """Run a command; return (wall seconds, output). Peak RSS comes from the process itself (its VmHWM):
    a forked child's ru_maxrss would count this big parent's pages."""
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-2000:]}")
    return time.perf_counter() - t0, p.stdout


def latency_ms(model_path: Path, shape, runs: int = 50) -> float:
    return ptq_latency_ms(model_path, random_feed(str(model_path), list(shape)), runs)


def latency_ratio(q_path: Path, fp_path: Path, shape) -> tuple[float, list[float]]:
    """Quantized / FP32 batch-1 latency and its 95 % interval on a random feed of ``shape``, timed as the zoo times
    it (``zoo.latency_ratio``: paired, interleaved rounds)."""
    import zoo
    return zoo.latency_ratio(fp_path, q_path, random_feed(str(fp_path), list(shape)))


def cle_invariance(fp, val: ArraySource, limit: int = 256) -> float:
    """max |y_CLE − y| / max |y| over the logits of ``limit`` validation images: CLE alone must keep FP32."""
    from ptq.pipeline import Config, Context, prepare
    from ptq.stages.cle import equalize
    state = prepare(fp, Config(cle=True))
    eq = equalize(state, Context()).model
    o = ort.SessionOptions()
    o.log_severity_level = 3
    s0, s1 = (ort.InferenceSession(m.SerializeToString(), o, providers=["CPUExecutionProvider"])
              for m in (fp, eq))
    worst, seen = 0.0, 0
    for _, feed in val.batches(32):
        y0, y1 = s0.run(None, feed)[0], s1.run(None, feed)[0]
        worst = max(worst, float(np.abs(y1 - y0).max() / np.abs(y0).max()))
        seen += len(y0)
        if seen >= limit:
            break
    return worst


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--suites", default="core,cle,easyquant,adaround,debug,ort,zoo",
                    help="core: W8A8 ranges; cle: CLE / bias correction / data-free; easyquant: EasyQuant at W8A8 "
                         "and W7A7 against minmax / mse; adaround: W4A8 nearest vs AdaRound; "
                         "debug: sensitivity + auto-fix; ort: onnxruntime baseline; zoo: other model families "
                         "(bench/zoo.py)")
    ap.add_argument("--ort-models", nargs="*", default=["efficientnet_lite0"],
                    help="models for the onnxruntime baseline (its Entropy/Percentile take ~100 s and 16 GB each)")
    ap.add_argument("--debug-models", nargs="*", default=["efficientnet_lite0"],
                    help="models for the debug suite (per-quantizer sensitivity and auto-fix at W4A8 per-tensor)")
    ap.add_argument("--adaround-models", nargs="*", default=["efficientnet_lite0"],
                    help="models for the AdaRound suite (W4A8 nearest vs AdaRound, all 1000 calibration images; "
                         "each AdaRound run takes about 8 minutes on lite0)")
    ap.add_argument("--only", default="", help="run only the ptq configurations whose name contains this text")
    ap.add_argument("--calib-size", type=int, default=256)
    ap.add_argument("--val-limit", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the quantized models and their reports (a temporary "
                    "folder, printed at the end); by default it is removed")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results.md"))
    args = ap.parse_args()
    if not SHARED.is_dir():
        print(f"benchmark data not found at {SHARED}: nothing to measure")
        return 0
    work = Path(tempfile.mkdtemp(prefix="ptq-bench-"))
    try:
        return measure(args, work)
    finally:
        if args.keep:
            print(f"the quantized models and reports are in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def measure(args, work: Path) -> int:
    """Runs the chosen suites with their models and reports in ``work``, then writes the results table."""
    suites = set(args.suites.split(","))
    calib_dir = SHARED / "data" / "imagenet-calib"
    val_dir = SHARED / "data" / "imagenet-val"
    val_labels = {l.split()[0]: int(l.split()[1]) for l in (val_dir / "labels.txt").read_text().splitlines() if l}
    val_files = sorted(val_dir / f for f in val_labels)
    if args.val_limit:
        val_files = val_files[: args.val_limit]
    calib_files = sorted(calib_dir.glob("*.JPEG"))
    pick = np.random.default_rng(0).choice(len(calib_files), args.calib_size, replace=False)
    calib_pick = [calib_files[i] for i in sorted(pick)]
    rows: dict = load_rows()
    calib_link = work / "calib"
    calib_link.mkdir()
    for f in calib_pick:  # the same 256 images for every tool
        (calib_link / f.name).symlink_to(f)
    for name in (args.models if suites - {"zoo"} else []):  # the ImageNet suites
        model_path = SHARED / "models" / f"{name}.onnx"
        cal_pre, val_pre = MODELS[name]
        fp = load_model(model_path)
        input_name = fp.graph.input[0].name
        val_npy = cached_images(f"{name}-val{len(val_files)}", val_files, val_pre)
        val = ArraySource(val_npy, [f.name for f in val_files], {f.name: val_labels[f.name] for f in val_files},
                          input_name)
        shape = (1,) + np.load(val_npy, mmap_mode="r").shape[1:]
        fp_lat = latency_ms(model_path, shape)
        fp_size = model_path.stat().st_size
        base = evaluate(fp, fp, val, 32, val.labels())  # FP32 against itself: its accuracy
        add(rows, Row(name, "FP32", "—", base["fp32_top1"], base["fp32_top5"], 0.0, 100.0,
                      size_mb=fp_size / 1e6, latency=1.0, note=f"{fp_lat:.2f} ms batch 1"))
        print(f"{name}: FP32 top-1 {base['fp32_top1']} top-5 {base['fp32_top5']}", flush=True)

        def score(tool, config, qpath, seconds, rss, note=""):
            q = load_model(qpath)
            r = evaluate(fp, q, val, 32, val.labels())
            ratio, ci = latency_ratio(qpath, model_path, shape)
            row = Row(name, tool, config, r["quant_top1"], r["quant_top5"], r["top1_drop"], r["top1_agreement"],
                      seconds, rss, qpath.stat().st_size / 1e6, ratio, note, r["top1_drop_se"], latency_ci=ci)
            add(rows, row)
            print(f"  {tool} {config}: top-1 {row.top1} drop {row.drop} agree {row.agree} "
                  f"{seconds:.1f}s {rss:.0f}MB lat {row.latency:.2f}", flush=True)
            write(rows, args.out)

        def ptq_run(config, out, extra):
            if args.only and args.only not in config:
                return
            cmd = [sys.executable, "-m", "ptq", "run", str(model_path), "-o", str(out), "--holdout", "0",
                   "--calib-size", str(args.calib_size), "-q", *flags_for(cal_pre)]
            if "--data-free" not in extra and "--calib" not in extra:
                cmd += ["--calib", str(calib_link)]
            cmd += extra  # later flags win
            try:
                sec, _ = run_measured(cmd)
            except RuntimeError as e:
                add(rows, Row(name, "ptq", config, note="failed: " + str(e).splitlines()[-1][:100]))
                write(rows, args.out)
                return
            rep = json.loads(out.with_name(out.stem + ".report.json").read_text())
            t = rep["timings"]
            extra_s = sum(t.get(k, 0) for k in ("cle", "bias_absorption", "bias_correction"))
            note = f"CLE+BC stages {extra_s:.1f} s" if extra_s else ""
            for stage in ("easyquant", "adaround"):
                if stage in t:
                    note += f"{'; ' if note else ''}{stage} {t[stage]:.0f} s"
            stages = rep.get("stages") or {}
            kept = [f"{c} {stages[k]['sqnr_db_' + a]} / {stages[k]['sqnr_db_' + b]} dB kept {stages[k]['kept']}"
                    for k, c, a, b in (("cle_choice", "CLE", "with", "without"),
                                       ("symmetry_choice", "symmetric / asymmetric", "symmetric", "asymmetric"))
                    if k in stages]
            note = "; ".join([note] * bool(note) + kept)
            score("ptq", config, out, sec, rep["peak_rss_mb"], note)

        if "core" in suites:
            for gran in ("per-channel", "per-tensor"):
                for rng_name, rflags in (("minmax", ["--weight-range", "minmax", "--act-range", "minmax",
                                                     "--logits-range", "minmax"]),
                                         ("mse+xent", []),):
                    out = work / f"{name}-{gran}-{rng_name}.onnx"
                    ptq_run(f"W8A8 {gran} {rng_name}", out, [f"--{gran}", *rflags])
            if name == "efficientnet_lite0":  # memory must not grow with the calibration set
                ptq_run("W8A8 per-channel mse+xent, 1000 calibration images", work / f"{name}-1000.onnx",
                        ["--calib-size", "1000", "--calib", str(calib_dir)])
        if "cle" in suites:
            change = cle_invariance(fp, val)
            add(rows, Row(name, "ptq", "FP32 after CLE alone (invariance)", note=f"max relative logit change "
                          f"{change:.1e} on 256 val images"))
            print(f"  CLE invariance: {change:.1e}", flush=True)
            lo = (0 - cal_pre.mean[0]) / cal_pre.std[0]
            hi = (1 - cal_pre.mean[0]) / cal_pre.std[0]
            for config, extra in (("W8A8 per-tensor mse+xent +CLE", ["--per-tensor", "--cle"]),
                                  ("W8A8 per-tensor mse+xent +CLE+BC", ["--per-tensor", "--cle",
                                                                        "--bias-correction", "empirical"]),
                                  ("W8A8 per-channel mse+xent +CLE+BC", ["--per-channel", "--cle",
                                                                         "--bias-correction", "empirical"]),
                                  ("W8A8 per-tensor data-free", ["--per-tensor", "--data-free",
                                                                 "--input-range", f"{lo:.4f},{hi:.4f}"])):
                ptq_run(config, work / f"{name}-{config.replace(' ', '_').replace('+', 'p')}.onnx", extra)
        if "easyquant" in suites:
            mm = ["--weight-range", "minmax", "--act-range", "minmax", "--logits-range", "minmax"]
            for bits in (8, 7):
                bflags = ["--weight-bits", str(bits), "--act-bits", str(bits)]
                for gran in ("per-tensor", "per-channel"):
                    runs = [("EasyQuant", ["--easyquant"])]
                    if bits == 7:  # the 8-bit minmax / mse rows come from the core suite
                        runs = [("minmax", mm), ("mse+xent", [])] + runs
                        runs.append(("EasyQuant+BC", ["--easyquant", "--bias-correction", "empirical"])
                                    if gran == "per-channel" else
                                    ("CLE+EasyQuant+BC", ["--cle", "--easyquant", "--bias-correction", "empirical"]))
                    for label, extra in runs:
                        config = f"W{bits}A{bits} {gran} {label}"
                        ptq_run(config, work / f"{name}-{config.replace(' ', '_').replace('+', 'p')}.onnx",
                                [f"--{gran}", *bflags, *extra])
        if "adaround" in suites and name in args.adaround_models:
            images = ["--calib-size", "1024", "--calib", str(calib_dir)]
            defaults = ["--holdout", "32"]  # what a user gets: 32 images held back decide the CLE choice
            sym4 = ["--weight-bits", "4", "--weight-symmetric"]  # rows measured when weights were always symmetric
            for config, extra in (("W4A8 per-channel defaults (--weight-bits 4)",
                                   ["--weight-bits", "4", *images, *defaults]),
                                  ("W4A8 per-tensor defaults (--weight-bits 4 --per-tensor)",
                                   ["--weight-bits", "4", "--per-tensor", *images, *defaults]),
                                  ("W4A8 per-channel symmetric weights (--weight-bits 4 --weight-symmetric)",
                                   [*sym4, *images, *defaults]),
                                  ("W4A8 per-tensor symmetric weights (--weight-bits 4 --per-tensor "
                                   "--weight-symmetric)", [*sym4, "--per-tensor", *images, *defaults]),
                                  ("W4A8 per-channel asymmetric weights (--weight-bits 4 --weight-asymmetric)",
                                   ["--weight-bits", "4", "--weight-asymmetric", *images, *defaults]),
                                  ("W4A8 per-tensor asymmetric weights (--weight-bits 4 --per-tensor "
                                   "--weight-asymmetric)", ["--weight-bits", "4", "--per-tensor",
                                                            "--weight-asymmetric", *images, *defaults]),
                                  ("W4A8 per-tensor, first and head layers' weights at 8 bits (--weight-bits 4 "
                                   "--per-tensor --weight-asymmetric --cle --ends-8bit)",
                                   ["--weight-bits", "4", "--per-tensor", "--weight-asymmetric", "--cle", "--ends-8bit",
                                    *images, *defaults]),
                                  ("W4A8 per-channel nearest", [*sym4, "--per-channel", "--no-adaround", "--no-cle"]),
                                  ("W4A8 per-channel AdaRound", [*sym4, "--per-channel", "--adaround", "--no-cle",
                                                                 *images]),
                                  ("W4A8 per-tensor CLE nearest", [*sym4, "--per-tensor", "--cle", "--no-adaround"]),
                                  ("W4A8 per-tensor CLE+AdaRound", [*sym4, "--per-tensor", "--cle", "--adaround",
                                                                    *images]),
                                  ("W4A8 per-channel CLE+AdaRound", [*sym4, "--per-channel", "--cle", "--adaround",
                                                                     *images]),
                                  ("W4A8 per-channel asymmetric CLE+AdaRound",
                                   ["--per-channel", "--weight-asymmetric", "--weight-bits", "4", "--cle",
                                    "--adaround", *images]),
                                  ("W8A8 per-channel AdaRound", ["--per-channel", "--adaround", *images]),
                                  ("W4A4 per-channel AdaRound for the weights' error alone (--weight-bits 4 "
                                   "--act-bits 4 --adaround-inputs quantized), 256 images",
                                   ["--weight-bits", "4", "--act-bits", "4", "--adaround-inputs", "quantized",
                                    *defaults]),
                                  ("W4A4 per-channel block reconstruction after AdaRound for the weights' error "
                                   "alone (--weight-bits 4 --act-bits 4 --adaround-inputs quantized --block-recon), "
                                   "256 images",
                                   ["--weight-bits", "4", "--act-bits", "4", "--adaround-inputs", "quantized",
                                    "--block-recon", *defaults]),
                                  ("W4A4 per-channel defaults (--weight-bits 4 --act-bits 4), 256 images",
                                   ["--weight-bits", "4", "--act-bits", "4", *defaults])):
                ptq_run(config, work / f"{name}-{config.replace(' ', '_').replace('+', 'p')}.onnx", extra)
        if "debug" in suites and name in args.debug_models:
            w4 = ["--per-tensor", "--weight-bits", "4", "--weight-symmetric", "--no-adaround", "--no-cle"]
            val_flags = ["--eval", str(val_dir), "--eval-resize", str(val_pre.resize), "--eval-crop",
                         str(val_pre.crop)]
            html = work / f"{name}-debug.html"
            try:
                sec, _ = run_measured([sys.executable, "-m", "ptq", "debug", str(model_path), "--calib",
                                       str(calib_link), "-o", str(html), "-q", "--samples", "256",
                                       *flags_for(cal_pre), *w4, *val_flags])
                d = json.loads(html.with_suffix(".json").read_text())
                t = d["timings"]
                worst = ", ".join(f"{r['id'].split('/')[-2] if '/' in r['id'] else r['id']} ({r['drop']:.1f})"
                                  for r in d["per_quantizer"][:3])
                add(rows, Row(name, "ptq debug", "W4A8 per-tensor nearest: per-quantizer sensitivity, 256 val images",
                              top1=d["quantized"]["score"], drop=d["quantized"]["drop"], seconds=sec,
                              note=f"{len(d['per_quantizer'])} quantizers in {t['per_quantizer']:.0f} s "
                                   f"(+FP32 reference {t['fp32_reference']:.0f} s); dominant: "
                                   f"{d['weights_vs_activations']['dominant']}; worst: {worst}"))
            except RuntimeError as e:
                add(rows, Row(name, "ptq debug", "W4A8 per-tensor sensitivity", note="failed: " + str(e)[-100:]))
            write(rows, args.out)
            out = work / f"{name}-autofix.onnx"
            cmd = [sys.executable, "-m", "ptq", "run", str(model_path), "-o", str(out), "--holdout", "0", "-q",
                   "--calib", str(calib_link), *flags_for(cal_pre), *w4, *val_flags, "--max-drop", "1.0",
                   "--auto-fix"]
            t0 = time.perf_counter()
            p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               stdin=subprocess.DEVNULL)
            sec = time.perf_counter() - t0
            rep_path = out.with_name(out.stem + ".report.json")
            if p.returncode in (0, 3) and rep_path.exists():
                rep = json.loads(rep_path.read_text())
                fix = rep.get("auto_fix", {})
                score("ptq", "W4A8 per-tensor nearest, --max-drop 1.0 --auto-fix (16 bits)", out, sec,
                      rep["peak_rss_mb"], f"exit {p.returncode}; raised {len(fix.get('raised', []))} of "
                      f"{fix.get('quantizers')} quantizers ({100 * fix.get('raised_share', 0):.1f} %); drop "
                      f"{fix.get('drop_before')} -> {fix.get('drop_after')}")
            else:
                add(rows, Row(name, "ptq", "W4A8 per-tensor --auto-fix", note="failed: " + p.stdout[-100:]))
        if "ort" in suites and name in args.ort_models:
            calib_npy = cached_images(f"{name}-calib{args.calib_size}", calib_pick, cal_pre)
            for method in ("MinMax", "Entropy", "Percentile"):
                for pc in ("1", "0"):
                    out = work / f"{name}-ort-{method}-{pc}.onnx"
                    cmd = [sys.executable, str(ROOT / "bench" / "ort_baseline.py"), str(model_path), str(out),
                           str(calib_npy), method, pc]
                    try:
                        sec, text = run_measured(cmd)
                        rss = float(text.split("peak_rss_mb")[1].split()[0])
                    except RuntimeError as e:
                        add(rows, Row(name, "onnxruntime quantize_static", f"{method} pc={pc}", note=str(e)[:80]))
                        continue
                    score("onnxruntime quantize_static",
                          f"W8A8 S8S8 {'per-channel' if pc == '1' else 'per-tensor'} {method}", out, sec, rss)
    if "zoo" in suites:
        import zoo
        zoo.measure(work)
    write(rows, args.out)
    print(f"wrote {args.out}")
    return 0


RESULTS_JSON = ROOT / "bench" / "results.json"


def load_rows() -> dict:
    """Earlier results (bench/results.json): a run of some suites or models updates only its own rows."""
    if RESULTS_JSON.exists():
        return {tuple(k.split("|")): Row(**v) for k, v in json.loads(RESULTS_JSON.read_text()).items()}
    return {}


def add(rows: dict, row: Row) -> None:
    from ptq.runtime import saturates_u8s8
    row.saturating = saturates_u8s8()
    rows[(row.model, row.tool, row.config)] = row


def write(rows: dict, out: str):
    import dataclasses
    RESULTS_JSON.write_text(json.dumps({"|".join(k): dataclasses.asdict(r) for k, r in rows.items()}, indent=1))
    rows = [rows[k] for k in sorted(rows, key=lambda k: (k[0], k[1] != "FP32", k[1], k[2]))]
    import platform
    lines = ["# Benchmark results", "",
             f"Written by `make bench` (bench/run.py) on {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, "
             f"onnxruntime {ort.__version__}, Python {platform.python_version()}. Calibration: 256 images of "
             f"../shared/bench/data/imagenet-calib (the same for every tool); evaluation: imagenet-val "
             f"(1300 images). Drop and agreement are against FP32 on the same images; ± is the drop's paired "
             f"standard error (README, Evaluation), in rows measured since it was added. Time and peak RSS are of "
             f"the quantization process alone; latency is onnxruntime CPU, batch 1, relative to FP32: with its 95 % "
             f"interval, the geometric mean of 100 paired, interleaved rounds (rows without one: medians of 50 "
             f"interleaved runs). "
             f"ptq defaults: weights per-channel MSE, activations MSE, logits cross-entropy (mse+xent); "
             f"BC = empirical bias correction; data-free uses no calibration images. Rows marked † were measured on "
             f"an x86 CPU whose onnxruntime adds u8×s8 products in saturating int16 (no AVX-VNNI), where ptq's "
             f"default `--reduce-range auto` gives the 8-bit weights of non-depthwise layers 7 bits (README, "
             f"Saturating int8 kernels) and onnxruntime quantize_static's 8-bit models saturate; the others on a CPU "
             f"without that saturation.", "",
             "| model | tool | config | top-1 | top-5 | drop | top-1 agreement % | quant time s | peak RSS MB | "
             "size MB | latency × FP32 | note |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    def f(v, nd=2):
        if isinstance(v, float):
            return "—" if np.isnan(v) else f"{v:.{nd}f}"
        return str(v)
    pm = lambda se: "" if np.isnan(se) else f" ± {se:.2f}"  # noqa: E731
    for r in rows:
        mark = " †" if r.saturating else ""
        lines.append(f"| {r.model} | {r.tool} | {r.config}{mark} | {f(r.top1)} | {f(r.top5)} "
                     f"| {f(r.drop)}{pm(r.drop_se)} "
                     f"| {f(r.agree)} | {f(r.seconds, 1)} | {f(r.rss_mb, 0)} | {f(r.size_mb)} | {f(r.latency)}"
                     f"{f' ({r.latency_ci[0]:.2f}–{r.latency_ci[1]:.2f})' if r.latency_ci else ''} | {r.note} |")
    import cost
    import providers
    import zoo
    Path(out).write_text("\n".join(lines + zoo.table() + cost.table() + providers.table()) + "\n")


if __name__ == "__main__":
    sys.exit(main())
