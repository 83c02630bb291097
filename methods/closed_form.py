"""The allocations that train nothing and read only decompose/'s spectra (docs/METHODS.md §2, §3.6):
SVD-LLM's uniform rank, the Lagrangian on whitened truncation energy, SVD-LLM V2's per-type ratios.
The baselines every learned method must beat.

Every allocator: (shapes {layer: (m, n)}, rho, inputs, **its hyperparameters) -> (ranks {layer: k or "dense"},
components or None, record for ranks.json); inputs holds the spectra ("sigmas") and the calibration token count
("tokens").
"""
import math

import torch

from methods import base, register_allocator
from plumbing.cli import POSITIVE
from plumbing.loading import layer_type


def allocate_uniform(shapes, rho, inputs, uniform_fill=False):
    """SVD-LLM's k_l = int(m n rho / (m + n)), as its authors round it; --uniform_fill also hands out the budget
    the rounding leaves, one component at a time (largest remainder, docs/METHODS.md §2)."""
    return (base.uniform_ranks if uniform_fill else base.svdllm_ranks)(shapes, rho), None, {"uniform_fill": uniform_fill}


def lagrangian_ranks(tails, shapes, limit):
    """Minimise sum_l e_l(option_l) subject to sum_l cost_l(option_l) <= limit, with the options of
    layer l being rank k in 1..k*-1 (cost k (m + n), loss tails[l][k]) or dense (cost m n, loss 0).
    Price lambda by bisection in log space: each layer takes argmin e + lambda cost (docs/METHODS.md §3.6)."""
    opts = {}
    for name, (m, n) in shapes.items():
        ks = torch.arange(1, max(base.k_star(m, n), 2), dtype=torch.float64)  # (k*-1,)
        cost = torch.cat([ks * (m + n), torch.tensor([float(m * n)], dtype=torch.float64)])
        loss = torch.cat([tails[name][ks.long()], torch.zeros(1, dtype=torch.float64)])
        opts[name] = (cost, loss, ks.long().tolist() + ["dense"])

    def choose(lam):
        return {name: ranks[int((loss + lam * cost).argmin())] for name, (cost, loss, ranks) in opts.items()}
    lo, hi = -60.0, 60.0  # log10 lambda: small = everything dense, large = everything rank 1
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if base.total_cost(choose(10 ** mid), shapes) <= limit else (mid, hi)
    return choose(10 ** hi)


def allocate_energy(shapes, rho, inputs, energy_norm="relative", energy_power=2.0):
    """Closed form on the whitened truncation energy, read from decompose/ only (docs/METHODS.md §3.6):
    e_l(k) = (tail_l(k) / N_l)^p, Lagrangian over ranks and "dense". --energy_norm sets N_l:
      relative  N_l = sum_i sigma_i^2: every layer's output energy counts 1 (default)
      raw       N_l = 1: the absolute whitened error (per token) of the layer's output
      type      relative, but layers compete only within one weight type (same position in the
                block, e.g. every q_proj), each type keeping the fraction rho of its own parameters
                (SVD-LLM V2's grouping: errors of different types live in different spaces)
    and --energy_power p: p = 1 sums the layers' relative energies, which spends the budget where one
    layer's error is cheapest to remove and leaves some layers with large errors; p > 1 penalises large
    per-layer errors more than small ones (p -> inf equalises the relative error of every layer), the
    better model of errors that compound through the depth."""
    tails = {name: base.tail_energy(inputs["sigmas"][name]) for name in shapes}
    if energy_norm in ("relative", "type"):
        tails = {name: t / t[0] for name, t in tails.items()}
    tails = {name: t ** energy_power for name, t in tails.items()}
    record = {"energy_norm": energy_norm, "energy_power": energy_power}
    if energy_norm != "type":
        ranks = lagrangian_ranks(tails, shapes, rho * sum(m * n for m, n in shapes.values()))
        return base.fill_budget(ranks, shapes, rho), None, record
    ranks = {}
    for kind in dict.fromkeys(map(layer_type, shapes)):
        group = {name: s for name, s in shapes.items() if layer_type(name) == kind}
        ranks.update(lagrangian_ranks(tails, group, rho * sum(m * n for m, n in group.values())))
    return base.fill_budget(ranks, shapes, rho), None, record


