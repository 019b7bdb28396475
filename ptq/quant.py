"""Quantization grids in numpy: the spec of a quantizer, its encoding, and quantize / dequantize / fake-quant.

Uniform affine quantization (white paper eq. 1-3):
    x_int = clip(round(x / s) + z, q_min, q_max),    x_hat = s * (x_int - z)
Rounding is half-to-even, as onnxruntime's QuantizeLinear does, so numpy and the exported model agree exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

TINY_SCALE = np.float32(1e-8)  # a scale must be > 0; an all-zero tensor gets this one


@dataclass(frozen=True)
class QuantSpec:
    """What a quantizer is allowed to be: bit width, signedness, symmetry, per-channel axis (None = per tensor)."""

    bits: int = 8
    signed: bool = False
    symmetric: bool = False
    axis: int | None = None

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    def with_(self, **kw) -> "QuantSpec":
        return replace(self, **kw)


@dataclass
class Encoding:
    """A chosen quantizer: the spec plus scale and zero point (arrays of shape [C] per channel, [] per tensor),
    the range method that chose it and what it measured (``stats``: sqnr_db, clip range, ...)."""

    spec: QuantSpec
    scale: np.ndarray
    zero_point: np.ndarray
    method: str = "minmax"
    stats: dict = field(default_factory=dict)

    @property
    def lo(self) -> np.ndarray:
        return (self.spec.qmin - self.zero_point) * self.scale

    @property
    def hi(self) -> np.ndarray:
        return (self.spec.qmax - self.zero_point) * self.scale

    def to_json(self) -> dict:
        def arr(a):
            a = np.asarray(a)
            return a.item() if a.ndim == 0 else a.tolist()

        return {"bits": self.spec.bits, "signed": self.spec.signed, "symmetric": self.spec.symmetric,
                "axis": self.spec.axis, "scale": arr(self.scale), "zero_point": arr(self.zero_point),
                "method": self.method, **{k: arr(v) if isinstance(v, np.ndarray) else v
                                          for k, v in self.stats.items()}}


def encoding_from_range(spec: QuantSpec, lo, hi, method: str = "minmax", stats: dict | None = None) -> Encoding:
    """Scale and zero point that represent [lo, hi] (arrays broadcast per channel).

    Symmetric: s = max(|lo|, |hi|) / q_max, z = 0 (for unsigned symmetric, lo is ignored: the grid is [0, hi]).
    Asymmetric: the range is widened to hold 0 exactly, s = (hi - lo) / (q_max - q_min),
    z = round(q_min - lo / s) (white paper eq. 2-3).
    """
    lo = np.minimum(np.asarray(lo, np.float32), 0)
    hi = np.maximum(np.asarray(hi, np.float32), 0)
    if spec.symmetric:
        top = np.maximum(-lo, hi) if spec.signed else hi
        scale = top / np.float32(spec.qmax)
        zp = np.zeros_like(scale, dtype=np.int32) + (0 if spec.signed else spec.qmin)
    else:
        scale = (hi - lo) / np.float32(spec.qmax - spec.qmin)
        scale = np.where(scale > 0, scale, TINY_SCALE)
        zp = np.clip(np.round(spec.qmin - lo / scale), spec.qmin, spec.qmax).astype(np.int32)
    scale = np.where(scale > 0, scale, TINY_SCALE).astype(np.float32)
    return Encoding(spec, scale, np.asarray(zp, np.int32), method, dict(stats or {}))


def _bcast(a: np.ndarray, x: np.ndarray, axis: int | None) -> np.ndarray:
    """Reshape a per-channel array so that it broadcasts along ``axis`` of x."""
    a = np.asarray(a)
    if axis is None or a.ndim == 0:
        return a
    shape = [1] * x.ndim
    shape[axis] = -1
    return a.reshape(shape)


def quantize(x: np.ndarray, enc: Encoding) -> np.ndarray:
    """x -> integers (int32 array) on the encoding's grid."""
    s = _bcast(enc.scale, x, enc.spec.axis).astype(np.float32)
    z = _bcast(enc.zero_point, x, enc.spec.axis)
    q = np.rint(np.asarray(x, np.float32) / s) + z
    return np.clip(q, enc.spec.qmin, enc.spec.qmax).astype(np.int32)


