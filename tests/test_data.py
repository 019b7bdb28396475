"""Calibration sources: image preprocessing worked by hand, labels, sample selection."""
import numpy as np
import pytest

from ptq.data import DataSource, InputInfo, Preprocess, load_image
from ptq.errors import InputError

PIL = pytest.importorskip("PIL.Image")


def write_png(path, rgb):
    PIL.fromarray(np.asarray(rgb, np.uint8)).save(path)


def test_image_preprocessing_by_hand(tmp_path):
    img = np.zeros((4, 6, 3), np.uint8)
    img[..., 0] = 255  # red
    img[:, 2:4, 2] = 51  # a blue stripe in the middle columns
    write_png(tmp_path / "a.png", img)
    pre = Preprocess(crop=2, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x = load_image(tmp_path / "a.png", pre)
    assert x.shape == (3, 2, 2)
    np.testing.assert_allclose(x[0], 1.0)  # (1 - 0.5) / 0.5
    np.testing.assert_allclose(x[1], -1.0)
    np.testing.assert_allclose(x[2], (0.2 - 0.5) / 0.5, atol=1e-6)
    x = load_image(tmp_path / "a.png", Preprocess(color="bgr", layout="nhwc"))
    assert x.shape == (4, 6, 3) and x[0, 0, 2] == pytest.approx(1.0) and x[0, 0, 0] == 0.0
    x = load_image(tmp_path / "a.png", Preprocess(resize=8))  # short side 4 -> 8
    assert x.shape == (3, 8, 12)


def test_image_folder_fits_static_model_input_and_class_subfolders_are_labels(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for k in range(3):
            write_png(tmp_path / cls / f"{k}.png", np.full((20, 30, 3), 100 * k, np.uint8))
    src = DataSource(tmp_path, [InputInfo("x", np.float32, [None, 3, 16, 16])])
    batches = list(src.batches(4))
    assert [b[1]["x"].shape for b in batches] == [(4, 3, 16, 16), (2, 3, 16, 16)]
    labels = src.labels()
    assert sorted(labels.values()) == [0, 0, 0, 1, 1, 1]
    assert all(labels[p] == (p.parent.name == "dog") for p in src.files)


def test_labels_txt_and_bad_lines(tmp_path):
    for k in range(3):
        np.save(tmp_path / f"s{k}.npy", np.zeros(4, np.float32))
    (tmp_path / "labels.txt").write_text("s0.npy 5\ns2.npy 7\n")
    src = DataSource(tmp_path, [InputInfo("x", np.float32, [None, 4])])
    assert {p.name: v for p, v in src.labels().items()} == {"s0.npy": 5, "s2.npy": 7}
    (tmp_path / "labels.txt").write_text("s0.npy five\n")
    with pytest.raises(InputError, match="labels.txt:1"):
        src.labels()


def test_seeded_subset_is_deterministic(tmp_path):
    for k in range(20):
        np.save(tmp_path / f"s{k:02d}.npy", np.zeros(2, np.float32))
    info = [InputInfo("x", np.float32, [None, 2])]
    a = DataSource(tmp_path, info, size=5, seed=3).files
    assert a == DataSource(tmp_path, info, size=5, seed=3).files
    assert a != DataSource(tmp_path, info, size=5, seed=4).files
    assert len(set(a)) == 5


def test_variable_sizes_split_batches(tmp_path):
    for k, n in enumerate([4, 4, 6, 6, 6]):
        np.save(tmp_path / f"s{k}.npy", np.zeros((3, n, n), np.float32))
    src = DataSource(tmp_path, [InputInfo("x", np.float32, [None, 3, None, None])])
    assert [b[1]["x"].shape[0] for b in src.batches(8)] == [2, 3]


def test_held_back_samples_are_disjoint_from_calibration(tmp_path):
    from ptq.pipeline import Config
    from ptq.data import calibration_sources
    for k in range(40):
        np.save(tmp_path / f"s{k:02d}.npy", np.zeros(2, np.float32))
    info = [InputInfo("x", np.float32, [None, 2])]
    calib, held = calibration_sources(tmp_path, info, Preprocess(), Config(calib_size=30, holdout=8))
    assert len(calib) == 30 and len(held) == 8 and not set(calib.files) & set(held.files)
    calib, held = calibration_sources(tmp_path, info, Preprocess(), Config(calib_size=256, holdout=32))
    assert len(held) == 10 and len(calib) == 30  # a small folder: at most a quarter held back


def test_calibration_batches_shrink_to_the_memory_limit(rng, tmp_path):
    import onnx

    from builders import save_npy_samples, zoo
    from ptq.data import model_inputs
    from ptq.observe import OUTPUT_SHARE, Histogram, Outputs, batch_within, observe, session
    model = zoo(rng)
    calib = save_npy_samples(tmp_path / "c", rng, (3, 16, 16), 24)
    src = DataSource(calib, model_inputs(model))
    names = ["r1", "add", "cat"]
    sess = Outputs(session(model, names), names)
    per_sample = 4 * (8 * 16 * 16 + 8 * 16 * 16 + 16 * 8 * 8)  # r1, add [8, 16, 16], cat [16, 8, 8] in float32
    assert batch_within(sess, src, 16, None) == 16
    assert batch_within(sess, src, 16, per_sample * 5.5 / OUTPUT_SHARE) == 5
    assert batch_within(sess, src, 16, 1.0) == 1  # not even one sample fits: one at a time
    hists = {}
    for limit in (None, 1.0):  # the statistics do not depend on the batches (16 samples, then one at a time)
        h = {n: Histogram() for n in names}
        assert observe(model, src, 16, {n: [h[n]] for n in names}, memory_limit=limit) == 24
        hists[limit] = h
    for n in names:
        assert hists[None][n].min == hists[1.0][n].min and hists[None][n].max == hists[1.0][n].max
        assert np.array_equal(hists[None][n].counts, hists[1.0][n].counts)
    assert onnx  # the model stays as built


def test_bound_outputs_equal_plain_runs(rng):
    """Outputs reuses buffers between batches; each batch's values equal a plain onnxruntime run's, for a graph
    input requested as an output, an output whose shape does not follow the batch (Shape) and one whose shape
    follows the data (NonZero), over batches of changing size."""
    from builders import make
    from onnx import helper

    from ptq.observe import Outputs, session
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Shape", ["r"], ["shape"]),
             helper.make_node("NonZero", ["r"], ["nz"]), helper.make_node("Neg", ["r"], ["y"])]
    model = make(nodes, [("x", [None, 4])], [("y", [None, 4])], [])
    names = ["x", "r", "shape", "nz", "y"]
    sess = session(model, names)
    out = Outputs(sess, names)
    for n in (2, 2, 2, 4, 4, 1, 4, 4, 4):
        feed = {"x": rng.normal(0, 1, (n, 4)).astype(np.float32)}
        got = [v.copy() for v in out.run(feed)]
        for name, a, b in zip(names, got, sess.run(names, feed)):
            assert a.shape == b.shape and np.array_equal(a, b), (n, name)
    assert out.failures >= 2 and out.binding is None  # NonZero's shape follows the data: binding given up


def test_bound_outputs_reused_between_batches(rng):
    """Where the shapes follow the batch, the second batch of a size runs bound (the buffers stay the same)."""
    from builders import zoo

    from ptq.observe import Outputs, session
    model = zoo(rng)
    names = ["x", "r1", "cat", "logits"]
    sess = session(model, names)
    out = Outputs(sess, names)
    feeds = [{"x": rng.normal(0, 1, (3, 3, 16, 16)).astype(np.float32)} for _ in range(3)]
    for k, feed in enumerate(feeds):
        got = out.run(feed)
        ref = sess.run(names, feed)
        assert all(np.array_equal(a, b) for a, b in zip(got, ref))
        if k:
            assert out.binding is not None and got[1] is out.buffers["r1"]
    assert out.failures == 0


def test_a_pass_stops_after_the_batch_where_it_has_enough(rng, tmp_path):
    """``observe(enough=...)`` stops after the first batch where enough(samples seen) holds: its observers saw those
    samples and no more (SmoothQuant's prefix of the calibration set)."""
    from builders import save_npy_samples, zoo
    from ptq.data import model_inputs
    from ptq.observe import RowSample, observe
    model = zoo(rng)
    src = DataSource(save_npy_samples(tmp_path / "c", rng, (3, 16, 16), 24), model_inputs(model))
    rows = RowSample(10 ** 6)
    assert observe(model, src, 4, {"cat": [rows]}, enough=lambda seen: seen >= 9) == 12
    assert rows.data.shape[0] == 12 * 16 * 8  # [12, 16, 8, 8] seen as rows of its last axis
    full = RowSample(10 ** 6)
    observe(model, src, 4, {"cat": [full]})
    np.testing.assert_array_equal(rows.data, full.data[:rows.data.shape[0]])


def test_the_product_error_on_sampled_columns_estimates_the_whole(rng):
    """SmoothQuant scores α on COLUMNS sampled output columns: scaled by n / COLUMNS, the error on them is within
    15 % of the error on all 1536, and the α it picks is within 5 % of the best α's whole error."""
    from ptq.stages.smoothquant import ALPHAS, COLUMNS, product_error, sampled_columns, smoothing_scales
    scale = np.ones(64, np.float32)
    scale[[3, 30]] = 30.0
    x = (rng.normal(0, 1, (512, 64)) * scale).astype(np.float32)
    w = rng.normal(0, 0.2, (64, 1536)).astype(np.float32)
    cols = sampled_columns(1536)
    assert len(cols) == COLUMNS and np.all(np.diff(cols) > 0)
    peak_x, peak_w = np.abs(x).max(0), np.abs(w).max(1)
    whole = {a: product_error(x, [w], smoothing_scales(peak_x, peak_w, a), 8, 8) for a in ALPHAS}
    some = {a: product_error(x, [w[:, cols]], smoothing_scales(peak_x, peak_w, a), 8, 8) for a in ALPHAS}
    for a in ALPHAS:
        assert some[a] * 1536 / COLUMNS == pytest.approx(whole[a], rel=0.15)
    assert whole[min(some, key=some.get)] <= 1.05 * min(whole.values())
