"""ptq.evaluate's streaming counts against per-sample references computed here with numpy."""
import numpy as np

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
