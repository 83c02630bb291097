"""The gates of the learned allocators (docs/METHODS.md §3): one masked low-rank module serves every method,
one Gate class per method, the finalisation that fixes the selection, and the export of the fixed state.
Trained by masking.train, which learn_masks.py calls; kept apart from the loop the way nanoGPT keeps
model.py apart from train.py.

Masked layer (frozen factors of decompose.py, k_max stored components):
  y = U diag(mask * sigma) (V^T S^-1) x + b          U (m, k_max), V^T S^-1 (k_max, n)
  r_l = k_hat_l (m + n) / (m n)                      differentiable kept ratio of layer l
  r_l >= 1  ->  y = W x + b                          ARA's dense switch (§3.3)
Gates (mask over the k_max components, k_hat = expected number kept):
  sigmoid       g = sigmoid((z + log u - log(1-u)) / tau), mask = 1[g > .5] + g - sg(g)   (§3.1)
  hardconcrete  z = clip(sigmoid((log u - log(1-u) + log a) / beta)(zeta - gamma) + gamma, 0, 1)   (§3.2)
  ara           pi = softmax(p), rho = pi.c, mask = 1[i < round(k_max rho)] + pi B - sg(pi B)   (§3.3)
  soco          mask = s = max(theta, 0) (scores, may exceed 1), pruned by s_i sigma_i   (§3.4)
After training, `select` runs ARA's finalisation (§3.3) and FIXES every layer: dense, or a set of
components with one scale each (the gate's test-time value: 1 for the hard masks, the test-time gate
of hard-concrete, SoCo's scores). The fixed layer computes exactly what truncate.py builds; the
compensation stage (§3.8, masking.compensate) trains those scales; `export` writes them.

A new method is one Gate subclass registered with `register(name, cls)`: mask, k_hat (and optionally
order, scales, terms, plan, check_args, lr). The loop, the finalisation and the export are shared.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import UserError


# ----------------------------------------------------------------------------- the shared loss terms

def guidance_grid(sigma_full, m, n, points=101):
    """b_l(r) = sqrt(sum_{i>k(r)} sigma_i^2 / sum_i sigma_i^2), k(r) = floor(r m n / (m + n)), on
    r = 0, .01, .., 1, over the FULL spectrum (§3.3): the same numbers decompose.py prints."""
    tail = common.tail_energy(sigma_full)  # (min(m, n) + 1,), tail[0] = sum_i sigma_i^2
    r = torch.linspace(0, 1, points, dtype=torch.float64)
    ks = torch.floor(r * m * n / (m + n) + 1e-9).long().clamp(max=len(sigma_full))
    return (tail[ks] / tail[0]).sqrt().float()


def guidance_loss(r, b_grid):
    """ARA: L_guid = (1/L) sum_l (1 - r_l) 1[r_l > 1 - b_l(r_l)]; zero at r = 1 (§3.3)."""
    idx = (r.detach().clamp(0, 1) * (b_grid.shape[1] - 1)).long()
    b = b_grid.gather(1, idx[:, None]).squeeze(1)
    active = ((r < 1) & (r > 1 - b)).float()  # saving 1 - r smaller than the error paid
    return ((1 - r) * active).mean()


def straight_through_min1(x):
    """Forward min(x, 1), backward as if unclamped (§3.7): a dense layer (r >= 1) still feels the budget,
    and a SoCo score above 1 still feels the count (§3.4)."""
    return x - (x - x.clamp(max=1)).detach()


# ----------------------------------------------------------------------------- gates

class Gate(nn.Module):
    """What every allocator implements (one subclass per method):
      mask(gen)  -> (k_max,)  this step's training multiplier of each stored component
      k_hat()    -> ()        differentiable expected number of kept components
      order()    -> (k_max,)  component indices, most wanted first: the export keeps the first k
      scales()   -> (k_max,) or None (all 1): each component's test-time multiplier, the scale it is
                              exported with (and where the compensation stage starts)
    Class-level hooks with defaults: lr, check_args, plan, terms. The constructor takes
    (k_max, k0 the uniform rank, sigma (k_max,) the layer's whitened spectrum, args)."""
    lr = 0.1  # sized for ~200 CPU steps (the papers train thousands of steps at 1e-3: ARA, 2560)
    skips_zeros = False  # True where a component whose drawn mask is exactly 0 gets no gradient from the
    # task loss (hard-concrete's clip): the layer then computes only the others, the same loss and gradients
    term_flags = {"budget": "--alpha", "guid": "--guidance", "task": "--lr"}  # the flag that sizes each term

    def order(self):
        return torch.arange(self.k_max, device=self.k_hat().device)  # prefix: largest sigma first

    def scales(self):
        return None

    def at_step(self, step, args):
        """Called on every gate at the top of each training step (e.g. a temperature schedule)."""

    @classmethod
    def check_args(cls, args):
        """Refuse flags this method cannot honour (one line, UserError)."""

    @classmethod
    def plan(cls, step, args):
        """What runs at `step`: one stage, the task and budget terms every step, cosine lr over it."""
        return {"stage": 1, "task": True, "budget": True, "t": step, "T": args.steps}

    @classmethod
    def terms(cls, ctx, plan, args):
        """The loss terms beside the task loss. ctx: r (L,) differentiable r_l, rho_hat, rho, alpha (this
        step's budget weight), b_grid (L, 101) guidance grids, gates [L]. ARA's Eq.: alpha (rho_hat - rho)^2
        + beta L_guid, for every mask type (--guidance 0: the papers' plain versions)."""
        if not plan["budget"]:
            return {}
        return {"budget": ctx.alpha * (ctx.rho_hat - ctx.rho) ** 2,
                "guid": args.guidance * guidance_loss(ctx.r, ctx.b_grid)}


def uniform_logits(k_max, k0):
    """Logits of a gate that starts at rank k0: +6 at i = 0 falling linearly through 0 at i = k0."""
    i = torch.arange(k_max, dtype=torch.float32)
    return 6 * (1 - i / max(k0, 1))


class SigmoidGate(Gate):
    """LLRC / ARS Gumbel-sigmoid mask with straight-through estimator (§3.1). The forward mask is hard
    (1[g > .5]), so P(keep) = sigmoid(z) at any tau: tau only sets the slope of the backward surrogate."""

    def __init__(self, k_max, k0, sigma, args):
        super().__init__()
        z = torch.linspace(6, 3, k_max) if args.init == "paper" else uniform_logits(k_max, k0)
        self.z, self.tau, self.k_max = nn.Parameter(z), args.tau, k_max

    def mask(self, gen):
        u = torch.rand(self.z.shape, generator=gen, device=self.z.device).clamp(1e-6, 1 - 1e-6)
        g = torch.sigmoid((self.z + u.log() - (-u).log1p()) / self.tau)  # logistic noise = Gumbel-sigmoid
        return (g > 0.5).float() + g - g.detach()  # straight-through

    def k_hat(self):
        # P(g > 0.5) = P(z + logistic noise > 0) = sigmoid(z): the expected number the hard mask keeps
        return torch.sigmoid(self.z).sum()

    def order(self):
        return self.z.detach().argsort(descending=True)  # trained as "any subset": the k largest logits


class HardConcreteGate(Gate):
    """Louizos et al. hard-concrete L0 gates, gamma = -0.1, zeta = 1.1, beta = 2/3 (§3.2). The temperature
    anneals geometrically from 2/3 to --beta_end over the steps (beta_t). Annealed (the default, 0.05), the
    last steps' sampled gates are nearly 0 or 1 (a random subset, as sigmoid's hard mask), so the export is
    that hard gate: the components of largest log a at scale 1. At beta_end = 2/3 (Louizos' fixed beta) the
    forward trains fractional gates and each kept component is exported with its test-time gate
    clip(sigmoid(log a)(zeta - gamma) + gamma, 0, 1) as scale. The uniform init is sigmoid's ramp,
    P(z_i != 0) = sigmoid(6 (1 - i / k0)), so k_hat ~ k0 and every gate of the band is within a few log a
    units of its boundary. The earlier plateau init (log a - shift = +-6, a ramp over 10% of k0, lr 0.3) gave
    36.64 ppl at 80% kept, this one 28.86 (docs/RESULTS.md): AdamW moves every gate by about its lr whatever
    the size of its gradient, so plateau gates, which only the budget and guidance reach (their sampled z
    is clipped at 1), moved together and crossed the boundary as one block."""
    gamma, zeta, beta = -0.1, 1.1, 2 / 3
    skips_zeros = True  # a gate clipped to 0 has zero gradient (the clip), so its component is not computed

    def __init__(self, k_max, k0, sigma, args):
        super().__init__()
        self.beta_t, self.beta_end = self.beta, args.beta_end
        if args.init == "paper":
            z = torch.linspace(6, 3, k_max)
        else:  # log a - shift = sigmoid's ramp: P(z != 0) = sigmoid(6 (1 - i / k0)), 1/2 at k0
            z = uniform_logits(k_max, k0) + self.shift()
        self.log_alpha, self.k_max = nn.Parameter(z), k_max

    @classmethod
    def check_args(cls, args):
        if not 0 < args.beta_end <= cls.beta:
            raise UserError(f"--beta_end {args.beta_end}: hard-concrete's final temperature is in (0, 2/3] "
                            "(2/3 = Louizos' fixed beta)")

    def at_step(self, step, args):
        # beta_t = beta (beta_end / beta)^(t / (T - 1)): geometric, 2/3 at the first step, beta_end at the last.
        # log a keeps its P(on): the shift moves with beta_t, so k_hat = sum P(z != 0) is continuous in t
        with torch.no_grad():
            before = self.shift()
            self.beta_t = self.beta * (self.beta_end / self.beta) ** (step / max(args.steps - 1, 1))
            self.log_alpha += self.shift() - before

    def annealed(self):
        return self.beta_end < self.beta

    def shift(self):
        return self.beta_t * math.log(-self.gamma / self.zeta)

    def mask(self, gen):
        u = torch.rand(self.log_alpha.shape, generator=gen, device=self.log_alpha.device).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((u.log() - (-u).log1p() + self.log_alpha) / self.beta_t)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0, 1)  # exact zeros and ones occur

    def k_hat(self):
        # the L0 norm the budget is trained on: sum_i P(z_i != 0) (Louizos et al. Eq. 12)
        return torch.sigmoid(self.log_alpha - self.shift()).sum()

    def order(self):
        return self.log_alpha.detach().argsort(descending=True)  # any subset, like sigmoid

    def scales(self):  # the test-time gate (Louizos et al. Eq. 13); annealed: the hard gate, scale 1
        if self.annealed():
            return None
        return (torch.sigmoid(self.log_alpha.detach()) * (self.zeta - self.gamma) + self.gamma).clamp(0, 1)


