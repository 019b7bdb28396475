"""Feeding any model: static batch sizes, scalar inputs, state tensors batched on axis 1, complete feeds from
.npz files (--calib-feeds) or a Python function (--calib-reader)."""
import json

import numpy as np
import onnx
import pytest
from builders import init, run, save_npy_samples, zoo
from onnx import TensorProto, helper

from ptq.data import DataSource, model_inputs
from ptq_cli.main import main


def stateful(rng):
    """x [N, 6], state [2, N, 4] (batch on axis 1), sr int64 scalar -> y = (x W + state[0]) · sr/16000 [N, 4] and
    the new state (state · 0.5) [2, N, 4]: the shape of a streaming speech model's interface."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"], "matmul"),
             helper.make_node("Gather", ["state", "zero"], ["s0"], "gather", axis=0),
             helper.make_node("Add", ["xw", "s0"], ["a"], "add"),
             helper.make_node("Cast", ["sr"], ["srf"], "cast", to=TensorProto.FLOAT),
             helper.make_node("Div", ["srf", "k"], ["gain"], "div"),
             helper.make_node("Mul", ["a", "gain"], ["y"], "mul"),
             helper.make_node("Mul", ["state", "half"], ["state_out"], "decay")]
    g = helper.make_graph(nodes, "stateful",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 6]),
                           helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, None, 4]),
                           helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4]),
                           helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [2, None, 4])],
                          [init("w", rng.normal(0, 1, (6, 4)).astype(np.float32)), init("zero", np.int64(0)),
                           init("k", np.float32(16000)), init("half", np.float32(0.5))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def static_zoo(rng, batch):
    m = zoo(rng)
    for vi in list(m.graph.input) + list(m.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_value = batch
    return m


def test_model_inputs_find_each_batch_axis(rng):
    info = {i.name: i for i in model_inputs(stateful(rng))}
    assert (info["x"].batch_axis, info["state"].batch_axis, info["sr"].batch_axis) == (0, 1, None)
    assert model_inputs(static_zoo(rng, 1))[0].static_batch == 1
    paddle = static_zoo(rng, 1)  # Paddle's exporter writes -1 for a dynamic batch
    paddle.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1
    assert model_inputs(paddle)[0].shape[0] is None and model_inputs(paddle)[0].batch_axis == 0


@pytest.mark.parametrize("batch,n", [(1, 20), (4, 18)])
def test_static_batch_export_runs_with_the_default_batch_size(rng, tmp_path, capsys, batch, n):
    path = tmp_path / "static.onnx"
    onnx.save(static_zoo(rng, batch), str(path))
    calib = save_npy_samples(tmp_path / "calib", rng, (3, 16, 16), n)
    assert main(["run", str(path), "--calib", str(calib), "-o", str(tmp_path / "q.onnx"), "--holdout", "4",
                 "-q"]) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "q.report.json").read_text())
    assert report["fidelity"]["samples"] == 4 and report["fidelity"]["outputs"]["logits"]["cosine"] > 0.98
    src = DataSource(calib, model_inputs(static_zoo(rng, batch)))
    sizes = [len(p) for p, _ in src.batches(16)]
    assert set(sizes) == {batch} and sum(sizes) + src.left_out == n and src.left_out == n % batch


def npz_samples(folder, rng, n, sr=16000, batched=1):
    folder.mkdir()
    for k in range(n):
        feed = {"x": rng.normal(0, 1, (batched, 6) if batched > 1 else 6).astype(np.float32),
                "state": rng.normal(0, 1, (2, batched, 4) if batched > 1 else (2, 4)).astype(np.float32),
                "sr": np.int64(sr)}
        np.savez(folder / f"f{k:02d}.npz", **feed)
    return folder


def test_scalar_input_and_state_on_axis_1_from_samples(rng, tmp_path, capsys):
    path = tmp_path / "s.onnx"
    onnx.save(stateful(rng), str(path))
    calib = npz_samples(tmp_path / "calib", rng, 24)
    src = DataSource(calib, model_inputs(stateful(rng)))
    _, feed = next(iter(src.batches(8)))
    assert feed["x"].shape == (8, 6) and feed["state"].shape == (2, 8, 4) and feed["sr"].shape == ()
    assert run(stateful(rng), feed)[0].shape == (8, 4)  # onnxruntime takes the batch as stacked
    assert main(["run", str(path), "--calib", str(calib), "-o", str(tmp_path / "q.onnx"), "-q"]) == 0, \
        capsys.readouterr().err
    report = json.loads((tmp_path / "q.report.json").read_text())
    assert report["fidelity"]["outputs"]["y"]["cosine"] > 0.99


def test_calib_feeds_pass_each_file_as_it_is(rng, tmp_path, capsys):
    path = tmp_path / "s.onnx"
    onnx.save(stateful(rng), str(path))
    feeds = npz_samples(tmp_path / "feeds", rng, 12, batched=3)  # three rows per feed, batch on axis 1 for state
    out = tmp_path / "q.onnx"
    assert main(["run", str(path), "--calib-feeds", str(feeds), "-o", str(out), "--holdout", "3", "-q"]) == 0, \
        capsys.readouterr().err
    report = json.loads((tmp_path / "q.report.json").read_text())
    assert report["fidelity"]["samples"] == 3 and report["fidelity"]["outputs"]["y"]["cosine"] > 0.99
    np.savez(feeds / "f99.npz", x=np.zeros((3, 6), np.float32), sr=np.int64(8000))  # no state
    code = main(["run", str(path), "--calib-feeds", str(feeds), "-o", str(tmp_path / "r.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "f99.npz: the model's inputs are x, state, sr; the feed lacks state" in err
    assert not (tmp_path / "r.onnx").exists()


def test_calib_reader_yields_feeds(rng, tmp_path, capsys):
    path = tmp_path / "s.onnx"
    onnx.save(stateful(rng), str(path))
    reader = tmp_path / "reader.py"
    reader.write_text(
        "import numpy as np\n"
        "def feeds():\n"
        "    rng = np.random.default_rng(1)\n"
        "    state = np.zeros((2, 1, 4), np.float32)\n"
        "    for k in range(16):  # a stream: each feed carries the state the last one left\n"
        "        yield {'x': rng.normal(0, 1, (1, 6)).astype(np.float32), 'state': state, 'sr': np.int64(16000)}\n"
        "        state = state * 0.5 + 0.1\n"
        "def broken():\n"
        "    yield {'x': np.zeros((1, 6), np.float32), 'state': np.zeros((2, 1, 4), np.float32),\n"
        "           'sr': np.int64(1)}\n"
        "    yield {'x': np.full((1, 6), np.nan, np.float32), 'state': np.zeros((2, 1, 4), np.float32),\n"
        "           'sr': np.int64(1)}\n")
    out = tmp_path / "q.onnx"
    assert main(["run", str(path), "--calib-reader", f"{reader}:feeds", "-o", str(out), "--holdout", "4",
                 "-q"]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "q.report.json").read_text())["fidelity"]["samples"] == 4
    code = main(["run", str(path), "--calib-reader", f"{reader}:broken", "-o", str(tmp_path / "b.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "feed #1: input 'x' has 6 non-finite value(s)" in err and err.count("\n") == 1
    code = main(["run", str(path), "--calib-reader", f"{reader}:feeds", "--calib", str(tmp_path), "-o",
                 str(tmp_path / "b.onnx")])
    assert code == 2 and "give one of --calib / --calib-reader" in capsys.readouterr().err


def frame_model(rng):
    """x [T, 81] with no batch axis (both dimensions dynamic, as a temporal model exports) -> MatMul -> Relu ->
    MatMul -> y [T, 4]."""
    from builders import make
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], "fc1"), helper.make_node("Relu", ["h"], ["r"], "relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], "fc2")]
    return make(nodes, [("x", [None, 81])], [("y", [None, 4])],
                [init("w1", rng.normal(0, 0.2, (81, 16)).astype(np.float32)),
                 init("w2", rng.normal(0, 0.3, (16, 4)).astype(np.float32))])


def test_samples_of_the_inputs_full_rank_without_a_batch_axis_are_fed_whole(rng, tmp_path, capsys):
    """Files [T, 81] for an input [?, 81]: each file is one complete feed (said in the report's choices); where the
    folder mixes them with one-sample files, the refusal names --calib-feeds."""
    path = tmp_path / "frames.onnx"
    onnx.save(frame_model(rng), str(path))
    calib = tmp_path / "calib"
    calib.mkdir()
    for k in range(12):
        np.save(calib / f"clip{k:02d}.npy", rng.normal(0, 1, (40 + 3 * k, 81)).astype(np.float32))
    out = tmp_path / "q.onnx"
    assert main(["run", str(path), "--calib", str(calib), "-o", str(out), "--holdout", "3", "-q"]) == 0, \
        capsys.readouterr().err
    report = json.loads((tmp_path / "q.report.json").read_text())
    assert report["stages"]["choices"]["calibration"].startswith("each of the 12 files is one complete feed")
    assert report["fidelity"]["samples"] == 3 and report["fidelity"]["outputs"]["y"]["cosine"] > 0.99
    np.save(calib / "one.npy", rng.normal(0, 1, 81).astype(np.float32))  # one frame: a sample, not a feed
    code = main(["run", str(path), "--calib", str(calib), "-o", str(tmp_path / "r.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "give the folder as --calib-feeds DIR" in err
