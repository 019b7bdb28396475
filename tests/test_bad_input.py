"""Every bad input gets exit 2 and one line on stderr naming the file or option, no traceback, nothing written, and
no hang (each case runs under a time limit)."""
import os
import signal

import numpy as np
import onnx
import pytest
from builders import conv_bn_relu, init, make, save_npy_samples, zoo
from onnx import TensorProto, helper

from ptq.observe import Histogram
from ptq_cli.main import main

LIMIT_S = 60


class Hang(BaseException):
    """Raised by the alarm: a case that did not finish in time."""


@pytest.fixture(autouse=True)
def time_limit():
    def on_alarm(signum, frame):
        raise Hang(f"no answer within {LIMIT_S} s")
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(LIMIT_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def setup(rng, tmp_path):
    model = tmp_path / "in" / "zoo.onnx"
    model.parent.mkdir()
    onnx.save(zoo(rng), str(model))
    calib = save_npy_samples(tmp_path / "calib", rng, (3, 16, 16), 16)
    out = tmp_path / "out"
    out.mkdir()
    return model, calib, out, tmp_path


def refused(capsys, args, *fragments, code=2):
    got = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert got == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def write_recipe(tmp, text):
    r = tmp / "r.toml"
    r.write_text(text)
    return r


def custom_op_model():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], "conv"),
             helper.make_node("Frobnicate", ["c"], ["y"], "custom", domain="com.example")]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, 8, 8])],
                          [init("w", np.ones((4, 3, 1, 1), np.float32))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.example", 1)])
    m.ir_version = 8
    return m


def if_model(rng):
    """All the work inside the branches of an If (a speech model switching on its sample rate)."""
    def branch(name):
        return helper.make_graph([helper.make_node("Conv", ["x", f"w_{name}"], [f"y_{name}"], f"conv_{name}")],
                                 name, [],
                                 [helper.make_tensor_value_info(f"y_{name}", TensorProto.FLOAT, [None, 4, 16, 16])],
                                 [init(f"w_{name}", rng.normal(0, 1, (4, 3, 1, 1)).astype(np.float32))])
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], "mean", keepdims=0),
             helper.make_node("Greater", ["m", "zero"], ["c"], "positive"),
             helper.make_node("If", ["c"], ["y"], "switch", then_branch=branch("a"), else_branch=branch("b"))]
    g = helper.make_graph(nodes, "if", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, 16, 16])],
                          [init("zero", np.float32(0))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def conv1d_model(rng):
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], "conv1d", pads=[1, 1]),
             helper.make_node("Relu", ["c"], ["y"], "relu")]
    return make(nodes, [("x", [None, 3, 16])], [("y", [None, 4, 16])],
                [init("w", rng.normal(0, 1, (4, 3, 3)).astype(np.float32)), init("b", np.zeros(4, np.float32))])


