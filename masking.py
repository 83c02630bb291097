"""The learned masks of learn_masks.py (METHODS.md §3): one masked low-rank module for every
method, one Gate class per method, the training loop and the export to ranks. Kept beside
learn_masks.py the way nanoGPT keeps model.py beside train.py.

Masked layer (frozen factors of decompose.py, k_max stored components):
  y = U diag(mask * sigma) (V^T S^-1) x + b          U (m, k_max), V^T S^-1 (k_max, n)
  r_l = k_hat_l (m + n) / (m n)                      differentiable kept ratio of layer l
  r_l >= 1  ->  y = W x + b                          ARA's dense switch (METHODS.md §3.3)
Gates (mask over the k_max components, k_hat = expected number kept):
  sigmoid       g = sigmoid((z + log u - log(1-u)) / tau), mask = 1[g > .5] + g - sg(g)   (§3.1)
  hardconcrete  z = clip(sigmoid((log u - log(1-u) + log a) / beta)(zeta - gamma) + gamma, 0, 1)   (§3.2)
  ara           pi = softmax(p), rho = pi.c, mask = 1[i < round(k_max rho)] + pi B - sg(pi B)   (§3.3)
  soco          mask = s = softplus(theta) (scores, may exceed 1), pruned by score order   (§3.4)
Loss (every gate): L = L_task + alpha_t (rho_hat - rho)^2 + beta L_guid, in two phases:
  explore (first 1 - --settle of the steps): alpha_t = alpha, rho_hat on min(r_l, 1) forward but
      unclamped backward (§3.7), so the budget also reaches dense layers and any layer can flip;
  settle (last --settle): which layers are dense is frozen, rho_hat counts dense layers as constants,
      and alpha_t grows geometrically to alpha * --alpha_growth (the cosine lr restarts), so the
      LOW-RANK layers close the gap under the task loss. A fixed alpha ends wherever the penalty balances the task gradient (ARA at
      80% kept ended 0.010 over; sigmoid 0.048), and the export then cuts every low-rank layer by one
      factor: the exported model is not the trained one. Growing alpha with the dense switch still
      live was measured to hurt (ARA 80%: ppl 34.49 fixed alpha, 40.80 x10, 41.42 x100): the pressure
      pushes dense layers across r = 1, where they lose half their spectrum at once. A Lagrange
      multiplier winds up while layers sit dense and then overshoots the budget far below the target.

A new method is one Gate subclass (mask, k_hat, order, scales; optionally plan / extra_terms /
on_stage / export for a schedule like SoCo's) registered in GATES, plus its flags in learn_masks.py.

Initialisation (--init): 'uniform' (default) starts every gate at the uniform allocation's rank k0;
'paper' is LLRC's logits 6 -> 3 (sigmoid; hard-concrete takes the same numbers as log alpha) and
SoCo's scores 1, which with k_max = 1.2 k* starts every layer past r = 1, i.e. dense; the
straight-through budget term pulls them back below 1. ARA's own init (E[rho] = target / 1.2, the
uniform allocation) is what ARA gets with either value.
"""
import math
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
from common import UserError


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


# ----------------------------------------------------------------------------- attach / helpers

def attach(model, factors, shapes, rho, args):
    """Swap every compressed linear for a MaskedLinear; gates start at the uniform allocation."""
    state = {"teacher": False, "train": True, "gen": None}
    k0 = common.uniform_ranks(shapes, rho)
    layers = {}
    for name, orig in common.find_linears(model).items():
        m, n = shapes[name]
        W = common.weight_matrix(orig)
        # float16 cannot hold V^T S^-1 (decompose.factor_dtype): a float16 layer's factors stay float32
        like = {"device": W.device, "dtype": torch.float32 if W.dtype == torch.float16 else W.dtype}
        # read one layer at a time (factors may be a lazy artifacts.Shards on the CPU) and stored once, in the
        # model's dtype on its layer's device (bf16 on a GPU): no per-call casts, no second copy
        U, VtSinv = factors[f"{name}.U"].to(**like), factors[f"{name}.VtSinv"].to(**like)
        sigma = factors[f"{name}.sigma"].to(like["device"])
        k = common.k_star(m, n) if k0[name] == "dense" else k0[name]
        gate = GATES[args.method](U.shape[1], min(k, U.shape[1]), args).to(U.device)
        layers[name] = MaskedLinear(orig, U, sigma, VtSinv, gate, state)
        common.set_module(model, name, layers[name])
    return layers


