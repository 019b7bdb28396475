"""Range setting against brute-force searches and formulas worked by hand."""
import numpy as np
import onnx
import pytest
from builders import run, save_npy_samples, zoo

from ptq.data import DataSource, model_inputs
from ptq.export import export_qdq
from ptq.observe import Histogram
from ptq.pipeline import Config, Context, prepare, run_steps
from ptq.quant import QuantSpec, encoding_from_range, fake_quant
from ptq.ranges import (activation_encoding, bn_encoding, grid_golden_min, weight_encoding, xent_encoding)

W_SPEC = QuantSpec(4, signed=True, symmetric=True, axis=0)


def mse(x, enc):
    return float(np.sum((x - fake_quant(x, enc)) ** 2))


def assert_rows_match_brute_force(w, enc):
    """Each row's MSE at the chosen symmetric range is within 1 % of the best of 4000 ranges tried exhaustively."""
    for c, row in enumerate(w):
        top = np.abs(row).max()
        brute = min(mse(row, encoding_from_range(W_SPEC.with_(axis=None), -t, t))
                    for t in np.linspace(0.01 * top, top, 4000))
        got = mse(row, encoding_from_range(W_SPEC.with_(axis=None), -enc.hi[c], enc.hi[c]))
        assert got <= brute * 1.01 + 1e-9


@pytest.mark.slow  # a brute-force search
def test_weight_mse_matches_brute_force_per_channel(rng):
    w = rng.standard_t(3, (5, 200)).astype(np.float32)  # heavy tails: clipping pays
    enc = weight_encoding(w, W_SPEC, "mse")
    assert_rows_match_brute_force(w, enc)
    minmax = weight_encoding(w, W_SPEC, "minmax")
    assert mse(w, enc) < mse(w, minmax)  # heavy tails: MSE clips


def test_weight_mse_of_wide_rows_in_float32_matches_brute_force(rng, monkeypatch):
    import ptq.ranges
    monkeypatch.setattr(ptq.ranges, "WIDE_ROWS", 100)  # these 300-wide rows take the float32 search
    w = rng.standard_t(3, (3, 300)).astype(np.float32)
    assert_rows_match_brute_force(w, weight_encoding(w, W_SPEC, "mse"))


def test_golden_section_finds_parabola_minimum():
    target = np.array([0.3, 1.7, 2.2])
    t = grid_golden_min(lambda x: (x - target) ** 2, np.zeros(3), np.full(3, 3.0))
    np.testing.assert_allclose(t, target, atol=1e-4)


def test_activation_mse_on_histogram_matches_brute_force_on_data(rng):
    x = np.concatenate([rng.exponential(1.0, 20000), -rng.exponential(0.2, 5000)]).astype(np.float32)
    hist = Histogram()
    for part in np.array_split(x, 7):  # streamed; range grows
        hist.update(part * 1.0)
    spec = QuantSpec(8)
    enc = activation_encoding(hist, spec, "mse")
    best = np.inf
    for hi in np.linspace(0.5, x.max(), 80):
        for lo in np.linspace(x.min(), 0, 20):
            best = min(best, mse(x, encoding_from_range(spec, lo, hi)))
    assert mse(x, enc) <= best * 1.02
    assert mse(x, enc) < mse(x, activation_encoding(hist, spec, "minmax"))


def test_histogram_streaming_keeps_counts_and_extremes(rng):
    h = Histogram(half_bins=64)
    data = [rng.normal(0, s, 1000) for s in (0.1, 1.0, 30.0)]
    for d in data:
        h.update(d)
    allx = np.concatenate(data)
    assert h.counts.sum() == allx.size == h.n
    assert h.min == pytest.approx(allx.min()) and h.max == pytest.approx(allx.max())
    c, n = h.centers_counts()
    assert np.all(np.abs(c) <= h.nb * h.width)


def test_histogram_does_not_depend_on_the_batches(rng):
    """Split into batches of any size, in any order, the data give the same histogram: the one made by hand at the
    smallest power-of-two width w with every |x| < HALF_BINS·w."""
    x = np.concatenate([rng.normal(0, 0.01, 3000), rng.standard_t(2, 3000) * 5]).astype(np.float32)
    made = []
    for split in ([x.size], [7, 500, 5493], [4000, 1000, 1000]):
        h = Histogram(half_bins=64)
        for part in np.split(rng.permutation(x), np.cumsum(split)[:-1]):
            h.update(part)
        made.append((h.width, h.counts.copy()))
    w = 2.0 ** np.ceil(np.log2(np.abs(x).max() / 64 * (1 + 1e-12)))
    assert np.abs(x).max() < 64 * w <= 2 * np.abs(x).max()
    by_hand = np.bincount((np.floor(x.astype(np.float64) / w) + 64).astype(int), minlength=128)
    for width, counts in made:
        assert width == w and np.array_equal(counts, by_hand)


