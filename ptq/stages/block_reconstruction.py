"""Block reconstruction (BRECQ: Li et al. 2021) with QDrop (Wei et al. 2022) and LSQ activation steps (Esser et al.
2020): the rounding of all the layers of a block learned jointly, against the block's FP32 output.

Blocks are runs of nodes between single-tensor cuts (ptq/blocks.py): a residual block, or up to
``recon_block_layers`` layers of a plain chain. For each block, in topological order, with x its input in the FP32
network and x̃ its input in the quantized network as decided so far (earlier blocks reconstructed, their
activation quantizers in place), minimize over the rounding variables V of every layer of the block

    L = ‖B(x; W) − B̃(x̃; W̃(V), s)‖² / L₀  +  λ · mean(1 − |2h(V) − 1|^β)        (BRECQ eq. 10; AdaRound eq. 25)

where W̃ = s_w · clip(⌊W/s_w⌋ + h(V), n, p), h the rectified sigmoid (AdaRound eq. 22-23; ζ = 1.1, γ = −0.1), β
annealed 20 → 2 after a 20 % warm start, λ = ``adaround_lambda`` and L₀ the loss at nearest rounding (so λ means
what it means for AdaRound). In B̃ every tensor with an activation quantizer is fake-quantized

    x̂ = s · (clip(⌊x/s⌉ + z, q_min, q_max) − z),   ⌊·⌉ with the straight-through gradient,

elementwise with probability ``qdrop`` and left in float otherwise (QDrop: the rounding learned does not lean on
one exact quantized input; 1 is BRECQ's always-quantized block). With ``lsq`` the step s of each activation
quantizer that belongs to the block is learned jointly; its gradient is the straight-through one above (LSQ eq. 3)
scaled by g = 1/√(N·Q_p) (LSQ §2.2; N the tensor's elements per sample, Q_p = q_max − z). With ``recon_dsq``
the activations' rounding while learning is DSQ's soft quantizer instead of the straight-through one (Gong et
al. 2019, eq. 3-4, in grid units): for v = x/s in the cell [i, i + 1],

    φ_k(v) = i + ½ + ½ · tanh(k·(v − i − ½)) / tanh(k/2),

differentiable, with k annealed geometrically from DSQ_K[0] to DSQ_K[1] over the steps (φ_k → ⌊v⌉ as k grows);
the held-out losses that decide what is kept always use the hard rounding.

Data: up to the number of calibration samples that fit in 0.4 × ``--memory-limit`` (both networks' inputs kept);
blocks made only of local ops (Conv, elementwise ops, global pooling) see a random crop of each sample (at most
``recon_crop`` along each spatial axis, or less where the samples would not fit), the same for both networks: the
early, wide blocks then cost about what the late ones do. One eighth of the samples is held out: a block keeps
its learned rounding and steps only where they lower the held-out loss below where it started (nearest rounding,
or AdaRound's integers when AdaRound ran before; then h(V) starts on AdaRound's side of ½, as far from it as the
fractional part is).

Adam on V (lr 0.01) and on the steps (relative, lr 0.001), ``recon_iters`` steps of ``recon_batch`` samples.
Memory: a step whose forward and backward would not fit in 0.4 × ``--memory-limit`` runs its samples in parts
(``step_samples``), their gradients summed before Adam's update: the same gradient as the whole step (the error
is a sum over samples), in less memory. The Fisher pass is split the same way.

The report's row per block has the held-out loss at the start and after (hard rounding, every activation
quantized), the same after with the soft weights h(V) ("loss_end_soft": the relaxation's own loss) and the share
of h(V) still between UNDECIDED and 1 − UNDECIDED: a soft loss far below the hard one with many undecided
weights means the regularizer had not yet forced the relaxation onto the grid.

Output (decisions; the FP32 reference is not touched): the integers per layer (``state.rounded``) and the learned
activation encodings (``state.acts``). Needs torch (the ``recon`` extra).
"""
from __future__ import annotations

import math
import time

import numpy as np
import onnx
from tqdm import tqdm

from ..blocks import find_blocks
from ..data import require_calibration
from ..model import Graph, topological_sort, truncate
from ..observe import session
from ..quant import Encoding, dequantize, int32_bias, quantize
from ..rounding import GAMMA, ZETA, init_v
from ..torch_graph import LOCAL_OPS, TorchSegment, autograd_bytes, import_torch, tensor_heap, unsupported

