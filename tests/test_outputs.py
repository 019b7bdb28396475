"""All-or-nothing outputs: an interrupted run leaves nothing or a complete set, concurrent runs on one -o leave one
consistent set, files follow the umask, and the CLI's quiet / JSON modes print what they promise."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from builders import save_npy_samples, zoo

from ptq.outputs import OutputSet
from ptq_cli.main import main

pytestmark = pytest.mark.slow  # end-to-end (make test-fast leaves it out)

SET = ("m.onnx", "m.report.json", "m.report.md", "m.report.html")


@pytest.fixture
def setup(rng, tmp_path):
    model = tmp_path / "zoo.onnx"
    onnx.save(zoo(rng), str(model))
    calib = save_npy_samples(tmp_path / "calib", rng, (3, 16, 16), 64)
    out = tmp_path / "out"
    out.mkdir()
    return model, calib, out


def ptq(*args):
    return subprocess.Popen([sys.executable, "-m", "ptq", *map(str, args)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def assert_consistent(out_dir):
    """Nothing at all, or the model with its own reports (the report's hash is the model file's)."""
    names = sorted(os.listdir(out_dir))
    if not names:
        return False
    assert names == sorted(SET), names
    report = json.loads((out_dir / "m.report.json").read_text())
    assert report["model_sha256"] == hashlib.sha256((out_dir / "m.onnx").read_bytes()).hexdigest()
    assert report["output"] == str(out_dir / "m.onnx")
    return True


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_run_stopped_mid_work_leaves_nothing(setup, tmp_path, sig):
    """The signal comes while ptq reads calibration feeds (a reader that says so and then waits), so the run is
    certainly mid-work, whatever the machine's speed: it exits 130 / 143 and leaves no file, temporary or not."""
    model, _, out = setup
    ready = tmp_path / "ready"
    reader = tmp_path / "slow_reader.py"
    reader.write_text("import time\nimport numpy as np\n\ndef feeds():\n"
                      f"    for k in range(8):\n        if k == 4:\n            open({str(ready)!r}, 'w').close()\n"
                      "            time.sleep(120)\n"
                      "        yield {'x': np.full((1, 3, 16, 16), k / 8, np.float32)}\n")
    p = ptq("run", model, "--calib-reader", f"{reader}:feeds", "-o", out / "m.onnx")
    deadline = time.monotonic() + 60
    while not ready.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), p.communicate(timeout=5)[1]
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == (130 if sig == signal.SIGINT else 143), err
    assert "Traceback" not in err and list(out.iterdir()) == []


def test_interrupted_runs_leave_nothing_or_a_complete_set(setup):
    """Signals at random moments (some before the end, some after: which, depends on the machine's speed):
    each leaves nothing or a complete set."""
    model, calib, out = setup
    delays = np.random.default_rng(7).uniform(0.3, 2.5, 6)
    for k, delay in enumerate(delays):
        for f in out.iterdir():
            f.unlink()
        p = ptq("run", model, "--calib", calib, "-o", out / "m.onnx", "--adaround", "--adaround-iters", "50", "-q")
        time.sleep(delay)
        p.send_signal(signal.SIGINT if k % 2 else signal.SIGTERM)
        _, err = p.communicate(timeout=60)
        written = assert_consistent(out)
        # 130 / 143: stopped by ptq's handlers; a negative code: the signal came while Python was starting or
        # shutting down, outside ptq's handlers (what is on disk was checked above all the same)
        assert p.returncode in (0, 130, 143, -signal.SIGINT, -signal.SIGTERM), (delay, p.returncode, err)
        assert p.returncode < 0 or "Traceback" not in err, err
        assert written or p.returncode != 0  # a run that says it succeeded wrote its set


