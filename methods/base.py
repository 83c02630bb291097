"""What every method builds on (docs/METHODS.md §2-§3): the budget arithmetic, and for the learned ones the
masked low-rank layer, the Gate interface a method implements and registers (one file per method beside this
one), ARA's guidance term, ARA's finalisation that fixes the selection, and the export of the fixed state. The
loop that trains them is learn_masks.py's. torch only: decompose.py and truncate.py read the budget here
without loading any method.

Budget (§2), for shapes {layer: (m, n)} and ranks {layer: k or "dense"}:
  c(k) = min(k (m + n), m n)      k* = floor(m n / (m + n))      rho = sum_l c(k_l) / sum_l m_l n_l

Masked layer (frozen factors of decompose.py, k_max stored components):
  y = U diag(mask * sigma) (V^T S^-1) x + b          U (m, k_max), V^T S^-1 (k_max, n)
  r_l = k_hat_l (m + n) / (m n)                      differentiable kept ratio of layer l
  r_l >= 1  ->  y = W x + b                          ARA's dense switch (§3.3)
  rho_hat = sum_l min(r_l, 1) m_l n_l / sum_l m_l n_l          the budget the loss sees (§3)
  L = L_task + alpha (rho_hat - rho)^2 + beta L_guid           ARA's loss, for every gate (§3.3)
After training, `fix_trained` runs ARA's finalisation (§3.3, `ara_ranks`) and FIXES every layer: dense, or a
set of components with one scale each (the gate's test-time value: 1 for the hard masks and annealed
hard-concrete, the test-time gate of hard-concrete at a fixed beta, SoCo's scores). The fixed layer computes
exactly what truncate.py builds; the compensation stage (§3.8, learn_masks.compensate) trains those scales;
`export` writes them.

A new method is one file in methods/ with one Gate subclass, registered with methods.register(name, cls): mask,
k_hat (and optionally order, scales, plan, extra_terms, flags, check, lr, steps, compensate); its constructor's
keyword arguments are its hyperparameters. The loop, the finalisation and the export are shared.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from plumbing.loading import find_linears, set_module, weight_matrix


# ----------------------------------------------------------------------------- the budget (docs/METHODS.md §2)

def k_star(m, n):
    """Break-even rank: past it the dense W is cheaper and exact (docs/METHODS.md §2)."""
    return (m * n) // (m + n)


def layer_cost(rank, m, n):
    """c(k) = min(k (m + n), m n); rank 'dense' costs m n."""
    return m * n if rank == "dense" else min(rank * (m + n), m * n)


def total_cost(ranks, shapes):
    """sum_l c(k_l): parameters of the compressed linears under `ranks`."""
    return sum(layer_cost(ranks[name], m, n) for name, (m, n) in shapes.items())


def kept_fraction(ranks, shapes):
    """rho = sum_l c(k_l) / sum_l m_l n_l over the compressed linears (docs/METHODS.md §2)."""
    return total_cost(ranks, shapes) / sum(m * n for m, n in shapes.values())


def fill_budget(ranks, shapes, rho, want=None, caps=None):
    """The budget left over by rounding, one component at a time, to the low-rank layer furthest below the
    count it wanted (largest remainder want_l - k_l, Hamilton's apportionment, docs/METHODS.md §2) that can
    still grow (below k* - 1 and caps_l) and fit. want: real-valued counts (uniform's rho m n / (m + n), a
    learned c k_hat); default every rank scaled by budget / cost."""
    limit, cost = rho * sum(m * n for m, n in shapes.values()), total_cost(ranks, shapes)
    left, scale = limit - cost, limit / max(cost, 1)
    want = want or {name: (0 if k == "dense" else k * scale) for name, k in ranks.items()}
    while True:
        grow = [name for name, (m, n) in shapes.items() if ranks[name] != "dense" and ranks[name] + 1 < k_star(m, n)
                and m + n <= left and (caps is None or ranks[name] + 1 <= caps[name])]
        if not grow:
            return ranks
        name = max(grow, key=lambda k: want[k] - ranks[k])  # max() keeps the first of equals: forward order
        ranks[name] += 1
        left -= sum(shapes[name])


def tail_energy(sigma):
    """tail[k] = sum_{i>=k} sigma_i^2 (k = 0 .. len), float64: the whitened loss of keeping rank k (docs/METHODS.md §1)."""
    s2 = sigma.double() ** 2
    return torch.cat([s2.flip(0).cumsum(0).flip(0), s2.new_zeros(1)])


def rank_at_fraction(r, m, n):
    """k(r) = floor(r m n / (m + n)): the rank that costs a fraction r of the dense layer (docs/METHODS.md §3.3)."""
    return int(r * m * n // (m + n))


def rank_or_dense(r, m, n):
    """The option that keeps at most the fraction r of an m x n layer: rank k(r) (at least 1) below
    break-even; past it, dense only when r >= 1 (dense costs m n > r m n otherwise), else rank k* - 1,
    so an allocation built from per-layer ratios never exceeds its budget (docs/METHODS.md §2)."""
    k = rank_at_fraction(r, m, n)
    if k < k_star(m, n):
        return max(k, 1)
    return "dense" if r >= 1 else max(k_star(m, n) - 1, 1)


def svdllm_ranks(shapes, rho):
    """SVD-LLM's allocation, its authors' rounding: k_l = int(m n rho / (m + n)) per layer (their
    num_s_after_trunc), at least 1; a rank that reaches k* (rho near 1) is k* - 1 below rho = 1 and dense at it,
    where dense is the cheaper exact layer (docs/METHODS.md §2)."""
    ranks = {}
    for name, (m, n) in shapes.items():
        k = int(m * n * rho / (m + n))
        ranks[name] = max(k, 1) if k < k_star(m, n) else "dense" if rho >= 1 else max(k_star(m, n) - 1, 1)
    return ranks


def uniform_ranks(shapes, rho):
    """SVD-LLM's allocation with the budget its rounding leaves handed out by the largest remainder (fill_budget):
    where the learned gates start, and --method uniform --uniform_fill (docs/METHODS.md §2)."""
    want = {name: rho * m * n / (m + n) for name, (m, n) in shapes.items()}
    return fill_budget(svdllm_ranks(shapes, rho), shapes, rho, want)


def kept_removed(rho):
    """Both conventions in one string, so nobody misreads a budget (docs/METHODS.md §2)."""
    return f"kept {100 * rho:.2f}% / removed {100 * (1 - rho):.2f}%"


# ----------------------------------------------------------------------------- the shared loss terms

def guidance_grid(sigma_full, m, n, points=101):
    """b_l(r) = sqrt(sum_{i>k(r)} sigma_i^2 / sum_i sigma_i^2), k(r) = floor(r m n / (m + n)), on
    r = 0, .01, .., 1, over the FULL spectrum (§3.3): the same numbers decompose.py prints."""
    tail = tail_energy(sigma_full)  # (min(m, n) + 1,), tail[0] = sum_i sigma_i^2
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


def rho_hat_of(r, mn, dense=None):
    """rho_hat = sum_l min(r_l, 1) m_l n_l / sum_l m_l n_l (§3; ARA's R_eff), r (L,), mn (L,) m_l n_l. dense (L,)
    in the settle phase: dense layers count 1 as constants; the low-rank ones (even past r = 1) move."""
    r_eff = straight_through_min1(r)
    if dense is not None:
        r_eff = torch.where(dense, torch.ones_like(r), r_eff)
    return (r_eff * mn).sum() / mn.sum()


# ----------------------------------------------------------------------------- gates

class Gate(nn.Module):
    """What every allocator implements (one subclass per method):
      mask(gen)  -> (k_max,)  this step's training multiplier of each stored component
      k_hat()    -> ()        differentiable expected number of kept components
      order()    -> (k_max,)  component indices, most wanted first: the export keeps the first k
      scales()   -> (k_max,) or None (all 1): each component's test-time multiplier, the scale it is
                              exported with (and where the compensation stage starts)
    The constructor takes (k_max, k0 the uniform rank, sigma (k_max,) the layer's whitened spectrum) and the
    method's hyperparameters as keyword arguments. Class-level defaults: lr, steps, compensate, flags."""
    lr = 0.1  # sized for ~200 CPU steps (the papers train thousands of steps at 1e-3: ARA, 2560)
    steps, compensate = 200, 100  # the schedule's defaults: a default run stays near ten minutes on 2 CPU cores
    skips_zeros = False  # True where a component whose drawn mask is exactly 0 gets no gradient from the
    # task loss (hard-concrete's clip): the layer then computes only the others, the same loss and gradients
    term_flags = {"budget": "--alpha", "guid": "--guidance", "task": "--lr"}  # the flag that sizes each term
    flags = {}  # this method's own flags for learn_masks.py's parser: {"--flag": add_argument's keywords}

    def order(self):
        return torch.arange(self.k_max, device=self.k_hat().device)  # prefix: largest sigma first

    def scales(self):
        return None

    def export_count(self):
        """The count the finalisation scales to the budget: k_hat, unless the gate's test-time model differs."""
        return self.k_hat().item()

    def at_step(self, step, steps):
        """Called on every gate at the top of each training step (e.g. a temperature schedule)."""

    @classmethod
    def check(cls, **hyper):
        """Refuse hyperparameters this method cannot honour (one line, UserError), before any work."""

    def plan(self, step, steps):
        """What runs at `step`: one stage, the task and budget terms every step, cosine lr over it."""
        return {"stage": 1, "task": True, "budget": True, "t": step, "T": steps}

    @staticmethod
    def extra_terms(gates, plan):
        """Loss terms of this method beside ARA's (task, budget, guidance), e.g. SoCo's sparsity: {name: tensor}."""
        return {}


def uniform_logits(k_max, k0):
    """Logits of a gate that starts at rank k0: +6 at i = 0 falling linearly through 0 at i = k0."""
    i = torch.arange(k_max, dtype=torch.float32)
    return 6 * (1 - i / max(k0, 1))


class MaskedLinear(nn.Module):
    """The original layer plus frozen whitened factors and a gate; one module serves every method.
    Two states: learning (the gate's mask, ARA's dense switch) and fixed (after `fix`: dense, or the
    components `index` with learned scales softplus(theta), the exported layer exactly)."""

    def __init__(self, orig, U, sigma, VtSinv, gate, state):
        super().__init__()
        self.orig, self.gate, self.state, self.dense = orig, gate, state, False
        self.step_mask = self.step_index = None  # this step's mask and, where the gate skips zeros, its nonzeros (draw_masks)
        self.index, self.theta = None, None  # the fixed selection (k,) and its scales' parameters (k,)
        self.register_buffer("U", U)  # (m, k_max)
        self.register_buffer("sigma", sigma[:U.shape[1]].float())  # (k_max,)
        self.register_buffer("sigma_full", sigma.double())  # (min(m, n),): ARA's b_l(r) needs all of it
        self.m, self.n = U.shape[0], VtSinv.shape[1]
        self.register_buffer("VtSinv", VtSinv)  # (k_max, n)

    @property
    def is_fixed(self):
        return self.index is not None or (self.dense and self.gate is None)

    def ratio(self):
        return self.gate.k_hat() * (self.m + self.n) / (self.m * self.n)  # r_l

    def fix(self, index, scale=None):
        """Dense (index None), or keep components index (k,) at scales (k,) (default 1) as theta = softplus^-1(s),
        so the compensation stage keeps every scale positive (§3.8)."""
        self.step_mask = self.step_index = None
        if self.is_fixed:
            raise RuntimeError("a MaskedLinear is fixed once: its factors now hold only the kept components")
        if index is None:
            self.dense, self.gate = True, None  # nothing left to learn in this layer
            self.U, self.VtSinv = self.U.new_empty(self.m, 0), self.VtSinv.new_empty(0, self.n)  # runs W: freed
            return
        s = torch.ones(len(index)) if scale is None else scale.detach().float().cpu()
        s = s.clamp(min=1e-4)  # a zero test-time gate would sit at softplus^-1(0) = -inf
        self.dense, self.index = False, index.to(self.U.device)
        self.theta = nn.Parameter((s + torch.log(-torch.expm1(-s))).to(self.U.device))
        # keep only the k kept components, gathered once: the buffers become the truncated layer's factors
        # (k_max - k components' memory freed; no gather per call in the compensation stage's forward)
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
        if self.index is not None:  # fixed: U, VtSinv, sigma hold only the k kept components (fix)
            s = self.scale() * self.sigma  # (k,)
        elif self.step_mask is not None:
            s = self.step_mask * self.sigma  # (k_max,)
            if self.step_index is not None:  # a gate whose zeros carry no gradient (Gate.skips_zeros): only
                i = self.step_index  # the components this step's mask keeps; the same loss and gradients
                V, U, s = V[i], U[:, i], s[i]
        else:
            raise RuntimeError("a learning MaskedLinear runs inside learn_masks.train; fix_trained fixes it")
        h = F.linear(x, V) * s.to(x.dtype)  # (..., components)
        return F.linear(h, U, None if bias is None else bias.to(h.dtype)).to(dtype)  # (..., m)


# ----------------------------------------------------------------------------- the registry

GATES = {}  # learned: name -> Gate subclass
ALLOCATORS = {}  # train nothing: name -> (allocate function, whether it needs the model, its flags)


def register(name, cls):
    """The one call that adds a learned method: learn_masks.py --method NAME trains `cls` (a Gate subclass).
    Its constructor's keyword arguments are its hyperparameters: each is filled from the flag of that name."""
    if not (isinstance(cls, type) and issubclass(cls, Gate)):
        raise TypeError(f"{cls!r} is not a methods.base.Gate subclass")
    GATES[name] = cls


def register_allocator(name, fn, needs_model=False, flags=None):
    """Add a method that trains nothing: learn_masks.py --method NAME calls fn(shapes, rho, inputs, **hyper),
    hyper being fn's keyword arguments that have a flag. flags: {"--flag": add_argument's keywords}, whose
    checked types (plumbing/cli.number) refuse bad values at parse time."""
    ALLOCATORS[name] = (fn, needs_model, flags or {})


def names():
    """Every --method: the allocations that train nothing, then the learned ones."""
    return [*ALLOCATORS, *GATES]


def add_flags(parser):
    """Every registered method's own flags on learn_masks.py's parser. A flag several methods declare (a subclass
    inherits its parent's) is added once, and only if they declare it alike: two meanings of one flag fail loudly."""
    added = {}
    every = [cls.flags for cls in GATES.values()] + [a[2] for a in ALLOCATORS.values()]
    for flags in every:
        for flag, keywords in flags.items():
            if flag not in added:
                parser.add_argument(flag, **keywords)
            elif added[flag] != keywords:
                raise TypeError(f"{flag} is declared by two methods with different keywords: rename one")
            added[flag] = keywords


# ----------------------------------------------------------------------------- attaching

def layer_factors(factors, name, W):
    """One layer's factors (U, sigma, V^T S^-1) on W's device in W's dtype, but float32 for float16, whose range
    cannot hold V^T S^-1 (decompose.factor_dtype)."""
    like = {"device": W.device, "dtype": torch.float32 if W.dtype == torch.float16 else W.dtype}
    U, VtSinv = factors[f"{name}.U"].to(**like), factors[f"{name}.VtSinv"].to(**like)
    return U, factors[f"{name}.sigma"].to(W.device), VtSinv


def attach(model, factors, k0, make_gate=None):
    """Swap every compressed linear for a MaskedLinear whose gate make_gate(k_max, k, sigma (k_max,)) starts at
    k0 ({name: rank or "dense"}; "dense" keeps all k_max > k* components, so r_l >= 1). make_gate None: no gate,
    the caller fixes the layers (fix_prefix)."""
    state = {"teacher": False}  # one switch shared by every layer: on, the model is the original (the teacher)
    layers = {}
    for name, orig in find_linears(model).items():
        U, sigma, VtSinv = layer_factors(factors, name, weight_matrix(orig))  # (m, k_max), (min(m, n),), (k_max, n)
        k_max = U.shape[1]
        k = k_max if k0[name] == "dense" else min(k0[name], k_max)
        gate = make_gate(k_max, k, sigma[:k_max]).to(U.device) if make_gate else None
        layers[name] = MaskedLinear(orig, U, sigma, VtSinv, gate, state)
        set_module(model, name, layers[name])
    return layers


# ----------------------------------------------------------------------------- finalisation and export

def ara_ranks(k_hat, shapes, rho, dense, caps=None):
    """ARA's finalisation (§3.3) of the trained counts k_hat_l. The layers training left `dense` stay dense unless
    they alone break the budget (the least-wanted give way); the others get round(c k_hat_l) in [1, min(k* - 1,
    caps_l)], one c meeting the budget, the rest by fill_budget against c k_hat_l. Returns (ranks, c)."""
    limit = rho * sum(m * n for m, n in shapes.values())
    r = {k: k_hat[k] * (m + n) / (m * n) for k, (m, n) in shapes.items()}
    dense = sorted((k for k in shapes if k in dense), key=lambda k: -r[k])
    low_floor = lambda d: sum(m * n if k in d else m + n for k, (m, n) in shapes.items())
    while dense and low_floor(set(dense)) > limit:
        dense.pop()
    top = {k: min(k_star(m, n) - 1, caps[k] if caps else m * n) for k, (m, n) in shapes.items()}
    ranks_at = lambda c: {k: "dense" if k in dense else max(1, min(int(c * k_hat[k] + 0.5), top[k])) for k in shapes}
    lo, hi = 0.0, 1.0
    c_max = 2 * max(top[k] / max(k_hat[k], 1e-9) for k in shapes)  # past it every rank is at its top
    while total_cost(ranks_at(hi), shapes) <= limit and hi < c_max:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total_cost(ranks_at(mid), shapes) <= limit else (lo, mid)
    want = {k: lo * k_hat[k] for k in shapes}
    c = 1.0 if ranks_at(lo) == ranks_at(1.0) else lo  # any c in between gives these ranks: the counts as trained
    return fill_budget(ranks_at(lo), shapes, rho, want, top), c


def fix_trained(layers, shapes, rho):
    """Finalise the trained gates and fix every layer: dense, or the first k of the gate's order() at its test-time
    scales (a scale-0 component is never kept: caps, Gate.export_count). Returns {"export_scale": c}."""
    with torch.no_grad():
        scales = {name: l.gate.scales() for name, l in layers.items()}
        caps = {name: layers[name].gate.k_max if s is None else int((s > 0).sum()) for name, s in scales.items()}
        k_hat = {name: l.gate.export_count() for name, l in layers.items()}
        ranks, c = ara_ranks(k_hat, shapes, rho, {name for name, l in layers.items() if l.dense}, caps)
        for name, l in layers.items():  # dense (index None), or the first k of the order at their scales
            idx = None if ranks[name] == "dense" else l.gate.order()[:ranks[name]].sort().values
            l.fix(idx, None if idx is None or scales[name] is None else scales[name][idx])
    return {"export_scale": round(c, 4)}


def fix_prefix(layers, ranks):
    """Fix every layer at a given allocation (an allocation that trained nothing): the top-k prefix, scale 1."""
    for name, l in layers.items():
        k = ranks[name]
        l.fix(None if k == "dense" else torch.arange(k))


def export(layers):
    """(ranks, components or None) from the fixed layers: exactly the model they compute. A layer that keeps
    other than its prefix, or scales other than 1, gets {layer}.index (k,) and {layer}.scale (k,)."""
    ranks, components = {}, {}
    for name, l in layers.items():
        ranks[name] = "dense" if l.dense else len(l.index)
        if l.dense:
            continue
        idx, scale = l.index.cpu(), l.scale().detach().float().cpu()
        if torch.equal(idx, torch.arange(len(idx))) and torch.equal(scale, torch.ones_like(scale)):
            continue  # the prefix at scale 1: truncate.py's default top-k
        components.update({f"{name}.index": idx.contiguous(), f"{name}.scale": scale.contiguous()})
    return ranks, components or None
