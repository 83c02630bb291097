"""Walkthrough: ONE layer of a run followed through the five stages with its real numbers, written as
markdown (docs/WALKTHROUGH.md), each paper quantity next to the check that it is what the equation says
(docs/METHODS.md §1-§3.8). Seconds on the CPU; exits 1 if a check fails.

  1 whiten     G = X X^T / T from the calibration windows (recomputed here by a hook), S from whiten/:
               S S^T = G (§1)
  2 decompose  sigma of W S; the whitened loss of rank k, tr((W - W_k) G (W - W_k)^T), equals
               sum_{i>k} sigma_i^2 (§1, SVD-LLM Cor. 3.3); k*, k_max (§2)
  3 allocation the uniform rank, b_l(r) (§3.3), and the rank / dense flag every allocation in --ranks
               gave this layer, with the whitened error it pays
  4 truncate   A = U_k Sigma_k D (m, k), B = D^-1 V_k^T S^-1 (k, n); the relative output error
               ||(W - A B) X|| / ||W X|| on the calibration inputs equals sqrt(tail / total)
  5 evaluate   the parameters the layer keeps

  python bench/walkthrough.py --run_dir runs/default --ranks runs/default/bench --out docs/WALKTHROUGH.md
"""
import argparse
import glob
import json
import math
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import methods  # noqa: E402
from methods import base  # noqa: E402
from plumbing import artifacts  # noqa: E402
from plumbing import cli  # noqa: E402
from plumbing import loading  # noqa: E402
from plumbing.loading import find_linears, weight_matrix  # noqa: E402
import decompose  # noqa: E402
from truncate import lowrank_factors  # noqa: E402
from whiten import StopForward, expand_factor  # noqa: E402


@torch.no_grad()
def layer_gram(model, layer, ids, batch_size=4):
    """G = X X^T / T of one layer's inputs over the calibration windows (float64), the forward stopped at the layer."""
    G = {}

    def hook(_m, inp):
        x = inp[0].reshape(-1, inp[0].shape[-1]).float()  # (B*T, n)
        G["sum"] = G.get("sum", 0) + (x.T @ x).double()
        raise StopForward  # nothing after this layer needs to run
    h = layer.register_forward_pre_hook(hook)
    for i in range(0, len(ids), batch_size):
        try:
            model(ids[i:i + batch_size], use_cache=False)
        except StopForward:
            pass
    h.remove()
    return G["sum"] / ids.numel()


def allocations(folder):
    """Every ranks.json (or bench/compare.py's *.ranks copy) under `folder`: (label, ranks record)."""
    paths = sorted(glob.glob(os.path.join(folder, "*.ranks")) + glob.glob(os.path.join(folder, "**", "ranks.json"),
                                                                          recursive=True))
    out = []
    for p in paths:
        r = json.load(open(p))
        f = r.get("flags", {})
        extra = [f"--compensate {r['compensate']}" if r.get("compensate") else "",
                 "--guidance 0" if f.get("guidance") == 0 and r["method"] in methods.GATES else ""]
        out.append((f"{r['method']} {' '.join(x for x in extra if x)}".strip(), r))
    return out


