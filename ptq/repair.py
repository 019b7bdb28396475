"""Repair: a default run whose outputs fall under the fidelity bounds (ptq.evaluate.fidelity_flags) on the
held-back samples raises quantizers to 16 bits until every output meets them, and then as few of them as it can
find within a budget of checks.

The objective is the worst margin over the outputs: m(model) = min over outputs o of min(SQNR_o − b_dB,
upper_o − b_dB, 20·(cos_o − b_cos)), where upper_o is the o's worst slice's SQNR at its upper confidence bound;
the bounds hold when m ≥ 0 (up to the slice's own test).
1. The quantizers, in the order of the graph's nodes (a weight at its layer, an activation at the node writing
   it), are cut into ``SEGMENTS`` contiguous segments, ranked once by leave-one-out: m of the model with every
   quantizer but the segment's, minus m of the whole model. Error that builds up along a backbone, a little from
   each of many quantizers, is found there, where no single quantizer's recovery shows it.
2. Segments are raised in that order (those that recover anything), re-measuring after each, until the bounds
   hold, at most ``MAX_RAISED`` quantizers (or a quarter of them, whichever is larger).
3. Where they hold, the raised set is shrunk by bisection: a half whose quantizers the bounds hold without is
   dropped, else each half is shrunk with the other kept (``SHRINK_CHECKS`` checks at most; what is left holds).
A model that still misses the bounds is left as it is, with the culprits named (the caller exits 3). The models
run as onnxruntime runs them by default (fused integer kernels), so the repair sees what the written model does."""
from __future__ import annotations

import math
import time

from tqdm import tqdm

from .quantizers import quantizers, raise_quantizers, subset_state
from .evaluate import fidelity_flags, latencies_ms
from .export import export_qdq

MAX_RAISED = 32
RANK_SAMPLES = 16  # held-back samples the ranking runs on (the raises are checked on all of them)
SEGMENTS = 8  # contiguous segments of the graph's quantizers, ranked by leave-one-out
SHRINK_CHECKS = 16  # checks of the bounds the shrinking may take


def margin(result: dict, sqnr_db: float, cosine: float) -> float:
    """The worst output's distance to the bounds (dB; ≥ 0 where every output meets them)."""
    worst = math.inf
    for o in result.get("outputs", {}).values():
        worst = min(worst, o["sqnr_db"] - sqnr_db, 20 * (o["cosine"] - cosine))
        w = o.get("worst_slice")
        if w:
            worst = min(worst, w.get("sqnr_db_upper", w["sqnr_db"]) - sqnr_db)
    return worst


def graph_order(state) -> list[str]:
    """Every quantizer's id in the order of the graph's nodes: a weight at its layer's node, an activation at the
    node that writes its tensor (a graph input's first); ties in ``quantizers`` order."""
    at = {}
    for i, node in enumerate(state.model.graph.node):
        at.setdefault(node.name, i)
        for o in node.output:
            at.setdefault(o, i)
    return [q.id for q in sorted(quantizers(state), key=lambda q: at.get(q.name, -1))]