def draw_masks(layers, gens, seed):
    """Every layer's training mask for this step, drawn once, in forward order, before the forward: an
    activation-checkpointed block is recomputed in backward with the same Gumbel / concrete noise.
    gens: {device: generator}, one seeded stream per device the layers live on (--device_map)."""
    for l in layers.values():
        if l.dense:
            l.step_mask = None
            continue
        if l.U.device not in gens:  # a stream per device, seeded apart (cuda:1 must not repeat cuda:0's noise)
            gens[l.U.device] = torch.Generator(l.U.device).manual_seed(seed + 1009 * (l.U.device.index or 0))
        l.step_mask = l.gate.mask(True, gens[l.U.device])


def clear_masks(layers):
    for l in layers.values():
        l.step_mask = None


def checkpoint_blocks(model):
    """Activation checkpointing per decoder block: only each block's input is kept for backward, and the
    block is recomputed there (non-reentrant, so gradients reach the gates through the drawn masks)."""
    from torch.utils.checkpoint import checkpoint
    for block in common.decoder_blocks(model):
        def forward(*args, _f=block.forward, **kwargs):
            if not torch.is_grad_enabled():  # the teacher pass: nothing to save
                return _f(*args, **kwargs)
            return checkpoint(_f, *args, use_reentrant=False, **kwargs)
        block.forward = forward


def guidance_grid(sigma_full, m, n, points=101):
    """b_l(r) = sqrt(sum_{i>k(r)} sigma_i^2 / sum_i sigma_i^2), k(r) = floor(r m n / (m + n)), on
    r = 0, .01, .., 1, over the FULL spectrum (METHODS.md §3.3): the same numbers decompose.py prints."""
    s2 = sigma_full.double() ** 2
    tail = torch.cat([s2.flip(0).cumsum(0).flip(0), s2.new_zeros(1)])  # tail[k] = sum_{i>=k} sigma_i^2
    r = torch.linspace(0, 1, points, dtype=torch.float64)
    ks = torch.floor(r * m * n / (m + n) + 1e-9).long().clamp(max=len(s2))
    return (tail[ks] / s2.sum()).sqrt().float()


def guidance_loss(r, b_grid):
    """ARA: L_guid = (1/L) sum_l (1 - r_l) 1[r_l > 1 - b_l(r_l)]; zero at r = 1 (METHODS.md §3.3)."""
    idx = (r.detach().clamp(0, 1) * (b_grid.shape[1] - 1)).long()
    b = b_grid.gather(1, idx[:, None]).squeeze(1)
    active = ((r < 1) & (r > 1 - b)).float()  # saving 1 - r smaller than the error paid
    return ((1 - r) * active).mean()


def straight_through_min1(r):
    """Forward min(r, 1), backward as if unclamped (METHODS.md §3.7): a dense layer (r >= 1) still
    feels the budget, so an over-budget dense layer is pulled back instead of staying dense for good."""
    return r - (r - r.clamp(max=1)).detach()


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
    logits = model(ids, use_cache=False).logits.float()
    return math.exp(F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item())


def window_chunks(ids, length):
    """Cut every calibration window (N, T) into ceil(T / length) chunks (N * ceil(T / length), length),
    the last chunk ending at T, so every calibration token is seen, not only each window's start."""
    T = ids.shape[1]
    if length >= T:
        return ids
    starts = list(range(0, T - length + 1, length))
    if starts[-1] + length < T:
        starts.append(T - length)
    return torch.cat([ids[:, s:s + length] for s in starts])


def batch_indices(n_chunks, batch_size, gen):
    """Epochs over a seeded permutation of the chunk indices: every chunk once before any repeats."""
    while True:
        perm = torch.randperm(n_chunks, generator=gen)
        for i in range(0, len(perm) - batch_size + 1, batch_size):
            yield perm[i:i + batch_size]


