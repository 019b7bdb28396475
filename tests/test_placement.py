"""Placement by measured latency (ptq.placement): which quantizers a float layer takes with it, the greedy
decision on given timings, its cache, and the skip for models whose time is the runtime's overhead."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

import ptq.placement as placement
from builders import init, make, save_npy_samples
from ptq.data import DataSource, model_inputs
from ptq.export import export_qdq
from ptq.pipeline import Config, Context, prepare, run_steps


def chain3(rng):
    """x -> conv1 -> relu -> conv2 -> relu -> conv3 -> y (1×1 convolutions, 6 channels)."""
    w = lambda *s: rng.normal(0, 0.4, s).astype(np.float32)  # noqa: E731
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], "conv1"), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], "conv2"), helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Conv", ["r2", "w3"], ["y"], "conv3")]
    inits = [init("w1", w(6, 3, 1, 1)), init("w2", w(6, 6, 1, 1)), init("w3", w(4, 6, 1, 1))]
    return make(nodes, [("x", [None, 3, 8, 8])], [("y", [None, 4, 8, 8])], inits)


def quantized_state(rng, tmp_path, model):
    calib = save_npy_samples(tmp_path / "calib", rng, (3, 8, 8), 8)
    state = prepare(model, Config(holdout=0, batch_size=4, reduce_range="never"))
    return run_steps(state, Context(DataSource(calib, model_inputs(model))), {})


def act_tensors(state):
    return {r for r in state.acts}


def test_a_float_layer_takes_only_the_quantizers_no_int8_node_uses(rng, tmp_path):
    state = quantized_state(rng, tmp_path, chain3(rng))
    root = state.placement.root
    acts = {root[t] for t in ("x", "r1", "r2", "y")}
    assert acts <= act_tensors(state) and set(state.weights) == {"conv1", "conv2", "conv3"}
    middle = placement.in_float(state, ["conv2"])
    # r1 is read by float conv2 alone: it goes (conv1 then runs unfused); r2 is read by int8 conv3: it stays
    assert set(middle.weights) == {"conv1", "conv3"} and act_tensors(middle) == {root[t] for t in ("x", "r2", "y")}
    tail = placement.in_float(state, ["conv2", "conv3"])
    # r2 is read by float conv3 alone, y is a graph output written by float conv3: both go
    assert act_tensors(tail) == {root["x"]}
    head = placement.in_float(state, ["conv1"])
    # x is read by float conv1 alone: it goes, so conv1 reads no quantized tensor and may write one (r1)
    assert act_tensors(head) == {root[t] for t in ("r1", "r2", "y")}
    none = placement.in_float(state, ["conv1", "conv2", "conv3"])
    assert not none.weights and not none.acts
    assert not [n for n in export_qdq(none).graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert state.weights.keys() == {"conv1", "conv2", "conv3"}  # the state it came from is untouched


def test_a_float_layer_between_int8_readers_and_writers_loses_its_output_quantizer(rng, tmp_path):
    """x feeds conv1 and conv2 (both read the quantized x); conv2 in float would sit between x's DequantizeLinear
    and its output's QuantizeLinear, where onnxruntime quantizes float weights itself: its output goes float."""
    w = lambda *s: rng.normal(0, 0.4, s).astype(np.float32)  # noqa: E731
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], "conv1"),
             helper.make_node("Conv", ["x", "w2"], ["b"], "conv2"), helper.make_node("Add", ["a", "b"], ["s"], "add"),
             helper.make_node("Conv", ["s", "w3"], ["y"], "conv3")]
    model = make(nodes, [("x", [None, 3, 8, 8])], [("y", [None, 4, 8, 8])],
                 [init("w1", w(6, 3, 1, 1)), init("w2", w(6, 3, 1, 1)), init("w3", w(4, 6, 1, 1))])
    state = quantized_state(rng, tmp_path, model)
    root = state.placement.root
    assert {root["x"], root["b"]} <= act_tensors(state)
    placed = placement.in_float(state, ["conv2"])
    assert root["x"] in act_tensors(placed) and root["b"] not in act_tensors(placed)


