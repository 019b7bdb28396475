"""The command line: exit codes, one-line errors, no partial files, the accuracy gate."""
import collections
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import numpy as np
import onnx
import pytest
from builders import save_npy_samples, two_inputs, zoo

from ptq_cli.main import main

pytestmark = pytest.mark.slow  # end-to-end (make test-fast leaves it out)


@pytest.fixture
def setup(rng, tmp_path):
    model = tmp_path / "zoo.onnx"
    onnx.save(zoo(rng), str(model))
    calib = save_npy_samples(tmp_path / "calib", rng, (3, 16, 16), 16)
    return model, calib, tmp_path


def call(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, want_code, *fragments):
    assert code == want_code
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], lines[0]


def test_run_writes_model_and_reports(setup, capsys):
    model, calib, tmp = setup
    out = tmp / "zoo.q.onnx"
    code, stdout, err = call(capsys, "run", model, "--calib", calib, "-o", out, "--holdout", 4)
    assert code == 0, err
    assert out.exists() and (tmp / "zoo.q.report.json").exists() and (tmp / "zoo.q.report.md").exists()
    report = json.loads((tmp / "zoo.q.report.json").read_text())
    assert report["fidelity"]["samples"] == 4
    assert set(report["timings"]) >= {"prepare", "weight_ranges", "activation_ranges", "export", "total"}
    assert report["activations"]["logits"]["method"] == "xent"
    assert "wrote" in stdout and "SQNR" in stdout
    assert "| conv1 |" in (tmp / "zoo.q.report.md").read_text()
    leftovers = [p.name for p in tmp.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_the_report_states_what_was_written_and_how_many_samples_calibrated(setup, capsys):
    """--reduce-range always on the avx2 target writes the full convolutions at 7 bits and the depthwise one and
    the Gemm at 8: the summary counts both; --calib-size beyond the data says how many were used; data-free ranges
    name their method (BN statistics), not the --act-range setting."""
    model, calib, tmp = setup
    code, stdout, err = call(capsys, "run", model, "--calib", calib, "-o", tmp / "a.onnx", "--target", "avx2",
                             "--reduce-range", "always", "--calib-size", 1000)
    assert code == 0, err
    report = json.loads((tmp / "a.report.json").read_text())
    bits = sorted(w["bits"] for w in report["weights"].values())
    assert bits.count(7) >= 1 and bits.count(8) >= 1
    md = (tmp / "a.report.md").read_text()
    assert f"Weights ({len(bits)} layers): bits 8 ({bits.count(8)}), 7 ({bits.count(7)})" in md \
        or f"Weights ({len(bits)} layers): bits 7 ({bits.count(7)}), 8 ({bits.count(8)})" in md
    assert "calibration: 12 samples, 4 more held back for fidelity (--calib-size 1000: the data hold 16)" in stdout
    assert report["calibration"] == {"asked": 1000, "used": 12, "held_back": 4, "line": stdout.splitlines()[0]}
    code, _, err = call(capsys, "run", model, "--data-free", "--input-range", "-1,1", "-o", tmp / "d.onnx")
    assert code == 0, err
    methods = {a["method"].split(" ")[0] for a in json.loads((tmp / "d.report.json").read_text())
               ["activations"].values()}
    assert "mse" not in methods and "range method" in (tmp / "d.report.md").read_text()
    assert "mse" not in (tmp / "d.report.md").read_text().split("range method")[1].split("\n")[0]


@pytest.mark.parametrize("case", ["missing", "not_onnx", "empty_calib", "bad_shape", "bad_dtype", "unwritable",
                                  "bad_option", "no_calib", "bad_recipe", "missing_npz_key", "easyquant_asymmetric"])
def test_bad_input_gives_one_line_exit_2_and_no_file(setup, capsys, case, rng):
    model, calib, tmp = setup
    out = tmp / "out" / "m.onnx"
    out.parent.mkdir()
    args = ["run", model, "--calib", calib, "-o", out]
    fragment = ""
    if case == "missing":
        args[1], fragment = tmp / "nope.onnx", "nope.onnx: no such file"
    elif case == "not_onnx":
        bad = tmp / "bad.onnx"
        bad.write_text("hello")
        args[1], fragment = bad, "bad.onnx: not a valid ONNX model"
    elif case == "empty_calib":
        (tmp / "empty").mkdir()
        args[3], fragment = tmp / "empty", "no samples found"
    elif case == "bad_shape":
        args[3] = save_npy_samples(tmp / "wrong", rng, (3, 8, 8), 2)
        fragment = "s000.npy: sample for input 'x' has shape [1, 3, 8, 8]"
    elif case == "bad_dtype":
        d = tmp / "strings"
        d.mkdir()
        np.save(d / "a.npy", np.array([["x"] * 16] * 16, dtype="U1")[None].repeat(3, 0))
        args[3], fragment = d, "a.npy"
    elif case == "unwritable":
        args[5], fragment = tmp / "no_such_dir" / "m.onnx", "does not exist"
    elif case == "bad_option":
        args += ["--act-range", "magic"]
        fragment = "--act-range"
    elif case == "no_calib":
        args = ["run", model, "-o", out]
        fragment = "--calib"
    elif case == "bad_recipe":
        r = tmp / "r.toml"
        r.write_text("weight_bitz = 4\n")
        args += ["--recipe", r]
        fragment = "unknown setting(s) weight_bitz"
    elif case == "missing_npz_key":
        d = tmp / "npz"
        d.mkdir()
        np.savez(d / "a.npz", y=np.zeros((3, 16, 16), np.float32), z=np.zeros(1, np.float32))
        args[3], fragment = d, "missing key(s) x"
    elif case == "easyquant_asymmetric":
        args += ["--easyquant", "--weight-asymmetric"]
        fragment = "EasyQuant searches symmetric weight grids"
    code, _, err = call(capsys, *args)
    assert_one_line_error(code, err, 2, fragment)
    assert list(out.parent.iterdir()) == []


def test_accuracy_gate_exits_3_after_writing(setup, capsys, rng):
    model, calib, tmp = setup
    # eval data with labels: the FP32 model's own predictions, so FP32 top-1 is 100 %
    ev = save_npy_samples(tmp / "eval", rng, (3, 16, 16), 12)
    from builders import run as ort_run
    preds = [int(ort_run(zoo(np.random.default_rng(0)), {"x": np.load(f)[None]})[0].argmax())
             for f in sorted(ev.glob("*.npy"))]
    (ev / "labels.txt").write_text("".join(f"s{k:03d}.npy {p}\n" for k, p in enumerate(preds)))
    out = tmp / "g.onnx"
    common = ["run", model, "--calib", calib, "-o", out, "--eval", ev, "--weight-bits", 2, "--act-bits", 2,
              "--no-adaround", "--no-block-recon", "--no-repair"]  # the gate, not the repair, decides
    code, _, err = call(capsys, *common, "--max-drop", "0")
    report = json.loads((tmp / "g.report.json").read_text())
    drop = report["evaluation"]["top1_drop"]
    assert report["evaluation"]["fp32_top1"] == 100.0
    assert drop > 0  # 2-bit weights and activations lose accuracy
    assert code == 3 and "Traceback" not in err
    assert all(line.startswith("ptq: warning: ") for line in err.strip().splitlines()[:-1])  # 2-bit: flagged
    assert_one_line_error(code, err.strip().splitlines()[-1], 3, "accuracy gate failed",
                          f"{drop:.2f} points > allowed 0 points")
    wrong = round(drop * 12 / 100)  # FP32 is right on all 12: d = 1 where the quantized model is wrong
    d = np.array([1.0] * wrong + [0.0] * (12 - wrong))
    assert f"standard error ±{100 * d.std(ddof=1) / np.sqrt(12):.2f} points, on 12 samples" in err
    gate = report["gate"]
    assert gate["passed"] is False and gate["drop"] == drop and gate["samples"] == 12
    assert gate["standard_error"] == pytest.approx(100 * d.std(ddof=1) / np.sqrt(12), abs=0.01)
    assert out.exists()  # the model and report are written; only the exit code says no
    se = report["evaluation"]["top1_drop_se"]
    assert f"Top-1 drop: {drop} ± {se} points" in (tmp / "g.report.md").read_text()
    code, table, _ = call(capsys, "summary", tmp)
    assert code == 0 and "| g.onnx | 2/2 |" in table and table.rstrip().endswith(f"| {drop} ± {se} | **gate failed** |")
    code, out_text, err = call(capsys, *common, "--max-drop", "100")
    assert code == 0 and "accuracy gate passed" in out_text
    code, _, err = call(capsys, *common, "--max-drop", "abc")
    assert_one_line_error(code, err, 2, "--max-drop")


def test_eval_command_agreement_without_labels(setup, capsys):
    model, calib, tmp = setup
    assert call(capsys, "run", model, "--calib", calib, "-o", tmp / "q.onnx", "-q")[0] == 0
    code, out, err = call(capsys, "eval", model, tmp / "q.onnx", "--data", calib, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["samples"] == 16 and 0 <= result["top1_agreement"] <= 100
    assert "top1_drop" not in result


def test_two_input_model_with_npz_samples(rng, tmp_path, capsys):
    model = tmp_path / "two.onnx"
    onnx.save(two_inputs(rng), str(model))
    calib = tmp_path / "calib"
    calib.mkdir()
    for k in range(12):
        np.savez(calib / f"s{k}.npz", a=rng.normal(0, 1, 6).astype(np.float32), b=rng.normal(0, 1, (1, 6)))
    code, _, err = call(capsys, "run", model, "--calib", calib, "-o", tmp_path / "two.q.onnx", "--holdout", 3,
                        "--no-smoothquant")
    assert code == 0, err
    report = json.loads((tmp_path / "two.q.report.json").read_text())
    assert {"a", "b"} <= set(report["activations"])
    assert report["fidelity"]["outputs"]["y"]["cosine"] > 0.99


def test_python_dash_m_entry_point(setup):
    model, calib, tmp = setup
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    p = subprocess.run([sys.executable, "-m", "ptq", "run", str(model), "--calib", str(calib), "-o",
                        str(tmp / "m.onnx"), "--debug", "--quiet"], capture_output=True, text=True, env=env,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    assert p.stdout == ""
    p = subprocess.run([sys.executable, "-m", "ptq", "run", str(tmp / "nope.onnx"), "--calib", str(calib)],
                       capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    assert p.returncode == 2 and p.stderr.count("\n") == 1


def test_recipe_overrides_and_16_bit_activations(setup, capsys):
    model, calib, tmp = setup
    recipe = tmp / "r.toml"
    recipe.write_text('weight_bits = 6\nact_range = "minmax"\n[overrides."logits"]\nbits = 16\n'
                      '[overrides."conv1"]\nbits = 3\nper_channel = false\n')
    out = tmp / "r.onnx"
    code, _, err = call(capsys, "run", model, "--calib", calib, "-o", out, "--recipe", recipe, "--holdout", 4)
    assert code == 0, err
    report = json.loads((tmp / "r.report.json").read_text())
    assert report["activations"]["logits"]["bits"] == 16 and report["activations"]["add"]["bits"] == 8
    assert report["activations"]["add"]["method"] == "minmax"
    assert report["weights"]["conv1"]["bits"] == 3 and report["weights"]["conv1"]["axis"] is None
    assert report["weights"]["conv2"]["bits"] == 6 and report["weights"]["conv2"]["axis"] == 0
    q = onnx.load(str(out))
    qnodes = [n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.output[0].startswith("logits")]
    assert qnodes and qnodes[0].domain == "com.microsoft"  # uint16 Q/DQ below opset 21
    assert report["fidelity"]["outputs"]["logits"]["sqnr_db"] > 10  # onnxruntime ran it


class _Tags(HTMLParser):
    """Checks that every element is closed in order; counts tables, rows and charts."""
    VOID = {"meta", "br", "img", "hr", "link", "input", "rect", "line", "circle", "path", "polyline"}

    def __init__(self):
        super().__init__()
        self.stack, self.count, self.errors = [], collections.Counter(), []

    def handle_starttag(self, tag, attrs):
        self.count[tag] += 1
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.count[tag] += 1

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:]}")
        else:
            self.stack.pop()


@pytest.mark.parametrize("flags", [[], ["--cle"]])
def test_html_report_is_html_with_tables_and_charts(setup, capsys, flags):
    model, calib, tmp = setup
    out = tmp / "h.onnx"
    assert call(capsys, "run", model, "--calib", calib, "-o", out, "--holdout", 4, *flags)[0] == 0
    html = (tmp / "h.report.html").read_text()
    p = _Tags()
    p.feed(html)
    p.close()
    assert p.errors == [] and p.stack == []
    assert p.count["table"] >= 4 and p.count["tr"] > 10  # stage times, fidelity, weights, activations, …
    assert "<pre>" not in html.split("Stage details")[0]  # tables, not the Markdown in a <pre>
    n_charts = 2 + (len(json.loads((tmp / "h.report.json").read_text())["stages"]["cle"]["channel_ranges"])
                    if flags else 0)
    assert p.count["svg"] == n_charts  # weight and activation SQNR bars on every run, CLE's ranges with --cle
    for svg in html.split("<svg")[1:]:
        ET.fromstring("<svg" + svg.split("</svg>")[0] + "</svg>")
    md = (tmp / "h.report.md").read_text()
    assert "<svg" not in md and "| conv1 |" in md


def test_threads_size_every_onnxruntime_session_and_torch(setup, capsys, monkeypatch):
    import importlib.util
    import onnxruntime as ort
    from ptq.threads import use_threads
    from ptq.torch_graph import import_torch
    torch_threads = importlib.util.find_spec("torch") is not None  # the optional recon extra
    model, calib, tmp = setup
    real, seen = ort.InferenceSession, []

    def spy(data, opts=None, **kw):
        seen.append(opts.intra_op_num_threads)
        return real(data, opts, **kw)
    monkeypatch.setattr(ort, "InferenceSession", spy)
    try:
        code, _, err = call(capsys, "run", model, "--calib", calib, "-o", tmp / "one.onnx", "--threads", 1)
        assert code == 0, err
        assert len(seen) > 3 and set(seen) == {1}
        assert not torch_threads or import_torch().get_num_threads() == 1
        if (os.cpu_count() or 1) > 1:
            seen.clear()
            code, _, err = call(capsys, "run", model, "--calib", calib, "-o", tmp / "all.onnx")
            assert code == 0, err
            assert os.cpu_count() in seen  # every core by default (the per-op profile runs on one thread)
            assert not torch_threads or import_torch().get_num_threads() == os.cpu_count()
        code, _, err = call(capsys, "run", model, "--calib", calib, "-o", tmp / "bad.onnx", "--threads", -1)
        assert_one_line_error(code, err, 2, "threads must be >= 0")
        assert not (tmp / "bad.onnx").exists()
    finally:
        use_threads(0)
        if torch_threads:
            import_torch()
