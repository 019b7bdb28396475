"""``ptq`` commands. Exit codes: 0 success, 1 internal error, 2 bad input or usage, 3 accuracy gate failed."""
from __future__ import annotations

import dataclasses
import sys

import click

from ptq import __version__
from ptq.errors import AccuracyGateError, InputError, PTQError, QualityError

EXIT_INTERNAL, EXIT_INPUT = 1, 2


def _floats(text):
    if text is None:
        return None
    try:
        vals = tuple(float(v) for v in str(text).replace(",", " ").split())
    except ValueError:
        raise InputError(f"expected numbers like '0.5,0.5,0.5', got {text!r}") from None
    return vals


def preprocess_options(prefix: str = ""):
    """Image preprocessing flags (shared by run and eval)."""
    def deco(f):
        opts = [
            click.option(f"--{prefix}preset", type=click.Choice(["imagenet", "inception", "efficientnet-lite",
                                                                  "ppocr-det"]),
                         help="Named preprocessing; the flags below override its fields."),
            click.option(f"--{prefix}resize", type=int, help="Resize the short side to N pixels (0: no resize)."),
            click.option(f"--{prefix}crop", type=int, help="Center-crop N×N pixels (0: no crop)."),
            click.option(f"--{prefix}mean", help="Per-channel mean subtracted after scaling, e.g. 0.485,0.456,0.406."),
            click.option(f"--{prefix}std", help="Per-channel std divided by, e.g. 0.229,0.224,0.225."),
            click.option(f"--{prefix}scale", type=float, help="Pixel scale before mean/std (default 1/255)."),
            click.option(f"--{prefix}layout", type=click.Choice(["nchw", "nhwc"]), help="Tensor layout (nchw)."),
            click.option(f"--{prefix}color", type=click.Choice(["rgb", "bgr"]), help="Channel order (rgb)."),
            click.option(f"--{prefix}interp", type=click.Choice(["bilinear", "bicubic", "nearest"]),
                         help="Resize interpolation (bilinear)."),
        ]
        for o in reversed(opts):
            f = o(f)
        return f
    return deco


def build_preprocess(kw: dict, prefix: str = "", base=None):
    from ptq.data import PRESETS, Preprocess
    p = lambda k: kw.pop(f"{prefix}{k}", None)  # noqa: E731
    preset = p("preset")
    pre = PRESETS[preset] if preset else (base or Preprocess())
    fields = {"resize": p("resize"), "crop": p("crop"), "mean": _floats(p("mean")), "std": _floats(p("std")),
              "scale": p("scale"), "layout": p("layout"), "color": p("color"), "interp": p("interp")}
    changed = {k: v for k, v in fields.items() if v is not None}
    return dataclasses.replace(pre, **changed) if (changed or preset or base) else None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ptq")
def cli():
    """ptq — post-training quantization of ONNX models to QDQ format."""