def test_histogram_of_long_rows_bins_a_strided_sample_of_each_row_and_its_tail(rng):
    """Rows (axis 0) of SAMPLE_FROM values or more are binned at a prime stride that divides no dimension, each
    sampled value counted p times, and the values of a row beyond the largest |x| of its sample exactly; min and
    max are of every value; the counts do not depend on how the rows were batched."""
    from ptq.observe import SAMPLE_FROM, sample_stride
    assert sample_stride((4, SAMPLE_FROM - 1)) == 1 and sample_stride((4, 3, 8)) == 1  # short rows: every value
    assert sample_stride((2, 64, 96)) == 7 and sample_stride((2, 64, 7 * 16)) == 11  # 7 divides 112: the next prime
    x = rng.normal(0, 1, (6, 64, 7 * 16)).astype(np.float32)  # channels last, 112 features
    x[3, 5, 2] = 40.0  # one outlier, outside the sample
    x[3, 9, 3] = -25.0
    assert (5 * 112 + 2) % 11 and (9 * 112 + 3) % 11
    h = Histogram(half_bins=64)
    h.update(x)
    assert (h.min, h.max) == (-25.0, 40.0)
    rows = x.reshape(6, -1).astype(np.float64)
    sample = rows[:, ::11]
    edge = np.abs(sample).max(axis=1, keepdims=True)
    tail = rows[np.abs(rows) > edge]
    assert 40.0 in tail and -25.0 in tail
    assert np.abs(x).max() < 64 * h.width <= 2 * np.abs(x).max()  # the range covers the values left out
    by_hand = 11 * np.bincount((np.floor(sample.ravel() / h.width) + 64).astype(int), minlength=128) \
        + np.bincount((np.floor(tail / h.width) + 64).astype(int), minlength=128)
    assert np.array_equal(h.counts, by_hand) and h.n == 11 * sample.size + tail.size
    assert set(np.nonzero(np.isin(np.arange(x.size).reshape(x.shape)[0], np.arange(0, x[0].size, 11)))[1]) \
        == set(range(112))  # every feature is in the sample
    batched = Histogram(half_bins=64)
    for part in np.split(x, [1, 4]):
        batched.update(part)
    assert np.array_equal(batched.counts, h.counts) and batched.width == h.width


def test_percentile_by_hand():
    h = Histogram()
    h.update(np.arange(10001, dtype=np.float32) / 100)  # 0..100
    enc = activation_encoding(h, QuantSpec(8), "percentile", percentile=99.0)
    assert enc.hi == pytest.approx(99.0, abs=0.05)
    assert float(enc.lo) == 0.0


def test_xent_matches_brute_force(rng):
    z = rng.normal(0, 1, (64, 10)).astype(np.float32)
    z[:, 0] += 4.0
    z[0, 1] = 25.0  # an outlier logit
    spec = QuantSpec(4)

    def kl(enc):
        def sm(a):
            e = np.exp(a - a.max(1, keepdims=True))
            return e / e.sum(1, keepdims=True)
        p, q = sm(z.astype(np.float64)), sm(fake_quant(z, enc).astype(np.float64))
        return float(np.mean(np.sum(p * (np.log(p) - np.log(q)), 1)))
    enc = xent_encoding(z, spec)
    brute = min(kl(encoding_from_range(spec, lo, hi)) for hi in np.linspace(0.3, z.max(), 120)
                for lo in np.linspace(z.min(), 0, 15))
    assert kl(enc) <= brute * 1.05 + 1e-6


def test_bn_range_by_hand():
    beta, gamma = np.array([1.0, -2.0]), np.array([0.5, -1.0])
    enc = bn_encoding(beta, gamma, QuantSpec(8), alpha=6.0)
    # lo = min(1 - 3, -2 - 6) = -8, hi = max(1 + 3, -2 + 6) = 4
    assert float(enc.lo) == pytest.approx(-8, abs=0.04) and float(enc.hi) == pytest.approx(4, abs=0.04)
    enc = bn_encoding(beta, gamma, QuantSpec(8), bounds=(0, 6))  # after a ReLU6
    assert float(enc.lo) == 0.0 and float(enc.hi) == pytest.approx(4, abs=0.02)


