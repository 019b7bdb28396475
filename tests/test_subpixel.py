"""ConvTranspose rewritten as Conv → DepthToSpace → Slice (ptq.subpixel): the same outputs as onnxruntime's own
ConvTranspose, for any input size; the cases it leaves alone; and a quantized model that runs it as QLinearConv."""
import numpy as np
import onnx
import pytest
from builders import init, make, run
from onnx import helper

from ptq.canonicalize import canonicalize
from ptq.subpixel import subpixel_conv_transposes


def conv_transpose_model(rng, c_in=6, c_out=5, k=(4, 4), s=2, pads=(1, 1, 1, 1), out_pad=None, bias=True,
                         after=(), group=1):
    attrs = dict(kernel_shape=list(k), strides=[s, s], pads=list(pads))
    if out_pad:
        attrs["output_padding"] = list(out_pad)
    if group != 1:
        attrs["group"] = group
    inputs = ["x", "w"] + (["b"] if bias else [])
    nodes = [helper.make_node("ConvTranspose", inputs, ["t0"], "up", **attrs)]
    inits = [init("w", rng.normal(0, 0.3, (c_in, c_out // group, *k)).astype(np.float32))]
    if bias:
        inits.append(init("b", rng.normal(0, 0.3, c_out).astype(np.float32)))
    last = "t0"
    for j, op in enumerate(after):
        out = f"t{j + 1}"
        if op == "BatchNormalization":
            names = [f"bn{j}_{p}" for p in ("g", "b", "m", "v")]
            values = [rng.uniform(0.5, 2, c_out), rng.normal(0, 0.3, c_out), rng.normal(0, 0.3, c_out),
                      rng.uniform(0.5, 2, c_out)]
            inits += [init(n, v.astype(np.float32)) for n, v in zip(names, values)]
            nodes.append(helper.make_node(op, [last, *names], [out], f"bn{j}"))
        elif op == "Mul":
            inits.append(init(f"c{j}", rng.uniform(0.5, 2, (c_out, 1, 1)).astype(np.float32)))
            nodes.append(helper.make_node(op, [last, f"c{j}"], [out], f"mul{j}"))
        elif op == "LeakyRelu":
            nodes.append(helper.make_node(op, [last], [out], f"act{j}", alpha=0.1))
        else:
            nodes.append(helper.make_node(op, [last], [out], f"act{j}"))
        last = out
    return make(nodes, [("x", [1, c_in, None, None])], [(last, [1, c_out, None, None])], inits)


def ops(model):
    return [n.op_type for n in model.graph.node]


@pytest.mark.parametrize("k,s,pads,out_pad", [((4, 4), 2, (1, 1, 1, 1), None), ((3, 3), 2, (1, 1, 1, 1), (1, 1)),
                                              ((5, 3), 2, (2, 0, 1, 1), None), ((4, 4), 2, (3, 3, 3, 3), None),
                                              ((6, 6), 3, (0, 2, 1, 0), (2, 1)), ((3, 4), 2, (0, 0, 0, 0), None)])
def test_the_rewrite_matches_onnxruntimes_conv_transpose(rng, k, s, pads, out_pad):
    """Kernels larger than the stride, even and odd, symmetric and one-sided pads, output padding: Conv →
    DepthToSpace (→ Slice) gives onnxruntime's ConvTranspose outputs on inputs of three sizes (one model)."""
    model = conv_transpose_model(rng, k=k, s=s, pads=pads, out_pad=out_pad)
    out = canonicalize(model)
    assert "ConvTranspose" not in ops(out) and ops(out)[:2] == ["Conv", "DepthToSpace"]
    for hw in ((5, 7), (8, 8), (3, 4)):
        x = rng.normal(0, 1, (1, 6, *hw)).astype(np.float32)
        want, got = run(model, {"x": x})[0], run(out, {"x": x})[0]
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_per_channel_ops_after_it_move_before_depth_to_space(rng):
    """ConvTranspose → BN → Mul(per channel) → LeakyRelu: the three run on the Conv's s² phase channels, so BN
    folding sees Conv → BN; outputs unchanged."""
    model = conv_transpose_model(rng, after=("BatchNormalization", "Mul", "LeakyRelu"), bias=False)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    assert subpixel_conv_transposes(out) == 1
    assert ops(out) == ["Conv", "BatchNormalization", "Mul", "LeakyRelu", "DepthToSpace", "Slice"]
    x = rng.normal(0, 1, (1, 6, 6, 5)).astype(np.float32)
    np.testing.assert_allclose(run(out, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["kernel equal to the stride", "grouped", "stride 1"])
def test_what_it_leaves_alone(rng, case):
    """A 2×2 stride-2 upsampling (no overlap: DepthToSpace's copy costs more than an integer kernel saves), a grouped
    ConvTranspose and a stride-1 one stay ConvTranspose."""
    model = {"kernel equal to the stride": lambda: conv_transpose_model(rng, k=(2, 2), pads=(0, 0, 0, 0)),
             "grouped": lambda: conv_transpose_model(rng, c_in=6, c_out=6, group=2),
             "stride 1": lambda: conv_transpose_model(rng, k=(3, 3), s=1)}[case]()
    assert subpixel_conv_transposes(model) == 0
    assert ops(model)[0] == "ConvTranspose"


def test_a_quantized_conv_transpose_runs_as_an_integer_convolution(rng, tmp_path):
    """Conv → ConvTranspose → Relu → Conv quantized by ptq: onnxruntime's optimized graph has no ConvTranspose, one
    QLinearConv more than the model's two Convs, and runs DepthToSpace and the crop on the integers too (its one
    DequantizeLinear is the output's); the outputs stay close to FP32."""
    import onnxruntime as ort

    import ptq
    nodes = [helper.make_node("Conv", ["x", "w0"], ["h"], "down", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["h"], ["hr"], "r0"),
             helper.make_node("ConvTranspose", ["hr", "wt", "bt"], ["u"], "up", kernel_shape=[4, 4], strides=[2, 2],
                              pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["u"], ["ur"], "r1"),
             helper.make_node("Conv", ["ur", "w1"], ["y"], "out", pads=[1, 1, 1, 1])]
    inits = [init("w0", rng.normal(0, 0.3, (16, 3, 3, 3)).astype(np.float32)),
             init("wt", rng.normal(0, 0.2, (16, 16, 4, 4)).astype(np.float32)),
             init("bt", rng.normal(0, 0.1, 16).astype(np.float32)),
             init("w1", rng.normal(0, 0.3, (2, 16, 3, 3)).astype(np.float32))]
    model = make(nodes, [("x", [None, 3, 16, 16])], [("y", [None, 2, 16, 16])], inits)
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(16):
        np.save(calib / f"{i}.npy", rng.normal(0, 1, (3, 16, 16)).astype(np.float32))
    result = ptq.quantize(model, str(calib), latency_runs=0, holdout=0)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(result.model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    fused = ops(onnx.load(opts.optimized_model_filepath))
    assert "ConvTranspose" not in fused and fused.count("QLinearConv") == 3 and fused.count("DequantizeLinear") == 1
    x = rng.normal(0, 1, (4, 3, 16, 16)).astype(np.float32)
    want, got = run(model, {"x": x})[0], run(result.model, {"x": x})[0]
    assert np.sum((got - want) ** 2) < 1e-2 * np.sum(want ** 2)
