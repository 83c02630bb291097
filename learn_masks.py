"""Stage 3: learn which whitened singular values to keep, per layer, under one global budget.
docs/METHODS.md §2-§3. The factors stay frozen; only a few numbers per component are trained, against the
original model, with no fine-tuning. This file is the training loop; each method is one file in methods/.

--keep rho is the KEPT fraction of the compressed linears: rho = sum_l c(k_l) / sum_l m_l n_l,
c(k) = min(k (m + n), m n) (docs/METHODS.md §2). Methods that train nothing:
  uniform       k_l = floor(rho m_l n_l / (m_l + n_l))                  (SVD-LLM; methods/closed_form.py)
  energy        Lagrangian on normalised whitened truncation energy     (§3.6; methods/closed_form.py)
  svdllm2       SVD-LLM V2's per-type heterogeneous ratios              (§3.6; methods/closed_form.py)
  strs          ASVD's sensitivity-based truncation rank search         (§3.5; methods/strs.py)
Learned methods, one gate per layer (methods/base.py: the masked layer, the Gate interface):
  sigmoid       Gumbel-sigmoid mask per component, straight-through     (LLRC; §3.1; methods/sigmoid.py)
  hardconcrete  hard-concrete L0 gates                                  (Louizos et al.; §3.2)
  ara           simplex/staircase mask + ARA's finalisation             (ARA; §3.3)
  soco          learned non-negative spectrum, score-ordered pruning    (SoCo; §3.4)
The learned methods, in the order this file runs them:
  attach     every compressed linear becomes y = U diag(mask * sigma) V^T S^-1 x, r_l = k_hat_l (m + n) / (m n)
             (methods/base.py: attach; draw_masks here before each step's forward)
  train      L = L_task + alpha_t (rho_hat - rho)^2 + beta L_guid (ARA, §3.3; a gate may add terms), L_task =
             KL(teacher || student) by default (--loss), the teacher the same model with masks off. Explore (first
             1 - --settle of the steps): ARA's dense switch (r_l >= 1 runs W) is live and rho_hat's min(r_l, 1) is
             straight-through, so the budget reaches dense layers too (§3.7); settle: a dense layer stays dense and
             counts as a constant (a low-rank one pushed to r_l >= 1 becomes dense), alpha_t grows geometrically to
             alpha * --alpha_growth and the cosine lr restarts, so training ends on its budget, every layer in the
             state it is exported in
  fix        ARA's finalisation fixes every layer: dense, or k components with the gate's test-time scales
  compensate (§3.8, --compensate N, after ANY method) trains only those scales on the task loss
  export     the fixed layers' ranks, kept subsets and scales: the model truncate.py builds

Writes RUN_DIR/allocation/: ranks.json ({"layers": {name: rank or "dense"}, kept_fraction_linear, method, flags,
the training and compensation curves, wall time}), components.safetensors where a layer keeps other than its
top-k prefix at scale 1 ({layer}.index (k,), {layer}.scale (k,)), manifest.json (decompose/ hash, method, seed, flags).

  python learn_masks.py --method ara --keep 0.8                  # 200 allocation + 100 compensation steps
  python learn_masks.py --method soco --keep 0.6                 # 200 + 250 (its own default)
  python learn_masks.py --method uniform --compensate 100        # SVD-LLM's allocation, compensated
"""
import argparse
import inspect
import math
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

import methods
from methods import closed_form, strs, sigmoid, hardconcrete, ara, soco  # noqa: F401  (each registers itself)
from methods import base
from methods.base import Gate, attach, export, fix_prefix, fix_trained, guidance_grid, guidance_loss, rho_hat_of
from plumbing import artifacts, cli, loading
from plumbing.cli import UserError


# ----------------------------------------------------------------------------- the loss

def task_loss(kind, student, teacher, x, hidden_layers):
    """L_task per token: KL(teacher || student) of the next-token distributions (default), next-token cross
    entropy on the calibration text (ARA's code; no teacher), or LLRC's hidden-state MSE."""
    if kind == "kl":  # KL(teacher || student) per token
        s = F.log_softmax(student.logits.float(), -1).flatten(0, 1)
        t = F.log_softmax(teacher.logits.to(student.logits.device).float(), -1).flatten(0, 1)  # cached on the CPU
        return F.kl_div(s, t, log_target=True, reduction="batchmean")
    if kind == "ce":
        return F.cross_entropy(student.logits[:, :-1].float().flatten(0, 1), x[:, 1:].flatten())
    return sum(F.mse_loss(student.hidden_states[i].float(), teacher.hidden_states[i].float())
               for i in hidden_layers) / len(hidden_layers)  # LLRC's hidden-state MSE


