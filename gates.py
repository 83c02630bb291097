"""The gates of the learned allocators (METHODS.md §3): one masked low-rank module serves every method,
one Gate class per method, and the export of trained gates to ranks. Trained by masking.train, which
learn_masks.py calls; kept apart from the loop the way nanoGPT keeps model.py apart from train.py.

Masked layer (frozen factors of decompose.py, k_max stored components):
  y = U diag(mask * sigma) (V^T S^-1) x + b          U (m, k_max), V^T S^-1 (k_max, n)
  r_l = k_hat_l (m + n) / (m n)                      differentiable kept ratio of layer l
  r_l >= 1  ->  y = W x + b                          ARA's dense switch (METHODS.md §3.3)
Gates (mask over the k_max components, k_hat = expected number kept):
  sigmoid       g = sigmoid((z + log u - log(1-u)) / tau), mask = 1[g > .5] + g - sg(g)   (§3.1)
  hardconcrete  z = clip(sigmoid((log u - log(1-u) + log a) / beta)(zeta - gamma) + gamma, 0, 1)   (§3.2)
  ara           pi = softmax(p), rho = pi.c, mask = 1[i < round(k_max rho)] + pi B - sg(pi B)   (§3.3)
  soco          mask = s = softplus(theta) (scores, may exceed 1), pruned by score order   (§3.4)

A new method is one Gate subclass (mask, k_hat, order, scales; optionally plan / extra_terms /
on_stage / export for a schedule like SoCo's) registered in GATES, plus its flags in learn_masks.py.

Initialisation (--init): 'uniform' (default) starts every gate at the uniform allocation's rank k0;
'paper' is LLRC's logits 6 -> 3 (sigmoid; hard-concrete takes the same numbers as log alpha) and
SoCo's scores 1, which with k_max = 1.2 k* starts every layer past r = 1, i.e. dense; the
straight-through budget term pulls them back below 1 (masking.py). ARA's own init (E[rho] = target / 1.2,
the uniform allocation) is what ARA gets with either value.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


# ----------------------------------------------------------------------------- gates

class Gate(nn.Module):
    """What every allocator implements (one subclass per method):
      mask(train, gen) -> (k_max,)  multiplier of each stored component in the forward pass
      k_hat()          -> ()        differentiable expected number of kept components
      order()          -> (k_max,)  component indices, most wanted first: the export keeps the first k
      scales()         -> (k_max,) or None: learned spectrum scales folded into the exported factors
    Class-level hooks with defaults (override for a schedule): plan, extra_terms, on_stage, export."""
    lr = 0.1  # sized for ~100 CPU steps (the papers train thousands of steps at 1e-3: ARA, 2560)
    frozen = False  # True once a schedule has fixed the layer's selection (the dense flag stops moving)

    def order(self):
        return torch.arange(self.k_max, device=self.k_hat().device)  # prefix: largest sigma first

    def scales(self):
        return None

    @classmethod
    def plan(cls, step, args):
        """What runs at `step`: one stage, the task and budget terms every step, cosine lr over it."""
        return {"stage": 0, "task": True, "budget": True, "t": step, "T": args.steps}

    @classmethod
    def extra_terms(cls, gates, plan, args):
        return {}

    @classmethod
    def on_stage(cls, plan, layers, shapes, rho):
        pass

    @classmethod
    def export(cls, layers, shapes, rho):
        return export_topk(layers, shapes, rho)


class SigmoidGate(Gate):
    """LLRC / ARS Gumbel-sigmoid mask with straight-through estimator (METHODS.md §3.1)."""

    def __init__(self, k_max, k0, args):
        super().__init__()
        i = torch.arange(k_max, dtype=torch.float32)
        z = torch.linspace(6, 3, k_max) if args.init == "paper" else 6 * (1 - i / max(k0, 1))
        self.z, self.tau, self.k_max = nn.Parameter(z), args.tau, k_max

    def mask(self, train, gen):
        if not train:
            return (self.z > 0).float()
        u = torch.rand(self.z.shape, generator=gen, device=self.z.device).clamp(1e-6, 1 - 1e-6)
        g = torch.sigmoid((self.z + u.log() - (-u).log1p()) / self.tau)  # logistic noise = Gumbel-sigmoid
        return (g > 0.5).float() + g - g.detach()  # straight-through

    def k_hat(self):
        # P(g > 0.5) = P(z + logistic noise > 0) = sigmoid(z) at any tau: the expected number of
        # components the hard training mask keeps (cleaner than LLRC's mean logit)
        return torch.sigmoid(self.z).sum()

    def order(self):
        # trained as "any subset": export the learned subset (the k largest logits), not a prefix
        return self.z.detach().argsort(descending=True)


class HardConcreteGate(Gate):
    """Louizos et al. hard-concrete L0 gates, gamma = -0.1, zeta = 1.1, beta = 2/3 (METHODS.md §3.2)."""
    gamma, zeta, beta = -0.1, 1.1, 2 / 3

    def __init__(self, k_max, k0, args):
        super().__init__()
        shift = self.beta * math.log(-self.gamma / self.zeta)  # P(on) = sigmoid(log a - shift)
        i = torch.arange(k_max, dtype=torch.float32)
        z = torch.linspace(6, 3, k_max) if args.init == "paper" else 6 * (1 - i / max(k0, 1)) + shift
        self.log_alpha, self.k_max = nn.Parameter(z), k_max

    def mask(self, train, gen):
        if not train:  # test-time gate
            return (torch.sigmoid(self.log_alpha) * (self.zeta - self.gamma) + self.gamma).clamp(0, 1)
        u = torch.rand(self.log_alpha.shape, generator=gen, device=self.log_alpha.device).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((u.log() - (-u).log1p() + self.log_alpha) / self.beta)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0, 1)  # exact zeros and ones occur

    def k_hat(self):
        # the L0 norm the budget was trained on: sum_i P(z_i != 0) (Louizos et al. Eq. 12). The export
        # keeps this many components (not #(test gate > 0.5), about 74% of them), so it is what was trained
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.gamma / self.zeta)).sum()

    def order(self):
        return self.log_alpha.detach().argsort(descending=True)  # any subset, like sigmoid


class AraGate(Gate):
    """ARA's simplex mask over D + 1 candidate fractions c_j = 1 - j / D of k_max (METHODS.md §3.3)."""

    def __init__(self, k_max, k0, args, D=100, eps=0.05):
        super().__init__()
        self.k_max = k_max
        self.register_buffer("c", 1 - torch.arange(D + 1, dtype=torch.float32) / D)  # (D+1,)
        keep = torch.floor(k_max * self.c)
        self.register_buffer("B", (torch.arange(k_max)[None, :] < keep[:, None]).float())  # staircase (D+1, k_max)
        # two-level init: an eps floor everywhere plus a two-point mass so that E[rho] = k0 / k_max exactly
        x = (k0 / k_max - eps * self.c.mean().item()) / (1 - eps)
        x = min(max(x, 0.0), 1.0)
        j0 = min(int((1 - x) * D), D - 1)  # c[j0] >= x >= c[j0 + 1]
        a = (x - self.c[j0 + 1].item()) * D
        pi = torch.full((D + 1,), eps / (D + 1))
        pi[j0] += (1 - eps) * a
        pi[j0 + 1] += (1 - eps) * (1 - a)
        self.p = nn.Parameter(pi.clamp(min=1e-8).log())

    def rho(self):
        # elementwise, not a matmul: bf16 autocast would round rho and move round(k_max rho) by a component
        return (torch.softmax(self.p, 0) * self.c).sum()  # expected kept fraction of k_max

    def mask(self, train, gen):
        rho = self.rho()
        hard = (torch.arange(self.k_max, device=rho.device) < torch.round(self.k_max * rho)).float()
        if not train:
            return hard
        soft = (torch.softmax(self.p, 0)[:, None] * self.B).sum(0)  # pi^T B (k_max,), non-increasing in i
        return hard + soft - soft.detach()

    def k_hat(self):
        return self.k_max * self.rho()


