"""The pipeline: configuration, the state every stage reads and returns, and the ordered steps of a recipe.

    load → canonicalize → fold BN → [CLE → bias absorption] → weight ranges → … → activation ranges
         → bias overflow guard → export QDQ → fidelity on held-back calibration samples → (evaluate) → report

Two things flow through the steps (``State``): the FP32 reference (``state.model``), built by canonicalization,
BN folding and the function-preserving steps (CLE, bias absorption), and frozen after them; and the quantization
decisions (encodings, rounded integers, corrected biases), which every later step reads and extends. The exporter
applies the decisions to the reference. ``run_steps`` checks that no step after the function-preserving ones
changed the reference. Every step has the signature ``step(state, ctx) -> state``; none writes files.
"""
from __future__ import annotations

import hashlib
import time
import tomllib
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from .canonicalize import canonicalize
from .errors import InputError
from .patterns import Layer, Placement, find_layers, place_activation_quantizers
from .quant import Encoding
from .target import TARGET_NAMES, Target, resolve_target
from .recipe import check_override_names, check_overrides, check_types
from .ranges import ACT_METHODS, WEIGHT_METHODS
from .stages.activation_ranges import set_activation_ranges
from .stages.adaround import adaround
from .stages.bias_absorption import absorb_high_biases
from .stages.bias_correction import correct_biases
from .stages.bias_overflow import guard_bias_overflow
from .stages.block_reconstruction import reconstruct_blocks
from .stages.cle import equalize
from .stages.data_free_ranges import set_data_free_ranges
from .stages.easyquant import easyquant
from .stages.smoothquant import smoothquant
from .stages.fold_bn import BNStats, fold_batchnorm
from .stages.weight_ranges import set_weight_ranges