# ----------------------------------------------------------------------------- the batches and the teacher

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


def use_teacher_cache(mode, loss, steps, batch, n_chunks, seqlen, vocab, itemsize, gb):
    """--teacher_cache auto: only where it pays (KL loss, the steps revisit chunks) and the logits fit `gb` of CPU
    memory (itemsize: bytes per logit, 2 in bf16); on / off force it (on still needs the KL loss)."""
    if loss != "kl" or mode == "off":
        return False
    revisits = steps * min(batch, n_chunks) > n_chunks
    return mode == "on" or revisits and n_chunks * seqlen * vocab * itemsize <= gb * 2 ** 30


class Feed:
    """The calibration chunks in seeded epochs and the teacher's outputs on each batch (the same model with every
    gate off), its logits cached per chunk on the CPU where the steps revisit chunks: exact, the numbers a fresh
    teacher forward gives. Shared by the allocation and the compensation stage, so the second continues the
    first's epochs and cache."""

    def __init__(self, model, ids, args, steps):
        self.model, self.loss, self.hidden = model, args.loss, args.loss == "hidden_mse"
        self.chunks = window_chunks(ids, args.train_seqlen)  # (C, train_seqlen)
        self.batch = min(args.batch_size, len(self.chunks))
        self.order = batch_indices(len(self.chunks), self.batch, torch.Generator().manual_seed(args.seed))
        use = use_teacher_cache(args.teacher_cache, args.loss, steps, args.batch_size, len(self.chunks),
                                args.train_seqlen, model.config.vocab_size, next(model.parameters()).element_size(),
                                args.teacher_cache_gb)
        self.cache = {} if use else None  # chunk index -> the teacher's logits (T, V), in their own dtype
        self.record = {"teacher_cache": use, "teacher_forwards": 0, "task_steps": 0}

    def next(self, state):
        """The next batch x (B, train_seqlen) on the model's input device and the teacher's outputs on it (None
        for --loss ce). state: the masked layers' shared switch, on while the teacher runs."""
        idx = next(self.order).tolist()
        x = self.chunks[idx].to(loading.input_device(self.model))  # (B, train_seqlen)
        self.record["task_steps"] += 1
        if self.loss == "ce":
            return x, None
        if self.cache is not None and all(i in self.cache for i in idx):
            return x, SimpleNamespace(logits=torch.stack([self.cache[i] for i in idx]))
        with torch.no_grad():
            state["teacher"] = True  # the teacher: same weights, masks off
            t_out = self.model(x, output_hidden_states=self.hidden, use_cache=False)
            state["teacher"] = False
        self.record["teacher_forwards"] += 1
        if self.cache is not None:
            for i, row in zip(idx, t_out.logits.cpu()):
                self.cache[i] = row.clone()
        return x, t_out

    def seen(self):
        return round(min(1.0, self.record["task_steps"] * self.batch / len(self.chunks)), 4)


# ----------------------------------------------------------------------------- one training step

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
        # hard-concrete's zeros (Gate.skips_zeros): found once, so a checkpointed recomputation skips the same set
        l.step_index = l.step_mask.detach().nonzero().squeeze(1) if l.gate.skips_zeros else None


def clear_masks(layers):
    for l in layers.values():
        l.step_mask = l.step_index = None


def step_task_loss(model, layers, feed, gens, args, device):
    """One batch: the teacher's outputs (feed), this step's masks, the student's forward, L_task."""
    x, t_out = feed.next(next(iter(layers.values())).state)  # (B, train_seqlen)
    draw_masks(layers, gens, args.seed)
    s_out = model(x, output_hidden_states=args.loss == "hidden_mse", use_cache=False)
    return task_loss(args.loss, s_out, t_out, x, args.hidden_layers).to(device)


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


def cosine(opt, base_lr, t, T):
    for group in opt.param_groups:  # cosine decay to zero within each stage: the gates settle
        group["lr"] = base_lr * 0.5 * (1 + math.cos(math.pi * t / T))