@pytest.mark.slow  # a brute-force search
def test_asymmetric_weight_mse_matches_brute_force_per_channel(rng):
    """Asymmetric grids: both ends searched; against every (lo, hi) pair of a fine 2-D grid, per channel. Zero
    is on the grid, and a one-signed channel's min-max grid starts at q_min."""
    spec = QuantSpec(4, signed=True, symmetric=False, axis=0)
    w = (rng.standard_t(3, (4, 150)) * 0.3 + np.array([[0.0], [0.5], [1.0], [-0.8]])).astype(np.float32)
    enc = weight_encoding(w, spec, "mse")
    one = spec.with_(axis=None)
    for c in range(4):
        row = w[c]
        lo0, hi0 = min(row.min(), 0), max(row.max(), 0)
        brute = min(mse(row, encoding_from_range(one, lo, hi))
                    for lo in np.linspace(lo0, 0.01 * lo0, 120) for hi in np.linspace(0.01 * hi0, hi0, 120))
        mine = enc_rows(enc, c, c + 1)
        assert mse(row, mine) <= brute * 1.01 + 1e-9
        np.testing.assert_array_equal(fake_quant(np.zeros((1, 1), np.float32), mine), 0)
    sym = weight_encoding(w, W_SPEC, "mse")
    assert mse(w[1:], enc_rows(enc, 1, 4)) < mse(w[1:], enc_rows(sym, 1, 4))  # off-centre channels gain
    positive = np.abs(w[:1]) + 0.1
    mm = weight_encoding(positive, spec, "minmax")
    assert int(mm.zero_point[0]) == -8 and float(mm.hi[0]) == pytest.approx(positive.max(), rel=1e-6)


def enc_rows(enc, start, stop):
    from ptq.quant import Encoding
    return Encoding(enc.spec, enc.scale[start:stop], enc.zero_point[start:stop])


@pytest.mark.slow  # a brute-force search
def test_mse_through_silu_matches_a_brute_force_over_ranges(rng):
    """The range chosen for a tensor that only SiLU reads minimizes Σ (silu(x) − silu(Q(x)))², not Σ (x − Q(x))²:
    checked against a brute force over (lo, hi) pairs, and it spends less of the grid on the negative tail that
    SiLU flattens."""
    from ptq.ranges import ACTIVATIONS
    x = np.concatenate([rng.normal(-6, 3, 20000), rng.normal(2, 1.5, 20000)]).astype(np.float32)
    h = Histogram()
    h.update(x)
    spec = QuantSpec(8, signed=False, symmetric=False)
    silu = ACTIVATIONS["silu"]
    plain = activation_encoding(h, spec, "mse")
    after = activation_encoding(h, spec, "mse", through="silu")
    assert after.method == "mse after silu" and float(after.lo) > float(plain.lo)

    def loss(lo, hi):
        enc = encoding_from_range(spec, lo, hi)
        return float(np.sum((silu(x) - silu(fake_quant(x, enc))) ** 2))
    brute = min(loss(lo, hi) for lo in np.linspace(x.min(), 0, 40) for hi in np.linspace(0, x.max(), 40))
    assert loss(float(after.lo), float(after.hi)) <= brute * 1.02
    assert loss(float(after.lo), float(after.hi)) < loss(float(plain.lo), float(plain.hi))


def test_float_activation_patterns():
    from onnx import helper

    from builders import init, make
    from ptq.model import Graph
    from ptq.patterns import float_activation
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], "conv"), helper.make_node("Sigmoid", ["c"], ["s"], "sig"),
             helper.make_node("Mul", ["c", "s"], ["y"], "silu"), helper.make_node("HardSwish", ["y"], ["z"], "hs"),
             helper.make_node("Relu", ["z"], ["r"], "relu")]
    m = make(nodes, [("x", [None, 3, 4, 4])], [("r", [None, 3, 4, 4])],
             [init("w", np.ones((3, 3, 1, 1), np.float32))], opset=14)
    gr = Graph(m)
    assert (float_activation(gr, "c"), float_activation(gr, "y"), float_activation(gr, "z"),
            float_activation(gr, "r")) == ("silu", "hardswish", None, None)


def _levels(qdq, x) -> dict:
    """Distinct values of each activation DequantizeLinear's output in onnxruntime, keyed by the float tensor its
    QuantizeLinear reads (walking back through integer ops between them, the saturating Clip of low bits)."""
    qdq = onnx.ModelProto.FromString(qdq.SerializeToString())
    g = qdq.graph
    producer = {o: n for n in g.node for o in n.output}
    consts = {i.name for i in g.initializer}

    def source(t):
        n = producer[t]
        return n.input[0] if n.op_type == "QuantizeLinear" else source(n.input[0])
    dq = {n.output[0]: source(n.input[0]) for n in g.node if n.op_type == "DequantizeLinear"
          and n.input[0] not in consts}
    g.output.extend(onnx.helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in dq)
    got = run(qdq, {"x": x})[1:]
    return {src.removesuffix("/fp"): len(np.unique(v)) for src, v in zip(dq.values(), got)}