def main(args):
    rd = args.run_dir
    whiten = artifacts.read_manifest(rd, "whiten", "python whiten.py")
    decompose.check_groups(rd, whiten, "python whiten.py")
    decomp = artifacts.read_manifest(rd, "decompose", "python decompose.py")
    name = args.layer or next(iter(decomp["layers"]))
    if name not in decomp["layers"]:
        raise cli.UserError(f"--layer {name} is not a compressed layer of {rd}; e.g. {next(iter(decomp['layers']))}")
    info = decomp["layers"][name]
    m, n = info["m"], info["n"]
    model = loading.load_model(whiten["model"], "cpu")
    W = weight_matrix(find_linears(model)[name]).detach().double()  # (m, n)
    ids = artifacts.read_tensors(f"{rd}/whiten/calib_ids.safetensors", "python whiten.py", keys=["ids"],
                                 dtype=lambda k: torch.int64)["ids"]
    leader = whiten["groups"][name]
    G = layer_gram(model, find_linears(model)[name], ids)
    S_file = artifacts.Shards(rd, "whiten", "python whiten.py", whiten["shards"])
    S, S_inv = expand_factor(S_file.get(f"{leader}.S"), n, whiten["whitening"])
    f = artifacts.Shards(rd, "decompose", "python decompose.py", decomp["shards"])
    U, sigma, VtSinv = f.get(f"{name}.U").double(), f.get(f"{name}.sigma").double(), f.get(f"{name}.VtSinv").double()
    tail = base.tail_energy(sigma)
    checks, lines = [], []

    def check(what, got, want, tol):
        ok = abs(got - want) <= tol * max(abs(want), 1e-30)
        checks.append(ok)
        return f"{got:.6g} vs {want:.6g} ({'ok' if ok else 'FAILED'}, rel. tol {tol:g})"

    gram_err = ((S @ S.T - G).norm() / G.norm()).item()
    k_star, k_max = info["k_star"], info["k_max"]
    k0 = base.uniform_ranks({name: (m, n)}, args.keep)[name]
    k0 = k_star if k0 == "dense" else k0
    dW = W - (U[:, :k0] * sigma[:k0]) @ VtSinv[:k0]  # W - W_k0 (m, n)
    loss = torch.einsum("ij,jk,ik->", dW, G, dW).item()  # ||(W - W_k) X||^2 / T = tr(dW G dW^T)
    A, B = lowrank_factors(U, sigma, VtSinv, rank=k0)
    out_err = math.sqrt(max(torch.einsum("ij,jk,ik->", W - A @ B, G, W - A @ B).item(), 0)
                        / torch.einsum("ij,jk,ik->", W, G, W).item())
    b = base.guidance_grid(sigma, m, n)  # (101,) b_l(r)
    lines += [f"# Walkthrough: `{name}` of `{whiten['model']}`", "",
              "Made by `python bench/walkthrough.py` (this file is its output; the numbers are this run's). "
              "Sections cite docs/METHODS.md.", "",
              "## 1. whiten.py: the Gram matrix and its whitening factor (§1)", "",
              f"- calibration: {len(ids)} x {ids.shape[1]} tokens ({ids.numel()} inputs of width n = {n}); "
              f"`{name}` shares its G with the layers of group `{leader}`",
              f"- G = X X^T / T (n x n), trace {G.trace().item():.6g}; S: `{whiten['whitening']}`, numerical fixes "
              f"{whiten['fixes'].get(leader, 'none')}",
              f"- check S S^T = G: ||S S^T - G|| / ||G|| = {gram_err:.2e} "
              f"({'ok' if gram_err <= 1e-5 else 'FAILED'}, tol 1e-5: G summed per batch in float32)", "",
              "## 2. decompose.py: the whitened spectrum (§1, §2)", "",
              f"- W is {m} x {n}; W S = U Sigma V^T; k* = floor(m n / (m + n)) = {k_star}, k_max = {k_max} stored",
              f"- sigma_1 = {sigma[0]:.4g}, sigma_k* = {sigma[k_star - 1]:.4g}, sigma_min = {sigma[-1]:.4g}; "
              f"relative whitened error at 90 / 80 / 60% kept: "
              + " / ".join(f"{v:.4f}" for v in info["rel_err"].values()),
              f"- check the whitened loss of rank k = {k0} equals the dropped sigma^2 (SVD-LLM Cor. 3.3): "
              f"tr((W - W_k) G (W - W_k)^T) = sum_(i>k) sigma_i^2: {check('loss', loss, tail[k0].item(), 1e-4)}", "",
              "## 3. learn_masks.py: what each allocation gave this layer (§2, §3)", "",
              "The trained r_l is the gate's kept ratio at the last allocation step (>= 1: the layer ran dense); "
              "the exported rank is what ARA's finalisation made of it (docs/METHODS.md §3.3). b_l(r) is the "
              "relative whitened error at r: guidance pushes r up to dense where r > 1 - b_l(r).", "",
              f"- uniform rank at keep {args.keep}: k = floor(rho m n / (m + n)) = {k0} (r = {k0 * (m + n) / (m * n):.3f}); "
              f"ARA's b_l(r) there: {b[round(k0 * (m + n) / (m * n) * 100)]:.4f}", ""]
    rows = allocations(args.ranks) if args.ranks else []
    if rows:
        lines += ["| allocation | keep | trained r_l (last step) | exported rank | r = cost / (m n) | b_l(r) | "
                  "whitened rel. error | layers dense (model) |", "|---|---|---|---|---|---|---|---|"]
        for label, r in sorted(rows, key=lambda x: (-x[1]["keep"], x[0])):
            k = r["layers"].get(name)
            if k is None:
                continue
            ratio = 1.0 if k == "dense" else k * (m + n) / (m * n)
            err = 0.0 if k == "dense" else math.sqrt(tail[min(k, len(sigma))].item() / tail[0].item())
            dense = sum(v == "dense" for v in r["layers"].values())
            trained = (r.get("trajectory") or {}).get("r", {}).get(name) or ["-"]  # the gate's r_l before finalisation
            lines.append(f"| {label} | {r['keep']:.2f} | {trained[-1]} | {k} | {ratio:.3f} | {b[min(100, round(ratio * 100))]:.4f} | "
                         f"{err:.4f} | {dense}/{len(r['layers'])} |")
        lines.append("")
    lines += ["## 4. truncate.py: the factors and the output error (§1, §3.8)", "",
              f"- at the uniform rank k = {k0}: A = U_k Sigma_k D is {tuple(A.shape)}, B = D^-1 V_k^T S^-1 is "
              f"{tuple(B.shape)}; y = A (B x) + b",
              f"- check the relative output error on the calibration inputs, ||(W - A B) X|| / ||W X||, equals "
              f"sqrt(sum_(i>k) sigma_i^2 / sum_i sigma_i^2): "
              f"{check('out', out_err, math.sqrt(tail[k0].item() / tail[0].item()), 1e-3)}", "",
              "## 5. evaluate.py: what the layer costs", "",
              f"- dense: m n = {m * n:,} parameters; rank {k0}: k (m + n) = {k0 * (m + n):,} "
              f"({k0 * (m + n) / (m * n):.1%} kept); dense is cheaper from k* = {k_star} on", ""]
    text = "\n".join(lines)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    print(text)
    if not all(checks) or gram_err > 1e-5:
        sys.exit(1)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run_dir", default="runs/default", help="a run dir with whiten/ and decompose/")
    p.add_argument("--layer", default=None, help="the layer to follow (default: the first compressed layer)")
    p.add_argument("--keep", type=float, default=0.8, help="the budget of the uniform rank shown")
    p.add_argument("--ranks", default=None, help="a folder of ranks.json / bench/compare.py *.ranks files to tabulate")
    p.add_argument("--out", default=None, help="write the markdown here (e.g. docs/WALKTHROUGH.md)")
    cli.run_main(main, p.parse_args())
