"""A segment of an ONNX graph evaluated with torch, so that gradients flow through it (block reconstruction).

``TorchSegment(nodes, const)`` runs the nodes in order on torch tensors: ``run(env, override, act)`` starts from
``env`` {tensor: torch tensor} (the segment's inputs), takes initializers from ``override`` {name: tensor} where
given (a layer's soft-quantized weight), else the constants, and passes every tensor a node writes through
``act(name, x)`` (an activation quantizer, or the identity). The ops are those of the CNN, detector-neck,
text-recognizer and transformer blocks ptq reconstructs (``SUPPORTED``; Resize only as nearest with asymmetric
coordinates and floor); ``unsupported(nodes)`` names the others, and a segment holding one is not built.

torch is an optional dependency (``pip install 'ptq[recon]'``); ``import_torch`` says how to install it.
"""
from __future__ import annotations

import ctypes
import math
from contextlib import contextmanager

import numpy as np
import onnx

from .errors import InputError
from .model import attr
from .threads import thread_count

_ELEMENTWISE = {"Relu", "Sigmoid", "Tanh", "Erf", "Sqrt", "Exp", "Neg", "Abs", "Reciprocal", "Identity", "Dropout",
                "Add", "Sub", "Mul", "Div", "Pow", "Min", "Max", "Clip", "HardSigmoid", "HardSwish", "LeakyRelu",
                "Gelu"}
LOCAL_OPS = _ELEMENTWISE | {"Conv", "GlobalAveragePool"}  # ops that compute the same on a spatial crop's interior
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc malloc.h)
HEAP_BYTES = 1 << 30  # allocations up to this size come from the heap, and freed memory stays there
DEFAULT_MMAP, DEFAULT_TRIM = 128 << 10, 128 << 10  # glibc's initial thresholds
SUPPORTED = LOCAL_OPS | {"Gemm", "MatMul", "AveragePool", "MaxPool", "Flatten", "Reshape", "Transpose", "Concat",
                         "Softmax", "ReduceMean", "Squeeze", "Unsqueeze", "LayerNormalization", "Shape", "Gather",
                         "Cast", "BatchNormalization", "ConvTranspose", "Resize", "Slice", "DepthToSpace",
                         "SpaceToDepth"}


def import_torch():
    """torch with ptq's thread count (ptq.threads), or InputError saying how to install it (block
    reconstruction's optional extra)."""
    try:
        import torch
    except ImportError:
        raise InputError("block reconstruction needs PyTorch (CPU is enough): pip install 'ptq[recon]' "
                         "(or: pip install torch)") from None
    torch.set_num_threads(thread_count())
    return torch


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return None


@contextmanager
def tensor_heap():
    """While a block learns: on glibc, allocations up to HEAP_BYTES come from the heap and freed memory stays
    there, instead of being mapped and unmapped for each tensor (a reconstruction step allocates the same large
    tensors again and again, and fresh pages cost more than the arithmetic: docs/FINDINGS.md). On entry and on exit
    the heap's free memory goes back to the system (``malloc_trim``); on exit the thresholds are glibc's initial
    ones again."""
    libc = _libc()
    if libc is None:
        yield
        return
    libc.malloc_trim(0)  # what was freed before (the block's onnxruntime passes) goes back first
    libc.mallopt(M_MMAP_THRESHOLD, HEAP_BYTES)
    libc.mallopt(M_TRIM_THRESHOLD, HEAP_BYTES)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, DEFAULT_MMAP)
        libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM)
        libc.malloc_trim(0)


