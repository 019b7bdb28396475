"""EasyQuant (Wu et al. 2020, "EasyQuant: Post-training Quantization via Scale Optimization", arXiv 2006.16669).

For each quantized layer l, in topological order, alternately search the scale of its input activation Sᵃ and
of its weights Sʷ to maximize the cosine similarity of its quantized and FP32 outputs (paper eq. 4-6):

    max_{Sᵃ, Sʷ}  cos(O, Ô),   O = A ∗ W (FP32 network),   Ô = Q(Ã, Sᵃ) ∗ Q(W, Sʷ)   (+ the layer's bias)

where Ã is the layer's input in the network quantized so far (the paper writes Ô = Q(A,Sᵃ) ∗ Q(W,Sʷ) / (Sᵃ·Sʷ) on
the integer side; the cosine is the same). Each search scores a grid of candidates α·S₀, α ∈ [0.5, 2] in
``easyquant_steps`` (100) steps around the initial scale S₀ (from the range-setting stage), all at once on a row
sample of the layer's im2col'd input. Order per round: Sᵃ with Sʷ fixed, then Sʷ with Sᵃ fixed; rounds repeat
until the cosine stops improving (at most ``easyquant_rounds``).

Choices where the paper is silent:
- per-channel weights: each output channel's scale maximizes the cosine of that channel's output (the channels
  are independent given Sᵃ); per-tensor weights and Sᵃ maximize the cosine of the whole output;
- an asymmetric activation keeps its zero point, so a candidate scales its whole range [lo, hi] by α; a quantizer
  right after a fused Relu / Clip never grows past the activation's upper bound (the int8 runtime keeps dropping
  the activation); an activation quantizer read by several layers is searched with the first of them and then
  fixed; a layer whose input shares another tensor's quantizer (e.g. after MaxPool) searches only Sʷ;
- Ã comes in ``easyquant_passes`` passes over the calibration set, each serving a block of consecutive layers:
  the network is quantized with every scale chosen so far (earlier blocks) and the initial scales elsewhere;
- a candidate is scored without forming its outputs where that is cheaper (``search_weight_scales``,
  ``search_act_scale``: the rows' second moments);
- depthwise layers use a quarter of the rows (each row holds every channel; their search is not a BLAS product);
- grouped convolutions other than depthwise are left as they are.
With AdaRound: EasyQuant chooses the scales, then AdaRound learns the rounding on those grids.
"""
from __future__ import annotations

import time

import numpy as np
from tqdm import tqdm

from ..data import require_calibration
from ..model import Graph
from ..patches import paired_rows, rows_per_sample
from ..quant import Encoding, fake_quant_grid, sqnr_db
from ..walk import streamed_pair
from ..weights import as_matrix, layer_kind, reconstruction_layers
from ..patterns import activation_bounds

BUDGET = 1 << 22  # floats per candidate chunk (16 MB of float32: a fresh 256 MB array costs ~10× its
# arithmetic in page faults; a small one is reused from the allocator, warm in cache)


def candidates(steps: int, lo: float, hi: float) -> np.ndarray:
    """The multipliers α of the initial scale; always including 1 (the initial scale itself)."""
    return np.unique(np.concatenate([np.linspace(lo, hi, steps), [1.0]]))


def cosine(dot, yy, tt):
    return dot / np.sqrt(np.maximum(yy * tt, 1e-30))


def _outputs(x, w, b, depthwise):
    """[A, R, O] outputs of weights w [A, O, D] (depthwise [A, C, K]) on rows x [R, D] ([R, C, K])."""
    if depthwise:  # per channel c: [R, K] @ [K, A], batched over channels
        return np.matmul(x.transpose(1, 0, 2), w.transpose(1, 2, 0)).transpose(2, 1, 0) + b
    return np.matmul(x[None], np.swapaxes(w, 1, 2)) + b


