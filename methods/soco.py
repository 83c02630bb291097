"""SoCo's learned spectrum (docs/METHODS.md §3.4; Li et al., arXiv 2502.15092): a non-negative score s_i per
stored component scales its singular value, W' = U diag(sigma * s) V^T S^-1; the components of largest
s_i sigma_i are kept.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from methods.base import Gate, straight_through_min1
from plumbing.registry import register
from plumbing import cli
from plumbing.cli import UserError


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
    steps, compensate = 200, 250  # longer coarse stages ran unstably on some seeds; the extra steps go to compensation
    term_flags = {**Gate.term_flags, "sparsity": "--sparsity"}

    flags = {"--soco_stages": dict(type=float, nargs=2, default=[0.5, 0.5], help="SoCo: fractions of --steps in its "
                                   "coarse and refine stages (its third, the kept scores trained with the selection "
                                   "fixed, is --compensate)"),
             "--sparsity": dict(type=float, default=0.1, help="SoCo: weight of the per-layer L1 term on the scores "
                                "(too large, it, not the task, sets the allocation)")}

    @classmethod
    def check_args(cls, args):
        cli.check_flags(args, soco_stages=(0, 1), sparsity=(0, None))
        if abs(sum(args.soco_stages) - 1) > 1e-6:
            raise UserError(f"--soco_stages {' '.join(map(str, args.soco_stages))} sum to {sum(args.soco_stages):g}: "
                            "they are fractions of --steps and must sum to 1 (the third stage is --compensate)")

    def __init__(self, k_max, k0, sigma, args):
        super().__init__()
        s = torch.ones(k_max)
        if args.init != "paper":
            s[k0:] = 0  # start exactly at the uniform model
        self.theta = nn.Parameter(s)
        self.register_buffer("sigma", sigma.float())  # selection sees sigma_i: s scales sigma (§3.4)
        self.k_max, self.relaxed = k_max, False  # relaxed: the coarse stage's forward (at_step)

    def scores(self):
        return self.theta - (self.theta - self.theta.clamp(min=0)).detach()  # max(theta, 0), straight-through

    def at_step(self, step, args):
        self.relaxed = step < round(args.soco_stages[0] * args.steps)  # the coarse stage

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
        kept = (rank < torch.floor(self.k_hat().detach() + 0.5)).to(s.dtype)  # finalize's rounding; no host sync
        return s + (s * kept - s).detach()

    def k_hat(self):
        return straight_through_min1(self.scores()).sum()

    def order(self):
        return (self.scores().detach() * self.sigma).argsort(descending=True)

    def scales(self):
        return self.scores().detach()

    @classmethod
    def plan(cls, step, args):
        end1 = round(args.soco_stages[0] * args.steps)
        stage = 1 if step < end1 else 2
        t, T = (step, max(end1, 1)) if stage == 1 else (step - end1, max(args.steps - end1, 1))
        return {"stage": stage, "t": t, "T": T, "budget": True,
                "task": stage == 1 or t % 2 == 0, "sparsity": stage == 1 or t % 2 == 1}

    @classmethod
    def terms(cls, ctx, plan, args):
        out = super().terms(ctx, plan, args)
        if plan["sparsity"]:  # per-layer normalised L1 (on relu(theta): no pull below 0, where s is 0 already)
            out["sparsity"] = args.sparsity * torch.stack([F.relu(g.theta).mean() for g in ctx.gates]).mean()
        return out


register("soco", SocoGate)