def update_dense(layers, names, r_host, step, flips, settling=False):
    """ARA's dense switch: a layer runs W while r_l >= 1; each flip is recorded. Settling, the switch goes one way:
    a dense layer stays dense, and a low-rank layer pushed to r_l >= 1 becomes dense (the budget then counts it
    as dense), so no layer trains with more components than the export can keep (k* - 1, docs/METHODS.md §2)."""
    for n, rl in zip(names, r_host):
        if (rl >= 1) != layers[n].dense and not (settling and layers[n].dense):
            layers[n].dense = rl >= 1
            flips.append([step, n, "dense" if rl >= 1 else "low-rank"])


def loss_terms(plan, r, rho_hat, rho, alpha, beta, b_grid, gates):
    """The terms beside L_task: ARA's alpha (rho_hat - rho)^2 + beta L_guid (§3.3), for every gate, and the
    gate's own (SoCo's sparsity). r (L,) differentiable r_l, b_grid (L, 101) the guidance grids."""
    terms = {"budget": alpha * (rho_hat - rho) ** 2, "guid": beta * guidance_loss(r, b_grid)} if plan["budget"] else {}
    return {**terms, **type(gates[0]).extra_terms(gates, plan)}


def check_loss(log, terms, step, term_flags):
    """A loss that became NaN or inf: one line naming the term that did and the flag that sizes it."""
    if not math.isfinite(log["loss"]):
        culprit = next((k for k in terms if not math.isfinite(log[k])), "loss")
        raise UserError(f"the {culprit} term of the loss became {log[culprit]} at step {step}: check "
                        f"{term_flags.get(culprit, '--lr')}")


def train(model, layers, feed, rho, args, device):
    """Minimise L_task + alpha_t (rho_hat - rho)^2 + beta L_guid (+ the gate's own terms) over --steps.
    Returns the record (curve, r_l trajectories, dense flips); fix_trained then fixes the layers."""
    names = list(layers)
    gates = [layers[n].gate for n in names]
    cls = type(gates[0])  # every layer's gate is of the run's method, with the run's hyperparameters
    base_lr = args.lr or cls.lr
    opt = torch.optim.AdamW([p for g in gates for p in g.parameters()], lr=base_lr, weight_decay=0.0)
    gens = {}  # gate noise of the training steps, per device (draw_masks)
    mn = torch.tensor([layers[n].m * layers[n].n for n in names], dtype=torch.float32, device=device)  # (L,)
    b_grid = torch.stack([guidance_grid(l.sigma_full, l.m, l.n) for l in layers.values()]).to(device)  # (L, 101)
    trajectory = {"every": args.log_every, "step": [], "r": {n: [] for n in names}}  # r_l, for trajectory.png
    record = {"curve": [], "trajectory": trajectory, "dense_flips": []}
    with torch.no_grad():  # the starting state is not a flip
        for n in names:
            layers[n].dense = layers[n].ratio().item() >= 1
    for step in tqdm(range(args.steps), desc=f"learn {args.method}"):
        plan = gates[0].plan(step, args.steps)
        for g in gates:
            g.at_step(step, args.steps)
        t, T, settling, alpha = schedule(step, plan, args)
        cosine(opt, base_lr, t, T)
        r = torch.stack([layers[n].ratio().to(device) for n in names])  # (L,) differentiable r_l
        r_host = r.tolist()  # one host sync per step
        update_dense(layers, names, r_host, step, record["dense_flips"], settling)
        if step % args.log_every == 0 or step == args.steps - 1:
            trajectory["step"].append(step)
            for n, rl in zip(names, r_host):
                trajectory["r"][n].append(round(rl, 4))
        dense = torch.tensor([layers[n].dense for n in names], device=r.device) if settling else None
        rho_hat = rho_hat_of(r, mn, dense)
        terms = loss_terms(plan, r, rho_hat, rho, alpha, args.guidance, b_grid, gates)
        if plan["task"]:
            terms["task"] = step_task_loss(model, layers, feed, gens, args, device)
        loss = sum(terms.values())
        log = {"step": step, "stage": plan["stage"], "loss": loss.item(), "rho_hat": rho_hat.item(),
               "alpha": alpha, **{k: v.item() for k, v in terms.items()}}
        check_loss(log, terms, step, cls.term_flags)
        opt.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
            for g in [layers[n].gate for n in names if settling and layers[n].dense]:  # a frozen dense gate gets no
                g.zero_grad(set_to_none=True)  # step, not even AdamW's momentum (its dense flag is what the export reads)
            opt.step()
        clear_masks(layers)
        record["curve"].append({k: round(v, 6) if isinstance(v, float) else v for k, v in log.items()})
    return record