def search_weight_scales(x, t, w, b, s0, qmin, qmax, alphas, depthwise=False):
    """Best per-channel (s0 of shape [O]) or per-tensor (scalar s0) weight scale on inputs x with targets t.

    Each candidate's output y = x q + b is scored without being formed where that is cheaper (``_by_moments``):
    per output channel o, with q its quantized weights,
        Σ_r y t = q·v_o + b_o T_o,      Σ_r y² = qᵀ G q + 2 b_o q·m + R b_o²,
    from the rows' moments G = xᵀx, v = xᵀt, m = Σ_r x, T = Σ_r t (per channel for a depthwise layer), taken
    once in float64; else the outputs of each candidate are computed. Returns (scale, cosine of the whole output
    at that scale)."""
    per_channel = np.ndim(s0) > 0
    s0 = np.asarray(s0, np.float32)
    o = w.shape[0]
    moments = _moments(x, t) if _by_moments(x, w, len(alphas), depthwise) else None
    per = 5 * w.size if moments is not None else w.size + x.shape[0] * o  # float32s a candidate holds at once
    chunk = max(1, BUDGET // max(per, 1))
    dots, yys = [], []
    for k in range(0, len(alphas), chunk):
        a = alphas[k:k + chunk].astype(np.float32)
        s = (a[:, None] * s0[None, :] if per_channel else a[:, None] * np.full((1, o), s0))  # [A, O]
        sb = s.reshape(s.shape + (1,) * (w.ndim - 1))
        q = fake_quant_grid(w[None], sb, 0, qmin, qmax)  # [A, O, D] (depthwise [A, C, K])
        if moments is not None:
            dot, yy = _scores_by_moments(q, b, *moments)
        else:
            y = _outputs(x, q, b, depthwise)  # [A, R, O]
            dot, yy = np.einsum("aro,ro->ao", y, t), np.einsum("aro,aro->ao", y, y)
        dots.append(dot)
        yys.append(yy)
    dot, yy = np.concatenate(dots), np.concatenate(yys)  # [A, O]
    tt = np.einsum("ro,ro->o", t, t)
    if per_channel:
        best = np.argmax(cosine(dot, yy, tt[None]), axis=0)  # [O]
        pick = np.arange(o)
        scale = (alphas[best] * s0).astype(np.float32)
        return scale, float(cosine(dot[best, pick].sum(), yy[best, pick].sum(), tt.sum()))
    c = cosine(dot.sum(1), yy.sum(1), tt.sum())
    best = int(np.argmax(c))
    return np.asarray(alphas[best] * s0, np.float32), float(c[best])


def _by_moments(x, w, n_alphas: int, depthwise: bool) -> bool:
    """Whether scoring by the rows' moments takes fewer flops than forming each candidate's outputs: per
    candidate O·D² (in float64, counted twice) against R·D·O, plus R·D² once (depthwise: per channel, D = K)."""
    r, o, d = x.shape[0], w.shape[0], x.shape[-1]
    once = r * d * d * (o if depthwise else 1)  # G: one [D, D] matrix, or one [K, K] per channel
    return 2 * n_alphas * o * d * d + once < n_alphas * r * o * d


def _moments(x, t):
    """(G, v, m, T, R) of rows x [R, D] (depthwise [R, C, K]) and targets t [R, O] in float64: G = xᵀx [D, D]
    (depthwise [C, K, K]), v = xᵀt [D, O] ([C, K]), m = Σ_r x, T = Σ_r t."""
    x64, t64 = x.astype(np.float64), t.astype(np.float64)
    if x.ndim == 3:
        return (np.einsum("rck,rcl->ckl", x64, x64), np.einsum("rck,rc->ck", x64, t64), x64.sum(0), t64.sum(0),
                x.shape[0])
    return x64.T @ x64, x64.T @ t64, x64.sum(0), t64.sum(0), x.shape[0]


def _scores_by_moments(q, b, g, v, m, tsum, r):
    """(Σ_r y t, Σ_r y²) per candidate and channel [A, O] for quantized weights q [A, O, D] (depthwise [A, C, K])."""
    q = q.astype(np.float64)
    b = b.astype(np.float64)
    if g.ndim == 3:  # depthwise: channel c's rows are x[:, c, :]
        qg = np.einsum("ack,ckl->acl", q, g)
        dot = np.einsum("ack,ck->ac", q, v)
        qm = np.einsum("ack,ck->ac", q, m)
    else:
        qg = q @ g
        dot = np.einsum("aod,do->ao", q, v)
        qm = q @ m
    yy = np.einsum("aod,aod->ao", qg, q) + 2 * b * qm + r * b * b
    return dot + b * tsum, yy


def search_act_scale(x, t, wq, b, s0, zp, qmin, qmax, alphas, depthwise=False, max_scale=np.inf):
    """Best input activation scale (zero point fixed) for quantized weights wq; returns (scale, cosine).

    For a dense or convolutional layer with fewer inputs than outputs (D < O), a candidate's quantized rows x̂
    are scored without forming its outputs y = x̂ wqᵀ + b:
        Σ y t = Σ x̂ ∘ (t wq) + Σ b t,      Σ y² = Σ_r x̂_r H x̂_rᵀ + 2 Σ_r x̂_r · wqᵀb + R ‖b‖²,   H = wqᵀ wq."""
    alphas = alphas[alphas * s0 <= max_scale] if np.any(alphas * s0 <= max_scale) else alphas[:1]
    tt = float(np.einsum("ro,ro->", t, t))
    gram = not depthwise and wq.shape[1] < wq.shape[0]
    if gram:
        u, h, wb = t @ wq, wq.T @ wq, wq.T @ b  # [R, D], [D, D], [D]
        tb, bb = float(np.einsum("ro,o->", t, b)), x.shape[0] * float(b @ b)
    per = x.size + x.shape[0] * (x.shape[-1] if gram else wq.shape[0])
    chunk = max(1, BUDGET // max(per, 1))
    cos = []
    for k in range(0, len(alphas), chunk):
        a = alphas[k:k + chunk].astype(np.float32) * np.float32(s0)
        xq = fake_quant_grid(x[None], a.reshape((-1,) + (1,) * x.ndim), zp, qmin, qmax)  # [A, R, ...]
        if gram:
            dot = np.einsum("ard,rd->a", xq, u) + tb
            yy = np.einsum("ard,ard->a", xq @ h, xq) + 2 * (xq @ wb).sum(1) + bb
            cos.append(cosine(dot, yy, tt))
            continue
        if depthwise:
            y = np.einsum("arck,ck->arc", xq, wq) + b
        else:
            y = np.matmul(xq, wq.T) + b
        cos.append(cosine(np.einsum("aro,ro->a", y, t), np.einsum("aro,aro->a", y, y), tt))
    cos = np.concatenate(cos)
    best = int(np.argmax(cos))
    return np.float32(alphas[best] * s0), float(cos[best])


def easyquant(state, ctx):
    """The EasyQuant stage (see module docstring): updates state.weights and state.acts in place."""
    cfg = state.config
    require_calibration(ctx, "EasyQuant")
    gr = Graph(state.model)
    layers = reconstruction_layers(state, gr, "EasyQuant")
    bounds = activation_bounds(state.layers, gr)
    alphas = candidates(cfg.easyquant_steps, *cfg.easyquant_range)
    rows_of = {l.name: cfg.easyquant_rows if layer_kind(gr, l) != "depthwise" else max(cfg.easyquant_rows // 4, 1)
               for l in layers}

    def per_sample(layer):  # spread each layer's rows over the calibration samples; collect no more than used
        return rows_per_sample(rows_of[layer.name], len(ctx.calib))
    searched: set[str] = set()  # activation quantizers already fixed
    report = {}
    blocks = [b for b in np.array_split(np.arange(len(layers)), max(1, min(cfg.easyquant_passes, len(layers))))
              if len(b)]
    bar = tqdm(total=len(layers), desc="easyquant", unit="layer", disable=not ctx.progress, leave=False)
    for block in blocks:
        group = [layers[i] for i in block]
        sim, raw = ctx.simulate(state)
        rows: dict[str, list] = {l.name: [[], []] for l in group}
        q_inputs = {l.name: raw.get(l.x, l.x) for l in group}
        fp_batches, q_batches = streamed_pair(state.model, [l.x for l in group], sim, list(q_inputs.values()),
                                              ctx.calib, cfg.batch_size)
        for _, l, xf, xq, _ in paired_rows(gr, group, fp_batches, q_batches, q_inputs, per_sample, cfg.seed):
            rows[l.name][0].append(xf)
            rows[l.name][1].append(xq)
        for l in group:
            t0 = time.perf_counter()
            n = rows_of[l.name]
            xf = np.concatenate(rows[l.name][0])[:n].astype(np.float32)
            xq = np.concatenate(rows.pop(l.name)[1])[:n].astype(np.float32)
            report[l.name] = _search_layer(state, gr, l, xf, xq, alphas, bounds, searched, raw)
            report[l.name]["seconds"] = round(time.perf_counter() - t0, 2)
            bar.update(1)
    bar.close()
    state.report["easyquant"] = {"candidates": len(alphas), "range": list(cfg.easyquant_range), "layers": report}
    return state


def _search_layer(state, gr, l, xf, xq, alphas, bounds, searched, raw) -> dict:
    cfg = state.config
    kind = layer_kind(gr, l)
    dw = kind == "depthwise"
    w0 = gr.const(l.weight)
    w = as_matrix(w0, l, kind).astype(np.float32)
    b = state.bias(l, gr)
    b = b.astype(np.float32) if b is not None else np.zeros(w.shape[0], np.float32)
    t = (np.einsum("rck,ck->rc", xf, w) if dw else xf @ w.T) + b  # the FP32 output
    wenc = state.weights[l.name]
    root = state.placement.root.get(l.x)
    # only the quantizer that sits right on the layer's input (and was not searched before) is searched
    aenc = state.acts.get(root) if root == l.x and root not in searched and l.x in raw else None
    fixed_a = state.acts.get(root)
    ws0 = np.asarray(wenc.scale, np.float32)
    ws0 = ws0.reshape(-1) if ws0.ndim else ws0
    ws, wq_min, wq_max = ws0, wenc.spec.qmin, wenc.spec.qmax  # ws: the weight scale cos_now measures

    def xin(enc):
        return xq if enc is None else fake_quant_grid(xq, np.float32(enc.scale), int(enc.zero_point), enc.spec.qmin,
                                          enc.spec.qmax)

    def wq(scale):
        return fake_quant_grid(w, scale.reshape(-1, *([1] * (w.ndim - 1))) if scale.ndim else scale, 0, wq_min, wq_max)

    def cos_now(a_scale):
        enc = fixed_a if aenc is None else _with_scale(aenc, a_scale)
        y = (np.einsum("rck,ck->rc", xin(enc), wq(ws)) if dw else xin(enc) @ wq(ws).T) + b
        return float(cosine(np.sum(y * t), np.sum(y * y), np.sum(t * t)))

    as0 = np.float32(aenc.scale) if aenc is not None else None
    start = cos_now(as0)
    best_a, best_w, best = as0, ws0, start
    rounds = 0
    for rounds in range(1, cfg.easyquant_rounds + 1):
        a_s = best_a
        if aenc is not None:  # Sᵃ with Sʷ fixed
            hi = bounds.get(root, (None, np.inf))[1]
            max_scale = hi / (aenc.spec.qmax - int(aenc.zero_point)) if np.isfinite(hi) and \
                aenc.spec.qmax > int(aenc.zero_point) else np.inf
            a_s, _ = search_act_scale(xq, t, wq(best_w), b, as0, int(aenc.zero_point), aenc.spec.qmin,
                                      aenc.spec.qmax, alphas, dw, max(max_scale, float(as0)))
        # then Sʷ with Sᵃ fixed
        ws, c = search_weight_scales(xin(fixed_a if aenc is None else _with_scale(aenc, a_s)), t, w, b, ws0,
                                     wq_min, wq_max, alphas, dw)
        if c <= best + 1e-7:  # stopped improving
            break
        best_a, best_w, best = a_s, ws, c
    ws, a_s, final = best_w, best_a, best
    state.weights[l.name] = _weight_encoding(wenc, ws, w0)
    out = {"cosine_before": round(start, 6), "cosine_after": round(final, 6), "rounds": rounds,
           "weight_scale_ratio": _ratio(ws, ws0)}
    if aenc is not None:
        searched.add(root)
        enc = _with_scale(aenc, a_s)
        enc.method = f"{aenc.method}+easyquant"
        enc.stats = {**aenc.stats, "sqnr_db": round(sqnr_db(xq, xin(enc)), 2)}
        state.acts[root] = enc
        out["act"] = root
        out["act_scale_ratio"] = round(float(a_s / as0), 4)
    return out


def _with_scale(enc: Encoding, scale) -> Encoding:
    return Encoding(enc.spec, np.asarray(scale, np.float32), enc.zero_point, enc.method, dict(enc.stats))


def _weight_encoding(wenc: Encoding, scale, w0) -> Encoding:
    from ..quant import fake_quant
    enc = Encoding(wenc.spec, np.asarray(scale, np.float32).reshape(np.shape(wenc.scale)),
                   wenc.zero_point, f"{wenc.method}+easyquant", dict(wenc.stats))
    enc.stats["sqnr_db"] = round(sqnr_db(w0, fake_quant(w0, enc)), 2)
    return enc


def _ratio(s, s0):
    r = np.asarray(s, np.float64) / np.asarray(s0, np.float64)
    return round(float(r), 4) if r.ndim == 0 else [round(float(r.min()), 4), round(float(r.max()), 4)]
