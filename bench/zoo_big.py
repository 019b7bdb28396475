"""A model over 2 GB for the zoo: ten 8192×8192 MatMul + Relu layers with random weights (2.7 GB of float32),
stored as external data beside the model file, written one weight at a time so that building it needs no more
than one weight's memory.

    python bench/zoo_big.py OUT_DIR [--layers 10] [--width 8192]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

ALIGN = 4096  # page-aligned offsets, so a runtime may map the weights instead of copying them


def build(out_dir: Path, layers: int = 10, width: int = 8192, seed: int = 0) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path, data = out_dir / "big.onnx", out_dir / "big.onnx.data"
    rng = np.random.default_rng(seed)
    inits, nodes, offset = [], [], 0
    with open(data, "wb") as f:
        for k in range(layers):
            w = (rng.standard_normal((width, width), dtype=np.float32) * np.float32(np.sqrt(2.0 / width)))
            raw = w.tobytes()
            f.write(raw)
            t = TensorProto(name=f"w{k}", data_type=TensorProto.FLOAT, dims=[width, width],
                            data_location=TensorProto.EXTERNAL)
            for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            inits.append(t)
            offset += len(raw)
            pad = (-offset) % ALIGN
            f.write(b"\0" * pad)
            offset += pad
            del w, raw
            src = "x" if k == 0 else f"r{k - 1}"
            nodes.append(helper.make_node("MatMul", [src, f"w{k}"], [f"m{k}"], f"matmul{k}"))
            nodes.append(helper.make_node("Relu", [f"m{k}"], [f"r{k}" if k < layers - 1 else "y"], f"relu{k}"))
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--width", type=int, default=8192)
    a = ap.parse_args(argv)
    print(build(a.out, a.layers, a.width))
    return 0


if __name__ == "__main__":
    sys.exit(main())
