"""ptq.evaluate's streaming counts against per-sample references computed here with numpy."""
import numpy as np
import pytest

from ptq.evaluate import Accumulator, check_gate, drop_standard_error


def test_drop_and_its_paired_standard_error_match_per_sample_numpy(rng):
    n, classes = 203, 7
    labels = {f"s{k}": int(rng.integers(classes)) for k in range(n) if k % 10}  # every tenth sample unlabelled
    paths = [f"s{k}" for k in range(n)]
    fp = rng.normal(size=(n, classes))
    q = fp + rng.normal(scale=0.8, size=(n, classes))  # disagrees with FP32 on a share of the samples
    acc = Accumulator(["logits"], labels)
    for lo in range(0, n, 50):  # streamed in batches, the last one short
        acc.update(paths[lo:lo + 50], [fp[lo:lo + 50]], [q[lo:lo + 50]])
    r = acc.result()
    keep = np.array([p in labels for p in paths])
    y = np.array([labels.get(p, -1) for p in paths])[keep]
    d = (fp[keep].argmax(1) == y).astype(float) - (q[keep].argmax(1) == y)
    assert r["labelled"] == keep.sum() and 0 < np.sum(d != 0)
    assert abs(r["top1_drop"] - 100 * d.mean()) <= 0.011  # a difference of two top-1s rounded to 0.01
    assert r["top1_drop_se"] == round(100 * d.std(ddof=1) / np.sqrt(len(d)), 2)


def test_standard_error_by_hand():
    # 10 samples: 3 only FP32 gets right, 1 only the quantized model: d = (1,1,1,-1,0,...,0), mean 0.2,
    # s² = (4 - 0.4) / 9 = 0.4, SE = √(0.4 / 10) = 0.2 -> 20 points
    assert np.isclose(drop_standard_error(3, 1, 10), 20.0)
    assert drop_standard_error(0, 0, 10) == 0.0 and np.isnan(drop_standard_error(1, 0, 1))


def test_gate_message_carries_the_standard_error():
    result = {"top1_drop": 1.5, "top1_drop_se": 0.6, "fp32_top1": 75.0, "labelled": 1300}
    assert check_gate(result, (2.0, False)).endswith("(standard error ±0.60 points, on 1300 samples)")
    assert "standard error ±0.80%, on 1300" in check_gate(result, (2.5, True))  # 0.6 / 75 of FP32 top-1


def slice_result(fp, q, batch=7):
    acc = Accumulator(["y"], None, class_outputs=[])
    for lo in range(0, len(fp), batch):
        acc.update([None] * len(fp[lo:lo + batch]), [fp[lo:lo + batch]], [q[lo:lo + batch]])
    return acc.result()["outputs"]["y"]


def test_slice_sqnr_standard_error_is_the_delta_method_on_per_sample_sums(rng):
    """[N, C, L] outputs: per sample i and slice c, s_i = Σ_l r², e_i = Σ_l (r − q)²; the SE of 10·log10(Σs/Σe)
    by the delta method, worked here from the per-sample arrays, and the upper bound that decides the flag."""
    n, c, length = 30, 5, 16
    fp = rng.normal(size=(n, c, length))
    noise = rng.normal(size=(n, c, length)) * np.array([0.05, 0.1, 0.2, 0.4, 0.8])[None, :, None]
    out = slice_result(fp, fp + noise)
    w = out["worst_slice"]
    s, e = (fp ** 2).sum(2), (noise ** 2).sum(2)  # [N, C]
    cov = [np.cov(s[:, k], e[:, k]) for k in range(c)]
    rel = np.array([(v[0, 0] / s[:, k].mean() ** 2 + v[1, 1] / e[:, k].mean() ** 2
                     - 2 * v[0, 1] / (s[:, k].mean() * e[:, k].mean())) / n for k, v in enumerate(cov)])
    se = 10 / np.log(10) * np.sqrt(rel)
    db = 10 * np.log10(s.sum(0) / e.sum(0))
    from scipy.stats import norm
    z = norm.ppf(1 - 0.05 / (2 * c))
    k = int(np.argmin(db + z * se))
    assert w["index"] == k == 4 and w["samples"] == n and w["z"] == round(z, 2)
    assert w["sqnr_db"] == round(db[k], 2) and w["sqnr_db_se"] == round(se[k], 2)
    assert w["sqnr_db_upper"] == round(db[k] + z * se[k], 2)


