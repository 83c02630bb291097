"""The learned masks of learn_masks.py (METHODS.md §3): one masked low-rank module for every
method, four gate parametrisations, the training loop and the export to ranks. Kept beside
learn_masks.py the way nanoGPT keeps model.py beside train.py.

Masked layer (frozen factors of decompose.py, k_max stored components):
  y = U diag(mask * sigma) (V^T S^-1) x + b          U (m, k_max), V^T S^-1 (k_max, n)
  r_l = k_hat_l (m + n) / (m n)                      differentiable kept ratio of layer l
  r_l >= 1  ->  y = W x + b                          ARA's dense switch (METHODS.md §3.3)
Gates (mask over the k_max components, k_hat = expected number kept):
  sigmoid       g = sigmoid((z + log u - log(1-u)) / tau), mask = 1[g > .5] + g - sg(g)   (§3.1)
  hardconcrete  z = clip(sigmoid((log u - log(1-u) + log a) / beta)(zeta - gamma) + gamma, 0, 1)   (§3.2)
  ara           pi = softmax(p), rho = pi.c, mask = 1[i < round(k_max rho)] + pi B - sg(pi B)   (§3.3)
  soco          mask = relu(theta) (scores, may exceed 1), pruned by score order           (§3.4)
Initialisation (--init): 'uniform' (default) starts every gate at the uniform allocation's rank k0;
'paper' is LLRC's logits 6 -> 3 / SoCo's scores 1. With the dense switch, the paper's init puts
every layer past r = 1 (k_max = 1.2 k*), i.e. dense, where the task loss has no gradient for the
mask at all; starting at the budget avoids those wasted steps. ARA's own init (E[rho] = target/1.2)
is the uniform one.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
from common import UserError

# Chosen for ~100 CPU-sized steps (the papers train thousands of steps at 1e-3: ARA, 2560)
DEFAULT_LR = {"sigmoid": 0.1, "hardconcrete": 0.1, "ara": 0.1, "soco": 0.05}


# ----------------------------------------------------------------------------- gates

class SigmoidGate(nn.Module):
    """LLRC / ARS Gumbel-sigmoid mask with straight-through estimator (METHODS.md §3.1)."""

    def __init__(self, k_max, k0, args):
        super().__init__()
        i = torch.arange(k_max, dtype=torch.float32)
        z = torch.linspace(6, 3, k_max) if args.init == "paper" else 6 * (1 - i / max(k0, 1))
        self.z, self.tau = nn.Parameter(z), args.tau

    def mask(self, train, gen):
        if not train:
            return (self.z > 0).float()
        u = torch.rand(self.z.shape, generator=gen, device=self.z.device).clamp(1e-6, 1 - 1e-6)
        g = torch.sigmoid((self.z + u.log() - (-u).log1p()) / self.tau)  # logistic noise = Gumbel-sigmoid
        return (g > 0.5).float() + g - g.detach()  # straight-through

    def k_hat(self):
        return torch.sigmoid(self.z).sum()  # expected kept components (cleaner than LLRC's mean logit)

    def export_k(self):
        return (self.z > 0).sum().item()  # LLRC code: k = #(sigmoid(z) > 0.5), exported as top-k


class HardConcreteGate(nn.Module):
    """Louizos et al. hard-concrete L0 gates, gamma = -0.1, zeta = 1.1, beta = 2/3 (METHODS.md §3.2)."""
    gamma, zeta, beta = -0.1, 1.1, 2 / 3

    def __init__(self, k_max, k0, args):
        super().__init__()
        shift = self.beta * math.log(-self.gamma / self.zeta)  # P(on) = sigmoid(log a - shift)
        i = torch.arange(k_max, dtype=torch.float32)
        z = torch.linspace(6, 3, k_max) if args.init == "paper" else 6 * (1 - i / max(k0, 1)) + shift
        self.log_alpha = nn.Parameter(z)

    def mask(self, train, gen):
        if not train:  # test-time gate
            return (torch.sigmoid(self.log_alpha) * (self.zeta - self.gamma) + self.gamma).clamp(0, 1)
        u = torch.rand(self.log_alpha.shape, generator=gen, device=self.log_alpha.device).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((u.log() - (-u).log1p() + self.log_alpha) / self.beta)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0, 1)  # exact zeros and ones occur

    def k_hat(self):
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.gamma / self.zeta)).sum()  # L0

    def export_k(self):
        return (self.mask(False, None) > 0.5).sum().item()


class AraGate(nn.Module):
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
        return torch.softmax(self.p, 0) @ self.c  # expected kept fraction of k_max

    def mask(self, train, gen):
        rho = self.rho()
        hard = (torch.arange(self.k_max, device=rho.device) < torch.round(self.k_max * rho)).float()
        if not train:
            return hard
        soft = torch.softmax(self.p, 0) @ self.B  # (k_max,) non-increasing in i
        return hard + soft - soft.detach()

    def k_hat(self):
        return self.k_max * self.rho()

    def export_k(self):
        return self.k_hat().item()


class SocoGate(nn.Module):
    """SoCo's learned non-negative spectrum scores s = relu(theta) (METHODS.md §3.4)."""

    def __init__(self, k_max, k0, args):
        super().__init__()
        theta = torch.ones(k_max)
        if args.init != "paper":
            theta[k0:] = 0.1  # start at the budget; small, not zero, so pruned components can return
        self.theta = nn.Parameter(theta)
        self.register_buffer("selected", torch.ones(k_max))  # stage 3 freezes a score-ordered subset

    def scores(self):
        return self.theta.clamp(min=0)

    def mask(self, train, gen):
        return self.scores() * self.selected

    def k_hat(self):
        return (self.theta.clamp(0, 1) * self.selected).sum()