def removed_ratios(s, total, shapes):
    """removed_i = total * s_i / sum_j s_j (SVD-LLM V2 Alg. 1 line 11), each within [0, 1 - (m + n) / (m n)]
    (at least rank 1 kept). The paper's line can ask a matrix with a tiny loss to remove more than all of it:
    such a matrix keeps rank 1 and the others share the rest of `total` in the same proportions, so the
    group still averages the target (water-filling)."""
    cap = {name: 1 - sum(shapes[name]) / (shapes[name][0] * shapes[name][1]) for name in s}
    fixed, left = {}, total
    while True:
        free = {name: v for name, v in s.items() if name not in fixed}
        if not free:  # every matrix at rank 1: the group cannot remove more
            return fixed
        share = {name: left * v / sum(free.values()) for name, v in free.items()}
        over = {name for name, r in share.items() if r > cap[name]}
        if not over:
            return {**fixed, **share}
        for name in over:
            fixed[name] = cap[name]
            left -= cap[name]


def allocate_svdllm2(shapes, rho, inputs):
    """SVD-LLM V2's heterogeneous ratios (Wang et al. 2025, arXiv 2503.12340 §3.1, Algorithm 1).
    Per weight type g (every q_proj, every up_proj, ...; same shape within a group):
      L_min,i = ||W_i X - (W_i X)'||_F at the uniform ratio R   (theoretical truncation loss, Thm 3.1:
              = sqrt(T sum_{i>k} sigma_i^2) with our G = X X^T / T over T calibration tokens)
      s_i = 1 / log(L_min,i)                                    (Alg. 1 line 10, "normalize")
      removed_i = len(g) * R_removed * s_i / sum_{j in g} s_j   (Alg. 1 line 11; ratios average R;
                                                                 clamped, see removed_ratios)
    so a matrix with a larger loss is compressed less. The paper gives no rule for L_min <= 1 (log <= 0):
    such a group keeps the uniform ratio, and the run says so."""
    T, out, uniform_groups = inputs["tokens"], {}, []
    for kind in dict.fromkeys(map(layer_type, shapes)):
        group = [name for name in shapes if layer_type(name) == kind]
        L = {}
        for name in group:
            m, n = shapes[name]
            k = base.rank_at_fraction(rho, m, n)  # the uniform rank (docs/METHODS.md §2)
            sigma = inputs["sigmas"][name]
            L[name] = math.sqrt(T * base.tail_energy(sigma)[min(k, len(sigma))].item())
        if min(L.values()) <= 1:
            uniform_groups.append(kind)
            out.update({name: rho for name in group})
            continue
        s = {name: 1 / math.log(L[name]) for name in group}
        out.update({name: 1 - r for name, r in removed_ratios(s, len(group) * (1 - rho), shapes).items()})
    if uniform_groups:
        print(f"svdllm2: L_min <= 1 in {', '.join(uniform_groups)}: those types keep the uniform ratio")
    ranks = {}
    for name, (m, n) in shapes.items():
        ranks[name] = base.rank_or_dense(max(out[name], 0.0), m, n)
    want = {name: out[name] * m * n / (m + n) for name, (m, n) in shapes.items()}  # its real-valued ranks
    return base.fill_budget(ranks, shapes, rho, want), None, {"kept_ratio": out, "uniform_groups": uniform_groups}


ENERGY_FLAGS = {
    "--energy_norm": dict(choices=["relative", "raw", "type"], default="relative",
                          help="energy: how layers' whitened truncation energies compare (see allocate_energy)"),
    "--energy_power": dict(type=POSITIVE, default=2.0,
                           help="energy: exponent p on each layer's normalised truncation energy (see allocate_energy)")}


register_allocator("uniform", allocate_uniform, flags={"--uniform_fill": dict(action="store_true", help=(
    "uniform: also hand out the budget left by rounding (largest remainder); SVD-LLM's own rule does not"))})
register_allocator("energy", allocate_energy, flags=ENERGY_FLAGS)
register_allocator("svdllm2", allocate_svdllm2)