@dataclass
class Config:
    """Every setting of a run; a recipe file (TOML) sets the same names, flags override it."""

    weight_bits: int = 8
    per_channel: bool = True
    weight_range: str = "mse"
    weight_symmetric: bool | None = None  # False: an asymmetric grid (zero point) per channel / tensor; None:
    # symmetric, and for weights of 4 bits or fewer compared with asymmetric (``validate`` says so in ``choices``)
    reduce_range: str = "auto"  # 8-bit conv weights in [-64, 63]: auto (where the target saturates) | always | never
    target: str = "auto"  # the runtime the model is built for (ptq.target): auto (this machine) | vnni | avx2
    act_bits: int = 8
    ends_8bit: bool | None = None  # the model's inputs and outputs, its head layers' inputs, and the weights of its
    # first and head layers keep 8 bits (None: on for activations of 4 bits or fewer, ``validate`` says so)
    act_symmetric: bool = False
    act_range: str = "mse"
    logits_range: str = "xent"
    percentile: float = 99.99
    debug_samples: int = 256  # samples of the per-quantizer analysis (ptq debug, --auto-fix ranking)
    saturate_low_bits: bool = True  # activations under 8 bits: Clip to the n-bit range before QuantizeLinear
    range_spread: float = 16.0  # Concat inputs / head channels this far apart in range stay float (0: never)
    fidelity_sqnr_db: float = 6.0  # an output, or a slice of one, under this SQNR against FP32 is flagged
    fidelity_cosine: float = 0.9  # … or under this cosine
    repair: bool = True  # raise the fewest quantizers until every output meets those bounds (ptq.repair)
    placement: str = "measured"  # int8 where it runs faster, timed on this runtime (ptq.placement); "all": every layer
    memory_limit: float = 2.0  # GB the calibration passes aim to stay within (their batches shrink to fit)
    threads: int = 0  # onnxruntime's and torch's threads (0: every core; ptq.threads)
    latency_runs: int = 20  # batch-1 runs timed per model for the report's speed section (0: not measured)
    calib_size: int = 256
    holdout: int = 32
    batch_size: int = 16
    seed: int = 0
    xent_rows: int = 512
    smoothquant: bool = True  # SmoothQuant on MatMuls whose inputs have outlier channels, where it measures better
    cle: bool | None = None  # None: on for weights of 4 bits or fewer (``validate`` says why in ``choices``)
    adaround: bool | None = None  # None: on for weights of 4 bits or fewer (``validate`` says why in ``choices``)
    adaround_iters: int = 500  # 1000 and 3000 scored no better (docs/FINDINGS.md)
    adaround_batch: int = 1024  # rows per Adam step (layers with an activation)
    adaround_lambda: float = 0.1  # on the normalized loss (see rounding.solve)
    adaround_polish: bool = True  # greedy 1-flip search after Adam on Gram-form layers
    adaround_inputs: str | None = None  # x̃ from the quantized-so-far network: "quantized" (its weights, the paper),
    # "quantized_acts" (its weights and activation quantizers), or "fp32" (x̃ = x); None: quantized_acts for
    # activations of 4 bits or fewer, else quantized (``validate`` says why in ``choices``)
    adaround_rows: int = 16384  # rows (output positions) kept per layer with an activation
    adaround_bias: bool = True  # each layer's bias re-fit to its mean output error after rounding (our addition)
    adaround_scale_search: bool = True  # each layer's weight grid chosen by its output error first (our addition)
    block_recon: bool | None = None  # BRECQ block reconstruction with QDrop and LSQ steps (needs torch: the recon
    # extra); None: off (for weights and activations of 4 bits or fewer ``choices`` says why)
    recon_iters: int = 200  # Adam steps per block
    recon_batch: int = 32  # samples per Adam step
    recon_block_layers: int = 4  # a plain chain's layers reconstructed together, at most
    recon_crop: int = 32  # spatial side of the crops a block of local ops learns on (0: whole maps where they fit)
    qdrop: float = 0.5  # probability that an activation element is quantized while reconstructing (1: BRECQ)
    lsq: bool = True  # learn the block's activation steps jointly with the rounding
    recon_fisher: bool = False  # weigh each block output channel by the task loss's Fisher information
    recon_dsq: bool = False  # DSQ's soft rounding of the block's activations while learning, not straight-through
    easyquant: bool = False
    easyquant_steps: int = 100  # candidate scales per search (the paper: 100)
    easyquant_range: tuple = (0.5, 2.0)  # candidates α·S₀ for α in this range (the paper: [0.5, 2])
    easyquant_rows: int = 2048  # rows (output positions) sampled per layer
    easyquant_rounds: int = 3  # at most this many Sᵃ / Sʷ alternations per layer
    easyquant_passes: int = 4  # passes over the calibration data (blocks of consecutive layers)
    cle_relu6: str = "clip"  # "clip": exact per-channel bound; "relu": replace ReLU6 by ReLU (the paper)
    fusable_tolerance: float = 0.25  # MSE increase accepted for a grid that lets a bound fuse (CLE Min, sub-8-bit)
    bias_correction: str | None = None  # "empirical" | "analytic"
    data_free: bool = False
    input_range: tuple | None = None  # (lo, hi) of the preprocessed model input, for data-free ranges
    steps: list | None = None  # explicit order; None: derived from the flags above (white paper Fig. 8)
    overrides: dict = field(default_factory=dict)  # tensor / layer / weight name -> {bits, symmetric, range, ...}

    def validate(self) -> "Config":
        """Check every setting (InputError) and resolve the ones left to ptq; ``choices`` {setting: why} says
        what was chosen for the user."""
        check_types(self.to_json(), _defaults(), OPTIONAL_TYPES)
        self.choices = getattr(self, "choices", {})  # kept when validated again
        if self.adaround is None:
            self.adaround = self.weight_bits <= 4 and not self.data_free
            if self.adaround:
                self.choices["adaround"] = (
                    f"on: {self.weight_bits}-bit weights at nearest rounding lose most of a model's accuracy "
                    "(EfficientNet-Lite0 W4A8 per-channel: 78 points, AdaRound: 5; README, Measured); "
                    "--no-adaround turns it off")
        if self.cle is None and self.steps is not None:  # the user's own steps say whether CLE runs
            self.cle = "cle" in self.steps
        if self.cle is None:
            self.cle = self.weight_bits <= 4 or self.data_free
            if self.cle and not self.data_free:
                self.choices["cle"] = (
                    f"on, to be compared: with {self.weight_bits}-bit weights ptq.quantize also quantizes without "
                    "CLE (shortened runs) and keeps the setting closer to FP32 on the held-back samples (it helps "
                    "some models, "
                    "EfficientNet-Lite0 W4A8: drop 5.00 -> 1.92 points, and not others; docs/FINDINGS.md); "
                    "--cle / --no-cle decide it yourself")
        if self.weight_symmetric is None:
            self.weight_symmetric = True
            if self.weight_bits <= 4 and not (self.easyquant or self.data_free):
                self.choices["weight_symmetric"] = (
                    f"symmetric, to be compared: with {self.weight_bits}-bit weights ptq.quantize also quantizes "
                    "with asymmetric grids (shortened runs) and keeps the setting closer to FP32 on the held-back "
                    "samples (they help "
                    "some models, EfficientNet-Lite0 W4A8: drop 2.08 -> 0.77 points, and hurt others, Lite2: "
                    "1.53 -> 3.00; docs/FINDINGS.md); --weight-symmetric / --weight-asymmetric decide it yourself")
        if self.ends_8bit is None:
            self.ends_8bit = self.act_bits <= 4
            if self.ends_8bit:
                self.choices["ends_8bit"] = (
                    f"on: with {self.act_bits}-bit activations the model's inputs and outputs and the inputs of its "
                    "head layers (a classifier's last layer) keep 8 bits, and so do the weights of the first and "
                    "the head layers, as in BRECQ's and QDrop's W4A4 results; in an int8 runtime they cost nothing "
                    "(EfficientNet-Lite0 W4A4: drop 10.92 -> 8.23 points with the activations, 7.31 with the "
                    "weights too; docs/FINDINGS.md); --no-ends-8bit quantizes them at the asked bits too")
        if self.block_recon is None:
            self.block_recon = False
            if self.weight_bits <= 4 and self.act_bits <= 4 and not self.data_free and self.adaround:
                self.choices["block_recon"] = (
                    f"off: with {self.weight_bits}-bit weights and {self.act_bits}-bit activations, after AdaRound "
                    "has rounded for the quantized activations, block reconstruction kept 2 of EfficientNet-Lite0's "
                    "16 blocks and did not lower the drop (5.08 -> 5.46 points, paired difference within its "
                    "error) nor change PP-OCRv4 det's F1 (93.53 / 93.59 %), for 20 more minutes on one core "
                    "(docs/FINDINGS.md); --block-recon turns it on (needs PyTorch: pip install 'ptq[recon]')")
        if self.adaround_inputs is None:
            self.adaround_inputs = "quantized_acts" if self.act_bits <= 4 else "quantized"
            if self.adaround and self.act_bits <= 4:
                self.choices["adaround_inputs"] = (
                    f"quantized_acts: with {self.act_bits}-bit activations AdaRound rounds each layer for its input "
                    "in the network whose activations are quantized too, so the activation ranges are set before it "
                    "(EfficientNet-Lite0 W4A4 without block reconstruction: drop 8.84 -> 5.08 points; "
                    "docs/FINDINGS.md); --adaround-inputs quantized rounds for the weights' error alone")
        check_overrides(self.overrides, tuple(dict.fromkeys(WEIGHT_METHODS + ACT_METHODS + ("xent",))))
        if not 2 <= self.weight_bits <= 8:
            raise InputError(f"weight bits must be 2-8, not {self.weight_bits}")
        if not (2 <= self.act_bits <= 8 or self.act_bits == 16):
            raise InputError(f"activation bits must be 2-8 or 16, not {self.act_bits}")
        if self.weight_range not in WEIGHT_METHODS:
            raise InputError(f"unknown weight range {self.weight_range!r} (choose from {', '.join(WEIGHT_METHODS)})")
        if self.placement not in ("measured", "all"):
            raise InputError(f"placement must be 'measured' or 'all', not {self.placement!r}")
        if self.act_range not in ACT_METHODS:
            raise InputError(f"unknown activation range {self.act_range!r} (choose from {', '.join(ACT_METHODS)})")
        if self.logits_range not in ACT_METHODS + ("xent",):
            raise InputError(f"unknown logits range {self.logits_range!r}")
        if not 0 < self.percentile <= 100:
            raise InputError(f"percentile must be in (0, 100], not {self.percentile}")
        if self.memory_limit <= 0:
            raise InputError(f"memory limit must be > 0 GB, not {self.memory_limit}")
        if self.threads < 0:
            raise InputError(f"threads must be >= 0 (0: every core), not {self.threads}")
        if self.calib_size < 1 or self.batch_size < 1 or self.holdout < 0 or self.latency_runs < 0:
            raise InputError("calibration size and batch size must be >= 1, holdout >= 0")
        if self.data_free and (self.easyquant or self.adaround):
            raise InputError("--data-free cannot be combined with EasyQuant or AdaRound: both need calibration data")
        if self.easyquant and not self.weight_symmetric:
            raise InputError("EasyQuant searches symmetric weight grids: drop --weight-asymmetric or --easyquant")
        if self.data_free:
            self.cle = True
            self.bias_correction = self.bias_correction or "analytic"
        if self.target not in TARGET_NAMES:
            raise InputError(f"unknown target {self.target!r} (choose from {', '.join(TARGET_NAMES)})")
        if self.reduce_range not in ("auto", "always", "never"):
            raise InputError(f"reduce_range must be auto, always or never, not {self.reduce_range!r}")
        if self.fusable_tolerance < 0:
            raise InputError(f"fusable_tolerance must be >= 0, not {self.fusable_tolerance}")
        if self.cle_relu6 not in ("clip", "relu"):
            raise InputError(f"cle_relu6 must be clip or relu, not {self.cle_relu6!r}")
        if self.bias_correction not in (None, "empirical", "analytic"):
            raise InputError(f"unknown bias correction {self.bias_correction!r} (empirical or analytic)")
        lo, hi = (tuple(self.easyquant_range) + (0, 0))[:2]
        if not (0 < lo <= 1 <= hi) or self.easyquant_steps < 2 or self.easyquant_rows < 1 \
                or self.easyquant_rounds < 1 or self.easyquant_passes < 1:
            raise InputError("easyquant settings: range must be LO,HI with 0 < LO <= 1 <= HI; steps >= 2; "
                             "rows, rounds and passes >= 1")
        self.easyquant_range = (float(lo), float(hi))
        if min(self.adaround_iters, self.adaround_batch, self.adaround_rows) < 1 or self.adaround_lambda < 0:
            raise InputError("adaround settings: iters, batch and rows must be >= 1, lambda >= 0")
        if min(self.recon_iters, self.recon_batch, self.recon_block_layers) < 1 or not 0 <= self.qdrop <= 1 \
                or self.recon_crop < 0:
            raise InputError("block reconstruction settings: iters, batch and block layers must be >= 1, "
                             "qdrop in [0, 1], crop >= 0")
        if self.data_free and self.block_recon:
            raise InputError("--data-free cannot be combined with block reconstruction: it needs calibration data")
        if self.adaround_inputs not in ("quantized", "quantized_acts", "fp32"):
            raise InputError(f"adaround_inputs must be quantized, quantized_acts or fp32, not {self.adaround_inputs!r}")
        if self.input_range is not None:
            if len(self.input_range) != 2 or not self.input_range[0] < self.input_range[1]:
                raise InputError(f"input range must be LO,HI with LO < HI, not {self.input_range}")
            self.input_range = tuple(float(v) for v in self.input_range)
        self.steps = list(self.steps) if self.steps is not None else self.default_steps()
        unknown = [s for s in self.steps if s not in STEPS]
        if unknown:
            raise InputError(f"unknown step(s) {', '.join(unknown)} (known: {', '.join(STEPS)})")
        first = next((k for k, s in enumerate(self.steps) if s not in FUNCTION_PRESERVING), len(self.steps))
        late = [s for s in self.steps[first:] if s in FUNCTION_PRESERVING]
        if late:
            raise InputError(f"steps: {', '.join(late)} change the FP32 model and must come before every other step")
        check_order(self.steps, self.adaround_inputs)
        return self

    def default_steps(self) -> list[str]:
        """The white paper's order (Fig. 8): CLE → bias absorption → weight ranges → AdaRound → bias
        correction (of the layers AdaRound left alone) → activation ranges → block reconstruction (it learns
        through the activation quantizers, starting from AdaRound's grids where AdaRound ran); then the int32
        bias guard.
        With EasyQuant the activation ranges come before it (it searches around both initial scales), and
        AdaRound then rounds on the grids EasyQuant chose; with ``adaround_inputs = "quantized_acts"`` they come
        before AdaRound, whose x̃ carries the activation quantizers."""
        steps = ["smoothquant"] if self.smoothquant and not self.data_free else []
        steps += ["cle", "bias_absorption"] if self.cle else []
        steps.append("weight_ranges")
        ranges = "data_free_ranges" if self.data_free else "activation_ranges"
        early = self.easyquant or (self.adaround and self.adaround_inputs == "quantized_acts")
        if early:  # EasyQuant searches around both initial ranges; AdaRound's x̃ may carry the activation quantizers
            steps.append(ranges)
        if self.easyquant:  # then AdaRound rounds on the grids EasyQuant chose
            steps.append("easyquant")
        if self.adaround:
            steps.append("adaround")
        if self.bias_correction:
            steps.append("bias_correction")
        if not early:
            steps.append(ranges)
        if self.block_recon:  # needs the activation quantizers it learns through
            steps.append("block_reconstruction")
        return steps + ["bias_overflow"]

    @property
    def memory_bytes(self) -> float:
        return self.memory_limit * 2**30

    def override_for(self, *names: str) -> dict:
        for n in names:
            if n in self.overrides:
                return self.overrides[n]
        return {}

    def symmetric_weights(self, bits: int) -> bool:
        """Whether a layer with ``bits``-bit weights gets a symmetric grid: the setting, except that asymmetric
        grids chosen by ptq for weights of 4 bits or fewer leave a layer raised to more bits symmetric."""
        return True if bits > 4 and "weight_symmetric" in self.choices else bool(self.weight_symmetric)

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# settings that only act with another: (settings, whether they act, the option that makes them act)
DEPENDENT = [
    (("percentile",), lambda c: "percentile" in (c.act_range, c.logits_range)
     or any(o.get("range") == "percentile" for o in c.overrides.values()), "--act-range percentile"),
    (("input_range",), lambda c: c.data_free, "--data-free"),
    (("adaround_iters", "adaround_batch", "adaround_lambda", "adaround_polish", "adaround_rows", "adaround_bias",
      "adaround_scale_search"), lambda c: c.adaround, "--adaround (on by default for weights of 4 bits or fewer)"),
    (("recon_iters", "recon_batch", "recon_block_layers", "recon_crop", "qdrop", "lsq", "recon_fisher", "recon_dsq"),
     lambda c: c.block_recon, "--block-recon"),
    (("easyquant_steps", "easyquant_range", "easyquant_rows", "easyquant_rounds", "easyquant_passes"),
     lambda c: c.easyquant, "--easyquant"),
]


