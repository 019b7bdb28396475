"""The target: what the runtime that will run the quantized model can do, resolved once per run.

Decisions that depend on the runtime read the target, never a probe of their own, so the same model, data,
settings and target give the same bytes on any machine; the report records the target (``Target.to_json``).

- ``saturating_u8s8``: the runtime adds pairs of u8 × s8 products in saturating int16 (onnxruntime's MLAS on x86
  without AVX-VNNI, VPMADDUBSW): 255 · 127 · 2 = 64770 > 32767 is clipped. Where it does, 8-bit weights of
  non-depthwise convolutions are written in [-64, 63] (255 · 64 · 2 = 32640 fits) and MatMul / Gemm weights as
  uint8 (u8 × u8 kernels do not saturate); see ptq.stages.weight_ranges and ptq.export.
- ``integer_min_clip``: the runtime has Min and Clip kernels on uint8 / int8, so bounds and saturation run on the
  integers between QuantizeLinear and DequantizeLinear (ptq.export).

Named targets: ``vnni`` (exact integer products: x86 with AVX-VNNI / AVX-512 VNNI / AMX, ARM) and ``avx2``
(x86 without VNNI). ``auto`` probes this machine's onnxruntime (ptq.runtime)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import InputError

TARGET_NAMES = ("auto", "vnni", "avx2")


@dataclass(frozen=True)
class Target:
    name: str
    saturating_u8s8: bool
    integer_min_clip: bool
    provider: str = "CPUExecutionProvider"
    onnxruntime: str = ""
    probed: bool = False  # True: read off this machine (``auto``)

    def to_json(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """One line for the report."""
        kernels = "u8 × s8 pairs saturate in int16" if self.saturating_u8s8 else "exact integer products"
        how = "probed on this machine" if self.probed else "--target"
        return f"{self.name} ({kernels}; onnxruntime {self.onnxruntime} {self.provider}; {how})"


def this_machine() -> Target:
    """What this machine's onnxruntime does (the probes of ptq.runtime)."""
    import onnxruntime as ort

    from .runtime import integer_min_clip, saturates_u8s8
    saturating = saturates_u8s8()
    return Target("avx2" if saturating else "vnni", saturating, integer_min_clip(), onnxruntime=ort.__version__,
                  probed=True)


def resolve_target(spec: str | Target = "auto") -> Target:
    """The Target for ``spec``: a Target as it is, ``auto`` (this machine), or a name of TARGET_NAMES. Integer
    Min / Clip is a property of the onnxruntime release, so a named target takes it from the one installed."""
    if isinstance(spec, Target):
        return spec
    if spec not in TARGET_NAMES:
        raise InputError(f"unknown target {spec!r} (choose from {', '.join(TARGET_NAMES)})")
    here = this_machine()
    if spec == "auto":
        return here
    return Target(spec, spec == "avx2", here.integer_min_clip, onnxruntime=here.onnxruntime)
