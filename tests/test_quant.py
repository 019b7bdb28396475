"""numpy fake-quant must equal onnxruntime's QuantizeLinear / DequantizeLinear on the same scale and zero point."""
import numpy as np
import pytest
from builders import init, run
from onnx import TensorProto, helper, numpy_helper

from ptq.quant import QuantSpec, dequantize, encoding_from_range, fake_quant, quantize, sqnr_db


def ort_qdq(x, scale, zp, zp_type, axis=None):
    kw = {"axis": axis} if axis is not None else {}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **kw),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **kw)]
    inits = [init("s", np.asarray(scale, np.float32)), numpy_helper.from_array(np.asarray(zp).astype(zp_type), "z")]
    g = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape)),
                           helper.make_tensor_value_info("q", TensorProto.UINT8 if zp_type == np.uint8
                                                         else TensorProto.INT8, list(x.shape))], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    y, q = run(m, {"x": x})
    return y, q


def test_per_tensor_uint8_matches_onnxruntime(rng):
    x = rng.normal(0, 2, (4, 1000)).astype(np.float32)
    # values exactly on .5 ties and out of range
    enc = encoding_from_range(QuantSpec(8, signed=False), -3.0, 5.0)
    x[0, :10] = (np.arange(10) - 5 + 0.5) * enc.scale
    x[1, :2] = [-100, 100]
    y, q = ort_qdq(x, enc.scale, enc.zero_point, np.uint8)
    np.testing.assert_array_equal(quantize(x, enc), q.astype(np.int32))
    np.testing.assert_array_equal(fake_quant(x, enc), y)


def test_per_channel_int8_matches_onnxruntime(rng):
    w = rng.normal(0, 1, (6, 3, 3, 3)).astype(np.float32) * np.arange(1, 7, dtype=np.float32)[:, None, None, None]
    top = np.abs(w).reshape(6, -1).max(1)
    enc = encoding_from_range(QuantSpec(8, signed=True, symmetric=True, axis=0), -top, top)
    y, q = ort_qdq(w, enc.scale, enc.zero_point, np.int8, axis=0)
    np.testing.assert_array_equal(quantize(w, enc), q.astype(np.int32))
    np.testing.assert_array_equal(dequantize(quantize(w, enc), enc), y)


def test_encoding_by_hand():
    # [-1, 3] on uint8: s = 4/255, z = round(0 - (-1)/s) = round(63.75) = 64
    enc = encoding_from_range(QuantSpec(8), -1.0, 3.0)
    assert enc.scale == pytest.approx(4 / 255)
    assert int(enc.zero_point) == 64
    # symmetric 4-bit: s = 2/7, grid [-8, 7]
    enc = encoding_from_range(QuantSpec(4, signed=True, symmetric=True), -2.0, 1.0)
    assert enc.scale == pytest.approx(2 / 7) and int(enc.zero_point) == 0
    assert quantize(np.array([-5.0, 5.0]), enc).tolist() == [-8, 7]
    # the range is widened to hold 0: [1, 2] -> [0, 2]
    enc = encoding_from_range(QuantSpec(8), 1.0, 2.0)
    assert int(enc.zero_point) == 0 and enc.scale == pytest.approx(2 / 255)


def test_sqnr_by_hand():
    assert sqnr_db(np.array([3.0, 4.0]), np.array([3.0, 4.0])) == float("inf")
    assert sqnr_db(np.array([1.0, 0.0]), np.array([0.9, 0.0])) == pytest.approx(20.0)
