"""Function-preserving rewrites into the forms onnxruntime runs fast on integers (part of canonicalization):

- a Conv / Gemm whose output only a Mul by a per-channel constant reads takes the constant into its weight and
  bias (W ← c·W, b ← c·b; PP-LCNetV3's learnable affine blocks scale every convolution's output): the Mul otherwise
  runs in float between the integer convolution and what reads it;
- a Conv / Gemm whose output only an Add of a per-channel constant reads takes the constant into its bias
  (b ← b + c): the exporter's separate bias Adds (Paddle writes one after every Conv without BatchNorm) otherwise
  sit between the integer convolution and whatever reads it;
- a Mul by one value c (and an Add of one value d after it) whose result only layers read moves into their
  weights, L(c·x + d) = L_{c·W}(x + d/c): PP-LCNetV3's affine block after each activation; except the last
  Mul of an erf GELU, 0.5 · x · (1 + erf(x/√2)), which onnxruntime fuses with the rest into one Gelu kernel only
  while it is there;
- the HardSwish decomposition x · Clip(x + 3, 0, 6) / 6 (or · 1/6) becomes x · HardSigmoid(x) with α = 1/6,
  β = 0.5: two ops instead of four, and a pattern the activation ranges recognize.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .model import Graph, attr, set_initializer, unique_name
from .patterns import scalar_operand


def fold_scale_muls(model: onnx.ModelProto) -> int:
    """Fold Mul(layer output, per-channel constant c) into the Conv / Gemm: W ← c·W along the output channels,
    b ← c·b. The folded weight and bias are new initializers (a shared one is left as it was). Returns the number
    folded."""
    return _fold_after_layers(model, "Mul", _scale_layer)


def fold_bias_adds(model: onnx.ModelProto) -> int:
    """Fold Add(layer output, per-channel constant c) into the Conv / Gemm's bias (b ← b + c). Returns the number
    folded."""
    return _fold_after_layers(model, "Add", _shift_bias)


def _fold_after_layers(model: onnx.ModelProto, op: str, fold) -> int:
    """For each layer whose output only an ``op`` with one value per output channel reads (``_affine_layer``):
    ``fold(model, gr, layer node, c as [channels] float64, taken)`` rewrites the layer (False: it could not), and
    the layer then writes the ``op``'s output in its place."""
    gr = Graph(model)
    removed = []
    taken = set(gr.inits) | set(gr.producer)
    for node in model.graph.node:
        found = _affine_layer(gr, node, op)
        if found is None:
            continue
        nxt, c, channels = found
        if fold(model, gr, node, np.broadcast_to(c.astype(np.float64).ravel(), (channels,)), taken) is False:
            continue
        node.output[0] = nxt.output[0]
        removed.append(nxt)
    for n in removed:
        model.graph.node.remove(n)
    return len(removed)


def _scale_layer(model, gr: Graph, node, scale: np.ndarray, taken: set) -> None:
    w = gr.const(node.input[1])
    shape = [1] * w.ndim
    shape[0 if node.op_type == "Conv" or attr(node, "transB", 0) else 1] = len(scale)
    node.input[1] = unique_name(taken, node.input[1] + "/scaled")
    set_initializer(model, node.input[1], (w.astype(np.float64) * scale.reshape(shape)).astype(w.dtype))
    if len(node.input) > 2 and node.input[2]:
        b = gr.const(node.input[2])
        node.input[2] = unique_name(taken, node.input[2] + "/scaled")
        set_initializer(model, node.input[2], (b.astype(np.float64) * scale).astype(b.dtype))


def _shift_bias(model, gr: Graph, node, shift: np.ndarray, taken: set) -> bool:
    w = gr.const(node.input[1])
    has_bias = len(node.input) > 2 and node.input[2]
    if has_bias and len(gr.consumers[node.input[2]]) != 1:
        return False
    bias = gr.const(node.input[2]) if has_bias else np.zeros(len(shift), w.dtype)
    name = node.input[2] if has_bias else unique_name(taken, node.name + "/bias")
    set_initializer(model, name, (bias.astype(np.float64) + shift).astype(w.dtype))
    while len(node.input) < 3:
        node.input.append("")
    node.input[2] = name
    return True