CASES = {
    # name: (extra args or a function of the fixture giving the args, fragments of the one line)
    "inf_in_sample": "non-finite",
    "nan_in_sample": "non-finite",
    "output_is_input": "would overwrite the input",
    "output_is_input_other_spelling": "would overwrite the input",
    "output_is_hard_link_of_input": "would overwrite the input",
    "bad_eval_samples": "sample for input 'x' has shape",
    "max_drop_without_gate_data": "--max-drop needs --eval DIR",
    "auto_fix_without_gate_data": "--max-drop needs --eval DIR",
    "max_drop_without_class_output": "--max-drop needs a classification output",
    "relative_max_drop_without_labels": "needs labels",
    "custom_op": "onnxruntime cannot run this model",
    "recipe_bits_string": "setting weight_bits must be a whole number, not 'eight'",
    "recipe_bits_fraction": "setting weight_bits must be a whole number, not 3.5",
    "override_bits_32": "bits must be 2-8 or 16, not 32",
    "override_bits_1": "bits must be 2-8 or 16, not 1",
    "override_bits_fraction": "bits must be a whole number, not 3.5",
    "override_unknown_key": "unknown key 'bitz' (did you mean 'bits'?)",
    "override_unknown_name": "names no layer, weight or activation tensor of the model (near: conv1",
    "override_bad_range": "unknown range 'wide'",
    "negative_resize": "--resize must be a whole number of pixels >= 0",
    "zero_calib_size": "calibration size and batch size must be >= 1",
    "zero_batch_size": "calibration size and batch size must be >= 1",
    "nothing_to_quantize": "nothing to quantize",
    "already_quantized": "already quantized",
    "adaround_conv1d": "AdaRound: layer 'conv1d' is a 1-D convolution",
    "easyquant_conv1d": "EasyQuant: layer 'conv1d' is a 1-D convolution",
    "cle_after_weight_ranges": "must come before every other step",
    "layers_only_inside_if": "its 2 such ops are inside If / Loop / Scan bodies",
    "integer_pixels": "is int64, the model expects float32 (save the preprocessed samples as float",
    "percentile_without_percentile_range": "--percentile has no effect without --act-range percentile",
    "input_range_with_calibration_data": "--input-range has no effect without --data-free",
    "adaround_iters_at_8_bits": "--adaround-iters has no effect without --adaround",
    "eval_resize_without_eval": "--eval-resize / --eval-crop have no effect without --eval DIR",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_run_refuses_bad_input_and_writes_nothing(setup, capsys, rng, case):
    model, calib, out_dir, tmp = setup
    out = out_dir / "m.onnx"
    args = ["run", model, "--calib", calib, "-o", out]
    if case in ("inf_in_sample", "nan_in_sample"):
        x = np.load(calib / "s003.npy")
        x[1, 2, 3] = np.inf if case == "inf_in_sample" else np.nan
        np.save(calib / "s003.npy", x)
        fragments = ["s003.npy: input 'x' has 1 non-finite value(s)"]
    elif case == "output_is_input":
        args[-1] = model
    elif case == "output_is_input_other_spelling":
        args[-1] = model.parent / ".." / "in" / "zoo.onnx"
    elif case == "output_is_hard_link_of_input":
        os.link(model, out)
        before = out.read_bytes()
    elif case == "bad_eval_samples":
        args += ["--eval", save_npy_samples(tmp / "ev", rng, (3, 8, 8), 4)]
    elif case == "max_drop_without_gate_data":
        args += ["--max-drop", "1", "--holdout", "0"]
    elif case == "auto_fix_without_gate_data":
        args += ["--max-drop", "1", "--auto-fix", "--holdout", "0"]
    elif case == "max_drop_without_class_output":
        onnx.save(conv_bn_relu(rng), str(model))
        args[3] = save_npy_samples(tmp / "c8", rng, (3, 8, 8), 16)
        args += ["--max-drop", "1"]
    elif case == "relative_max_drop_without_labels":
        args += ["--max-drop", "2%"]
    elif case == "custom_op":
        onnx.save(custom_op_model(), str(model))
        args[3] = save_npy_samples(tmp / "c8", rng, (3, 8, 8), 8)
    elif case.startswith("recipe_bits"):
        args += ["--recipe", write_recipe(tmp, 'weight_bits = "eight"\n' if case.endswith("string")
                                          else "weight_bits = 3.5\n")]
    elif case.startswith("override_"):
        body = {"override_bits_32": 'bits = 32', "override_bits_1": "bits = 1", "override_bits_fraction": "bits = 3.5",
                "override_unknown_key": "bitz = 16", "override_bad_range": 'range = "wide"'}.get(case, "bits = 16")
        name = "conv_1" if case == "override_unknown_name" else "conv1"
        args += ["--recipe", write_recipe(tmp, f'[overrides."{name}"]\n{body}\n')]
    elif case == "negative_resize":
        args += ["--resize", "-1"]
    elif case == "zero_calib_size":
        args += ["--calib-size", "0"]
    elif case == "zero_batch_size":
        args += ["--batch-size", "0"]
    elif case == "nothing_to_quantize":
        onnx.save(make([helper.make_node("Relu", ["x"], ["y"], "relu")], [("x", [None, 3, 16, 16])],
                       [("y", [None, 3, 16, 16])], []), str(model))
    elif case == "already_quantized":
        assert main(["run", str(model), "--calib", str(calib), "-o", str(tmp / "q.onnx"), "-q"]) == 0
        capsys.readouterr()
        args[1] = tmp / "q.onnx"
    elif case.endswith("conv1d"):
        onnx.save(conv1d_model(rng), str(model))
        args[3] = save_npy_samples(tmp / "c1", rng, (3, 16), 8)
        args += ["--adaround" if case.startswith("adaround") else "--easyquant"]
    elif case == "layers_only_inside_if":  # one sample a batch: the data take both branches, which stay float
        onnx.save(if_model(rng), str(model))
        args += ["--batch-size", "1"]
    elif case == "cle_after_weight_ranges":
        args += ["--recipe", write_recipe(tmp, 'steps = ["weight_ranges", "cle", "activation_ranges"]\n')]
    elif case == "integer_pixels":
        for f in calib.glob("*.npy"):
            np.save(f, np.clip(np.load(f) * 64 + 128, 0, 255).astype(np.int64))
    elif case == "percentile_without_percentile_range":
        args += ["--percentile", "99.9"]
    elif case == "input_range_with_calibration_data":
        args += ["--input-range", "-1,1"]
    elif case == "adaround_iters_at_8_bits":
        args += ["--adaround-iters", "100"]
    elif case == "eval_resize_without_eval":
        args += ["--eval-resize", "20"]
    original = model.read_bytes()
    line = refused(capsys, args, *(locals().get("fragments") or [CASES[case]]))
    assert line.startswith("ptq: error: ")
    assert model.read_bytes() == original  # the input is never touched
    if case == "output_is_hard_link_of_input":
        assert out.read_bytes() == before and os.listdir(out_dir) == ["m.onnx"]
    else:
        assert os.listdir(out_dir) == []  # nothing written, no temporary file left


def test_eval_refuses_models_it_cannot_compare(setup, capsys, rng):
    model, calib, out_dir, tmp = setup
    other = tmp / "other.onnx"
    onnx.save(conv_bn_relu(rng, hw=8), str(other))
    refused(capsys, ["eval", model, other, "--data", calib], "input 'x' has shape [None, 3, 8, 8]")
    onnx.save(conv_bn_relu(rng, hw=16), str(other))
    refused(capsys, ["eval", model, other, "--data", calib], "its outputs (y) are not those of", "(logits)")
    renamed = zoo(rng)
    renamed.graph.input[0].name = "image"
    for n in renamed.graph.node:
        n.input[:] = ["image" if i == "x" else i for i in n.input]
    onnx.save(renamed, str(other))
    refused(capsys, ["eval", model, other, "--data", calib], "its inputs (image) are not those of", "(x)")


def test_histogram_ignores_non_finite_values_and_ends():
    h = Histogram()
    h.update(np.array([1.0, -2.0, np.inf, np.nan, -np.inf, 0.5], np.float32))
    h.update(np.array([np.inf], np.float32))  # a batch of nothing but inf
    assert (h.min, h.max, h.n, h.nonfinite) == (-2.0, 1.0, 3, 4)
    assert h.counts.sum() == 3


def test_block_recon_without_torch_is_refused_before_any_work_naming_the_install(setup, capsys, monkeypatch):
    import builtins
    import ptq.run
    model, calib, out_dir, _ = setup
    real_import = builtins.__import__

    def no_torch(name, *args, **kw):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kw)
    monkeypatch.setattr(builtins, "__import__", no_torch)
    monkeypatch.setattr(ptq.run, "load_model", lambda *a: pytest.fail("worked before checking for torch"))
    refused(capsys, ["run", model, "--calib", calib, "-o", out_dir / "m.onnx", "--block-recon"],
            "pip install 'ptq[recon]'")
    assert not list(out_dir.iterdir())
