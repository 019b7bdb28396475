"""CLE, high-bias absorption and bias correction: FP32 invariance, the equalization fixed point, and the mean
output error, against onnxruntime and Monte-Carlo references."""
import numpy as np
import pytest
from builders import conv_bn_relu, init, make, run, save_npy_samples
from onnx import helper

from ptq.data import DataSource, model_inputs
from ptq.model import Graph
from ptq.moments import clipped_normal_moments
from ptq.pipeline import Config, Context, prepare, run_steps
from ptq.quant import fake_quant
from ptq.stages.cle import find_cle_pairs
from ptq.stages.fold_bn import BNStats
from ptq.weights import in_axis, layer_kind, per_channel_absmax


def chain(rng, act="Clip", pad=False):
    """x -> conv 3x3 -> act -> [Pad] -> depthwise 3x3 -> act -> conv 1x1 -> y, with very unequal channels."""
    c = 6
    spread = np.array([0.01, 0.1, 1, 5, 20, 0.5], np.float32)
    w1 = (rng.normal(0, 1, (c, 3, 3, 3)) * spread[:, None, None, None]).astype(np.float32)
    wd = (rng.normal(0, 1, (c, 1, 3, 3)) / spread[:, None, None, None]).astype(np.float32)
    w2 = rng.normal(0, 1, (4, c, 1, 1)).astype(np.float32)
    inits = [init("w1", w1), init("b1", rng.normal(0, 1, c).astype(np.float32)), init("wd", wd),
             init("bd", rng.normal(0, 1, c).astype(np.float32)), init("w2", w2), init("lo", np.float32(0)),
             init("hi", np.float32(6)), init("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))]

    def a(src, dst):
        return helper.make_node("Clip", [src, "lo", "hi"], [dst]) if act == "Clip" else \
            helper.make_node("Relu", [src], [dst])
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]), a("c1", "a1")]
    if pad:
        nodes += [helper.make_node("Pad", ["a1", "pads"], ["p1"], mode="constant"),
                  helper.make_node("Conv", ["p1", "wd", "bd"], ["cd"], group=c)]
    else:
        nodes += [helper.make_node("Conv", ["a1", "wd", "bd"], ["cd"], group=c, pads=[1, 1, 1, 1])]
    nodes += [a("cd", "ad"), helper.make_node("Conv", ["ad", "w2"], ["y"])]
    return make(nodes, [("x", [None, 3, 8, 8])], [("y", [None, 4, 8, 8])], inits)


@pytest.mark.parametrize("act,pad", [("Relu", False), ("Clip", False), ("Clip", True)])
def test_cle_keeps_fp32_outputs_and_reaches_fixed_point(rng, act, pad):
    model = chain(rng, act, pad)
    x = rng.normal(0, 2, (4, 3, 8, 8)).astype(np.float32)
    state = run_steps(prepare(model, Config(steps=["cle"])), Context(), {})
    ref, got = run(model, {"x": x})[0], run(state.model, {"x": x})[0]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= 1e-5
    gr = Graph(state.model)
    pairs = find_cle_pairs(state, gr)
    assert len(pairs) == 2  # conv -> depthwise, depthwise -> conv
    for l1, l2 in pairs:
        r1 = per_channel_absmax(gr.const(l1.weight), l1.w_axis)
        r2 = per_channel_absmax(gr.const(l2.weight), in_axis(layer_kind(gr, l2), l2.w_axis))
        np.testing.assert_allclose(r1, r2, rtol=1e-4)  # r1_i / s_i = r2_i · s_i
    first = per_channel_absmax(Graph(prepare(model, Config()).model).const("w1"), 0)
    assert first.max() / first.min() > 1000 and r1.max() / r1.min() < first.max() / first.min()
    if act == "Clip":
        assert state.report["cle"]["relu6_kept_with_channel_bound"]  # exact: Relu + per-channel Min


def test_relu6_replaced_by_relu_when_asked(rng):
    model = chain(rng, "Clip")
    state = run_steps(prepare(model, Config(steps=["cle"], cle_relu6="relu")), Context(), {})
    assert len(state.report["cle"]["relu6_replaced_by_relu"]) == 2
    assert not any(n.op_type in ("Clip", "Min") for n in state.model.graph.node)