def compensate(model, layers, feed, args, device):
    """The compensation stage (§3.8; SoCo's last stage, for every allocation): on the fixed layers only each
    kept component's scale s_i = softplus(theta_i) trains, on the task loss; ranks and selection do not move,
    so the budget holds by construction and the exported model is the trained one."""
    params = [l.theta for l in layers.values() if not l.dense]
    if args.compensate == 0 or not params:
        return []
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.compensate_lr, weight_decay=0.0)
    curve = []
    for step in tqdm(range(args.compensate), desc="compensate"):
        cosine(opt, args.compensate_lr, step, args.compensate)
        loss = step_task_loss(model, layers, feed, {}, args, device)
        check_loss({"loss": loss.item(), "task": loss.item()}, {"task": loss}, step, {"task": "--compensate_lr"})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve.append({"step": step, "task": round(loss.item(), 6)})
    print(f"compensation: task loss {curve[0]['task']:.4f} -> {curve[-1]['task']:.4f} over {args.compensate} steps")
    return curve


# ----------------------------------------------------------------------------- the stage

def with_schedule(args):
    """The flags with --steps and --compensate filled where not given: the learned method's own (Gate.steps,
    .compensate); no compensation after a method that trains nothing, so --method uniform stays SVD-LLM's plain
    baseline. A new namespace: ranks.json and the manifest record the steps run."""
    gate = methods.GATES.get(args.method)
    steps = args.steps if args.steps is not None else (gate or Gate).steps
    comp = args.compensate if args.compensate is not None else gate.compensate if gate else 0
    return argparse.Namespace(**{**vars(args), "steps": steps, "compensate": comp})


def hyperparameters(fn, args):
    """A method's named hyperparameters: the keyword arguments of fn (a Gate's constructor, an allocator) that
    have a flag of the same name, filled from it."""
    return {k: getattr(args, k) for k, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty and hasattr(args, k)}


def load_inputs(args, whiten, decomp, needs_model):
    """What a method reads: the closed-form ones only the spectra; STRS, the learned ones and any method run
    with --compensate also the model (in its compute dtype), the calibration windows and the factors."""
    rerun = f"python decompose.py --run_dir {args.run_dir}"
    f = artifacts.Shards(args.run_dir, "decompose", rerun, decomp["shards"], shape=artifacts.factor_shape(decomp))
    inputs = {"sigmas": {name: f.get(f"{name}.sigma") for name in decomp["layers"]},
              "decompose_dir": f"{args.run_dir}/decompose"}
    if not needs_model:  # tokens counted, not read off the manifest
        return {**inputs, "tokens": artifacts.read_ids(args.run_dir, whiten).numel()}
    device = cli.pick_device(args.device)
    model = loading.load_model(whiten["model"], device, device_map=args.device_map)
    artifacts.check_model(model, whiten)  # in the model's own dtype, before any cast
    # bf16 on a GPU; on the CPU float32 for a half-precision model (cli.compute_dtype: half-precision matmuls are
    # slow there), and float16 is never used for the factors: its range cannot hold V^T S^-1, see decompose.py
    dtype = cli.DTYPES[args.dtype] or (torch.bfloat16 if device.type == "cuda" else
                                       cli.compute_dtype(model.dtype, device))
    if dtype is not None and not args.device_map:  # a dispatched model is not cast (check_dtype_placement)
        model.to(dtype)  # weights once in bf16 on a GPU; the gates stay float32
    if args.checkpointing == "on" or args.checkpointing == "auto" and device.type == "cuda":
        loading.checkpoint_blocks(model)
    if args.loss == "hidden_mse":  # hidden_states holds L + 1 tensors (embeddings first)
        L = model.config.num_hidden_layers  # read only here: a composite config has none at its top level
        if any(not -(L + 1) <= i <= L for i in args.hidden_layers):
            raise UserError(f"--hidden_layers {args.hidden_layers}: this model has hidden states 0..{L} (or -{L + 1}..-1)")
    model.requires_grad_(False)
    ids = artifacts.read_ids(args.run_dir, whiten, rows=model.get_input_embeddings().weight.shape[0])
    # factors: the same lazy CPU reader as the spectra; each layer's factors are read when attached
    return {**inputs, "tokens": ids.numel(), "model": model, "ids": ids, "factors": f, "device": device}


