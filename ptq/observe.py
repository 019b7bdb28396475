"""Run onnxruntime with chosen intermediate tensors exposed and feed them, batch by batch, to streaming observers.

Observers keep a bounded summary, never the data: a fine histogram whose range grows by doubling (so memory is
fixed whatever the calibration size), exact min / max, and for the logits a bounded sample of rows.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper
from tqdm import tqdm

from .errors import InputError, first_line
from .external import session_options
from .threads import ort_options

HALF_BINS = 16384  # bins per sign: 32 to 64 bins per 8-bit step at full range
CHUNK = 1 << 20
SMALL = 1 << 11  # values that ``Histogram._bin`` adds one by one rather than by a bincount over every bin
SAMPLE_FROM = 1 << 12  # values in a row (a tensor's slice on axis 0) from which its histogram bins a sample
SAMPLE_PRIMES = (7, 11, 13, 17, 19, 23, 29, 31)
SENTINEL = 1e30  # |x| at or beyond this is a sentinel (float max / min used as ±∞ in masks), never a value


class Histogram:
    """Histogram over [-HALF_BINS·w, HALF_BINS·w) with bin width w a power of two, doubled (pairs of bins merged)
    whenever a value falls outside; also exact min, max and count of the values; inf, nan and sentinels
    (|x| >= SENTINEL) are only counted (``nonfinite``). Bin j holds [j·w, (j+1)·w), so merging pairs gives exactly
    the histogram made at 2w: the result is the histogram at the smallest power of two that covers every value,
    whatever the batches were (their size, their order).

    Min and max are those of every value; the bins count every value of a tensor whose rows (axis 0: a sample)
    are short; of a longer one's rows, a strided sample (``sample_stride``), each value counted p times, and each
    row's tail beyond its sample's largest |x| exactly (``_sample_and_tail``). Binning is the costly part of a
    calibration pass (3 ns a value); the sample keeps 1 value in p from every row, every channel and every
    position, the tail keeps the outliers, and both are of one row at a time: still independent of the batches."""

    def __init__(self, half_bins: int = HALF_BINS):
        self.nb = half_bins
        self.counts = np.zeros(2 * half_bins, np.int64)
        self.width = 0.0
        self.min, self.max, self.n = np.inf, -np.inf, 0
        self.nonfinite = 0  # values left out: inf, nan, sentinels

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float32)
        if x.size == 0:
            return
        rows = x.reshape(x.shape[0] if x.ndim > 1 else 1, -1)
        row_max, row_min = rows.max(axis=1), rows.min(axis=1)
        lo, hi = float(row_min.min()), float(row_max.max())
        parts = []  # (values, the count each stands for)
        if not (abs(lo) < SENTINEL and abs(hi) < SENTINEL):  # nan fails both comparisons too
            x = x.ravel()
            keep = np.abs(x) < SENTINEL  # inf, nan and ±1e30-style sentinels never set a range
            self.nonfinite += int(x.size - np.count_nonzero(keep))
            x = x[keep]
            if x.size == 0:
                return
            lo, hi = float(x.min()), float(x.max())
            parts.append((x, 1))
        else:
            p = sample_stride(x.shape)
            parts += [(x.ravel(), 1)] if p == 1 else _sample_and_tail(rows, p, row_max, row_min)
        count = sum(v.size * w for v, w in parts)
        self.min, self.max, self.n = min(self.min, lo), max(self.max, hi), self.n + count
        top = max(abs(lo), abs(hi))
        if self.width == 0.0:
            if top == 0.0:
                self.counts[self.nb] += count
                return
            self.width = float(2.0 ** np.floor(np.log2(top / self.nb)))
        while top >= self.nb * self.width:
            merged = self.counts.reshape(self.nb, 2).sum(1)
            self.counts[:] = 0
            self.counts[self.nb // 2: self.nb // 2 + self.nb] = merged
            self.width *= 2
        for values, weight in parts:
            self._bin(values, weight)

    def _bin(self, x: np.ndarray, weight: int) -> None:
        """Add ``weight`` to the bin of each value of ``x`` (the range already covers them; a value that rounding
        puts one bin beyond either end goes to the end bin): by a bincount over every bin, or, for fewer than
        SMALL values (a row's tail), one by one."""
        inv = np.float32(1.0 / self.width)
        part = np.empty(min(CHUNK, x.size), np.float32)
        index = np.empty(part.size, np.intp)
        for start in range(0, x.size, CHUNK):  # bounded temporaries, whatever the tensor size
            n = min(CHUNK, x.size - start)
            p, i = part[:n], index[:n]
            np.multiply(x[start:start + n], inv, out=p)
            np.floor(p, out=p)
            i[:] = p  # bin −nb .. nb−1, one beyond either end where rounding puts a value on the edge
            if n < SMALL:
                np.add.at(self.counts, np.clip(i + self.nb, 0, 2 * self.nb - 1), weight)
                continue
            i += self.nb + 1
            c = np.bincount(i, minlength=2 * self.nb + 2) * weight
            self.counts += c[1:-1]
            self.counts[0] += c[0]
            self.counts[-1] += c[-1]

    def centers_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Bin centers and counts of the non-empty bins."""
        nz = np.nonzero(self.counts)[0]
        return ((nz - self.nb + 0.5) * self.width).astype(np.float64), self.counts[nz].astype(np.float64)

    def quantile(self, q: float) -> float:
        c, n = self.centers_counts()
        if n.size == 0:
            return 0.0
        cdf = np.cumsum(n) / n.sum()
        return float(c[min(np.searchsorted(cdf, q), c.size - 1)])


def _sample_and_tail(rows: np.ndarray, p: int, row_max: np.ndarray, row_min: np.ndarray) -> list[tuple]:
    """A [N, L] tensor's values as (values, the count each stands for): every p-th value of each row, standing for
    p, and, exactly, each row's values beyond the largest |x| of its sample (its tail: the outliers that set a
    clipping range, e.g. a transformer's few huge features, are counted one by one, never p at a time). A row is
    searched for its tail only on the side where its own max (``row_max``; or min) passes the sample's edge."""
    sample = np.ascontiguousarray(rows[:, ::p])
    edge = np.abs(sample).max(axis=1)
    over, under = row_max > edge, row_min < -edge
    tail = []
    for k in np.flatnonzero(over | under):  # each row alone: bounded temporaries
        row, e = rows[k], edge[k]
        tail.append(row[(row > e) | (row < -e)] if over[k] and under[k] else row[row > e] if over[k]
                    else row[row < -e])
    return [(sample.ravel(), p), (np.concatenate(tail) if tail else sample[:0, 0], 1)]


def sample_stride(shape: tuple) -> int:
    """The stride p at which ``Histogram`` bins the values of each row (axis 0) of a tensor of ``shape``: 1 for
    rows under SAMPLE_FROM values, else the smallest of SAMPLE_PRIMES that divides none of the row's dimensions.
    A row's values are binned where their flat index in the row is 0 mod p; p prime to every dimension puts each
    index of each axis in the sample (1 in p of the positions along the others): no channel of a channels-last
    tensor and no column of an image is left out, and a row's sample does not depend on the batch it came in."""
    if len(shape) < 2 or int(np.prod(shape[1:])) < SAMPLE_FROM:
        return 1
    for p in SAMPLE_PRIMES:
        if all(d % p for d in shape[1:]):
            return p
    return 1


class ChannelStats:
    """Per channel (axis 1; the last axis of a 2-D tensor is axis 1 too): min, max, mean and std, streamed."""

    def __init__(self):
        self.min = self.max = self.sum = self.sq = None
        self.n = 0

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64)
        x = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1) if x.ndim >= 2 else x.reshape(1, -1)
        lo, hi, s, q = x.min(1), x.max(1), x.sum(1), (x * x).sum(1)
        if self.min is None:
            self.min, self.max, self.sum, self.sq = lo, hi, s, q
        else:
            self.min, self.max = np.minimum(self.min, lo), np.maximum(self.max, hi)
            self.sum, self.sq = self.sum + s, self.sq + q
        self.n += x.shape[1]

    def boxes(self) -> np.ndarray:
        """[C, 5]: min, mean − std, mean, mean + std, max."""
        mean = self.sum / max(self.n, 1)
        std = np.sqrt(np.maximum(self.sq / max(self.n, 1) - mean**2, 0))
        return np.stack([self.min, np.maximum(mean - std, self.min), mean, np.minimum(mean + std, self.max),
                         self.max], axis=1)


