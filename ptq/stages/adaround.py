"""AdaRound (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization"; white paper §3.4).

Per layer, learn whether each weight rounds up or down:
    W̃ = s · clip(⌊W/s⌋ + h(V), n, p),   h(V) = clip(σ(V)(ζ − γ) + γ, 0, 1),  ζ = 1.1, γ = −0.1      (eq. 22-23)
minimizing  ‖f(W x) − f(W̃ x̃)‖² + λ Σ (1 − |2h(V) − 1|^β)                                           (eq. 25)
with λ = 0.01 and β annealed 20 → 2 after a 20 % warm start (no regularizer); then W̃ rounds up where
h(V) >= 0.5. x is the layer's input in the FP32 network, x̃ in the network whose earlier layers carry their
quantized (already AdaRounded) weights; f is the layer's fused Relu / Clip (and CLE's per-channel bound), else
the identity. V starts where h(V) equals the fractional part of W/s; Adam (lr 0.01) as in the paper.

Speed: where f is the identity the loss is a quadratic form in Gram matrices,
    ‖X̃W̃ᵀ − XWᵀ‖² = tr(W̃ G̃ W̃ᵀ) − 2 tr(W̃ C Wᵀ) + const,   G̃ = X̃ᵀX̃, C = X̃ᵀX   ([D, D], D = Cin·k·k)
accumulated while streaming the calibration set (up to GRAM_ROWS output positions), so an iteration costs
O(Cout·D²) whatever the data size; where there are fewer rows than D (a classifier: one row per image) the
data form is cheaper and used instead. With an activation, ``adaround_rows`` rows (output positions) are
sampled, shuffled once, and each Adam step takes the next contiguous mini-batch. Depthwise layers are one
batched problem over channels ([C, k·k], products as batched matrix products); with an activation they keep
half the rows and half-size batches (each channel has only k·k weights), without one a 3×3 kernel gets the exact
best of its 2⁹ roundings per channel. Adam's steps run in float32; the reported errors in float64.
Layer inputs: the layers are visited in topological order, each solved before the next is visited, so x̃ is
exactly the input of the network whose earlier layers are AdaRounded (with blocks of layers sharing a pass, the
later ones saw their block's earlier layers rounded to nearest and learned to compensate errors the final network
does not have: EfficientNet-Lite0 W4A8 per-channel, 256 images, 65.5 % top-1 with 16 passes, 79.5 % with one per
layer). ``Walk`` (ptq/walk.py) keeps both networks' activations at the last visited layer while they fit in
memory, so each node runs about once per network over the calibration set. Nothing of the whole calibration set
is held per layer beyond its Gram matrices or its row sample. ``adaround_inputs = "fp32"`` takes x̃ = x instead
(no compensation of earlier layers' errors). Each output channel keeps AdaRound's rounding only where it beats
nearest rounding on the layer's data (channels are independent in the loss).

Grid (``adaround_scale_search``, our addition, on by default): before rounding, each layer's weight scale is
chosen again, per channel (or per tensor), among clipping ranges f·max|W| (f = 0.4 … 1) and the one range
setting gave, by the output error of nearest rounding on the layer's data (``search_scale``). Weight-space MSE
ignores which weights matter; on EfficientNet-Lite0's first depthwise layer (one dominant tap per 3×3 kernel)
it costs 10 points of top-1 at W4 alone, 3.5 with the searched grid.

Targets and biases (our additions, both measured on EfficientNet-Lite0 W4A8 per-channel, 256 images, 1300
validation images): a layer whose output alone feeds a residual Add reconstructs the block's output, target
f(W x) + (skip − quantized skip) (``residual_skip``: 77.5 → 78.2 % top-1), and every Conv / Gemm re-fits its
bias after rounding to the mean output error left (``adaround_bias``; ``Problem.center`` / ``bias_shift``:
Gram layers round for the bias that follows; 78.2 → 79.5 %). Re-fitting the weight scales too (least squares
per channel) lowered every layer's error by 1-3 % yet cost 3.3 points of top-1, so the scales stay as chosen.

Output: the integers q per layer (``state.rounded``), which export stores instead of rounding to nearest; the
FP32 model keeps its weights (so the debugging flow can still bypass the weight quantizers).
"""
from __future__ import annotations

import time

import numpy as np
import onnx
from tqdm import tqdm

