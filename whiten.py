"""Stage 1: activation whitening (SVD-LLM, METHODS.md §1).

Runs calibration text through the model, accumulates each linear layer's input Gram matrix
G = X X^T / T (n, n) (per batch in float32, summed over batches in float64) (layers that read the same tensor, e.g. q/k/v, share one G), and
computes a whitening factor S with S S^T = G:
  cholesky (SVD-LLM): S = chol(G), lower-triangular; if G is not positive definite we add
                      (-lambda_min + eps) I, print it and record it in the manifest.
  eigh (SVD-LLM V2):  G = Q Lambda Q^T, S = Q Lambda^1/2, S^-1 = Lambda^-1/2 Q^T (pseudo-inverse
                      on eigenvalues below rcond * lambda_max, also recorded).
Then ||(W - W') X||_F = ||(W - W') S||_F, since S^-1 X has orthonormal rows (SVD-LLM Thm 3.2).

Writes RUN_DIR/whiten/:
  whitening.safetensors  {group}.S (n, n), {group}.S_inv (n, n) float64
  calib_ids.safetensors  ids (nsamples, seqlen) int64: the calibration windows, reused by later stages
  manifest.json          model, data, groups, shapes, numerical fixes, seed, versions

  python whiten.py --model embedded --data embedded --nsamples 64 --seqlen 512
"""
import argparse
import sys
import time

import torch
from safetensors.torch import save_file
from tqdm import tqdm

import artifacts
import common
from common import UserError

MIN_DISTINCT_TOKENS = 16  # below this a calibration text is degenerate (one token repeated, say)


# ----------------------------------------------------------------------------- math

def whitening_factor(G, method="cholesky", eps=1e-6, rcond=1e-10):
    """G (n, n) float64 -> S, S_inv (n, n) float64 and a dict describing any fix applied."""
    n = G.shape[0]
    scale = G.diagonal().mean().item()
    if not scale > 0:
        raise ValueError("Gram matrix is all zeros: this layer never received input")
    I = torch.eye(n, dtype=G.dtype, device=G.device)
    if method == "cholesky":
        S, info = torch.linalg.cholesky_ex(G)
        if info.item() == 0:
            return S, torch.linalg.solve_triangular(S, I, upper=False), {}
        # SVD-LLM: G is singular / indefinite (dead channels, few tokens): shift its spectrum up
        lam_min = torch.linalg.eigvalsh(G)[0].item()
        jitter = -lam_min + eps * scale
        S = torch.linalg.cholesky(G + jitter * I)
        return S, torch.linalg.solve_triangular(S, I, upper=False), {"jitter": jitter, "lambda_min": lam_min}
    if method == "eigh":
        lam, Q = torch.linalg.eigh(G)  # G = Q diag(lam) Q^T
        keep = lam > rcond * lam[-1]
        root = lam.clamp(min=0).sqrt()
        S = Q * root  # (n, n): S S^T = Q Lambda Q^T
        S_inv = (Q * torch.where(keep, 1 / root.clamp(min=1e-300), torch.zeros_like(root))).T
        dropped = int((~keep).sum())
        return S, S_inv, ({"pinv_dropped_eigenvalues": dropped} if dropped else {})
    raise ValueError(f"unknown whitening method {method!r}")


def sample_windows(stream, nsamples, seqlen, seed):
    """nsamples random windows (nsamples, seqlen) of the token stream, one seeded generator."""
    if len(stream) < nsamples * seqlen:
        raise UserError(f"calibration text has {len(stream)} tokens, fewer than --nsamples {nsamples} x "
                        f"--seqlen {seqlen}; lower them or pass more text with --data")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seqlen + 1, (nsamples,), generator=g)
    return torch.stack([stream[s:s + seqlen] for s in starts.tolist()])


# ----------------------------------------------------------------------------- Gram accumulation

@torch.no_grad()
def share_groups(model, linears, probe):
    """Group layers that receive the very same input tensor (q/k/v, gate/up): one G per group."""
    seen, groups, hooks, alive = {}, {}, [], []
    for name, mod in linears.items():
        def hook(_m, inp, name=name):
            x = inp[0]
            alive.append(x)  # keep every input alive, so a freed buffer's address is never reused
            key = (x.data_ptr(), tuple(x.shape))
            groups[name] = seen.setdefault(key, name)
        hooks.append(mod.register_forward_pre_hook(hook))
    model(probe)
    for h in hooks:
        h.remove()
    return groups  # {layer: group leader}


@torch.no_grad()
def accumulate_gram(model, linears, groups, ids, batch_size, device):
    """G_g = sum_t x_t x_t^T / T over all calibration tokens, float64, one per group."""
    G, hooks = {}, []
    for leader in sorted(set(groups.values())):
        n = common.weight_matrix(linears[leader]).shape[1]
        G[leader] = torch.zeros(n, n, dtype=torch.float64, device=device)

        def hook(_m, inp, leader=leader):
            x = inp[0].reshape(-1, inp[0].shape[-1]).float()  # (B*T, n)
            # one batch's X X^T in float32 (fast), the running sum over batches in float64 (METHODS.md §1)
            G[leader] += (x.T @ x).double()
        hooks.append(linears[leader].register_forward_pre_hook(hook))
    for i in tqdm(range(0, len(ids), batch_size), desc="calibration"):
        model(ids[i:i + batch_size].to(device))
    for h in hooks:
        h.remove()
    T = ids.numel()
    return {k: v / T for k, v in G.items()}


