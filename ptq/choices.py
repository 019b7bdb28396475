"""The automatic choices, and the model they build: ``build`` prepares, runs the steps and exports, then, where
ptq chose a setting for the user at 4-bit weights or fewer (CLE, the weight grids' symmetry), quantizes once more
with the other setting and keeps the model whose worst held-back output is closer to FP32; block reconstruction,
the slowest step, runs last, once, on the model kept; then the measured placement (``ptq.placement``) keeps in
float the layers whose int8 kernels run slower on this runtime. ``ptq run``, ``ptq debug`` and ``ptq.quantize``
all build their model here, so they build the same one."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from .evaluate import evaluate, fidelity_flags
from .export import export_qdq
from .external import folder
from .pipeline import Config, Context, prepare, run_steps
from .placement import place
from .speed import Timed
from .target import this_machine


@dataclass
class Measured:
    """What ``build`` measured of the model it returns, for the report to reuse instead of measuring again: its
    latency against FP32 (``timed``) and its fidelity on the held-back samples (``fidelity``, as ``evaluate``
    gives it); None where not measured. ``model``: the model they are of."""
    model: object = None
    timed: Timed | None = None
    fidelity: dict | None = None

    def of(self, model) -> "Measured":
        """These measurements where ``model`` is the one they are of, else none."""
        return self if model is self.model else Measured()


def build(original, config: Config, calib_src, held, progress: bool = False, timings: dict | None = None) -> tuple:
    """(state, QDQ model, ``Measured``) of ``original`` with ``config``: prepare, the steps, export, then the
    automatic choices (CLE and weight symmetry at 4 bits or fewer, compared on ``held``), block reconstruction
    last on the model kept, and the measured placement. What ``ptq run`` writes and ``ptq debug`` analyses."""
    timings = {} if timings is None else timings
    t0 = time.perf_counter()
    # the choices below quantize again: block reconstruction, the slowest step, and the steps after it run once,
    # on the model kept
    defer = config.block_recon and ("cle" in config.choices or "weight_symmetric" in config.choices)
    tail = config.steps[config.steps.index("block_reconstruction"):] if defer else []
    head = [s for s in config.steps if s != "block_reconstruction"]
    state = prepare(original, _with(config, block_recon=False, steps=head) if defer else config)
    timings["prepare"] = round(time.perf_counter() - t0, 3)
    state = run_steps(state, Context(calib_src, progress), timings)

    t0 = time.perf_counter()
    qmodel = export_qdq(state)
    timings["export"] = round(time.perf_counter() - t0, 3)
    if "cle" in config.choices and calib_src is not None and (state.report.get("cle") or {}).get("pairs"):
        t0 = time.perf_counter()
        state, qmodel = _choose_cle(original, state, qmodel, calib_src, held, progress)
        timings["cle_choice"] = round(time.perf_counter() - t0, 3)
    if "weight_symmetric" in config.choices and calib_src is not None:
        t0 = time.perf_counter()
        state, qmodel = _choose_symmetry(original, state, qmodel, calib_src, held, progress)
        timings["symmetry_choice"] = round(time.perf_counter() - t0, 3)
    if defer:
        state, qmodel = _reconstruct_blocks_last(state, tail, calib_src, progress, timings)
    timing_src = held if held is not None else calib_src
    measured = Measured()
    if config.placement == "measured" and config.latency_runs and timing_src is not None \
            and folder(original) is None:
        t0 = time.perf_counter()
        state, qmodel, measured = _placed(original, state, qmodel, timing_src, held, progress)
        timings["placement"] = round(time.perf_counter() - t0, 3)
    return state, qmodel, measured


def _placed(original, state, qmodel, timing_src, held, progress: bool) -> tuple:
    """(state, QDQ model, ``Measured``) after ``ptq.placement.place`` (its report in
    ``state.report["placement"]``); the int8 placement is kept where the measured one falls under fidelity bounds
    on the held-back samples that the int8 one met."""
    here = this_machine()
    if here.name != state.target.name:
        info = {"skipped": f"built for target {state.target.name} on a {here.name} machine: placement times this "
                           "machine's runtime, so it is left to a run on the target"}
        state.report = {**state.report, "placement": info}
        return state, qmodel, Measured()
    _, feed = next(iter(timing_src.batches(1)))
    placed, model, info, timed = place(original, state, qmodel, feed, progress)
    measured = Measured(model, timed)
    if model is not qmodel and held is not None:
        cfg = state.config
        bounds = (cfg.fidelity_sqnr_db, cfg.fidelity_cosine)
        before, after = (evaluate(original, m, held, cfg.batch_size) for m in (qmodel, model))
        measured.fidelity = after
        if fidelity_flags(after, *bounds) and not fidelity_flags(before, *bounds):
            info["kept_int8"] = "the measured placement fell under fidelity bounds that the int8 one met"
            placed, model, measured = state, qmodel, Measured(qmodel, fidelity=before)
    placed.report = {**placed.report, "placement": info}
    return placed, model, measured


def _closeness(original, model, held, batch_size: int) -> float:
    """How close ``model``'s outputs on ``held``, as this onnxruntime computes them, are to FP32: the SQNR in dB of
    the worst output (an output the weights do not reach is exact: inf)."""
    outs = evaluate(original, model, held, batch_size)["outputs"]
    return min((float(o["sqnr_db"]) for o in outs.values()), default=float("inf"))


def _quantize_again(original, config: Config, calib_src, progress) -> tuple:
    """(state, QDQ model) of ``original`` quantized once more with ``config``."""
    state = run_steps(prepare(original, config), Context(calib_src, progress), {})
    return state, export_qdq(state)


def _quantize_and_compare(original, state, qmodel, other_cfg: Config, calib_src, held, progress) -> tuple:
    """Quantize ``original`` once more with ``other_cfg`` and measure both models on the held-back samples (the
    calibration samples where none are held back): (other state, other QDQ model, the SQNR of ``qmodel``'s worst
    output, the other's, which samples)."""
    samples = held if held is not None else calib_src
    other, other_model = _quantize_again(original, other_cfg, calib_src, progress)
    db, other_db = (_closeness(original, m, samples, state.config.batch_size) for m in (qmodel, other_model))
    return other, other_model, db, other_db, f"{len(samples)} {'held-back' if held is not None else 'calibration'}"


def _with(config: Config, **changes) -> Config:
    """A copy of ``config`` with ``changes``, carrying the settings ptq chose and why (``choices``)."""
    cfg = dataclasses.replace(config, **changes)
    cfg.choices = dict(config.choices)
    return cfg


def _reconstruct_blocks_last(state, tail: list[str], calib_src, progress, timings) -> tuple:
    """Block reconstruction and the steps after it (``tail``: the int32 bias guard) on the state the choices kept,
    which ran without them: (state, QDQ model)."""
    state.config = _with(state.config, block_recon=True,
                         steps=[s for s in state.config.steps if s not in tail] + tail)
    state = run_steps(state, Context(calib_src, progress), timings, tail)
    return state, export_qdq(state)


def _choose_cle(original, state, qmodel, calib_src, held, progress):
    """CLE came on by default (weights of 4 bits or fewer): quantize again without it and keep the model whose
    outputs on the held-back samples (the calibration samples where none are held back) are closer to FP32
    (``_closeness``). Whether equalizing helps depends on the model (EfficientNet-Lite0 W4A8: drop 5.00 -> 1.92;
    Lite2: 1.23 -> 2.53), so the data decide; the report's choices say which and why."""
    plain_cfg = _with(state.config, cle=False, steps=None)  # the default steps, without CLE
    plain_cfg.choices.pop("cle", None)
    plain, plain_model, cle_db, plain_db, samples = _quantize_and_compare(original, state, qmodel, plain_cfg,
                                                                         calib_src, held, progress)
    keep_cle = cle_db >= plain_db
    chosen, model = (state, qmodel) if keep_cle else (plain, plain_model)
    why = (f"{'on' if keep_cle else 'off'}: with {state.config.weight_bits}-bit weights ptq quantized with and "
           f"without CLE; on {samples} samples the worst output's SQNR against FP32 was {cle_db:.2f} dB with it and "
           f"{plain_db:.2f} dB without; --cle / --no-cle decide it yourself")
    chosen.config.choices["cle"] = why
    chosen.report.setdefault("choices", {})["cle"] = why
    chosen.report["cle_choice"] = {"sqnr_db_with": round(cle_db, 2), "sqnr_db_without": round(plain_db, 2),
                                   "kept": "cle" if keep_cle else "no cle"}
    return chosen, model


def _choose_symmetry(original, state, qmodel, calib_src, held, progress):
    """Symmetric weight grids came by default (weights of 4 bits or fewer): quantize again with asymmetric ones
    (the CLE decision kept) and keep the model whose outputs on the held-back samples (the calibration samples where
    none are held back) are closer to FP32 (``_closeness``); symmetric on a tie. A zero point fits a channel whose
    weights lean to one side (EfficientNet-Lite0 W4A8: drop 2.08 -> 0.77) but not every model (Lite2: 1.53 ->
    3.00), so the data decide; the report's choices say which and why."""
    # still ptq's choice (in ``choices``): a layer raised past 4 bits stays symmetric
    asym_cfg = _with(state.config, weight_symmetric=False)
    asym, asym_model, sym_db, asym_db, samples = _quantize_and_compare(original, state, qmodel, asym_cfg, calib_src,
                                                                       held, progress)
    keep_asym = asym_db > sym_db
    chosen, model = (asym, asym_model) if keep_asym else (state, qmodel)
    if keep_asym and "cle_choice" in state.report:  # the CLE decision the asymmetric run inherited, and its numbers
        asym.report["cle_choice"] = state.report["cle_choice"]
    why = (f"{'asymmetric' if keep_asym else 'symmetric'}: with {state.config.weight_bits}-bit weights ptq "
           f"quantized with symmetric and with asymmetric weight grids; on {samples} samples the worst output's "
           f"SQNR against FP32 was {sym_db:.2f} dB symmetric and {asym_db:.2f} dB asymmetric (written at zero "
           "point 0, so as fast); --weight-symmetric / --weight-asymmetric decide it yourself")
    chosen.config.choices["weight_symmetric"] = why
    chosen.report.setdefault("choices", {})["weight_symmetric"] = why
    chosen.report["symmetry_choice"] = {"sqnr_db_symmetric": round(sym_db, 2), "sqnr_db_asymmetric": round(asym_db, 2),
                                        "kept": "asymmetric" if keep_asym else "symmetric"}
    return chosen, model
