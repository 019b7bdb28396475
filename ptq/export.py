"""Write the quantized model in QDQ format (QuantizeLinear / DequantizeLinear around FP32 ops).

- Weights are stored quantized (int8; INT4 where the opset is >= 21 and bits <= 4) behind a DequantizeLinear
  (per channel: ``axis`` = the output-channel axis); 8-bit MatMul / Gemm weights as uint8 + 128 where weight
  ranges marked them (a runtime whose u8 × s8 kernels saturate);
- asymmetric weight grids are written with zero point 0 where their integers allow: s · (q − z) is stored as the
  int8 q' = q − z with scale s (exact; always possible below 8 bits, where |q − z| ≤ 2^n − 1), since onnxruntime's
  fast integer kernels take only symmetric weights and run a weight zero point through a slow path; on a CPU whose
  u8 × s8 kernels saturate, only where every |q'| ≤ 64, so that pairs of products stay within int16;
- biases (the decided ones, ``state.biases``, else the reference's) are stored as int32 with scale s_in · s_w (per
  channel) and zero point 0, as integer kernels add them (where int32 cannot hold them, as with 16-bit grids, a
  float Add after the layer carries the bias);
- an activation of fewer bits than its storage type (e.g. 7-bit in uint8) gets a Clip of its integers to the
  n-bit range [q_min, q_max] between its QuantizeLinear and DequantizeLinear (QuantizeLinear alone saturates only
  at the type's bounds); clipping the integers equals quantizing the clipped float, since Q is monotone and maps
  the grid's ends to q_min / q_max, and it leaves the layer before it to onnxruntime's integer kernel
  (``saturate_low_bits = false`` leaves the Clip out: values beyond the range then use the wider type);
- a layer's fused Relu / Clip before an unsigned grid moves onto the integers too (``integer_activations``):
  Conv → QuantizeLinear → Clip(q, Q(lo), Q(hi)) → DequantizeLinear, one Clip with the saturation's bounds, none
  where [Q(lo), Q(hi)] covers the whole type (onnxruntime folds such an activation into the quantization itself,
  but not one narrower than the type, as a ReLU6 before a 7-bit grid in uint8 is);
- CLE's per-channel ReLU6 bound Min(Relu(x), b) is applied to the integers as well: Q(min(r, b_c)) =
  min(Q(r), Q(b_c)) for a monotone Q, so Relu → QuantizeLinear → Min(q, Q(b)) → DequantizeLinear computes the
  same as the float Min between two quantizers of the same grid (``bound_mins``), and leaves Conv + Relu + Q to
  onnxruntime's QLinearConv. Where every Q(b_c) is at the grid's top the Min is left out (the quantizer
  saturates there already); elsewhere its operand is tiled along W where W is known (``tiled_bound``).
  Where the target's onnxruntime has no integer Min / Clip (``Target.integer_min_clip``),
  and with ``export_qdq(integers=False)``, all three stay in float before the QuantizeLinear (a saturating Clip
  is then left out where the activation before it keeps every value inside the n-bit grid);
- each quantized activation tensor t gets Q → DQ right after its producer: the producer now writes
  ``t/fp``, and the DequantizeLinear writes t, so every reader (and a graph output of that name) sees the
  quantized value. A quantized graph input is read through its DQ instead.
This is the layout onnxruntime's QDQ transformers fuse into QLinearConv / QLinearMatMul / QGemm / QLinearAdd.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import PTQError
from .external import external_tensor
from .model import Graph, declared_dims, default_opset, remove_unused_initializers, unique_name
from .patterns import activation_bounds, clip_bounds, scalar_operand
from .quant import Encoding, encoding_from_range, int32_bias, quantize, zero_point_folded
from .stages.weight_ranges import uint8_layer
from .weights import layer_kind

MS_DOMAIN = "com.microsoft"
_INT_TYPES = {(8, True): (TensorProto.INT8, np.int8), (8, False): (TensorProto.UINT8, np.uint8),
              (16, True): (TensorProto.INT16, np.int16), (16, False): (TensorProto.UINT16, np.uint16),
              (4, True): (TensorProto.INT4, np.int8), (4, False): (TensorProto.UINT4, np.uint8),
              (32, True): (TensorProto.INT32, np.int32)}


def storage_bits(bits: int, opset: int) -> int:
    """The integer type an encoding of ``bits`` is stored in."""
    if bits <= 4 and opset >= 21:
        return 4
    return 8 if bits <= 8 else 16


def _int_tensor(name: str, values: np.ndarray, bits: int, signed: bool) -> onnx.TensorProto:
    proto_type, np_type = _INT_TYPES[(bits, signed)]
    values = np.asarray(values)
    if bits == 4:
        return helper.make_tensor(name, proto_type, values.shape, values.astype(np.int32).ravel().tolist())
    return numpy_helper.from_array(values.astype(np_type), name)


def export_qdq(state, integers: bool = True) -> onnx.ModelProto:
    """Build the QDQ model from the pipeline state (its FP32 model, layers, placement and encodings).
    ``integers`` False writes the saturating Clip and CLE's bound Min in float, around the quantizers (the same
    function: stages that read the float tensor a QuantizeLinear quantizes, ``quantizer_inputs``, need it)."""
    integers = integers and state.target.integer_min_clip
    model = onnx.ModelProto.FromString(state.model.SerializeToString())
    g = model.graph
    opset = default_opset(model)
    taken = {t.name for t in g.initializer} | {i.name for i in g.input} | {n.name for n in g.node}
    for n in g.node:
        taken.update(n.output)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    needs_ms = False
    layers = {l.name: l for l in state.layers}
    act_enc = {t: state.acts[r] for t, r in state.placement.root.items() if r in state.acts}
    ref = Graph(state.model)
    value_bounds = activation_bounds(state.layers, ref)  # what a fused Relu / Clip guarantees

    def qparams(base: str, enc: Encoding, zp_bits: int, zp_signed: bool):
        s_name = unique_name(taken, base + "/scale")
        z_name = unique_name(taken, base + "/zero_point")
        inits.append(numpy_helper.from_array(written_scale(base, enc), s_name))
        inits.append(_int_tensor(z_name, np.asarray(enc.zero_point), zp_bits, zp_signed))
        return s_name, z_name

    def int_const(base: str, values, enc: Encoding) -> str:
        name = unique_name(taken, base)
        inits.append(_int_tensor(name, np.asarray(values), storage_bits(enc.spec.bits, opset), enc.spec.signed))
        return name

    def qdq_act(t: str, src: str, out: str, bound: str | None = None, act: tuple | None = None):
        """Q(src) -> DQ -> out with t's encoding; between them, on the integers (``integers``), a Clip for the
        activation ``act`` = (lo, hi) moved there and for a grid narrower than its type, and the per-channel Min
        of CLE's ``bound`` (see the module docstring). Without ``integers``: the float saturating Clip before Q."""
        nonlocal needs_ms
        enc = act_enc[t]
        bits = storage_bits(enc.spec.bits, opset)
        domain = MS_DOMAIN if bits == 16 and opset < 21 else ""
        needs_ms |= domain == MS_DOMAIN
        s, z = qparams(t, enc, bits, enc.spec.signed)
        narrow = enc.spec.bits < bits and state.config.saturate_low_bits
        saturate = narrow and (act is not None or not _holds(enc, value_bounds.get(t)))
        if saturate and not integers:
            lo, hi = (np.float32(v) for v in (enc.lo, enc.hi))
            lo_name, hi_name = unique_name(taken, t + "/clip_lo"), unique_name(taken, t + "/clip_hi")
            inits.extend([numpy_helper.from_array(np.asarray(lo, np.float32), lo_name),
                          numpy_helper.from_array(np.asarray(hi, np.float32), hi_name)])
            clipped = unique_name(taken, t + "/saturated")
            nodes.append(helper.make_node("Clip", [src, lo_name, hi_name], [clipped],
                                          unique_name(taken, t + "/Saturate")))
            src = clipped
        q = unique_name(taken, t + "/q")
        nodes.append(helper.make_node("QuantizeLinear", [src, s, z], [q], unique_name(taken, t + "/Quantize"),
                                      domain=domain))
        if integers:
            t_lo, t_hi = type_range(bits, enc.spec.signed)
            lo_i, hi_i = (enc.spec.qmin, enc.spec.qmax) if saturate else (t_lo, t_hi)
            if act is not None:
                lo_i, hi_i = max(lo_i, grid_integer(act[0], enc, bits)), min(hi_i, grid_integer(act[1], enc, bits))
            if (lo_i, hi_i) != (t_lo, t_hi):
                clipped = unique_name(taken, t + "/q_clipped")
                nodes.append(helper.make_node("Clip", [q, int_const(t + "/q_lo", lo_i, enc),
                                                       int_const(t + "/q_hi", hi_i, enc)], [clipped],
                                              unique_name(taken, t + "/Saturate")))
                q = clipped
            if bound is not None:
                q_bound = grid_integer(ref.const(bound), enc, bits)
                if np.any(q_bound < hi_i):
                    q_bound = tiled_bound(q_bound, declared_dims(state.model, out))
                    bounded_q = unique_name(taken, t + "/q_bounded")
                    nodes.append(helper.make_node("Min", [q, int_const(bound + "/quantized", q_bound, enc)],
                                                  [bounded_q], unique_name(taken, t + "/Bound")))
                    q = bounded_q
        nodes.append(helper.make_node("DequantizeLinear", [q, s, z], [out],
                                      unique_name(taken, t + "/Dequantize"), domain=domain))

    def dq_const(base: str, q_values: np.ndarray, enc: Encoding, bits: int, signed: bool, axis,
                 shift: int = 0) -> str:
        """DequantizeLinear of constant integers; ``shift`` 128 stores a signed 8-bit grid as uint8 (q + 128, zero
        point z + 128): the same values."""
        nonlocal needs_ms
        domain = MS_DOMAIN if bits == 16 and opset < 21 else ""
        needs_ms |= domain == MS_DOMAIN
        if shift:
            q_values, signed = np.asarray(q_values, np.int32) + shift, False
        q_name = unique_name(taken, base + "/quantized")
        on_disk = external_tensor(model, q_name, np.asarray(q_values).astype(_INT_TYPES[(bits, signed)][1])) \
            if bits != 4 else None  # a model whose weights stay on disk: its integers go to a file as well
        inits.append(on_disk if on_disk is not None else _int_tensor(q_name, q_values, bits, signed))
        s_name = unique_name(taken, base + "/scale")
        z_name = unique_name(taken, base + "/zero_point")
        inits.append(numpy_helper.from_array(written_scale(base, enc), s_name))
        inits.append(_int_tensor(z_name, np.asarray(enc.zero_point) + shift, bits, signed))
        out = unique_name(taken, base + "/dequantized")
        kw = {"axis": axis} if axis is not None and np.asarray(enc.scale).ndim else {}
        nodes.append(helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [out],
                                      unique_name(taken, base + "/Dequantize"), domain=domain, **kw))
        return out

    def integer_operand(node, operand: str):
        """The Add / Mul's one-value constant on its exact grid (patterns.scalar_operand), of the output's type."""
        enc = act_enc[node.output[0]]
        c = ref.const(operand)
        c_enc = encoding_from_range(enc.spec.with_(axis=None), c.item(), c.item(), "exact")
        k = list(node.input).index(operand)
        node.input[k] = dq_const(node.name + "/operand", quantize(c, c_enc), c_enc,
                                 storage_bits(enc.spec.bits, opset), enc.spec.signed, None)

    graph_in_map = {}
    for t in [i.name for i in g.input]:
        if t in act_enc:
            graph_in_map[t] = unique_name(taken, t + "/dequantized")
            qdq_act(t, t, graph_in_map[t])
    bounded = bound_mins(state, ref) if integers else {}  # Relu output -> (the CLE Min's output, its bound)
    moved = integer_activations(state, ref) if integers else {}  # pre-activation -> (Relu / Clip, output, lo, hi)
    dropped = {o for o, _ in bounded.values()}
    moved_nodes = {v[0] for v in moved.values()}
    for node in g.node:
        if (node.op_type == "Min" and node.output[0] in dropped) or node.name in moved_nodes:
            continue
        operand = scalar_operand(ref, node) if node.output and node.output[0] in act_enc else None
        if operand is not None and all(i == operand or i in act_enc for i in node.input):
            integer_operand(node, operand)
        for k, name in enumerate(node.input):
            if name in graph_in_map:
                node.input[k] = graph_in_map[name]
        layer = layers.get(node.name)
        if layer is not None and layer.name in state.weights:
            wenc = state.weights[layer.name]
            w = ref.const(layer.weight)
            bits = storage_bits(wenc.spec.bits, opset)
            q_w = state.rounded.get(layer.name)
            q_w = quantize(w, wenc) if q_w is None else q_w
            shift = 128 if bits == 8 and wenc.spec.bits == 8 and wenc.spec.symmetric \
                and uint8_layer(state.config, state.target, layer_kind(ref, layer)) else 0
            if not wenc.spec.symmetric and bits == 8:  # the same values on a zero-point-0 grid: fast kernels
                folded = zero_point_folded(q_w, wenc, 64 if state.target.saturating_u8s8 else 127)
                q_w, wenc = folded if folded is not None else (q_w, wenc)
            node.input[1] = dq_const(layer.name + "/weight", q_w, wenc, bits, True, layer.w_axis, shift)
            x_enc = act_enc.get(layer.x)
            b = state.biases.get(layer.name)  # the decided bias (bias correction, AdaRound), else the reference's
            if b is None and layer.bias is not None:
                b = ref.const(layer.bias)
            while b is not None and len(node.input) < 3:
                node.input.append("")
            if b is not None and x_enc is not None:
                qb = int32_bias(b, wenc, x_enc)
                if qb is not None:
                    node.input[2] = dq_const(layer.name + "/bias", *qb, 32, True, 0)
                else:
                    node = _split_bias(node, layer, b, w.ndim, taken, inits, nodes)
            elif layer.name in state.biases:  # a float bias
                node.input[2] = unique_name(taken, layer.name + "/bias")
                inits.append(numpy_helper.from_array(np.asarray(b, np.float32), node.input[2]))
        renamed = []
        for k, t in enumerate(node.output):
            if t in act_enc:
                node.output[k] = unique_name(taken, t + "/fp")
                renamed.append((t, node.output[k]))
        nodes.append(node)
        for t, fp in renamed:
            qdq_act(t, fp, *bounded.get(t, (t, None)))
        for o in node.output:
            if o in moved:
                _, t, lo, hi = moved[o]
                qdq_act(t, o, *bounded.get(t, (t, None)), act=(lo, hi))
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(inits)
    remove_unused_initializers(model)
    if needs_ms and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return model