def attach_gates(model, factors, shapes, rho, args, start=None):
    """Every compressed linear masked, its gate (the method's, with its hyperparameters) starting at `start`
    ({name: rank or "dense"}), by default the uniform allocation."""
    cls = methods.GATES[args.method]
    hyper = hyperparameters(cls, args)
    k0 = start or base.uniform_ranks(shapes, rho)
    return attach(model, factors, k0, lambda k_max, k, sigma: cls(k_max, k, sigma, **hyper))


def allocate(shapes, rho, inputs, args):
    """(ranks, components or None, record): the allocation (learned or not), fixed, then compensated."""
    comp_steps = args.compensate
    if args.method in methods.GATES:
        model, energy = inputs["model"], methods.ALLOCATORS["energy"][0]
        # --init energy: the gates start at that closed-form allocation, else at the uniform one
        start = energy(shapes, rho, inputs, **hyperparameters(energy, args))[0] if args.init == "energy" else None
        layers = attach_gates(model, inputs["factors"], shapes, rho, args, start)
        feed = Feed(model, inputs["ids"], args, args.steps + comp_steps)
        record = train(model, layers, feed, rho, args, inputs["device"])
        curve = record["curve"]
        record["steps"], record["train_budget_gap"] = len(curve), round(curve[-1]["rho_hat"] - rho, 6)
        record.update(fix_trained(layers, shapes, rho))  # ARA's finalisation: every layer fixed
        print(f"training ended at rho_hat {curve[-1]['rho_hat']:.4f} (target {rho:.4f}); "
              f"{len(record['dense_flips'])} dense flips; export scale {record['export_scale']}")
    else:
        fn = methods.ALLOCATORS[args.method][0]
        ranks, components, record = fn(shapes, rho, inputs, **hyperparameters(fn, args))
        if comp_steps == 0:
            return ranks, components, record
        model = inputs["model"]
        layers = attach(model, inputs["factors"], ranks)
        fix_prefix(layers, ranks)
        feed = Feed(model, inputs["ids"], args, comp_steps)
    record["compensation_curve"] = compensate(model, layers, feed, args, inputs["device"])
    ranks, components = export(layers)
    record.update(feed.record, compensate=comp_steps, calibration_seen=feed.seen())
    return ranks, components, record


def check_args(args):
    """What the flags' types cannot check alone, before any work (one line and exit 2 otherwise)."""
    if args.method not in methods.names():
        raise UserError(f"unknown --method {args.method!r}; choose from {', '.join(methods.names())}")
    loading.check_dtype_placement(args.dtype, args.device_map)
    if args.method in methods.GATES:  # rules between a gate's flags (their ranges are the flags' types)
        cls = methods.GATES[args.method]
        cls.check(**hyperparameters(cls, args))


def main(args):
    args = with_schedule(args)  # before the checks, so ranks.json and the manifest record the steps run
    check_args(args)
    chain = artifacts.read_chain(args.run_dir, "whiten", "decompose", reads={"whiten": ("calib_ids.safetensors",)})
    whiten, decomp = chain["whiten"], chain["decompose"]
    shapes = {name: (v["m"], v["n"]) for name, v in decomp["layers"].items()}
    floor = sum(m + n for m, n in shapes.values()) / sum(m * n for m, n in shapes.values())
    if args.keep < floor:
        raise UserError(f"--keep {args.keep} is below {floor:.4f}, the cost of rank 1 in every layer; raise it")
    cli.set_seed(args.seed)
    t0 = time.time()
    if args.keep == 1:  # the original model, whatever the method (no gate has anything to learn)
        ranks, components, record = {name: "dense" for name in shapes}, None, {}
    else:
        needs_model = args.method in methods.GATES or methods.ALLOCATORS[args.method][1] or args.compensate > 0
        inputs = load_inputs(args, whiten, decomp, needs_model)
        ranks, components, record = allocate(shapes, args.keep, inputs, args)
    rho = base.kept_fraction(ranks, shapes)
    if rho > args.keep + 1e-12:  # every allocator meets the budget; an overshoot is a bug, never a result
        raise RuntimeError(f"{args.method} kept {rho:.6f} > --keep {args.keep}: the allocator broke the budget")
    dense = sum(r == "dense" for r in ranks.values())
    wall = round(time.time() - t0, 1)
    print(f"{args.method}: {base.kept_removed(rho)} of the compressed linears "
          f"(target kept {args.keep:.2%}); {dense}/{len(ranks)} layers dense; {wall}s")
    out = artifacts.stage_dir(args.run_dir, "allocation")
    if components:
        save_file(components, f"{out}/components.safetensors")
    allocation = {"method": args.method, "keep": args.keep, "kept_fraction_linear": rho, "layers": ranks,
                  "shapes": shapes, "components": bool(components), "flags": vars(args), "wall_time_s": wall,
                  **record}
    artifacts.write_json(f"{out}/ranks.json", allocation)
    artifacts.commit_stage(args.run_dir, "allocation", out, {
        "inputs": {"decompose": decomp["hash"]}, "method": args.method, "keep": args.keep,
        "seed": args.seed, "flags": vars(args), **cli.peak_gpu(cli.pick_device(args.device)),
        "wall_time_s": wall})


