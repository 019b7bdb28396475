"""Weight range setting (white paper §3.1): one signed quantizer per layer weight, per output channel (default) or
per tensor, symmetric (default) or asymmetric, by min-max or MSE (see ptq.ranges.weight_encoding); with
``ends_8bit`` the weights of the network's first and head layers (``ptq.patterns.end_layers``) keep at least 8
bits, as their inputs do (ptq.stages.activation_ranges). Where
this machine's onnxruntime adds u8 × s8 products in saturating int16 (``ptq.runtime``) and ``reduce_range`` is not
``never``, the 8-bit weights of MatMul / Gemm layers are marked for uint8 storage (q + 128, zero point 128: the
same values, computed by the u8 × u8 kernels, which do not saturate); with ``reduce_range = always`` the 8-bit
weights of the convolutions (not depthwise) get 7 bits, [-64, 63], stored in int8."""
from __future__ import annotations

import onnx

from ..model import Graph, set_initializer, set_layer_bias
from ..patterns import end_layers
from ..quant import QuantSpec, dequantize, fake_quant
from ..runtime import reduce_range, saturates_u8s8
from ..weights import layer_kind


def set_weight_ranges(state, ctx=None):
    from ..ranges import weight_encoding
    cfg = state.config
    gr = Graph(state.model)
    reduce, why = reduce_range(cfg.reduce_range)
    dense_uint8 = cfg.reduce_range != "never" and saturates_u8s8()
    reduced, could = [], 0
    ends = end_layers(state.model, state.layers) if cfg.ends_8bit else set()
    for layer in state.layers:
        o = cfg.override_for(layer.name, layer.weight)
        per_channel = o.get("per_channel", cfg.per_channel)
        bits = int(o.get("bits", max(cfg.weight_bits, 8) if layer.name in ends else cfg.weight_bits))
        symmetric = bool(o.get("symmetric", cfg.symmetric_weights(bits)))
        kind = layer_kind(gr, layer)
        if bits == 8 and kind not in ("depthwise", "dense" if dense_uint8 else None):
            could += 1
            if reduce:
                bits = 7
                reduced.append(layer.name)
        spec = QuantSpec(bits=bits, signed=True,
                         symmetric=symmetric,
                         axis=layer.w_axis if per_channel else None)
        state.weights[layer.name] = weight_encoding(gr.const(layer.weight), spec, o.get("range", cfg.weight_range))
    state.report["reduce_range"] = {"layers": len(reduced), "could": could, "why": why, "dense_uint8": dense_uint8}
    return state


def weight_quantized(state, layers=None, weights: bool = True) -> onnx.ModelProto:
    """A copy of the reference whose layers (all, or ``layers``) carry their decided biases and, with
    ``weights``, their quantized weights: AdaRound's integers where it ran, else rounded to nearest; activations
    stay FP32."""
    sim = onnx.ModelProto.FromString(state.model.SerializeToString())
    gr = Graph(state.model)
    for layer in state.layers if layers is None else layers:
        enc, q = state.weights.get(layer.name), state.rounded.get(layer.name)
        if enc is not None and weights:
            set_initializer(sim, layer.weight, fake_quant(gr.const(layer.weight), enc) if q is None
                            else dequantize(q, enc))
        if layer.name in state.biases:
            set_layer_bias(sim, layer.name, state.biases[layer.name])
    return sim
