"""Stage 2: SVD of every whitened weight (SVD-LLM, docs/METHODS.md §1).

For each linear W (m, n) with whitening factor S of its input group:
  W S = U Sigma V^T                         (float64)
  W'_k = U_k Sigma_k (V_k^T S^-1)           best rank-k W' under ||(W - W') X||_F
  ||(W - W'_k) X||_F^2 = T sum_{i>k} sigma_i^2   (SVD-LLM Thm 3.2 / Cor 3.3; G = X X^T / T here)
We store the factors up to k_max = min(rank, floor(kmax_mult * k*)) components, k* = floor(mn/(m+n))
the break-even rank (docs/METHODS.md §2). The default kmax_mult = 1.2 is ARA's choice: a little past
break-even, because any rank >= k* is applied as the dense W anyway. The full spectrum is kept.

Streams: one whitening factor at a time (read once for all the layers that share it), one shard written
per decoder block. SVD runs on the device in float64 (--device auto: the GPU when there is one; H100 /
H200 have full-rate float64, and the whitened spectra span many orders of magnitude, see docs/METHODS.md §5).

Writes RUN_DIR/decompose/:
  block_NNN.safetensors  per decoder block: {layer}.U (m, k_max), {layer}.sigma (min(m,n),) float64,
                         {layer}.VtSinv (k_max, n); U and VtSinv in float32, or bfloat16 for a bf16 model
  manifest.json        shapes, k*, k_max, relative whitened truncation errors, whiten/ hash

  python decompose.py --run_dir runs/default
"""
import math
import time

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from methods import base
from plumbing import artifacts, cli, loading
from plumbing.cli import UserError
from plumbing.loading import find_linears, weight_matrix
from whiten import expand_factor


# ----------------------------------------------------------------------------- math

def whitened_svd(W, S, S_inv=None):
    """W (m, n), S (n, n) float64 -> U (m, r), sigma (r,), VtSinv (r, n). S_inv None: S is lower-triangular
    (Cholesky) and V^T S^-1 is one triangular solve, X S = V^T, never an explicit inverse."""
    U, sigma, Vt = torch.linalg.svd(W @ S, full_matrices=False)  # W S = U diag(sigma) V^T
    if S_inv is None:
        return U, sigma, torch.linalg.solve_triangular(S, Vt, upper=False, left=False)
    return U, sigma, Vt @ S_inv


# ----------------------------------------------------------------------------- main

def factor_dtype(model_dtype):
    """U and V^T S^-1 are stored in the model's dtype when it is bfloat16 (truncate.py casts A and B to it
    anyway, and rounding U before or after the sqrt(sigma) scaling is the same relative error), else in
    float32: float16's range cannot hold V^T S^-1 of a nearly dead input direction (large 1 / sqrt(lambda))."""
    return torch.bfloat16 if model_dtype == torch.bfloat16 else torch.float32


def check_groups(run_dir, whiten, rerun):
    """What this stage needs of whiten's groups: every group led by a layer of its input width (one shared
    whitening), one shard per group."""
    groups, shapes = whiten["groups"], whiten["shapes"]
    with artifacts.one_line(rerun, f"{run_dir}/whiten/manifest.json is damaged: "):
        artifacts.same_keys(groups, shapes, "'groups'", "'shapes'")
        for name, leader in groups.items():
            if groups.get(leader) != leader:
                raise artifacts.Bad(f"'groups'[{name!r}] is {leader!r}, not a layer that leads its own group")
            if shapes[leader][1] != shapes[name][1]:
                raise artifacts.Bad(f"'groups'[{name!r}]: {leader!r} has another input width, so no shared whitening")
        artifacts.same_keys(whiten["shards"], set(groups.values()), "'shards'", "the group leaders of 'groups'")