def tiled_bound(q_bound: np.ndarray, dims) -> np.ndarray:
    """CLE's per-channel bound [1, C, 1, 1] repeated along the last axis, [1, C, 1, W], where the bounded tensor's
    W is known: the same Min. onnxruntime's CPU runs that Min in NHWC, after QLinearConv, and broadcasts its
    operand one span at a time: C values for [1, 1, 1, C], W · C for [1, 1, W, C], which runs 2-7x faster
    (``bench/bound_min.py``) for C · W bytes more."""
    if q_bound.ndim != 4 or q_bound.shape[2:] != (1, 1) or not dims or len(dims) != 4 or not dims[3]:
        return q_bound
    return np.repeat(q_bound, dims[3], axis=3)


def _holds(enc: Encoding, bounds) -> bool:
    """Whether every value within ``bounds`` (lo, hi) quantizes inside the n-bit range: round(v / s) + z stays in
    [q_min, q_max] — then the storage type's wider saturation never comes into play and no Clip is needed."""
    if bounds is None or not all(np.isfinite(bounds)):
        return False
    s, z = float(np.float32(enc.scale)), int(enc.zero_point)
    return bounds[0] / s + z >= enc.spec.qmin - 0.5 and bounds[1] / s + z <= enc.spec.qmax + 0.5


