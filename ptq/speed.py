"""What the quantized model costs at run time: batch-1 latency of the FP32 and the quantized model in onnxruntime
CPU (medians of repeated runs, one after the other in this process), and the Q/DQ nodes that onnxruntime's graph
optimizations leave standing (not fused into an integer kernel), with the ops beside them — each one is float
work added around a float op."""
from __future__ import annotations

import collections
import os
import tempfile

import onnx
import onnxruntime as ort

from .evaluate import latency_ms

QDQ = ("QuantizeLinear", "DequantizeLinear")


def unfused_qdq(model: onnx.ModelProto) -> dict:
    """{"QuantizeLinear": n, "DequantizeLinear": m, "beside": {op type: count}} after onnxruntime's optimizations
    (the graph it runs, saved by the session)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = path
        ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        optimized = onnx.load(path, load_external_data=False)
    g = optimized.graph
    producer = {o: n for n in g.node for o in n.output}
    readers = collections.defaultdict(list)
    for n in g.node:
        for i in n.input:
            readers[i].append(n)
    beside = collections.Counter()
    for n in g.node:
        if n.op_type == "QuantizeLinear":
            p = producer.get(n.input[0])
            beside[p.op_type if p is not None else "graph input"] += 1
        elif n.op_type == "DequantizeLinear":
            for r in readers.get(n.output[0], []):
                if r.op_type not in QDQ:
                    beside[r.op_type] += 1
    counts = collections.Counter(n.op_type for n in g.node if n.op_type in QDQ)
    return {"QuantizeLinear": counts["QuantizeLinear"], "DequantizeLinear": counts["DequantizeLinear"],
            "beside": dict(beside.most_common())}


def measure_speed(fp_model: onnx.ModelProto, q_model: onnx.ModelProto, feed: dict, runs: int = 20) -> dict:
    """Batch-1 latency of both models (ms, median of ``runs``), their ratio and the unfused Q/DQ."""
    fp_ms, q_ms = latency_ms(fp_model, feed, runs), latency_ms(q_model, feed, runs)
    return {"fp32_ms": round(fp_ms, 3), "quant_ms": round(q_ms, 3), "ratio": round(q_ms / max(fp_ms, 1e-9), 3),
            "runs": runs, "unfused": unfused_qdq(q_model)}