def test_one_bad_class_on_few_samples_is_not_flagged_but_a_collapsed_slice_is(rng):
    """Logits [N, 1000] on 15 samples: one class's slice at 5 dB by chance is within its uncertainty; a slice of
    a detector head [N, 8, 400] whose values are all lost is under the bound with confidence."""
    from ptq.evaluate import fidelity_flags
    fp = rng.normal(size=(15, 1000))
    q = fp + 0.1 * rng.normal(size=fp.shape)
    noise = rng.normal(size=15)
    q[:, 7] = fp[:, 7] + noise * np.sqrt(np.sum(fp[:, 7] ** 2) / 10 ** 0.5 / np.sum(noise ** 2))  # 5 dB
    out = slice_result(fp, q)
    assert 10 * np.log10(np.sum(fp[:, 7] ** 2) / np.sum((fp[:, 7] - q[:, 7]) ** 2)) == pytest.approx(5.0)
    assert fidelity_flags({"outputs": {"y": out}}, 6.0, 0.9) == []
    head = rng.normal(size=(12, 8, 400))
    collapsed = head + 0.01 * rng.normal(size=head.shape)
    collapsed[:, 5] = 0.0  # a score row lost
    flags = fidelity_flags({"outputs": {"y": slice_result(head, collapsed)}}, 6.0, 0.9)
    assert len(flags) == 1 and "slice 5 of 8" in flags[0][1]
    few = slice_result(head[:5], collapsed[:5])
    assert "worst_slice" not in few and few["slices"].startswith("not judged: 5 samples")


def test_anchors_by_classes_are_sliced_by_class(rng):
    """Scores [N, 400 anchors, 8 classes] (a PicoDet head): the slices are the classes (axis 2), so one class lost
    everywhere is flagged, while low-score anchors are not judged one by one; [N, 8, 400] stays sliced on axis 1."""
    from ptq.evaluate import feature_axis, fidelity_flags
    assert feature_axis((1, 400, 8)) == 2 and feature_axis((1, 8, 400)) == 1 and feature_axis((1, 8, 4, 4)) == 1
    scores = rng.uniform(0, 1, size=(12, 400, 8))
    q = scores + 0.01 * rng.normal(size=scores.shape)
    q[:, :, 3] = 0.0  # class 3 lost at every anchor
    out = slice_result(scores, q)
    assert out["worst_slice"]["axis"] == 2 and out["worst_slice"]["index"] == 3 and out["worst_slice"]["of"] == 8
    flags = fidelity_flags({"outputs": {"y": out}}, 6.0, 0.9)
    assert len(flags) == 1 and "slice 3 of 8 on axis 2" in flags[0][1]


def test_class_scores_are_found_through_a_bias_add_and_a_pooled_convolution():
    """MatMul -> Add(bias) -> Softmax [N, 2] (the PP-OCR direction classifier's tail) and Conv -> GlobalAveragePool
    -> Flatten are class scores; a Conv -> Flatten feature map and a MatMul divided by a computed norm are not."""
    from builders import init, make
    from onnx import helper
    from ptq.patterns import class_score_outputs
    f = np.float32
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["logit"]),
             helper.make_node("Softmax", ["logit"], ["prob"], axis=1),
             helper.make_node("ReduceL2", ["mm"], ["norm"], keepdims=1),
             helper.make_node("Div", ["mm", "norm"], ["emb"])]
    m = make(nodes, [("x", [None, 4])], [("prob", [None, 2]), ("emb", [None, 2])],
             [init("w", np.ones((4, 2), f)), init("b", np.zeros(2, f))])
    assert class_score_outputs(m) == ["prob"]
    conv = [helper.make_node("Conv", ["img", "k"], ["c"]), helper.make_node("GlobalAveragePool", ["c"], ["p"]),
            helper.make_node("Flatten", ["p"], ["scores"]), helper.make_node("Flatten", ["c"], ["features"])]
    m = make(conv, [("img", [None, 3, 4, 4])], [("scores", [None, 5]), ("features", [None, 80])],
             [init("k", np.ones((5, 3, 1, 1), f))])
    assert class_score_outputs(m) == ["scores"]