def quant_options(f):
    """The quantization settings shared by ``run`` and ``debug``."""
    opts = [
        click.option("--calib", "calib", type=click.Path(), help="Calibration folder: images, or .npy/.npz samples."),
        click.option("--calib-feeds", type=click.Path(),
                     help="Folder of .npz files, each one complete feed passed to the model as it is."),
        click.option("--calib-reader",
                     help="module:function (or file.py:function) returning or yielding feed dicts."),
        click.option("--recipe", type=click.Path(dir_okay=False),
                     help="TOML recipe: settings and per-tensor overrides."),
        click.option("--weight-bits", type=int, help="Weight bits, 2-8 (8)."),
        click.option("--act-bits", type=int, help="Activation bits, 2-8 or 16 (8)."),
        click.option("--per-channel/--per-tensor", default=None, help="Weight granularity (per-channel)."),
        click.option("--weight-range", type=click.Choice(["minmax", "mse"]), help="Weight range method (mse)."),
        click.option("--weight-symmetric/--weight-asymmetric", default=None,
                     help="Weight grid: symmetric signed, or asymmetric with a zero point (symmetric; for weights of 4 "
                          "bits or fewer both are tried and the closer to FP32 kept)."),
        click.option("--reduce-range", type=click.Choice(["auto", "always", "never"]),
                     help="8-bit weights of non-depthwise convolutions in [-64, 63], as onnxruntime needs where it "
                          "adds u8×s8 products in saturating int16 (x86 without VNNI); auto: where the target "
                          "saturates (auto)."),
        click.option("--target", type=click.Choice(["auto", "vnni", "avx2"]),
                     help="The runtime the model is built for: vnni (exact integer products: AVX-VNNI, AVX-512 "
                          "VNNI, ARM), avx2 (x86 without VNNI: u8×s8 pairs saturate), auto: this machine (auto)."),
        click.option("--act-range", type=click.Choice(["minmax", "mse", "percentile", "bn"]),
                     help="Activation range method (mse)."),
        click.option("--logits-range", type=click.Choice(["xent", "minmax", "mse", "percentile", "bn"]),
                     help="Range method for the logits tensor (xent)."),
        click.option("--ends-8bit/--no-ends-8bit", default=None,
                     help="The model's inputs and outputs, the inputs of its head layers and the weights of its "
                          "first and head layers keep 8 bits (on for activations of 4 bits or fewer)."),
        click.option("--act-symmetric/--act-asymmetric", default=None, help="Activation grid (asymmetric uint8)."),
        click.option("--percentile", type=float, help="Percentile for --act-range percentile (99.99)."),
        click.option("--cle/--no-cle", default=None,
                     help="Cross-layer equalization + high-bias absorption (off; for weights of 4 bits or "
                          "fewer: both, keeping the model closer to FP32)."),
        click.option("--smoothquant/--no-smoothquant", default=None,
                     help="SmoothQuant on MatMuls with outlier input channels, where it measures better (on)."),
        click.option("--adaround/--no-adaround", default=None,
                     help="AdaRound: learned weight rounding (on for weights of 4 bits or fewer, else off)."),
        click.option("--adaround-iters", type=int, help="Adam iterations per layer (500)."),
        click.option("--adaround-batch", type=int, help="rows per Adam step, layers with an activation (1024)."),
        click.option("--adaround-inputs", type=click.Choice(["fp32", "quantized", "quantized_acts"]),
                     help="each layer's input while rounding: from the FP32 network, from the network whose "
                          "earlier layers are already rounded (the paper's x̃), or from that network with its "
                          "activation quantizers too (quantized_acts: the default for activations of 4 bits or "
                          "fewer, else quantized)."),
        click.option("--adaround-scale-search/--no-adaround-scale-search", default=None,
                     help="choose each layer's weight grid by its output error before rounding (on)."),
        click.option("--adaround-bias/--no-adaround-bias", default=None,
                     help="re-fit each layer's bias to the mean output error left after rounding (on)."),
        click.option("--block-recon/--no-block-recon", default=None,
                     help="Block reconstruction (BRECQ): each block's rounding learned jointly, with QDrop and LSQ "
                          "activation steps; needs torch: pip install 'ptq[recon]' (off)."),
        click.option("--recon-iters", type=int, help="Adam steps per block (200)."),
        click.option("--qdrop", type=float,
                     help="probability an activation is quantized while reconstructing; 1: always (0.5)."),
        click.option("--lsq/--no-lsq", default=None, help="learn the block's activation steps (on)."),
        click.option("--recon-fisher/--no-recon-fisher", default=None,
                     help="weigh each block output channel by the Fisher information of the task loss (off)."),
        click.option("--recon-dsq/--no-recon-dsq", default=None,
                     help="DSQ's tanh soft rounding of activations while reconstructing, annealed to hard, instead "
                          "of the straight-through estimator (off)."),
        click.option("--easyquant/--no-easyquant", default=None,
                     help="EasyQuant: search weight and input scales for the best output cosine, per layer (off)."),
        click.option("--bias-correction", type=click.Choice(["empirical", "analytic"]),
                     help="Correct the mean output shift caused by weight quantization (off)."),
        click.option("--data-free", is_flag=True, default=None,
                     help="No calibration data: CLE + BN-based activation ranges + analytic bias correction."),
        click.option("--input-range", help="LO,HI of the preprocessed model input (data-free ranges), e.g. -1,1."),
        click.option("--calib-size", type=int, help="Calibration samples used for range setting (256)."),
        click.option("--holdout", type=int, help="Further samples held back to measure fidelity (32)."),
        click.option("--batch-size", type=int, help="Batch size for onnxruntime (16)."),
        click.option("--memory-limit", type=float,
                     help="GB that calibration aims to stay within: batches shrink to fit (2)."),
        click.option("--threads", type=int,
                     help="Threads for onnxruntime and torch; give each of several jobs side by side its share of "
                          "the cores (0: every core)."),
        click.option("--seed", type=int, help="Seed for choosing samples (0)."),
        preprocess_options(),
        click.option("--eval", "eval_dir", type=click.Path(), help="Evaluation data (labels optional)."),
        click.option("--eval-resize", type=int, help="Resize for the eval data (default: as calibration)."),
        click.option("--eval-crop", type=int, help="Crop for the eval data (default: as calibration)."),
        click.option("--metric", help="Score models with module:function(fp32_outputs, quant_outputs, labels)."),
        click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors."),
        click.option("--progress/--no-progress", default=None, help="Progress bars (default: on a terminal)."),
        click.option("--debug", is_flag=True, help="Show tracebacks."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def build_settings(recipe, eval_dir, eval_resize, eval_crop, kw):
    """(Config, calibration preprocessing, eval preprocessing) from a recipe file and the flags (flags win)."""
    from ptq.pipeline import Config, load_recipe
    pre = build_preprocess(kw)
    settings = load_recipe(recipe) if recipe else {}
    if kw.get("input_range") is not None:
        kw["input_range"] = _floats(kw["input_range"])
    settings.update({k: v for k, v in kw.items() if v is not None})
    try:
        config = Config(**settings)
    except TypeError as e:
        raise InputError(f"bad settings: {e}") from None
    eval_pre = None
    if not eval_dir and (eval_resize is not None or eval_crop is not None):
        raise InputError("--eval-resize / --eval-crop have no effect without --eval DIR")
    if eval_dir and (eval_resize is not None or eval_crop is not None):
        from ptq.data import Preprocess
        base = pre or Preprocess()
        eval_pre = dataclasses.replace(base, **{k: v for k, v in (("resize", eval_resize), ("crop", eval_crop))
                                                if v is not None})
    return config, pre, eval_pre


def _metric(spec):
    if not spec:
        return None
    from ptq.metric import load_user_metric
    return load_user_metric(spec)


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Quantized model path (default: ./<stem>.w<W>a<A>.onnx).")
@quant_options
@click.option("--max-drop", help="Fail (exit 3) when top-1 drops by more than X points, or X% relative.")
@click.option("--auto-fix", is_flag=True,
              help="With --max-drop: raise the most harmful quantizers (by per-quantizer analysis) until it holds.")
@click.option("--auto-fix-to", type=click.Choice(["16", "fp32"]), default="16", show_default=True,
              help="What --auto-fix raises a quantizer to: 16 bits, or floating point.")
@click.option("--strict", is_flag=True,
              help="With --no-repair: exit 3 (after writing) when an output, or a slice of one, is under the "
                   "fidelity bounds (with repair, the default, that is always so).")
@click.option("--placement", type=click.Choice(["measured", "all"]), default=None,
              help="measured: layers whose int8 kernels run slower than float on this runtime stay float, and a "
                   "model that no int8 placement makes faster is written in float (timed; the decision is cached); "
                   "all: every layer int8 (measured).")
@click.option("--repair/--no-repair", default=None,
              help="Raise the fewest quantizers until every output meets the fidelity bounds on the held-back "
                   "samples, exit 3 naming the culprits where they cannot be met (on).")
def run(model, calib, calib_feeds, calib_reader, output, recipe, eval_dir, eval_resize, eval_crop, max_drop,
        auto_fix, auto_fix_to, strict, metric, quiet, progress, debug, **kw):
    """Quantize MODEL with calibration data and write a QDQ model plus its report."""
    from ptq.run import run as run_to_files

    config, pre, eval_pre = build_settings(recipe, eval_dir, eval_resize, eval_crop, kw)
    if auto_fix and max_drop is None:
        raise InputError("--auto-fix needs --max-drop X (the bound it fixes the model to)")
    show = progress if progress is not None else sys.stderr.isatty()
    try:
        result, paths = run_to_files(model, calib, output, config=config, preprocess=pre, calib_feeds=calib_feeds,
                                     calib_reader=calib_reader, eval_data=eval_dir,
                                     eval_preprocess=eval_pre, max_drop=max_drop, progress=show and not quiet,
                                     auto_fix=auto_fix_to if auto_fix else None, metric=metric, strict=strict)
    except QualityError as e:  # written: say what was written, then fail
        if not quiet:
            _print_run(e.result, e.paths)
        raise
    if not quiet:
        _print_run(result, paths)


@cli.command("debug")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="HTML report path (default: ./<stem>.debug.html; the JSON goes beside it).")
@quant_options
@click.option("--samples", type=int, help="Samples the analysis scores on (256).")
@click.option("--worst", type=int, default=5, show_default=True, help="Quantizers to chart.")
def debug_cmd(model, calib, calib_feeds, calib_reader, output, recipe, eval_dir, eval_resize, eval_crop, metric,
              quiet, progress, debug, samples, worst, **kw):
    """The white paper's debugging flow: FP32 sanity, weights vs activations, per-quantizer sensitivity, charts."""
    from ptq.debug import debug as run_debug

    if samples is not None:
        kw["debug_samples"] = samples
    config, pre, eval_pre = build_settings(recipe, eval_dir, eval_resize, eval_crop, kw)
    show = progress if progress is not None else sys.stderr.isatty()
    html, js, r = run_debug(model, calib, output, config, pre, eval_dir, eval_pre, _metric(metric), worst,
                            show and not quiet, calib_feeds, calib_reader)
    if quiet:
        return
    san = r["fp32_sanity"]
    if not san["ok"]:
        click.echo(f"ptq: WARNING: FP32 sanity failed: with every quantizer bypassed the outputs change by "
                   f"{san['max_relative_change']:.2e} (relative)", err=True)
    q = r["quantized"]
    click.echo(f"metric: {r['metric']}; FP32 {r['fp32_score']:.4g}, quantized {q['score']:.4g}")
    wa = r["weights_vs_activations"]
    click.echo(f"weights only {wa['weights only']['score']:.4g}, activations only "
               f"{wa['activations only']['score']:.4g}: {wa['dominant']} dominate")
    for row in r["per_quantizer"][:worst]:
        click.echo(f"  {row['id']}: {row['score']:.4g}" + ("" if row["drop"] is None else f" (drop {row['drop']:.4g})"))
    click.echo(f"report: {html} ({js.name})")


def _print_run(result, paths):
    r = result.report
    s = r["sizes"]
    for w in r["stages"].get("warnings", []) + r.get("fidelity_flags", []):
        click.echo(f"ptq: warning: {w}", err=True)
    if r.get("calibration"):
        click.echo(r["calibration"]["line"])
    if r.get("repair") and r["repair"]["raised"]:
        fix = r["repair"]
        click.echo(f"repair: raised {len(fix['raised'])} quantizer(s) to {fix['to']} ({', '.join(fix['raised'][:6])}"
                   f"{' …' if len(fix['raised']) > 6 else ''}): the fidelity bounds are "
                   f"{'met' if fix['met'] else 'still not met'}")
    if (r.get("placement") or {}).get("line"):
        click.echo(r["placement"]["line"])
    click.echo(f"wrote {paths[0]} ({s['quant_bytes'] / 1e6:.2f} MB, {s['ratio']:.2f}x smaller than FP32) "
               f"in {r['timings']['total']:.1f} s")
    click.echo(f"report: {paths[2]} ({paths[3].name}, {paths[1].name})")
    if r.get("speed"):
        sp = r["speed"]
        ci = (f", 95 % interval {sp['ratio_ci'][0]:.2f}-{sp['ratio_ci'][1]:.2f}x, CPU time {sp['cpu_ratio']:.2f}x"
              if "ratio_ci" in sp else ", the FP32 model as given" if sp.get("same_model") else "")
        click.echo(f"latency (onnxruntime CPU, batch 1): FP32 {sp['fp32_ms']:.2f} ms, quantized {sp['quant_ms']:.2f} "
                   f"ms ({sp['ratio']:.2f}x{ci}); {sp['unfused']['DequantizeLinear']} DQ nodes left unfused")
    if r.get("fidelity"):
        _print_eval("fidelity on held-back calibration samples", r["fidelity"])
    if r.get("evaluation"):
        _print_eval("evaluation", r["evaluation"])
    fix = r.get("auto_fix")
    if fix and fix["raised"]:
        click.echo(f"auto-fix: raised {len(fix['raised'])} of {fix['quantizers']} quantizers to {fix['to']} "
                   f"({', '.join(fix['raised'][:5])}{', …' if len(fix['raised']) > 5 else ''}); drop "
                   f"{fix['drop_before']} -> {fix['drop_after']}")
    if result.gate and result.gate_passed:
        click.echo(result.gate)


def _print_eval(title: str, e: dict):
    outs = "; ".join(f"{k}: SQNR {v['sqnr_db']} dB, cosine {v['cosine']}" for k, v in e["outputs"].items())
    click.echo(f"{title} ({e['samples']} samples): {outs}")
    if "fp32_top1" in e:
        click.echo(f"  top-1 {e['fp32_top1']} -> {e['quant_top1']} (drop {e['top1_drop']} ± {e['top1_drop_se']} "
                   f"points), top-5 {e['fp32_top5']} -> {e['quant_top5']}, top-1 agreement {e['top1_agreement']} %")
    elif "top1_agreement" in e:
        click.echo(f"  top-1 agreement with FP32: {e['top1_agreement']} %")


@cli.command("eval")
@click.argument("fp32_model", type=click.Path(dir_okay=False))
@click.argument("quant_model", type=click.Path(dir_okay=False))
@click.option("--data", "data", required=True, type=click.Path(), help="Folder of samples (labels optional).")
@preprocess_options()
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--limit", type=int, default=0, help="Use at most N samples (seeded choice; 0: all).")
@click.option("--max-drop", help="Fail (exit 3) when top-1 drops by more than X points, or X% relative.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("-q", "--quiet", is_flag=True)
@click.option("--progress/--no-progress", default=None)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def eval_cmd(fp32_model, quant_model, data, batch_size, limit, max_drop, as_json, quiet, progress, debug, **kw):
    """Compare FP32_MODEL and QUANT_MODEL on a data folder: top-1/top-5 with labels, else agreement and SQNR."""
    import json

    from ptq.data import DataSource, Preprocess, model_inputs
    from ptq.evaluate import check_comparable, evaluate, gate_verdict, parse_max_drop
    from ptq.model import load_model

    gate = parse_max_drop(max_drop)
    if limit < 0 or batch_size < 1:
        raise InputError("--limit must be >= 0 and --batch-size >= 1")
    pre = build_preprocess(kw)
    fp, q = load_model(fp32_model), load_model(quant_model)
    check_comparable(fp, q, fp32_model, quant_model)
    src = DataSource(data, model_inputs(fp), pre or Preprocess(), size=limit)
    show = progress if progress is not None else sys.stderr.isatty()
    result = evaluate(fp, q, src, batch_size, src.labels(), show and not quiet)
    verdict = gate_verdict(result, gate) if gate else None
    if as_json:
        click.echo(json.dumps({**result, **({"gate": verdict} if gate else {})}, indent=1))
    elif not quiet:
        _print_eval("evaluation", result)
        if verdict and verdict["passed"]:
            click.echo(verdict["line"])
    if verdict and not verdict["passed"]:
        raise AccuracyGateError(verdict["line"])


@cli.command()
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the table here (default: stdout).")
def summary(folder, output):
    """Summarize every *.report.json in FOLDER as one Markdown table (with the exit status of each run where a
    batch job left it in <output stem>.exit)."""
    from pathlib import Path

    from ptq.outputs import OutputSet
    from ptq.report import summary_table

    files = sorted(Path(folder).glob("*.report.json"))
    exits = sorted(Path(folder).glob("*.exit"))
    if not files and not exits:
        raise InputError(f"{folder}: no *.report.json files")
    table = summary_table(files, exits)
    if output:
        with OutputSet([output]) as out:
            out.stage_text(output, table)
            out.commit()
    else:
        click.echo(table, nl=False)


class Terminated(BaseException):
    """SIGTERM, raised where the process is, so that temporary files are removed on the way out."""


_SIGNALLED: list[int] = []  # signals received in this process (an error they cause is reported as the signal)


def _terminate(signum, frame):
    _SIGNALLED.append(signum)
    raise Terminated()


def _interrupt(signum, frame):
    _SIGNALLED.append(signum)
    raise KeyboardInterrupt()


def main(argv=None) -> int:
    import signal
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    _SIGNALLED.clear()
    previous = signal.signal(signal.SIGTERM, _terminate), signal.signal(signal.SIGINT, _interrupt)
    hook = sys.unraisablehook
    # a signal that lands in a finalizer (__del__) cannot stop the run: Python only prints it; say it at the end
    sys.unraisablehook = lambda u: None if isinstance(u.exc_value, (KeyboardInterrupt, Terminated)) else hook(u)
    try:
        cli.main(args=argv, prog_name="ptq", standalone_mode=False)
        if _SIGNALLED:  # every file the run wrote is complete (OutputSet commits whole sets)
            click.echo("ptq: interrupted" if _SIGNALLED[0] == signal.SIGINT else "ptq: terminated", err=True)
            return 130 if _SIGNALLED[0] == signal.SIGINT else 143
        return 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("ptq: aborted", err=True)
        return 130
    except click.UsageError as e:
        if debug:
            raise
        click.echo(f"ptq: error: {e.format_message()} (see ptq {e.ctx.command.name if e.ctx else ''} --help)"
                   .replace("  ", " "), err=True)
        return EXIT_INPUT
    except PTQError as e:
        if debug:
            raise
        click.echo(f"ptq: error: {e}" if e.exit_code != 3 else f"ptq: {e}", err=True)
        return e.exit_code
    except KeyboardInterrupt:
        click.echo("ptq: interrupted", err=True)
        return 130
    except Terminated:
        click.echo("ptq: terminated", err=True)
        return 143
    except Exception as e:  # a bug: say so in one line unless --debug
        if _SIGNALLED:  # an import or a library interrupted half-way fails in its own words: it was the signal
            click.echo("ptq: interrupted" if _SIGNALLED[0] == signal.SIGINT else "ptq: terminated", err=True)
            return 130 if _SIGNALLED[0] == signal.SIGINT else 143
        if debug:
            raise
        click.echo(f"ptq: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                   f"(run with --debug for the traceback)", err=True)
        return EXIT_INTERNAL
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
        sys.unraisablehook = hook


if __name__ == "__main__":
    sys.exit(main())
