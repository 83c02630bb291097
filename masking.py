"""The training loops (docs/METHODS.md §3): attach a gated low-rank module to every compressed linear
(gates.py), train the gates against the original model (train), and, once gates.select has fixed the
allocation, train the kept components' scales (compensate, §3.8). Called by learn_masks.py; the way
nanoGPT's train.py drives model.py.

Loss (every gate; its class's `terms` may add more, e.g. SoCo's sparsity):
L = L_task + alpha_t (rho_hat - rho)^2 + beta L_guid, in two phases:
  explore (first 1 - --settle of the steps): alpha_t = alpha, rho_hat on min(r_l, 1) forward but
      unclamped backward (§3.7), so the budget also reaches dense layers and any layer can flip;
  settle (last --settle): which layers are dense is frozen, rho_hat counts dense layers as constants,
      and alpha_t grows geometrically to alpha * --alpha_growth (the cosine lr restarts), so the
      LOW-RANK layers close the gap under the task loss. A fixed alpha ends wherever the penalty balances
      the task gradient (ARA at 80% kept ended 0.010 over; sigmoid 0.048), and the export then cuts every
      low-rank layer by one factor: the exported model is not the trained one. Growing alpha with the
      dense switch still live was measured to hurt (ARA 80%: ppl 34.49 fixed alpha, 40.80 x10, 41.42
      x100): the pressure pushes dense layers across r = 1, where they lose half their spectrum at once.
      A Lagrange multiplier winds up while layers sit dense and then overshoots the budget far below
      the target.
The teacher is the same model with every gate off (the original layers); its logits may be cached per
calibration chunk (TeacherCache). Every calibration token is reachable: windows are cut into chunks and
the steps walk seeded epochs over them.
"""
import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
import loading
from common import UserError
from gates import GATES, MaskedLinear, guidance_grid, straight_through_min1


# ----------------------------------------------------------------------------- attach / helpers

def attach(model, factors, shapes, rho, args, learn=True, start=None):
    """Swap every compressed linear for a MaskedLinear; gates (learn=True) start at the allocation `start`
    ({name: rank or "dense"}; default the uniform one). A "dense" start keeps every stored component (k_max
    >= 1.2 k*, so r_l >= 1: the layer starts on ARA's dense switch). learn=False attaches no gate: the caller
    fixes the layers at an allocation (gates.fix_ranks)."""
    state = {"teacher": False}
    k0 = start or common.uniform_ranks(shapes, rho)
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
        k = U.shape[1] if k0[name] == "dense" else k0[name]  # (uniform is never dense below rho = 1)
        gate = None
        if learn:
            gate = GATES[args.method](U.shape[1], min(k, U.shape[1]), sigma[:U.shape[1]], args).to(U.device)
        layers[name] = MaskedLinear(orig, U, sigma, VtSinv, gate, state)
        common.set_module(model, name, layers[name])
    return layers


def draw_masks(layers, gens, seed):
    """Every learning layer's training mask for this step, drawn once, in forward order, before the forward:
    an activation-checkpointed block is recomputed in backward with the same Gumbel / concrete noise.
    gens: {device: generator}, one seeded stream per device the layers live on (--device_map)."""
    for l in layers.values():
        if l.dense or l.index is not None:  # dense, or fixed (its mask is its scales)
            l.step_mask = l.step_index = None
            continue
        if l.U.device not in gens:  # a stream per device, seeded apart (cuda:1 must not repeat cuda:0's noise)
            gens[l.U.device] = torch.Generator(l.U.device).manual_seed(seed + 1009 * (l.U.device.index or 0))
        l.step_mask = l.gate.mask(gens[l.U.device])
        # a gate that skips zeros (hard-concrete): the components clipped to 0 this step are skipped (no output,
        # no gradient), found once here so a checkpointed block's recomputation uses the same set
        l.step_index = l.step_mask.detach().nonzero().squeeze(1) if l.gate.skips_zeros else None


def clear_masks(layers):
    for l in layers.values():
        l.step_mask = l.step_index = None


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