# ----------------------------------------------------------------------------- main

def check_calibration(ids, widest):
    """Refuse calibration text too repetitive to whiten with: with fewer distinct tokens than a handful,
    every Gram matrix is near-singular and the factors fit noise; warn when there are fewer distinct
    tokens than the widest layer has inputs."""
    distinct = ids.unique().numel()
    if distinct < MIN_DISTINCT_TOKENS:
        raise UserError(f"the calibration text has only {distinct} distinct tokens in {ids.numel()}: it is "
                        "degenerate (repeated text?); pass real text with --data")
    if distinct < widest:
        print(f"WARNING: only {distinct} distinct calibration tokens for layers with up to {widest} inputs: "
              "the Gram matrices may be poorly conditioned; more varied --data is better", file=sys.stderr)
    return distinct


def main(args):
    common.check_flags(args, nsamples=(1, None), seqlen=(2, None), batch_size=(1, None),
                       seed=(0, None))
    common.check_run_dir(args.run_dir)
    common.set_seed(args.seed)
    device = common.pick_device(args.device)
    t0 = time.time()
    model, tok = common.load_model(args.model, device)
    common.check_seqlen(model.config, args.seqlen)
    linears = common.find_linears(model)
    stream = common.token_stream(tok, common.load_documents(args.data, "calib"))
    ids = sample_windows(stream, args.nsamples, args.seqlen, args.seed)
    distinct = check_calibration(ids, max(common.weight_matrix(m).shape[1] for m in linears.values()))
    groups = share_groups(model, linears, ids[:1, :8].to(device))
    print(f"{len(linears)} linear layers in {len(set(groups.values()))} input groups; "
          f"{ids.numel()} calibration tokens ({args.nsamples} x {args.seqlen}, {distinct} distinct) on {device}")
    G = accumulate_gram(model, linears, groups, ids, args.batch_size, device)

    tensors, fixes = {}, {}
    for leader, Gg in tqdm(G.items(), desc="whitening"):
        if not Gg.diagonal().mean().item() > 0:
            raise UserError(f"{leader} never received input during calibration (its Gram matrix is zero): "
                            "the model does not use it in its forward pass; it cannot be compressed")
        try:
            S, S_inv, fix = whitening_factor(Gg, args.whitening)
        except (ValueError, torch.linalg.LinAlgError) as e:
            other = "eigh" if args.whitening == "cholesky" else "cholesky"
            raise UserError(f"whitening failed for {leader} ({e}); try --whitening {other} or more --nsamples") from None
        if fix:
            print(f"  numerical fix on {leader}: {fix}")  # never silent (STYLE.md habit 6)
            fixes[leader] = fix
        tensors[f"{leader}.S"], tensors[f"{leader}.S_inv"] = S.cpu().contiguous(), S_inv.cpu().contiguous()

    out = artifacts.stage_dir(args.run_dir, "whiten")
    save_file(tensors, f"{out}/whitening.safetensors")
    save_file({"ids": ids}, f"{out}/calib_ids.safetensors")
    artifacts.commit_stage(args.run_dir, "whiten", out, {
        "inputs": {}, "model": args.model, "config_hash": artifacts.config_hash(model),
        "weights_hash": artifacts.weights_hash(model), "dtype": str(model.dtype).replace("torch.", ""),
        "data": args.data, "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed,
        "distinct_tokens": distinct, "whitening": args.whitening, "groups": groups,
        "shapes": common.layer_shapes(linears), "fixes": fixes, "wall_time_s": round(time.time() - t0, 1)})
    print(f"wrote {args.run_dir}/whiten in {time.time() - t0:.1f}s ({len(fixes)} numerical fixes)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="embedded", help="'embedded' (SmolLM2-135M from pip), a local folder or a hub id")
    p.add_argument("--data", default="embedded",
                   help="'embedded' (gensim's Wikipedia), 'wikitext2', 'c4' (hub) or a .txt/.jsonl path")
    p.add_argument("--nsamples", type=int, default=64, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--seed", type=int, default=3, help="seed of the window sampler (SVD-LLM uses 3)")
    p.add_argument("--whitening", choices=["cholesky", "eigh"], default="cholesky",
                   help="cholesky (SVD-LLM) with recorded jitter, or eigh (SVD-LLM V2) with pseudo-inverse")
    p.add_argument("--batch_size", type=int, default=4, help="windows per forward pass")
    p.add_argument("--run_dir", default="runs/default", help="folder holding every stage's artifacts")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1 ...")
    common.run_main(main, p.parse_args())