DATA_SHARE = 0.4  # of --memory-limit, for the block inputs of both networks
STEP_SHARE = 0.4  # of --memory-limit, for one step's forward and backward (its samples split into parts that fit)
GRAPH_COPIES = 2  # a step holds what autograd saves and about as much again in gradients and temporaries
MIN_CROP = 16  # spatial side of the smallest crop
HOLDOUT = 8  # one sample in this many checks the result
LR_V, LR_STEP = 0.01, 0.001
DROP_POOL = 1 << 24  # Bernoulli draws kept for QDrop's masks
UNDECIDED = 0.02  # h(V) farther than this from 0 and 1 at the end: the soft rounding had not decided
FISHER_SAMPLES = 64  # calibration samples the Fisher weights are estimated on
FISHER_FLOOR = 0.1  # a channel's weight, relative to the mean, is at least this
DSQ_K = (2.0, 50.0)  # DSQ's sharpness k, first and last step


def reconstruct_blocks(state, ctx):
    """The block reconstruction stage (see module docstring)."""
    torch = import_torch()
    cfg = state.config
    require_calibration(ctx, "block reconstruction")
    torch.manual_seed(cfg.seed)
    masks = _DropMasks(torch)
    gr = Graph(state.model)
    fp32 = onnx.ModelProto.FromString(state.model.SerializeToString())
    topological_sort(fp32)
    layers = [l for l in state.layers if l.name in state.weights]
    blocks = find_blocks(fp32, layers, cfg.recon_block_layers)
    rng = np.random.default_rng(cfg.seed)
    report, t_all = [], time.perf_counter()
    fisher, fisher_note = {}, None
    if cfg.recon_fisher:
        fisher, fisher_note = fisher_weights(state, ctx, gr, fp32, [o for b in blocks for o in b.outputs], torch)
    bar = tqdm(total=len(blocks), desc="block reconstruction", unit="block", disable=not ctx.progress, leave=False)
    for block in blocks:
        t0 = time.perf_counter()
        nodes = [fp32.graph.node[k] for k in block.nodes]
        row = {"layers": [l.name for l in block.layers]}
        bad = unsupported(nodes)
        if bad:
            row["skipped"] = f"ops {', '.join(bad)} not supported"
        else:
            seg = TorchSegment(nodes, gr.const)
            data = _inputs(state, ctx, *ctx.simulate(state), block, seg, rng)  # its sessions are gone after it
            with tensor_heap():  # the learning's tensors stay in the heap, handed back to the system after it
                row.update(_block(state, gr, block, seg, data, rng, fisher, masks))
        row["seconds"] = round(time.perf_counter() - t0, 1)
        report.append(row)
        bar.update(1)
    bar.close()
    state.report["block_reconstruction"] = {
        "blocks": report, "iters": cfg.recon_iters, "batch": cfg.recon_batch, "qdrop": cfg.qdrop, "lsq": cfg.lsq,
        "dsq": cfg.recon_dsq, "fisher": fisher_note,
        "seconds": round(time.perf_counter() - t_all, 1)}
    return state


