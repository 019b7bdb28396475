"""onnxruntime's own quantize_static, as the benchmark's baseline (run as a subprocess so that its time and
peak RSS are its own).

    python bench/ort_baseline.py MODEL OUT CALIB_NPY METHOD PER_CHANNEL

CALIB_NPY holds the preprocessed calibration batch [N, C, H, W] float32. Pre-processing is onnxruntime's
recommended quant_pre_process (its symbolic shape inference skipped: it needs sympy, and these models have
static shapes apart from the batch size). Defaults otherwise: QDQ, QInt8 activations and weights (S8S8).
"""
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process


class Reader(CalibrationDataReader):
    def __init__(self, data, name):
        self.it = iter([{name: data[k:k + 1]} for k in range(len(data))])

    def get_next(self):
        return next(self.it, None)


def main():
    model, out, calib, method, per_channel = sys.argv[1:6]
    data = np.load(calib, mmap_mode="r")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        pre = str(Path(tmp) / "pre.onnx")
        quant_pre_process(model, pre, skip_symbolic_shape=True)
        import onnx
        name = onnx.load(pre).graph.input[0].name
        quantize_static(pre, out, Reader(np.asarray(data), name), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel == "1", calibrate_method=getattr(CalibrationMethod, method))
    print(f"seconds {time.perf_counter() - t0:.2f}")
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")]
    print(f"peak_rss_mb {int(hwm[0].split()[1]) / 1024:.1f}")


if __name__ == "__main__":
    main()