def check_effective(config: Config) -> None:
    """Refuse (InputError) a setting given away from its default that has no effect with the others: a
    ``--percentile`` without a percentile range, ``--input-range`` with calibration data, AdaRound's, block
    reconstruction's or EasyQuant's settings with the stage off. ``config`` is validated (choices resolved)."""
    defaults = _defaults()
    for names, acts, needs in DEPENDENT:
        given = [n for n in names if getattr(config, n) != defaults[n]
                 and not (isinstance(defaults[n], tuple) and tuple(getattr(config, n)) == defaults[n])]
        if given and not acts(config):
            flags = ", ".join("--" + n.replace("_", "-") for n in given)
            raise InputError(f"{flags} has no effect without {needs}")


# settings whose default is None
OPTIONAL_TYPES = {"adaround": bool, "adaround_inputs": str, "block_recon": bool, "cle": bool, "ends_8bit": bool,
                  "weight_symmetric": bool, "bias_correction": str, "input_range": tuple, "steps": list}


def _defaults() -> dict:
    return {f.name: f.default if f.default_factory is MISSING else f.default_factory() for f in fields(Config)}


def load_recipe(path: str | Path) -> dict:
    """Settings from a TOML recipe: top-level keys are Config fields; [overrides."name"] tables per tensor."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such recipe file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a valid TOML recipe ({e})") from None
    known = {f.name for f in fields(Config)}
    bad = [k for k in data if k not in known]
    if bad:
        raise InputError(f"{path}: unknown setting(s) {', '.join(bad)} (known: {', '.join(sorted(known))})")
    check_types(data, _defaults(), OPTIONAL_TYPES, str(path))
    check_overrides(data.get("overrides", {}), tuple(dict.fromkeys(WEIGHT_METHODS + ACT_METHODS + ("xent",))),
                    str(path))
    return data


@dataclass
class State:
    """The FP32 reference and the quantization decisions taken so far (see the module docstring)."""

    config: Config
    model: onnx.ModelProto  # the FP32 reference: only the function-preserving steps (CLE, bias absorption) edit it
    layers: list[Layer]
    placement: Placement
    bn: dict[str, BNStats]
    logits: list[str]
    target: Target  # what the runtime can do (ptq.target): decisions read it, never a probe
    weights: dict[str, Encoding] = field(default_factory=dict)  # by layer name
    acts: dict[str, Encoding] = field(default_factory=dict)  # by root tensor name
    report: dict = field(default_factory=dict)
    transformed: onnx.ModelProto | None = None  # the FP32 model after CLE / bias absorption
    rounded: dict = field(default_factory=dict)  # layer -> integer weights chosen by AdaRound (else nearest)
    biases: dict = field(default_factory=dict)  # layer -> bias chosen for its quantized weights (bias correction)

    def bias(self, layer, gr) -> np.ndarray | None:
        """The bias the quantized layer adds: the decided one, else the reference's (None: the layer has none)."""
        if layer.name in self.biases:
            return self.biases[layer.name]
        return gr.const(layer.bias) if layer.bias else None