SOCO_EPS = 0.05  # a score well below this counts as pruned in SoCo's differentiable count


class SocoGate(Gate):
    """SoCo's learned non-negative spectrum s = softplus(theta) (METHODS.md §3.4). softplus, not relu:
    a relu score pushed below 0 has zero gradient forever, so a pruned component could never return.
    Stages over --soco_stages fractions of the steps: (1) coarse: task + budget + L1 sparsity every
    step; (2) refine: task and sparsity on alternate steps (budget on both); (3) the selection is
    fixed (per-layer counts from k_hat, ARA's finalisation, then the top-k by s_i sigma_i) and only the
    kept scores train on the task loss, so they compensate for the pruned ones. The cosine lr restarts
    at every stage, so the compensation stage trains at the full rate."""
    lr = 0.05

    def __init__(self, k_max, k0, args):
        super().__init__()
        s = torch.ones(k_max)
        if args.init != "paper":
            s[k0:] = 1e-3  # start at the budget; tiny, not zero, so pruned components can return
        self.theta = nn.Parameter(s + torch.log(-torch.expm1(-s)))  # softplus^-1(s)
        self.k_max, self.stages = k_max, args.soco_stages
        self.register_buffer("selected", torch.ones(k_max))  # stage 3 freezes a subset

    def scores(self):
        return F.softplus(self.theta)

    def mask(self, train, gen):
        return self.scores() * self.selected

    def k_hat(self):
        if self.frozen:
            return self.selected.sum()
        # components kept, not score mass: 1 - exp(-s / eps) is ~1 for a kept score (s ~ 1, or above 1
        # when it compensates) and ~s / eps near 0, so the count does not reward shrinking kept scores
        return (1 - torch.exp(-self.scores() / SOCO_EPS)).sum()

    def order(self):
        sigma = self.sigma_ref  # set by MaskedLinear: selection sees sigma_i (METHODS.md §3.4: s scales sigma)
        return (self.scores().detach() * sigma).argsort(descending=True)

    def scales(self):
        return self.scores().detach()

    @classmethod
    def plan(cls, step, args):
        ends = [round(sum(args.soco_stages[:i + 1]) * args.steps) for i in range(3)]
        stage = 1 + sum(step >= e for e in ends[:2])
        start = 0 if stage == 1 else ends[stage - 2]
        t, T = step - start, max(ends[stage - 1] - start, 1)
        return {"stage": stage, "t": t, "T": T, "budget": stage < 3,
                "task": stage != 2 or t % 2 == 0, "sparsity": stage == 1 or (stage == 2 and t % 2 == 1)}

    @classmethod
    def extra_terms(cls, gates, plan, args):
        if not plan["sparsity"]:
            return {}
        return {"sparsity": args.sparsity * torch.cat([g.scores() for g in gates]).mean()}  # L1 on s

    @classmethod
    def on_stage(cls, plan, layers, shapes, rho):
        if plan["stage"] != 3:
            return
        ranks, _ = finalize({n: l.gate.k_hat().item() for n, l in layers.items()}, shapes, rho)
        for name, l in layers.items():
            keep = torch.ones_like(l.gate.selected)  # a dense layer keeps reporting k_max: r >= 1
            if ranks[name] != "dense":
                keep.zero_()[l.gate.order()[:ranks[name]]] = 1
            l.gate.selected.copy_(keep)
            l.dense, l.gate.frozen = ranks[name] == "dense", True

    @classmethod
    def export(cls, layers, shapes, rho):
        if not all(l.gate.frozen for l in layers.values()):  # no stage 3 ran (e.g. --soco_stages 0.5 0.5 0)
            cls.on_stage({"stage": 3}, layers, shapes, rho)
        ranks, components = {}, {}
        for name, l in layers.items():
            idx = l.gate.selected.nonzero().squeeze(1)
            ranks[name] = "dense" if l.dense else len(idx)
            if not l.dense:
                components[f"{name}.index"] = idx.cpu().contiguous()
                components[f"{name}.scale"] = l.gate.scores().detach()[idx].cpu().contiguous()
        return ranks, components, {}


