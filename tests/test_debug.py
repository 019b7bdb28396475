"""The debugging flow: a model crafted so that exactly one quantizer breaks at 8 bits (a weight outlier on an input
channel that is always zero) — the per-quantizer analysis ranks it first and --auto-fix raises exactly it; FP32
sanity on every test model; the HTML report parses and charts each of the worst quantizers."""
import json
import sys
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import numpy as np
import onnx
import pytest
from builders import conv_bn_relu, init, make, run, save_npy_samples, two_inputs, zoo
from onnx import helper

from ptq_cli.main import main
from ptq.data import DataSource, model_inputs
from ptq.debug import fp32_sanity, per_quantizer
from ptq.quantizers import raise_quantizers
from ptq.export import export_qdq
from ptq.metric import Scorer
from ptq.pipeline import Config, Context, prepare, run_steps


def outlier_model(rng):
    """x [N,3,8,8] -> Conv 3x3 (+Relu) -> GlobalAveragePool -> Flatten -> Gemm -> logits [N,5]. Channel 0 of the
    conv weight has a weight of 100 on input channel 2, which the data keep at 0: harmless in FP32, but a
    per-tensor 8-bit min-max weight grid then has a step of ~0.8 and rounds every other weight to zero (the MSE
    range clips the outlier instead, which is harmless here)."""
    w1 = rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32)
    w1[0, 2, 1, 1] = 100.0
    wg = rng.normal(0, 1, (5, 8)).astype(np.float32)
    bg = np.zeros(5, np.float32)
    for _ in range(2):  # the second pass centres the logits, so that every class gets predicted
        model = _outlier_graph(w1, wg, bg)
        bg = bg - run(model, {"x": sample_inputs(rng, 256)})[0].mean(0).astype(np.float32)
    return _outlier_graph(w1, wg, bg)


def sample_inputs(rng, n):
    x = (rng.normal(0, 1, (n, 3, 8, 8)) + rng.normal(0, 2, (n, 3, 1, 1))).astype(np.float32)  # varied samples
    x[:, 2] = 0
    return x


def _outlier_graph(w1, wg, bg):
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], "relu1"),
             helper.make_node("GlobalAveragePool", ["r1"], ["g"], "gap"),
             helper.make_node("Flatten", ["g"], ["f"], "flatten"),
             helper.make_node("Gemm", ["f", "wg", "bg"], ["logits"], "fc", transB=1)]
    return make(nodes, [("x", [None, 3, 8, 8])], [("logits", [None, 5])],
                [init("w1", w1), init("wg", wg), init("bg", bg)])


def labelled_samples(folder, rng, model, n):
    """Samples with input channel 2 at zero, labelled with the FP32 model's own prediction (FP32 top-1 = 100 %)."""
    folder.mkdir(parents=True, exist_ok=True)
    x = sample_inputs(rng, n)
    pred = run(model, {"x": x})[0].argmax(1)
    for k in range(n):
        np.save(folder / f"s{k:03d}.npy", x[k])
    (folder / "labels.txt").write_text("".join(f"s{k:03d}.npy {pred[k]}\n" for k in range(n)))
    return folder


@pytest.fixture
def crafted(rng, tmp_path):
    model = outlier_model(rng)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    return model, path, labelled_samples(tmp_path / "calib", rng, model, 48), \
        labelled_samples(tmp_path / "val", rng, model, 64)


def test_per_quantizer_analysis_ranks_the_broken_weight_first(crafted):
    model, _, calib, val = crafted
    cfg = Config(per_channel=False, weight_range="minmax", holdout=0, batch_size=16)
    state = run_steps(prepare(model, cfg), Context(DataSource(calib, model_inputs(model))), {})
    scorer = Scorer(model, DataSource(val, model_inputs(model)), 16)
    assert scorer.kind == "top-1 %" and scorer.reference[0] == 100.0
    rows = per_quantizer(state, scorer)
    assert rows[0]["id"] == "weight:conv1" and rows[0]["drop"] > 20
    assert all(r["drop"] <= 5 for r in rows[1:]), rows
    fixed = scorer.score(export_qdq(raise_quantizers(state, ["weight:conv1"])))
    assert fixed["drop"] <= 5
    fp32 = export_qdq(raise_quantizers(state, ["weight:conv1"], "fp32"))
    dq_inputs = {i for n in fp32.graph.node if n.op_type == "DequantizeLinear" for i in n.input}
    assert not any(i.startswith("conv1/weight") for i in dq_inputs)  # left in floating point


