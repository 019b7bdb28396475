"""The per-layer rounding problem of AdaRound (Nagel et al. 2020, eq. 22-25; white paper §3.4), in numpy.

    W̃ = s · clip(⌊W/s⌋ + h(V), n, p),   h(V) = clip(σ(V)(ζ − γ) + γ, 0, 1),  ζ = 1.1, γ = −0.1      (eq. 22-23)
    minimize  ‖f(W x) − f(W̃ x̃)‖² + λ Σ (1 − |2h(V) − 1|^β)                                         (eq. 25)

``Problem`` holds one layer's data in one of two forms. Where f is the identity, the loss is a quadratic form in
Gram matrices, ‖X̃W̃ᵀ − XWᵀ‖² = tr(W̃ G̃ W̃ᵀ) − 2 tr(W̃ C Wᵀ) + const, G̃ = X̃ᵀX̃, C = X̃ᵀX ([D, D],
D = Cin·k·k), so an iteration costs O(Cout·D²) whatever the data size; with a residual skip error E and a
bias re-fit the form gains the terms of ``Problem.center``. With an activation, sampled rows (output positions)
are kept, shuffled once, and each Adam step takes the next contiguous mini-batch. Depthwise layers are one batched
problem over channels ([C, k·k]). ``solve`` runs Adam on V (float32 steps; reported errors in float64),
``polish`` a greedy 1-flip search on the Gram form, ``brute_force`` the exact best rounding of small depthwise
kernels, ``search_scale`` the grid chosen by output error, ``no_worse_than_nearest`` the per-channel fallback.
The stage that builds these problems from the network is ptq/stages/adaround.py.
"""
from __future__ import annotations

import numpy as np

from .quant import QuantSpec, encoding_from_range

ZETA, GAMMA = 1.1, -0.1
BIAS_STEPS = 10  # Gauss-Newton steps of the bias fit on a clipped output
BIAS_COLUMNS = 128  # output channels whose float64 bias steps run at once (rows form)
SHUFFLE_BLOCK = 32  # depthwise channels copied at a time by the rows' shuffle (``Problem.rows``)


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

    def __init__(self, w, scale, qmin, qmax, depthwise=False, zero_point=0):
        self.w = np.asarray(w, np.float64)
        self.grid = (qmin, qmax)  # the integers' range; qmin / qmax below are relative to the zero point
        self.rescale(scale, zero_point)  # sets s, zp, floor, qmin and qmax
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
        self.set_rows(x.transpose(1, 0, 2) if self.depthwise else x, t, b, lo, hi)

    def set_rows(self, x, t, b, lo, hi, owned: bool = False):
        """The rows form's data: X̃ ([R, D]; depthwise channel-major [C, R, K]), targets T [R, O], bias, bounds.
        The rows are shuffled once by a permutation that depends on R alone; ``owned``: a depthwise ``x`` is the
        caller's own buffer, shuffled in place a block of channels at a time instead of copied (half the peak)."""
        n = x.shape[1] if self.depthwise else len(x)
        order = np.random.default_rng(n).permutation(n)
        # bias and bounds in the rows' dtype, so a float32 step stays float32
        b, lo, hi = (np.asarray(v, x.dtype) for v in (b, lo, hi))
        if self.depthwise:  # per-channel columns
            xs = x if owned else np.empty(x.shape, x.dtype)
            # a block of channels at a time: 9× faster than one strided gather on [8192, 1152, 25]
            for c in range(0, x.shape[0], SHUFFLE_BLOCK):
                xs[c:c + SHUFFLE_BLOCK] = x[c:c + SHUFFLE_BLOCK][:, order]
            x, t = xs, np.ascontiguousarray(t[order].T)
            b, lo, hi = (v.reshape(-1, 1) if v.ndim else v for v in (b, lo, hi))
        else:
            x, t = x[order], t[order]
        self._rows = (x, t, b, lo, hi)

    def damp(self):
        """Add ε‖W̃ − W‖² to the Gram-form loss, ε = tr(G̃)/R (the mean squared norm of an input row): G̃ + εI,
        C + εI, G + εI. Negligible where rows ≫ D (convolutions: many positions per image); where they are fewer
        (a classifier: one row per image) it keeps AdaRound from fitting the calibration images at the expense
        of others (docs/FINDINGS.md)."""
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
            return _gauss_newton_bias(np.matmul(x, wt[:, :, None])[..., 0], t, b, lo, hi, axis=1)
        y = x @ wt.T  # [R, O]: the columns are independent, so the float64 steps go a block of them at a time
        out = np.empty(y.shape[1])
        for j in range(0, y.shape[1], BIAS_COLUMNS):
            c = slice(j, j + BIAS_COLUMNS)
            out[c] = _gauss_newton_bias(y[:, c], t[:, c], *(v[c] if np.ndim(v) else v for v in (b, lo, hi)), axis=0)
        return out

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

    def rescale(self, scale, zero_point=0):
        """Put the problem on another grid (scale and zero point as given to the constructor). An asymmetric
        grid's integers are q − z ∈ [q_min − z, q_max − z]: ``qmin`` / ``qmax`` hold those bounds (per channel)."""
        def per_row(a, dtype):
            return np.asarray(a, dtype) if np.ndim(a) == 0 else \
                np.asarray(a, dtype).reshape(-1, *([1] * (self.w.ndim - 1)))
        s = per_row(scale, np.float64)
        self.s = np.broadcast_to(s, self.w.shape) if s.ndim == 0 else s
        self.zp = per_row(zero_point, np.float64)
        self.qmin, self.qmax = self.grid[0] - self.zp, self.grid[1] - self.zp
        self.floor = np.floor(self.w / self.s)

    def channel_losses(self, wt) -> np.ndarray:
        """Each output channel's squared output error, summed over the rows ([O]; channels are independent)."""
        if self.gram is not None:
            g = self.gram[0]
            return (np.sum(self.times_gram(wt, g) * wt, axis=-1) - 2 * np.sum(self.w_c() * wt, axis=-1)
                    + self.target_energy())
        x, t, b, lo, hi = self._rows
        wt = wt.astype(x.dtype)
        y = np.matmul(x, wt[:, :, None])[..., 0] if self.depthwise else x @ wt.T  # [C, R] or [R, O]
        y += b
        np.clip(y, lo, hi, out=y)
        y -= t
        err = y.astype(np.float64)
        err *= err
        return np.sum(err, axis=1 if self.depthwise else 0)

    def n_rows(self) -> int:
        return 0 if self._rows is None else self._rows[0].shape[1 if self.depthwise else 0]

    def w_tilde(self, h):
        return soft_rounded(self.s, self.floor, h, self.qmin, self.qmax)

    def nearest_q(self):
        """The integers of nearest rounding on the problem's grid."""
        return np.clip(np.rint(self.w / self.s), self.qmin, self.qmax)

    def nearest(self):
        return self.s * self.nearest_q()

    # --- the reconstruction loss and its gradient with respect to W̃
    def loss_grad(self, wt, batch: slice | None = None, fast: bool = False):
        """Mean squared output error and its gradient. ``fast``: in float32, without the loss (Adam's steps; the
        reported losses use float64), ``batch``: a slice of the (shuffled) rows."""
        if self.gram is not None:
            g, r = self.gram[0], self.gram[3]
            norm = r * wt.shape[0]
            if fast:
                if self._fast is None:
                    self._fast = (g.astype(np.float32), self.w_c().astype(np.float32))
                g32, wc32 = self._fast
                grad = self.times_gram(wt.astype(np.float32), g32)
                grad -= wc32
                grad *= np.float32(2 / norm)
                return None, grad
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
        return loss, grad if fast else grad.astype(np.float64)


