"""Fold BatchNormalization into the Conv / Gemm before it (white paper §2.3.1, eq. 11-13).

For output channel c, with sigma_c = sqrt(var_c + eps):
    W'_c = W_c * gamma_c / sigma_c,    b'_c = (b_c - mu_c) * gamma_c / sigma_c + beta_c
The BN parameters are kept (``BNStats``, keyed by the folded layer's output tensor): after folding, the
pre-activation of channel c is taken as N(beta_c, std_c^2) with std_c = |gamma_c|·sqrt(var_c / (var_c + eps)),
which BN-based range setting, high-bias absorption and analytic bias correction use. (The paper writes gamma_c;
the eps factor matters for dead channels, whose running variance is far below eps: their output is the
constant beta_c, not N(beta_c, gamma_c^2) — on efficientnet_lite0_bn one such channel has gamma = 295.)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..model import Graph, attr, set_initializer


@dataclass
class BNStats:
    gamma: np.ndarray  # [C]
    beta: np.ndarray  # [C]
    mean: np.ndarray  # [C]
    var: np.ndarray  # [C]
    eps: float

    @property
    def std(self) -> np.ndarray:
        """The standard deviation of the BN's output, given an input with its running variance."""
        return (np.abs(self.gamma) * np.sqrt(self.var / (self.var + self.eps))).astype(np.float32)


def fold_batchnorm(model: onnx.ModelProto) -> dict[str, BNStats]:
    """Fold every foldable Conv→BN and Gemm→BN pair in place; return the BN statistics by output tensor name."""
    stats: dict[str, BNStats] = {}
    removed = []
    gr = Graph(model)
    for bn in list(model.graph.node):
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1 and any(bn.output[1:]):
            continue
        if attr(bn, "training_mode", 0):
            continue
        layer = gr.producer.get(bn.input[0])
        if layer is None or layer.op_type not in ("Conv", "Gemm") or gr.only_consumer(bn.input[0]) is not bn:
            continue
        params = [gr.const(n) for n in bn.input[1:5]]
        w = gr.const(layer.input[1])
        if w is None or any(p is None for p in params) or len(gr.consumers[layer.input[1]]) != 1:
            continue
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        eps = float(attr(bn, "epsilon", 1e-5))
        if layer.op_type == "Gemm":
            if attr(layer, "transA", 0) or attr(layer, "alpha", 1.0) != 1.0 or attr(layer, "beta", 1.0) != 1.0:
                continue
            axis = 0 if attr(layer, "transB", 0) else 1
        else:
            axis = 0
        if w.shape[axis] != gamma.shape[0]:
            continue
        k = gamma / np.sqrt(var + eps)  # [C]
        shape = [1] * w.ndim
        shape[axis] = -1
        w_new = (w.astype(np.float64) * k.reshape(shape)).astype(w.dtype)
        b = gr.const(layer.input[2]) if len(layer.input) > 2 and layer.input[2] else np.zeros_like(gamma)
        if b is None or (len(layer.input) > 2 and layer.input[2] and len(gr.consumers[layer.input[2]]) != 1):
            continue
        b_new = ((b.astype(np.float64) - mean) * k + beta).astype(w.dtype)
        set_initializer(model, layer.input[1], w_new)
        b_name = layer.input[2] if len(layer.input) > 2 and layer.input[2] else layer.name + "_bias"
        set_initializer(model, b_name, b_new)
        if len(layer.input) > 2:
            layer.input[2] = b_name
        else:
            layer.input.append(b_name)
        layer.output[0] = bn.output[0]
        stats[bn.output[0]] = BNStats(gamma.astype(np.float32), beta.astype(np.float32),
                                      mean.astype(np.float32), var.astype(np.float32), eps)
        removed.append(bn)
    for n in removed:
        model.graph.node.remove(n)
    return stats
