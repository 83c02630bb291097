"""Stage 3: learn which whitened singular values to keep, per layer, under one global budget
(docs/METHODS.md §2-§3). The factors stay frozen; only a few numbers per component are trained, against
the original model, with no fine-tuning.

--keep rho is the KEPT fraction of the compressed linears: rho = sum_l c(k_l) / sum_l m_l n_l,
c(k) = min(k (m + n), m n) (docs/METHODS.md §2). Methods that train nothing (baselines.py):
  uniform       k_l = floor(rho m_l n_l / (m_l + n_l))                       (SVD-LLM; §2)
  energy        Lagrangian on normalised whitened truncation energy          (§3.6)
  svdllm2       SVD-LLM V2's per-type heterogeneous ratios                   (§3.6)
  strs          ASVD's sensitivity-based truncation rank search              (§3.5)
Learned methods:
  sigmoid       Gumbel-sigmoid mask per component, straight-through        (LLRC; §3.1)
  hardconcrete  hard-concrete L0 gates                                       (Louizos et al.; §3.2)
  ara           simplex/staircase mask + ARA's finalisation                  (ARA; §3.3)
  soco          learned non-negative spectrum, score-ordered pruning        (SoCo; §3.4)
Every learned method trains one masked low-rank module per layer (gates.py; the loop: masking.py):
  y = U diag(mask * sigma) V^T S^-1 x,   r_l = k_hat_l (m + n) / (m n),   r_l >= 1 -> dense W
  L = L_task + alpha (rho_hat - rho)^2 + beta L_guid                         (ARA Eq. of §3.3)
with L_task = KL(teacher || student) by default; the teacher is the same model with masks off.
Then ARA's finalisation fixes every layer (gates.select: dense, or k components with the gate's
test-time scales), and the compensation stage (§3.8, --compensate N, after ANY method) trains only
those scales on the task loss: the model it ends with is exactly the one truncate.py builds.

Writes RUN_DIR/allocation/:
  ranks.json                {"layers": {name: rank or "dense"}, kept_fraction_linear, method, flags,
                            training and compensation curves, wall time}
  components.safetensors    where a layer keeps other than its top-k prefix or scales other than 1 (a
                            learned subset, hard-concrete's test-time gates, SoCo's scores, compensated
                            scales): {layer}.index (k,), {layer}.scale (k,)
  manifest.json             decompose/ hash, method, seed, flags

  python learn_masks.py --method ara --keep 0.8                  # 200 allocation + 100 compensation steps
  python learn_masks.py --method uniform --compensate 100        # SVD-LLM's allocation, compensated
"""
import time

import torch
from safetensors.torch import save_file

import artifacts
import baselines
import common
import gates
import loading
import masking
import plots
from common import UserError


# ----------------------------------------------------------------------------- methods

def methods():
    """Every --method: the allocations that train nothing (baselines.py), then the registered gates."""
    return [*baselines.ALLOCATORS, *gates.GATES]


def needs_model(args):
    return args.method in gates.GATES or baselines.ALLOCATORS[args.method][1] or compensate_steps(args) > 0


def compensate_steps(args):
    """--compensate, default 100 after a learned method and 0 after one that trains nothing (so
    --method uniform stays SVD-LLM's plain baseline unless asked). 100, not 200: 200 + 200 steps took 575-1202 s
    of this stage on the 2-core CPU for ARA, sigmoid and hard-concrete, 200 + 100 took 457-560 s (docs/RESULTS.md)."""
    if args.compensate is not None:
        return args.compensate
    return 100 if args.method in gates.GATES else 0


