"""ASVD's sensitivity-based truncation rank search, STRS (docs/METHODS.md §3.5; Yuan et al. 2023): compress one
layer at a time to each kept fraction q in 0.1 .. 0.9, measure calibration perplexity (#layers x 9 passes),
then binary-search one perplexity cut over the sorted (layer, q, ppl) triples that meets the budget.
"""
import json
import math
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from methods import base, register_allocator
from plumbing import artifacts
from plumbing.cli import COUNT, LENGTH
from plumbing.loading import find_linears, set_module
from plumbing.modeling_lowrank import lowrank_layer


@torch.no_grad()
def calib_ppl(model, ids):
    logits = model(ids, use_cache=False).logits.float()
    return math.exp(F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item())


def strs_search(ppl_table, shapes, rho, qs):
    """ASVD's STRS (docs/METHODS.md §3.5): sort (layer, q, ppl) by ppl; binary-search a cut so that giving
    each layer the smallest q among its triples below the cut meets the budget."""
    triples = sorted((p, name, q) for (name, q), p in ppl_table.items())
    limit = rho * sum(m * n for m, n in shapes.values())

    def ranks_at(cut):
        q_of = {name: 1.0 for name in shapes}  # a layer with no triple below the cut stays dense
        for _p, name, q in triples[:cut]:
            q_of[name] = min(q_of[name], q)
        return {name: base.rank_or_dense(q_of[name], m, n) for name, (m, n) in shapes.items()}
    lo, hi = 0, len(triples)  # more triples below the cut = smaller q = cheaper
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if base.total_cost(ranks_at(mid), shapes) <= limit else (mid + 1, hi)
    return base.fill_budget(ranks_at(lo), shapes, rho)


@torch.no_grad()
def allocate_strs(shapes, rho, inputs, strs_samples=None, strs_seqlen=None):
    """Compress one layer at a time at each q and measure calibration perplexity: #layers x #q passes."""
    gpu = inputs["device"].type == "cuda"
    # ASVD measures each pass on 32 x 2048 tokens; a CPU affords far fewer (x 9 x #layers passes)
    samples = strs_samples or (32 if gpu else 2)
    seqlen = strs_seqlen or (inputs["ids"].shape[1] if gpu else 128)
    model, factors = inputs["model"], inputs["factors"]
    qs = [round(0.1 * i, 1) for i in range(1, 10)]
    ids = inputs["ids"][:samples, :seqlen].to(inputs["device"])
    print(f"STRS: {len(ids)} x {ids.shape[1]} calibration tokens per perplexity pass")
    # the sensitivity table does not depend on the budget: cache it next to decompose/'s factors, keyed
    # on everything it depends on: the exact calibration tokens, the dtype and the device type of the
    # passes (an unreadable cache is rebuilt, never fatal)
    key = f"{len(ids)}x{ids.shape[1]}_{artifacts.tensor_hash(ids.cpu())}_{str(model.dtype)[6:]}_{inputs['device'].type}"
    cache = f"{inputs['decompose_dir']}/strs_{key}.json"
    try:
        with open(cache) as f:
            saved = json.load(f)
        table = {(n, float(q)): float(p) for n, q, p in saved["table"]}
        if set(table) != {(n, q) for n in shapes for q in qs} or not all(map(math.isfinite, table.values())):
            raise ValueError("not this run's table")  # a hand-edited or foreign cache: rebuilt
    except (OSError, ValueError, KeyError, TypeError):
        t0, table, linears = time.time(), {}, find_linears(model)
        for name in tqdm(shapes, desc="STRS sensitivity"):
            orig = linears[name]
            for q in qs:
                k = max(1, int(q * shapes[name][0] * shapes[name][1] // sum(shapes[name])))
                set_module(model, name, lowrank_layer(orig, factors, name, k))
                table[(name, q)] = calib_ppl(model, ids)
            set_module(model, name, orig)
        saved = {"wall_time_s": round(time.time() - t0, 1), "table": [[n, q, p] for (n, q), p in table.items()]}
        artifacts.write_json(cache, saved)
    ranks = strs_search(table, shapes, rho, qs)
    return ranks, None, {"ppl_passes": len(table), "strs_tokens_per_pass": [len(ids), ids.shape[1]],
                         "sensitivity_wall_time_s": saved["wall_time_s"],
                         "sensitivity": {f"{n}@{q}": p for (n, q), p in table.items()}}


FLAGS = {"--strs_samples": dict(type=COUNT, default=None, help="STRS: calibration windows per perplexity pass "
                                "(default: 32 on a GPU as ASVD, 2 on a CPU)"),
         "--strs_seqlen": dict(type=LENGTH, default=None, help="STRS: tokens per window (default: the calibration "
                               "--seqlen on a GPU, 128 on a CPU)")}


register_allocator("strs", allocate_strs, needs_model=True, flags=FLAGS)