def segments(order: list[str], n: int = SEGMENTS) -> list[list[str]]:
    """``order`` cut into at most ``n`` contiguous segments of sizes differing by at most one."""
    n = min(n, len(order))
    cuts = [k * len(order) // n for k in range(n + 1)]
    return [order[a:b] for a, b in zip(cuts, cuts[1:])]


def shrink(raised: list[str], holds, budget: int = SHRINK_CHECKS) -> list[str]:
    """A subset of ``raised`` (for which ``holds`` is true) for which ``holds`` is still true, by bisection: drop a
    half where the rest holds, else shrink each half with the other kept; at most ``budget`` calls of ``holds``
    (order kept)."""
    left = [budget]

    def check(ids) -> bool:
        if left[0] <= 0:
            return False
        left[0] -= 1
        return holds(ids)

    def within(part: list[str], kept: list[str]) -> list[str]:
        """The part of ``part`` still needed beside ``kept`` (kept + part holds)."""
        if not part:
            return part
        if len(part) == 1:
            return [] if check(kept) else part
        a, b = part[:len(part) // 2], part[len(part) // 2:]
        if check(kept + b):
            return within(b, kept)
        if check(kept + a):
            return within(a, kept)
        a = within(a, kept + b)
        return a + within(b, kept + a)

    keep = set(within(list(raised), []))
    return [q for q in raised if q in keep]


def repair(original, state, qmodel, held, config, before: dict, progress: bool = False) -> tuple:
    """(state, QDQ model, report dict). ``held``: the held-back samples; ``before``: the model's fidelity on them
    (ptq.evaluate.evaluate), which is under the bounds."""
    from .metric import Scorer
    scorer = Scorer(original, held, config.batch_size)
    bounds = (config.fidelity_sqnr_db, config.fidelity_cosine)
    flags = fidelity_flags(before, *bounds)
    t0 = time.perf_counter()
    rank_scorer = scorer if len(held) <= RANK_SAMPLES else Scorer(
        original, held.subset(held.files[:RANK_SAMPLES]), config.batch_size)
    base = margin(before if rank_scorer is scorer else rank_scorer.score(qmodel, exact=False), *bounds)
    order = graph_order(state)
    parts = segments(order)
    ranking = []
    for k, part in enumerate(tqdm(parts, desc="repair: ranking", unit="segment", disable=not progress,
                                  leave=False)):
        without = export_qdq(subset_state(state, set(order) - set(part)))
        ranking.append((margin(rank_scorer.score(without, exact=False), *bounds) - base, k))
    ranking.sort(key=lambda r: -r[0])
    checked = {}

    def fidelity_with(ids) -> dict:
        """The fidelity with the quantizers ``ids`` at 16 bits (measured once per set)."""
        key = frozenset(ids)
        if key not in checked:
            checked[key] = scorer.score(export_qdq(raise_quantizers(state, list(ids), "16")), exact=False)
        return checked[key]

    limit = max(MAX_RAISED, len(order) // 4)
    raised, history, after = [], [], before
    for gain, k in ranking:
        if gain <= 0 or len(raised) + len(parts[k]) > limit:
            break
        raised = [q for q in order if q in set(raised) | set(parts[k])]
        after = fidelity_with(raised)
        history.append({"raised": _span(parts[k]), "gain_alone_db": round(gain, 2),
                        "margin_db": round(margin(after, *bounds), 2)})
        if not fidelity_flags(after, *bounds):
            break
    met = not fidelity_flags(after, *bounds)
    if met and len(raised) > 1:
        kept = shrink(raised, lambda ids: not fidelity_flags(fidelity_with(ids), *bounds))
        if kept != raised:
            raised, after = kept, fidelity_with(kept)
            history.append({"raised": f"shrunk to {len(raised)}", "gain_alone_db": "",
                            "margin_db": round(margin(after, *bounds), 2)})
    if not met and margin(after, *bounds) <= margin(before, *bounds):
        raised, after = [], before  # nothing written that is not better: the raises are kept only where they helped
    current = raise_quantizers(state, raised, "16") if raised else state
    model = export_qdq(current) if raised else qmodel
    own = {q.id: q.sqnr_db if q.sqnr_db is not None else math.inf for q in quantizers(state)}
    top = parts[ranking[0][1]] if ranking else []
    culprits = raised[:5] if met else sorted(top, key=lambda q: own[q])[:5]
    _, feed = next(iter(held.batches(1)))
    lat = latencies_ms([qmodel, model], feed, 10) if raised else None
    info = {"flags_before": [line for _, line in flags], "met": met, "raised": raised, "to": "16 bits",
            "margin_db_before": round(margin(before, *bounds), 2), "margin_db_after": round(margin(after, *bounds), 2),
            "history": history, "culprits": culprits,
            "ranking": [{"segment": _span(parts[k]), "quantizers": len(parts[k]), "gain_db": round(g, 2)}
                        for g, k in ranking],
            "quantizers": len(order), "samples": len(held), "rank_samples": len(rank_scorer.source),
            "checks": len(checked), "size_bytes": [qmodel.ByteSize(), model.ByteSize()],
            "latency_ms_batch1": [round(v, 3) for v in lat] if lat else None,
            "seconds": round(time.perf_counter() - t0, 2)}
    return current, model, info


def _span(part: list[str]) -> str:
    """A segment in words: its first and last quantizer and how many."""
    return part[0] if len(part) == 1 else f"{part[0]} … {part[-1]} ({len(part)})"