def dequantize(q: np.ndarray, enc: Encoding) -> np.ndarray:
    s = _bcast(enc.scale, q, enc.spec.axis).astype(np.float32)
    z = _bcast(enc.zero_point, q, enc.spec.axis)
    return ((q - z) * s).astype(np.float32)


def fake_quant(x: np.ndarray, enc: Encoding) -> np.ndarray:
    """Quantize then dequantize: the value the quantized network sees, (clip(rint(x / s) + z) − z) · s in float32
    (``dequantize(quantize(x, enc), enc)`` without its integer array)."""
    x = np.asarray(x, np.float32)
    s = _bcast(enc.scale, x, enc.spec.axis).astype(np.float32)
    z = _bcast(enc.zero_point, x, enc.spec.axis).astype(np.float32)
    return fake_quant_grid(x, s, z, enc.spec.qmin, enc.spec.qmax)


def fake_quant_grid(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """Fake-quant with already-broadcast scale / zero point arrays; the inner loop of the range and scale searches
    (one result array, updated in place: x and scale may broadcast to many candidates at once)."""
    q = np.divide(x, scale)
    np.rint(q, out=q)
    q += zp
    np.clip(q, qmin, qmax, out=q)
    q -= zp
    q *= scale
    return q


def sqnr_db(ref: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio 10·log10(‖x‖² / ‖x − x̂‖²) in dB (inf when exact)."""
    ref = np.asarray(ref, np.float64)
    noise = float(np.sum((ref - np.asarray(approx, np.float64)) ** 2))
    signal = float(np.sum(ref**2))
    if noise == 0:
        return float("inf")
    if signal == 0:
        return float("-inf")
    return 10.0 * np.log10(signal / noise)


def zero_point_folded(q: np.ndarray, enc: Encoding, limit: int = 127) -> tuple[np.ndarray, Encoding] | None:
    """Integers ``q`` of an asymmetric grid rewritten on a grid of the same scale with zero point 0:
    s · (q − z) = s · q' with q' = q − z, the same dequantized values. Returns (q', int8 symmetric encoding), or None
    where some |q'| exceeds ``limit`` (127: int8; an n-bit asymmetric grid with n ≤ 7 always fits, since q and z
    both lie in [q_min, q_max], so |q − z| ≤ 2^n − 1)."""
    folded = np.asarray(q, np.int32) - _bcast(enc.zero_point, np.asarray(q), enc.spec.axis)
    if folded.size and int(np.max(np.abs(folded))) > limit:
        return None
    spec = QuantSpec(bits=8, signed=True, symmetric=True, axis=enc.spec.axis)
    return folded, Encoding(spec, enc.scale, np.zeros_like(np.asarray(enc.zero_point, np.int32)),
                                             enc.method, enc.stats)


def bias_encoding(wenc: Encoding, x_enc: Encoding) -> Encoding:
    """int32 bias quantizer: scale s_in · s_w (per output channel), zero point 0."""
    scale = (np.asarray(wenc.scale, np.float64) * float(x_enc.scale)).astype(np.float32)
    spec = QuantSpec(bits=32, signed=True, symmetric=True, axis=0 if scale.ndim else None)
    return Encoding(spec, scale, np.zeros(scale.shape, np.int32), "bias")


def int32_bias(b: np.ndarray, wenc: Encoding, x_enc: Encoding) -> tuple[np.ndarray, Encoding] | None:
    """The bias on its int32 grid s_in · s_w: (integers, encoding), or None where some b / s falls outside int32
    (then it cannot be stored as the layer's quantized bias)."""
    benc = bias_encoding(wenc, x_enc)
    if not np.all(np.abs(b / benc.scale) < 2**31 - 1):
        return None
    return quantize(b, benc), benc