GATES = {"sigmoid": SigmoidGate, "hardconcrete": HardConcreteGate, "ara": AraGate, "soco": SocoGate}


class MaskedLinear(nn.Module):
    """The original layer plus frozen whitened factors and a gate; one module serves every method."""

    def __init__(self, orig, U, sigma, VtSinv, gate, state):
        super().__init__()
        self.orig, self.gate, self.state, self.dense = orig, gate, state, False
        self.register_buffer("U", U)  # (m, k_max)
        self.register_buffer("sigma", sigma[:U.shape[1]].float())  # (k_max,)
        self.register_buffer("VtSinv", VtSinv)  # (k_max, n)
        self.m, self.n = U.shape[0], VtSinv.shape[1]

    def ratio(self):
        return self.gate.k_hat() * (self.m + self.n) / (self.m * self.n)  # r_l

    def forward(self, x):  # x (..., n)
        if self.state["teacher"] or self.dense:
            return self.orig(x)
        h = F.linear(x, self.VtSinv)  # (..., k_max)
        h = h * (self.gate.mask(self.state["train"], self.state["gen"]) * self.sigma).to(h.dtype)
        return F.linear(h, self.U, getattr(self.orig, "bias", None))  # (..., m)


# ----------------------------------------------------------------------------- attach / helpers

def attach(model, factors, shapes, rho, args):
    """Swap every compressed linear for a MaskedLinear; gates start at the uniform allocation."""
    state = {"teacher": False, "train": True, "gen": None}
    k0 = common.uniform_ranks(shapes, rho)
    layers = {}
    for name, orig in common.find_linears(model).items():
        m, n = shapes[name]
        U, VtSinv = factors[f"{name}.U"], factors[f"{name}.VtSinv"]
        k = common.k_star(m, n) if k0[name] == "dense" else k0[name]
        gate = GATES[args.method](U.shape[1], min(k, U.shape[1]), args).to(U.device)
        layers[name] = MaskedLinear(orig, U, factors[f"{name}.sigma"], VtSinv, gate, state)
        common.set_module(model, name, layers[name])
    return layers


