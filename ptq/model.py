"""ONNX graph wrapper: load (external data), initializers as numpy, producers / consumers, topological order.
(Writing is ptq.outputs'.)"""
from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import external
from .errors import InputError, first_line

MIN_OPSET, MAX_OPSET = 7, 21  # opsets under 13 are converted to 13 (ptq.opset)


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load and check an ONNX model. External data beside the file is loaded, unless it is over
    ``external.LARGE_BYTES``: then the weights stay on disk and are read by parts (ptq.external). Raises InputError
    with one line."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    try:
        model = onnx.load(str(path), load_external_data=False)
        on_disk = external.external_bytes(model) > external.LARGE_BYTES
        if on_disk:
            external.keep_on_disk(model, str(path.parent))
        elif external.external_bytes(model):
            onnx.load_external_data_for_model(model, str(path.parent))
    except PermissionError:
        raise InputError(f"{path}: cannot read (permission denied)") from None
    except Exception as e:  # protobuf decode errors, missing external data
        raise InputError(f"{path}: not a valid ONNX model ({first_line(e)})") from None
    if not model.graph.node:
        raise InputError(f"{path}: not a valid ONNX model (the graph has no nodes)")
    opset = default_opset(model)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise InputError(f"{path}: opset {opset} is not supported (ptq reads opsets {MIN_OPSET}-{MAX_OPSET}, and "
                         f"converts those under 13 to 13); re-export the model at opset 13 or later")
    try:
        onnx.checker.check_model(str(path))  # from the file: serializing the loaded model again costs more
    except Exception as e:
        raise InputError(f"{path}: invalid ONNX model ({first_line(e)})") from None
    return model


def default_opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 1


class Graph:
    """A read-mostly view of a ModelProto's main graph: initializers as numpy, producers, consumers, order.

    Rebuild it (``Graph(model)``) after editing the model; it holds no state of its own beyond indices.
    """

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        g = model.graph
        self.inits = {t.name: t for t in g.initializer}
        self.producer = {}
        self.consumers = defaultdict(list)
        for node in g.node:
            for o in node.output:
                if o:
                    self.producer[o] = node
            for i in node.input:
                if i:
                    self.consumers[i].append(node)
        self.inputs = [i.name for i in g.input if i.name not in self.inits]
        self.outputs = [o.name for o in g.output]
        self.nodes = {n.name: n for n in g.node}

    def const(self, name: str) -> np.ndarray | None:
        """The value of an initializer, or None if ``name`` is not a constant."""
        t = self.inits.get(name)
        if t is None:
            return None
        if external.is_external(t):
            return external.read(t, external.folder(self.model))
        return numpy_helper.to_array(t)

    def is_const(self, name: str) -> bool:
        return name in self.inits

    def only_consumer(self, name: str):
        """The single node reading ``name``, or None when there are several, none, or it is a graph output."""
        cons = self.consumers.get(name, [])
        if len(cons) != 1 or name in self.outputs:
            return None
        return cons[0]


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))


