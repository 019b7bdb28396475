"""Range setting (white paper §3.1): choose each quantizer's clipping range, hence its scale and zero point.

- ``minmax``: the full observed range.
- ``mse``: argmin over the clipping range of ||V − V̂||²_F (white paper eq. 14), by a coarse grid then
  golden-section search; per channel and vectorized over channels for weights, on a fine histogram for
  activations (so memory does not grow with the calibration set).
- ``xent``: for the logits, argmin of the cross-entropy between softmax(logits) and softmax(quantized logits)
  (white paper §3.1, "cross entropy").
- ``bn``: β ± α·γ (α = 6) from the BatchNorm that produced the tensor (white paper §3.1 / Nagel 2019 §4.2);
  no data needed.
- ``percentile``: the given percentile of |x| (or of x at both ends for asymmetric quantizers).
"""
from __future__ import annotations

import numpy as np

from .errors import InputError
from .observe import Histogram
from .quant import Encoding, QuantSpec, encoding_from_range, fake_quant_grid, sqnr_db

WEIGHT_METHODS = ("minmax", "mse")
ACT_METHODS = ("minmax", "mse", "percentile", "bn")
GOLDEN = (np.sqrt(5) - 1) / 2
WIDE_ROWS = 4096  # weight rows longer than this are searched in float32


def grid_golden_min(loss, lo: np.ndarray, hi: np.ndarray, grid: int = 20, iters: int = 16,
                    batched: bool = False) -> np.ndarray:
    """Minimize ``loss(t) -> [C]`` independently for each of C problems over t in [lo, hi] ([C] arrays).

    A coarse grid of ``grid`` points finds the basin, then golden-section search refines inside the two grid
    cells around the best point (robust where the loss is not unimodal over the whole range). ``batched``: the
    loss takes any number of candidates, each on its own (one problem, C = 1): the grid is one call."""
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    ts = lo[None] + (hi - lo)[None] * np.linspace(0, 1, grid)[:, None]  # [G, C]
    losses = loss(ts.ravel()).reshape(ts.shape) if batched else np.stack([loss(t) for t in ts])
    best = np.argmin(losses, axis=0)
    step = (hi - lo) / (grid - 1)
    a = np.maximum(ts[best, np.arange(ts.shape[1])] - step, lo)
    b = np.minimum(ts[best, np.arange(ts.shape[1])] + step, hi)
    c, d = b - GOLDEN * (b - a), a + GOLDEN * (b - a)
    fc, fd = loss(c), loss(d)
    for _ in range(iters):
        left = fc < fd  # the minimum lies in [a, d]: drop (d, b]; else drop [a, c)
        a, b = np.where(left, a, c), np.where(left, d, b)
        new = np.where(left, b - GOLDEN * (b - a), a + GOLDEN * (b - a))
        f_new = loss(new)
        c, d, fc, fd = (np.where(left, new, d), np.where(left, c, new),
                        np.where(left, f_new, fd), np.where(left, fc, f_new))
    t_star = np.where(fc < fd, c, d)
    # never worse than the best grid point
    grid_best = ts[best, np.arange(ts.shape[1])]
    return np.where(loss(t_star) <= losses[best, np.arange(ts.shape[1])], t_star, grid_best)


# ---------------------------------------------------------------- weights

def weight_encoding(w: np.ndarray, spec: QuantSpec, method: str = "mse") -> Encoding:
    """Weight quantizer for ``w`` (per channel along spec.axis, else per tensor): symmetric, range ±clip, or
    asymmetric, range [lo, hi] ∋ 0 with a zero point (``mse``: both ends on a coarse 2-D grid of fractions of
    [min, max], then each end refined by golden-section search, twice)."""
    if method not in WEIGHT_METHODS:
        raise InputError(f"unknown weight range method {method!r} (choose from {', '.join(WEIGHT_METHODS)})")
    w2 = _rows(w, spec.axis)  # [C, K]
    if spec.symmetric:
        absmax = np.abs(w2).max(axis=1).astype(np.float64)  # [C]
        if method == "mse":
            # rows over WIDE_ROWS (an 8192-wide MatMul) are searched in float32: half the memory traffic
            wq = w2.astype(np.float32) if w2.shape[1] > WIDE_ROWS else w2

            def loss(clip):  # [C] -> [C]
                s = np.maximum(clip / spec.qmax, 1e-12)[:, None].astype(wq.dtype)
                return np.sum((wq - fake_quant_grid(wq, s, 0, spec.qmin, spec.qmax)) ** 2, axis=1, dtype=np.float64)
            clip = grid_golden_min(loss, absmax * 0.01, absmax)
        else:
            clip = absmax
        lo, hi = -clip, clip
    else:
        lo0, hi0 = np.minimum(w2.min(axis=1), 0.0), np.maximum(w2.max(axis=1), 0.0)
        lo, hi = lo0, hi0
        if method == "mse":  # a coarse 2-D grid of both ends (the zero point's rounding makes the loss
            # jagged: one end at a time gets stuck), then each end refined on its own
            fs = np.linspace(0.3, 1.0, 8)
            pairs = [(a, b) for a in fs for b in fs]
            best = np.argmin(np.stack([_weight_loss(w2, spec, a * lo0, b * hi0) for a, b in pairs]), axis=0)
            lo, hi = np.array([pairs[k][0] for k in best]) * lo0, np.array([pairs[k][1] for k in best]) * hi0
            for _ in range(2):
                hi = grid_golden_min(lambda t: _weight_loss(w2, spec, lo, t), hi0 * 0.01, hi0)
                lo = grid_golden_min(lambda t: _weight_loss(w2, spec, t, hi), lo0, lo0 * 0.01)
    if spec.axis is None:
        lo, hi = lo[0], hi[0]
    enc = encoding_from_range(spec, lo, hi, method)
    enc.stats["sqnr_db"] = round(sqnr_db(w2, fake_quant_grid(w2, _col(enc.scale), _col(enc.zero_point), spec.qmin,
                                                             spec.qmax)), 2)
    return enc


