"""Weight range setting (white paper §3.1): one signed quantizer per layer weight, per output channel (default) or
per tensor, symmetric (default) or asymmetric, by min-max or MSE (see ptq.ranges.weight_encoding); with
``ends_8bit`` the weights of the network's first and head layers (``ptq.patterns.end_layers``) keep at least 8
bits, as their inputs do (ptq.stages.activation_ranges). Where
the target's runtime adds u8 × s8 products in saturating int16 (``ptq.target``), ``reduce_range = auto`` stores
the 8-bit symmetric weights of every layer but the depthwise convolutions as uint8 (q + 128, zero point 128: the
same values, computed by onnxruntime's u8 × u8 kernels, which do not saturate; ``uint8_layer``);
``reduce_range = always`` gives the convolutions' 8-bit weights 7 bits instead, [-64, 63] in int8 (every pair of
products, 255 · 64 · 2 = 32640, fits in int16: the faster u8 × s8 kernels, one bit less), on any target; ``never``
keeps int8 weights whatever the target. Depthwise convolutions accumulate in int32 and never saturate."""
from __future__ import annotations

import onnx

from ..model import Graph, set_initializer, set_layer_bias
from ..patterns import end_layers
from ..quant import QuantSpec, dequantize, fake_quant
from ..weights import layer_kind


def set_weight_ranges(state, ctx=None):
    from ..ranges import weight_encoding
    cfg = state.config
    gr = Graph(state.model)
    reduce, why = reduced_range(cfg.reduce_range, state.target)
    reduced, could, stored_uint8 = [], 0, 0
    ends = end_layers(state.model, state.layers) if cfg.ends_8bit else set()
    for layer in state.layers:
        o = cfg.override_for(layer.name, layer.weight)
        per_channel = o.get("per_channel", cfg.per_channel)
        bits = int(o.get("bits", max(cfg.weight_bits, 8) if layer.name in ends else cfg.weight_bits))
        symmetric = bool(o.get("symmetric", cfg.symmetric_weights(bits)))
        kind = layer_kind(gr, layer)
        if bits == 8 and kind != "depthwise":
            could += 1
            as_uint8 = uint8_layer(cfg, state.target, kind)
            if reduce and not as_uint8:
                bits = 7
                reduced.append(layer.name)
            elif symmetric and as_uint8:
                stored_uint8 += 1
        spec = QuantSpec(bits=bits, signed=True,
                         symmetric=symmetric,
                         axis=layer.w_axis if per_channel else None)
        state.weights[layer.name] = weight_encoding(gr.const(layer.weight), spec, o.get("range", cfg.weight_range))
    state.report["reduce_range"] = {"layers": len(reduced), "could": could, "why": why,
                                    "uint8_layers": stored_uint8}
    return state


def uint8_layer(cfg, target, kind: str) -> bool:
    """Whether a layer of this kind (ptq.weights.layer_kind) stores its 8-bit symmetric weights as uint8 (q + 128):
    on a saturating target, every layer but the depthwise ones with ``reduce_range = auto``, the dense ones with
    ``always`` (7 bits are for the convolutions)."""
    if not target.saturating_u8s8 or kind == "depthwise":
        return False
    return cfg.reduce_range == "auto" or (cfg.reduce_range == "always" and kind == "dense")


def reduced_range(setting: str, target) -> tuple[bool, str]:
    """(whether 8-bit weights of non-depthwise convolutions get 7 bits, why)."""
    if setting == "always":
        return True, "reduce_range = always"
    if setting == "auto" and target.saturating_u8s8:
        return False, (f"target {target.name}: u8 × s8 pairs saturate in int16, so the 8-bit weights of every layer "
                       "but the depthwise convolutions are stored as uint8 + 128 (the same values; onnxruntime's "
                       "u8 × u8 kernels are exact); --reduce-range always gives the convolutions 7-bit int8 weights "
                       "instead (faster kernels, one bit less), --target vnni builds for a runtime without saturation")
    return False, f"reduce_range = {setting}, target {target.name}"


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