class AraGate(Gate):
    """ARA's simplex mask over D + 1 candidate fractions c_j = 1 - j / D of k_max (§3.3)."""

    def __init__(self, k_max, k0, sigma, args, D=100, eps=0.05):
        super().__init__()
        self.k_max = k_max
        self.register_buffer("c", 1 - torch.arange(D + 1, dtype=torch.float32) / D)  # (D+1,)
        keep = torch.floor(k_max * self.c)
        self.register_buffer("B", (torch.arange(k_max)[None, :] < keep[:, None]).float())  # staircase (D+1, k_max)
        # two-level init: an eps floor everywhere plus a two-point mass so that E[rho] = k0 / k_max exactly
        # (where k0 / k_max >= eps / 2, the floor's own mean; below it E[rho] is that mean)
        x = (k0 / k_max - eps * self.c.mean().item()) / (1 - eps)
        x = min(max(x, 0.0), 1.0)
        j0 = min(int((1 - x) * D), D - 1)  # c[j0] >= x >= c[j0 + 1]
        a = (x - self.c[j0 + 1].item()) * D
        pi = torch.full((D + 1,), eps / (D + 1))
        pi[j0] += (1 - eps) * a
        pi[j0 + 1] += (1 - eps) * (1 - a)
        self.p = nn.Parameter(pi.clamp(min=1e-8).log())

    @classmethod
    def check_args(cls, args):
        if args.init == "paper":
            raise UserError("--init paper: ARA's init is its paper's own (E[rho] = the uniform allocation); "
                            "drop --init for --method ara")

    def rho(self):
        # elementwise, not a matmul: bf16 autocast would round rho and move round(k_max rho) by a component
        return (torch.softmax(self.p, 0) * self.c).sum()  # expected kept fraction of k_max

    def mask(self, gen):
        rho = self.rho()
        hard = (torch.arange(self.k_max, device=rho.device) < torch.round(self.k_max * rho)).float()
        soft = (torch.softmax(self.p, 0)[:, None] * self.B).sum(0)  # pi^T B (k_max,), non-increasing in i
        return hard + soft - soft.detach()

    def k_hat(self):
        return self.k_max * self.rho()