def autograd_bytes(torch, forward) -> int:
    """Bytes of the distinct tensor storages autograd keeps for the backward pass of ``forward()`` (run once, its
    result dropped): what one training step holds besides its gradients."""
    kept: dict = {}

    def pack(t):
        storage = t.untyped_storage()
        kept[storage.data_ptr()] = max(kept.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(kept.values())


def unsupported(nodes) -> list[str]:
    """Op types among ``nodes`` that ``TorchSegment`` cannot run (with their attributes: a Conv with auto_pad, a
    Softmax of opset < 13 semantics is not detected here and runs with the opset-13 meaning)."""
    bad = {n.op_type for n in nodes if n.op_type not in SUPPORTED or n.domain not in ("", "ai.onnx")}
    bad |= {f"{n.op_type}(auto_pad)" for n in nodes if n.op_type in ("Conv", "ConvTranspose")
            and _text(attr(n, "auto_pad", "NOTSET")) != "NOTSET"}
    bad |= {"ConvTranspose(output_shape, asymmetric pads)" for n in nodes if n.op_type == "ConvTranspose"
            and (attr(n, "output_shape") is not None or not _pads(n, len(attr(n, "pads", [])) // 2)[1])}
    bad |= {f"Resize({', '.join(other)})" for n in nodes if n.op_type == "Resize" and (other := _resize_other(n))}
    return sorted(bad)


RESIZE_KIND = {"mode": ("nearest", "nearest"), "coordinate_transformation_mode": ("half_pixel", "asymmetric"),
               "nearest_mode": ("round_prefer_floor", "floor")}  # attribute: (ONNX's default, what TorchSegment runs)


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _resize_other(node) -> list[str]:
    """The settings of a Resize that TorchSegment does not run (RESIZE_KIND), with ONNX's defaults filled in."""
    values = [_text(attr(node, name, default)) for name, (default, _) in RESIZE_KIND.items()]
    return [v for v, (_, ok) in zip(values, RESIZE_KIND.values()) if v != ok]


def _pads(node, nd: int) -> tuple[list[int], bool]:
    pads = list(attr(node, "pads", [0] * 2 * nd))
    return pads, pads[:nd] == pads[nd:]


class TorchSegment:
    """The nodes of one graph segment, run with torch (see module docstring). ``const(name)`` returns an
    initializer as numpy (None for a computed tensor)."""

    def __init__(self, nodes, const):
        self.torch = import_torch()
        self.nodes = list(nodes)
        bad = unsupported(self.nodes)
        if bad:
            raise InputError(f"block reconstruction cannot run {', '.join(bad)}")
        self.consts = {}  # initializer name -> torch tensor (float32, or its integer type)
        for n in self.nodes:
            for i in n.input:
                if i and i not in self.consts:
                    v = const(i)
                    if v is not None:
                        v = np.array(v, np.float32 if v.dtype.kind == "f" else v.dtype)
                        self.consts[i] = self.torch.from_numpy(v)

    def run(self, env: dict, override: dict | None = None, act=None, shapes: dict | None = None,
            keep=None) -> dict:
        """{tensor: value} of the inputs and of every tensor the nodes write; with ``keep`` (tensor names) only
        those, each other tensor dropped after the last node that reads it (what autograd needs it keeps itself).
        ``shapes`` {tensor: shape of one sample}: tensors from outside the segment that only a Shape node reads
        (axis 0 is the batch)."""
        env, override = dict(env), override or {}
        batch = next(iter(env.values())).shape[0] if env else 1
        last = {i: k for k, n in enumerate(self.nodes) for i in n.input}
        for k, n in enumerate(self.nodes):
            if n.op_type == "Shape" and n.input[0] not in env:
                shape = self.torch.tensor([batch, *shapes[n.input[0]]], dtype=self.torch.int64)
                env[n.output[0]] = shape[attr(n, "start", 0):attr(n, "end", None)]
                continue
            args = [None if not i else env[i] if i in env else override[i] if i in override else self.consts[i]
                    for i in n.input]
            out = self._op(n, args)
            env[n.output[0]] = out if act is None else act(n.output[0], out)
            if keep is not None:
                for i in n.input:
                    if last.get(i) == k and i not in keep:
                        env.pop(i, None)
        return env if keep is None else {t: env[t] for t in keep}

    def _op(self, n: onnx.NodeProto, a: list):
        t, F, op = self.torch, self.torch.nn.functional, n.op_type
        unary = {"Relu": t.relu, "Sigmoid": t.sigmoid, "Tanh": t.tanh, "Erf": t.erf, "Sqrt": t.sqrt, "Exp": t.exp,
                 "Neg": t.neg, "Abs": t.abs, "Reciprocal": t.reciprocal}
        binary = {"Add": t.add, "Sub": t.sub, "Mul": t.mul, "Div": t.div, "Pow": t.pow}
        if op in unary:
            return unary[op](a[0])
        if op in binary:
            return binary[op](a[0], a[1])
        if op in ("Identity", "Dropout"):
            return a[0]
        if op == "Shape":
            return t.tensor(list(a[0].shape), dtype=t.int64)[attr(n, "start", 0):attr(n, "end", None)]
        if op == "Gather":
            ax = attr(n, "axis", 0)
            idx = a[1].long()
            out = t.index_select(a[0], ax, idx.reshape(-1) % a[0].shape[ax])
            return out.reshape(tuple(a[0].shape[:ax]) + tuple(idx.shape) + tuple(a[0].shape[ax + 1:]))
        if op == "Cast":
            to = onnx.helper.tensor_dtype_to_np_dtype(attr(n, "to"))
            return a[0].to(t.float32 if to.kind == "f" else t.int64 if to.kind in "iu" else t.bool)
        if op in ("Min", "Max"):
            f, out = (t.minimum if op == "Min" else t.maximum), a[0]
            for b in a[1:]:
                out = f(out, b)
            return out
        if op == "Clip":
            lo = a[1] if len(a) > 1 and a[1] is not None else attr(n, "min", None)
            hi = a[2] if len(a) > 2 and a[2] is not None else attr(n, "max", None)
            return t.clamp(a[0], None if lo is None else float(lo), None if hi is None else float(hi))
        if op == "HardSigmoid":
            return t.clamp(attr(n, "alpha", 0.2) * a[0] + attr(n, "beta", 0.5), 0, 1)
        if op == "HardSwish":
            return a[0] * t.clamp(a[0] / 6 + 0.5, 0, 1)
        if op == "LeakyRelu":
            return F.leaky_relu(a[0], attr(n, "alpha", 0.01))
        if op == "Gelu":
            return F.gelu(a[0], approximate="tanh" if attr(n, "approximate", b"none") in (b"tanh", "tanh") else "none")
        if op in ("Conv", "ConvTranspose"):
            return self._conv(n, a)
        if op == "BatchNormalization":  # inference form: (x - mean) / sqrt(var + eps) * scale + B
            return F.batch_norm(a[0], a[3], a[4], a[1], a[2], training=False, eps=attr(n, "epsilon", 1e-5))
        if op == "Resize":
            return self._resize(n, a)
        if op == "Slice":
            return self._slice(n, a)
        if op in ("DepthToSpace", "SpaceToDepth"):
            return self._depth_space(n, a[0])
        if op == "Gemm":
            x = a[0].transpose(0, 1) if attr(n, "transA", 0) else a[0]
            w = a[1].transpose(0, 1) if attr(n, "transB", 0) else a[1]
            y = attr(n, "alpha", 1.0) * (x @ w)
            return y + attr(n, "beta", 1.0) * a[2] if len(a) > 2 and a[2] is not None else y
        if op == "MatMul":
            return t.matmul(a[0], a[1])
        if op == "GlobalAveragePool":
            return a[0].mean(dim=tuple(range(2, a[0].dim())), keepdim=True)
        if op in ("AveragePool", "MaxPool"):
            return self._pool(n, a[0])
        if op == "Flatten":
            ax = attr(n, "axis", 1) % a[0].dim()
            return a[0].reshape(int(np.prod(a[0].shape[:ax], dtype=np.int64)), -1)
        if op == "Reshape":
            shape = [int(d) for d in a[1]]
            shape = [a[0].shape[k] if d == 0 and not attr(n, "allowzero", 0) else d for k, d in enumerate(shape)]
            return a[0].reshape(shape)
        if op == "Transpose":
            return a[0].permute(*(attr(n, "perm") or range(a[0].dim() - 1, -1, -1)))
        if op == "Concat":
            return t.cat(a, dim=attr(n, "axis"))
        if op == "Softmax":
            return t.softmax(a[0], dim=attr(n, "axis", -1))
        if op == "ReduceMean":
            axes = attr(n, "axes") or ([int(v) for v in a[1]] if len(a) > 1 and a[1] is not None else None)
            dims = tuple(axes) if axes else tuple(range(a[0].dim()))
            return a[0].mean(dim=dims, keepdim=bool(attr(n, "keepdims", 1)))
        if op in ("Squeeze", "Unsqueeze"):
            axes = attr(n, "axes") or ([int(v) for v in a[1]] if len(a) > 1 and a[1] is not None else None)
            x = a[0]
            if op == "Squeeze":
                dims = [d % x.dim() for d in axes] if axes else [k for k, s in enumerate(x.shape) if s == 1]
                for d in sorted(dims, reverse=True):
                    x = x.squeeze(d)
                return x
            for d in sorted(d % (x.dim() + len(axes)) for d in axes):
                x = x.unsqueeze(d)
            return x
        if op == "LayerNormalization":
            ax = attr(n, "axis", -1) % a[0].dim()
            shape = tuple(a[0].shape[ax:])
            return F.layer_norm(a[0], shape, a[1].reshape(shape) if a[1] is not None else None,
                                a[2].reshape(shape) if len(a) > 2 and a[2] is not None else None,
                                attr(n, "epsilon", 1e-5))
        raise InputError(f"block reconstruction cannot run {op}")  # unreachable: unsupported() refused it

    def _conv(self, n, a):
        """Conv, and ConvTranspose with symmetric pads (unsupported() refuses its output_shape and auto_pad)."""
        F = self.torch.nn.functional
        x, w = a[0], a[1]
        b = a[2] if len(a) > 2 else None
        nd = w.dim() - 2
        pads, symmetric = _pads(n, nd)
        kw = dict(stride=tuple(attr(n, "strides", [1] * nd)), dilation=tuple(attr(n, "dilations", [1] * nd)),
                  groups=attr(n, "group", 1))
        if n.op_type == "ConvTranspose":
            conv = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[nd]
            return conv(x, w, b, padding=tuple(pads[:nd]), output_padding=tuple(attr(n, "output_padding", [0] * nd)),
                        **kw)
        if not symmetric:  # F.pad takes the last dimension first: (left, right, top, bottom)
            x = F.pad(x, [p for k in reversed(range(nd)) for p in (pads[k], pads[k + nd])])
            pads = [0] * 2 * nd
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
        return conv(x, w, b, padding=tuple(pads[:nd]), **kw)

    def _resize(self, n, a):
        """Resize, nearest with asymmetric coordinates and floor, along every axis k: y[i] = x[⌊i / s_k⌋] (clamped
        to the last index), s_k the given scale, or out_k / in_k where ``sizes`` are given, in float32 as onnxruntime
        computes it. Inputs: X, roi, scales, sizes (opset ≥ 11; opset 10 has X, scales)."""
        t, x = self.torch, a[0]
        scales = a[1] if len(a) == 2 else a[2] if len(a) > 2 else None
        sizes = a[3] if len(a) > 3 else None
        f32 = t.float32
        if sizes is not None and sizes.numel():
            out = [int(v) for v in sizes]
            scale = t.tensor(out, dtype=f32) / t.tensor(x.shape, dtype=f32)
        else:
            scale = scales.to(f32)
            out = [int(math.floor(i * float(s))) for i, s in zip(x.shape, scale)]
        for k, o in enumerate(out):
            if o != x.shape[k] or float(scale[k]) != 1.0:
                idx = t.floor(t.arange(o, dtype=f32) / scale[k]).long().clamp(max=x.shape[k] - 1)
                x = x.index_select(k, idx)
        return x

    def _depth_space(self, n, x):
        """DepthToSpace (CRD: channel c·b² + i·b + j to (c, i, j); DCR: (i·b + j)·C + c) and SpaceToDepth (its
        inverse in DCR order), as reshapes and permutations of [N, C, H, W]."""
        b, (N, C, H, W) = attr(n, "blocksize"), x.shape
        if n.op_type == "SpaceToDepth":
            y = x.reshape(N, C, H // b, b, W // b, b).permute(0, 3, 5, 1, 2, 4)
            return y.reshape(N, C * b * b, H // b, W // b)
        if _text(attr(n, "mode", "DCR")) == "CRD":
            y = x.reshape(N, C // (b * b), b, b, H, W).permute(0, 1, 4, 2, 5, 3)
        else:
            y = x.reshape(N, b, b, C // (b * b), H, W).permute(0, 3, 4, 1, 5, 2)
        return y.reshape(N, C // (b * b), H * b, W * b)

    def _slice(self, n, a):
        """Slice: along each listed axis, the indices start, start + step, … before end, with ONNX's clamping
        (negative indices count from the end, out-of-range ones are clamped; a negative step walks backward) —
        Python's slice semantics. Inputs data, starts, ends, axes, steps (opset ≥ 10), else attributes."""
        t, x = self.torch, a[0]
        if len(a) > 1:
            starts, ends = ([int(v) for v in a[k].reshape(-1)] for k in (1, 2))
            axes = [int(v) for v in a[3].reshape(-1)] if len(a) > 3 and a[3] is not None else None
            steps = [int(v) for v in a[4].reshape(-1)] if len(a) > 4 and a[4] is not None else None
        else:
            starts, ends, axes, steps = attr(n, "starts"), attr(n, "ends"), attr(n, "axes"), None
        axes = axes or list(range(len(starts)))
        for start, end, ax, step in zip(starts, ends, axes, steps or [1] * len(starts)):
            ax %= x.dim()
            x = x.index_select(ax, t.arange(*slice(start, end, step).indices(x.shape[ax])))
        return x

    def _pool(self, n, x):
        F = self.torch.nn.functional
        nd = x.dim() - 2
        k = tuple(attr(n, "kernel_shape"))
        pads, symmetric = _pads(n, nd)
        if not symmetric or any(2 * p > kk for p, kk in zip(pads, k)):
            fill = -math.inf if n.op_type == "MaxPool" else 0.0
            x = F.pad(x, [p for j in reversed(range(nd)) for p in (pads[j], pads[j + nd])], value=fill)
            pads = [0] * 2 * nd
        kw = dict(kernel_size=k, stride=tuple(attr(n, "strides", [1] * nd)), padding=tuple(pads[:nd]),
                  ceil_mode=bool(attr(n, "ceil_mode", 0)))
        if n.op_type == "MaxPool":
            return {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nd](x, **kw)
        return {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd](
            x, count_include_pad=bool(attr(n, "count_include_pad", 0)), **kw)