def allocate(shapes, rho, ctx, args):
    """(ranks, components or None, record): the allocation (learned or not), fixed, then compensated."""
    steps = args.compensate
    if args.method in gates.GATES:
        model = ctx["model"]
        start = None  # --init uniform / paper: the gates' own init at the uniform ranks
        if args.init == "energy":  # the gates start at that closed-form allocation
            start = baselines.ALLOCATORS["energy"][0](shapes, rho, ctx, args)[0]
        layers = masking.attach(model, ctx["factors"], shapes, rho, args, start=start)
        feed = masking.Feed(model, ctx["ids"], args, args.steps + steps)
        record = masking.train(model, layers, feed, rho, args, ctx["device"])
        curve = record["curve"]
        record["steps"], record["train_budget_gap"] = len(curve), round(curve[-1]["rho_hat"] - rho, 6)
        record.update(gates.select(layers, shapes, rho))  # ARA's finalisation: every layer fixed
        print(f"training ended at rho_hat {curve[-1]['rho_hat']:.4f} (target {rho:.4f}); "
              f"{len(record['dense_flips'])} dense flips; export scale {record['export_scale']}")
    else:
        fn, _ = baselines.ALLOCATORS[args.method]
        ranks, components, record = fn(shapes, rho, ctx, args)
        if steps == 0:
            return ranks, components, record
        model = ctx["model"]
        layers = masking.attach(model, ctx["factors"], shapes, rho, args, learn=False)
        gates.fix_ranks(layers, ranks)
        feed = masking.Feed(model, ctx["ids"], args, steps)
    record["compensation_curve"] = masking.compensate(model, layers, feed, args, ctx["device"])
    if steps:
        c = record["compensation_curve"]
        print(f"compensation: task loss {c[0]['task']:.4f} -> {c[-1]['task']:.4f} over {steps} steps")
    ranks, components = gates.export(layers)
    record.update(feed.record, compensate=steps, calibration_seen=feed.seen())
    return ranks, components, record


# ----------------------------------------------------------------------------- main

def load_context(args, run_dir, whiten, decomp):
    """What a method reads: the closed-form ones only the spectra; STRS and the learned ones also
    the model, the calibration windows and the factors."""
    rerun = f"python decompose.py --run_dir {run_dir}"
    f = artifacts.Shards(run_dir, "decompose", rerun, decomp["shards"], shape=artifacts.factor_shapes(decomp))
    sigmas = {name: f.get(f"{name}.sigma") for name in decomp["layers"]}
    ctx = {"sigmas": sigmas, "tokens": whiten["nsamples"] * whiten["seqlen"]}
    if not needs_model(args):
        return ctx
    device = common.pick_device(args.device)
    model, _ = loading.load_model(whiten["model"], device, device_map=args.device_map)
    artifacts.check_model(model, whiten)  # in the model's own dtype, before any cast
    # bf16 on a GPU; on the CPU float32 for a half-precision model (common.compute_dtype: ~10x faster there, and
    # float16 is never used for the factors: its range cannot hold V^T S^-1, see decompose.py)
    dtype = common.DTYPES[args.dtype] or (torch.bfloat16 if device.type == "cuda" else
                                          common.compute_dtype(model.dtype, device))
    if dtype is not None and not args.device_map:  # a dispatched model is not cast (check_dtype_placement)
        model.to(dtype)  # weights once in bf16 on a GPU; the gates stay float32
    if args.checkpointing == "on" or args.checkpointing == "auto" and device.type == "cuda":
        masking.checkpoint_blocks(model)
    if args.loss == "hidden_mse":
        L = model.config.num_hidden_layers  # hidden_states holds L + 1 tensors (embeddings first)
        if any(not -(L + 1) <= i <= L for i in args.hidden_layers):
            raise UserError(f"--hidden_layers {args.hidden_layers}: this model has hidden states 0..{L} "
                            f"(or -{L + 1}..-1)")
    for p in model.parameters():
        p.requires_grad_(False)
    ids = artifacts.read_ids(run_dir, whiten, model.config.vocab_size)
    # factors: the same lazy CPU reader as the spectra; each layer's factors are read when attached
    return {**ctx, "model": model, "ids": ids, "factors": f, "device": device}


def check_args(args):
    """Every flag in range before any work (one line and exit 2 otherwise)."""
    if not 0 < args.keep <= 1:
        raise UserError(f"--keep {args.keep} is outside (0, 1]: it is the KEPT fraction, e.g. 0.8 = 20% removed")
    if args.method not in methods():
        raise UserError(f"unknown --method {args.method!r}; choose from {', '.join(methods())}")
    if args.method in gates.GATES:
        gates.GATES[args.method].check_args(args)
    common.check_flags(args, steps=(1, None), batch_size=(1, None), train_seqlen=(2, None), lr=((">", 0), None),
                       alpha=(0, None), alpha_growth=((">", 0), None), guidance=(0, None), tau=((">", 0), None),
                       sparsity=(0, None), log_every=(1, None), energy_power=((">", 0), None),
                       strs_samples=(1, None), strs_seqlen=(2, None), seed=(0, 2**32 - 1), soco_stages=(0, 1),
                       teacher_cache_gb=(0, None),
                       settle=(0, 1), compensate=(0, None), compensate_lr=((">", 0), None))
    loading.check_dtype_placement(args.dtype, args.device_map)
    if abs(sum(args.soco_stages) - 1) > 1e-6:
        raise UserError(f"--soco_stages {' '.join(map(str, args.soco_stages))} sum to {sum(args.soco_stages):g}: "
                        "they are fractions of --steps and must sum to 1 (the third stage is --compensate)")


