"""Bring any supported ONNX model into the one shape the stages expect.

1. opset >= 13 (per-channel DequantizeLinear needs it): older models are converted with onnx's version converter;
2. Constant nodes become initializers, every node gets a unique name;
3. constant folding: every node whose inputs are all constant (and Shape of a statically shaped tensor) is
   evaluated once with onnxruntime and replaced by its value — this removes the Shape/ConstantOfShape/Slice/Pad
   chains that PyTorch exports for "same" padding;
4. a zero-constant Pad in front of a Conv is merged into the Conv's ``pads``; a ConvTranspose whose kernel is
   larger than its stride becomes Conv → DepthToSpace → Slice, which onnxruntime runs on integers (ptq.subpixel);
5. a per-channel Mul after a Conv / Gemm joins its weight and bias, a bias Add its bias, HardSwish decompositions
   become x · HardSigmoid(x), and a Mul by one value before layers moves into their weights (ptq.fuse);
6. a weight or bias initializer read by several Conv / Gemm / MatMul nodes gets a copy per node, so that a stage
   rescaling one layer (CLE, bias absorption) never changes another;
7. shape inference and a topological order.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper, shape_inference, version_converter

from .external import session_options
from .threads import ort_options
from .errors import InputError
from .fuse import fold_bias_adds, fold_scale_muls, fold_scales_forward, fuse_hardswish
from .subpixel import subpixel_conv_transposes
from .model import (Graph, attr, declared_dims, default_opset, remove_unused_initializers, set_attr, topological_sort,
                    unique_name)

QDQ_MIN_OPSET = 13
NON_FOLDABLE = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                "Bernoulli", "If", "Loop", "Scan", "QuantizeLinear", "DequantizeLinear"}


def canonicalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a canonical copy of ``model`` (the input is not modified); its FP32 outputs are unchanged."""
    model = _upgrade_opset(model)
    model = onnx.ModelProto.FromString(model.SerializeToString()) if model.graph.node else model
    _constants_to_initializers(model)
    _name_nodes(model)
    model = _infer_shapes(model)
    fold_constants(model)
    merge_pads_into_conv(model)
    subpixel_conv_transposes(model)
    fold_scale_muls(model)
    fold_bias_adds(model)
    fuse_hardswish(model)
    fold_scales_forward(model)
    unshare_initializers(model)
    remove_unused_initializers(model)
    topological_sort(model)
    return _infer_shapes(model)


def _upgrade_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    if default_opset(model) >= QDQ_MIN_OPSET:
        return model
    try:
        return version_converter.convert_version(model, QDQ_MIN_OPSET)
    except Exception as e:
        raise InputError(f"cannot convert the model from opset {default_opset(model)} to {QDQ_MIN_OPSET} "
                         f"(needed for per-channel quantization): {str(e).splitlines()[0][:200]}") from None


def _infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        return model  # shapes are a help, not a requirement


def _constants_to_initializers(model: onnx.ModelProto) -> None:
    g = model.graph
    keep = []
    for node in g.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1:
            a = node.attribute[0]
            if a.name == "value":
                value = numpy_helper.to_array(a.t)
            elif a.name in ("value_float", "value_int"):
                value = np.array(helper.get_attribute_value(a),
                                 np.float32 if a.name == "value_float" else np.int64)
            elif a.name in ("value_floats", "value_ints"):
                value = np.array(helper.get_attribute_value(a),
                                 np.float32 if a.name == "value_floats" else np.int64)
            else:  # sparse / string constants stay nodes
                keep.append(node)
                continue
            g.initializer.append(numpy_helper.from_array(value, node.output[0]))
        else:
            keep.append(node)
    del g.node[:]
    g.node.extend(keep)


def _name_nodes(model: onnx.ModelProto) -> None:
    taken = set()
    for node in model.graph.node:
        base = node.name or f"{node.op_type}_{node.output[0]}"
        node.name = unique_name(taken, base)


def _static_shape(model: onnx.ModelProto, name: str):
    dims = declared_dims(model, name)
    return None if dims is None or None in dims else dims