def schedule(step, plan, args):
    """(t, T, settling, alpha_t) at `step`: the cosine lr's position t of T within its stage, whether the
    settle phase has begun, and the budget weight (geometric growth to alpha * --alpha_growth while settling)."""
    settle_len = max(1, round(args.settle * args.steps))
    settle_start = args.steps - settle_len if args.settle > 0 else args.steps
    t, T = plan["t"], plan["T"]
    if T == args.steps and step >= settle_start:  # one-stage schedule: the cosine restarts when settling
        t, T = step - settle_start, settle_len  # begins, else the low-rank gates cannot move far enough
    if step < settle_start:
        return t, T, False, args.alpha
    return t, T, True, args.alpha * args.alpha_growth ** min(1.0, (step - settle_start) / (0.8 * settle_len))


def rho_hat_of(r, mn, dense=None):
    """rho_hat = sum_l min(r_l, 1) m_l n_l / sum_l m_l n_l (docs/METHODS.md §2; R_eff of ARA). r (L,) differentiable
    r_l, mn (L,) m_l n_l. dense (L,) bool in the settle phase: dense layers count as constants, so only the
    low-rank ones move toward the budget; else the straight-through clamp reaches every layer."""
    if dense is not None:
        r_eff = torch.where(dense, torch.ones_like(r), r.clamp(max=1))
    else:
        r_eff = straight_through_min1(r)
    return (r_eff * mn).sum() / mn.sum()


def teacher_outputs(model, x, idx, cache, state, args, record):
    """The teacher's outputs on chunk batch x (B, T) (None for --loss ce): from the cache where every chunk
    of the batch is in it (logits only), else one forward with the gates off."""
    if args.loss == "ce":
        return None
    cached = cache.get(idx) if cache else None
    if cached is not None:
        return SimpleNamespace(logits=cached)
    with torch.no_grad():
        state["teacher"] = True  # the teacher: same weights, masks off
        out = model(x, output_hidden_states=args.loss == "hidden_mse", use_cache=False)
        state["teacher"] = False
    record["teacher_forwards"] += 1
    if cache:
        cache.put(idx, out.logits)
    return out


def update_dense(layers, names, r_host, step, record):
    """ARA's dense switch, outside the settle phase: a layer runs W while r_l >= 1; each flip is recorded."""
    for n, rl in zip(names, r_host):
        if (rl >= 1) != layers[n].dense:
            layers[n].dense = rl >= 1
            record["dense_flips"].append([step, n, "dense" if rl >= 1 else "low-rank"])


def check_finite(log, terms, step, term_flags):
    if not math.isfinite(log["loss"]):
        culprit = next((k for k in terms if not math.isfinite(log[k])), "loss")
        flag = term_flags.get(culprit, "--lr")
        raise UserError(f"the {culprit} term of the loss became {log[culprit]} at step {step}: check {flag}")


class Feed:
    """The calibration chunks, the seeded batch order and the teacher (cached where it pays), shared by the
    allocation and the compensation stage, so the second continues the first's epochs and cache."""

    def __init__(self, model, ids, args, steps):
        self.model, self.args = model, args
        self.chunks = window_chunks(ids, args.train_seqlen)  # (C, train_seqlen)
        self.batch = min(args.batch_size, len(self.chunks))
        self.order = batch_indices(len(self.chunks), self.batch, torch.Generator().manual_seed(args.seed))
        itemsize = next(model.parameters()).element_size()
        probe = SimpleNamespace(**{**vars(args), "steps": steps})
        use = use_teacher_cache(probe, len(self.chunks), model.config.vocab_size, itemsize)
        self.cache = TeacherCache() if use else None
        self.record = {"teacher_cache": use, "teacher_forwards": 0, "task_steps": 0}

    def task_loss(self, state, layers, gens, device):
        """One batch: the teacher's outputs, this step's masks, the student's forward, L_task."""
        idx = next(self.order)
        x = self.chunks[idx].to(loading.input_device(self.model))  # (B, train_seqlen)
        t_out = teacher_outputs(self.model, x, idx.tolist(), self.cache, state, self.args, self.record)
        draw_masks(layers, gens, self.args.seed)
        s_out = self.model(x, output_hidden_states=self.args.loss == "hidden_mse", use_cache=False)
        if t_out is not None and t_out.logits.device != s_out.logits.device:  # cached on the CPU; the
            t_out = SimpleNamespace(logits=t_out.logits.to(s_out.logits.device))  # last GPU under device_map
        self.record["task_steps"] += 1
        return task_loss(self.args.loss, s_out, t_out, x, self.args.hidden_layers).to(device)

    def seen(self):
        return round(min(1.0, self.record["task_steps"] * self.batch / len(self.chunks)), 4)


