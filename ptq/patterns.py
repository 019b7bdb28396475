"""Find the structures the stages work on: quantizable layers and where activation quantizers go.

Activation quantizers are placed as int8 runtimes execute (white paper §2.3): an activation function
(Relu, Clip) is fused into the layer before it, so the quantizer sits after the activation; the data input of
every quantized layer is quantized; Add, Concat, average pools and Sigmoid, and a Mul of two computed tensors
(SiLU's x · σ(x), a squeeze-excitation gate), get output quantizers (and quantized inputs) where an integer kernel
reads their output — onnxruntime then runs them as QLinearAdd / QLinearConcat / QLinearSigmoid / QLinearMul;
MaxPool, Split and pure data-movement ops share their input's quantizer (same scale and zero point), which is what
lets onnxruntime run them on integers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .model import Graph, attr

FUSABLE_ACTIVATIONS = {"Relu", "Clip"}
QUANTIZED_OUTPUT_OPS = {"Add", "Concat", "AveragePool", "GlobalAveragePool", "Sigmoid"}
SHARED_QUANTIZER_OPS = {"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Split",
                        "DepthToSpace", "SpaceToDepth", "Slice"}
INTEGER_PRODUCERS = {"Conv", "Gemm", "MatMul", "Relu", "Clip"} | QUANTIZED_OUTPUT_OPS | SHARED_QUANTIZER_OPS
FLOAT = onnx.TensorProto.FLOAT


@dataclass
class Layer:
    """A layer with a constant weight. ``w_axis`` is the weight's output-channel axis (per-channel quantization);
    ``x`` its data input, ``out`` the tensor after its fused activation (``act``, or None)."""

    name: str
    op: str
    x: str
    weight: str
    bias: str | None
    w_axis: int
    pre_act: str  # the layer's own output, before the fused activation
    out: str
    act: str | None = None
    act_node: str | None = None
    bound: str | None = None  # initializer of the per-channel upper bound CLE put after the activation (Min)


def find_layers(model: onnx.ModelProto) -> list[Layer]:
    """Conv (any group), Gemm and MatMul whose weight is an initializer, in topological order."""
    gr = Graph(model)
    layers = []
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        w_axis = None
        if node.op_type == "Conv" and len(node.input) > 1 and gr.is_const(node.input[1]) \
                and not gr.is_const(node.input[0]):
            w_axis = 0
        elif node.op_type == "Gemm" and gr.is_const(node.input[1]) and not attr(node, "transA", 0) \
                and not gr.is_const(node.input[0]) and attr(node, "alpha", 1.0) == 1.0:
            w_axis = 0 if attr(node, "transB", 0) else 1
            if len(node.input) > 2 and node.input[2]:
                c = gr.const(node.input[2])
                if c is None or c.ndim != 1 or attr(node, "beta", 1.0) != 1.0:
                    continue
        elif node.op_type == "MatMul" and gr.is_const(node.input[1]) and not gr.is_const(node.input[0]):
            if gr.const(node.input[1]).ndim != 2:
                continue
            w_axis = 1
        if w_axis is None or gr.const(node.input[1]).dtype.kind != "f":
            continue
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        out, act, act_node = node.output[0], None, None
        nxt = gr.only_consumer(out)
        if nxt is not None and nxt.op_type in FUSABLE_ACTIVATIONS and _const_clip(gr, nxt):
            out, act, act_node = nxt.output[0], nxt.op_type, nxt.name
        layers.append(Layer(node.name, node.op_type, node.input[0], node.input[1], bias, w_axis, node.output[0],
                            out, act, act_node))
    return layers


def _const_clip(gr: Graph, node) -> bool:
    if node.op_type != "Clip":
        return True
    return all(gr.is_const(i) for i in node.input[1:] if i)


def clip_bounds(model_graph: Graph, node) -> tuple[float, float]:
    """The (min, max) of a Relu / Clip node (inf where unbounded)."""
    if node.op_type == "Relu":
        return 0.0, float("inf")
    lo = model_graph.const(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    hi = model_graph.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    lo = float(lo) if lo is not None else float(attr(node, "min", -float("inf")))
    hi = float(hi) if hi is not None else float(attr(node, "max", float("inf")))
    return lo, hi


def activation_bounds(layers, gr: Graph) -> dict[str, tuple[float, float]]:
    """The (min, max) of each layer's fused activation, by the layer's output tensor."""
    return {l.out: clip_bounds(gr, gr.nodes[l.act_node]) for l in layers if l.act_node}


@dataclass
class Placement:
    """Which float tensors get an activation quantizer. ``root[t]`` is the tensor whose quantizer t shares
    (itself for an independent quantizer); observers run on the roots only."""

    root: dict[str, str]
    fp32_ops: list[str]  # op types left in floating point (for the report)

    @property
    def roots(self) -> list[str]:
        return list(dict.fromkeys(self.root.values()))


def float_activation(gr: Graph, tensor: str) -> str | None:
    """The elementwise float activation that alone reads ``tensor`` ("silu" for x · Sigmoid(x), "hardswish",
    "sigmoid", "hardsigmoid", "tanh"), or None."""
    cons = gr.consumers.get(tensor, [])
    if tensor in gr.outputs or not cons:
        return None
    ops = sorted(c.op_type for c in cons)
    if ops in (["Mul", "Sigmoid"], ["HardSigmoid", "Mul"]):  # x · σ(x): SiLU, or HardSwish as ptq.fuse writes it
        gate = next(c for c in cons if c.op_type != "Mul")
        mul = next(c for c in cons if c.op_type == "Mul")
        if set(mul.input) != {tensor, gate.output[0]}:
            return None
        if gate.op_type == "Sigmoid":
            return "silu"
        return "hardswish" if _standard_hardsigmoid(gate) else None
    if len(cons) == 1 and cons[0].op_type in ("HardSwish", "Sigmoid", "Tanh"):
        return cons[0].op_type.lower()
    if len(cons) == 1 and cons[0].op_type == "HardSigmoid" and _standard_hardsigmoid(cons[0]):
        return "hardsigmoid"
    return None


def _standard_hardsigmoid(node) -> bool:
    """α = 1/6, β = 0.5: clip(x/6 + 0.5, 0, 1), the gate of HardSwish."""
    return bool(np.isclose(attr(node, "alpha", 0.2), 1 / 6) and np.isclose(attr(node, "beta", 0.5), 0.5))


DATA_MOVEMENT = {"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Concat", "DepthToSpace",
                 "SpaceToDepth", "Slice"}


def head_outputs(model: onnx.ModelProto, layers: list[Layer]) -> list[str]:
    """Outputs of the layers whose output reaches a graph output through data movement alone (a detector's last
    convolutions, a classifier's logits)."""
    gr = Graph(model)
    reach = set(gr.outputs)
    for node in reversed(list(model.graph.node)):
        if node.op_type in DATA_MOVEMENT and any(o in reach for o in node.output):
            reach.update(i for i in node.input if i and not gr.is_const(i))
    return [l.out for l in layers if l.out in reach]


def head_layers(model: onnx.ModelProto, layers: list[Layer]) -> list[Layer]:
    """The layers whose output is one of ``head_outputs`` (a classifier's last layer)."""
    heads = set(head_outputs(model, layers))
    return [l for l in layers if l.out in heads]


def input_layers(model: onnx.ModelProto, layers: list[Layer]) -> list[str]:
    """Names of the layers whose data input comes from a graph input through data movement alone (a network's
    first convolution)."""
    reach = {i.name for i in model.graph.input}
    for node in model.graph.node:
        if node.op_type in DATA_MOVEMENT and any(i in reach for i in node.input):
            reach.update(o for o in node.output if o)
    return [l.name for l in layers if l.x in reach]


def end_layers(model: onnx.ModelProto, layers: list[Layer]) -> set[str]:
    """Names of the layers at the network's ends: its first layers (``input_layers``) and its head layers
    (``head_layers``)."""
    return set(input_layers(model, layers)) | {l.name for l in head_layers(model, layers)}


def integer_inputs(model: onnx.ModelProto, layers: list[Layer]) -> set[str]:
    """Tensors that an integer kernel reads: every layer's data input, and — walking back — the inputs of an Add,
    Concat or pool (or of a data-movement op) whose output an integer kernel reads. An Add whose output only
    float ops read (a transformer's residual stream before LayerNorm, a bias Add before a float activation)
    gains nothing from integers: quantizing it would only add error and Q/DQ work."""
    gr = Graph(model)
    by_node = {l.name: l for l in layers}
    out: set[str] = set()
    for node in reversed(list(model.graph.node)):
        if node.name in by_node:
            out.add(by_node[node.name].x)
        elif any(o in out for o in node.output):
            if _integer_op(gr, node):
                out.update(i for i in node.input if i and not gr.is_const(i))
            elif shares_quantizer(node) and node.input:
                out.add(node.input[0])
    return out


def shares_quantizer(node) -> bool:
    """Whether ``node``'s output takes its data input's quantizer: an op that moves or selects values
    (SHARED_QUANTIZER_OPS), or a nearest-neighbour Resize (its outputs are some of its inputs). onnxruntime then
    drops the DequantizeLinear / QuantizeLinear pair around it and runs it on the integers (a linear or cubic
    Resize it runs in float whatever the grids)."""
    return node.op_type in SHARED_QUANTIZER_OPS or (node.op_type == "Resize"
                                                    and attr(node, "mode", b"nearest") in (b"nearest", "nearest"))


def _integer_op(gr: Graph, node) -> bool:
    """An op that onnxruntime runs on integers when its inputs and output are quantized: Concat, the average pools,
    Sigmoid, an Add, and a Mul of tensors that integer kernels make (QLinearAdd / QLinearMul). A constant operand
    of an Add or Mul must be one value (the exporter writes it exactly on a grid of its own, ``scalar_operand``); a
    Mul reading a float op (HardSigmoid's gate) stays float: its operand would need a Q of its own, which costs
    more than the float Mul saves (measured on PP-OCR's classifier)."""
    if node.op_type in ("Add", "Mul"):
        scalar = scalar_operand(gr, node)
        if len(node.input) != 2 or all(gr.is_const(i) for i in node.input):
            return False
        if any(gr.is_const(i) and i != scalar for i in node.input):
            return False
        return node.op_type == "Add" or all(
            gr.is_const(i) or i not in gr.producer or gr.producer[i].op_type in INTEGER_PRODUCERS
            for i in node.input)
    return node.op_type in QUANTIZED_OUTPUT_OPS


def scalar_operand(gr: Graph, node) -> str | None:
    """The constant one-value float operand of an Add / Mul (an affine block's a or b, HardSwish's + 3), or None.
    One value c is exact on a grid of its own — c = s·(q − z) with q and z at opposite ends of the integer range —
    so the integer kernel computes what the float op computes."""
    if node.op_type not in ("Add", "Mul") or len(node.input) != 2:
        return None
    for i in node.input:
        t = gr.inits.get(i)  # size and type from the proto: a large (or on-disk) constant is not read
        if t is not None and t.data_type == FLOAT and int(np.prod(t.dims)) == 1 and np.isfinite(gr.const(i)).all():
            return i
    return None


def place_activation_quantizers(model: onnx.ModelProto, layers: list[Layer]) -> Placement:
    """Activation quantizers where an integer kernel reads them (``integer_inputs``) and after every Conv / Gemm
    (onnxruntime fuses those into QLinearConv / QGemm only with a quantized output); a MatMul's output only where
    an integer kernel reads it (else onnxruntime runs it as MatMulIntegerToFloat)."""
    not_float = _non_float_tensors(model)
    reads = integer_inputs(model, layers)
    wanted: set[str] = set(reads)
    for layer in layers:
        if layer.op != "MatMul" or layer.out in reads:
            wanted.add(layer.out)
    layer_nodes = {l.name for l in layers} | {l.act_node for l in layers if l.act_node}
    gr = Graph(model)
    for node in model.graph.node:
        if _integer_op(gr, node) and node.output[0] in reads:
            wanted.add(node.output[0])
    root: dict[str, str] = {}
    for node in model.graph.node:  # topological: a shared quantizer's input is decided before its output
        for t in node.input:
            if t in wanted and t not in root:
                root[t] = t
        if shares_quantizer(node) and node.input and node.input[0] in root:
            for o in node.output:
                root[o] = root[node.input[0]]
        for t in node.output:
            if t in wanted and t not in root:
                root[t] = t
    root = {t: r for t, r in root.items() if t not in not_float and r not in not_float}
    fp32_ops = sorted({n.op_type for n in model.graph.node
                       if n.name not in layer_nodes and not _integer_op(gr, n)
                       and not shares_quantizer(n)})
    return Placement(root, fp32_ops)


def _non_float_tensors(model: onnx.ModelProto) -> set[str]:
    """Names known (from the inputs, outputs and inferred value_info) not to be float32 tensors."""
    names = {t.name for t in model.graph.initializer}
    for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type not in (0, FLOAT):
            names.add(vi.name)
    return names


SCORE_TAILS = {"Softmax", "LogSoftmax", "Sigmoid", "Flatten", "Reshape", "Identity", "Squeeze"}
POOLS = {"GlobalAveragePool", "ReduceMean"}  # a pooled Conv's scores (a 1×1-convolution classifier)


def class_score_outputs(model: onnx.ModelProto) -> list[str]:
    """Graph outputs that are class scores: made by a Gemm / MatMul, or a Conv followed by a global pooling (a
    1×1-convolution classifier), through Softmax, LogSoftmax, Sigmoid, a reshape, or an Add / Mul / Div by a
    constant (a bias, a temperature), of rank 2 where the rank is known.
    Top-1 agreement means something for these only (not for an embedding, a box regression or a feature map)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    consts = {t.name for t in model.graph.initializer} | {n.output[0] for n in model.graph.node
                                                          if n.op_type == "Constant"}

    def upstream(node):
        if node.op_type in SCORE_TAILS or node.op_type in POOLS:
            return producer.get(node.input[0])
        if node.op_type in ("Add", "Mul", "Div") and len(node.input) == 2 and node.input[1] in consts:
            return producer.get(node.input[0])
        if node.op_type in ("Add", "Mul") and len(node.input) == 2 and node.input[0] in consts:
            return producer.get(node.input[1])
        return None

    out = []
    for o in model.graph.output:
        dims = o.type.tensor_type.shape.dim if o.type.tensor_type.HasField("shape") else None
        if dims is not None and len(dims) != 2:
            continue
        node, pooled = producer.get(o.name), False
        for _ in range(16):  # a bounded walk up the tail
            if node is None or node.op_type in ("Gemm", "MatMul", "Conv"):
                break
            pooled = pooled or node.op_type in POOLS
            node = upstream(node)
        if node is not None and (node.op_type in ("Gemm", "MatMul") or (node.op_type == "Conv" and pooled)):
            out.append(o.name)
    return out
