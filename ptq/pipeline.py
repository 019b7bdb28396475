"""The pipeline: configuration, the state every stage reads and returns, and the ordered steps of a recipe.

    load → canonicalize → fold BN → weight ranges → activation ranges → bias overflow guard → export QDQ
         → fidelity on held-back calibration samples → (evaluate) → report

Every step has the signature ``step(state, ctx) -> state``; they never write files (``quantize`` does).
"""
from __future__ import annotations

import time
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

import onnx

from .canonicalize import canonicalize
from .errors import InputError
from .patterns import Layer, Placement, find_layers, place_activation_quantizers
from .quant import Encoding
from .ranges import ACT_METHODS, WEIGHT_METHODS
from .stages.activation_ranges import set_activation_ranges
from .stages.bias_overflow import guard_bias_overflow
from .stages.fold_bn import BNStats, fold_batchnorm
from .stages.weight_ranges import set_weight_ranges


@dataclass
class Config:
    """Every setting of a run; a recipe file (TOML) sets the same names, flags override it."""

    weight_bits: int = 8
    per_channel: bool = True
    weight_range: str = "mse"
    act_bits: int = 8
    act_symmetric: bool = False
    act_range: str = "mse"
    logits_range: str = "xent"
    percentile: float = 99.99
    calib_size: int = 256
    holdout: int = 32
    batch_size: int = 16
    seed: int = 0
    xent_rows: int = 512
    steps: list = field(default_factory=lambda: list(DEFAULT_STEPS))
    overrides: dict = field(default_factory=dict)  # tensor / layer / weight name -> {bits, symmetric, range, ...}

    def validate(self) -> "Config":
        if not 2 <= self.weight_bits <= 8:
            raise InputError(f"weight bits must be 2-8, not {self.weight_bits}")
        if not (2 <= self.act_bits <= 8 or self.act_bits == 16):
            raise InputError(f"activation bits must be 2-8 or 16, not {self.act_bits}")
        if self.weight_range not in WEIGHT_METHODS:
            raise InputError(f"unknown weight range {self.weight_range!r} (choose from {', '.join(WEIGHT_METHODS)})")
        if self.act_range not in ACT_METHODS:
            raise InputError(f"unknown activation range {self.act_range!r} (choose from {', '.join(ACT_METHODS)})")
        if self.logits_range not in ACT_METHODS + ("xent",):
            raise InputError(f"unknown logits range {self.logits_range!r}")
        if not 0 < self.percentile <= 100:
            raise InputError(f"percentile must be in (0, 100], not {self.percentile}")
        if self.calib_size < 1 or self.batch_size < 1 or self.holdout < 0:
            raise InputError("calibration size and batch size must be >= 1, holdout >= 0")
        unknown = [s for s in self.steps if s not in STEPS]
        if unknown:
            raise InputError(f"unknown step(s) {', '.join(unknown)} (known: {', '.join(STEPS)})")
        return self

    def override_for(self, *names: str) -> dict:
        for n in names:
            if n in self.overrides:
                return self.overrides[n]
        return {}

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


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
    return data


@dataclass
class State:
    config: Config
    model: onnx.ModelProto  # the FP32 model, canonical; stages may transform it FP32-equivalently
    layers: list[Layer]
    placement: Placement
    bn: dict[str, BNStats]
    logits: list[str]
    weights: dict[str, Encoding] = field(default_factory=dict)  # by layer name
    acts: dict[str, Encoding] = field(default_factory=dict)  # by root tensor name
    report: dict = field(default_factory=dict)


@dataclass
class Context:
    """What the steps read besides the state: the calibration source and whether to show progress."""

    calib: object = None
    progress: bool = False


def prepare(model: onnx.ModelProto, config: Config) -> State:
    """Canonicalize, fold BN, find layers and activation quantizer placement."""
    model = canonicalize(model)
    bn = fold_batchnorm(model)
    layers = find_layers(model)
    placement = place_activation_quantizers(model, layers)
    by_out = {l.out: l for l in layers}
    logits = [o.name for o in model.graph.output
              if o.name in placement.root and o.name in by_out and by_out[o.name].act is None
              and by_out[o.name].op in ("Gemm", "MatMul")]
    return State(config, model, layers, placement, bn, logits)


STEPS = {
    "weight_ranges": set_weight_ranges,
    "activation_ranges": set_activation_ranges,
    "bias_overflow": guard_bias_overflow,
}
DEFAULT_STEPS = ("weight_ranges", "activation_ranges", "bias_overflow")


def run_steps(state: State, ctx: Context, timings: dict) -> State:
    for name in state.config.steps:
        t0 = time.perf_counter()
        state = STEPS[name](state, ctx)
        timings[name] = round(time.perf_counter() - t0, 3)
    return state