def guidance_grid(layer, points=101):
    """b_l(r) = sqrt(sum_{i>k(r)} sigma_i^2 / sum_i sigma_i^2), k(r) = floor(r k*), on r = 0, .01, .., 1."""
    s2 = layer.sigma.double() ** 2  # only the k_max stored; the rest of the spectrum is past k* anyway
    tail = s2.flip(0).cumsum(0).flip(0)  # tail[k] = sum_{i>=k} sigma_i^2
    ks = (torch.linspace(0, 1, points, dtype=torch.float64) * common.k_star(layer.m, layer.n)).long()
    return (torch.cat([tail, tail.new_zeros(1)])[ks] / s2.sum()).sqrt().float()


def guidance_loss(r, b_grid):
    """ARA: L_guid = (1/L) sum_l (1 - r_l) 1[r_l > 1 - b_l(r_l)]; zero at r = 1 (METHODS.md §3.3)."""
    idx = (r.detach().clamp(0, 1) * (b_grid.shape[1] - 1)).long()
    b = b_grid.gather(1, idx[:, None]).squeeze(1)
    active = ((r < 1) & (r > 1 - b)).float()  # saving 1 - r smaller than the error paid
    return ((1 - r) * active).mean()


def task_loss(kind, student, teacher, x, hidden_layers):
    if kind == "kl":  # KL(teacher || student) per token
        s = F.log_softmax(student.logits.float(), -1).flatten(0, 1)
        t = F.log_softmax(teacher.logits.float(), -1).flatten(0, 1)
        return F.kl_div(s, t, log_target=True, reduction="batchmean")
    if kind == "ce":
        return F.cross_entropy(student.logits[:, :-1].float().flatten(0, 1), x[:, 1:].flatten())
    return sum(F.mse_loss(student.hidden_states[i].float(), teacher.hidden_states[i].float())
               for i in hidden_layers) / len(hidden_layers)  # LLRC's hidden-state MSE


@torch.no_grad()
def calib_ppl(model, ids):
    logits = model(ids).logits.float()
    return math.exp(F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item())


# ----------------------------------------------------------------------------- training

def soco_select(layers, shapes, rho):
    """SoCo stage 3: one global score threshold t (bisection) so that keeping the components with
    s > t in every layer meets the budget; layers left with >= k* components go dense."""
    budget = rho * sum(m * n for m, n in shapes.values())
    scores = {name: l.gate.scores().detach() for name, l in layers.items()}

    def counts(t):
        return {name: max(1, int((s > t).sum())) for name, s in scores.items()}
    lo, hi = 0.0, max(s.max().item() for s in scores.values())
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if common.total_cost(counts(mid), shapes) <= budget else (mid, hi)
    for name, k in counts(hi).items():
        s, l = scores[name], layers[name]
        keep = torch.zeros_like(s)
        keep[s.argsort(descending=True)[:k]] = 1
        l.gate.selected.copy_(keep)
        l.dense = k >= common.k_star(*shapes[name])