def test_signals_wait_for_the_renames_of_a_commit(tmp_path, monkeypatch):
    targets = [tmp_path / n for n in SET]
    renamed = []
    real_replace = os.replace

    def replace_then_interrupt(src, dst):
        real_replace(src, dst)
        renamed.append(dst)
        if len(renamed) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # arrives in the middle of the set
    monkeypatch.setattr(os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        with OutputSet(targets) as out:
            for t in targets:
                out.stage_text(t, t.name)
            out.commit()
    assert renamed == targets and sorted(os.listdir(tmp_path)) == sorted(SET)  # all four, no temporary file


def test_concurrent_runs_on_one_output_leave_one_consistent_set(setup):
    model, calib, out = setup
    for _ in range(3):
        ps = [ptq("run", model, "--calib", calib, "-o", out / "m.onnx", "--weight-bits", bits, "-q")
              for bits in (8, 5)]
        for p in ps:
            _, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
        assert assert_consistent(out)


def test_files_follow_the_umask(setup):
    model, calib, out = setup
    old = os.umask(0o027)
    try:
        assert main(["run", str(model), "--calib", str(calib), "-o", str(out / "m.onnx"), "-q"]) == 0
    finally:
        os.umask(old)
    assert {oct(os.stat(out / n).st_mode & 0o777) for n in SET} == {oct(0o640)}


def test_quiet_prints_nothing_and_eval_json_holds_the_gate(setup, capsys):
    model, calib, out = setup
    recipe = out.parent / "r.toml"
    # bad enough for warnings, if any, and a failing gate
    recipe.write_text("weight_bits = 2\nact_bits = 2\nadaround = false\nblock_recon = false\nrepair = false\n")
    assert main(["run", str(model), "--calib", str(calib), "-o", str(out / "m.onnx"), "-q", "--recipe",
                 str(recipe)]) == 0
    assert capsys.readouterr() == ("", "")
    code = main(["eval", str(model), str(out / "m.onnx"), "--data", str(calib), "--json", "--max-drop", "0"])
    stdout, err = capsys.readouterr()
    result = json.loads(stdout)  # the whole of stdout is one JSON document
    gate = result["gate"]
    assert code == 3 and gate["passed"] is False and gate["line"].startswith("accuracy gate failed")
    assert gate["drop"] > gate["allowed"] == 0 and gate["samples"] == result["samples"] and gate["unit"] == "points"
    assert err.strip() == "ptq: " + gate["line"]


def test_metric_module_in_the_current_folder(setup, capsys, monkeypatch):
    model, calib, out = setup
    (out.parent / "localmetric.py").write_text("def score(fp, q, labels):\n    return 1.0\n")
    monkeypatch.chdir(out.parent)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(out.parent))])
    args = ["run", str(model), "--calib", str(calib), "-o", str(out / "m.onnx"), "--max-drop", "0", "-q"]
    assert main(args + ["--metric", "localmetric:score"]) == 0, capsys.readouterr().err
    assert main(args + ["--metric", str(out.parent / "localmetric.py") + ":score"]) == 0
    report = json.loads((out / "m.report.json").read_text())
    assert report["gate"]["line"].startswith("accuracy gate passed: metric drop 0.00")


def test_gate_with_a_user_metric_on_a_model_without_class_scores(rng, tmp_path, capsys):
    """--max-drop with --metric needs no [N, C] output: the gate is the user's function."""
    from builders import conv_bn_relu
    model = tmp_path / "cbr.onnx"
    onnx.save(conv_bn_relu(rng), str(model))
    calib = save_npy_samples(tmp_path / "calib", rng, (3, 8, 8), 16)
    metric = tmp_path / "m.py"
    metric.write_text("import numpy as np\ndef cos(fp, q, labels):\n    a, b = fp['y'].ravel(), q['y'].ravel()\n"
                      "    return float(100 * a @ b / np.linalg.norm(a) / np.linalg.norm(b))\n")
    args = ["run", str(model), "--calib", str(calib), "-o", str(tmp_path / "q.onnx"), "--metric", f"{metric}:cos"]
    assert main(args + ["--max-drop", "1"]) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "q.report.json").read_text())
    assert report["gate"]["line"].startswith("accuracy gate passed: metric drop")
    assert main(args + ["--max-drop", "0", "--weight-bits", "2", "--act-bits", "2", "--no-adaround",
                        "--no-block-recon"]) == 3
    assert "accuracy gate failed: metric drop" in capsys.readouterr().err


def test_a_signal_landing_in_a_finalizer_is_reported_at_the_end(tmp_path, monkeypatch, capsys):
    """Python cannot raise from a __del__: the handler's KeyboardInterrupt there is swallowed and the run goes on;
    ptq then says it was interrupted (exit 130), with no traceback."""
    import ptq.report

    class Dies:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)

    def table(files, exits=()):
        Dies()  # freed at once: the signal arrives inside its finalizer
        return "| table |\n"
    monkeypatch.setattr(ptq.report, "summary_table", table)
    (tmp_path / "a.report.json").write_text("{}")
    assert main(["summary", str(tmp_path), "-o", str(tmp_path / "s.md")]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "ptq: interrupted" and "Traceback" not in err
    assert (tmp_path / "s.md").read_text() == "| table |\n"  # the run went on to write its whole output
