"""Data-free activation ranges (Nagel et al. 2019, §4.2 / white paper §3.1 "BN based"): with no calibration
data, each quantized tensor's range is μ ± α·σ per channel (α = 6), taken over channels, where (μ, σ) are
Gaussian moments:

- after a layer with a folded BatchNorm: (β, |γ|) of that BN (clipped to the fused activation's bounds);
- propagated elsewhere: through Relu / Clip / Min(·, per-channel bound) by the clipped-normal moments
  (ptq.moments), with the clipping bounds carried along (a pool of a ReLU output stays >= 0); through Add as sums
  (μ₁ + μ₂, √(σ₁² + σ₂²)), through a layer without BN linearly (μ = W·μ + b, σ² = W²·σ², inputs taken as
  independent), through pools, Flatten / Reshape / Identity unchanged, through Concat (axis 1) concatenated;
- the model inputs: uniform on ``input_range`` when given (the range of the preprocessed data, e.g. [-1, 1]),
  else standard normal (a normalized input).
Per tensor the range is [min_c(μ_c − α·σ_c), max_c(μ_c + α·σ_c)], clipped to the bounds.
Tensors that no rule reaches fall back to min-max on a few synthetic inputs drawn from the input moments; the
report lists them.
"""
from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..model import Graph, attr
from ..moments import clipped_normal_moments
from ..observe import Histogram, observe
from ..patterns import clip_bounds
from ..quant import encoding_from_range
from ..ranges import activation_encoding
from ..weights import contract_input, layer_kind
from .activation_ranges import act_spec, end_tensors, fit_inside

ALPHA = 6.0
PASS_THROUGH = {"GlobalAveragePool", "AveragePool", "MaxPool", "Flatten", "Reshape", "Identity", "Squeeze",
                "Unsqueeze"}


def propagate_moments(state) -> dict[str, tuple]:
    """tensor -> (μ [C], σ [C], lo, hi): Gaussian moments per channel and the bounds the values keep to."""
    gr = Graph(state.model)
    cfg = state.config
    stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in gr.inputs:
        if cfg.input_range:
            lo, hi = cfg.input_range
            stats[name] = (np.array([(lo + hi) / 2]), np.array([(hi - lo) / np.sqrt(12)]), lo, hi)
        else:
            stats[name] = (np.zeros(1), np.ones(1), -np.inf, np.inf)
    layers = {l.name: l for l in state.layers}
    for node in state.model.graph.node:
        ins = [stats.get(i) for i in node.input]
        out = None
        layer = layers.get(node.name)
        if layer is not None:
            bn = state.bn.get(layer.pre_act)
            if bn is not None:
                out = (bn.beta.astype(np.float64), bn.std.astype(np.float64), -np.inf, np.inf)
            elif ins[0] is not None and layer_kind(gr, layer):
                w = gr.const(layer.weight).astype(np.float64)
                kind = layer_kind(gr, layer)
                cin = w.shape[1] if kind == "conv" else (
                    w.shape[0] if kind == "depthwise" else w.shape[1 - layer.w_axis])
                mu = np.broadcast_to(ins[0][0], (cin,))
                var = np.broadcast_to(ins[0][1] ** 2, (cin,))
                b = gr.const(layer.bias).astype(np.float64) if layer.bias else 0.0
                out = (contract_input(w, kind, layer.w_axis, mu) + b,
                       np.sqrt(contract_input(w**2, kind, layer.w_axis, var)), -np.inf, np.inf)
        elif ins and ins[0] is not None and node.op_type in ("Relu", "Clip"):
            lo, hi = clip_bounds(gr, node)
            out = (*clipped_normal_moments(ins[0][0], ins[0][1], lo, hi), lo, hi)
        elif node.op_type == "Min" and len(node.input) == 2 and ins[0] is not None and gr.is_const(node.input[1]):
            bound = gr.const(node.input[1]).astype(np.float64).ravel()
            if bound.size in (1, ins[0][0].size):
                out = (*clipped_normal_moments(ins[0][0], ins[0][1], ins[0][2], bound), ins[0][2], bound)
        elif node.op_type == "Add" and len(ins) == 2 and all(i is not None for i in ins):
            try:
                out = (ins[0][0] + ins[1][0], np.sqrt(ins[0][1] ** 2 + ins[1][1] ** 2), -np.inf, np.inf)
            except ValueError:
                out = None
        elif node.op_type in PASS_THROUGH and ins and ins[0] is not None:
            out = ins[0]
        elif node.op_type == "ReduceMean" and ins[0] is not None and _spatial_axes(gr, node):
            out = ins[0]  # a global average pool written as ReduceMean
        elif node.op_type == "Concat" and all(i is not None for i in ins) and attr(node, "axis") == 1:
            n = [i[0].size for i in ins]
            out = (np.concatenate([i[0] for i in ins]), np.concatenate([i[1] for i in ins]),
                   np.concatenate([np.broadcast_to(i[2], k) for i, k in zip(ins, n)]),
                   np.concatenate([np.broadcast_to(i[3], k) for i, k in zip(ins, n)]))
        if out is not None:
            stats[node.output[0]] = (np.asarray(out[0], np.float64), np.asarray(out[1], np.float64), out[2], out[3])
    return stats