def main(args):
    check_args(args)
    args.compensate = compensate_steps(args)  # resolved, so ranks.json and the manifest record the steps run
    whiten = artifacts.read_manifest(args.run_dir, "whiten", "python whiten.py", reads=("calib_ids.safetensors",))
    decomp = artifacts.read_manifest(args.run_dir, "decompose", "python decompose.py")
    artifacts.check_parent(decomp, whiten, args.run_dir, "python decompose.py")
    shapes = {name: (v["m"], v["n"]) for name, v in decomp["layers"].items()}
    floor = sum(m + n for m, n in shapes.values()) / sum(m * n for m, n in shapes.values())
    if args.keep < floor:
        raise UserError(f"--keep {args.keep} is below {floor:.4f}, the cost of rank 1 in every layer; raise it")
    common.set_seed(args.seed)
    t0 = time.time()
    if args.keep == 1:  # the original model, whatever the method (no gate has anything to learn)
        ranks, components, record = {name: "dense" for name in shapes}, None, {}
    else:
        ctx = load_context(args, args.run_dir, whiten, decomp)
        ranks, components, record = allocate(shapes, args.keep, ctx, args)
    rho = common.kept_fraction(ranks, shapes)
    if rho > args.keep + 1e-12:  # every allocator meets the budget; an overshoot is a bug, never a result
        raise RuntimeError(f"{args.method} kept {rho:.6f} > --keep {args.keep}: the allocator broke the budget")
    dense = sum(r == "dense" for r in ranks.values())
    wall = round(time.time() - t0, 1)
    print(f"{args.method}: {common.kept_removed(rho)} of the compressed linears "
          f"(target kept {args.keep:.2%}); {dense}/{len(ranks)} layers dense; {wall}s")
    out = artifacts.stage_dir(args.run_dir, "allocation")
    if components:
        save_file(components, f"{out}/components.safetensors")
    allocation = {"method": args.method, "keep": args.keep, "kept_fraction_linear": rho, "layers": ranks,
                  "shapes": shapes, "components": bool(components), "flags": vars(args), "wall_time_s": wall,
                  **record}
    artifacts.write_json(f"{out}/ranks.json", allocation)
    plots.write_allocation_plots(allocation, out)
    artifacts.commit_stage(args.run_dir, "allocation", out, {
        "inputs": {"decompose": decomp["hash"]}, "method": args.method, "keep": args.keep,
        "seed": args.seed, "flags": vars(args), **common.peak_gpu(common.pick_device(args.device)),
        "wall_time_s": wall})


