"""The automatic choices, and the model they build: ``build`` decides the settings ptq chose for the user at 4-bit
weights or fewer (CLE, the weight grids' symmetry) by quantizing each candidate with a shortened run (AdaRound
with a fifth of its iterations on 256 samples, no block reconstruction) and keeping the one whose worst held-back
output is closer to FP32; then it quantizes once with the settings kept, in full; then the measured placement
(``ptq.placement``) keeps in float the layers whose int8 kernels run slower on this runtime. ``ptq run``, ``ptq
debug`` and ``ptq.quantize`` all build their model here, so they build the same one."""
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
    """(state, QDQ model, ``Measured``) of ``original`` with ``config``: the automatic choices (CLE and weight
    symmetry at 4 bits or fewer, compared on ``held`` after shortened runs), then prepare, the steps and export
    with the settings kept, then the measured placement. What ``ptq run`` writes and ``ptq debug`` analyses."""
    timings = {} if timings is None else timings
    chosen = {}
    if calib_src is not None and ("cle" in config.choices or "weight_symmetric" in config.choices):
        t0 = time.perf_counter()
        config, chosen = _choose(original, config, calib_src, held, progress)
        timings["choices"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    state = prepare(original, config)
    timings["prepare"] = round(time.perf_counter() - t0, 3)
    state = run_steps(state, Context(calib_src, progress), timings)
    state.report.update(chosen)

    t0 = time.perf_counter()
    qmodel = export_qdq(state)
    timings["export"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    state, qmodel, measured = measured_placement(original, state, qmodel, held if held is not None else calib_src,
                                                 held, progress)
    if "placement" in state.report:
        timings["placement"] = round(time.perf_counter() - t0, 3)
    return state, qmodel, measured


def measured_placement(original, state, qmodel, timing_src, held, progress: bool = False,
                       after_repair: bool = False) -> tuple:
    """(state, QDQ model, ``Measured``) after ``ptq.placement.place`` (its report in
    ``state.report["placement"]``) where the settings ask for it (``--placement measured``, latency runs, a sample
    to time, a model in one file), else as given with nothing measured; the int8 placement is kept where the
    measured one falls under fidelity bounds on the held-back samples that the int8 one met. ``build`` places the
    model it quantizes; ``ptq run`` places a repaired model again (its raised quantizers change its speed; the
    report's placement then says ``after_repair``)."""
    cfg = state.config
    if not (cfg.placement == "measured" and cfg.latency_runs and timing_src is not None and folder(original) is None):
        return state, qmodel, Measured()
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
        bounds = (cfg.fidelity_sqnr_db, cfg.fidelity_cosine)
        before, after = (evaluate(original, m, held, cfg.batch_size) for m in (qmodel, model))
        measured.fidelity = after
        if fidelity_flags(after, *bounds) and not fidelity_flags(before, *bounds):
            info["kept_int8"] = "the measured placement fell under fidelity bounds that the int8 one met"
            placed, model, measured = state, qmodel, Measured(qmodel, fidelity=before)
    if after_repair:
        info["after_repair"] = True
    placed.report = {**placed.report, "placement": info}
    return placed, model, measured


def _closeness(original, model, held, batch_size: int) -> float:
    """How close ``model``'s outputs on ``held``, as this onnxruntime computes them, are to FP32: the SQNR in dB of
    the worst output (an output the weights do not reach is exact: inf)."""
    outs = evaluate(original, model, held, batch_size)["outputs"]
    return min((float(o["sqnr_db"]) for o in outs.values()), default=float("inf"))


def _with(config: Config, **changes) -> Config:
    """A copy of ``config`` with ``changes``, carrying the settings ptq chose and why (``choices``)."""
    cfg = dataclasses.replace(config, **changes)
    cfg.choices = dict(config.choices)
    return cfg


PROXY_SAMPLES = 256  # calibration samples a candidate is quantized on
PROXY_ITERS = 5  # a candidate's AdaRound runs 1 / PROXY_ITERS of its iterations (at least 20)
PROXY_ROWS = 2048  # and samples at most this many rows per layer


def _candidate_db(original, config: Config, calib_src, held, progress, **changes) -> float:
    """``_closeness`` of ``original`` quantized with ``config`` and ``changes`` by a shortened run: block
    reconstruction off, AdaRound (where on) with a fifth of its iterations and PROXY_ROWS rows, on the first
    PROXY_SAMPLES calibration samples (the candidates are compared, not written: a short AdaRound already tells
    them apart where nearest rounding at 4 bits leaves every candidate far from FP32)."""
    cfg = _with(config, block_recon=False, adaround_iters=max(20, config.adaround_iters // PROXY_ITERS),
                adaround_rows=min(config.adaround_rows, PROXY_ROWS), steps=None, **changes)
    files = getattr(calib_src, "files", None)
    source = calib_src.subset(files[:PROXY_SAMPLES]) if files is not None and len(files) > PROXY_SAMPLES \
        else calib_src
    state = run_steps(prepare(original, cfg), Context(source, progress), {})
    samples = held if held is not None else calib_src
    return _closeness(original, export_qdq(state), samples, config.batch_size)


def _choose(original, config: Config, calib_src, held, progress) -> tuple[Config, dict]:
    """Decide the settings ptq chose for the user at 4-bit weights or fewer by quantizing the candidates with a
    shortened run (``_candidate_db``) and comparing how close their worst output on the held-back samples (the
    calibration samples where none are held back) is to FP32:
    - CLE (came on): with it and without it; kept where at least as close. Whether equalizing helps depends on the
      model (EfficientNet-Lite0 W4A8: drop 5.00 -> 1.92; Lite2: 1.23 -> 2.53), so the data decide;
    - weight symmetry (came symmetric): symmetric and asymmetric grids, with the CLE decision; asymmetric kept
      where closer. A zero point fits a channel whose weights lean to one side (Lite0 W4A8: drop 2.08 -> 0.77)
      but not every model (Lite2: 1.53 -> 3.00).
    Returns (the config with the settings kept and the choices' lines, report entries with the numbers)."""
    samples = (f"{len(held) if held is not None else len(calib_src)} "
               f"{'held-back' if held is not None else 'calibration'}")
    bits = config.weight_bits
    report: dict = {}
    done: dict = {}
    db = None
    if "cle" in config.choices:
        cle_db = _candidate_db(original, config, calib_src, held, progress, cle=True)
        plain_db = _candidate_db(original, config, calib_src, held, progress, cle=False)
        keep = cle_db >= plain_db
        db = cle_db if keep else plain_db
        done["cle"] = (f"{'on' if keep else 'off'}: with {bits}-bit weights ptq quantized with and without CLE (a "
                       f"shortened AdaRound); on {samples} samples the worst output's SQNR against FP32 was "
                       f"{cle_db:.2f} dB with it and {plain_db:.2f} dB without; --cle / --no-cle decide it yourself")
        report["cle_choice"] = {"sqnr_db_with": round(cle_db, 2), "sqnr_db_without": round(plain_db, 2),
                                "kept": "cle" if keep else "no cle"}
        config = _with(config, cle=keep, steps=None)
    if "weight_symmetric" in config.choices:
        sym_db = db if db is not None else _candidate_db(original, config, calib_src, held, progress,
                                                         weight_symmetric=True)
        asym_db = _candidate_db(original, config, calib_src, held, progress, weight_symmetric=False)
        keep_asym = asym_db > sym_db
        done["weight_symmetric"] = (
            f"{'asymmetric' if keep_asym else 'symmetric'}: with {bits}-bit weights ptq quantized with symmetric "
            f"and with asymmetric weight grids (a shortened AdaRound); on {samples} samples the worst output's SQNR "
            f"against FP32 was {sym_db:.2f} dB symmetric and {asym_db:.2f} dB asymmetric (written at zero point 0, "
            "so as fast); --weight-symmetric / --weight-asymmetric decide it yourself")
        report["symmetry_choice"] = {"sqnr_db_symmetric": round(sym_db, 2), "sqnr_db_asymmetric": round(asym_db, 2),
                                     "kept": "asymmetric" if keep_asym else "symmetric"}
        # still ptq's choice (in ``choices``): a layer raised past 4 bits stays symmetric
        config = _with(config, weight_symmetric=not keep_asym)
    config.choices.update(done)
    return config, report
