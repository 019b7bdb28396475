"""What onnxruntime's integer kernels do on this machine, probed rather than guessed from CPU flags.

On x86 without AVX-VNNI, onnxruntime's u8 × s8 GEMM and convolution kernels (MLAS, VPMADDUBSW) add each pair of
adjacent products in int16 with saturation: two products 255 · 127 sum to 64770 > 32767, and the result is
silently clipped. Real activations reach the top of their uint8 grid often (a ReLU6 at 6, an input at its
maximum), so 8-bit weights can lose accuracy there that the QDQ model does not show (EfficientNet-Lite0 W8A8
per-channel: top-1 drop 3.46 instead of about 0). Weights in [-64, 63] (onnxruntime's ``reduce_range``) keep every
pair below 2^15: 255 · 64 · 2 = 32640, at the cost of one bit of weight precision. Depthwise convolutions
accumulate in int32 and do not saturate."""
from __future__ import annotations

import functools

import numpy as np

from .threads import ort_options


@functools.lru_cache(maxsize=None)
def saturates_u8s8() -> bool:
    """True where onnxruntime's integer MatMul on this CPU saturates pairs of u8 × s8 products: a 1×64 · 64×8
    QLinearMatMul (QDQ form) of 255s and 127s, whose exact result 64 · 255 · 127 = 2072640 comes back about halved
    there."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k = 64
    exact = k * 255 * 127
    inits = [numpy_helper.from_array(np.float32(1.0), "s"), numpy_helper.from_array(np.uint8(0), "zu"),
             numpy_helper.from_array(np.full((k, 8), 127, np.int8), "w"), numpy_helper.from_array(np.int8(0), "zs"),
             numpy_helper.from_array(np.float32(exact / 250), "so")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zu"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "zu"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "s", "zs"], ["wd"]),
             helper.make_node("MatMul", ["xd", "wd"], ["y"]),
             helper.make_node("QuantizeLinear", ["y", "so", "zu"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "so", "zu"], ["out"])]
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    opts = ort_options()
    s = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    got = float(s.run(None, {"x": np.full((1, k), 255, np.float32)})[0].max())
    return got < 0.9 * exact


@functools.lru_cache(maxsize=None)
def integer_min_clip() -> bool:
    """True where this onnxruntime runs Min and Clip on uint8 / int8 tensors (the exporter then bounds and
    saturates activations on their integers, between QuantizeLinear and DequantizeLinear): a uint8 Min against a
    per-channel constant and a uint8 Clip, checked for their exact results."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.array([[3], [200]], np.uint8), "b"),
             numpy_helper.from_array(np.uint8(1), "lo"), numpy_helper.from_array(np.uint8(127), "hi")]
    nodes = [helper.make_node("Min", ["x", "b"], ["m"]), helper.make_node("Clip", ["m", "lo", "hi"], ["y"])]
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.UINT8, [2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, [2, 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    opts = ort_options()
    try:
        s = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        got = s.run(None, {"x": np.array([[0, 9], [150, 255]], np.uint8)})[0]
    except Exception:  # noqa: BLE001 - an onnxruntime without these kernels refuses the model (its error types vary)
        return False
    return got.tolist() == [[1, 3], [127, 127]]
