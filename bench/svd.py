"""Benchmark: the SVD of one whitened weight W S (decompose.py's whole cost) by each path a device offers, timed
and checked against an independent float64 reference, on LLaMA-2-7B's shapes: which SVD driver and
precision each device should use. W is random with a decaying spectrum and S the Cholesky factor of a Gram matrix whose
eigenvalues span 8 orders of magnitude, as whitened spectra do (docs/METHODS.md §1).

Paths (the first is what decompose.py runs):
  svd64      torch.linalg.svd in float64 (LAPACK gesdd on the CPU; cuSOLVER's default on a GPU)
  gesvd64    scipy's LAPACK gesvd (CPU) / torch's driver="gesvd" (GPU): the textbook QR-iteration SVD
  gesvdj64   torch's driver="gesvdj" (GPU only, Jacobi)
  eigh64     eigh of (W S)(W S)^T (m x m, float64) when m <= n: sigma = sqrt(lambda), V^T = U^T W S / sigma
  svd32      torch.linalg.svd in float32
Errors against gesvd64 (or svd64 where gesvd64 is --skip'ped): the top k* singular values, max_i |sigma_i - ref_i| / ref_i, and
the rank-k* product U_k Sigma_k V_k^T, ||. - ref||_F / ||ref||_F (what decompose.py stores, k_max ~ 1.2 k*).

  python bench/svd.py                                  # CPU: 4096 x 4096 and 4096 x 11008 and 11008 x 4096
  python bench/svd.py --device cuda --shapes 4096x11008
"""
import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from plumbing import cli  # noqa: E402


def whitened_matrix(m, n, seed=0):
    """W S (m, n) float64: W with singular values 1 / (1 + i / 50), S = chol(G), G's eigenvalues 10^(-8 i / n)."""
    g = torch.Generator().manual_seed(seed)
    qm, _ = torch.linalg.qr(torch.randn(m, m, dtype=torch.float64, generator=g))
    qn, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    r = min(m, n)
    W = (qm[:, :r] / (1 + torch.arange(r, dtype=torch.float64) / 50)) @ qn[:, :r].T
    lam = 10 ** (-8 * torch.arange(n, dtype=torch.float64) / n)
    qg, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    G = (qg * lam) @ qg.T
    return W @ torch.linalg.cholesky(G + 1e-12 * torch.eye(n, dtype=torch.float64))


def eigh_svd(M):
    """M (m, n), m <= n -> U (m, m), sigma (m,), V^T (m, n) from the eigendecomposition of M M^T (float64)."""
    lam, U = torch.linalg.eigh(M @ M.T)  # ascending
    lam, U = lam.flip(0).clamp(min=0), U.flip(1)
    sigma = lam.sqrt()
    return U, sigma, (U.T @ M) / sigma.clamp(min=1e-300)[:, None]


def paths(device):
    out = {"svd64": lambda M: torch.linalg.svd(M, full_matrices=False)}
    if device.type == "cuda":
        out["gesvd64"] = lambda M: torch.linalg.svd(M, full_matrices=False, driver="gesvd")
        out["gesvdj64"] = lambda M: torch.linalg.svd(M, full_matrices=False, driver="gesvdj")
    else:
        def gesvd(M):
            import scipy.linalg
            U, s, Vt = scipy.linalg.svd(M.numpy(), full_matrices=False, lapack_driver="gesvd")
            return torch.from_numpy(U), torch.from_numpy(s), torch.from_numpy(Vt)
        out["gesvd64"] = gesvd
    out["eigh64"] = eigh_svd  # m <= n only (main skips it otherwise)
    out["svd32"] = lambda M: [t.double() for t in torch.linalg.svd(M.float(), full_matrices=False)]
    return out


def main(args):
    device = cli.pick_device(args.device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| shape | path | seconds | max rel. error of the top k* sigma | rel. error of the rank-k* product |")
    print("|---|---|---|---|---|")
    for shape in args.shapes:
        m, n = map(int, shape.split("x"))
        k = m * n // (m + n)
        M = whitened_matrix(m, n).to(device)
        results = {}
        for name, fn in paths(device).items():
            if name in args.skip or (name == "eigh64" and m > n):
                continue
            cli.sync(device)
            t0 = time.perf_counter()
            U, s, Vt = fn(M)
            cli.sync(device)
            results[name] = (time.perf_counter() - t0, U[:, :k].cpu(), s[:k].cpu(), Vt[:k].cpu())
        ref_name = "gesvd64" if "gesvd64" in results else "svd64"
        _, Ur, sr, Vr = results[ref_name]
        ref = (Ur * sr) @ Vr
        for name, (sec, U, s, Vt) in results.items():
            ds = ((s - sr).abs() / sr).max().item()
            dp = (((U * s) @ Vt - ref).norm() / ref.norm()).item()
            print(f"| {m} x {n} | {name}{' (reference)' if name == ref_name else ''} | {sec:.1f} | {ds:.1e} | {dp:.1e} |",
                  flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=["4096x4096", "4096x11008", "11008x4096"], help="m x n of W")
    p.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    p.add_argument("--skip", nargs="*", default=[], help="paths not to run (e.g. gesvd64: slow on the CPU)")
    main(p.parse_args())