class RowSample:
    """The first ``max_rows`` rows of a tensor seen as [-1, last_dim] (used for the logits)."""

    def __init__(self, max_rows: int = 512):
        self.max_rows = max_rows
        self.rows: list[np.ndarray] = []
        self.n = 0

    def update(self, x: np.ndarray) -> None:
        if self.n >= self.max_rows:
            return
        x = np.asarray(x, np.float32)
        x = x.reshape(-1, x.shape[-1])[: self.max_rows - self.n]
        self.rows.append(x.copy())
        self.n += x.shape[0]

    @property
    def data(self) -> np.ndarray:
        return np.concatenate(self.rows) if self.rows else np.zeros((0, 1), np.float32)


def session(model: onnx.ModelProto | bytes | str, extra_outputs=(), optimize: bool = True,
            exact_qdq: bool = False, arena: bool = True) -> ort.InferenceSession:
    """A CPU onnxruntime session, with ``extra_outputs`` (intermediate tensor names) exposed as outputs.

    ``exact_qdq``: run Q/DQ as written, without onnxruntime's QDQ transformers. Those fuse into integer kernels,
    but also quantize the float weights and biases of a layer whose input is quantized — wrong for a partly
    quantized model (a quantizer toggled alone) and, with 16-bit scales, overflowing the int32 bias."""
    suffix = b""
    if extra_outputs:  # a message appended to a serialized one merges into it: its outputs extend the graph's
        have = {o.name for o in model.graph.output}
        suffix = onnx.ModelProto(graph=onnx.GraphProto(output=[
            helper.make_empty_tensor_value_info(t) for t in dict.fromkeys(extra_outputs) if t not in have
        ])).SerializeToString()
    opts = ort_options()
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if exact_qdq:
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    if not arena:  # each run's tensors go back to the system after it: two sessions alive at once do not each
        opts.enable_cpu_mem_arena = False  # keep their largest run's memory
    session_options(model, opts)
    data = model.SerializeToString() + suffix if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def check_runnable(model: onnx.ModelProto, name: str = "model") -> None:
    """Refuse (InputError) a model that onnxruntime cannot load: an unregistered custom op, an op it does not
    implement, a malformed graph. Graph optimizations are off, so the check costs little more than a load."""
    try:
        session(model, optimize=False)
    except ValueError:  # over 2 GB: it cannot be checked from memory, the stages load it by parts
        return
    except Exception as e:
        raise InputError(f"{name}: onnxruntime cannot run this model "
                         f"({first_line(e, 400).split('] ', 1)[-1][:240]})") from None