class SocoGate(Gate):
    """SoCo's learned non-negative spectrum s (§3.4): W' = U diag(sigma * s) V^T S^-1, s_i = max(theta_i, 0)
    forward, straight-through backward, so a score pushed to 0 still feels the task and the budget and can
    return (a relu's zero gradient would prune it for good). theta is the score itself, so AdamW's lr is
    in score units: a kept score (1) can be pruned, and a pruned one (0) revived, in ~1 / lr steps.
    Count: k_hat = sum_i min(s_i, 1), straight-through (a score above 1, which compensates, counts one
    component, yet the budget reaches it with gradient 1). Sparsity: L1 on s normalised per layer,
    (1/L) sum_l mean_i s_i. Stages over --soco_stages fractions of --steps: (1) coarse: task + budget +
    sparsity every step; (2) refine: task and sparsity on alternate steps (budget on both). SoCo's last
    stage (selection fixed, the kept scores trained on the task loss) is the shared --compensate stage."""
    lr = 0.05
    term_flags = {**Gate.term_flags, "sparsity": "--sparsity"}

    def __init__(self, k_max, k0, sigma, args):
        super().__init__()
        s = torch.ones(k_max)
        if args.init != "paper":
            s[k0:] = 0  # start exactly at the uniform model
        self.theta = nn.Parameter(s)
        self.register_buffer("sigma", sigma.float())  # selection sees sigma_i: s scales sigma (§3.4)
        self.k_max = k_max

    def scores(self):
        return self.theta - (self.theta - self.theta.clamp(min=0)).detach()  # max(theta, 0), straight-through

    def mask(self, gen):
        return self.scores()

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