def cosine(opt, base_lr, t, T):
    for group in opt.param_groups:  # cosine decay to zero within each stage: the gates settle
        group["lr"] = base_lr * 0.5 * (1 + math.cos(math.pi * t / T))


def train(model, layers, feed, rho, args, device):
    """Minimise L_task + the gate class's terms (default alpha_t (rho_hat - rho)^2 + beta L_guid) over
    --steps. Returns the record: per-step curve, r_l trajectories every --log_every steps, dense flips.
    The layers are left in their learning state; gates.select fixes them."""
    names = list(layers)
    gates = [layers[n].gate for n in names]
    cls = type(gates[0])
    base_lr = args.lr or cls.lr
    opt = torch.optim.AdamW([p for g in gates for p in g.parameters()], lr=base_lr, weight_decay=0.0)
    state, gens = layers[names[0]].state, {}  # gate noise of the training steps, per device (draw_masks)
    shapes = {n: (layers[n].m, layers[n].n) for n in names}
    mn = torch.tensor([m * n for m, n in shapes.values()], dtype=torch.float32, device=device)  # (L,)
    b_grid = torch.stack([guidance_grid(layers[n].sigma_full, *shapes[n]) for n in names]).to(device)  # (L, 101)
    record = {"curve": [], "trajectory": {"every": args.log_every, "step": [], "r": {n: [] for n in names}},
              "dense_flips": []}
    with torch.no_grad():  # the starting state is not a flip
        for n in names:
            layers[n].dense = layers[n].ratio().item() >= 1
    for step in tqdm(range(args.steps), desc=f"learn {args.method}"):
        plan = cls.plan(step, args)
        for g in gates:
            g.at_step(step, args)
        t, T, settling, alpha = schedule(step, plan, args)
        cosine(opt, base_lr, t, T)
        r = torch.stack([layers[n].ratio().to(device) for n in names])  # (L,) differentiable r_l
        r_host = r.tolist()  # one host sync per step
        if not settling:
            update_dense(layers, names, r_host, step, record)
        if step % args.log_every == 0 or step == args.steps - 1:
            record["trajectory"]["step"].append(step)
            for n, rl in zip(names, r_host):
                record["trajectory"]["r"][n].append(round(rl, 4))
        dense = torch.tensor([layers[n].dense for n in names], device=r.device) if settling else None
        ctx = SimpleNamespace(r=r, rho_hat=rho_hat_of(r, mn, dense), rho=rho, alpha=alpha, b_grid=b_grid,
                              gates=gates)
        terms = cls.terms(ctx, plan, args)
        if plan["task"]:
            terms["task"] = feed.task_loss(state, layers, gens, device)
        loss = sum(terms.values())
        log = {"step": step, "stage": plan["stage"], "loss": loss.item(), "rho_hat": ctx.rho_hat.item(),
               "alpha": alpha, **{k: v.item() for k, v in terms.items()}}
        check_finite(log, terms, step, cls.term_flags)
        opt.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
            if settling:  # a frozen dense layer's gate gets zero gradients: None, so AdamW's momentum
                for n in names:  # does not keep moving it (its dense flag is what the export reads)
                    if layers[n].dense:
                        for p in layers[n].gate.parameters():
                            p.grad = None
            opt.step()
        clear_masks(layers)
        record["curve"].append({k: round(v, 6) if isinstance(v, float) else v for k, v in log.items()})
    return record


def compensate(model, layers, feed, args, device):
    """The compensation stage (docs/METHODS.md §3.8; SoCo's last stage, for every allocation): the layers are
    fixed (gates.select or gates.fix_ranks); only each kept component's scale s_i = softplus(theta_i) trains,
    on the task loss, for --compensate steps at --compensate_lr (cosine). Ranks, selection and dense flags
    do not move, so the budget holds by construction and the exported model is the trained one."""
    params = [l.theta for l in layers.values() if not l.dense]
    if args.compensate == 0 or not params:
        return []
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.compensate_lr, weight_decay=0.0)
    state, curve = next(iter(layers.values())).state, []
    for step in tqdm(range(args.compensate), desc="compensate"):
        cosine(opt, args.compensate_lr, step, args.compensate)
        loss = feed.task_loss(state, layers, {}, device)
        check_finite({"loss": loss.item(), "task": loss.item()}, {"task": loss}, step, {"task": "--compensate_lr"})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve.append({"step": step, "task": round(loss.item(), 6)})
    return curve