def test_a_float_layer_runs_closer_to_fp32(rng, tmp_path):
    model = chain3(rng)
    state = quantized_state(rng, tmp_path, model)
    x = {"x": rng.normal(0, 1, (4, 3, 8, 8)).astype(np.float32)}

    def err(m):
        fp = ort.InferenceSession(model.SerializeToString()).run(None, x)[0]
        return float(((ort.InferenceSession(m.SerializeToString()).run(None, x)[0] - fp) ** 2).sum())
    whole, part, middle, none = (err(export_qdq(s)) for s in (
        state, placement.in_float(state, ["conv3"]), placement.in_float(state, ["conv2"]),
        placement.in_float(state, ["conv1", "conv2", "conv3"])))
    assert none < 1e-8 < part < whole and middle < whole  # each really runs in float on this machine


def fake_timings(monkeypatch, kernel_us, trial_ratio, final_lo):
    """node_times from {layer: (int8 µs, fp32 µs)}; paired_ratio(a, b) from ``trial_ratio(a, b)``, or where that is
    None (a comparison with FP32) 1.0 with the interval's lower bound ``final_lo``."""
    calls = {"trials": [], "profiles": 0}

    def node_times(model, feed, runs=10):
        calls["profiles"] += 1
        quantized = any(n.op_type == "QuantizeLinear" for n in model.graph.node)
        return {(f"{name}_token_1" if quantized else name, "op"): us[0 if quantized else 1]
                for name, us in kernel_us.items()}

    def paired_ratio(a, b, feed, runs=20, warmup=3, until=None):
        calls["trials"].append(b)
        ratio = trial_ratio(a, b)  # None: a comparison with FP32 (lower bound final_lo)
        lo = final_lo if ratio is None else ratio * 0.95
        ratio = final_lo * 1.05 if ratio is None else ratio
        return {"fp32_ms": 1.0, "quant_ms": 1.5, "ratio": ratio, "ratio_ci": [lo, ratio * 1.05], "runs": runs}
    monkeypatch.setattr(placement, "node_times", node_times)
    monkeypatch.setattr(placement, "paired_ratio", paired_ratio)
    monkeypatch.setattr(placement, "_opened", lambda model, feed: model)  # the fake times models, not sessions
    return calls