def batches(chunks, batch_size, gen):
    for idx in batch_indices(len(chunks), batch_size, gen):
        yield chunks[idx]


class TeacherCache:
    """The teacher's logits per calibration chunk, on the CPU in their own dtype, once computed: on a schedule that
    revisits chunks (ARA: 10 epochs) every later visit skips the teacher forward. Exact: the same numbers
    a fresh teacher forward gives."""

    def __init__(self):
        self.logits = {}

    def get(self, idx):  # (B, T, V) or None unless every chunk of the batch is cached
        return torch.stack([self.logits[i] for i in idx]) if all(i in self.logits for i in idx) else None

    def put(self, idx, logits):  # in the logits' own dtype (bf16 on a GPU): exact, half of float32
        for i, row in zip(idx, logits.cpu()):
            self.logits[i] = row.clone()


def use_teacher_cache(args, n_chunks, vocab, itemsize=4):
    """--teacher_cache auto: only where it pays (KL loss, the steps revisit chunks) and fits
    --teacher_cache_gb of CPU memory (itemsize: bytes per logit, 2 in bf16); on / off force it (on still
    needs the KL loss). LLaMA-2-7B at 256 x 2048 calibration tokens: 31 GiB in bf16."""
    if args.loss != "kl" or args.teacher_cache == "off":
        return False
    revisits = args.steps * min(args.batch_size, n_chunks) > n_chunks
    fits = n_chunks * args.train_seqlen * vocab * itemsize <= args.teacher_cache_gb * 2 ** 30
    return args.teacher_cache == "on" or revisits and fits


# ----------------------------------------------------------------------------- training