def _affine_layer(gr: Graph, node, op: str):
    """(the consumer, its constant, the layer's output channels) where ``node`` is a Conv / Gemm with a constant
    float weight (and constant bias) whose output only an ``op`` (Add / Mul) with one value per output channel
    reads; else None."""
    if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2 or not gr.is_const(node.input[1]):
        return None
    nxt = gr.only_consumer(node.output[0])
    if nxt is None or nxt.op_type != op or len(nxt.input) != 2:
        return None
    other = nxt.input[1] if nxt.input[0] == node.output[0] else nxt.input[0]
    c, w = gr.const(other), gr.const(node.input[1])
    if c is None or w.dtype.kind != "f" or c.dtype.kind != "f":
        return None
    if len(node.input) > 2 and node.input[2] and gr.const(node.input[2]) is None:
        return None
    if node.op_type == "Conv":
        channels = w.shape[0]
        fits = per_channel_shape(c.shape, channels, w.ndim)
    else:
        if attr(node, "transA", 0) or attr(node, "alpha", 1.0) != 1.0 or attr(node, "beta", 1.0) != 1.0:
            return None
        channels = w.shape[0] if attr(node, "transB", 0) else w.shape[1]
        fits = c.size in (1, channels) and (c.ndim <= 1 or (c.ndim == 2 and c.shape[0] == 1))
    return (nxt, c, channels) if fits else None


def per_channel_shape(shape, channels: int, rank: int) -> bool:
    """Whether a constant of ``shape`` adds one value per output channel to a conv output of ``rank`` dims
    ([N, C, spatial…]): scalar, [C], or [1?, C, 1, …, 1] aligned to the channel axis."""
    if len(shape) <= 1:  # numpy aligns a [C] constant with the last axis: only a scalar is per channel then
        return int(np.prod(shape)) == 1
    if len(shape) > rank:
        return False
    aligned = (1,) * (rank - len(shape)) + tuple(shape)  # numpy broadcasting aligns to the right
    return aligned[0] == 1 and aligned[1] in (1, channels) and all(d == 1 for d in aligned[2:])


def fuse_hardswish(model: onnx.ModelProto) -> int:
    """x · Clip(x + 3, 0, 6) / 6 -> x · HardSigmoid(x; 1/6, 0.5). Returns the number rewritten."""
    gr = Graph(model)
    taken = set(gr.inits) | set(gr.producer) | {n.name for n in model.graph.node}
    gone, count = set(), 0
    for add in list(model.graph.node):
        if add.op_type != "Add" or add.name in gone:
            continue
        three = [i for i in add.input if gr.is_const(i) and np.allclose(gr.const(i), 3.0) and gr.const(i).size == 1]
        if len(three) != 1:
            continue
        x = add.input[1] if add.input[0] == three[0] else add.input[0]
        clip = gr.only_consumer(add.output[0])
        if clip is None or clip.op_type != "Clip" or not _clip_0_6(gr, clip):
            continue
        mul = gr.only_consumer(clip.output[0])
        if mul is None or mul.op_type != "Mul" or set(mul.input) != {x, clip.output[0]}:
            continue
        last = gr.only_consumer(mul.output[0])
        if last is None or not _divides_by_6(gr, last, mul.output[0]):
            continue
        hs = unique_name(taken, x + "/hardsigmoid")
        new = [helper.make_node("HardSigmoid", [x], [hs], unique_name(taken, add.name + "/HardSigmoid"),
                                alpha=1.0 / 6.0, beta=0.5),
               helper.make_node("Mul", [x, hs], [last.output[0]], unique_name(taken, mul.name + "/HardSwish"))]
        at = list(model.graph.node).index(add)
        for n in (add, clip, mul, last):
            model.graph.node.remove(n)
            gone.add(n.name)
        for k, n in enumerate(new):
            model.graph.node.insert(at + k, n)
        count += 1
    return count