def test_auto_fix_raises_exactly_the_broken_quantizer(crafted, tmp_path, capsys):
    _, path, calib, val = crafted
    out = tmp_path / "q.onnx"
    args = ["run", str(path), "--calib", str(calib), "--eval", str(val), "--per-tensor", "--weight-range", "minmax",
            "-o", str(out),
            "--max-drop", "5", "--no-repair"]  # the gate's auto-fix, not the fidelity bounds' repair
    assert main(args) == 3  # without the fix the gate fails
    assert main(args + ["--auto-fix"]) == 0
    rep = json.loads((tmp_path / "q.report.json").read_text())
    fix = rep["auto_fix"]
    assert fix["raised"] == ["weight:conv1"] and fix["met"]
    # auto-fix scored the gate as the gate runs the model: the same drop, and the gate passed
    assert fix["drop_after"] == rep["evaluation"]["top1_drop"]
    assert rep["gate"]["line"].startswith("accuracy gate passed")
    assert rep["weights"]["conv1"]["bits"] == 16 and rep["evaluation"]["top1_drop"] <= 5
    assert "auto-fix: raised 1 of" in capsys.readouterr().out
    q = onnx.load(str(out))
    int16 = {t.name for t in q.graph.initializer if t.data_type == onnx.TensorProto.INT16}
    assert int16 == {"conv1/weight/quantized", "conv1/weight/zero_point"}  # the conv weight, stored at 16 bits
    np.testing.assert_allclose(run(q, {"x": np.zeros((1, 3, 8, 8), np.float32)})[0].shape, (1, 5))  # it runs
    recipe = tmp_path / "r.toml"
    recipe.write_text("debug_samples = 24\n")  # rank on 24 samples, pre-check each step there, confirm on all 64
    assert main(args + ["--auto-fix", "--recipe", str(recipe)]) == 0
    fix = json.loads((tmp_path / "q.report.json").read_text())["auto_fix"]
    assert fix["raised"] == ["weight:conv1"] and fix["history"][-1]["on"] == "gate data"


@pytest.mark.parametrize("build,cle", [(zoo, False), (zoo, True), (conv_bn_relu, True), (two_inputs, False)])
def test_fp32_sanity_holds_for_test_models(rng, tmp_path, build, cle):
    model = build(rng)
    inputs = model_inputs(model)
    folder = tmp_path / "s"
    folder.mkdir()
    for k in range(8):
        np.savez(folder / f"s{k}.npz", **{i.name: rng.normal(0, 1, [d or 2 for d in i.shape[1:]])
                                          .astype(np.float32) for i in inputs})
    src = DataSource(folder, inputs)
    state = run_steps(prepare(model, Config(cle=cle, holdout=0)), Context(src), {})
    assert fp32_sanity(model, state, Scorer(model, src, 4))["ok"]


def test_fp32_sanity_fails_loudly_when_the_pipeline_changes_fp32(rng, tmp_path):
    model = conv_bn_relu(rng, act="Clip")
    folder = tmp_path / "s"
    folder.mkdir()
    for k in range(8):
        np.save(folder / f"s{k}.npy", rng.normal(0, 4, (3, 8, 8)).astype(np.float32))
    src = DataSource(folder, model_inputs(model))
    state = run_steps(prepare(model, Config(cle=True, cle_relu6="relu", holdout=0)), Context(src), {})
    assert not fp32_sanity(model, state, Scorer(model, src, 4))["ok"]


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.h3, self.svgs = [], 0

    def handle_starttag(self, tag, attrs):
        self.svgs += tag == "svg"
        self._in_h3 = tag == "h3"

    def handle_data(self, data):
        if getattr(self, "_in_h3", False):
            self.h3.append(data)
            self._in_h3 = False


def test_debug_command_writes_a_parseable_report_with_charts(crafted, tmp_path, capsys):
    _, path, calib, val = crafted
    mod = tmp_path / "mymetric.py"
    mod.write_text("import numpy as np\n"
                   "def margin(fp, q, labels):\n"
                   "    return float(-np.abs(fp['logits'] - q['logits']).mean())\n")
    sys.path.insert(0, str(tmp_path))
    try:
        out = tmp_path / "dbg.html"
        assert main(["debug", str(path), "--calib", str(calib), "--eval", str(val), "--per-tensor", "--worst", "3",
                     "--weight-range", "minmax",
                     "-o", str(out)]) == 0
        html = out.read_text()
        p = _Collect()
        p.feed(html)
        assert p.h3[:3] == [r["id"] for r in json.loads(out.with_suffix(".json").read_text())["per_quantizer"][:3]]
        assert p.h3[0] == "weight:conv1"
        assert p.svgs == 1 + 2 * 3  # the ranking bars, then a box chart and a histogram per worst quantizer
        for svg in html.split("<svg")[1:]:
            ET.fromstring("<svg" + svg.split("</svg>")[0] + "</svg>")  # each chart is well-formed SVG
        assert "weights dominate" in capsys.readouterr().out
        assert main(["debug", str(path), "--calib", str(calib), "--per-tensor", "--metric", "mymetric:margin",
                     "--weight-range", "minmax",
                     "-o", str(tmp_path / "d2.html"), "-q"]) == 0
        r2 = json.loads((tmp_path / "d2.json").read_text())
        assert r2["metric"] == "user metric" and r2["per_quantizer"][0]["id"] == "weight:conv1"
    finally:
        sys.path.remove(str(tmp_path))


