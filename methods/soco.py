"""SoCo's learned spectrum (docs/METHODS.md §3.4; Li et al., arXiv 2502.15092): a non-negative score s_i per
stored component scales its singular value, W' = U diag(sigma * s) V^T S^-1; the components of largest
s_i sigma_i are kept.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from methods import register
from methods.base import Gate, straight_through_min1
from plumbing.cli import NONNEGATIVE, UserError, number


class SocoGate(Gate):
    """SoCo's learned non-negative spectrum s (§3.4): W' = U diag(sigma * s) V^T S^-1, in the coarse stage over
    every component (relaxed), from the refine stage on over the round(k_hat) components of largest
    s_i sigma_i (the set the export keeps). s_i = max(theta_i, 0) forward, straight-through backward, so a
    score pushed to 0 still feels the task and the budget and can
    return (a relu's zero gradient would prune it for good). theta is the score itself, so AdamW's lr is
    in score units: a kept score (1) can be pruned, and a pruned one (0) revived, in ~1 / lr steps.
    Count: k_hat = sum_i min(s_i, 1), straight-through (a score above 1, which compensates, counts one
    component, yet the budget reaches it with gradient 1). Sparsity: L1 on s normalised per layer,
    (1/L) sum_l mean_i s_i. Stages over --soco_stages fractions of --steps: (1) coarse: task + budget +
    sparsity every step; (2) refine: task and sparsity on alternate steps (budget on both). SoCo's last
    stage (selection fixed, the kept scores trained on the task loss) is the shared --compensate stage."""
    lr = 0.05
    steps, compensate = 200, 250  # SoCo's third stage (kept scores trained, selection fixed) is the compensation
    term_flags = {**Gate.term_flags, "sparsity": "--sparsity"}

    flags = {"--soco_stages": dict(type=number(float, 0, 1), nargs=2, default=[0.5, 0.5], help="SoCo: fractions of --steps in its "
                                   "coarse and refine stages (its third, the kept scores trained with the selection "
                                   "fixed, is --compensate)"),
             "--sparsity": dict(type=NONNEGATIVE, default=0.1, help="SoCo: weight of the per-layer L1 term on the scores "
                                "(too large, it, not the task, sets the allocation)")}

    @classmethod
    def check(cls, soco_stages=(0.5, 0.5), sparsity=0.1, **_):
        if abs(sum(soco_stages) - 1) > 1e-6:
            raise UserError(f"--soco_stages {' '.join(map(str, soco_stages))} sum to {sum(soco_stages):g}: "
                            "they are fractions of --steps and must sum to 1 (the third stage is --compensate)")

    def __init__(self, k_max, k0, sigma, sparsity=0.1, soco_stages=(0.5, 0.5), init="uniform"):
        super().__init__()
        s = torch.ones(k_max)
        if init != "paper":
            s[k0:] = 0  # start exactly at the uniform model
        self.theta = nn.Parameter(s)
        self.register_buffer("sigma", sigma.float())  # selection sees sigma_i: s scales sigma (§3.4)
        self.k_max, self.relaxed = k_max, False  # relaxed: the coarse stage's forward (at_step)
        self.sparsity, self.coarse = sparsity, soco_stages[0]  # the coarse stage's fraction of the steps

    def scores(self):
        return self.theta - (self.theta - self.theta.clamp(min=0)).detach()  # max(theta, 0), straight-through

    def at_step(self, step, steps):
        self.relaxed = step < round(self.coarse * steps)  # the coarse stage

    def mask(self, gen):
        # coarse stage, relaxed: every score runs at its value and counts min(s_i, 1), so a score on its way
        # to 0 fades out of the forward instead of dropping out at a rounding step. From the refine stage on,
        # and in the state training ends in, the forward runs what the count says and the export keeps: the
        # round(k_hat) components of largest s_i sigma_i at scales s_i; the backward is the identity for every
        # score (straight-through), so a score outside the kept set still feels the task and can enter it
        s = self.scores()
        if self.relaxed:
            return s
        order = self.order()
        rank = torch.empty_like(order)
        rank[order] = torch.arange(self.k_max, device=s.device)
        kept = (rank < torch.floor(self.k_hat().detach() + 0.5)).to(s.dtype)  # ara_ranks' rounding; no host sync
        return s + (s * kept - s).detach()

    def k_hat(self):
        return straight_through_min1(self.scores()).sum()

    def order(self):
        return (self.scores().detach() * self.sigma).argsort(descending=True)

    def scales(self):
        return self.scores().detach()

    def plan(self, step, steps):
        end1 = round(self.coarse * steps)
        stage = 1 if step < end1 else 2
        t, T = (step, max(end1, 1)) if stage == 1 else (step - end1, max(steps - end1, 1))
        return {"stage": stage, "t": t, "T": T, "budget": True,
                "task": stage == 1 or t % 2 == 0, "sparsity": stage == 1 or t % 2 == 1}

    @staticmethod
    def extra_terms(gates, plan):
        if not plan["sparsity"]:
            return {}  # per-layer normalised L1 (on relu(theta): no pull below 0, where s is 0 already)
        return {"sparsity": gates[0].sparsity * torch.stack([F.relu(g.theta).mean() for g in gates]).mean()}


register("soco", SocoGate)