from ..data import require_calibration
from ..model import Graph, set_initializer, topological_sort
from ..patches import paired_rows, rows_per_sample
from ..patterns import clip_bounds
from ..quant import Encoding, fake_quant, quantize
from ..walk import Walk
from ..weights import as_matrix, from_matrix, layer_kind, reconstruction_layers
from .bias_absorption import _add_bias

ZETA, GAMMA = 1.1, -0.1
BRUTE_FORCE_WEIGHTS = 10  # depthwise kernels up to this size (3×3) get their exact best rounding
DEPTHWISE_ROW_SHARE = 2
BIAS_STEPS = 10  # Gauss-Newton steps of the bias fit on a clipped output
GRAM_ROWS = 1 << 19  # output positions (over all images) a Gram matrix accumulates: its cost is O(rows·D²) once


def _sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def rectified_sigmoid(v):
    return np.clip(_sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def init_v(frac):
    """V such that h(V) = frac (the fractional part of W/s)."""
    p = np.clip((frac - GAMMA) / (ZETA - GAMMA), 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


class Problem:
    """One layer's rounding problem. W: [O, D] (depthwise: [C, K]); scale broadcast to W.

    Data, one of: Gram form (``gram``: G̃ [D, D] or [C, K, K], C, Gff, R) for the identity, or rows
    (``rows``: X̃ [R, D] or [R, C, K], targets T = f(X Wᵀ + b) [R, O], bias b, bounds lo/hi). Rows are kept
    shuffled once (mini-batches are then contiguous slices) and depthwise ones channel-major ([C, R, K]) so that
    both products of an Adam step are batched matrix products."""

    def __init__(self, w, scale, qmin, qmax, depthwise=False):
        self.w = np.asarray(w, np.float64)
        self.s = np.broadcast_to(np.asarray(scale, np.float64), self.w.shape) if np.ndim(scale) == 0 else \
            np.asarray(scale, np.float64).reshape(-1, *([1] * (self.w.ndim - 1)))
        self.qmin, self.qmax = qmin, qmax
        self.floor = np.floor(self.w / self.s)
        self.depthwise = depthwise
        self.gram = None
        self.skip = None  # Gram form with a residual skip error E: (Eᵀ X̃, Eᵀ X, ‖E‖² per channel)
        self.means = None  # after ``center``: mean inputs (quantized, FP32) and mean skip error
        self._rows = None
        self._fast = None
        self._wc = None

    @property
    def rows(self):
        return self._rows

    @rows.setter
    def rows(self, data):
        x, t, b, lo, hi = data
        order = np.random.default_rng(len(x)).permutation(len(x))
        # bias and bounds in the rows' dtype, so a float32 step stays float32
        b, lo, hi = (np.asarray(v, x.dtype) for v in (b, lo, hi))
        if self.depthwise:  # [R, C, K] -> [C, R, K] (one copy: shuffled and transposed); per-channel columns
            x, t = np.take(x.transpose(1, 0, 2), order, axis=1), np.take(t.T, order, axis=1)
            b, lo, hi = (v.reshape(-1, 1) if v.ndim else v for v in (b, lo, hi))
        else:
            x, t = x[order], t[order]
        self._rows = (x, t, b, lo, hi)

    def damp(self):
        """Add ε‖W̃ − W‖² to the Gram-form loss, ε = tr(G̃)/R (the mean squared norm of an input row): G̃ + εI,
        C + εI, G + εI. Negligible where rows ≫ D (convolutions: many positions per image); where they are fewer
        (a classifier: one row per image, D = 1280 features on EfficientNet-Lite0) it keeps AdaRound from
        fitting the calibration images at the expense of others: there (384 images fitted, 384 held out), the
        classifier's held-out error went from 1.2× nearest rounding's (undamped) to 0.86×."""
        g, c, gff, r = self.gram
        eye = np.eye(g.shape[-1])
        eps = np.trace(g, axis1=-2, axis2=-1)[..., None, None] / r if g.ndim == 3 else np.trace(g) / r
        self.gram = (g + eps * eye, c + eps * eye, gff + eps * eye, r)
        self._wc = self._fast = None

    def center(self, sums):
        """Let the bias absorb the mean output error (our addition): with δ = W μ + ē − W̃ μ̃ added to the bias
        (μ̃, μ: mean inputs in the quantized and FP32 networks, ē: mean skip error), the loss
        Σ_r ‖W̃ x̃_r + δ − W x_r − e_r‖² is the Gram form of the centred data, G̃ − R μ̃μ̃ᵀ, C − R μ̃μᵀ,
        G − R μμᵀ (and Eᵀ X̃ − R ē μ̃ᵀ, Eᵀ X − R ē μᵀ, ‖E‖² − R ē²), so rounding is chosen for the bias that will
        follow it (``bias_shift``). ``sums``: (Σ x̃, Σ x, Σ e or None) over the R rows."""
        g, c, gff, r = self.gram
        mq, mf = sums[0] / r, sums[1] / r

        def outer(a, b):
            return a[..., :, None] * b[..., None, :]
        self.gram = (g - r * outer(mq, mq), c - r * outer(mq, mf), gff - r * outer(mf, mf), r)
        self.means = (mq, mf, None)
        if self.skip is not None:
            me = sums[2] / r
            ex, ef, ee = self.skip
            if self.depthwise:  # per channel: ē_c times its own k·k mean inputs
                self.skip = (ex - r * me[:, None] * mq, ef - r * me[:, None] * mf, ee - r * me**2)
            else:
                self.skip = (ex - r * np.outer(me, mq), ef - r * np.outer(me, mf), ee - r * me**2)
            self.means = (mq, mf, me)
        self._wc = self._fast = None

    def bias_shift(self, wt) -> np.ndarray:
        """The bias change δ [O] that minimizes the loss for the weights ``wt`` (see ``center``; rows form: a few
        Gauss-Newton steps on the clipped output, δ += Σ m(t − clip(y + δ)) / Σ m, m: rows in the linear range)."""
        if self.gram is not None:
            mq, mf, me = self.means
            d = np.sum(self.w * mf - wt * mq, axis=-1)
            return d if me is None else d + me
        x, t, b, lo, hi = self._rows
        wt = wt.astype(x.dtype)
        if self.depthwise:  # [C, R]; b, lo, hi [C, 1]
            y, axis = np.matmul(x, wt[:, :, None])[..., 0], 1
        else:  # [R, O]
            y, axis = x @ wt.T, 0
        y, t = y.astype(np.float64) + b, t.astype(np.float64)
        delta = np.zeros(y.shape[0] if self.depthwise else y.shape[1])
        shape = (-1, 1) if self.depthwise else (1, -1)
        for _ in range(BIAS_STEPS):
            z = y + delta.reshape(shape)
            m = (z > lo) & (z < hi)
            delta += np.sum(m * (t - np.clip(z, lo, hi)), axis=axis) / np.maximum(m.sum(axis), 1)
        return delta

    def shift_bias(self, delta):
        """Rows form: add ``delta`` [O] to the bias the rows' outputs are computed with."""
        x, t, b, lo, hi = self._rows
        b = b + np.asarray(delta, x.dtype).reshape(b.shape)
        self._rows = (x, t, b, lo, hi)

    def times_gram(self, wt, g):
        """W̃G̃ ([O, D]; depthwise: each channel's row times its own [K, K] matrix)."""
        return np.matmul(wt[:, None, :], g)[:, 0] if self.depthwise else wt @ g

    def w_c(self):
        """W Cᵀ (+ Eᵀ X̃ with a skip error), the cross term of the Gram form (fixed for the layer: computed once)."""
        if self._wc is None:
            c = self.gram[1]
            self._wc = np.einsum("cm,ckm->ck", self.w, c) if self.depthwise else self.w @ c.T
            if self.skip is not None:
                self._wc = self._wc + self.skip[0]
        return self._wc

    def target_energy(self) -> np.ndarray:
        """Per output channel, the squared norm of the Gram form's target X Wᵀ (+ E): the loss's constant."""
        const = np.sum(self.times_gram(self.w, self.gram[2]) * self.w, axis=-1)
        if self.skip is not None:
            const = const + 2 * np.sum(self.w * self.skip[1], axis=-1) + self.skip[2]
        return const

    def rescale(self, scale):
        """Put the problem on another grid (scale as given to the constructor)."""
        self.s = np.broadcast_to(np.asarray(scale, np.float64), self.w.shape) if np.ndim(scale) == 0 else \
            np.asarray(scale, np.float64).reshape(-1, *([1] * (self.w.ndim - 1)))
        self.floor = np.floor(self.w / self.s)

    def channel_losses(self, wt) -> np.ndarray:
        """Each output channel's squared output error, summed over the rows ([O]; channels are independent)."""
        if self.gram is not None:
            g = self.gram[0]
            return (np.sum(self.times_gram(wt, g) * wt, axis=-1) - 2 * np.sum(self.w_c() * wt, axis=-1)
                    + self.target_energy())
        x, t, b, lo, hi = self._rows
        wt = wt.astype(x.dtype)
        if self.depthwise:
            y = np.matmul(x, wt[:, :, None])[..., 0] + b  # [C, R]
            return np.sum((np.clip(y, lo, hi) - t).astype(np.float64) ** 2, axis=1)
        y = x @ wt.T + b
        return np.sum((np.clip(y, lo, hi) - t).astype(np.float64) ** 2, axis=0)

    def n_rows(self) -> int:
        return 0 if self._rows is None else self._rows[0].shape[1 if self.depthwise else 0]

    def w_tilde(self, h):
        return self.s * np.clip(self.floor + h, self.qmin, self.qmax)

    def nearest_q(self):
        """The integers of nearest rounding on the problem's grid."""
        return np.clip(np.rint(self.w / self.s), self.qmin, self.qmax)

    def nearest(self):
        return self.s * self.nearest_q()

    # --- the reconstruction loss and its gradient with respect to W̃
    def loss_grad(self, wt, batch: slice | None = None, fast: bool = False):
        """Mean squared output error and its gradient. ``fast``: the Gram form in float32 (Adam's steps; the
        reported losses use float64), ``batch``: a slice of the (shuffled) rows."""
        if self.gram is not None:
            g, r = self.gram[0], self.gram[3]
            norm = r * wt.shape[0]
            if fast:
                if self._fast is None:
                    self._fast = (g.astype(np.float32), self.w_c().astype(np.float32))
                g32, wc32 = self._fast
                return None, 2 * (self.times_gram(wt.astype(np.float32), g32) - wc32).astype(np.float64) / norm
            wg, wc = self.times_gram(wt, g), self.w_c()
            loss = np.sum(wg * wt) - 2 * np.sum(wc * wt) + np.sum(self.target_energy())
            return loss / norm, 2 * (wg - wc) / norm
        x, t, b, lo, hi = self._rows
        wt = wt.astype(x.dtype)
        if self.depthwise:  # x [C, R, K], t [C, R]
            if batch is not None:
                x, t = x[:, batch], t[:, batch]
            y = np.matmul(x, wt[:, :, None])[..., 0]
        else:
            if batch is not None:
                x, t = x[batch], t[batch]
            y = x @ wt.T
        y += b  # in place from here on: y becomes the error, then ∂loss/∂y
        linear = (y > lo) & (y < hi)
        np.clip(y, lo, hi, out=y)
        y -= t
        loss = None if fast else float(np.mean(y.astype(np.float64) ** 2))
        y *= linear
        y *= x.dtype.type(2.0 / y.size)
        grad = np.matmul(y[:, None, :], x)[:, 0] if self.depthwise else y.T @ x
        return loss, grad.astype(np.float64)


def solve(problem: Problem, iters: int = 1000, batch: int = 1024, lam: float = 0.1, warm: float = 0.2,
          beta=(20.0, 2.0), lr: float = 0.01, polish_gram: bool = True) -> np.ndarray:
    """Optimize V by Adam; return the integer weights (⌊W/s⌋ + hard rounding), clipped to the grid.

    The reconstruction loss is divided by its value at nearest rounding and the regularizer averaged over the
    weights, so λ means the same for every layer size and data scale (the paper's λ = 0.01 multiplies its
    unnormalized loss). At λ = 0.1 a third to a half of the h(V) of EfficientNet-Lite0's layers are still
    between 0.02 and 0.98 after annealing; λ = 30 makes them binary and lowers the layers' rounded errors, on
    held-out rows too (geometric mean over 14 layers, relative to nearest: 0.68 → 0.55), yet the whole network
    scored lower (W4A8 per-channel, 256 images: 75.3 % top-1 at λ = 30, 78.2 % at 0.1), so 0.1 stays the
    default (``adaround_lambda``)."""
    norm = max(problem.loss_grad(problem.nearest())[0], 1e-30)
    lam = lam / problem.w.size
    frac = problem.w / problem.s - problem.floor
    v = init_v(frac)
    m, s2 = np.zeros_like(v), np.zeros_like(v)
    b1, b2, eps = 0.9, 0.999, 1e-8
    n_rows = problem.n_rows()
    free = (problem.floor >= problem.qmin) & (problem.floor + 1 <= problem.qmax)  # both roundings on the grid
    for t in range(1, iters + 1):
        sig = _sigmoid(v)
        h_raw = sig * (ZETA - GAMMA) + GAMMA
        h = np.clip(h_raw, 0, 1)
        sel = None  # all rows, or (they are shuffled) the next contiguous batch
        if n_rows > batch:
            start = ((t - 1) * batch) % n_rows
            sel = slice(start, start + batch)
        _, g_w = problem.loss_grad(problem.w_tilde(h), sel, fast=True)
        g_w = g_w / norm
        dh_dv = sig * (1 - sig) * (ZETA - GAMMA) * ((h_raw > 0) & (h_raw < 1))
        grad = g_w * problem.s * free * dh_dv
        rel = (t - warm * iters) / max((1 - warm) * iters, 1)
        if rel > 0:
            bt = beta[0] + (beta[1] - beta[0]) * rel
            u = 2 * h - 1
            grad = grad + lam * (-bt * np.abs(u) ** (bt - 1) * np.sign(u) * 2) * dh_dv
        m = b1 * m + (1 - b1) * grad
        s2 = b2 * s2 + (1 - b2) * grad**2
        v = v - lr * (m / (1 - b1**t)) / (np.sqrt(s2 / (1 - b2**t)) + eps)
    q = np.clip(problem.floor + (rectified_sigmoid(v) >= 0.5), problem.qmin, problem.qmax)
    return polish(problem, q) if polish_gram and problem.gram is not None else q


def no_worse_than_nearest(problem: Problem, q: np.ndarray):
    """Per output channel, the better of ``q`` and nearest rounding on the problem's data (a channel's error depends
    on its own weights only). Returns (integers, mask of the channels left at nearest)."""
    q_near = problem.nearest_q()
    worse = problem.channel_losses(problem.s * q) > problem.channel_losses(problem.s * q_near)
    return np.where(worse[:, None], q_near, q), worse


def search_scale(problem: Problem, per_channel: bool, fractions=np.linspace(0.4, 1.0, 13)) -> np.ndarray:
    """The weight grid chosen by the layer's output error (our addition): among clipping ranges f·max|W| (per
    channel, or per tensor) and the current one, the one whose nearest rounding gives the least squared output
    error ‖f(W x) − f(W̃ x̃)‖² on the layer's data. Weight-space MSE ranges ignore which weights matter: in a 3×3
    depthwise kernel with one dominant tap, it can clip the small taps' grid away; here the data decides.
    Returns the float32 scale ([O] per channel, [] per tensor); AdaRound then rounds on that grid."""
    w, qmax = problem.w, problem.qmax
    current = problem.s[:, :1].ravel() if per_channel else problem.s.ravel()[:1]
    absmax = np.abs(w).max(axis=tuple(range(1, w.ndim))) if per_channel else np.abs(w).max().reshape(1)
    cands = [current] + [np.maximum(f * absmax / qmax, 1e-12) for f in fractions]
    cands = [np.asarray(c, np.float32).astype(np.float64) for c in cands]
    losses = []
    for c in cands:
        sc = c.reshape(-1, *([1] * (w.ndim - 1))) if per_channel else c[0]
        wt = sc * np.clip(np.rint(w / sc), problem.qmin, problem.qmax)
        cl = problem.channel_losses(wt)
        losses.append(cl if per_channel else cl.sum(keepdims=True))
    best = np.argmin(np.stack(losses), axis=0)  # ties keep the current grid (index 0)
    chosen = np.stack(cands)[best, np.arange(len(best))]
    return chosen.astype(np.float32) if per_channel else np.float32(chosen[0])


def brute_force(problem: Problem) -> np.ndarray:
    """The exact best rounding of a depthwise Gram-form problem with few weights per channel (3×3: 2⁹ roundings
    of each channel, all channels at once): min over q of tr(W̃G̃W̃ᵀ) − 2 tr(W̃CWᵀ), W̃ = s·clip(⌊W/s⌋ + b)."""
    g = problem.gram[0]
    k = problem.w.shape[1]
    combos = ((np.arange(1 << k)[:, None] >> np.arange(k)[None]) & 1).astype(np.float64)  # [M, K]
    q = np.clip(problem.floor[:, None, :] + combos[None], problem.qmin, problem.qmax)  # [C, M, K]
    wt = problem.s[:, None] * q
    loss = np.sum(np.matmul(wt, g) * wt, axis=2) - 2 * np.sum(wt * problem.w_c()[:, None, :], axis=2)  # [C, M]
    return q[np.arange(q.shape[0]), np.argmin(loss, axis=1)]


def polish(problem: Problem, q: np.ndarray, max_rounds: int = 50) -> np.ndarray:
    """Greedy 1-flip local search on the Gram form (our addition to AdaRound): move any weight to its other
    rounding (⌊W/s⌋ or ⌊W/s⌋ + 1) when that lowers the loss; the change of flipping w_oj by δ is
    2δ·(W̃G̃ − WCᵀ)_oj + δ²·G̃_jj. A few rounds, each flipping the best candidate of every output channel."""
    g = problem.gram[0]
    q = q.copy()
    rows = np.arange(q.shape[0])
    diag = np.diagonal(g, axis1=1, axis2=2) if problem.depthwise else np.diag(g)[None]  # depthwise: [K, K] each
    for _ in range(max_rounds):
        grad = problem.times_gram(problem.s * q, g) - problem.w_c()  # half the gradient
        other = np.where(q > problem.floor, problem.floor, problem.floor + 1)
        valid = (other >= problem.qmin) & (other <= problem.qmax)
        delta = problem.s * (other - q)
        gain = 2 * delta * grad + delta**2 * diag
        gain = np.where(valid, gain, np.inf)
        j = np.argmin(gain, axis=1)
        better = gain[rows, j] < -1e-12
        if not better.any():
            break
        q[rows[better], j[better]] = other[rows[better], j[better]]
    return q


# ---------------------------------------------------------------- the stage

def _activation(gr: Graph, layer):
    if not layer.act_node:
        return None
    lo, hi = clip_bounds(gr, gr.nodes[layer.act_node])
    if layer.bound:
        hi = np.minimum(hi, gr.const(layer.bound).ravel())
    return lo, hi


def adaround(state, ctx):
    """The AdaRound stage: every layer with a weight encoding, in topological order (see module docstring)."""
    cfg = state.config
    require_calibration(ctx, "AdaRound")
    gr = Graph(state.model)
    layers = reconstruction_layers(state, gr)
    if cfg.adaround_bias:  # every Conv / Gemm gets a bias to re-fit (MatMul has none)
        for l in layers:
            if not l.bias and l.op != "MatMul":
                set_initializer(state.model, _add_bias(state, gr, l), np.zeros(gr.const(l.weight).shape[l.w_axis],
                                                                               np.float32))
        gr = Graph(state.model)
    fp32 = onnx.ModelProto.FromString(state.model.SerializeToString())
    topological_sort(fp32)
    position = {n.name: k for k, n in enumerate(fp32.graph.node)}
    done: dict[str, np.ndarray] = {}  # layer -> AdaRounded weight (grid values)
    report, collect_s = {}, 0.0
    fp_walk = Walk(ctx.calib, cfg.batch_size)
    q_walk, sim = None, None  # x̃ = x (adaround_inputs "fp32")
    if cfg.adaround_inputs == "quantized":  # earlier layers AdaRounded as they are solved, later ones nearest
        q_walk, sim = Walk(ctx.calib, cfg.batch_size), onnx.ModelProto.FromString(fp32.SerializeToString())
        for l in layers:
            set_initializer(sim, l.weight, fake_quant(gr.const(l.weight), state.weights[l.name]))
    bar = tqdm(total=len(layers), desc="adaround", unit="layer", disable=not ctx.progress, leave=False)
    for l in layers:
        t0 = time.perf_counter()
        at = position[l.name]
        skip = residual_skip(gr, l, position) if q_walk else None
        names = [l.x] + ([skip] if skip else [])
        problems = _collect(state, gr, [l], fp_walk.batches(fp32, at, names),
                            q_walk.batches(sim, at, names) if q_walk else None, len(ctx.calib),
                            {l.name: skip} if skip else None)
        collect_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        p, kind = problems.pop(l.name)  # freed once solved
        loss_near = p.loss_grad(p.nearest())[0]  # on the grid weight range setting chose
        enc = state.weights[l.name]
        scale0 = enc.scale
        if cfg.adaround_scale_search and not cfg.easyquant:  # else: round on the grids EasyQuant chose
            scale = search_scale(p, enc.spec.axis is not None)
            p.rescale(scale)
            state.weights[l.name] = enc = Encoding(enc.spec, scale, enc.zero_point, enc.method,
                                                   {**enc.stats, "output_searched": True})
        if p.depthwise and p.gram is not None and p.w.shape[1] <= BRUTE_FORCE_WEIGHTS:
            q = brute_force(p)
        else:
            q = solve(p, cfg.adaround_iters, _row_budget(cfg.adaround_batch, kind), cfg.adaround_lambda,
                      polish_gram=cfg.adaround_polish)
        q, kept_nearest = no_worse_than_nearest(p, q)
        wt = p.s * q
        shift = 0.0
        if cfg.adaround_bias and l.bias:
            delta = p.bias_shift(wt)
            shift = float(np.max(np.abs(delta)))
            bias = (gr.const(l.bias).astype(np.float64) + delta).astype(np.float32)
            for m in (state.model, sim) if sim is not None else (state.model,):
                set_initializer(m, l.bias, bias)
            if p.gram is None:
                p.shift_bias(delta)
        loss_ada = p.loss_grad(wt)[0]
        w = gr.const(l.weight)
        done[l.name] = from_matrix(wt, w, l, kind).astype(np.float32)
        if sim is not None:
            set_initializer(sim, l.weight, done[l.name])
        report[l.name] = {"loss_nearest": float(f"{loss_near:.6g}"), "loss_adaround": float(f"{loss_ada:.6g}"),
                          "scale_vs_range_setting": round(float(np.mean(np.asarray(enc.scale) / np.maximum(
                              np.asarray(scale0), 1e-30))), 3),
                          "changed_from_nearest": round(float(np.mean(q != p.nearest_q())), 4),
                          "channels_nearest": int(kept_nearest.sum()), "bias_shift_max": round(shift, 6),
                          "seconds": round(time.perf_counter() - t0, 2), "skip_error": bool(skip),
                          "data": "gram" if p.gram is not None else f"{p.n_rows()} rows"}
        bar.update(1)
    bar.close()
    for l in layers:  # the integers, on the weight encoding's grid; the FP32 weights stay as they are
        state.rounded[l.name] = quantize(done[l.name], state.weights[l.name])
    state.report["adaround"] = {"layers": report, "collect_seconds": round(collect_s, 1),
                                "solve_seconds": round(sum(r["seconds"] for r in report.values()), 1),
                                "checkpoint_segments": fp_walk.runs + (q_walk.runs if q_walk else 0)}
    return state


def _row_budget(rows: int, kind: str) -> int:
    """Rows kept (or per Adam step) for a layer: a depthwise row holds every channel's k·k inputs at once, and
    each channel has only k·k weights to fit, so half the rows serve it (and bound its memory)."""
    return max(64, rows // DEPTHWISE_ROW_SHARE) if kind == "depthwise" else rows


def _accumulate(p: Problem, add) -> None:
    add = tuple(np.asarray(v, np.float64) for v in add[:3]) + add[3:]
    p.gram = add if p.gram is None else tuple(u + v for u, v in zip(p.gram, add))


def _sum_rows(sums: dict, name: str, xq, xf, e) -> None:
    add = [np.sum(v, axis=0, dtype=np.float64) if v is not None else None for v in (xq, xf, e)]
    old = sums.get(name)
    sums[name] = add if old is None else [u + v if v is not None else None for u, v in zip(old, add)]


def _accumulate_skip(p: Problem, add) -> None:
    add = tuple(np.asarray(v, np.float64) for v in add)
    p.skip = add if p.skip is None else tuple(u + v for u, v in zip(p.skip, add))


def _output(x, w, b, kind):
    """The layer's pre-activation output from rows of its input ([R, D] or depthwise [R, C, K]) -> [R, O]."""
    y = np.einsum("rck,ck->rc", x, w) if kind == "depthwise" else x @ w.T
    return (y + b).astype(np.float32)


def residual_skip(gr: Graph, layer, position: dict) -> str | None:
    """The other input of the residual Add that the layer's output alone feeds, when it is computed before the
    layer (so both networks' batches at the layer hold it), else None. The quantized network's skip carries the
    earlier layers' errors; the layer's target becomes FP32 output + (skip − quantized skip), so that the sum,
    the block's output, is what is reconstructed (the residual stream's error is otherwise nobody's to fix)."""
    add = gr.only_consumer(layer.out)
    if add is None or add.op_type != "Add" or layer.bound:
        return None
    other = [i for i in add.input if i != layer.out]
    if len(other) != 1 or gr.is_const(other[0]) or other[0] not in gr.producer:
        return None
    src = gr.producer[other[0]].name
    return other[0] if position.get(src, len(position)) < position[layer.name] else None


def _collect(state, gr, group, fp_batches, q_batches, n_samples: int, skips: dict | None = None) -> dict:
    """Pair the layers' inputs in the FP32 and the quantized-so-far networks (per batch, from ``Walk``); build
    each layer's problem. ``skips`` {layer: tensor}: see ``residual_skip``."""
    cfg = state.config
    probs = {}
    for l in group:
        kind = layer_kind(gr, l)
        enc = state.weights[l.name]
        w = as_matrix(gr.const(l.weight), l, kind)
        scale = np.asarray(enc.scale)
        p = Problem(w, scale if scale.ndim == 0 else scale.reshape(-1), enc.spec.qmin, enc.spec.qmax,
                    kind == "depthwise")
        act = _activation(gr, l)
        b = gr.const(l.bias).astype(np.float64) if l.bias else np.zeros(w.shape[0])
        probs[l.name] = (p, kind, act, b, [], [])
    # Gram layers take up to GRAM_ROWS output positions, row-sampled layers spread adaround_rows over the images
    budget = {l.name: _row_budget(cfg.adaround_rows, probs[l.name][1]) for l in group}

    sums: dict = {}  # Gram layers: (Σ x̃, Σ x, Σ e) over their rows

    def per_sample(layer):
        return rows_per_sample(GRAM_ROWS if probs[layer.name][2] is None else budget[layer.name], n_samples)
    for _, l, xf, xq, e in paired_rows(gr, group, fp_batches, q_batches, {l.name: l.x for l in group}, per_sample,
                                       cfg.seed, skips):
        p, kind, act, b, rows_x, rows_t = probs[l.name]
        xf, xq = xf.astype(np.float32), xq.astype(np.float32)
        kept = sum(len(r) for r in rows_x)
        if act is None and kind == "depthwise":  # [R, C, K] -> [C, R, K]: one small Gram matrix per channel
            a, c = xq.transpose(1, 0, 2), xf.transpose(1, 0, 2)
            at = a.transpose(0, 2, 1)
            _accumulate(p, (np.matmul(at, a), np.matmul(at, c), np.matmul(c.transpose(0, 2, 1), c), xq.shape[0]))
            _sum_rows(sums, l.name, xq, xf, e)
            if e is not None:  # per channel: Eᵀ X̃, Eᵀ X over its own k·k inputs
                _accumulate_skip(p, (np.einsum("rc,rck->ck", e, xq), np.einsum("rc,rck->ck", e, xf),
                                     np.sum(e.astype(np.float64) ** 2, axis=0)))
        elif act is None:
            _accumulate(p, (xq.T @ xq, xq.T @ xf, xf.T @ xf, xq.shape[0]))
            _sum_rows(sums, l.name, xq, xf, e)
            if e is not None:
                _accumulate_skip(p, (e.T @ xq, e.T @ xf, np.sum(e.astype(np.float64) ** 2, axis=0)))
        elif kept < budget[l.name]:
            rows_x.append(xq)
            t = np.clip(_output(xf, p.w, b, kind), *act)
            rows_t.append(t if e is None else t + e)
    for l in group:
        p, kind, act, b, rows_x, rows_t = probs[l.name]
        if act is None:
            if cfg.adaround_bias and l.bias:
                p.center(sums[l.name])
            p.damp()
        else:
            x, t = np.concatenate(rows_x)[: budget[l.name]], np.concatenate(rows_t)[: budget[l.name]]
            rows_x.clear(), rows_t.clear()  # the batches' copies go before the problem makes its own
            p.rows = (x, t, b, act[0], act[1])
            del x, t
        probs[l.name] = (p, kind)
    return probs
