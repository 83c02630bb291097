"""Stage 3: learn which whitened singular values to keep, per layer, under one global budget
(METHODS.md §2-§3). The factors stay frozen; only a few numbers per component are trained, against
the original model, with no fine-tuning.

--keep rho is the KEPT fraction of the compressed linears: rho = sum_l c(k_l) / sum_l m_l n_l,
c(k) = min(k (m + n), m n) (METHODS.md §2). Methods:
  uniform       k_l = floor(rho m_l n_l / (m_l + n_l))                       (SVD-LLM; §2)
  strs          ASVD's sensitivity-based truncation rank search              (§3.5)
  sigmoid       Gumbel-sigmoid mask per component, straight-through        (LLRC; §3.1)
  hardconcrete  hard-concrete L0 gates                                       (Louizos et al.; §3.2)
  ara           simplex/staircase mask + ARA's finalisation                  (ARA; §3.3)
  soco          learned non-negative spectrum, score-ordered pruning        (SoCo; §3.4)
Every learned method trains one masked low-rank module per layer (masking.py):
  y = U diag(mask * sigma) V^T S^-1 x,   r_l = k_hat_l (m + n) / (m n),   r_l >= 1 -> dense W
  L = L_task + alpha (rho_hat - rho)^2 + beta L_guid                         (ARA Eq. of §3.3)
with L_task = KL(teacher || student) by default; the teacher is the same model with masks off.

Writes RUN_DIR/allocation/:
  ranks.json                {"layers": {name: rank or "dense"}, kept_fraction_linear, method, flags,
                            training curve, wall time}
  components.safetensors    soco only: {layer}.index (k,), {layer}.scale (k,)
  manifest.json             decompose/ hash, method, seed, flags

  python learn_masks.py --method ara --keep 0.8
"""
import argparse
import json
import os
import time

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import common
import masking
from common import UserError
from truncate import lowrank_layer


# ----------------------------------------------------------------------------- baselines

def allocate_uniform(shapes, rho, ctx, args):
    return common.uniform_ranks(shapes, rho), None, {}