def fold_constants(model: onnx.ModelProto) -> int:
    """Evaluate every node computable from constants alone, in one onnxruntime run; returns how many."""
    g = model.graph
    const = {t.name for t in g.initializer}
    graph_outputs = {o.name for o in g.output}
    folded, shape_consts = [], {}
    for node in g.node:
        if node.domain not in ("", "ai.onnx") or node.op_type in NON_FOLDABLE or any(
                a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            continue
        if any(o in graph_outputs for o in node.output):
            continue
        if node.op_type == "Shape" and node.input[0] not in const:
            shape = _static_shape(model, node.input[0])
            if shape is None:
                continue
            start, end = attr(node, "start", 0), attr(node, "end", None)
            shape_consts[node.output[0]] = np.array(shape[start:end], np.int64)
            const.add(node.output[0])
            folded.append(node)
            continue
        if all(i == "" or i in const for i in node.input):
            folded.append(node)
            const.update(o for o in node.output if o)
    if not folded:
        return 0
    folded_ids = {id(n) for n in folded}
    rest = [n for n in g.node if id(n) not in folded_ids]
    needed = set()
    for n in rest:
        needed.update(n.input)
    produced = [o for n in folded for o in n.output if o and o in needed and o not in shape_consts]
    values = dict(shape_consts)
    if produced:
        sub_nodes = [n for n in folded if n.op_type != "Shape" or n.output[0] not in shape_consts]
        sub_inits = list(g.initializer) + [numpy_helper.from_array(v, k) for k, v in shape_consts.items()]
        sub = helper.make_graph(sub_nodes, "fold", [], [helper.make_empty_tensor_value_info(o) for o in produced],
                                initializer=sub_inits)
        sub_model = helper.make_model(sub, opset_imports=model.opset_import, ir_version=model.ir_version)
        opts = ort_options()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session_options(model, opts)
        try:
            sess = ort.InferenceSession(sub_model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            for name, v in zip(produced, sess.run(produced, {})):
                values[name] = v
        except Exception as e:
            raise InputError(f"constant folding failed: {str(e).splitlines()[0][:200]}") from None
    for name, v in values.items():
        if name in needed:
            g.initializer.append(numpy_helper.from_array(np.asarray(v), name))
    del g.node[:]
    g.node.extend(rest)
    return len(folded)


LAYER_OPS = {"Conv", "Gemm", "MatMul", "ConvTranspose"}


def unshare_initializers(model: onnx.ModelProto) -> int:
    """Give each layer its own copy of a weight / bias initializer that other nodes read too. Returns the number
    of copies made."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    readers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    taken = set(inits) | {o for n in g.node for o in n.output} | {i.name for i in g.input}
    copies = 0
    for n in g.node:
        if n.op_type not in LAYER_OPS or n.domain not in ("", "ai.onnx"):
            continue
        for k in (1, 2):
            name = n.input[k] if len(n.input) > k else ""
            if name in inits and readers[name] > 1:
                new = unique_name(taken, f"{name}/{n.name or n.op_type}")
                t = onnx.TensorProto()
                t.CopyFrom(inits[name])
                t.name = new
                g.initializer.append(t)
                n.input[k] = new
                readers[name] -= 1
                copies += 1
    return copies


def merge_pads_into_conv(model: onnx.ModelProto) -> int:
    """Pad(mode=constant, value 0, spatial pads >= 0) read only by Convs becomes part of the Convs' pads."""
    gr = Graph(model)
    removed = []
    for node in list(model.graph.node):
        if node.op_type != "Pad" or (attr(node, "mode", b"constant") not in (b"constant", "constant")):
            continue
        pads = gr.const(node.input[1]) if len(node.input) > 1 else None
        if pads is None:
            continue
        if len(node.input) > 2 and node.input[2]:
            value = gr.const(node.input[2])
            if value is None or np.any(value != 0):
                continue
        cons = gr.consumers.get(node.output[0], [])
        if not cons or node.output[0] in gr.outputs or any(
                c.op_type != "Conv" or c.input[0] != node.output[0] or attr(c, "auto_pad", b"NOTSET")
                not in (b"NOTSET", "NOTSET") for c in cons):
            continue
        pads = pads.astype(np.int64).tolist()
        rank = len(pads) // 2
        if len(node.input) > 3 and node.input[3]:
            axes = gr.const(node.input[3])
            if axes is None:
                continue
            conv_rank = _conv_rank(model, cons[0])
            if conv_rank is None:
                continue
            full = [0] * (2 * conv_rank)
            for k, ax in enumerate(axes.tolist()):
                ax = ax % conv_rank
                full[ax], full[conv_rank + ax] = pads[k], pads[rank + k]
            pads, rank = full, conv_rank
        if any(p < 0 for p in pads) or any(pads[i] or pads[rank + i] for i in (0, 1)):
            continue
        spatial = rank - 2
        for c in cons:
            old = list(attr(c, "pads", [0] * (2 * spatial)))
            new = [old[i] + pads[2 + i] for i in range(spatial)] + [old[spatial + i] + pads[rank + 2 + i]
                                                                     for i in range(spatial)]
            set_attr(c, "pads", new)
            c.input[0] = node.input[0]
        removed.append(node)
    for n in removed:
        model.graph.node.remove(n)
    return len(removed)


def _conv_rank(model, conv):
    w = Graph(model).const(conv.input[1])
    return None if w is None else w.ndim
