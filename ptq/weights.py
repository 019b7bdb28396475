"""Channel views of a layer's weight: which axis holds output channels and which input channels, so that CLE,
bias absorption and bias correction treat Conv, depthwise Conv, Gemm and MatMul alike."""
from __future__ import annotations

import numpy as np

from .errors import InputError
from .model import Graph, attr


def layer_kind(gr: Graph, layer) -> str | None:
    """'conv' (group 1), 'depthwise' (one input channel per group), 'dense' (Gemm / MatMul), or None."""
    if layer.op == "Conv":
        w = gr.const(layer.weight)
        group = attr(gr.nodes[layer.name], "group", 1)
        if group == 1:
            return "conv"
        if w.shape[1] == 1 and group == w.shape[0]:
            return "depthwise"
        return None
    return "dense"


def in_axis(kind: str, w_axis: int) -> int:
    """Axis of the weight that indexes input channels (for depthwise the output axis: channel i maps to i)."""
    if kind == "conv":
        return 1
    if kind == "depthwise":
        return 0
    return 1 - w_axis  # dense: the other axis of a 2-D weight


def per_channel_absmax(w: np.ndarray, axis: int) -> np.ndarray:
    """max |w| over everything but ``axis`` -> [C]."""
    return np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)).max(axis=1)


def scale_along(w: np.ndarray, axis: int, s: np.ndarray) -> np.ndarray:
    shape = [1] * w.ndim
    shape[axis] = -1
    return w * s.reshape(shape).astype(w.dtype)


def contract_input(w: np.ndarray, kind: str, w_axis: int, v: np.ndarray) -> np.ndarray:
    """Σ over input channels (and kernel positions) of w · v[input channel] -> [Cout]: the change of a layer's
    output when every input of channel i is v_i (used for absorbed biases and E[x]-based bias correction)."""
    if kind == "conv":
        return w.reshape(w.shape[0], w.shape[1], -1).sum(axis=2).astype(np.float64) @ v
    if kind == "depthwise":
        return w.reshape(w.shape[0], -1).sum(axis=1).astype(np.float64) * v
    w2 = w if w_axis == 0 else w.T  # [Cout, Cin]
    return w2.astype(np.float64) @ v


def as_matrix(w: np.ndarray, layer, kind: str) -> np.ndarray:
    """The weight as [Cout, D] (D = Cin·k·k; depthwise [C, k·k]; Gemm / MatMul with Cout first)."""
    if kind in ("conv", "depthwise"):
        return w.reshape(w.shape[0], -1)
    return w if layer.w_axis == 0 else w.T


def from_matrix(m: np.ndarray, w: np.ndarray, layer, kind: str) -> np.ndarray:
    """Inverse of as_matrix, back to the shape of ``w``."""
    if kind in ("conv", "depthwise"):
        return m.reshape(w.shape)
    return m if layer.w_axis == 0 else m.T


def reconstruction_layers(state, gr: Graph, stage: str = "this stage") -> list:
    """The layers a per-layer reconstruction (AdaRound, EasyQuant) handles: with a weight encoding, and Conv
    (group 1 or depthwise), Gemm or MatMul — other grouped convolutions are left alone. A convolution that is
    not 2-D is refused (InputError): the stage has no im2col for it."""
    layers = [l for l in state.layers if l.name in state.weights and layer_kind(gr, l) is not None]
    for l in layers:
        if l.op == "Conv" and gr.const(l.weight).ndim != 4:
            raise InputError(f"{stage}: layer '{l.name}' is a {gr.const(l.weight).ndim - 2}-D convolution; "
                             f"{stage} handles 2-D Conv, Gemm and MatMul: run without it")
    return layers