def test_bad_metric_and_auto_fix_usage_exit_2(crafted, tmp_path, capsys):
    _, path, calib, _ = crafted
    assert main(["debug", str(path), "--calib", str(calib), "--metric", "nosuchmod:f", "-o",
                 str(tmp_path / "x.html")]) == 2
    assert "cannot import nosuchmod" in capsys.readouterr().err
    assert main(["run", str(path), "--calib", str(calib), "--auto-fix", "-o", str(tmp_path / "x.onnx")]) == 2
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "x.html").exists()


def test_16_bit_grids_keep_a_large_bias_exact_in_onnxruntime(rng, tmp_path):
    # at 16-bit input and weight scales a bias of 50 overflows int32 (50 / (1e-4 · 3e-5)): it must not be left to
    # onnxruntime, whose QDQ transformers would quantize a float bias to int32 themselves
    from builders import init, make
    from ptq.observe import session
    w = rng.normal(0, 1, (4, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], "conv", pads=[1, 1, 1, 1])]
    model = make(nodes, [("x", [None, 3, 6, 6])], [("y", [None, 4, 6, 6])],
                 [init("w", w), init("b", np.full(4, 50.0, np.float32))])
    x = rng.normal(0, 1, (8, 3, 6, 6)).astype(np.float32)

    class Src:
        def __len__(self):
            return 8

        def batches(self, bs):
            yield list(range(8)), {"x": x}
    state = run_steps(prepare(model, Config(holdout=0)), Context(Src()), {})
    q = export_qdq(raise_quantizers(state, ["weight:conv", "act:x", "act:y"]))
    assert "Add" in {n.op_type for n in q.graph.node}  # the bias moved to a float Add
    ref = run(model, {"x": x})[0]
    for exact in (False, True):
        y = session(q, exact_qdq=exact).run(None, {"x": x})[0]
        np.testing.assert_allclose(y, ref, atol=2e-2 * np.abs(ref).max())


@pytest.mark.parametrize("flags", [["--bias-correction", "empirical"], ["--adaround", "--adaround-iters", "50"],
                                   ["--cle", "--adaround", "--adaround-iters", "50", "--bias-correction",
                                    "empirical"]])
def test_debug_fp32_sanity_holds_after_stages_that_change_biases(rng, tmp_path, capsys, flags):
    """Bias correction and AdaRound decide new biases for the quantized layers; the FP32 reference that the
    debugging flow bypasses quantizers into keeps its own, so 'the rest FP32' is FP32."""
    path = tmp_path / "zoo.onnx"
    onnx.save(zoo(rng), str(path))
    calib = tmp_path / "calib"
    calib.mkdir()
    for k in range(24):
        np.save(calib / f"s{k:02d}.npy", rng.normal(0.5, 1, (3, 16, 16)).astype(np.float32))
    out = tmp_path / "d.html"
    assert main(["debug", str(path), "--calib", str(calib), "--weight-bits", "4", "--no-adaround", "-o", str(out),
                 "-q"] + flags) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["fp32_sanity"]["ok"], report["fp32_sanity"]
    assert report["fp32_sanity"]["max_relative_change"] < 1e-4
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_debug_run_and_the_api_build_the_same_model_choices_included(rng, tmp_path):
    """At 4-bit weights ptq compares CLE and weight symmetry on the held-back samples: ptq debug analyses the very
    model that ptq run writes and ptq.quantize returns (same bytes), the choices included."""
    import hashlib
    from ptq.debug import debug
    from ptq.pipeline import Config
    from ptq.run import quantize
    from ptq_cli.main import main
    path = tmp_path / "zoo.onnx"
    onnx.save(zoo(rng), str(path))
    calib = save_npy_samples(tmp_path / "calib", rng, (3, 16, 16), 24)
    settings = dict(weight_bits=4, adaround_iters=5, latency_runs=0, holdout=8)
    recipe = tmp_path / "r.toml"
    recipe.write_text("".join(f"{k} = {v}\n" for k, v in settings.items()) + "repair = false\n")
    assert main(["run", str(path), "--calib", str(calib), "-o", str(tmp_path / "q.onnx"), "--recipe", str(recipe),
                 "-q"]) == 0
    written = hashlib.sha256((tmp_path / "q.onnx").read_bytes()).hexdigest()
    api = quantize(path, calib, repair=False, **settings)
    assert {"cle", "weight_symmetric"} <= set(api.report["stages"]["choices"])
    assert hashlib.sha256(api.model.SerializeToString()).hexdigest() == written
    _, _, report = debug(path, calib, tmp_path / "d.html", Config(**settings, debug_samples=8))
    assert report["quantized_sha256"] == written
    assert set(report["choices"]) >= {"cle", "weight_symmetric"}
