"""Blocks of a network for block reconstruction: runs of consecutive nodes between single-tensor cuts.

A cut after node i is a point of the topological order where exactly one computed tensor is live (produced at
or before i, read after i or a graph output): everything downstream depends on the network before it through
that tensor alone. Between two cuts lies a residual block (its skip keeps two tensors live inside it) or a
single layer of a plain chain. BRECQ (Li et al. 2021, §3.2) reconstructs residual blocks; consecutive segments
are merged here until a block holds up to ``max_layers`` quantized layers, so that a plain chain's layers
(an inverted bottleneck without a skip) are reconstructed together too.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx


@dataclass
class Block:
    nodes: list[int]  # indices into the (topologically sorted) graph's nodes, in order
    layers: list  # the quantized layers (ptq.patterns.Layer) whose node lies inside
    inputs: list[str]  # computed tensors (graph inputs included) read inside and produced before it
    outputs: list[str]  # tensors written inside and read after it, or graph outputs
    shape_of: list[str]  # tensors from before it whose shape alone its Shape nodes read


def _reads(node) -> list[str]:
    return [i for i in node.input if i]


def shape_nodes(model: onnx.ModelProto) -> set[int]:
    """Nodes that compute shapes: Shape, and nodes whose every computed input is a shape (Gather, Unsqueeze,
    Concat … of a Shape's output). Their values do not carry data from one block to the next: each block that
    needs one computes it again (see ``find_blocks``)."""
    inits = {t.name for t in model.graph.initializer}
    shapes, out = set(), set()
    for k, n in enumerate(model.graph.node):
        data = [i for i in _reads(n) if i not in inits]
        if n.op_type == "Shape" or (data and all(i in shapes for i in data)):
            out.add(k)
            shapes.update(o for o in n.output if o)
    return out


def cut_points(model: onnx.ModelProto) -> list[int]:
    """Indices i (into graph.node, topologically sorted) such that exactly one computed tensor is live after
    node i, shape values aside: the block boundaries."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    nodes = list(g.node)
    skip = shape_nodes(model)
    last = {o.name: len(nodes) for o in g.output}  # graph outputs stay live to the end
    for k, n in enumerate(nodes):
        if k in skip:
            continue
        for i in _reads(n):
            if i not in inits:
                last[i] = max(last.get(i, -1), k)
    live = {i.name for i in g.input if i.name not in inits and last.get(i.name, -1) >= 0}
    cuts = []
    for k, n in enumerate(nodes):
        if k not in skip:
            live |= {o for o in n.output if o and last.get(o, -1) > k}
        live = {t for t in live if last.get(t, -1) > k}
        if len(live) == 1 and k + 1 < len(nodes):
            cuts.append(k)
    return cuts


def find_blocks(model: onnx.ModelProto, layers, max_layers: int = 4) -> list[Block]:
    """The model's blocks (see module docstring), each holding at least one of ``layers``; segments without a
    layer join the block before them (or the first block). A block's nodes include the shape computations (see
    ``shape_nodes``) its other nodes read, wherever they are in the graph."""
    g = model.graph
    nodes = list(g.node)
    skip = shape_nodes(model)
    producer = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    at = {n.name: k for k, n in enumerate(nodes)}
    by_node = {}
    for l in layers:
        by_node.setdefault(at[l.name], []).append(l)
    bounds = [0] + [c + 1 for c in cut_points(model)] + [len(nodes)]
    segments = [(a, b, [l for k in range(a, b) for l in by_node.get(k, [])]) for a, b in zip(bounds, bounds[1:])]
    spans: list[list] = []
    for a, b, ls in segments:
        if spans and (not ls or not spans[-1][2] or len(spans[-1][2]) + len(ls) <= max_layers):
            spans[-1][1], spans[-1][2] = b, spans[-1][2] + ls
        else:
            spans.append([a, b, ls])
    if len(spans) > 1 and not spans[0][2]:  # leading segments without a layer join the first block with one
        spans[1][0] = spans[0][0]
        spans.pop(0)
    inits = {t.name for t in g.initializer}
    reads_after = [set() for _ in range(len(nodes) + 1)]  # tensors read at node k or later
    for k in range(len(nodes) - 1, -1, -1):
        reads_after[k] = reads_after[k + 1] | set(_reads(nodes[k]))
    outs = {o.name for o in g.output}
    blocks = []
    for a, b, ls in spans:
        if not ls:
            continue
        main = [k for k in range(a, b) if k not in skip]
        need, stack = set(), [i for k in main for i in _reads(nodes[k])]
        while stack:  # the shape computations the block reads, back to their Shape nodes
            k = producer.get(stack.pop())
            if k is not None and k in skip and k not in need:
                need.add(k)
                if nodes[k].op_type != "Shape":
                    stack.extend(_reads(nodes[k]))
        members = sorted(set(main) | need)
        written = {o for k in members for o in nodes[k].output if o}
        inputs = [i for k in members if nodes[k].op_type != "Shape" for i in _reads(nodes[k])
                  if i not in written and i not in inits]
        shape_of = [nodes[k].input[0] for k in members if nodes[k].op_type == "Shape"
                    and nodes[k].input[0] not in written]
        outputs = [o for k in main for o in nodes[k].output if o and (o in reads_after[b] or o in outs)]
        blocks.append(Block(members, ls, list(dict.fromkeys(inputs)), outputs, list(dict.fromkeys(shape_of))))
    return blocks