def train(model, layers, ids, rho, args, device):
    """Minimise L_task + alpha_t (rho_hat - rho)^2 + beta L_guid (+ the gate class's schedule).
    Returns the record: per-step curve, r_l trajectories every --log_every steps, dense flips."""
    names = list(layers)
    gates = [layers[n].gate for n in names]
    cls = type(gates[0])
    base_lr = args.lr or cls.lr
    opt = torch.optim.AdamW([p for g in gates for p in g.parameters()], lr=base_lr, weight_decay=0.0)
    state = layers[names[0]].state
    state["gen"] = torch.Generator(device).manual_seed(args.seed)  # gate noise outside train()'s steps
    gens = {}  # gate noise of the training steps, per device (draw_masks)
    chunks = window_chunks(ids, args.train_seqlen)  # (C, train_seqlen)
    data = batch_indices(len(chunks), min(args.batch_size, len(chunks)), torch.Generator().manual_seed(args.seed))
    itemsize = next(model.parameters()).element_size()
    cache = TeacherCache() if use_teacher_cache(args, len(chunks), model.config.vocab_size, itemsize) else None
    shapes = {n: (layers[n].m, layers[n].n) for n in names}
    mn = torch.tensor([m * n for m, n in shapes.values()], dtype=torch.float32, device=device)
    b_grid = torch.stack([guidance_grid(layers[n].sigma_full, *shapes[n]) for n in names]).to(device)  # (L, 101)
    hidden = args.loss == "hidden_mse"
    record = {"curve": [], "trajectory": {"every": args.log_every, "step": [], "r": {n: [] for n in names}},
              "dense_flips": [], "teacher_cache": cache is not None, "teacher_forwards": 0}
    with torch.no_grad():  # the starting state is not a flip
        for n in names:
            layers[n].dense = layers[n].ratio().item() >= 1
    settle_len = max(1, round(args.settle * args.steps))
    settle_start = args.steps - settle_len if args.settle > 0 else args.steps
    bar = tqdm(range(args.steps), desc=f"learn {args.method}")
    for step in bar:
        plan = cls.plan(step, args)
        if plan["t"] == 0:
            before = {n: layers[n].dense for n in names}
            cls.on_stage(plan, layers, shapes, rho)  # a schedule may fix the dense flags (SoCo stage 3)
            record["dense_flips"] += [[step, n, "dense" if layers[n].dense else "low-rank"]
                                      for n in names if layers[n].dense != before[n]]
        t, T = plan["t"], plan["T"]
        if T == args.steps and step >= settle_start:  # one-stage schedule: the cosine restarts when settling
            t, T = step - settle_start, settle_len  # begins, else the low-rank gates cannot move far enough
        for group in opt.param_groups:  # cosine decay to zero within each stage: the gates settle
            group["lr"] = base_lr * 0.5 * (1 + math.cos(math.pi * t / T))
        r = torch.stack([layers[n].ratio().to(device) for n in names])  # (L,) differentiable r_l
        r_host = r.tolist()  # one host sync per step
        settling = step >= settle_start
        for n, rl in zip(names, r_host):
            if not settling and not layers[n].gate.frozen and (rl >= 1) != layers[n].dense:
                layers[n].dense = rl >= 1
                record["dense_flips"].append([step, n, "dense" if rl >= 1 else "low-rank"])
        if step % args.log_every == 0 or step == args.steps - 1:
            record["trajectory"]["step"].append(step)
            for n, rl in zip(names, r_host):
                record["trajectory"]["r"][n].append(round(rl, 4))
        if settling:  # dense layers count as constants: only the low-rank ones move toward the budget
            dense = torch.tensor([layers[n].dense for n in names], device=r.device)
            r_eff = torch.where(dense, torch.ones_like(r), r.clamp(max=1))
            alpha = args.alpha * args.alpha_growth ** min(1.0, (step - settle_start) / (0.8 * settle_len))
        else:
            r_eff, alpha = straight_through_min1(r), args.alpha
        rho_hat = (r_eff * mn).sum() / mn.sum()  # R_eff of ARA / METHODS.md §2
        terms = {}
        if plan["budget"]:
            terms["budget"] = alpha * (rho_hat - rho) ** 2
            terms["guid"] = args.guidance * guidance_loss(r, b_grid)
        terms.update(cls.extra_terms(gates, plan, args))
        if plan["task"]:
            idx = next(data)
            x = chunks[idx].to(common.input_device(model))  # (B, train_seqlen)
            t_out = None
            cached = None
            if args.loss != "ce":  # CE needs no teacher
                cached = cache.get(idx.tolist()) if cache else None
                if cached is None:
                    with torch.no_grad():
                        state["teacher"] = True  # the teacher: same weights, masks off
                        t_out = model(x, output_hidden_states=hidden, use_cache=False)
                        state["teacher"] = False
                    record["teacher_forwards"] += 1
                    if cache:
                        cache.put(idx.tolist(), t_out.logits)
            draw_masks(layers, gens, args.seed)
            s_out = model(x, output_hidden_states=hidden, use_cache=False)
            if cached is not None:  # on the student's logits' device (the last GPU under a device_map)
                t_out = SimpleNamespace(logits=cached.to(s_out.logits.device))
            terms["task"] = task_loss(args.loss, s_out, t_out, x, args.hidden_layers).to(device)
        loss = sum(terms.values())
        log = {"step": step, "stage": plan["stage"], "loss": loss.item(), "rho_hat": rho_hat.item(),
               "alpha": alpha, **{k: v.item() for k, v in terms.items()}}
        if not math.isfinite(log["loss"]):
            culprit = next((k for k in terms if not math.isfinite(log[k])), "loss")
            flag = {"budget": "--alpha", "guid": "--guidance", "sparsity": "--sparsity"}.get(culprit, "--lr")
            raise UserError(f"the {culprit} term of the loss became {log[culprit]} at step {step}: check {flag}")
        opt.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
            opt.step()
        clear_masks(layers)
        record["curve"].append({k: round(v, 6) if isinstance(v, float) else v for k, v in log.items()})
        bar.set_postfix(loss=f"{log['loss']:.4f}", rho=f"{log['rho_hat']:.3f}")
    state["train"] = False
    task_steps = sum(1 for c in record["curve"] if "task" in c)
    record["calibration_seen"] = round(min(1.0, task_steps * min(args.batch_size, len(chunks)) / len(chunks)), 4)
    return record


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