def _spatial_axes(gr: Graph, node) -> bool:
    axes = attr(node, "axes", None)
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = gr.const(node.input[1])
    return axes is not None and all(int(a) >= 2 for a in np.asarray(axes).ravel())


def set_data_free_ranges(state, ctx=None):
    """The activation-range stage without data (see module docstring)."""
    cfg = state.config
    stats = propagate_moments(state)
    pre = {l.out: l.pre_act for l in state.layers if l.act_node and state.bn.get(l.pre_act) is not None}
    if not state.bn:
        state.report.setdefault("warnings", []).append(
            "data-free: the model has no BatchNormalization (folded at export), so every range comes from moments "
            "propagated through the weights from the input; expect a large accuracy loss — give --calib data, "
            "or export the model with its BatchNormalization nodes")
    fallback = []
    ends = end_tensors(state)
    for r in state.placement.roots:
        spec = act_spec(cfg, cfg.override_for(r), r in ends)
        if stats.get(r) is None:
            fallback.append(r)
            continue
        # after a BN'd layer: the paper's β ± α·γ of the pre-activation, clipped to the activation's bounds
        mu, sigma = stats[pre[r]][:2] if r in pre else stats[r][:2]
        lo_b, hi_b = stats[r][2], stats[r][3]
        lo = float(np.min(np.maximum(mu - ALPHA * sigma, lo_b)))
        hi = float(np.max(np.minimum(mu + ALPHA * sigma, hi_b)))
        enc = encoding_from_range(spec, min(lo, hi), hi, "bn" if r in pre else "moments")
        state.acts[r] = fit_inside(enc, (float(np.min(lo_b)), float(np.max(hi_b))))
    if fallback:
        _synthetic_fallback(state, fallback, stats, ends)
    state.report["data_free_ranges"] = {"alpha": ALPHA, "synthetic_fallback": fallback}
    return state


def _synthetic_fallback(state, names, stats, ends: set[str], samples: int = 16):
    """Min-max ranges of ``names`` on random inputs drawn from the input moments."""
    from ..data import model_inputs, static_batch
    cfg = state.config
    inputs = model_inputs(state.model)
    rng = np.random.default_rng(cfg.seed)
    samples = static_batch(inputs) or samples
    batch = {}
    for info in inputs:
        if any(d is None for k, d in enumerate(info.shape) if k != info.batch_axis) or info.batch_axis is None:
            raise InputError(f"data-free ranges for {', '.join(names[:3])} need synthetic inputs, but input "
                             f"'{info.name}' has dynamic dimensions {info.shape}: give --calib data")
        mu, sigma = stats[info.name][:2]
        shape = list(info.shape)
        shape[info.batch_axis] = samples
        if cfg.input_range:
            batch[info.name] = rng.uniform(*cfg.input_range, shape).astype(np.float32)
        else:
            batch[info.name] = rng.normal(float(mu.mean()), float(sigma.mean()), shape).astype(np.float32)

    class _Synthetic:
        def __len__(self):
            return samples

        def batches(self, batch_size):
            yield list(range(samples)), batch
    hists = {n: Histogram() for n in names}
    observe(state.model, _Synthetic(), samples, {n: [h] for n, h in hists.items()})
    for n in names:
        enc = activation_encoding(hists[n], act_spec(cfg, cfg.override_for(n), n in ends), "minmax")
        enc.method = "minmax (synthetic inputs)"
        state.acts[n] = enc
