"""Repair: a default run whose outputs fall under the fidelity bounds (ptq.evaluate.fidelity_flags) on the
held-back samples raises the fewest quantizers it can until every output meets them.

The objective is the worst margin over the outputs: m(model) = min over outputs o of min(SQNR_o − b_dB,
upper_o − b_dB, 20·(cos_o − b_cos)), where upper_o is the o's worst slice's SQNR at its upper confidence bound;
the bounds hold when m ≥ 0 (up to the slice's own test). Quantizers are ranked once, by leave-one-out: m of the
model with every quantizer but q, minus m of the whole model (what raising q alone recovers, the error q adds to
the network as built, not q in isolation: error that builds up along a backbone is found there). They are then
raised in that order (to 16 bits, or removed: float), re-measuring after each, until the bounds hold, at most
``MAX_RAISED`` (or a quarter of the quantizers, whichever is larger); a model that still misses them is left as it
is, with the culprits named (the caller exits 3). The models run as onnxruntime runs them by default (fused
integer kernels), so the repair sees what the written model does."""
from __future__ import annotations

import math
import time

from tqdm import tqdm

from .quantizers import quantizers, raise_quantizers, subset_state
from .evaluate import fidelity_flags, latencies_ms
from .export import export_qdq

MAX_RAISED = 32
RANK_SAMPLES = 16  # held-back samples the ranking runs on (the raises are checked on all of them)


def margin(result: dict, sqnr_db: float, cosine: float) -> float:
    """The worst output's distance to the bounds (dB; ≥ 0 where every output meets them)."""
    worst = math.inf
    for o in result.get("outputs", {}).values():
        worst = min(worst, o["sqnr_db"] - sqnr_db, 20 * (o["cosine"] - cosine))
        w = o.get("worst_slice")
        if w:
            worst = min(worst, w.get("sqnr_db_upper", w["sqnr_db"]) - sqnr_db)
    return worst


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
    every = [q.id for q in quantizers(state)]
    ranking = []
    for q in tqdm(every, desc="repair: ranking", unit="q", disable=not progress, leave=False):
        without = export_qdq(subset_state(state, set(every) - {q}))
        ranking.append((margin(rank_scorer.score(without, exact=False), *bounds) - base, q))
    ranking.sort(key=lambda r: -r[0])
    limit = max(MAX_RAISED, len(every) // 4)
    raised, history, current, model, after = [], [], state, qmodel, before
    for gain, q in ranking[:limit]:
        if gain <= 0:
            break
        raised.append(q)
        current = raise_quantizers(state, raised, "16")
        model = export_qdq(current)
        after = scorer.score(model, exact=False)
        history.append({"raised": q, "gain_alone_db": round(gain, 2),
                        "margin_db": round(margin(after, *bounds), 2)})
        if not fidelity_flags(after, *bounds):
            break
    met = not fidelity_flags(after, *bounds)
    if not met:  # nothing written that is not better: keep the raises only where they helped at all
        if margin(after, *bounds) <= margin(before, *bounds):
            current, model, raised = state, qmodel, []
    _, feed = next(iter(held.batches(1)))
    lat = latencies_ms([qmodel, model], feed, 10) if raised else None
    info = {"flags_before": [line for _, line in flags], "met": met, "raised": raised, "to": "16 bits",
            "margin_db_before": round(margin(before, *bounds), 2), "margin_db_after": round(margin(after, *bounds), 2),
            "history": history, "culprits": [q for _, q in ranking[:5]],
            "ranking": [{"id": q, "gain_db": round(g, 2)} for g, q in ranking[:10]],
            "quantizers": len(every), "samples": len(held), "rank_samples": len(rank_scorer.source),
            "size_bytes": [qmodel.ByteSize(), model.ByteSize()],
            "latency_ms_batch1": [round(v, 3) for v in lat] if lat else None,
            "seconds": round(time.perf_counter() - t0, 2)}
    return current, model, info