def parser():
    """The flags (a function, so a registered method's test can parse them in-process)."""
    p = common.Parser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="uniform", help="|".join(methods()) + " (or one registered with gates.register)")
    p.add_argument("--keep", type=float, default=0.8, help="KEPT fraction of the compressed linears, in (0, 1]")
    p.add_argument("--loss", choices=["kl", "hidden_mse", "ce"], default="kl",
                   help="task loss: KL to the original model, hidden-state MSE (LLRC), next-token CE (ARA code)")
    p.add_argument("--hidden_layers", type=int, nargs="+", default=[-1], help="hidden states compared by hidden_mse")
    p.add_argument("--steps", type=int, default=200, help="optimiser steps (cosine-decayed learning rate)")
    p.add_argument("--batch_size", type=int, default=2, help="calibration chunks per step")
    p.add_argument("--train_seqlen", type=int, default=128,
                   help="tokens per training chunk: every calibration window is cut into chunks and the steps walk "
                   "seeded epochs over all of them (ranks.json records the fraction seen)")
    lrs = ", ".join(f"{name} {cls.lr:g}" for name, cls in gates.GATES.items())
    p.add_argument("--lr", type=float, default=None, help=f"AdamW learning rate of the gates (default per method: {lrs})")
    p.add_argument("--alpha", type=float, default=100.0, help="budget penalty alpha at the first step (ARA: 100)")
    p.add_argument("--settle", type=float, default=0.5,
                   help="fraction of the steps at the end in which the dense layers are fixed and alpha grows, so "
                   "training ends on its budget (0 = ARA's single phase)")
    p.add_argument("--alpha_growth", type=float, default=100.0,
                   help="alpha grows geometrically to alpha * this during the settle phase (1 = ARA's fixed alpha)")
    p.add_argument("--guidance", type=float, default=50.0,
                   help="ARA's guidance weight beta, for every mask type (ARA: 50); 0 = the papers' plain versions")
    p.add_argument("--tau", type=float, default=0.4, help="sigmoid: temperature of the straight-through surrogate's backward (LLRC code 0.4, paper 0.1); "
                   "the forward mask is hard, P(keep) = sigmoid(z) at any tau")
    p.add_argument("--beta_end", type=float, default=0.05,
                   help="hard-concrete: temperature at the last step, annealed geometrically from 2/3: the gates "
                   "end nearly 0/1 and export as a hard top-k at scale 1 (2/3 = Louizos' fixed beta, exported "
                   "with its test-time gates as scales)")
    p.add_argument("--init", choices=["uniform", "energy", "paper"], default="uniform",
                   help="start the gates at the uniform allocation, at energy's (its dense layers start dense), "
                   "or at LLRC's logits 6 -> 3 / SoCo's scores 1, which start every layer dense (ARA refuses "
                   "paper: its init is its paper's own)")
    p.add_argument("--soco_stages", type=float, nargs=2, default=[0.5, 0.5],
                   help="SoCo: fractions of --steps in its coarse and refine stages (its third, the kept scores "
                   "trained with the selection fixed, is --compensate)")
    p.add_argument("--compensate", type=int, default=None,
                   help="steps of the compensation stage after the allocation is final: only the kept components' "
                   "scales train, on the task loss; truncate.py folds them in (default: 100 after a learned method, "
                   "0 after one that trains nothing; 0 = the papers' plain methods)")
    p.add_argument("--compensate_lr", type=float, default=0.02,
                   help="AdamW learning rate of the compensation stage (measured: 0.02 beat 0.05 and 0.1, docs/RESULTS.md)")
    p.add_argument("--sparsity", type=float, default=1.0, help="SoCo: weight of the L1 sparsity term on scores")
    p.add_argument("--log_every", type=int, default=10, help="record every layer's r_l every N steps in ranks.json")
    p.add_argument("--energy_norm", choices=["relative", "raw", "type"], default="relative",
                   help="energy: how layers' whitened truncation energies compare (see allocate_energy)")
    p.add_argument("--energy_power", type=float, default=2.0,
                   help="energy: exponent p on each layer's normalised truncation energy (see allocate_energy)")
    p.add_argument("--strs_samples", type=int, default=None,
                   help="STRS: calibration windows per perplexity pass (default: 32 on a GPU as ASVD, 4 on a CPU)")
    p.add_argument("--strs_seqlen", type=int, default=None,
                   help="STRS: tokens per window (default: the calibration --seqlen on a GPU, 128 on a CPU)")
    p.add_argument("--teacher_cache", choices=["auto", "on", "off"], default="auto",
                   help="keep the teacher's logits per calibration chunk on the CPU, so a revisited chunk needs no "
                   "teacher forward (auto: with the KL loss, when the steps revisit chunks and it fits --teacher_cache_gb)")
    p.add_argument("--teacher_cache_gb", type=float, default=16.0, help="CPU memory the teacher cache may use (auto)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="dtype of the frozen weights and factors (auto: bfloat16 on a GPU, float32 on the CPU, where "
                   "half-precision matmuls are ~10x slower); the gates always train in float32")
    p.add_argument("--checkpointing", choices=["auto", "on", "off"], default="auto",
                   help="activation checkpointing per decoder block (auto: on a GPU): memory for recompute")
    p.add_argument("--device_map", choices=["auto"], default=None,
                   help="auto: accelerate spreads the model over every visible GPU (models past one GPU; no CPU offload)")
    p.add_argument("--seed", type=int, default=0, help="seed of every sampler (batches, Gumbel / concrete noise)")
    p.add_argument("--run_dir", default="runs/default", help="folder holding every stage's artifacts")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda ...")
    return p


if __name__ == "__main__":
    common.run_main(main, parser().parse_args())