def _gauss_newton_bias(y, t, b, lo, hi, axis: int) -> np.ndarray:
    """BIAS_STEPS of δ += Σ m(t − clip(y + b + δ)) / Σ m along ``axis`` (m: in the linear range), in float64."""
    y, t = y.astype(np.float64) + b, t.astype(np.float64)
    delta = np.zeros(y.shape[1 - axis])
    shape = (-1, 1) if axis == 1 else (1, -1)
    for _ in range(BIAS_STEPS):
        z = y + delta.reshape(shape)
        m = (z > lo) & (z < hi)
        np.clip(z, lo, hi, out=z)
        np.subtract(t, z, out=z)
        z *= m
        delta += np.sum(z, axis=axis) / np.maximum(m.sum(axis), 1)
    return delta


def soft_rounded(s, floor, h, qmin, qmax):
    """W̃ = s · clip(⌊W/s⌋ + h, n, p) (eq. 22), in the float type of its arguments (Adam's steps: float32)."""
    return s * np.clip(floor + h, qmin, qmax)


def solve(problem: Problem, iters: int = 500, batch: int = 1024, lam: float = 0.1, warm: float = 0.2,
          beta=(20.0, 2.0), lr: float = 0.01, polish_gram: bool = True) -> np.ndarray:
    """Optimize V by Adam; return the integer weights (⌊W/s⌋ + hard rounding), clipped to the grid.

    The reconstruction loss is divided by its value at nearest rounding and the regularizer averaged over the
    weights, so λ means the same for every layer size and data scale (the paper's λ = 0.01 multiplies its
    unnormalized loss). The defaults (λ = 0.1, 500 iterations) and what other values measured are in
    docs/FINDINGS.md. Adam's steps run in float32 (V, its moments, the gradient; the losses that judge the
    result are float64)."""
    f32 = np.float32
    norm = max(problem.loss_grad(problem.nearest())[0], 1e-30)
    lam = f32(lam / problem.w.size)
    frac = problem.w / problem.s - problem.floor
    v = init_v(frac).astype(f32)
    m, s2 = np.zeros_like(v), np.zeros_like(v)
    b1, b2, eps, lr = f32(0.9), f32(0.999), f32(1e-8), f32(lr)
    n_rows = problem.n_rows()
    free = (problem.floor >= problem.qmin) & (problem.floor + 1 <= problem.qmax)  # both roundings on the grid
    scale, floor = problem.s.astype(f32), problem.floor.astype(f32)
    qmin, qmax = np.asarray(problem.qmin, f32), np.asarray(problem.qmax, f32)
    zg, gamma = f32(ZETA - GAMMA), f32(GAMMA)
    for t in range(1, iters + 1):
        sig = _sigmoid(v)
        h_raw = sig * zg + gamma
        h = np.clip(h_raw, 0, 1)
        sel = None  # all rows, or (they are shuffled) the next contiguous batch
        if n_rows > batch:
            start = ((t - 1) * batch) % n_rows
            sel = slice(start, start + batch)
        _, g_w = problem.loss_grad(soft_rounded(scale, floor, h, qmin, qmax), sel, fast=True)
        g_w = (g_w / f32(norm)).astype(f32)
        dh_dv = sig * (1 - sig) * zg * ((h_raw > 0) & (h_raw < 1))
        grad = g_w * scale * free * dh_dv
        rel = (t - warm * iters) / max((1 - warm) * iters, 1)
        if rel > 0:
            bt = f32(beta[0] + (beta[1] - beta[0]) * rel)
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