def _simulate(state):
    from .export import export_qdq, quantizer_inputs
    model = export_qdq(state, integers=False)  # float bounds: every quantizer's float input is a tensor
    return model, quantizer_inputs(model)


@dataclass
class Context:
    """What the steps read besides the state: the calibration source, whether to show progress, and
    ``simulate(state) -> (QDQ model, {activation tensor: the float tensor its QuantizeLinear reads})``, the
    quantized network as the decisions so far make it (so a stage needs no exporter of its own)."""

    calib: object = None
    progress: bool = False
    simulate: Callable = _simulate


def _subgraph_layers(model: onnx.ModelProto) -> int:
    """How many Conv / Gemm / MatMul nodes the model's If / Loop / Scan bodies hold (at any depth)."""
    def count(graph, top):
        n = 0 if top else sum(node.op_type in ("Conv", "Gemm", "MatMul") for node in graph.node)
        for node in graph.node:
            for a in node.attribute:
                for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    n += count(g, False)
        return n
    return count(model.graph, True)


def prepare(model: onnx.ModelProto, config: Config) -> State:
    """Canonicalize, fold BN, find layers and activation quantizer placement. Refuses (InputError) a model that
    is already quantized or has nothing to quantize, and overrides that name nothing in it."""
    config.validate()
    quantized = sorted({n.op_type for n in model.graph.node if n.op_type in QUANTIZED_OPS})
    if quantized:
        raise InputError(f"the model is already quantized (it has {', '.join(quantized)} nodes); give the FP32 model")
    model = canonicalize(model)
    bn = fold_batchnorm(model)
    layers = find_layers(model)
    inner = _subgraph_layers(model)
    if not layers:
        raise InputError("nothing to quantize: the model's main graph has no Conv, Gemm or MatMul with a constant "
                         "float weight" + (f"; its {inner} such ops are inside If / Loop / Scan bodies, which ptq does "
                                           "not quantize (an If is, where every calibration sample takes the same "
                                           "branch)" if inner else ""))
    placement = place_activation_quantizers(model, layers)
    check_override_names(config.overrides, {n for l in layers for n in (l.name, l.weight)} | set(placement.root))
    by_out = {l.out: l for l in layers}
    logits = [o.name for o in model.graph.output
              if o.name in placement.root and o.name in by_out and by_out[o.name].act is None
              and by_out[o.name].op in ("Gemm", "MatMul")]
    state = State(config, model, layers, placement, bn, logits, resolve_target(config.target))
    if config.choices:
        state.report["choices"] = dict(config.choices)
    if inner:
        state.report.setdefault("warnings", []).append(
            f"{inner} Conv / Gemm / MatMul ops inside If / Loop / Scan bodies are left in float")
    return state


QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
                 "ConvInteger", "MatMulInteger", "QGemm", "QLinearAdd"}

STEPS = {
    "smoothquant": smoothquant,
    "cle": equalize,
    "bias_absorption": absorb_high_biases,
    "weight_ranges": set_weight_ranges,
    "adaround": adaround,
    "bias_correction": correct_biases,
    "activation_ranges": set_activation_ranges,
    "data_free_ranges": set_data_free_ranges,
    "easyquant": easyquant,
    "block_reconstruction": reconstruct_blocks,
    "bias_overflow": guard_bias_overflow,
}


FUNCTION_PRESERVING = {"smoothquant", "cle", "bias_absorption"}  # transform the FP32 model, keeping its function

# What each decision step reads and writes of the decisions: weight grids, activation grids. Block reconstruction
# refines both from where the earlier steps left them (it writes nothing another step read); the int32 bias guard
# reads the final grids and biases, so it comes last.
STEP_READS = {"easyquant": {"weight grids", "activation grids"}, "adaround": {"weight grids"},
              "bias_correction": {"weight grids"}, "block_reconstruction": {"weight grids", "activation grids"},
              "bias_overflow": {"weight grids", "activation grids"}}
STEP_WRITES = {"weight_ranges": {"weight grids"}, "activation_ranges": {"activation grids"},
               "data_free_ranges": {"activation grids"}, "easyquant": {"weight grids", "activation grids"}}
