"""If nodes whose condition the calibration data never change: the branch they take is quantized, the other stays
float.

A model whose compute sits inside an If (a speech model that picks its network by sample rate: If(sr == 16000))
has nothing to quantize in its main graph. Where every calibration sample takes the same branch of a main-graph If,
``inline_taken`` writes a flat model with that branch's nodes in place of the If (checked equal to the original
on the samples); ptq quantizes the flat model like any other; ``reassemble`` then puts the quantized nodes back
as that branch of the If, the untaken branch as it was, so the written model still answers every condition: the
taken branch in int8, the other in float. An If whose condition changes between samples keeps both bodies float
(the report says so), as do Loop and Scan bodies."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from .errors import InputError
from .opset import RTOL, check_feeds, largest_difference

@dataclass
class Taken:
    """A main-graph If that the calibration data always sent down one branch."""

    node: onnx.NodeProto  # the original If node
    branch: str  # "then_branch" or "else_branch"
    samples: int  # calibration batches whose condition was read


def _branch(node: onnx.NodeProto, name: str) -> onnx.GraphProto:
    return next(a.g for a in node.attribute if a.name == name)


def _defined(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    for n in graph.node:
        names.update(o for o in n.output if o)
    return names


def _subgraph_defined(graph: onnx.GraphProto) -> set[str]:
    """Every name defined in ``graph`` and the subgraphs inside it."""
    names = _defined(graph)
    for n in graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                names |= _subgraph_defined(a.g)
    return names


def _outer_names(graph: onnx.GraphProto) -> set[str]:
    """Names ``graph`` (and its subgraphs) read but do not define: its outer-scope references."""
    used = set()
    for n in graph.node:
        used.update(i for i in n.input if i)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                used |= _outer_names(a.g)
    used.update(o.name for o in graph.output)
    return used - _defined(graph)


def conditions_seen(model: onnx.ModelProto, source, batch_size: int) -> dict[str, set]:
    """{If node name: the condition values seen} for every main-graph If over the calibration ``source``."""
    from .observe import session
    ifs = [n for n in model.graph.node if n.op_type == "If"]
    if not ifs or source is None:
        return {}
    conds = list(dict.fromkeys(n.input[0] for n in ifs))
    sess = session(model, conds, optimize=False)
    seen: dict[str, set] = {c: set() for c in conds}
    for _, feed in source.batches(batch_size):
        for c, v in zip(conds, sess.run(conds, feed)):
            seen[c].update(bool(x) for x in np.asarray(v).ravel())
    return {n.name: seen[n.input[0]] for n in ifs}


def inline_taken(model: onnx.ModelProto, source, batch_size: int) -> tuple[onnx.ModelProto, list[Taken], list]:
    """(flat model, the If inlined (a list of at most one), notes on those left alone). The flat model has, for the
    first main-graph If that every calibration sample sends down one branch, that branch's nodes and initializers
    in place of the If, and an Identity from each branch output to the If's output. ``model`` itself when there is
    none."""
    seen = conditions_seen(model, source, batch_size)
    if not seen:
        return model, [], []
    flat = onnx.ModelProto.FromString(model.SerializeToString())
    g = flat.graph
    taken, notes, nodes = [], [], []
    defined = _subgraph_defined(g)
    for node in g.node:
        values = seen.get(node.name)
        if node.op_type != "If" or values is None:
            nodes.append(node)
            continue
        if len(values) != 1:
            notes.append(f"If '{node.name}': the calibration data take both branches: its bodies stay float")
            nodes.append(node)
            continue
        if taken:
            notes.append(f"If '{node.name}': one If of the main graph is quantized, '{taken[0].node.name}': "
                         "this one's bodies stay float")
            nodes.append(node)
            continue
        name = "then_branch" if values == {True} else "else_branch"
        body = _branch(node, name)
        mine = _defined(body)
        clash = mine & (defined - _subgraph_defined(body))
        if clash:
            notes.append(f"If '{node.name}': its {name} defines names the graph uses elsewhere "
                         f"({', '.join(sorted(clash)[:3])}): its bodies stay float")
            nodes.append(node)
            continue
        g.initializer.extend(body.initializer)
        nodes.extend(body.node)
        for b_out, out in zip(body.output, node.output):
            nodes.append(helper.make_node("Identity", [b_out.name], [out], f"{node.name}/{name}/{out}"))
        taken.append(Taken(node, name, len(source)))
    if not taken:
        return model, [], notes
    del g.node[:]
    g.node.extend(nodes)
    _check_equal(model, flat, source, batch_size)
    return flat, taken, notes


def _check_equal(model, flat, source, batch_size: int) -> None:
    """Refuse a flat model whose outputs differ from the original's on the calibration samples (ptq.opset's check:
    max |a − b| within RTOL of each output's peak)."""
    worst, samples = largest_difference(model, flat, check_feeds(model, source, batch_size))
    if worst > RTOL:
        raise InputError(f"inlining the If branch the calibration data take changed the model's outputs (largest "
                         f"difference {worst:.2e} of the output's peak on {samples} samples); this model's If "
                         "bodies cannot be quantized")