def _clip_0_6(gr: Graph, clip) -> bool:
    lo = gr.const(clip.input[1]) if len(clip.input) > 1 and clip.input[1] else attr(clip, "min")
    hi = gr.const(clip.input[2]) if len(clip.input) > 2 and clip.input[2] else attr(clip, "max")
    return lo is not None and hi is not None and np.allclose(lo, 0.0) and np.allclose(hi, 6.0)


def _divides_by_6(gr: Graph, node, src: str) -> bool:
    other = [i for i in node.input if i != src]
    if len(other) != 1 or not gr.is_const(other[0]) or gr.const(other[0]).size != 1:
        return False
    v = float(np.ravel(gr.const(other[0]))[0])
    return (node.op_type == "Div" and node.input[0] == src and np.isclose(v, 6.0)) or \
        (node.op_type == "Mul" and np.isclose(v, 1 / 6.0))


def fold_scales_forward(model: onnx.ModelProto) -> int:
    """Move a Mul by one value c (optionally followed by an Add of one value d) into the layers that read it:

        L(c·x + d) = L_{c·W}(x + d/c)

    where every reader of the result is a Conv / Gemm / MatMul taking it as its data input with a constant float
    weight (c ≠ 0). Zero padding commutes with the scale (c·0 = 0), so a padded convolution stays exact; the Add,
    if any, stays (with d/c), the Mul goes. PP-LCNetV3's affine block after each activation is this pattern.
    Scaled weights are new initializers. Returns the number of Muls removed."""
    gr = Graph(model)
    taken = set(gr.inits) | set(gr.producer) | {n.name for n in model.graph.node}
    removed = []
    for mul in model.graph.node:
        c = scalar_operand(gr, mul) if mul.op_type == "Mul" else None
        scale = gr.const(c).item() if c is not None else 0.0
        if scale == 0.0:
            continue
        x = next((i for i in mul.input if i != c), None)  # None: the Mul squares its constant
        add = gr.only_consumer(mul.output[0])
        d = scalar_operand(gr, add) if add is not None and add.op_type == "Add" else None
        last = add.output[0] if d is not None else mul.output[0]
        readers = gr.consumers.get(last, [])
        if not readers or x is None or gr.is_const(x) or last in gr.outputs or mul.output[0] in gr.outputs \
                or not all(_linear_reader(gr, r, last) for r in readers) or _ends_erf_gelu(gr, x):
            continue
        for r in readers:
            w = gr.const(r.input[1])
            r.input[1] = unique_name(taken, r.input[1] + "/scaled")
            set_initializer(model, r.input[1], (w.astype(np.float64) * scale).astype(w.dtype))
        if d is not None:
            d_name = unique_name(taken, d + "/unscaled")
            shift = gr.const(d)
            set_initializer(model, d_name, (shift.astype(np.float64) / scale).astype(np.float32))
            add.input[:] = [x, d_name]
        else:
            for r in readers:
                r.input[0] = x
        removed.append(mul)
    for n in removed:
        model.graph.node.remove(n)
    return len(removed)


def _ends_erf_gelu(gr: Graph, x: str) -> bool:
    """Whether ``x`` is x₀ · (1 + erf(·)), so that a Mul by one value after it ends an erf GELU
    (0.5 · x₀ · (1 + erf(x₀/√2)), as PyTorch exports it): a Mul reading an Add of one value to an Erf."""
    mul = gr.producer.get(x)
    if mul is None or mul.op_type != "Mul":
        return False
    adds = [gr.producer.get(t) for t in mul.input]
    return any(a is not None and a.op_type == "Add" and scalar_operand(gr, a) is not None
               and any(getattr(gr.producer.get(i), "op_type", None) == "Erf" for i in a.input) for a in adds)


def _linear_reader(gr: Graph, node, x: str) -> bool:
    """Whether ``node`` is a Conv / Gemm / MatMul reading ``x`` as its data input (only there) with a constant
    float weight, so that scaling its input by c is scaling its weight by c."""
    if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2 or node.input[0] != x \
            or x in node.input[1:]:
        return False
    w = gr.const(node.input[1])
    if w is None or w.dtype.kind != "f":
        return False
    return node.op_type != "Gemm" or not attr(node, "transA", 0)