def search_scale(problem: Problem, spec: QuantSpec,
                 fractions=np.linspace(0.4, 1.0, 13)) -> tuple[np.ndarray, np.ndarray]:
    """The weight grid chosen by the layer's output error (our addition): among clipping ranges f·max|W| (per
    channel, or per tensor; asymmetric grids: ``encoding_from_range`` of f·[min W, max W]) and the current one,
    the one whose nearest rounding gives the least squared output error ‖f(W x) − f(W̃ x̃)‖² on the layer's data.
    Weight-space MSE ranges ignore which weights matter: in a 3×3 depthwise kernel with one dominant tap, it can
    clip the small taps' grid away; here the data decides. ``spec`` is the weight quantizer's (its grid is the
    problem's; per channel where it has an axis). Returns (float32 scale, int32 zero point), each [O] per
    channel, [] per tensor; AdaRound then rounds on that grid."""
    w, (qmin, qmax) = problem.w, problem.grid
    per_channel = spec.axis is not None
    axes = tuple(range(1, w.ndim)) if per_channel else None

    def ext(a):  # [C]: one entry per channel, or one for the tensor
        return np.asarray(a, np.float64).reshape(-1)[: w.shape[0] if per_channel else 1]

    def current(a):  # the current grid's value of each output row
        return ext(np.broadcast_to(a, w.shape).reshape(w.shape[0], -1)[:, 0])
    cands = [(current(problem.s), current(problem.zp))]
    if spec.symmetric:
        absmax = ext(np.abs(w).max(axis=axes))
        cands += [(np.maximum(f * absmax / qmax, 1e-12), np.zeros_like(absmax)) for f in fractions]
    else:
        lo, hi = ext(w.min(axis=axes)), ext(w.max(axis=axes))
        cands += [(e.scale, e.zero_point) for e in (encoding_from_range(spec, f * lo, f * hi) for f in fractions)]
    cands = [(np.asarray(c, np.float32).astype(np.float64), z) for c, z in cands]
    losses = []
    for c, z in cands:
        sc, zc = (c.reshape(-1, *([1] * (w.ndim - 1))), z.reshape(-1, *([1] * (w.ndim - 1)))) if per_channel \
            else (c[0], z[0])
        wt = sc * (np.clip(np.rint(w / sc) + zc, qmin, qmax) - zc)
        cl = problem.channel_losses(wt)
        losses.append(cl if per_channel else cl.sum(keepdims=True))
    best = np.argmin(np.stack(losses), axis=0)  # ties keep the current grid (index 0)
    idx = np.arange(len(best))
    scale = np.stack([c for c, _ in cands])[best, idx].astype(np.float32)
    zp = np.stack([z for _, z in cands])[best, idx].astype(np.int32)
    return (scale, zp) if per_channel else (np.float32(scale[0]), np.int32(zp[0]))


def brute_force(problem: Problem) -> np.ndarray:
    """The exact best rounding of a depthwise Gram-form problem with few weights per channel (3×3: 2⁹ roundings
    of each channel, all channels at once): min over q of tr(W̃G̃W̃ᵀ) − 2 tr(W̃CWᵀ), W̃ = s·clip(⌊W/s⌋ + b)."""
    g = problem.gram[0]
    k = problem.w.shape[1]
    combos = ((np.arange(1 << k)[:, None] >> np.arange(k)[None]) & 1).astype(np.float64)  # [M, K]
    lo, hi = (np.expand_dims(b, 1) if np.ndim(b) else b for b in (problem.qmin, problem.qmax))  # per channel
    q = np.clip(problem.floor[:, None, :] + combos[None], lo, hi)  # [C, M, K]
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
