"""Print the path of the demo model: PP-OCRv4 text detection (ch_PP-OCRv4_det_infer.onnx), shipped inside the
`rapidocr-onnxruntime` wheel (Apache-2.0). The package is installed with --no-deps and never imported: only its
ONNX file is used."""
import importlib.util
import sys
from pathlib import Path

spec = importlib.util.find_spec("rapidocr_onnxruntime")
if spec is None or not spec.submodule_search_locations:
    sys.exit("demo model missing: pip install --no-deps rapidocr-onnxruntime==1.4.4")
print(Path(spec.submodule_search_locations[0]) / "models" / "ch_PP-OCRv4_det_infer.onnx")