def _block(state, gr, block, seg, data, rng, fisher: dict, masks) -> dict:
    torch = seg.torch
    cfg = state.config
    xf, xq, crop, shapes = data
    n = len(xf[block.inputs[0]])
    n_hold = max(1, n // HOLDOUT) if n >= 2 else 0
    train, hold = np.arange(n - n_hold), np.arange(n - n_hold, n)
    weights = {l.name: _SoftWeight(torch, gr, l, state) for l in block.layers}
    acts = _act_quantizers(torch, state, block.inputs, seg, masks)
    override, added = _biases(torch, state, gr, block.layers)
    weigh = [fisher.get(o) for o in block.outputs]  # per output: its channels' Fisher weights, or None

    def error(pred, tgt):
        return sum(((p - t) ** 2 if f is None else f.reshape(1, -1, *[1] * (p.dim() - 2)) * (p - t) ** 2).sum()
                   for p, t, f in zip(pred, tgt, weigh))

    def target(idx):
        with torch.no_grad():
            env = seg.run({k: torch.from_numpy(v[idx]) for k, v in xf.items()}, shapes=shapes, keep=block.outputs)
            return [env[o] for o in block.outputs]

    def predict(idx, hard, drop):
        w = {wt.layer.weight: wt.value(hard) for wt in weights.values()}
        env = {k: torch.from_numpy(v[idx]) for k, v in xq.items()}
        env = {k: acts[k](x, drop) if k in acts else x for k, x in env.items()}
        out = seg.run(env, {**override, **w}, lambda name, x: _quantized(acts, added, name, x, drop), shapes,
                      block.outputs)
        return [out[o] for o in block.outputs]

    part = step_samples(torch, lambda k: error(predict(np.arange(min(k, n)), False, cfg.qdrop),
                                               target(np.arange(min(k, n)))), cfg.recon_batch,
                        STEP_SHARE * cfg.memory_bytes)

    def loss_on(idx, hard=True):
        total = 0.0
        with torch.no_grad():
            for k in range(0, len(idx), part):
                b = idx[k:k + part]
                total += float(error(predict(b, hard, 1.0), target(b)))
        return total / max(len(idx), 1)

    for wt in weights.values():
        wt.start()
    start = loss_on(hold) if n_hold else None
    for wt in weights.values():
        wt.learn()
    norm = max(loss_on(train[: cfg.recon_batch * 4]), 1e-30)  # per sample, at V's starting rounding
    params = [{"params": [wt.v for wt in weights.values()], "lr": LR_V}]
    learned = list({id(q): q for q in acts.values() if q.u is not None}.values())  # shared quantizers once
    if learned:
        params.append({"params": [q.u for q in learned], "lr": LR_STEP})
    opt = torch.optim.Adam(params)
    n_v = sum(wt.v.numel() for wt in weights.values())
    warm = 0.2 * cfg.recon_iters
    soft_acts = list({id(q): q for q in acts.values()}.values()) if cfg.recon_dsq else []
    for it in range(cfg.recon_iters):
        idx = rng.choice(train, size=min(cfg.recon_batch, len(train)), replace=False)
        for q in soft_acts:
            q.k = DSQ_K[0] * (DSQ_K[1] / DSQ_K[0]) ** (it / max(cfg.recon_iters - 1, 1))
        opt.zero_grad()
        for k in range(0, len(idx), part):  # gradients summed over the parts: the whole step's gradient
            b = idx[k:k + part]
            (error(predict(b, False, cfg.qdrop), target(b)) / (norm * len(idx))).backward()
        if it >= warm:
            beta = 20 + (2 - 20) * (it - warm) / max(cfg.recon_iters - warm, 1)
            reg = sum((1 - (2 * wt.h() - 1).abs() ** beta).sum() for wt in weights.values()) / n_v
            (cfg.adaround_lambda * reg).backward()
        opt.step()
    for q in soft_acts:
        q.k = None
    end = loss_on(hold) if n_hold else None
    with torch.no_grad():
        h = torch.cat([wt.h().reshape(-1) for wt in weights.values()])
        undecided = float(((h > UNDECIDED) & (h < 1 - UNDECIDED)).float().mean())
    kept = end is not None and start is not None and end < start
    row = {"samples": n, "crop": crop, "step_samples": part, "act_quantizers": len(acts),
           "fisher": any(f is not None for f in weigh),
           "loss_start": _g(start), "loss_end": _g(end), "loss_end_soft": _g(loss_on(hold, hard=False))
           if n_hold else None, "undecided": round(undecided, 4), "kept": bool(kept)}
    if kept:
        for wt in weights.values():
            state.rounded[wt.layer.name] = wt.integers()
        for q in learned:
            state.acts[q.root] = q.encoding()
        row["changed_from_nearest"] = round(float(np.mean(np.concatenate(
            [(wt.integers() != wt.nearest_integers()).ravel() for wt in weights.values()]))), 4)
    return row


def step_samples(torch, forward, want: int, budget: float) -> int:
    """The samples one forward + backward may take at once within ``budget`` bytes, at most ``want``.
    ``forward(k)`` runs k samples; with a(k) the bytes autograd saves for it (``autograd_bytes``), a sample's share
    is b = a(2) − a(1) and the fixed part (weights) f = a(1) − b, and the answer is
    ⌊(budget / GRAPH_COPIES − f) / b⌋, at least 1."""
    one, two = (autograd_bytes(torch, lambda k=k: forward(k)) for k in (1, 2))
    per, fixed = max(two - one, 1), max(2 * one - two, 0)
    return int(min(want, max(1, (budget / GRAPH_COPIES - fixed) // per)))


def fisher_weights(state, ctx, gr, fp32, names, torch) -> tuple[dict, str]:
    """Per channel (axis 1) of each tensor in ``names``, the diagonal Fisher information of the task loss averaged
    over the channel's positions, F_c = E[(∂L/∂z_c)²] (BRECQ eq. 9, one weight per channel instead of per element),
    divided by its mean over the channels and floored at FISHER_FLOOR; ({name: torch [C]}, what was done).

    L is measured in the quantized network as decided so far (weights rounded, every activation quantizer in
    place), against FP32: KL(softmax(FP32 logits) ‖ softmax(quantized logits)) where the model has logits, else
    the squared error of its outputs. Its gradient at the FP32 point itself would be zero. FISHER_SAMPLES
    calibration samples; the whole graph must run in torch (``unsupported``), else no weighting."""
    nodes = list(fp32.graph.node)
    bad = unsupported(nodes)
    if bad:
        return {}, f"not used: the model has {', '.join(bad)}"
    seg = TorchSegment(nodes, gr.const)
    quantized = [l for l in state.layers if l.name in state.weights]
    override, added = _biases(torch, state, gr, quantized)
    for l in quantized:
        enc, q = state.weights[l.name], state.rounded.get(l.name)
        override[l.weight] = torch.from_numpy(dequantize(q if q is not None else quantize(gr.const(l.weight), enc),
                                                         enc))
    given = [i.name for i in fp32.graph.input if i.name not in gr.inits]
    acts = _act_quantizers(torch, state, given, seg)
    outs = [o.name for o in fp32.graph.output]
    logits = set(state.logits)
    wanted = list(dict.fromkeys([*names, *outs]))

    def task_loss(x):
        with torch.no_grad():
            ref = seg.run(x, keep=outs)
        xq = {k: (acts[k](v, 1.0) if k in acts else v).requires_grad_(True) for k, v in x.items()}
        env = seg.run(xq, override, lambda name, v: _quantized(acts, added, name, v, 1.0), keep=wanted)
        for t in names:
            if env[t].requires_grad:
                env[t].retain_grad()
        loss = 0
        for o in outs:
            if o in logits:
                p = torch.softmax(ref[o], -1)
                loss = loss + (p * (torch.log_softmax(ref[o], -1) - torch.log_softmax(env[o], -1))).sum()
            else:
                loss = loss + ((env[o] - ref[o]) ** 2).sum()
        return loss, env

    def tensors(feed, k=None):
        return {name: torch.from_numpy(np.asarray(feed[name][:k], np.float32)) for name in given}

    batch = min(state.config.batch_size, 8)
    _, first = next(iter(ctx.calib.batches(batch)))
    if len(next(iter(first.values()))) >= 2:  # squared gradients are per sample: parts change nothing but memory
        batch = step_samples(torch, lambda k: task_loss(tensors(first, k))[0], batch,
                             STEP_SHARE * state.config.memory_bytes)
    sums, count = {}, 0
    for _, feed in ctx.calib.batches(batch):
        x = tensors(feed)
        loss, env = task_loss(x)
        loss.backward()
        for t in names:
            g = env[t].grad
            if g is not None and g.dim() >= 2:
                dims = [0] + list(range(2, g.dim()))
                sums[t] = sums.get(t, 0) + (g.detach() ** 2).sum(dim=dims).double()
        count += len(next(iter(x.values())))
        if count >= FISHER_SAMPLES:
            break
    out = {}
    for t, v in sums.items():
        f = v / max(float(v.mean()), 1e-300)
        out[t] = torch.clamp(f, min=FISHER_FLOOR).float()
    return out, f"per-channel Fisher weights of {len(out)} block outputs from {count} samples"


def _biases(torch, state, gr, layers) -> tuple[dict, dict]:
    """The layers' biases as the exported model has them: the decided one (AdaRound's re-fit, bias correction),
    else the reference's, on the int32 grid s_in · s_w where the layer's input is quantized and the bias fits it
    (ptq.export). Returns ({bias initializer: value}, {layer output before its activation: value}): the second
    for layers without a bias input, whose bias the exporter adds as one; the simulation adds it at that
    output, shaped to broadcast over it."""
    override, added = {}, {}
    for l in layers:
        b = state.bias(l, gr)
        if b is None:
            continue
        b = np.asarray(b, np.float32)
        root = state.placement.root.get(l.x)
        wenc, xenc = state.weights.get(l.name), state.acts.get(root)
        qb = int32_bias(b, wenc, xenc) if wenc is not None and xenc is not None else None
        if qb is not None:
            b = dequantize(*qb).astype(np.float32)
        if l.bias:
            override[l.bias] = torch.from_numpy(b)
        else:
            added[l.pre_act] = torch.from_numpy(b.reshape(-1, *[1] * (gr.const(l.weight).ndim - 2))
                                                if l.op == "Conv" else b)
    return override, added


def _quantized(acts: dict, added: dict, name: str, x, drop: float):
    """A tensor the segment writes, as the quantized network has it: plus its added bias, then its activation
    quantizer (elementwise with probability ``drop``)."""
    if name in added:
        x = x + added[name]
    return acts[name](x, drop) if name in acts else x


def _g(v):
    return None if v is None else float(f"{v:.6g}")


def _inputs(state, ctx, sim, raw, block, seg, rng):
    """The block's inputs in both networks for the samples that fit in the data budget: ({name: [N, ...]} FP32,
    the same for the quantized network (the value its quantizer reads), crop side or None, {tensor: shape of one
    sample} for the tensors the block's Shape nodes read)."""
    cfg = state.config
    given = {i.name for i in state.model.graph.input}  # graph inputs come from the feed itself
    computed = [t for t in block.inputs if t not in given]
    shaped = [t for t in block.shape_of if t not in given and t not in computed]
    q_names = [raw.get(t, t) for t in computed]
    fp_sess = session(truncate(state.model, computed + shaped), arena=False) if computed or shaped else None
    q_sess = session(truncate(sim, q_names), arena=False) if computed else None
    local = all(n.op_type in LOCAL_OPS for n in seg.nodes)
    xf, xq, crop, limit = {t: [] for t in block.inputs}, {t: [] for t in block.inputs}, None, None
    n, shapes = 0, {}
    for _, feed in ctx.calib.batches(cfg.batch_size):
        a = {t: feed[t] for t in block.inputs if t in given}
        b = dict(a)
        if computed or shaped:
            a.update(zip(computed + shaped, fp_sess.run(computed + shaped, feed)))
            b.update(zip(computed, q_sess.run(q_names, feed)))
        if not shapes:
            shapes = {t: tuple((feed if t in given else a)[t].shape[1:]) for t in block.shape_of}
            for t in shaped:
                a.pop(t)
        if limit is None:
            limit, crop = _budget(cfg, a, local, len(ctx.calib))
        for k in range(len(next(iter(a.values())))):
            if n >= limit:
                break
            window = _window(a, crop, rng)
            for t in block.inputs:
                xf[t].append(np.array(a[t][k][window], np.float32))  # a copy: a view keeps the whole batch
                xq[t].append(np.array(b[t][k][window], np.float32))
            n += 1
        if n >= limit:
            break
    return ({t: np.stack(v) for t, v in xf.items()}, {t: np.stack(v) for t, v in xq.items()}, crop, shapes)


def _budget(cfg, batch: dict, local: bool, want: int):
    """(samples kept, crop [height, width] or None): the samples, up to the calibration set, whose inputs fit in the
    budget. Where every input is a 4-D map of one spatial size and the block is made of local ops, each sample is a
    crop of at most ``recon_crop`` along each spatial axis (0: whole maps; a 24 × 160 map of a text recognizer
    gives 24 × 32 crops), smaller, down to MIN_CROP, where the calibration set would not fit otherwise."""
    per = sum(v[0].nbytes for v in batch.values()) * 2  # both networks
    budget = DATA_SHARE * cfg.memory_bytes
    spatial = {v.shape[2:] for v in batch.values()}
    crop = None
    if local and all(v.ndim == 4 for v in batch.values()) and len(spatial) == 1:
        h, w = next(iter(spatial))
        side = cfg.recon_crop or max(h, w)
        while side > MIN_CROP and per * want * min(h, side) * min(w, side) > budget * h * w:
            side -= 1  # smaller crops, down to MIN_CROP, then fewer samples
        if min(h, side) * min(w, side) < h * w:
            crop = [min(h, side), min(w, side)]
            per = per * crop[0] * crop[1] / (h * w)
    return max(2, min(want, int(budget // per))), crop


def _window(batch: dict, crop, rng):
    if crop is None:
        return (Ellipsis,)
    h, w = next(iter(batch.values())).shape[2:]
    i, j = rng.integers(0, h - crop[0] + 1), rng.integers(0, w - crop[1] + 1)
    return (slice(None), slice(i, i + crop[0]), slice(j, j + crop[1]))


class _SoftWeight:
    """A layer's weight on its grid with learnable rounding: s · clip(⌊W/s⌋ + h(V), q_min − z, q_max − z)."""

    def __init__(self, torch, gr, layer, state):
        self.torch, self.layer = torch, layer
        enc = state.weights[layer.name]
        w = gr.const(layer.weight).astype(np.float64)
        shape = [1] * w.ndim
        if enc.spec.axis is not None and np.ndim(enc.scale):
            shape[enc.spec.axis] = -1
        self.enc, self.shape = enc, shape
        s = np.asarray(enc.scale, np.float64).reshape(shape)
        z = np.asarray(enc.zero_point, np.float64).reshape(shape)
        self.floor = np.floor(w / s)
        self.frac = w / s - self.floor
        self.lo, self.hi = enc.spec.qmin - z, enc.spec.qmax - z
        self.z = z
        self.start_q = state.rounded.get(layer.name)  # AdaRound's integers, when it ran
        self.s = torch.from_numpy(s.astype(np.float32))
        self.t_floor = torch.from_numpy(self.floor.astype(np.float32))
        self.t_lo = torch.from_numpy(np.broadcast_to(self.lo, w.shape).astype(np.float32))
        self.t_hi = torch.from_numpy(np.broadcast_to(self.hi, w.shape).astype(np.float32))
        h0 = self.frac  # h(V) starts at the fractional part (nearest rounding), or mirrored to where it rounds
        if self.start_q is not None:  # as AdaRound did, as far from the boundary as the fraction is
            up = (np.asarray(self.start_q, np.float64) - z) > self.floor
            h0 = np.where(up == (self.frac >= 0.5), self.frac, 1 - self.frac)
        self.v = torch.nn.Parameter(torch.from_numpy(init_v(h0).astype(np.float32)))
        self.fixed = None  # integers (relative to z) used instead of V while set

    def h(self):
        return self.torch.clamp(self.torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def value(self, hard: bool):
        if self.fixed is not None:
            return self.s * self.fixed
        h = (self.v >= 0).float() if hard else self.h()
        return self.s * self.torch.maximum(self.torch.minimum(self.t_floor + h, self.t_hi), self.t_lo)

    def nearest_integers(self) -> np.ndarray:
        return np.clip(self.floor + (self.frac >= 0.5), self.lo, self.hi).astype(np.int64) + self.z.astype(np.int64)

    def start(self):
        q = self.start_q if self.start_q is not None else self.nearest_integers()
        self.fixed = self.torch.from_numpy((np.asarray(q, np.float64) - self.z).astype(np.float32))

    def learn(self):
        """Back to the learnable rounding (V starts at the nearest rounding, or at AdaRound's)."""
        self.fixed = None

    def integers(self) -> np.ndarray:
        up = self.v.detach().numpy() >= 0
        return (np.clip(self.floor + up, self.lo, self.hi) + self.z).astype(np.int32)


class _DropMasks:
    """QDrop's Bernoulli(p) masks: slices, at random offsets, of a pool of draws made once per probability
    (drawing every element again costs more than the rest of a reconstruction step)."""

    def __init__(self, torch):
        self.torch, self.pools = torch, {}

    def __call__(self, shape, p: float):
        n = int(np.prod(shape))
        pool = self.pools.get(p)
        if pool is None or len(pool) < 2 * n:  # drawn DROP_POOL at a time: no float copy of the whole pool
            self.pools.pop(p, None)  # the old pool is let go before the new one is drawn
            del pool
            size = max(2 * n, DROP_POOL)
            pool = self.pools[p] = self.torch.empty(size, dtype=self.torch.bool)
            for k in range(0, size, DROP_POOL):
                pool[k:k + DROP_POOL] = self.torch.rand(min(DROP_POOL, size - k)) < p
        start = int(self.torch.randint(0, len(pool) - n + 1, ()))
        return pool[start:start + n].reshape(shape)


class _ActQuant:
    """An activation quantizer in the block: fake-quant with the straight-through rounding (with DSQ's soft
    rounding ``dsq_round`` while ``k`` is set), applied elementwise with probability ``drop`` (QDrop); with a
    learnable relative step ``u`` (LSQ) when the block owns it."""

    def __init__(self, torch, root, enc: Encoding, learn: bool, masks=None):
        self.torch, self.root, self.enc, self.masks = torch, root, enc, masks
        self.per_tensor = np.ndim(enc.scale) == 0
        self.scale = torch.from_numpy(np.asarray(enc.scale, np.float32))
        self.z = float(np.asarray(enc.zero_point).reshape(-1)[0]) if np.ndim(enc.zero_point) == 0 else None
        self.u = torch.nn.Parameter(torch.ones(())) if learn and self.per_tensor else None
        self.g = None  # LSQ's gradient scale, from the first tensor it quantizes
        self.k = None  # DSQ's sharpness while learning; None: hard rounding, straight-through gradient

    def step(self, x):
        if self.u is None:
            return self.scale
        if self.g is None:
            self.g = 1.0 / math.sqrt(x[0].numel() * max(self.enc.spec.qmax - self.z, 1))
        u = self.u * self.g + (self.u - self.u * self.g).detach()  # the value u, the gradient scaled by g (LSQ)
        return self.scale * u

    def __call__(self, x, drop: float):
        t = self.torch
        if not self.per_tensor:  # per-channel activation encodings: not learned, applied along axis 1
            s = self.scale.reshape(1, -1, *([1] * (x.dim() - 2)))
            z = t.from_numpy(np.asarray(self.enc.zero_point, np.float32)).reshape(s.shape)
        else:
            s, z = self.step(x), self.z
        v = x / s
        v = v + (t.round(v) - v).detach() if self.k is None else dsq_round(t, v, self.k)
        q = (t.clamp(v + z, self.enc.spec.qmin, self.enc.spec.qmax) - z) * s
        if drop >= 1.0:
            return q
        if drop <= 0.0:
            return x
        return t.where(self.masks(x.shape, drop), q, x)

    def encoding(self) -> Encoding:
        scale = np.float32(float(self.scale) * float(self.u.detach()))
        return Encoding(self.enc.spec, np.asarray(scale, np.float32), self.enc.zero_point, self.enc.method,
                        {**self.enc.stats, "lsq_step_ratio": round(float(self.u.detach()), 4)})


def dsq_round(torch, v, k: float):
    """DSQ's soft rounding in grid units: ⌊v⌋ + ½ + ½·tanh(k(v − ⌊v⌋ − ½)) / tanh(k/2) (module docstring)."""
    i = torch.floor(v)
    return i + 0.5 + 0.5 * torch.tanh(k * (v - i - 0.5)) / math.tanh(k / 2)


def _act_quantizers(torch, state, inputs, seg, masks=None) -> dict:
    """{tensor: _ActQuant} for the segment's ``inputs`` and the tensors its nodes write that carry an activation
    quantizer; a quantizer's step is learned only if every tensor sharing it is written inside the segment."""
    root_of = state.placement.root
    written = {o for n in seg.nodes for o in n.output if o}
    members: dict[str, list] = {}
    for t, r in root_of.items():
        members.setdefault(r, []).append(t)
    out, made = {}, {}
    for t in list(inputs) + [o for n in seg.nodes for o in n.output if o]:
        r = root_of.get(t)
        if r is None or r not in state.acts:
            continue
        if r not in made:
            learn = state.config.lsq and all(m in written for m in members[r])
            made[r] = _ActQuant(torch, r, state.acts[r], learn, masks)
        out[t] = made[r]
    return out