GATES = {"sigmoid": SigmoidGate, "hardconcrete": HardConcreteGate, "ara": AraGate, "soco": SocoGate}


class MaskedLinear(nn.Module):
    """The original layer plus frozen whitened factors and a gate; one module serves every method."""

    def __init__(self, orig, U, sigma, VtSinv, gate, state):
        super().__init__()
        self.orig, self.gate, self.state, self.dense = orig, gate, state, False
        self.step_mask = None  # this step's training mask, drawn once before the forward (see draw_masks)
        self.register_buffer("U", U)  # (m, k_max)
        self.register_buffer("sigma", sigma[:U.shape[1]].float())  # (k_max,)
        self.register_buffer("sigma_full", sigma.double())  # (min(m, n),): ARA's b_l(r) needs all of it
        self.m, self.n = U.shape[0], VtSinv.shape[1]
        self.register_buffer("VtSinv", VtSinv)  # (k_max, n)
        gate.sigma_ref = self.sigma

    def ratio(self):
        return self.gate.k_hat() * (self.m + self.n) / (self.m * self.n)  # r_l

    def forward(self, x):  # x (..., n)
        if self.state["teacher"] or self.dense:
            return self.orig(x)
        h = F.linear(x.to(self.VtSinv.dtype), self.VtSinv)  # (..., k_max); the cast is a no-op unless float16
        mask = self.step_mask if self.step_mask is not None else self.gate.mask(self.state["train"], self.state["gen"])
        h = h * (mask * self.sigma).to(h.dtype)  # (k_max,) in fp32, cast once per call to the factors' dtype
        bias = getattr(self.orig, "bias", None)
        return F.linear(h, self.U, None if bias is None else bias.to(h.dtype)).to(x.dtype)  # (..., m)