def type_range(bits: int, signed: bool) -> tuple[int, int]:
    """The integers a ``bits``-wide storage type holds."""
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def grid_integer(v, enc: Encoding, bits: int):
    """QuantizeLinear of ``v`` (float32 division, half-to-even as onnxruntime) on a per-tensor grid, saturated at
    the storage type's bounds rather than the grid's (±inf go to those bounds): int, or an int array."""
    t_lo, t_hi = type_range(bits, enc.spec.signed)
    with np.errstate(over="ignore", invalid="ignore"):
        q = np.rint(np.asarray(v, np.float32) / np.float32(enc.scale)) + int(enc.zero_point)
    q = np.clip(np.nan_to_num(q, posinf=t_hi, neginf=t_lo), t_lo, t_hi).astype(np.int64)
    return int(q) if q.ndim == 0 else q


def integer_activations(state, gr: Graph) -> dict[str, tuple[str, str, float, float]]:
    """The layers' fused Relu / Clip whose output t is quantized and whose input (the layer's own output) is read
    by it alone and not quantized itself: {pre-activation: (activation node, t, lo, hi)}. The exporter quantizes
    the pre-activation with t's grid and clips the integers to [Q(lo), Q(hi)] instead: Q(clip(x, lo, hi)) =
    clip(Q(x), Q(lo), Q(hi)) for a monotone Q, so no float activation stands between the layer and its
    QuantizeLinear (onnxruntime folds a Relu / Clip into the quantization only where its bounds cover the whole
    storage type, not before a grid narrower than its type, e.g. 7-bit in uint8). Unsigned grids only: with int8
    activations onnxruntime's CPU convolution stays in float either way, and its float Relu is the cheaper op.
    ``gr``: the Graph of ``state.model``."""
    root = state.placement.root
    out = {}
    for l in state.layers:
        node = gr.nodes.get(l.act_node) if l.act_node else None
        if node is None or node.op_type not in ("Relu", "Clip") or node.input[0] != l.pre_act:
            continue
        t = node.output[0]
        if root.get(t) not in state.acts or state.acts[root[t]].spec.signed or l.pre_act in root \
                or len(gr.consumers[l.pre_act]) != 1 or l.pre_act in gr.outputs:
            continue
        out[l.pre_act] = (node.name, t, *clip_bounds(gr, node))
    return out


