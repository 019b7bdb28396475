"""ptq: post-training quantization of ONNX models (QDQ output), after Nagel et al. 2021, §3.

    import ptq
    result = ptq.quantize("model.onnx", "calib/", weight_bits=8)   # ptq.run.quantize: all in memory
    result.save("model.w8a8.onnx")                                  # the model and its reports, all or nothing

Names other than the exceptions load on first use, so ``import ptq`` (and ``ptq --help``) stays fast.
"""
from .errors import AccuracyGateError, InputError, PTQError

__version__ = "0.1.0"
__all__ = ["quantize", "Result", "Config", "PTQError", "InputError", "AccuracyGateError", "__version__"]
_LAZY = {"quantize": ("run", "quantize"), "Result": ("run", "Result"), "Config": ("pipeline", "Config")}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'ptq' has no attribute {name!r}")
