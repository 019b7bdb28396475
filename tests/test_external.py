"""Models whose weights stay on disk (external data over ptq.external.LARGE_BYTES; here the threshold is lowered
so a small model takes that path): the same quantized model as from memory, weights read by parts, new large
initializers written beside the model's data, and the saved model self-contained with its weights external."""
import numpy as np
import onnx
from builders import conv_bn_relu, run, save_npy_samples, zoo

import ptq.external as external
from ptq.model import Graph, load_model, set_initializer
from ptq.run import quantize


def saved_with_external_data(model, folder):
    folder.mkdir()
    path = folder / "m.onnx"
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # saving with external data edits the proto it is given
    onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=0)
    return path


def test_a_model_kept_on_disk_quantizes_as_it_does_from_memory(rng, tmp_path, monkeypatch):
    model = conv_bn_relu(rng, cin=16, cout=32)  # weights over the 1 KB from which a saved tensor goes external
    path = saved_with_external_data(model, tmp_path / "model")
    calib = save_npy_samples(tmp_path / "calib", rng, (16, 8, 8), 12)
    settings = dict(holdout=4, cle=True, latency_runs=0, reduce_range="never")
    in_memory = quantize(path, calib, **settings)

    monkeypatch.setattr(external, "LARGE_BYTES", 0)
    monkeypatch.setattr(external, "MIN_EXTERNAL", 0)  # CLE's new weights go to files too
    loaded = load_model(path)
    assert external.folder(loaded) == str(path.parent)
    assert all(external.is_external(t) and not t.raw_data for t in loaded.graph.initializer if t.dims)
    for t in model.graph.initializer:  # read by parts: the same values
        np.testing.assert_array_equal(Graph(loaded).const(t.name), onnx.numpy_helper.to_array(t))
    import weakref

    import ptq.evaluate
    made, most = [], [0]

    def counted(*args, **kw):  # evaluation sessions alive at once
        s = session(*args, **kw)
        made.append(weakref.ref(s))
        most[0] = max(most[0], sum(r() is not None for r in made))
        return s
    session = ptq.evaluate.session
    monkeypatch.setattr(ptq.evaluate, "session", counted)
    on_disk = quantize(path, calib, **settings)
    assert len(made) >= 2 and most[0] == 1  # the FP32 model's session goes before the quantized one's comes

    x = rng.normal(0, 1, (4, 16, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(run(external.self_contained(on_disk.model), {"x": x})[0],
                                  run(in_memory.model, {"x": x})[0])
    assert on_disk.fidelity == in_memory.fidelity
    out = tmp_path / "out" / "q.onnx"
    out.parent.mkdir()
    on_disk.save(out)
    assert (out.parent / "q.onnx.data").exists()  # weights (int8) beside the model, as external data
    assert any(external.is_external(t) for t in onnx.load(str(out), load_external_data=False).graph.initializer)
    saved = onnx.load(str(out))
    assert external.KEY not in {p.key for p in saved.metadata_props}
    np.testing.assert_array_equal(run(saved, {"x": x})[0], run(in_memory.model, {"x": x})[0])
    work = [p for p in path.parent.iterdir() if p.name.startswith(".ptq-weights-")]
    assert len(work) == 1 and any(work[0].iterdir())  # CLE's equalized weights were written there


def test_new_initializers_of_a_model_on_disk_go_to_files_and_back(rng, tmp_path, monkeypatch):
    model = zoo(rng)
    path = saved_with_external_data(model, tmp_path / "model")
    monkeypatch.setattr(external, "LARGE_BYTES", 0)
    loaded = load_model(path)
    big = rng.normal(0, 1, (512, 1024)).astype(np.float32)  # 2 MB >= MIN_EXTERNAL
    set_initializer(loaded, "big", big)
    set_initializer(loaded, "small", np.arange(3, dtype=np.int64))
    t = {i.name: i for i in loaded.graph.initializer}
    assert external.is_external(t["big"]) and not external.is_external(t["small"])
    np.testing.assert_array_equal(Graph(loaded).const("big"), big)
    assert loaded.ByteSize() < 100_000  # the proto stays small
    whole = external.self_contained(loaded)
    assert not any(external.is_external(i) for i in whole.graph.initializer)
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(next(i for i in whole.graph.initializer
                                                                  if i.name == "big")), big)
