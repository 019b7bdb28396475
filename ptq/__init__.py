"""ptq: post-training quantization of ONNX models (QDQ output), after Nagel et al. 2021, §3."""
from .errors import AccuracyGateError, InputError, PTQError
from .pipeline import Config

__version__ = "0.1.0"
__all__ = ["Config", "PTQError", "InputError", "AccuracyGateError", "__version__"]