def float_convs(model):
    """Convolutions whose weight is not dequantized (they run in float)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    return {n.name for n in model.graph.node if n.op_type == "Conv"
            and getattr(producers.get(n.input[1]), "op_type", None) != "DequantizeLinear"}


def chain3_with_3x3(rng, tmp_path):
    """chain3 with a padded 3×3 first convolution (a pattern of its own), its quantized state and QDQ model."""
    model = chain3(rng)
    w1 = rng.normal(0, 0.4, (6, 3, 3, 3)).astype(np.float32)
    model.graph.initializer[0].CopyFrom(init("w1", w1))
    model.graph.node[0].attribute.extend([helper.make_attribute("pads", [1, 1, 1, 1])])
    state = quantized_state(rng, tmp_path, model)
    qmodel = export_qdq(state)
    return model, state, qmodel


def test_the_greedy_keeps_a_float_pattern_only_where_the_model_got_faster(rng, tmp_path, monkeypatch):
    """Two patterns lose in int8 (conv1 3×3: 50 against 10 µs; the 1×1 pair: 30 against 20); floating the 3×3
    makes the model 0.8× as slow, floating the 1×1 pair 1.1×: only the first is kept, and it is tried first
    (the larger loss)."""
    model, state, qmodel = chain3_with_3x3(rng, tmp_path)
    kernel = {"conv1": (50.0, 10.0), "conv2": (15.0, 10.0), "conv3": (15.0, 10.0)}

    def trial(a, b):
        if a is qmodel and b is qmodel:
            return None
        if not float_convs(a) and not float_convs(b):  # against FP32: no int8 convolution in a
            return None
        new = float_convs(b) - float_convs(a)
        return 0.8 if new == {"conv1"} else 1.1 if new else None
    calls = fake_timings(monkeypatch, kernel, trial, final_lo=0.7)
    monkeypatch.setattr(placement, "MIN_MS", 0.0)
    feed = {"x": np.zeros((1, 3, 8, 8), np.float32)}
    placed, pmodel, info, _ = placement.place(model, state, qmodel, feed)
    assert [t["pattern"] for t in info["trials"]] == ["Conv conv 3×3", "Conv conv 1×1"]
    assert [t["kept"] for t in info["trials"]] == [True, False]
    assert info["float_patterns"] == ["Conv conv 3×3"] and not info["all_float"]
    assert float_convs(pmodel) == {"conv1"} and set(placed.weights) == {"conv2", "conv3"}
    assert calls["profiles"] == 2  # each model profiled once, not once per pattern
    # the decision is cached: the same quantized model is placed again without timing anything
    monkeypatch.setattr(placement, "_measure", lambda *a: (_ for _ in ()).throw(AssertionError("measured")))
    again = placement.place(model, state, qmodel, feed)
    assert again[1].SerializeToString() == pmodel.SerializeToString() and again[2]["cached"]


def test_the_placed_model_comes_back_with_its_last_comparison_with_fp32(rng, tmp_path, monkeypatch):
    """Floating the 3×3 makes the model slower: nothing goes float, and the last comparison with FP32 comes back
    with the model it timed (fresh), not from the cache."""
    model, state, qmodel = chain3_with_3x3(rng, tmp_path)
    kernel = {"conv1": (1000.0, 10.0), "conv2": (15.0, 10.0), "conv3": (15.0, 10.0)}
    calls = fake_timings(monkeypatch, kernel, lambda a, b: 1.1 if a is qmodel and b is not qmodel else None,
                         final_lo=0.7)
    monkeypatch.setattr(placement, "MIN_MS", 0.0)
    feed = {"x": np.zeros((1, 3, 8, 8), np.float32)}
    placed, pmodel, info, timed = placement.place(model, state, qmodel, feed)
    assert not info["float_patterns"] and len(info["trials"]) == 2
    assert pmodel is qmodel and timed.model is qmodel and timed.pair["ratio_ci"][0] == 0.7
    assert timed.fp32_nodes is not None and timed.quant_nodes is not None
    assert calls["trials"][0] is qmodel  # the first comparison, of the model written against FP32, stands
    assert placement.place(model, state, qmodel, feed)[3] is None  # cached: nothing was timed


def test_no_faster_placement_writes_the_model_in_float(rng, tmp_path, monkeypatch):
    """Every trial slower and the int8 model slower than FP32 with confidence (confirmed by a second comparison):
    written in float, said in a line. conv1's int8 kernel is the faster, and floating the 1×1 pair could save
    0.78 ms of the int8 model's 0.3 ms over FP32, so the pair is tried."""
    model, state, qmodel = chain3_with_3x3(rng, tmp_path)
    calls = fake_timings(monkeypatch, {"conv1": (5.0, 10.0), "conv2": (400.0, 10.0), "conv3": (400.0, 10.0)},
                         lambda a, b: 1.2 if b is not qmodel or a is not model else None, final_lo=1.3)
    monkeypatch.setattr(placement, "MIN_MS", 0.0)
    placed, pmodel, info, _ = placement.place(model, state, qmodel, {"x": np.zeros((1, 3, 8, 8), np.float32)})
    assert [t["pattern"] for t in info["trials"]] == ["Conv conv 1×1"]
    assert info["all_float"] and "written in float" in info["line"] and info["confirmation"]["ratio_ci"][0] == 1.3
    assert not placed.weights and not placed.acts
    assert not [n for n in pmodel.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert sum(b is qmodel for b in calls["trials"]) == 2  # the first comparison and its confirmation


def test_every_int8_kernel_slower_writes_float_without_trials(rng, tmp_path, monkeypatch):
    """Every pattern's int8 kernels slower than float in the profile and the int8 model slower with confidence:
    no mixed placement can be faster, so none is timed; the profile confirms the verdict, no second comparison.
    So too where floating every losing pattern saves less than the int8 model runs over FP32 (conv1 wins, the
    1×1 pair loses 0.01 ms against a gap of 0.3 ms). Where the int8 model's interval reaches under 1, the
    candidates are tried as usual."""
    model = chain3(rng)
    state = quantized_state(rng, tmp_path, model)
    qmodel = export_qdq(state)
    kernels = {"conv1": (15.0, 10.0), "conv2": (15.0, 10.0), "conv3": (15.0, 10.0)}
    calls = fake_timings(monkeypatch, kernels, lambda a, b: 1.2 if b is not qmodel or a is not model else None,
                         final_lo=1.3)
    monkeypatch.setattr(placement, "MIN_MS", 0.0)
    feed = {"x": np.zeros((1, 3, 8, 8), np.float32)}
    placed, pmodel, info, _ = placement.place(model, state, qmodel, feed)
    assert info["all_float"] and not info["trials"] and not placed.weights
    assert info["confirmation"] == {"why": "every int8 kernel slower than its float one", "losses_ms": 0.015,
                                    "gap_ms": 0.3}
    assert "every int8 kernel slower" in info["line"]
    assert sum(b is qmodel for b in calls["trials"]) == 1  # the first comparison only
    monkeypatch.setenv("PTQ_CACHE", str(tmp_path / "other"))
    fake_timings(monkeypatch, kernels, lambda a, b: 1.2 if b is not qmodel or a is not model else None,
                 final_lo=0.9)
    info = placement.place(model, state, qmodel, feed)[2]
    assert [t["pattern"] for t in info["trials"]] == ["Conv conv 1×1"] and not info["all_float"]
    monkeypatch.setenv("PTQ_CACHE", str(tmp_path / "gap"))
    model, state, qmodel = chain3_with_3x3(rng, tmp_path)
    fake_timings(monkeypatch, {"conv1": (5.0, 10.0), "conv2": (15.0, 10.0), "conv3": (15.0, 10.0)},
                 lambda a, b: 1.2 if b is not qmodel or a is not model else None, final_lo=1.3)
    info = placement.place(model, state, qmodel, feed)[2]
    assert info["all_float"] and not info["trials"] and "saves at most 0.01 ms of the 0.30 ms" in info["line"]


@pytest.mark.parametrize("ref_ratio, written, foldable", [(0.97, "original", True), (0.8, "reference", True),
                                                          (1.1, "original", True), (0.8, "original", False)])
def test_written_in_float_the_reference_only_where_it_is_faster_with_confidence(rng, tmp_path, monkeypatch,
                                                                                 ref_ratio, written, foldable):
    """No int8 placement beats FP32: the model written in float is ptq's folded reference only where its
    interval against the model as given is under 1 (0.8: 0.76–0.84); unresolved (0.97: 0.92–1.02) or slower, the
    model as given, byte for byte. A reference that folds no node away (chain3 without its BatchNormalization) is
    not timed: the model as given is written."""
    model = chain3(rng)
    if foldable:  # a BatchNormalization after conv1, which ptq's reference folds into it
        model.graph.node[0].output[0] = "c0"
        model.graph.node.insert(1, helper.make_node("BatchNormalization", ["c0", "g", "b", "m", "v"], ["c1"], "bn"))
        model.graph.initializer.extend([init(k, rng.uniform(0.5, 1.5, 6).astype(np.float32)) for k in "gbmv"])
    state = quantized_state(rng, tmp_path, model)
    qmodel = export_qdq(state)
    assert (len(export_qdq(placement._bare(state)).graph.node) < len(model.graph.node)) == foldable
    compared = []

    def trial(a, b):
        if a is model and not any(n.op_type == "QuantizeLinear" for n in b.graph.node):
            compared.append(b)
            return ref_ratio  # ptq's float reference against the model as given
        return 1.2 if b is not qmodel or a is not model else None
    fake_timings(monkeypatch, {"conv1": (15.0, 10.0), "conv2": (15.0, 10.0), "conv3": (15.0, 10.0)}, trial,
                 final_lo=1.3)
    monkeypatch.setattr(placement, "MIN_MS", 0.0)
    _, pmodel, info, _ = placement.place(model, state, qmodel, {"x": np.zeros((1, 3, 8, 8), np.float32)})
    assert info["all_float"] and info["float_model"] == written
    assert (pmodel.SerializeToString() == model.SerializeToString()) == (written == "original")
    assert len(compared) == foldable and ("not_timed" in info["float_reference_vs_original"]) != foldable


@pytest.mark.parametrize("verdicts,written", [(([1.04, 0.9, 1.2], [0.815, 0.7, 0.95]), "int8"),
                                              (([1.25, 1.1, 1.4], [0.925, 0.8, 1.05]), "float")])
def test_a_verdict_short_of_faster_is_pooled_with_a_second_comparison(rng, tmp_path, monkeypatch, verdicts,
                                                                       written):
    """The int8 model not faster than FP32 with confidence in one comparison: a second one is taken and the two
    pooled by inverse variance in log space. 1.04 (0.9–1.2) with 0.815 (0.7–0.95) pool to 0.927 (0.835–1.030):
    under 1, written in int8 with the pooled interval; 1.25 (1.1–1.4) with 0.925 (0.8–1.05) pool to 1.095: written
    in float."""
    model = chain3(rng)
    state = quantized_state(rng, tmp_path, model)
    qmodel = export_qdq(state)
    fake_timings(monkeypatch, {"conv1": (5.0, 10.0), "conv2": (5.0, 10.0), "conv3": (5.0, 10.0)},
                 lambda a, b: None, final_lo=1.0)  # no pattern loses in int8: no trial
    pending, rounds = iter(verdicts), []

    def paired_ratio(a, b, feed, runs=20, warmup=3, until=None):
        ratio, lo, hi = next(pending)
        rounds.append(runs)
        return {"fp32_ms": 1.0, "quant_ms": 1.2, "ratio": ratio, "ratio_ci": [lo, hi], "runs": runs}
    monkeypatch.setattr(placement, "paired_ratio", paired_ratio)
    monkeypatch.setattr(placement, "MIN_MS", 0.0)
    placed, pmodel, info, timed = placement.place(model, state, qmodel, {"x": np.zeros((1, 3, 8, 8), np.float32)})
    assert info["confirmation"]["ratio_ci"] == verdicts[1][1:]
    if written == "int8":
        assert not info["all_float"] and pmodel is qmodel and placed.weights
        assert info["ratio_to_fp32"] == 0.927 and info["ratio_ci"] == [0.835, 1.03]
        assert timed.pair["ratio"] == 0.927 and timed.pair["runs"] == sum(rounds) and len(rounds) == 2
    else:
        assert info["all_float"] and info["ratio_to_fp32"] == 1.095 and not placed.weights
        assert "1.09× FP32" in info["line"] and "two comparisons" in info["line"]


def test_a_model_faster_than_the_threshold_is_not_placed(rng, tmp_path):
    """The test models run in microseconds: placement is skipped, and the default run writes the same bytes as
    --placement all."""
    from ptq.run import quantize
    model = chain3(rng)
    calib = save_npy_samples(tmp_path / "calib", rng, (3, 8, 8), 24)
    measured = quantize(model, calib, holdout=8, reduce_range="never")
    plain = quantize(model, calib, holdout=8, reduce_range="never", placement="all")
    assert "skipped" in measured.report["placement"] and plain.report["placement"] is None
    assert measured.model.SerializeToString() == plain.model.SerializeToString()


def test_a_model_built_for_another_target_is_not_placed_here(rng, tmp_path):
    """Placement times this machine's runtime: built for the other target, it is skipped and says why."""
    from ptq.run import quantize
    from ptq.target import this_machine
    other = "vnni" if this_machine().name == "avx2" else "avx2"
    calib = save_npy_samples(tmp_path / "calib", rng, (3, 8, 8), 24)
    result = quantize(chain3(rng), calib, holdout=8, target=other)
    assert f"built for target {other}" in result.report["placement"]["skipped"]


def test_the_report_reuses_the_placements_timing_of_the_same_model_only(rng, tmp_path, monkeypatch):
    """measure_speed takes the pair and the node times measured already (``Timed``) for the very model it is
    given, and times a different model itself."""
    from ptq import speed
    model = chain3(rng)
    qmodel = export_qdq(quantized_state(rng, tmp_path, model))
    feed = {"x": np.zeros((1, 3, 8, 8), np.float32)}
    pair = {"fp32_ms": 1.0, "quant_ms": 0.5, "ratio": 0.5, "ratio_ci": [0.4, 0.6], "runs": 30}
    timed = speed.Timed(qmodel, pair, {("conv1", "Conv"): 7.0}, {("conv1_token_1", "QLinearConv"): 3.0})
    timed_calls = []
    real = speed.paired_ratio
    monkeypatch.setattr(speed, "paired_ratio", lambda *a, **k: timed_calls.append(a[1]) or real(*a, **k))
    got = speed.measure_speed(model, qmodel, feed, 5, timed)
    assert got["ratio"] == 0.5 and got["ratio_ci"] == [0.4, 0.6] and not timed_calls
    assert got["ops"] == {"fp32": {"Conv": 7.0}, "quantized": {"QLinearConv": 3.0}}
    other = onnx.ModelProto.FromString(qmodel.SerializeToString())
    got = speed.measure_speed(model, other, feed, 5, timed)
    assert timed_calls == [other] and got["runs"] == 5 and "QLinearConv" in got["ops"]["quantized"]


def test_a_model_written_as_given_is_not_timed_against_itself(rng, tmp_path, monkeypatch):
    """The FP32 model written back byte for byte: 1.0× by construction, no paired rounds (an A/A comparison would
    only report noise); a float model that differs in one weight is timed."""
    from ptq import speed
    model = chain3(rng)
    feed = {"x": np.zeros((1, 3, 8, 8), np.float32)}
    monkeypatch.setattr(speed, "paired_ratio", lambda *a, **k: (_ for _ in ()).throw(AssertionError("timed")))
    got = speed.measure_speed(model, onnx.ModelProto.FromString(model.SerializeToString()), feed, 20)
    assert got["ratio"] == 1.0 and got["same_model"] and got["fp32_ms"] == got["quant_ms"] > 0
    assert "ratio_ci" not in got and speed.verdict(got) is None
    changed = onnx.ModelProto.FromString(model.SerializeToString())
    changed.graph.initializer[0].raw_data = bytes(len(changed.graph.initializer[0].raw_data))
    assert not speed.same_model(model, changed)
    with pytest.raises(AssertionError, match="timed"):
        speed.measure_speed(model, changed, feed, 20)


def test_the_trials_time_open_sessions_of_the_models_they_compare(rng, tmp_path, monkeypatch):
    """With onnxruntime's real timings for the trial (the node profile given: the 3×3 loses in int8; the
    comparisons with FP32 given: int8 faster), the trial times the current model's session against the trial's,
    each warmed and run at least 10 rounds, and the model returned is the int8 one or the 3×3 in float, as the
    trial's ratio decided."""
    from ptq import speed
    model, state, qmodel = chain3_with_3x3(rng, tmp_path)
    opened = placement._opened
    fake = fake_timings(monkeypatch, {"conv1": (50.0, 10.0), "conv2": (5.0, 10.0), "conv3": (5.0, 10.0)},
                        lambda a, b: None, 0.5)
    faked = placement.paired_ratio
    sessions = []

    def paired_ratio(a, b, *args, **kw):
        if isinstance(a, onnx.ModelProto):  # a comparison with FP32
            return faked(a, b, *args, **kw)
        sessions.append((a, b))
        return speed.paired_ratio(a, b, *args, **kw)
    monkeypatch.setattr(placement, "_opened", opened)
    monkeypatch.setattr(placement, "paired_ratio", paired_ratio)
    monkeypatch.setattr(placement, "MIN_MS", 0.0)
    feed = {"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)}
    placed, pmodel, info, _ = placement.place(model, state, qmodel, feed)
    (trial,) = info["trials"]
    assert trial["pattern"] == "Conv conv 3×3" and 10 <= trial["rounds"] <= 400 and fake["profiles"] == 2
    assert len(sessions) == 1 and all(isinstance(s, ort.InferenceSession) for s in sessions[0])
    assert trial["kept"] == (trial["ratio_to_previous"] < 1 - placement.MIN_GAIN)
    assert float_convs(pmodel) == ({"conv1"} if trial["kept"] else set()) and not info["all_float"]


def test_a_layers_float_kernel_is_found_by_the_tensor_it_writes_in_the_model_given(rng):
    """conv1's bias Add is folded into it (canonicalization: conv1 then writes the Add's output), and onnxruntime
    names the FP32 model's convolution after its output in its blocked layout ("c1_nchwc"): the time is conv1's,
    found through the model as given; without it the kernel goes unattributed (a pattern never a candidate)."""
    model = chain3(rng)
    model.graph.node[0].output[0] = "c1raw"
    model.graph.node.insert(1, helper.make_node("Add", ["c1raw", "b1"], ["c1"], "bias1"))
    model.graph.initializer.append(init("b1", rng.normal(0, 0.1, (1, 6, 1, 1)).astype(np.float32)))
    state = prepare(model, Config(holdout=0))
    assert next(l for l in state.layers if l.name == "conv1").out != "c1raw"
    times = {("c1raw_nchwc", "Conv"): 40.0, ("conv2", "Conv"): 7.0, ("ReorderInput", "ReorderInput"): 3.0}
    assert placement.layer_times(state, times, model) == {"conv1": 40.0, "conv2": 7.0}
    assert placement.layer_times(state, times) == {"conv2": 7.0}


@pytest.mark.parametrize("ratio,kept", [(0.9, True), (0.96, False)])
def test_a_trial_keeps_float_only_where_it_is_faster_with_confidence(rng, tmp_path, monkeypatch, ratio, kept):
    """Floating the 3×3 gives 0.9 (interval 0.855–0.945): kept; 0.96 (0.912–1.008), faster by its point estimate
    but not with confidence: the layer stays int8."""
    model, state, qmodel = chain3_with_3x3(rng, tmp_path)

    def trial(a, b):
        new = float_convs(b) - float_convs(a)
        return ratio if new == {"conv1"} and a is qmodel else None
    fake_timings(monkeypatch, {"conv1": (50.0, 10.0), "conv2": (5.0, 10.0), "conv3": (5.0, 10.0)}, trial,
                 final_lo=0.7)
    monkeypatch.setattr(placement, "MIN_MS", 0.0)
    placed, pmodel, info, _ = placement.place(model, state, qmodel, {"x": np.zeros((1, 3, 8, 8), np.float32)})
    assert [t["pattern"] for t in info["trials"]] == ["Conv conv 3×3"]
    assert info["trials"][0]["kept"] == kept and (float_convs(pmodel) == {"conv1"}) == kept