FIRST_WRITER = {"weight grids": "weight_ranges", "activation grids": "activation_ranges"}


def check_order(steps: list[str], adaround_inputs: str = "quantized") -> None:
    """Refuse (InputError) an order of steps that would write a wrong model: a step listed twice, a step before
    what it reads was written, a step that rewrites what an earlier step derived its result from (EasyQuant after
    AdaRound: AdaRound's integers on EasyQuant's new grid), and the bias guard anywhere but last."""
    twice = sorted({s for s in steps if steps.count(s) > 1})
    if twice:
        raise InputError(f"steps: {', '.join(twice)} listed twice")
    written, read_by = set(), {}
    for k, name in enumerate(steps):
        reads = set(STEP_READS.get(name, ()))
        if name == "adaround" and adaround_inputs == "quantized_acts":
            reads.add("activation grids")
        missing = sorted(reads - written)
        if missing:
            raise InputError(f"steps: {name} reads the {' and '.join(missing)}: put "
                             f"{' and '.join(FIRST_WRITER[m] for m in missing)} before it")
        for fact in STEP_WRITES.get(name, ()):
            stale = [r for r in read_by.get(fact, []) if r != name]
            if stale:
                raise InputError(f"steps: {name} rewrites the {fact} that {', '.join(stale)} already used: put "
                                 f"{name} before {stale[0]}")
        for fact in reads:
            read_by.setdefault(fact, []).append(name)
        written |= STEP_WRITES.get(name, set())
        if name == "bias_overflow" and k != len(steps) - 1:
            raise InputError("steps: bias_overflow guards the biases of the final grids and must come last")


def _digest(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString()).hexdigest()


def run_steps(state: State, ctx: Context, timings: dict, steps: list[str] | None = None) -> State:
    """Run the configured steps (or ``steps``) in order, timing each. After the FP32-preserving transforms the
    model is snapshotted (``state.transformed``) so the pipeline can measure how far they moved the FP32 function;
    from then on it is the frozen reference, and a step that changes it is a bug (RuntimeError)."""
    frozen = None
    for name in state.config.steps if steps is None else steps:
        if frozen is None and name not in FUNCTION_PRESERVING:
            frozen = _digest(state.model)
        t0 = time.perf_counter()
        state = STEPS[name](state, ctx)
        if name in FUNCTION_PRESERVING:
            state.transformed = onnx.ModelProto.FromString(state.model.SerializeToString())
        timings[name] = round(time.perf_counter() - t0, 3)
    if frozen is not None and _digest(state.model) != frozen:
        raise RuntimeError("a quantization step changed the frozen FP32 reference")
    return state