GATES = {}


def register(name, cls):
    """The one call that adds a learned method: learn_masks.py --method NAME trains `cls` (a Gate subclass)."""
    if not (isinstance(cls, type) and issubclass(cls, Gate)):
        raise TypeError(f"{cls!r} is not a gates.Gate subclass")
    GATES[name] = cls


for _name, _cls in {"sigmoid": SigmoidGate, "hardconcrete": HardConcreteGate, "ara": AraGate,
                    "soco": SocoGate}.items():
    register(_name, _cls)


class MaskedLinear(nn.Module):
    """The original layer plus frozen whitened factors and a gate; one module serves every method.
    Two states: learning (the gate's mask, ARA's dense switch) and fixed (after `select`: dense, or the
    components `index` with learned scales softplus(theta), the exported layer exactly)."""

    def __init__(self, orig, U, sigma, VtSinv, gate, state):
        super().__init__()
        self.orig, self.gate, self.state, self.dense = orig, gate, state, False
        self.step_mask = None  # this step's training mask, drawn once before the forward (see draw_masks)
        self.step_index = None  # its nonzero components, where the gate skips zeros
        self.index, self.theta = None, None  # the fixed selection (k,) and its scales' parameters (k,)
        self.register_buffer("U", U)  # (m, k_max)
        self.register_buffer("sigma", sigma[:U.shape[1]].float())  # (k_max,)
        self.register_buffer("sigma_full", sigma.double())  # (min(m, n),): ARA's b_l(r) needs all of it
        self.m, self.n = U.shape[0], VtSinv.shape[1]
        self.register_buffer("VtSinv", VtSinv)  # (k_max, n)

    @property
    def fixed(self):
        return self.index is not None or (self.dense and self.gate is None)

    def ratio(self):
        return self.gate.k_hat() * (self.m + self.n) / (self.m * self.n)  # r_l

    def fix(self, index, scale=None):
        """Fix the selection: dense (index None), or keep components index (k,) with scales (k,) (default 1).
        theta = softplus^-1(scale), so the compensation stage keeps every scale positive (§3.8)."""
        self.step_mask = self.step_index = None
        if self.fixed:
            raise RuntimeError("a MaskedLinear is fixed once: its factors now hold only the kept components")
        if index is None:
            self.dense, self.index, self.theta = True, None, None
            self.gate = None  # nothing left to learn in this layer
            self.U, self.VtSinv = self.U.new_empty(self.m, 0), self.VtSinv.new_empty(0, self.n)  # runs W: freed
            return
        s = torch.ones(len(index)) if scale is None else scale.detach().float().cpu()
        s = s.clamp(min=1e-4)  # a zero test-time gate would sit at softplus^-1(0) = -inf
        self.dense, self.index = False, index.to(self.U.device)
        self.theta = nn.Parameter((s + torch.log(-torch.expm1(-s))).to(self.U.device))
        # keep only the k kept components, gathered once: the buffers become the truncated layer's factors
        # (k_max - k components' memory freed; 12% faster a compensation step than a gather per call, measured)
        self.U = self.U[:, self.index].contiguous()  # (m, k)
        self.VtSinv = self.VtSinv[self.index].contiguous()  # (k, n)
        self.sigma = self.sigma[self.index]  # (k,)

    def scale(self):
        return F.softplus(self.theta)  # (k,)

    def forward(self, x):  # x (..., n)
        if self.state["teacher"] or self.dense:
            return self.orig(x)
        bias, dtype = getattr(self.orig, "bias", None), x.dtype
        x = x.to(self.VtSinv.dtype)  # a no-op unless float16
        V, U = self.VtSinv, self.U  # (k_max, n), (m, k_max); fixed: (k, n), (m, k)
        if self.index is not None:
            # fixed: U, VtSinv, sigma hold the k kept components (fix), so the compensation stage's forward
            # costs what the truncated model's does, not k_max components'
            s = self.scale() * self.sigma  # (k,)
        elif self.step_mask is not None:
            s = self.step_mask * self.sigma  # (k_max,)
            if self.step_index is not None:  # a gate whose zeros carry no gradient (Gate.skips_zeros): only
                i = self.step_index  # the components this step's mask keeps; the same loss and gradients
                V, U, s = V[i], U[:, i], s[i]
        else:
            raise RuntimeError("a learning MaskedLinear runs only inside masking.train (its masks are drawn "
                               "per step); call gates.select first to evaluate the exported model")
        h = F.linear(x, V) * s.to(x.dtype)  # (..., components)
        return F.linear(h, U, None if bias is None else bias.to(h.dtype)).to(dtype)  # (..., m)