def test_high_bias_absorption_is_exact_where_inputs_exceed_c(rng):
    # conv 3x3 (tiny weights) -> BN (β = 5, γ = 0.5, mean 0, var 1) -> Relu -> conv 1x1: pre-activations ≈ 5 > c
    c = 4
    w1 = rng.normal(0, 0.01, (c, 3, 3, 3)).astype(np.float32)
    inits = [init("w1", w1), init("g", np.full(c, 0.5, np.float32)), init("b", np.full(c, 5.0, np.float32)),
             init("m", np.zeros(c, np.float32)), init("v", np.ones(c, np.float32)),
             init("w2", rng.normal(0, 1, (2, c, 1, 1)).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "g", "b", "m", "v"], ["bn"]),
             helper.make_node("Relu", ["bn"], ["r"]), helper.make_node("Conv", ["r", "w2"], ["y"])]
    model = make(nodes, [("x", [None, 3, 6, 6])], [("y", [None, 2, 6, 6])], inits)
    state = run_steps(prepare(model, Config(steps=["bias_absorption"])), Context(), {})
    shift = state.report["bias_absorption"]
    (info,) = shift.values()
    bn = next(iter(state.bn.values()))
    want_c = 5.0 - 3 * 0.5 * np.sqrt(1 / (1 + 1e-5))
    assert info["max_shift"] == pytest.approx(want_c, rel=1e-5)
    np.testing.assert_allclose(bn.beta, 5.0 - want_c, rtol=1e-5)
    x = rng.normal(0, 1, (2, 3, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(run(state.model, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_empirical_bias_correction_removes_mean_output_error(rng, tmp_path):
    # Gemm whose weights all sit at 0.4 of a 4-bit step above the grid: nearest rounding is biased
    step = 0.1
    w = (np.round(rng.normal(0, 0.3, (6, 5)) / step) + 0.4).astype(np.float32) * step
    w[:, 0] = 7 * step  # pins the per-channel scale to `step`
    inits = [init("w", w), init("b", np.zeros(5, np.float32))]
    model = make([helper.make_node("Gemm", ["x", "w", "b"], ["y"])], [("x", [None, 6])], [("y", [None, 5])], inits)
    calib = save_npy_samples(tmp_path / "c", rng, (6,), 64)
    for f in calib.glob("*.npy"):  # inputs with a non-zero mean
        np.save(f, np.load(f) + 2.0)
    cfg = dict(weight_bits=4, adaround=False, weight_range="minmax", batch_size=16)
    x = np.stack([np.load(f) for f in sorted(calib.glob("*.npy"))])
    errors = {}
    for bc in (None, "empirical"):
        steps = ["weight_ranges"] + (["bias_correction"] if bc else [])
        state = prepare(model, Config(**cfg, bias_correction=bc, steps=steps))
        state = run_steps(state, Context(DataSource(calib, model_inputs(model))), {})
        g = Graph(state.model)
        layer = state.layers[0]
        wq = fake_quant(g.const(layer.weight), state.weights[layer.name])
        yq = x @ wq + state.bias(layer, g)  # the corrected bias is a decision; the reference keeps "b"
        errors[bc] = np.abs((yq - x @ w).mean(axis=0)).max()
    assert errors[None] > 0.1
    assert errors["empirical"] < 1e-5


def test_analytic_clipped_normal_mean_matches_monte_carlo(rng):
    mu, sd = np.array([0.5, 1.0, -1.0, 3.0, 7.0]), np.array([1.0, 2.0, 0.5, 1.0, 2.0])
    lo, hi = np.array([0, 0, -np.inf, 0, 0]), np.array([np.inf, 6, 0, 6, 6])
    mean, std = clipped_normal_moments(mu, sd, lo, hi)
    z = np.clip(rng.normal(mu, sd, (400_000, 5)), lo, hi)
    np.testing.assert_allclose(mean, z.mean(0), atol=0.01)
    np.testing.assert_allclose(std, z.std(0), atol=0.01)


def test_bn_std_accounts_for_eps():
    st = BNStats(gamma=np.array([2.0, -3.0]), beta=np.zeros(2), mean=np.zeros(2), var=np.array([1.0, 1e-9]), eps=1e-3)
    np.testing.assert_allclose(st.std, [2 * np.sqrt(1 / 1.001), 3 * np.sqrt(1e-9 / (1e-9 + 1e-3))], rtol=1e-6)


def test_data_free_run_needs_no_calibration(rng, tmp_path, capsys):
    import json

    import onnx

    from ptq_cli.main import main
    path = tmp_path / "m.onnx"
    onnx.save(conv_bn_relu(rng, act="Clip"), str(path))
    assert main(["run", str(path), "--data-free", "--input-range", "-3,3", "-o", str(tmp_path / "q.onnx")]) == 0
    report = json.loads((tmp_path / "q.report.json").read_text())
    assert report["settings"]["steps"][:2] == ["cle", "bias_absorption"]
    assert report["stages"]["bias_correction"]["mode"] == "analytic"
    assert "warnings" not in report["stages"] and "warning" not in capsys.readouterr().err  # it has a BN
    acts = report["activations"]
    assert acts["x"]["lo"] == pytest.approx(-3, abs=0.05) and acts["x"]["hi"] == pytest.approx(3, abs=0.05)
    assert acts["y"]["method"] == "moments"  # the last conv has no BN: moments propagated through it
    calib = save_npy_samples(tmp_path / "c", rng, (3, 8, 8), 16)
    q = run(onnx.load(str(tmp_path / "q.onnx")), {"x": np.load(next(calib.glob("*.npy")))[None]})[0]
    f = run(onnx.load(str(path)), {"x": np.load(next(calib.glob("*.npy")))[None]})[0]
    assert np.corrcoef(q.ravel(), f.ravel())[0, 1] > 0.98


def test_data_free_falls_back_to_synthetic_inputs_for_unreached_tensors(rng):
    # a Sigmoid is no moment rule: the Add after it is reached only by the synthetic fallback
    from builders import init, make
    inits = [init("w", rng.normal(0, 1, (4, 3, 1, 1)).astype(np.float32))]
    inits.append(init("w2", rng.normal(0, 1, (4, 4, 1, 1)).astype(np.float32)))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Sigmoid", ["c"], ["s"]),
             helper.make_node("Add", ["s", "c"], ["a"]), helper.make_node("Conv", ["a", "w2"], ["y"])]
    model = make(nodes, [("x", [None, 3, 4, 4])], [("y", [None, 4, 4, 4])], inits)
    state = run_steps(prepare(model, Config(data_free=True, input_range=(-1, 1))), Context(), {})
    assert "s" in state.report["data_free_ranges"]["synthetic_fallback"]
    assert "no BatchNormalization" in state.report["warnings"][0]  # this model has none: warned
    assert state.acts["s"].method == "minmax (synthetic inputs)"
    assert 0.0 <= float(state.acts["s"].lo) and float(state.acts["s"].hi) <= 1.0 + 1e-6


def saved_chain(rng, tmp_path):
    """The chain model in a file, and 24 calibration samples."""
    import onnx
    path = tmp_path / "chain.onnx"
    onnx.save(chain(rng), str(path))
    return path, save_npy_samples(tmp_path / "calib", rng, (3, 8, 8), 24, scale=2.0)


def test_cle_by_default_at_four_bits_keeps_the_setting_closer_to_fp32(rng, tmp_path, monkeypatch):
    """At 4-bit weights CLE comes on by default and ptq.quantize compares it with CLE off, each candidate quantized
    by a shortened run (AdaRound with a fifth of its iterations): the SQNRs the report gives are those of the two
    models quantized so with the setting given (their fidelity on the same held-back samples), the setting kept is
    the closer one, and the model returned is quantized with it in full (AdaRound's last run, all iterations). A
    user's --cle / --no-cle skips the comparison."""
    from ptq import pipeline
    from ptq.run import quantize
    path, calib = saved_chain(rng, tmp_path)
    kw = dict(weight_bits=4, holdout=8, latency_runs=0, adaround_iters=100, weight_symmetric=True)
    rounded = []
    real = pipeline.STEPS["adaround"]
    monkeypatch.setitem(pipeline.STEPS, "adaround", lambda state, ctx: rounded.append(
        (state.config.cle, state.config.adaround_iters)) or real(state, ctx))
    r = quantize(path, calib, **kw)
    choice = r.report["stages"]["cle_choice"]
    kept_cle = choice["kept"] == "cle"
    assert kept_cle == (choice["sqnr_db_with"] >= choice["sqnr_db_without"])
    assert rounded == [(True, 20), (False, 20), (kept_cle, 100)] and r.report["settings"]["cle"] == kept_cle
    assert ("cle" in r.report["stages"]) == kept_cle
    assert r.report["stages"]["choices"]["cle"].startswith("on" if kept_cle else "off")
    for cle, key in ((True, "sqnr_db_with"), (False, "sqnr_db_without")):
        short = quantize(path, calib, cle=cle, **{**kw, "adaround_iters": 20, "adaround_rows": 2048})
        assert short.fidelity["outputs"]["y"]["sqnr_db"] == pytest.approx(choice[key], abs=0.01)
        assert "cle_choice" not in quantize(path, calib, cle=cle, **kw).report["stages"]


def test_the_cle_choice_stays_in_the_report_when_asymmetric_weights_are_kept(rng, tmp_path, monkeypatch):
    """Both choices run (CLE, then symmetry, comparing three closeness numbers: the symmetric candidate is the
    CLE candidate kept): with the comparisons made to keep CLE and then asymmetric grids, the returned model's
    report has both comparisons' numbers and is quantized with both settings."""
    from ptq import choices as choices_module, run as run_module
    path, calib = saved_chain(rng, tmp_path)
    scores = iter([2.0, 1.0, 3.0])  # with CLE / without; asymmetric (symmetric: with CLE)
    monkeypatch.setattr(choices_module, "_closeness", lambda *a, **k: next(scores))
    r = run_module.quantize(path, calib, weight_bits=4, holdout=8, latency_runs=0, adaround_iters=20)
    stages = r.report["stages"]
    assert stages["symmetry_choice"]["kept"] == "asymmetric"
    assert stages["cle_choice"] == {"sqnr_db_with": 2.0, "sqnr_db_without": 1.0, "kept": "cle"}
    assert stages["symmetry_choice"] == {"sqnr_db_symmetric": 2.0, "sqnr_db_asymmetric": 3.0, "kept": "asymmetric"}
    assert "cle" in stages and stages["choices"]["cle"].startswith("on")
    assert all(not w["symmetric"] for w in r.report["weights"].values())


def test_weight_symmetry_at_four_bits_is_chosen_by_the_held_back_samples(rng, tmp_path):
    """At 4-bit weights ptq.quantize compares symmetric and asymmetric grids, each by a shortened run (here as
    long as the full one: 20 AdaRound iterations): the SQNRs the report gives are those of the two models
    quantized so (their fidelity on the same held-back samples), the
    model returned has the closer one's symmetry in every weight, the CLE decision is the same in both, and a
    user's --weight-symmetric / --weight-asymmetric skips the comparison."""
    from ptq.run import quantize
    path, calib = saved_chain(rng, tmp_path)
    kw = dict(weight_bits=4, holdout=8, latency_runs=0, adaround_iters=20, cle=False)
    r = quantize(path, calib, **kw)
    choice = r.report["stages"]["symmetry_choice"]
    asym = choice["kept"] == "asymmetric"
    assert asym == (choice["sqnr_db_asymmetric"] > choice["sqnr_db_symmetric"])
    assert all(w["symmetric"] != asym for w in r.report["weights"].values())
    assert r.report["stages"]["choices"]["weight_symmetric"].startswith("asymmetric" if asym else "symmetric")
    assert "cle" not in r.report["stages"]
    for symmetric, key in ((True, "sqnr_db_symmetric"), (False, "sqnr_db_asymmetric")):
        short = quantize(path, calib, weight_symmetric=symmetric, **{**kw, "adaround_rows": 2048})
        assert short.fidelity["outputs"]["y"]["sqnr_db"] == pytest.approx(choice[key], abs=0.01)
        rep = quantize(path, calib, weight_symmetric=symmetric, **kw).report
        assert "symmetry_choice" not in rep["stages"] and "weight_symmetric" not in rep["stages"]["choices"]
        assert all(w["symmetric"] == symmetric for w in rep["weights"].values())
