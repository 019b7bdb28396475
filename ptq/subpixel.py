"""ConvTranspose as a convolution onnxruntime runs on integers (part of canonicalization).

onnxruntime's CPU provider has no integer ConvTranspose: a quantized model runs it in float between a
DequantizeLinear and a QuantizeLinear (ViT-S saliency's decoder: a third of its int8 latency). A 2-D
ConvTranspose with stride s (the same on both axes), group 1, no dilation, is exactly a Conv with s²·C_out output
channels followed by DepthToSpace (the sub-pixel form; Shi et al. 2016) and a crop. Output phase (r_y, r_x) of
the full (unpadded) transposed convolution,

    z[s·u + r] = Σ_m x[u − m] · W[s·m + r],   m = 0 … M − 1,  M = ⌈k / s⌉   (per axis; W's taps past k are 0)

is a correlation of x with the flipped taps K_r[t] = W[s·(M − 1 − t) + r], so

    Conv(x, K, pads) → DepthToSpace(s, CRD) → Slice(start, −tail)

where output channel c·s² + r_y·s + r_x of the Conv is phase (r_y, r_x) of channel c, the Conv's pads cover the
rows of u that the ConvTranspose's output needs (its pads p_begin, p_end and output_padding), and the Slice crops
what they add. The crop's end is a fixed distance from the end (tail = s·p_conv_end + s − k + p_end −
output_padding), so the rewrite holds for any input size. The bias repeats over the s² phases.

Per-channel ops that alone read the ConvTranspose's output (inference BatchNormalization, a Mul or Add of a per-
channel or single constant, an element-wise activation) move before the DepthToSpace with their constants
repeated over the phases, so BN folding and the activation fusions see a Conv followed by them, as for any Conv.

Rewritten only where the kernel is larger than the stride on both axes (k > s): there a ConvTranspose overlaps
its outputs, and the int8 Conv with DepthToSpace and the crop on its grid ran faster than the float ConvTranspose
at ViT-S's decoder shapes; with k ≤ s (a pointwise upsampling, waifu2x's 2×2 stride 2) DepthToSpace's copy costs
more than the integer kernel saves (bench/conv_transpose.py, docs/FINDINGS.md), so it stays a ConvTranspose.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .fuse import per_channel_shape
from .model import Graph, attr, set_initializer, unique_name

ELEMENTWISE = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu", "Softplus"}


def subpixel_taps(w: np.ndarray, s: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The Conv weight [C_out·s², C_in, M_y, M_x] of a ConvTranspose weight ``w`` [C_in, C_out, k_y, k_x] with
    stride ``s``: K[c·s² + r_y·s + r_x, :, t_y, t_x] = W[:, c, s·(M_y − 1 − t_y) + r_y, s·(M_x − 1 − t_x) + r_x]
    (0 past the kernel); and (M_y, M_x)."""
    c_in, c_out, ky, kx = w.shape
    my, mx = -(-ky // s), -(-kx // s)
    padded = np.zeros((c_in, c_out, my * s, mx * s), w.dtype)
    padded[:, :, :ky, :kx] = w
    # tap s·m + r  ->  [m, r]; the Conv's tap t is m = M − 1 − t
    taps = padded.reshape(c_in, c_out, my, s, mx, s)[:, :, ::-1, :, ::-1, :]
    k = taps.transpose(1, 3, 5, 0, 2, 4)  # [C_out, r_y, r_x, C_in, t_y, t_x]
    return np.ascontiguousarray(k.reshape(c_out * s * s, c_in, my, mx)), (my, mx)


def subpixel_geometry(k: int, s: int, p_begin: int, p_end: int, output_padding: int) -> tuple[int, int, int, int]:
    """(Conv pad at the start, Conv pad at the end, crop start, crop tail) on one axis for a ConvTranspose of
    kernel ``k``, stride ``s``, pads and output padding. The Conv's output u covers [M − 1 − pad₀, H − 1 + pad₁];
    the ConvTranspose's output row o is full row o + p_begin = s·u + r, rows p_begin … (H − 1)·s + k − p_end +
    output_padding − 1; DepthToSpace's row i is full row i + s·(M − 1 − pad₀)."""
    m = -(-k // s)
    pad0 = max(0, m - 1 - p_begin // s)
    pad1 = max(0, (k - p_end + output_padding - 1) // s)
    start = p_begin - s * (m - 1 - pad0)
    tail = s * pad1 + s - k + p_end - output_padding
    return pad0, pad1, start, tail


def _rewritable(gr: Graph, node) -> tuple[int, np.ndarray] | None:
    """(stride, weight) of a ConvTranspose that ``subpixel_conv_transposes`` rewrites, else None."""
    if node.op_type != "ConvTranspose" or len(node.input) < 2:
        return None
    w = gr.const(node.input[1])
    if w is None or w.ndim != 4 or w.dtype != np.float32:
        return None
    if len(node.input) > 2 and node.input[2] and gr.const(node.input[2]) is None:
        return None
    strides = attr(node, "strides", [1, 1])
    explicit = attr(node, "output_shape") is None and attr(node, "auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
    if attr(node, "group", 1) != 1 or any(d != 1 for d in attr(node, "dilations", [1, 1])) or not explicit \
            or len(strides) != 2 or strides[0] != strides[1] or strides[0] < 2:
        return None
    s = int(strides[0])
    return (s, w) if w.shape[2] > s and w.shape[3] > s else None


def _movable(gr: Graph, node, channels: int) -> bool:
    """Whether ``node`` is a per-channel op that commutes with DepthToSpace once its constants repeat per phase."""
    if node.op_type in ELEMENTWISE:
        return True
    if node.op_type == "BatchNormalization":
        return len([o for o in node.output if o]) == 1 and not attr(node, "training_mode", 0) \
            and all(gr.const(i) is not None for i in node.input[1:5])
    if node.op_type in ("Mul", "Add") and len(node.input) == 2:
        c = gr.const(node.input[1])
        return c is not None and c.dtype == np.float32 and per_channel_shape(c.shape, channels, 4)
    if node.op_type == "Clip":
        return all(not i or gr.const(i) is not None for i in node.input[1:])
    return False


def subpixel_conv_transposes(model: onnx.ModelProto) -> int:
    """Rewrite each ConvTranspose that ``_rewritable`` accepts as Conv → [the per-channel ops after it] →
    DepthToSpace → Slice (see the module docstring); the outputs are unchanged up to float rounding. Returns the
    number rewritten."""
    gr = Graph(model)
    taken = set(gr.inits) | set(gr.producer) | {n.name for n in model.graph.node}
    done = 0
    for node in list(model.graph.node):
        found = _rewritable(gr, node)
        if found is None:
            continue
        s, w = found
        c_out = w.shape[1]
        k, (my, mx) = subpixel_taps(w, s)
        pads = list(attr(node, "pads", [0, 0, 0, 0]))
        out_pad = list(attr(node, "output_padding", [0, 0]))
        gy = subpixel_geometry(w.shape[2], s, pads[0], pads[2], out_pad[0])
        gx = subpixel_geometry(w.shape[3], s, pads[1], pads[3], out_pad[1])
        base = node.name or node.output[0]
        w_name = unique_name(taken, base + "/subpixel_weight")
        set_initializer(model, w_name, k)
        inputs = [node.input[0], w_name]
        if len(node.input) > 2 and node.input[2]:
            b_name = unique_name(taken, base + "/subpixel_bias")
            set_initializer(model, b_name, np.repeat(gr.const(node.input[2]).astype(np.float32), s * s))
            inputs.append(b_name)
        z = unique_name(taken, base + "/subpixel")
        new = [helper.make_node("Conv", inputs, [z], unique_name(taken, base + "/subpixel_conv"),
                                kernel_shape=[my, mx], pads=[gy[0], gx[0], gy[1], gx[1]])]
        last, removed = node.output[0], [node]
        while last not in gr.outputs:  # the per-channel ops that alone read it move before DepthToSpace
            nxt = gr.only_consumer(last)
            if nxt is None or nxt.input[0] != last or not _movable(gr, nxt, c_out):
                break
            moved = onnx.NodeProto()
            moved.CopyFrom(nxt)
            moved.input[0] = z
            for j, name in enumerate(nxt.input[1:], 1):
                value = gr.const(name) if name else None
                if value is not None and value.size > 1:
                    per_phase = np.repeat(value, s * s, axis=0 if value.ndim == 1 else value.ndim - 3)
                    moved.input[j] = unique_name(taken, f"{name}/subpixel")
                    set_initializer(model, moved.input[j], per_phase)
            z = unique_name(taken, nxt.output[0] + "/subpixel")
            moved.output[0] = z
            new.append(moved)
            last = nxt.output[0]
            removed.append(nxt)
        crop = gy[2] or gy[3] or gx[2] or gx[3]
        spread = unique_name(taken, base + "/depth_to_space") if crop else last
        new.append(helper.make_node("DepthToSpace", [z], [spread], unique_name(taken, base + "/DepthToSpace"),
                                    blocksize=s, mode="CRD"))
        if crop:
            names = [unique_name(taken, base + f"/crop_{what}") for what in ("starts", "ends", "axes")]
            ends = [-t if t else np.iinfo(np.int64).max for t in (gy[3], gx[3])]
            for name, value in zip(names, ([gy[2], gx[2]], ends, [2, 3])):
                set_initializer(model, name, np.array(value, np.int64))
            new.append(helper.make_node("Slice", [spread, *names], [last], unique_name(taken, base + "/crop")))
        at = list(model.graph.node).index(node)
        for n in removed:
            model.graph.node.remove(n)
        for j, n in enumerate(new):
            model.graph.node.insert(at + j, n)
        done += 1
    return done