# ----------------------------------------------------------------------------- export

def finalize(k_hat, shapes, rho):
    """ARA's finalisation (METHODS.md §3.3) on the trained expected counts k_hat_l: layers with
    r_l >= 0.99 go dense (the least-wanted dense layers give way if they alone break the budget); the
    others are scaled by one factor c so the budget is met exactly; rank round(c k_hat_l), at least 1.
    Returns (ranks, c): c far from 1 means the trained model is not the exported one."""
    budget = rho * sum(m * n for m, n in shapes.values())
    r = {k: k_hat[k] * (m + n) / (m * n) for k, (m, n) in shapes.items()}
    dense = sorted((k for k in r if r[k] >= 0.99), key=lambda k: -r[k])
    low_floor = lambda d: sum(m * n if k in d else m + n for k, (m, n) in shapes.items())
    while dense and low_floor(set(dense)) > budget:
        dense.pop()

    def ranks_at(c):
        return {k: "dense" if k in dense else min(max(1, int(c * k_hat[k] + 0.5)), common.k_star(m, n) - 1)
                for k, (m, n) in shapes.items()}
    lo, hi = 0.0, 1.0
    while common.total_cost(ranks_at(hi), shapes) <= budget and hi < 1e6:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if common.total_cost(ranks_at(mid), shapes) <= budget else (lo, mid)
    return common.fill_budget(ranks_at(lo), shapes, rho), lo


def export_topk(layers, shapes, rho):
    """Ranks from the trained k_hat (finalize), each layer keeping the first k of its gate's order().
    A layer whose kept set is not the plain prefix gets an index (and scales, all 1 unless the gate
    learned some) in components.safetensors, which truncate.py applies."""
    ranks, c = finalize({name: l.gate.k_hat().item() for name, l in layers.items()}, shapes, rho)
    components = {}
    for name, l in layers.items():
        k = ranks[name]
        if k == "dense":
            continue
        idx = l.gate.order()[:k].sort().values.cpu()
        scale = l.gate.scales()
        if scale is None and torch.equal(idx, torch.arange(k)):
            continue  # the prefix: truncate.py's default top-k
        components[f"{name}.index"] = idx.contiguous()
        components[f"{name}.scale"] = torch.ones(k) if scale is None else scale[idx].cpu().contiguous()
    return ranks, components or None, {"export_scale": round(c, 4)}


def export(layers, shapes, rho, method):
    """(ranks, components or None, extra record) from the trained gates."""
    return GATES[method].export(layers, shapes, rho)