def parser():
    """The flags (a function, so a registered method's test can parse them in-process)."""
    p = cli.Parser(description=__doc__.split("\n")[0])
    add, lrs = p.add_argument, ", ".join(f"{name} {cls.lr:g}" for name, cls in methods.GATES.items())
    add("--method", default="uniform", help="|".join(methods.names()))
    add("--keep", type=cli.number(float, 0, 1, lo_open=True), default=0.8, help="KEPT fraction of the linears: 0.8 = 20%% removed")
    add("--loss", choices=["kl", "hidden_mse", "ce"], default="kl", help="KL to the original, LLRC's hidden MSE, ARA's CE")
    add("--hidden_layers", type=int, nargs="+", default=[-1], help="hidden states compared by hidden_mse")
    add("--steps", type=cli.COUNT, default=None, help="optimiser steps (default: the method's)")
    add("--batch_size", type=cli.COUNT, default=2, help="calibration chunks per step")
    add("--train_seqlen", type=cli.LENGTH, default=128, help="tokens per training chunk")
    add("--lr", type=cli.POSITIVE, default=None, help=f"AdamW lr of the gates (default: {lrs})")
    add("--alpha", type=cli.NONNEGATIVE, default=100.0, help="budget penalty alpha at the first step (ARA: 100)")
    add("--settle", type=cli.number(float, 0, 1), default=0.5, help="last fraction of the steps: dense fixed, alpha grows (0: ARA)")
    add("--alpha_growth", type=cli.POSITIVE, default=100.0, help="alpha grows to alpha * this while settling (1: ARA)")
    add("--guidance", type=cli.NONNEGATIVE, default=50.0, help="guidance weight beta (ARA: 50; 0: plain papers)")
    add("--init", choices=["uniform", "energy", "paper"], default="uniform", help="gates start at uniform's, energy's or the paper's state")
    add("--compensate", type=cli.number(int, 0), default=None, help="scale-only steps after the allocation (default: the method's)")
    add("--compensate_lr", type=cli.POSITIVE, default=0.02, help="AdamW learning rate of the compensation stage")
    add("--log_every", type=cli.COUNT, default=10, help="log r_l every N steps")
    add("--teacher_cache", choices=["auto", "on", "off"], default="auto", help="cache teacher logits on the CPU (auto: when revisited and fits)")
    add("--teacher_cache_gb", type=cli.NONNEGATIVE, default=16.0, help="CPU memory the teacher cache may use (auto)")
    add("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="frozen weights' dtype (auto: bf16 on GPU, fp32 on CPU)")
    add("--checkpointing", choices=["auto", "on", "off"], default="auto", help="activation checkpointing per block (auto: on GPU)")
    add("--device_map", choices=["auto"], default=None, help="auto: spread the model over every GPU")
    base.add_flags(p)  # each method's own flags (--tau, --beta_end, --soco_stages, --energy_norm, ...)
    add("--seed", type=cli.SEED, default=0, help="seed of every sampler (batches, Gumbel / concrete noise)")
    add("--run_dir", default="runs/default", help="folder holding every stage's artifacts")
    add("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda ...")
    return p


if __name__ == "__main__":
    cli.run_main(main, parser().parse_args())
