"""A network's activations over the calibration set, visited layer after layer.

Stages that visit the layers in order and change each layer's weights before moving on (AdaRound) need, at
every layer, its input in the network as it is now. Running the network from its inputs for each layer costs
a forward pass up to that layer per layer; ``Walk`` keeps instead a checkpoint: the tensors live at the last
layer visited (every tensor computed before it that a later node reads), for every calibration batch, in
memory while they fit in ``budget`` bytes. The next layer's input is computed from the checkpoint by the few
nodes in between, so the whole walk runs each node about once. Where a checkpoint would not fit (large
calibration sets, wide early tensors), the walk stays at the last one that did and streams from there.
"""
from __future__ import annotations

import numpy as np
import onnx

from .model import live_tensors, truncate
from .observe import session

CHECKPOINT_BYTES = 2 << 30  # per walk


def streamed(model: onnx.ModelProto, names, source, batch_size: int):
    """Per calibration batch, {name: array} for ``names``, from ``model`` truncated at them (nothing kept)."""
    names = list(dict.fromkeys(names))
    sess = session(truncate(model, names), arena=False)
    for _, feed in source.batches(batch_size):
        yield dict(zip(names, sess.run(names, feed)))


def streamed_pair(model_a: onnx.ModelProto, names_a, model_b: onnx.ModelProto, names_b, source, batch_size: int):
    """``streamed`` of two models over the same batches, each batch decoded once: two iterators, of the first
    model's and of the second's {name: array}, to be advanced in step (the first, then the second)."""
    names_a, names_b = list(dict.fromkeys(names_a)), list(dict.fromkeys(names_b))
    pending: list = []

    def first():
        sess_a, sess_b = session(truncate(model_a, names_a), arena=False), session(truncate(model_b, names_b),
                                                                                     arena=False)
        for _, feed in source.batches(batch_size):
            pending.append(dict(zip(names_b, sess_b.run(names_b, feed))))
            yield dict(zip(names_a, sess_a.run(names_a, feed)))

    def second():
        while pending:
            yield pending.pop(0)
    return first(), second()


class Walk:
    """Activations of one network at increasing node positions, from a checkpoint (see module docstring).

    ``batches(model, index, names)``: per batch, the tensors ``names`` (read by node ``index`` or later) as
    ``model`` computes them; ``model`` must keep the node order and may differ from earlier calls only in
    nodes at or after the last ``index`` asked for (the weights of the layers already visited are final)."""

    def __init__(self, source, batch_size: int, budget: int = CHECKPOINT_BYTES):
        self.source, self.batch_size, self.budget = source, batch_size, budget
        self.index = 0  # nodes before it are in the checkpoint
        self.saved: list[dict[str, np.ndarray]] | None = None  # None: the source's batches are the checkpoint
        self.runs = 0  # segments run (for tests and the report)

    def _start(self, release: bool = False):
        """The checkpoint's batches; with ``release``, each is dropped from the checkpoint once handed out (the
        checkpoint is being replaced: old and new never both sit in memory whole)."""
        if self.saved is not None and release:
            while self.saved:
                yield self.saved[0]
                self.saved.pop(0)  # only once the next one is asked for: a run closed after one batch drops none
        elif self.saved is not None:
            yield from self.saved
        else:
            for _, feed in self.source.batches(self.batch_size):
                yield feed

    def _run(self, model, outputs, release: bool = False):
        """Stream the checkpoint through the nodes between it and ``outputs``."""
        sess = None
        for feed in self._start(release):
            todo = [o for o in outputs if o not in feed]
            if sess is None and todo:
                sess = session(truncate(model, todo, {k: v.dtype for k, v in feed.items()}), arena=False)
                need = {i.name for i in sess.get_inputs()}
                self.runs += 1
            out = dict(zip(todo, sess.run(todo, {k: v for k, v in feed.items() if k in need}))) if todo else {}
            yield {o: out[o] if o in out else feed[o] for o in outputs}

    def batches(self, model: onnx.ModelProto, index: int, names):
        names = list(dict.fromkeys(names))
        if index > self.index:
            self._advance(model, index)
        have = self.saved[0].keys() if self.saved else ()
        if all(n in have for n in names):
            for b in self.saved:
                yield {n: b[n] for n in names}
        else:
            yield from self._run(model, names)

    def _advance(self, model, index):
        """Move the checkpoint to node ``index`` if its live tensors fit in the budget (judged on the first batch);
        the old checkpoint is released batch by batch as the new one fills, so the walk holds about one
        checkpoint at a time."""
        live = live_tensors(model, index)
        run = self._run(model, live, release=True)
        first = next(run, None)
        if first is None:
            return
        per_batch = sum(v.nbytes for v in first.values())
        if per_batch * -(-len(self.source) // self.batch_size) > self.budget:
            run.close()  # nothing released yet
            return
        saved = [first, *run]
        self.saved, self.index = saved, index