def set_initializer(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    """Add or replace an initializer (in a file of the working folder, for a large value of a model whose
    weights stay on disk: ptq.external)."""
    t = external.external_tensor(model, name, value)
    t = numpy_helper.from_array(np.asarray(value), name) if t is None else t
    for i, old in enumerate(model.graph.initializer):
        if old.name == name:
            model.graph.initializer[i].CopyFrom(t)
            return
    model.graph.initializer.append(t)


def set_layer_bias(model: onnx.ModelProto, node_name: str, value: np.ndarray) -> str:
    """Make node ``node_name`` (a Conv / Gemm) add ``value`` as its bias: its own bias initializer is replaced
    where no other node reads it, else (or where it has none) a new initializer becomes its third input."""
    node = next(n for n in model.graph.node if n.name == node_name)
    current = node.input[2] if len(node.input) > 2 and node.input[2] else None
    readers = sum(current in n.input for n in model.graph.node) if current else 0
    if current is None or readers > 1 or current not in {t.name for t in model.graph.initializer}:
        taken = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
        current = unique_name(taken, node_name + "/bias")
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = current
    set_initializer(model, current, np.asarray(value, np.float32))
    return current


def topological_sort(model: onnx.ModelProto) -> None:
    """Reorder the main graph's nodes so that every tensor is produced before it is read (Kahn's algorithm,
    stable in the original order)."""
    g = model.graph
    known = {t.name for t in g.initializer} | {i.name for i in g.input} | {""}
    nodes = list(g.node)
    deps = []
    produced_by = {}
    for idx, n in enumerate(nodes):
        for o in n.output:
            produced_by[o] = idx
    for n in nodes:
        d = {produced_by[i] for i in _all_inputs(n) if i not in known and i in produced_by}
        deps.append(d)
    users = defaultdict(list)
    for idx, d in enumerate(deps):
        for j in d:
            users[j].append(idx)
    remaining = [len(d) for d in deps]
    import heapq
    ready = [i for i, r in enumerate(remaining) if r == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            remaining[u] -= 1
            if remaining[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise InputError("the graph has a cycle")
    del g.node[:]
    g.node.extend(nodes[i] for i in order)


def _all_inputs(node: onnx.NodeProto):
    """Inputs of a node including the outer-scope names its subgraphs read."""
    yield from node.input
    for a in node.attribute:
        for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            inner = {t.name for t in sub.initializer} | {i.name for i in sub.input}
            for n in sub.node:
                inner.update(n.output)
            for n in sub.node:
                for i in _all_inputs(n):
                    if i not in inner:
                        yield i


def used_names(model: onnx.ModelProto) -> set[str]:
    """Every tensor name read by some node (subgraphs included) or exposed as a graph output."""
    names = {o.name for o in model.graph.output}
    for n in model.graph.node:
        names.update(_all_inputs(n))
    return names


def remove_unused_initializers(model: onnx.ModelProto) -> None:
    used = used_names(model)
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def declared_dims(model: onnx.ModelProto, name: str) -> list[int | None] | None:
    """The shape ``model`` declares for tensor ``name`` (its inputs, outputs and inferred value_info): one entry per
    axis, None for a dynamic one; None where no shape is declared."""
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if vi.name == name and vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                    for d in vi.type.tensor_type.shape.dim]
    return None


def unique_name(taken: set[str], base: str) -> str:
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def truncate(model: onnx.ModelProto, outputs, inputs: dict | None = None) -> onnx.ModelProto:
    """A copy of ``model`` computing only ``outputs`` (tensor names): the nodes they depend on, nothing after.
    ``inputs`` (tensor name -> numpy dtype): start from these tensors instead of the graph's inputs (a segment
    of the network; nothing that computes them is kept)."""
    out = onnx.ModelProto.FromString(model.SerializeToString())
    g = out.graph
    nodes = list(g.node)
    producer = {o: k for k, n in enumerate(nodes) for o in n.output}
    seen, keep, stack = set(inputs or ()), set(), list(outputs)
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        k = producer.get(t)
        if k is not None and k not in keep:
            keep.add(k)
            stack.extend(i for i in _all_inputs(nodes[k]) if i)
    kept = [n for k, n in enumerate(nodes) if k in keep]
    del g.node[:]
    g.node.extend(kept)
    del g.output[:]
    g.output.extend(helper.make_empty_tensor_value_info(t) for t in dict.fromkeys(outputs))
    if inputs is not None:
        del g.input[:]
        g.input.extend(helper.make_tensor_value_info(t, helper.np_dtype_to_tensor_dtype(np.dtype(d)), None)
                       for t, d in inputs.items())
    remove_unused_initializers(out)
    return out


def live_tensors(model: onnx.ModelProto, index: int) -> list[str]:
    """The tensors computed before node ``index`` (graph inputs included, initializers not) that node ``index``
    or a later one reads, or that are graph outputs: all a run needs to go on from there."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    nodes = list(g.node)
    before = [i.name for i in g.input if i.name not in inits] + [o for n in nodes[:index] for o in n.output if o]
    needed = {o.name for o in g.output} | {i for n in nodes[index:] for i in _all_inputs(n) if i}
    return [t for t in dict.fromkeys(before) if t in needed]