def _weight_peaks(qdq: onnx.ModelProto) -> dict:
    """{layer node: max |q| of the integer weight its DequantizeLinear reads} in an exported QDQ model."""
    ints = {i.name: onnx.numpy_helper.to_array(i) for i in qdq.graph.initializer
            if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)}
    dq = {n.output[0]: ints[n.input[0]].astype(np.int64) - (ints[n.input[2]].astype(np.int64).reshape(
        -1, *[1] * (ints[n.input[0]].ndim - 1)) if len(n.input) > 2 and n.input[2] in ints else 0)
        for n in qdq.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in ints}
    return {n.name: int(np.abs(dq[n.input[1]]).max()) for n in qdq.graph.node
            if n.op_type in ("Conv", "Gemm") and n.input[1] in dq}


@pytest.mark.parametrize("ends_8bit", [None, False])
def test_network_ends_keep_8_bits_under_4_bit_activations(rng, tmp_path, ends_8bit):
    """W4A4 with ends_8bit (the default): the model input, the logits and the classifier's input keep 256 levels
    in onnxruntime while the inner activations have at most 16, and the first layer's and the classifier's
    integer weights span the 8-bit grid while the others stay within 4 bits; without it, all stay at 4 bits."""
    model = zoo(rng)
    calib = save_npy_samples(tmp_path / "c", rng, (3, 16, 16), 32)
    cfg = Config(weight_bits=4, act_bits=4, ends_8bit=ends_8bit, adaround=False, block_recon=False,
                 weight_symmetric=True, cle=False, holdout=0, batch_size=8).validate()
    state = run_steps(prepare(model, cfg), Context(DataSource(calib, model_inputs(model))), {})
    x = rng.normal(0, 1, (32, 3, 16, 16)).astype(np.float32)
    qdq = export_qdq(state)
    levels = _levels(qdq, x)
    ends = {"x", "logits", "gap", "flat"}  # flat: the classifier's input, on the quantizer of gap
    assert ends <= set(levels) and len(levels) > len(ends)
    for src, n in levels.items():
        assert n <= 16 or (src in ends and ends_8bit is None), (src, n)
    peaks = _weight_peaks(qdq)
    assert set(peaks) == {"conv1", "dw", "conv2", "conv3", "fc"}, peaks
    for layer, peak in peaks.items():
        assert peak <= 8 or (layer in ("conv1", "fc") and ends_8bit is None), (layer, peak)
    if ends_8bit is None:
        assert all(levels[t] > 16 for t in ends)
        assert peaks["conv1"] > 60 and peaks["fc"] > 60, peaks  # symmetric 8-bit MSE grids reach near 127
        assert "ends_8bit" in cfg.choices


@pytest.mark.parametrize("bits,symmetric,through", [(8, False, None), (8, True, None), (4, False, None),
                                                    (8, False, "silu"), (6, False, "hardswish")])
def test_the_histogram_loss_by_prefix_sums_is_the_sum_over_every_bin(rng, bits, symmetric, through):
    """``hist_mse_loss`` reads prefix sums at the rounding boundaries; the same Σ n_i (f(x_i) − f(Q(x_i)))² summed
    bin by bin over the histogram's centers, with Q the fake quantizer itself, gives the same numbers for ranges
    that clip both tails, one, or none."""
    from ptq.quant import fake_quant_grid
    from ptq.ranges import ACTIVATIONS, hist_mse_loss
    h = Histogram()
    h.update(np.concatenate([rng.normal(-1, 2, 30000), rng.exponential(3.0, 30000)]).astype(np.float32))
    spec = QuantSpec(bits, signed=symmetric, symmetric=symmetric)
    f = ACTIVATIONS[through] if through else (lambda v: v)
    centers, counts = h.centers_counts()
    lo = np.array([h.min, h.min * 0.3, -0.5, h.min * 0.01])
    hi = np.array([h.max, h.max * 0.2, 4.0, h.max * 0.9])
    got = hist_mse_loss(h, spec, f if through else None)(lo, hi)
    for k in range(len(lo)):
        enc = encoding_from_range(spec, lo[k], hi[k])
        q = fake_quant_grid(centers, float(enc.scale), float(enc.zero_point), spec.qmin, spec.qmax)
        want = float(np.sum(counts * (f(centers) - f(q)) ** 2))
        assert got[k] == pytest.approx(want, rel=1e-7)