def strs_search(ppl_table, shapes, rho, qs):
    """ASVD's STRS (METHODS.md §3.5): sort (layer, q, ppl) by ppl; binary-search a cut so that giving
    each layer the smallest q among its triples below the cut meets the budget."""
    triples = sorted((p, name, q) for (name, q), p in ppl_table.items())
    budget = rho * sum(m * n for m, n in shapes.values())

    def ranks_at(cut):
        q_of = {name: 1.0 for name in shapes}  # a layer with no triple below the cut stays dense
        for _p, name, q in triples[:cut]:
            q_of[name] = min(q_of[name], q)
        return {name: "dense" if q_of[name] >= 1 else max(1, int(q_of[name] * m * n // (m + n)))
                for name, (m, n) in shapes.items()}
    lo, hi = 0, len(triples)  # more triples below the cut = smaller q = cheaper
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if common.total_cost(ranks_at(mid), shapes) <= budget else (mid + 1, hi)
    return common.fill_budget(ranks_at(lo), shapes, rho)


@torch.no_grad()
def allocate_strs(shapes, rho, ctx, args):
    """Compress one layer at a time at each q and measure calibration perplexity: #layers x #q passes."""
    model, ids, factors = ctx["model"], ctx["ids"][:args.strs_samples], ctx["factors"]
    qs = [round(0.1 * i, 1) for i in range(1, 10)]
    ids = ids[:, :args.train_seqlen].to(ctx["device"])
    # the sensitivity table does not depend on the budget: cache it next to decompose/'s factors
    cache = f"{args.run_dir}/decompose/strs_{args.strs_samples}x{args.train_seqlen}.json"
    if os.path.isfile(cache):
        saved = json.load(open(cache))
        table = {(n, float(q)): p for n, q, p in saved["table"]}
    else:
        t0, table, linears = time.time(), {}, common.find_linears(model)
        for name in tqdm(shapes, desc="STRS sensitivity"):
            orig = linears[name]
            for q in qs:
                k = max(1, int(q * shapes[name][0] * shapes[name][1] // sum(shapes[name])))
                common.set_module(model, name, lowrank_layer(orig, factors, name, k))
                table[(name, q)] = masking.calib_ppl(model, ids)
            common.set_module(model, name, orig)
        saved = {"wall_time_s": round(time.time() - t0, 1), "table": [[n, q, p] for (n, q), p in table.items()]}
        json.dump(saved, open(cache, "w"))
    ranks = strs_search(table, shapes, rho, qs)
    return ranks, None, {"ppl_passes": len(table), "sensitivity_wall_time_s": saved["wall_time_s"],
                         "sensitivity": {f"{n}@{q}": p for (n, q), p in table.items()}}


def allocate_learned(shapes, rho, ctx, args):
    layers = masking.attach(ctx["model"], ctx["factors"], shapes, rho, args)
    curve = masking.train(ctx["model"], layers, ctx["ids"], rho, args, ctx["device"])
    ranks, components = masking.export(layers, shapes, rho, args.method)
    return ranks, components, {"steps": len(curve), "curve": curve}


METHODS = {"uniform": allocate_uniform, "strs": allocate_strs, **{m: allocate_learned for m in masking.GATES}}


# ----------------------------------------------------------------------------- main

def load_context(args, run_dir, whiten):
    """Model, calibration ids and factors: only the methods that look at the model need them."""
    device = common.pick_device(args.device)
    model, _ = common.load_model(whiten["model"], device)
    if common.config_hash(model) != whiten["config_hash"]:
        raise UserError(f"model {whiten['model']!r} changed since whiten/ was made: re-run the pipeline")
    for p in model.parameters():
        p.requires_grad_(False)
    with safe_open(f"{run_dir}/whiten/calib_ids.safetensors", "pt") as f:
        ids = f.get_tensor("ids")
    with safe_open(f"{run_dir}/decompose/factors.safetensors", "pt", device=str(device)) as f:
        factors = {k: f.get_tensor(k) for k in f.keys()}
    return {"model": model, "ids": ids, "factors": factors, "device": device}


def main(args):
    if not 0 < args.keep <= 1:
        raise UserError(f"--keep {args.keep} is outside (0, 1]: it is the KEPT fraction, e.g. 0.8 = 20% removed")
    if args.method not in METHODS:
        raise UserError(f"unknown --method {args.method!r}; choose from {', '.join(METHODS)}")
    whiten = common.read_manifest(args.run_dir, "whiten", "python whiten.py")
    decomp = common.read_manifest(args.run_dir, "decompose", "python decompose.py")
    common.check_parent(decomp, whiten, args.run_dir, "python decompose.py")
    shapes = {name: (v["m"], v["n"]) for name, v in decomp["layers"].items()}
    floor = sum(m + n for m, n in shapes.values()) / sum(m * n for m, n in shapes.values())
    if args.keep < floor:
        raise UserError(f"--keep {args.keep} is below {floor:.4f}, the cost of rank 1 in every layer; raise it")
    if args.guidance is None:  # ARA's paper default for ara; off for the others unless asked
        args.guidance = 50.0 if args.method == "ara" else 0.0
    common.set_seed(args.seed)
    t0 = time.time()
    ctx = {} if args.method == "uniform" else load_context(args, args.run_dir, whiten)
    ranks, components, record = METHODS[args.method](shapes, args.keep, ctx, args)
    rho = common.kept_fraction(ranks, shapes)
    dense = sum(r == "dense" for r in ranks.values())
    wall = round(time.time() - t0, 1)
    print(f"{args.method}: {common.kept_removed(rho)} of the compressed linears "
          f"(target kept {args.keep:.2%}); {dense}/{len(ranks)} layers dense; {wall}s")
    out = common.stage_dir(args.run_dir, "allocation")
    if components:
        save_file(components, f"{out}/components.safetensors")
    with open(f"{out}/ranks.json", "w") as f:
        json.dump({"method": args.method, "keep": args.keep, "kept_fraction_linear": rho, "layers": ranks,
                   "shapes": shapes,
                   "flags": vars(args), "wall_time_s": wall, **record}, f, indent=1)
    common.commit_stage(args.run_dir, "allocation", out, {
        "inputs": {"decompose": decomp["hash"]}, "method": args.method, "keep": args.keep,
        "seed": args.seed, "flags": vars(args), "wall_time_s": wall})


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="uniform", help="|".join(METHODS))
    p.add_argument("--keep", type=float, default=0.8, help="KEPT fraction of the compressed linears, in (0, 1]")
    p.add_argument("--loss", choices=["kl", "hidden_mse", "ce"], default="kl",
                   help="task loss: KL to the original model, hidden-state MSE (LLRC), next-token CE (ARA code)")
    p.add_argument("--hidden_layers", type=int, nargs="+", default=[-1], help="hidden states compared by hidden_mse")
    p.add_argument("--steps", type=int, default=100, help="optimiser steps (cosine-decayed learning rate)")
    p.add_argument("--batch_size", type=int, default=2, help="calibration windows per step")
    p.add_argument("--train_seqlen", type=int, default=128, help="tokens of each window used for training")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: per method, see masking.py)")
    p.add_argument("--alpha", type=float, default=100.0, help="budget weight alpha (ARA: 100)")
    p.add_argument("--guidance", type=float, default=None,
                   help="ARA guidance weight beta, for every mask type (default 50 for ara, 0 otherwise)")
    p.add_argument("--tau", type=float, default=0.4, help="Gumbel-sigmoid temperature (LLRC code 0.4, paper 0.1)")
    p.add_argument("--init", choices=["uniform", "paper"], default="uniform",
                   help="start masks at the uniform allocation, or at the paper's init (see masking.py)")
    p.add_argument("--soco_stages", type=float, nargs=3, default=[0.4, 0.4, 0.2],
                   help="SoCo: fractions of steps in coarse / refine / sparsify stages")
    p.add_argument("--sparsity", type=float, default=1.0, help="SoCo: weight of the L1 sparsity term on scores")
    p.add_argument("--strs_samples", type=int, default=4, help="STRS: calibration windows per perplexity pass")
    p.add_argument("--seed", type=int, default=0, help="seed of every sampler (batches, Gumbel / concrete noise)")
    p.add_argument("--run_dir", default="runs/default", help="folder holding every stage's artifacts")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda ...")
    common.run_main(main, p.parse_args())