# ----------------------------------------------------------------------------- finalisation and export

def finalize(k_hat, shapes, rho, dense):
    """ARA's finalisation (§3.3) on the trained expected counts k_hat_l. `dense`: the layers training left
    dense (the switch r_l >= 1, frozen in the settle phase): they stay dense, unless they alone break the
    budget (the least-wanted give way). The others are scaled by one factor c so the budget is met exactly:
    rank round(c k_hat_l), at least 1; a rank that reaches k* takes dense instead (k* - 1 would cost about
    dense's price and still drop half a square spectrum). Returns (ranks, c)."""
    budget = rho * sum(m * n for m, n in shapes.values())
    r = {k: k_hat[k] * (m + n) / (m * n) for k, (m, n) in shapes.items()}
    dense = sorted((k for k in shapes if k in dense), key=lambda k: -r[k])
    low_floor = lambda d: sum(m * n if k in d else m + n for k, (m, n) in shapes.items())
    while dense and low_floor(set(dense)) > budget:
        dense.pop()

    def ranks_at(c):
        out = {}
        for k, (m, n) in shapes.items():
            rank = max(1, int(c * k_hat[k] + 0.5))
            out[k] = "dense" if k in dense or rank >= common.k_star(m, n) else rank
        return out
    lo, hi = 0.0, 1.0
    while common.total_cost(ranks_at(hi), shapes) <= budget and hi < 1e6:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if common.total_cost(ranks_at(mid), shapes) <= budget else (lo, mid)
    return common.fill_budget(ranks_at(lo), shapes, rho), lo


def select(layers, shapes, rho):
    """Finalise the trained gates and fix every layer (dense, or the first k of its gate's order() with the
    gate's test-time scales). Returns the record: ARA's export scale c (1 = no rescaling)."""
    with torch.no_grad():
        k_hat = {name: l.gate.k_hat().item() for name, l in layers.items()}
        ranks, c = finalize(k_hat, shapes, rho, {name for name, l in layers.items() if l.dense})
        for name, l in layers.items():
            if ranks[name] == "dense":
                l.fix(None)
                continue
            idx = l.gate.order()[:ranks[name]].sort().values
            s = l.gate.scales()
            l.fix(idx, None if s is None else s[idx])
    return {"export_scale": round(c, 4)}


def fix_ranks(layers, ranks):
    """Fix every layer at a given allocation (an allocation that trained nothing): the top-k prefix, scale 1."""
    for name, l in layers.items():
        k = ranks[name]
        l.fix(None if k == "dense" else torch.arange(k))


def export(layers):
    """(ranks, components or None) from the fixed layers: exactly the model they compute. A layer that keeps
    other than its prefix, or scales other than 1, gets {layer}.index (k,) and {layer}.scale (k,)."""
    ranks, components = {}, {}
    for name, l in layers.items():
        if l.dense:
            ranks[name] = "dense"
            continue
        idx, scale = l.index.cpu(), l.scale().detach().float().cpu()
        ranks[name] = len(idx)
        if torch.equal(idx, torch.arange(len(idx))) and torch.equal(scale, torch.ones_like(scale)):
            continue  # the prefix at scale 1: truncate.py's default top-k
        components[f"{name}.index"] = idx.contiguous()
        components[f"{name}.scale"] = scale.contiguous()
    return ranks, components or None