def train(model, layers, ids, rho, args, device):
    """L = L_task + alpha (rho_hat - rho)^2 + beta L_guid (+ SoCo's stage schedule); returns the curve."""
    names = list(layers)
    gates = [layers[n].gate for n in names]
    opt = torch.optim.AdamW([p for g in gates for p in g.parameters()],
                            lr=args.lr or DEFAULT_LR[args.method], weight_decay=0.0)
    # cosine decay to zero: the gates settle instead of flipping layers dense / low-rank at the last step
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / args.steps)))
    state = layers[names[0]].state
    state["gen"] = torch.Generator(device).manual_seed(args.seed)  # gate noise
    batches = torch.Generator().manual_seed(args.seed)  # which calibration windows
    mn = torch.tensor([layers[n].m * layers[n].n for n in names], dtype=torch.float32, device=device)
    b_grid = torch.stack([guidance_grid(layers[n]) for n in names]).to(device)  # (L, 101)
    stage_end = [round(sum(args.soco_stages[:i + 1]) * args.steps) for i in range(3)]
    hidden = args.loss == "hidden_mse"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # model matmuls only; mask math stays fp32
    curve, bar = [], tqdm(range(args.steps), desc=f"learn {args.method}")
    for step in bar:
        soco_stage = 1 + sum(step >= e for e in stage_end[:2]) if args.method == "soco" else 0
        if soco_stage == 3 and step == stage_end[1]:
            soco_select(layers, {n: (layers[n].m, layers[n].n) for n in names}, rho)
        r = torch.stack([layers[n].ratio() for n in names])  # (L,) differentiable r_l
        if soco_stage != 3:
            for n, dense in zip(names, (r >= 1).tolist()):  # one host sync per step
                layers[n].dense = dense
        rho_hat = (r.clamp(max=1) * mn).sum() / mn.sum()  # R_eff of ARA / METHODS.md §2
        terms = {"budget": args.alpha * (rho_hat - rho) ** 2, "guid": args.guidance * guidance_loss(r, b_grid)}
        if soco_stage in (1, 2):
            terms["sparsity"] = args.sparsity * torch.cat([g.scores() for g in gates]).mean()
        if soco_stage == 3:
            terms = {}  # selection fixed: only the task loss, so kept scores compensate pruned ones
        if not (soco_stage == 2 and step % 2):  # SoCo refinement alternates task / sparsity steps
            x = ids[torch.randint(len(ids), (args.batch_size,), generator=batches), :args.train_seqlen].to(device)
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                with torch.no_grad():
                    state["teacher"] = True  # the teacher: same weights, masks off
                    t_out = model(x, output_hidden_states=hidden)
                    state["teacher"] = False
                s_out = model(x, output_hidden_states=hidden)
            terms["task"] = task_loss(args.loss, s_out, t_out, x, args.hidden_layers)
        loss = sum(terms.values())
        log = {"step": step, "loss": loss.item(), "rho_hat": rho_hat.item(),
               **{k: v.item() for k, v in terms.items()}}
        if not math.isfinite(log["loss"]):
            raise UserError(f"loss became {log['loss']} at step {step} ({log}); lower --lr or --alpha")
        opt.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
            opt.step()
        sched.step()
        curve.append({k: round(v, 6) if isinstance(v, float) else v for k, v in log.items()})
        bar.set_postfix(loss=f"{log['loss']:.4f}", rho=f"{log['rho_hat']:.3f}")
    state["train"] = False
    return curve


# ----------------------------------------------------------------------------- export

def finalize(r, shapes, rho):
    """ARA's finalisation (METHODS.md §3.3), used for every rank-based gate: layers with r >= 0.99 go
    dense (the least-wanted dense layers give way if they alone break the budget); the others are
    scaled by one factor so the budget is met exactly; rank floor(r k*), at least 1."""
    budget = rho * sum(m * n for m, n in shapes.values())
    dense = sorted((n for n in r if r[n] >= 0.99), key=lambda n: -r[n])
    low_floor = lambda d: sum(m * n if k in d else m + n for k, (m, n) in shapes.items())
    while dense and low_floor(set(dense)) > budget:
        dense.pop()

    def ranks_at(c):
        out = {}
        for k, (m, n) in shapes.items():
            out[k] = "dense" if k in dense else min(max(1, int(c * r[k] * common.k_star(m, n))),
                                                    common.k_star(m, n) - 1)
        return out
    lo, hi = 0.0, 1.0
    while common.total_cost(ranks_at(hi), shapes) <= budget and hi < 1e6:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if common.total_cost(ranks_at(mid), shapes) <= budget else (lo, mid)
    return common.fill_budget(ranks_at(lo), shapes, rho)


def export(layers, shapes, rho, method):
    """Ranks (and SoCo's chosen components with their scales) from the trained gates."""
    if method == "soco":
        ranks, components = {}, {}
        for name, l in layers.items():
            idx = l.gate.selected.nonzero().squeeze(1)
            ranks[name] = "dense" if l.dense else len(idx)
            if not l.dense:
                components[f"{name}.index"] = idx.cpu().contiguous()
                components[f"{name}.scale"] = l.gate.scores().detach()[idx].cpu().contiguous()
        return ranks, components
    r = {name: l.gate.export_k() * (l.m + l.n) / (l.m * l.n) for name, l in layers.items()}
    return finalize(r, shapes, rho), None