def reassemble(original: onnx.ModelProto, qflat: onnx.ModelProto, taken: list[Taken]) -> onnx.ModelProto:
    """The quantized flat model ``qflat`` with each inlined branch put back into its If: the nodes that compute
    the condition or what the untaken branch reads, and the nodes that read the If's outputs, stay in the main
    graph; every other node goes into the taken branch (outer-scope names resolve to the main graph: inputs,
    initializers), the untaken branch is the original one. Raises InputError where the nodes cannot be split
    that way."""
    out = onnx.ModelProto.FromString(qflat.SerializeToString())
    g = out.graph
    nodes = list(g.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    for t in taken:
        ifs_out = list(t.node.output)
        other = _branch(t.node, "else_branch" if t.branch == "then_branch" else "then_branch")
        cone, stack = set(), [t.node.input[0], *_outer_names(other)]
        while stack:  # the nodes the condition and the untaken branch need stay in the main graph
            name = stack.pop()
            i = producer.get(name)
            if i is None or i in cone:
                continue
            cone.add(i)
            stack.extend(x for x in nodes[i].input if x)
        after, reach = set(), set(ifs_out)
        for i, n in enumerate(nodes):  # topological order: what reads the If's outputs, and so on
            if any(x in reach for x in n.input) and i not in cone:
                after.add(i)
                reach.update(n.output)
        body_idx = [i for i in range(len(nodes)) if i not in cone and i not in after]
        body_out = {o for i in body_idx for o in nodes[i].output}
        if any(x in body_out for i in cone | after for x in nodes[i].input if x not in ifs_out) or \
                not all(o in body_out for o in ifs_out):
            raise InputError(f"If '{t.node.name}': the quantized branch cannot be put back into the If")
        rename = {o: f"{o}/{t.branch}" for o in ifs_out}
        body_nodes = []
        for i in body_idx:
            n = onnx.NodeProto()
            n.CopyFrom(nodes[i])
            for k, x in enumerate(n.input):
                n.input[k] = rename.get(x, x)
            for k, x in enumerate(n.output):
                n.output[k] = rename.get(x, x)
            body_nodes.append(n)
        old_body = _branch(t.node, t.branch)
        body = helper.make_graph(body_nodes, old_body.name, [],
                                 [_renamed(v, rename[o]) for v, o in zip(old_body.output, ifs_out)])
        new_if = onnx.NodeProto()
        new_if.CopyFrom(t.node)
        for a in new_if.attribute:
            if a.name == t.branch:
                a.g.CopyFrom(body)
        main = [nodes[i] for i in sorted(cone)] + [new_if] + [nodes[i] for i in sorted(after)]
        nodes = main
        producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    del g.node[:]
    g.node.extend(nodes)
    have = _defined(g)
    inits = {t.name: t for t in original.graph.initializer}
    for t in taken:  # what the untaken branch reads from the original main graph
        other = _branch(t.node, "else_branch" if t.branch == "then_branch" else "then_branch")
        for name in sorted(_outer_names(other) - have):
            if name not in inits:
                raise InputError(f"If '{t.node.name}': its other branch reads '{name}', which quantizing removed")
            g.initializer.append(inits[name])
            have.add(name)
    return out


def _renamed(value_info: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto:
    v = onnx.ValueInfoProto()
    v.CopyFrom(value_info)
    v.name = name
    return v