def _weight_loss(w2: np.ndarray, spec: QuantSpec, lo, hi) -> np.ndarray:
    """Per row of ``w2`` [C, K], the squared error of quantizing it on the grid of [lo, hi] ([C] each)."""
    enc = encoding_from_range(spec, lo, hi)
    s, z = _col(enc.scale), _col(enc.zero_point)
    return np.sum((w2 - fake_quant_grid(w2, s, z, spec.qmin, spec.qmax)) ** 2, axis=1)


def _rows(w: np.ndarray, axis: int | None) -> np.ndarray:
    w = np.asarray(w, np.float64)
    if axis is None:
        return w.reshape(1, -1)
    return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)


def _col(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    return a.reshape(-1, 1) if a.ndim else a


# ---------------------------------------------------------------- activations

def _grid_of(spec: QuantSpec, lo: np.ndarray, hi: np.ndarray):
    """Scale and zero point ([G, 1] each) of candidate ranges [lo, hi] ([G])."""
    enc = encoding_from_range(spec, lo, hi)
    return enc.scale.astype(np.float64)[:, None], enc.zero_point.astype(np.float64)[:, None]


def search_range(loss, spec: QuantSpec, lo0: float, hi0: float, rounds: int = 2) -> tuple[float, float]:
    """Minimize ``loss(lo[G], hi[G]) -> [G]`` over lo in [lo0, 0], hi in [0, hi0] by coordinate-wise
    grid + golden-section search (one coordinate for symmetric or one-signed ranges)."""
    lo0, hi0 = min(lo0, 0.0), max(hi0, 0.0)
    if spec.symmetric or lo0 == 0.0 or hi0 == 0.0:
        top = max(-lo0, hi0) if spec.symmetric or hi0 == 0.0 else hi0
        sign_lo = -1.0 if (spec.symmetric and spec.signed) or hi0 == 0.0 else 0.0
        sign_hi = 0.0 if hi0 == 0.0 else 1.0

        def f(t):
            return loss(sign_lo * t, sign_hi * t)
        t = float(grid_golden_min(lambda v: f(v.ravel()), np.array([top * 0.01]), np.array([top]), batched=True)[0])
        return sign_lo * t, sign_hi * t
    lo, hi = lo0, hi0
    for _ in range(rounds):
        hi = float(grid_golden_min(lambda v: loss(np.full(v.size, lo), v.ravel()),
                                   np.array([hi0 * 0.01]), np.array([hi0]), batched=True)[0])
        lo = float(grid_golden_min(lambda v: loss(v.ravel(), np.full(v.size, hi)),
                                   np.array([lo0]), np.array([lo0 * 0.01]), batched=True)[0])
    return lo, hi


def _sigmoid(x):
    return 0.5 * (1 + np.tanh(0.5 * x))


# the float activations a quantized tensor may feed: the error that matters is the one after them
ACTIVATIONS = {
    "silu": lambda x: x * _sigmoid(x),
    "sigmoid": _sigmoid,
    "tanh": np.tanh,
    "hardswish": lambda x: x * np.clip(x + 3, 0, 6) / 6,
    "hardsigmoid": lambda x: np.clip(x / 6 + 0.5, 0, 1),
}


def hist_mse_loss(hist: Histogram, spec: QuantSpec, through=None):
    """The squared quantization error of the histogrammed data for candidate ranges (bin-center approximation):
    Σ n_i (x_i − Q(x_i))², or with ``through`` (a function, the float activation that reads the tensor)
    Σ n_i (f(x_i) − f(Q(x_i)))² — e.g. after SiLU the negative tail, which SiLU maps to about 0, matters little.

    Q maps every center between two rounding boundaries s·(k ± ½ − z) to level k (the clipped tails to the end
    levels), so with t_i = f(x_i) the sum is, level by level, Σ_k (T2_k − 2 f(v_k) T1_k + f(v_k)² N_k), where N_k,
    T1_k, T2_k are the sums of n_i, n_i t_i and n_i t_i² over level k's centers: prefix sums over the sorted centers
    read at the boundaries (found by binary search). A candidate costs O(2^b log bins) instead of O(bins)."""
    centers, counts = hist.centers_counts()  # ascending
    f = through or (lambda v: v)
    target = f(centers)
    prefix = [np.concatenate([[0.0], np.cumsum(counts * target ** p)]) for p in (0, 1, 2)]
    inner = np.arange(spec.qmin, spec.qmax, dtype=np.float64) + 0.5  # the boundary above each level but the top
    levels = np.arange(spec.qmin, spec.qmax + 1, dtype=np.float64)

    def loss(lo, hi):
        s, z = _grid_of(spec, np.asarray(lo), np.asarray(hi))  # [G, 1] each
        edges = np.searchsorted(centers, (s * (inner[None] - z)).ravel()).reshape(s.shape[0], -1)
        edges = np.concatenate([np.zeros((s.shape[0], 1), np.intp), edges,
                                np.full((s.shape[0], 1), centers.size, np.intp)], axis=1)
        n, t1, t2 = (p[edges[:, 1:]] - p[edges[:, :-1]] for p in prefix)  # [G, levels]
        fv = f((levels[None] - z) * s)
        return np.maximum(t2 - 2 * fv * t1 + fv * fv * n, 0.0).sum(axis=1)
    return loss


def encoding_mse(loss, enc: Encoding) -> float:
    """``loss`` (a ``hist_mse_loss``) at the per-tensor grid of ``enc``."""
    return float(loss(np.atleast_1d(enc.lo).astype(np.float64), np.atleast_1d(enc.hi).astype(np.float64))[0])


def mse_ratio(new: float, base: float) -> float:
    """new / base, with 0 / 0 = 1 and x / 0 = inf."""
    return new / base if base > 0 else (1.0 if new == 0 else np.inf)


def _hist_sqnr(hist: Histogram, enc: Encoding) -> float:
    centers, counts = hist.centers_counts()
    if counts.size == 0:
        return float("inf")
    approx = fake_quant_grid(centers, float(enc.scale), float(enc.zero_point), enc.spec.qmin, enc.spec.qmax)
    noise = float(np.sum(counts * (centers - approx) ** 2))
    signal = float(np.sum(counts * centers**2))
    return round(10 * np.log10(signal / noise), 2) if noise > 0 and signal > 0 else float("inf")


def activation_encoding(hist: Histogram, spec: QuantSpec, method: str = "mse",
                        percentile: float = 99.99, through: str | None = None) -> Encoding:
    """Per-tensor activation quantizer from a histogram; ``through`` (a name in ACTIVATIONS): MSE measured after
    that float activation, which alone reads the tensor."""
    if hist.n == 0:
        raise InputError("no calibration data reached this tensor")
    lo0, hi0 = min(hist.min, 0.0), max(hist.max, 0.0)
    if method == "mse" and spec.bits > 8:
        method = "minmax"  # a 16-bit step is finer than the histogram's bins: min-max is the MSE optimum there
    if method == "minmax":
        lo, hi = lo0, hi0
    elif method == "mse":
        lo, hi = search_range(hist_mse_loss(hist, spec, ACTIVATIONS.get(through)), spec, lo0, hi0)
        if through:
            method = f"mse after {through}"
    elif method == "percentile":
        q = percentile / 100.0
        lo = min(hist.quantile(1 - q), 0.0) if lo0 < 0 else 0.0
        hi = max(hist.quantile(q), 0.0)
    else:
        raise InputError(f"unknown activation range method {method!r} (choose from {', '.join(ACT_METHODS)})")
    enc = encoding_from_range(spec, lo, hi, method, {"observed_min": round(hist.min, 6),
                                                      "observed_max": round(hist.max, 6)})
    enc.stats["sqnr_db"] = _hist_sqnr(hist, enc)
    return enc


def capped_encoding(hist: Histogram, enc: Encoding, top: float, tolerance: float) -> tuple[Encoding, dict]:
    """The quantizer of a tensor bounded per channel by CLE's Min(·, b_c) (ReLU6 after equalization), when its grid
    can hold the bound itself: with a grid top T <= m = min_c b_c the quantizer saturates every channel at T <= b_c,
    so Q(Relu(x)) = Q(Min(Relu(x), b)) and the float Min can be left out of the integer model. The histogram is of
    the Min's output (the FP32 value), so the MSE of a grid with top T on it is exactly the error of that
    Min-free model. Returns (encoding, facts): ``enc`` unchanged where its top already is <= m; else the MSE-best
    grid with top <= m when its error is within (1 + tolerance) × that of ``enc`` (no Min left), else ``enc``
    (the Min stays, in float)."""
    facts = {"smallest_bound": round(float(top), 6), "grid_top": round(float(np.max(enc.hi)), 6)}
    if float(np.max(enc.hi)) <= top or enc.spec.symmetric:
        return enc, dict(facts, min_fused=float(np.max(enc.hi)) <= top, why="the grid's top is within every bound")
    loss = hist_mse_loss(hist, enc.spec)
    free = encoding_mse(loss, enc)
    lo, hi = search_range(loss, enc.spec, min(hist.min, 0.0), min(top, max(hist.max, 0.0)))
    ratio = mse_ratio(float(loss(np.array([lo]), np.array([hi]))[0]), free)
    facts.update(error_ratio=round(ratio, 4))
    if ratio > 1 + tolerance:
        return enc, dict(facts, min_fused=False,
                         why=f"a grid within the smallest bound has {ratio:.2f}× the error (> 1 + {tolerance:g})")
    new = encoding_from_range(enc.spec, lo, hi, enc.method + ", top within the smallest channel bound",
                              dict(enc.stats))
    new.stats["sqnr_db"] = _hist_sqnr(hist, new)
    return new, dict(facts, min_fused=True, grid_top=round(float(np.max(new.hi)), 6),
                     why=f"a grid within the smallest bound: {ratio:.2f}× the error")


def saturating_encoding(hist: Histogram, enc: Encoding, top: float, tolerance: float) -> Encoding:
    """For an activation of fewer bits than its storage type (7 bits in uint8) after a bounded activation [0, top]
    (ReLU6): the grid [0, top] itself, when its MSE is within (1 + tolerance) × that of ``enc``. The values then
    never leave the n-bit range, so no saturating Clip is needed before the QuantizeLinear and the runtime fuses
    the layer. Else ``enc``."""
    if enc.spec.symmetric or not np.isfinite(top) or top <= 0 or float(np.max(enc.hi)) >= top:
        return enc
    loss = hist_mse_loss(hist, enc.spec)
    free = encoding_mse(loss, enc)
    full = float(loss(np.array([0.0]), np.array([float(top)]))[0])
    if full > (1 + tolerance) * free:
        return enc
    new = encoding_from_range(enc.spec, 0.0, top, enc.method + ", top at the activation's bound", dict(enc.stats))
    new.stats["sqnr_db"] = _hist_sqnr(hist, new)
    return new


def xent_encoding(logits: np.ndarray, spec: QuantSpec, hist: Histogram | None = None) -> Encoding:
    """Range of the logits minimizing E[CE(softmax(z), softmax(ẑ))] − H(softmax(z)) = E[KL] over a sample."""
    z = np.asarray(logits, np.float64)  # [R, C]
    p = _softmax(z)
    plogp = np.sum(p * np.log(np.maximum(p, 1e-30)), axis=1)

    def loss(lo, hi):
        out = np.empty(len(lo))
        for g, (l, h) in enumerate(zip(lo, hi)):
            s, zp = _grid_of(spec, np.array([l]), np.array([h]))
            zq = fake_quant_grid(z, s[0, 0], zp[0, 0], spec.qmin, spec.qmax)
            out[g] = np.mean(plogp - np.sum(p * _log_softmax(zq), axis=1))
        return out
    lo, hi = search_range(loss, spec, float(z.min(initial=0.0)), float(z.max(initial=0.0)))
    enc = encoding_from_range(spec, lo, hi, "xent", {"observed_min": round(float(z.min()), 6),
                                                      "observed_max": round(float(z.max()), 6),
                                                      "kl": round(float(loss([lo], [hi])[0]), 6)})
    enc.stats["sqnr_db"] = _hist_sqnr(hist, enc) if hist is not None else round(
        sqnr_db(z, fake_quant_grid(z, float(enc.scale), float(enc.zero_point), spec.qmin, spec.qmax)), 2)
    return enc


def bn_encoding(beta: np.ndarray, std: np.ndarray, spec: QuantSpec, bounds=(-np.inf, np.inf),
                alpha: float = 6.0) -> Encoding:
    """Data-free range [min_c(β_c − α|γ_c|), max_c(β_c + α|γ_c|)], clipped to the activation's bounds."""
    lo = float(np.min(beta - alpha * np.abs(std)))
    hi = float(np.max(beta + alpha * np.abs(std)))
    lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return encoding_from_range(spec, min(lo, hi), hi, "bn", {"alpha": alpha})


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _log_softmax(z):
    m = z.max(axis=1, keepdims=True)
    return z - m - np.log(np.sum(np.exp(z - m), axis=1, keepdims=True))