GIVE_UP = 2
OUTPUT_SHARE = 0.0625  # of the memory limit, for one batch's requested outputs: they live once, in the bound
# buffers, beside onnxruntime's own intermediate tensors, the observers' temporaries, the models and the libraries


def batch_within(outputs: "Outputs", source, batch_size: int, memory_limit: float | None) -> int:
    """The largest batch size up to ``batch_size`` whose requested outputs fit in OUTPUT_SHARE of ``memory_limit``
    bytes (EfficientNet-Lite0: 4 images at the default 2 GB, the whole run's peak RSS 0.6 GB): one sample is run
    to measure a sample's outputs. What the process holds already is not
    counted (memory freed earlier, e.g. by AdaRound, often stays resident), so the batches change only where the
    outputs themselves would not fit (the histograms do not depend on the batches)."""
    if not memory_limit or not outputs.names:
        return batch_size
    _, feed = next(iter(source.batches(1)))
    per_sample = sum(v.nbytes for v in outputs.run(feed)) / max(len(next(iter(feed.values()))), 1)
    return int(min(batch_size, max(1, OUTPUT_SHARE * memory_limit // max(per_sample, 1))))


def observe(model: onnx.ModelProto, source, batch_size: int, observers: dict, progress: bool = False,
            desc: str = "calibrating", memory_limit: float | None = None, enough=None) -> int:
    """Run ``source`` through the FP32 model; feed each tensor named in ``observers`` (name -> list of objects
    with ``update``) batch by batch, the batches made smaller where their outputs would not fit in
    ``memory_limit`` bytes (``batch_within``); ``enough(samples seen)``: stop after the first batch where it is
    true. Returns the number of samples seen. The observers see each batch's tensors in buffers that the next batch
    overwrites (``Outputs``): an observer that keeps data copies it."""
    names = list(observers)
    outputs = Outputs(session(model, names), names)
    batch_size = batch_within(outputs, source, batch_size, memory_limit)
    seen = 0
    with tqdm(total=len(source), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for paths, feed in source.batches(batch_size):
            for name, value in zip(names, outputs.run(feed)):
                for obs in observers[name]:
                    obs.update(value)
            seen += len(paths)
            bar.update(len(paths))
            if enough is not None and enough(seen):
                break
    return seen


class Outputs:
    """Runs a session with its requested outputs written into buffers kept from batch to batch (onnxruntime's I/O
    binding), so a calibration pass does not allocate and page in every intermediate tensor again for each batch
    (a third of its time on EfficientNet-Lite0). The buffers of a new batch size are shaped from the last plain
    run, their first axis scaled with the feed's size; where that guess is wrong (a model whose output shapes
    change with the data) the batch is run the plain way and its shapes are the next guess. A requested graph
    input is the feed itself (onnxruntime leaves an input's output buffer alone)."""

    def __init__(self, sess: ort.InferenceSession, names: list[str]):
        self.sess, self.names = sess, names
        inputs = {i.name for i in sess.get_inputs()}
        self.bound = [n for n in names if n not in inputs]
        self.key = None  # the feed shapes the binding is for (None: no binding)
        self.last: tuple = ()  # (feed size, {output: (shape, dtype)}) of the last plain run
        self.buffers: dict[str, np.ndarray] = {}
        self.binding = None
        self.failures = 0  # wrong guesses; after GIVE_UP of them (shapes that follow the data) every run is plain

    def run(self, feed: dict) -> list[np.ndarray]:
        """The requested outputs for ``feed``, in ``names`` order; valid until the next call."""
        key = tuple((k, v.shape, v.dtype.str) for k, v in sorted(feed.items()))
        if key != self.key:
            self._bind(key, sum(v.size for v in feed.values()))
        if self.binding is not None:
            feed = {k: np.ascontiguousarray(v) for k, v in feed.items()}
            for k, v in feed.items():
                self.binding.bind_cpu_input(k, v)
            try:
                self.sess.run_with_iobinding(self.binding)
                return [feed[n] if n in feed else self.buffers[n] for n in self.names]
            except Exception:  # the guessed shapes were wrong: the next batch's come from this batch's plain run
                self.binding, self.buffers, self.key = None, {}, None
                self.failures += 1
        values = self.sess.run(self.names, feed)
        got = dict(zip(self.names, values))
        if all(isinstance(got[n], np.ndarray) and got[n].dtype.kind in "fiub" for n in self.bound):
            self.last = (sum(v.size for v in feed.values()), {n: (got[n].shape, got[n].dtype) for n in self.bound})
        return values

    def _bind(self, key, size: int) -> None:
        """Buffers and a binding for feeds of shapes ``key`` (``size`` values in all), guessed from the last plain
        run; none where there is no guess."""
        self.key, self.binding, self.buffers = None, None, {}
        if self.failures >= GIVE_UP or not self.last or not self.bound or size % self.last[0] and self.last[0] % size:
            return
        shapes = {}
        for n, (shape, dtype) in self.last[1].items():
            if not shape or (shape[0] * size) % self.last[0]:
                return
            shapes[n] = ((shape[0] * size // self.last[0], *shape[1:]), dtype)
        self.buffers = {n: np.empty(shape, dtype) for n, (shape, dtype) in shapes.items()}
        self.binding = self.sess.io_binding()
        for name, buf in self.buffers.items():
            self.binding.bind_output(name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
        self.key = key