def bound_mins(state, gr: Graph) -> dict[str, tuple[str, str]]:
    """CLE's per-channel bounds Min(Relu(x), b) whose Relu output shares the Min output's quantizer and is read by
    the Min alone: {Relu output: (Min output, b)}. The exporter quantizes the Relu output with that grid and
    applies the Min to its integers (min(Q(r), Q(b)) = Q(min(r, b))), which leaves Conv + Relu + Q for
    onnxruntime to fuse into one QLinearConv. ``gr``: the Graph of ``state.model``."""
    root = state.placement.root
    out = {}
    for l in state.layers:
        r = root.get(l.out)
        if not l.bound or r not in state.acts or not gr.is_const(l.bound):
            continue
        mn = gr.producer.get(l.out)
        if mn is None or mn.op_type != "Min" or mn.input[1] != l.bound:
            continue
        relu_out = mn.input[0]
        if root.get(relu_out) == r and len(gr.consumers.get(relu_out, [])) == 1:
            out[relu_out] = (l.out, l.bound)
    return out


def written_scale(name: str, enc: Encoding) -> np.ndarray:
    """The scale as stored: float32, every value finite and normal (a bug otherwise: PTQError, exit 1, naming the
    tensor; subnormal ones are floored to the smallest normal float32, as range setting does for dead channels)."""
    s = np.asarray(enc.scale, np.float32)
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise PTQError(f"internal error: the scale of '{name}' is not a positive finite number ({s.ravel()[:4]})")
    return np.maximum(s, np.finfo(np.float32).tiny)


