"""onnx-ir (the ONNX project's in-memory IR: live use-def chains, lazily loaded external tensors) against the graph
layer ptq has (onnx.ModelProto + ptq.model.Graph's indices + set_initializer), on the operations ptq's stages do
most: load, index the graph, read every weight as numpy, rewrite every Conv / Gemm / MatMul weight (CLE's
sweep, SmoothQuant), serialize for onnxruntime. Each operation's best of ``--repeat`` runs, seconds.

    pip install onnx-ir   # not a ptq dependency
    python bench/onnx_ir_eval.py [MODEL.onnx ...]   # default: EfficientNet-Lite0 from ../shared/bench

Prints a markdown table; the finding and the decision are in docs/FINDINGS.md."""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from ptq.model import Graph, load_model, set_initializer  # noqa: E402


LAYERS = ("Conv", "Gemm", "MatMul")


def touch(a: np.ndarray) -> float:
    """One value per 16 KiB of ``a``: a memory-mapped tensor is read from disk, an in-memory one barely costs."""
    return float(np.asarray(a).reshape(-1)[::4096].sum())


def best(fn, repeat: int) -> tuple[float, object]:
    out, times = None, []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def onnx_side(path: Path, repeat: int) -> dict:
    t_load, model = best(lambda: load_model(path), repeat)
    t_index, gr = best(lambda: Graph(model), repeat)
    t_read, _ = best(lambda: [touch(gr.const(n)) for n in gr.inits], repeat)
    convs = [n.input[1] for n in model.graph.node if n.op_type in LAYERS and n.input[1] in gr.inits]

    def rewrite():
        g = Graph(model)  # the stages re-index after their edits
        for w in convs:
            set_initializer(model, w, g.const(w) * np.float32(1.0))
    t_edit, _ = best(rewrite, repeat)
    t_ser, _ = best(model.SerializeToString, repeat)
    return {"load": t_load, "index": t_index, "read weights": t_read, "rewrite layer weights": t_edit,
            "serialize": t_ser, "convs": len(convs)}


def ir_side(path: Path, repeat: int) -> dict:
    import onnx_ir as ir
    t_load, model = best(lambda: ir.load(str(path)), repeat)
    g = model.graph
    t_index, _ = best(lambda: {v.name: [u.node for u in v.uses()] for n in g for v in n.outputs}, repeat)
    t_read, _ = best(lambda: [touch(v.const_value.numpy()) for v in g.initializers.values()], repeat)
    convs = [n.inputs[1] for n in g if n.op_type in LAYERS and n.inputs[1] is not None
             and n.inputs[1].const_value is not None]

    def rewrite():
        for v in convs:
            v.const_value = ir.tensor(v.const_value.numpy() * np.float32(1.0), name=v.name)
    t_edit, _ = best(rewrite, repeat)
    def serialize():
        if sum(v.const_value.nbytes for v in g.initializers.values() if v.const_value is not None) < 2**31 - 2**26:
            return ir.serde.serialize_model(model).SerializeToString()
        with tempfile.TemporaryDirectory() as tmp:  # a protobuf holds 2 GB at most: the weights go to a file
            ir.save(model, str(Path(tmp) / "m.onnx"), external_data="m.onnx.data")
    t_ser, _ = best(serialize, repeat)
    return {"load": t_load, "index": t_index, "read weights": t_read, "rewrite layer weights": t_edit,
            "serialize": t_ser, "convs": len(convs)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=[str(ROOT.parent / "shared" / "bench" / "models" /
                                                       "efficientnet_lite0.onnx")])
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    import onnx_ir
    print(f"onnx {onnx.__version__}, onnx-ir {onnx_ir.__version__}\n")
    print("| model | operation | ptq (ModelProto + Graph) s | onnx-ir s |")
    print("|---|---|---|---|")
    for m in a.models:
        ours, theirs = onnx_side(Path(m), a.repeat), ir_side(Path(m), a.repeat)
        for k in ("load", "index", "read weights", "rewrite layer weights", "serialize"):
            label = f"{k} ({ours['convs']})" if k.startswith("rewrite") else k
            print(f"| {Path(m).name} | {label} | {ours[k]:.4f} | {theirs[k]:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