def main(args):
    whiten = artifacts.read_manifest(args.run_dir, "whiten", "python whiten.py")
    check_groups(args.run_dir, whiten, f"python whiten.py --run_dir {args.run_dir}")
    device = cli.pick_device(args.device)
    t0 = time.time()
    model = loading.load_model(whiten["model"], "cpu")
    artifacts.check_model(model, whiten)
    linears = find_linears(model)
    groups, store = whiten["groups"], factor_dtype(model.dtype)
    members = {}  # {leader: [layers]}: each shared S is read and expanded once
    for name in linears:
        members.setdefault(groups[name], []).append(name)
    S_file = artifacts.Shards(args.run_dir, "whiten", f"python whiten.py --run_dir {args.run_dir}", whiten["shards"],
                             shape=artifacts.whiten_shape(whiten))
    out = artifacts.stage_dir(args.run_dir, "decompose")
    info, shards, tensors, fractions = {}, {}, {}, (0.9, 0.8, 0.6)
    order = list(dict.fromkeys(groups[n] for n in linears))  # leaders in forward order: shards block by block
    for g_i, leader in enumerate(tqdm(order, desc="SVD")):
        n = weight_matrix(linears[leader]).shape[1]
        S, S_inv = expand_factor(S_file.get(f"{leader}.S").to(device), n, whiten["whitening"])
        for name in members[leader]:
            W = weight_matrix(linears[name]).detach().to(device, torch.float64)
            m = W.shape[0]
            U, sigma, VtSinv = whitened_svd(W, S, S_inv)  # float64 on the device (docs/METHODS.md §1)
            k_max = int(min(len(sigma), args.kmax_mult * base.k_star(m, n)))  # float min: no overflow
            tensors[f"{name}.U"] = U[:, :k_max].to(store).cpu().contiguous()
            tensors[f"{name}.sigma"] = sigma.cpu().contiguous()
            tensors[f"{name}.VtSinv"] = VtSinv[:k_max].to(store).cpu().contiguous()
            tail = base.tail_energy(sigma)  # relative whitened error sqrt(sum_{i>k} sigma_i^2 / sum_i sigma_i^2)
            errs = {str(r): round(math.sqrt(tail[base.rank_at_fraction(r, m, n)] / tail[0]), 4) if tail[0] > 0 else 0.0
                    for r in fractions}  # an all-zero W loses nothing at any rank
            info[name] = {"m": m, "n": n, "k_star": base.k_star(m, n), "k_max": k_max, "rel_err": errs}
            tqdm.write(f"{name:45s} {m:5d}x{n:<5d} k*={base.k_star(m, n):5d} k_max={k_max:5d} rel. err at "
                       + " ".join(f"{float(r):.0%}:{e:.3f}" for r, e in errs.items()))
        shard = whiten["shards"][leader]  # the decoder block's shard name, as in whiten/
        last = g_i + 1 == len(order) or whiten["shards"][order[g_i + 1]] != shard
        if last:  # the block is done: write its factors and free them
            bad = [k for k, t in tensors.items() if not torch.isfinite(t).all()]
            if bad:  # never write factors a later stage would turn into a NaN model
                raise UserError(f"the SVD of {bad[0].rsplit('.', 1)[0]} gave NaN or inf (a non-finite weight or "
                                f"whitening factor): check the model's weights, or re-run `python whiten.py "
                                f"--run_dir {args.run_dir} --whitening eigh`")
            save_file(tensors, f"{out}/{shard}")
            shards.update({k.rsplit(".", 1)[0]: shard for k in tensors})
            tensors = {}
    artifacts.commit_stage(args.run_dir, "decompose", out, {
        "inputs": {"whiten": whiten["hash"]}, "model": whiten["model"], "kmax_mult": args.kmax_mult,
        "factor_dtype": str(store).replace("torch.", ""), "layers": info, "shards": shards,
        **cli.peak_gpu(device), "wall_time_s": round(time.time() - t0, 1)})
    print(f"wrote {args.run_dir}/decompose in {time.time() - t0:.1f}s")


def parser():
    """The flags (a function, so the tests can parse and run a stage in-process)."""
    p = cli.Parser(description=__doc__.split("\n")[0])
    p.add_argument("--kmax_mult", type=cli.number(float, 1), default=1.2,  # < 1: fewer than k* components
                   help="store k_max = min(rank, floor(kmax_mult * k*)) components (ARA: 1.2); large = full rank")
    p.add_argument("--run_dir", default="runs/default", help="folder holding every stage's artifacts")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda ...")
    return p


if __name__ == "__main__":
    cli.run_main(main, parser().parse_args())