def _split_bias(node, layer, b, w_ndim, taken, inits, nodes):
    """A bias that int32 at s_in·s_w cannot hold (16-bit grids): the layer loses it and a float Add after it
    adds it back. (Left as a float bias input, onnxruntime would quantize it to int32 itself and overflow.)
    Appends the layer to ``nodes`` and returns the Add, which now produces the layer's output."""
    out = node.output[0]
    node.output[0] = unique_name(taken, out + "/without_bias")
    del node.input[2]
    name = unique_name(taken, layer.name + "/float_bias")
    shape = (-1,) + (1,) * (w_ndim - 2) if layer.op == "Conv" else (-1,)
    inits.append(numpy_helper.from_array(b.reshape(shape).astype(np.float32), name))
    nodes.append(node)
    return helper.make_node("Add", [node.output[0], name], [out], unique_name(taken, layer.name + "/BiasAdd"))


def quantizer_inputs(qmodel: onnx.ModelProto) -> dict[str, str]:
    """Activation tensor (as the FP32 model names it) -> the float tensor its QuantizeLinear reads in ``qmodel``:
    the value before quantization (and before its saturating Clip), where the quantized-so-far network feeds it.
    A tensor whose CLE bound is applied to the integers (``export_qdq(integers=True)``) maps to the Relu's
    output, before the bound: stages read ``export_qdq(state, integers=False)``."""
    producer = {o: n for n in qmodel.graph.node for o in n.output}
    graph_inputs = {i.name for i in qmodel.graph.input}
    out = {}
    for n in qmodel.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in producer:
            q = producer[n.input[0]]
            if q.op_type == "Clip" and "/Saturate" in q.name and q.input[0] in producer:  # on the integers
                q = producer[q.input[0]]
            if q.op_type == "QuantizeLinear":
                raw = q.input[0]
                sat = producer.get(raw)
                if sat is not None and sat.op_type == "Clip" and "/Saturate" in sat.name:
                    raw = sat.input[0]
                out[raw if raw in graph_inputs else n.output[0]] = raw
    return out
