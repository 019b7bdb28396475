"""A layer's input rows (im2col at sampled positions) times its weights equal onnxruntime's convolution there."""
import numpy as np
import pytest
from onnx import helper

from builders import init, make, run
from ptq.patches import output_rows, sample_rows


@pytest.mark.parametrize("kernel, strides, pads, dilations, group", [
    ((3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    ((3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 4),  # depthwise, strided, as in EfficientNet
    ((5, 5), (2, 1), (2, 0, 1, 2), (1, 1), 1),  # uneven padding and strides
    ((2, 3), (1, 2), (0, 0, 0, 0), (2, 2), 1),  # dilated, no padding
    ((1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1),
])
def test_rows_times_weights_equal_onnxruntime_conv_at_the_sampled_positions(rng, kernel, strides, pads,
                                                                            dilations, group):
    c, o = 4, (4 if group == 4 else 6)
    x = rng.normal(size=(3, c, 11, 9)).astype(np.float32)
    w = rng.normal(size=(o, c // group, *kernel)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=list(kernel), strides=list(strides),
                            pads=list(pads), dilations=list(dilations), group=group)
    y = run(make([node], [("x", list(x.shape))], [("y", [None] * 4)], [init("w", w)]), {"x": x})[0]
    geom = {"kernel": kernel, "strides": strides, "pads": pads, "dilations": dilations, "group": group}
    depthwise = group == c
    rows = sample_rows(x, None, geom, 7, np.random.default_rng(5), depthwise)
    want = output_rows(y, geom, 7, np.random.default_rng(5))  # the same positions of onnxruntime's output
    got = np.einsum("rck,ck->rc", rows, w.reshape(o, -1)) if depthwise else rows @ w.reshape(o, -1).T
    assert rows.shape[0] == 3 * 7
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
