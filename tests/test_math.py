"""Tier 1: math identities on tiny random matrices (docs/METHODS.md §1-§2)."""
import torch

from decompose import whitened_svd
from oracle import whitening_factor
from methods import base


def random_XW(m=24, n=16, T=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, T, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, n, dtype=torch.float64)[:, None]
    return X, torch.randn(m, n, generator=g, dtype=torch.float64)


def test_cholesky_factor_reproduces_gram():
    X, _ = random_XW()
    G = X @ X.T
    for method in ("cholesky", "eigh"):
        S, S_inv, fix = whitening_factor(G, method)
        assert fix == {}
        torch.testing.assert_close(S @ S.T, G, rtol=1e-10, atol=1e-8)
        torch.testing.assert_close(S_inv @ S, torch.eye(16, dtype=torch.float64), rtol=0, atol=1e-9)


def test_whitened_rows_are_orthonormal():
    X, _ = random_XW()
    _, S_inv, _ = whitening_factor(X @ X.T)
    Z = S_inv @ X  # (n, T): S^-1 X has orthonormal rows, the reason ||(W-W')X|| = ||(W-W')S||
    torch.testing.assert_close(Z @ Z.T, torch.eye(16, dtype=torch.float64), rtol=0, atol=1e-9)


def test_truncation_loss_equals_dropped_sigma_squared():
    X, W = random_XW()
    S, S_inv, _ = whitening_factor(X @ X.T)
    U, sigma, VtSinv = whitened_svd(W, S, S_inv)
    for k in (1, 5, 10, 16):
        W_k = U[:, :k] * sigma[:k] @ VtSinv[:k]  # U_k Sigma_k V_k^T S^-1
        loss = ((W - W_k) @ X).pow(2).sum()
        torch.testing.assert_close(loss, sigma[k:].pow(2).sum(), rtol=1e-8, atol=1e-8)  # SVD-LLM Cor. 3.3
    tail = base.tail_energy(sigma)  # tail[k] = the whitened loss of rank k, by hand from the sum above
    assert tail[16] == 0 and torch.allclose(tail[0], sigma.pow(2).sum()) and torch.allclose(tail[5], sigma[5:].pow(2).sum())


def test_whitened_truncation_beats_plain_svd():
    X, W = random_XW()
    S, S_inv, _ = whitening_factor(X @ X.T)
    U, sigma, VtSinv = whitened_svd(W, S, S_inv)
    Up, sp, Vp = torch.linalg.svd(W, full_matrices=False)
    k = 6
    whitened = ((W - U[:, :k] * sigma[:k] @ VtSinv[:k]) @ X).norm()
    plain = ((W - Up[:, :k] * sp[:k] @ Vp[:k]) @ X).norm()
    assert whitened < plain


def test_fallback_on_singular_gram_is_recorded():
    X, _ = random_XW()
    X[3] = 0  # a dead input channel: G is singular, Cholesky fails
    G = X @ X.T
    S, S_inv, fix = whitening_factor(G, "cholesky")
    assert fix["jitter"] > 0 and fix["lambda_min"] <= 1e-8
    torch.testing.assert_close(S @ S.T, G + fix["jitter"] * torch.eye(16, dtype=torch.float64))
    S, S_inv, fix = whitening_factor(G, "eigh")
    assert fix["pinv_dropped_eigenvalues"] == 1
    torch.testing.assert_close(S @ S.T, G, rtol=1e-10, atol=1e-8)


def test_break_even_rank_and_cost():
    assert base.k_star(4096, 4096) == 2048 and base.k_star(4096, 11008) == 2985  # docs/METHODS.md §2
    assert base.layer_cost(10, 100, 50) == 1500
    assert base.layer_cost(40, 100, 50) == 5000  # past k* = 33 the dense W is cheaper
    assert base.layer_cost("dense", 100, 50) == 5000


def test_kept_fraction_accounting():
    shapes = {"a": (100, 100), "b": (300, 100)}
    ranks = {"a": 10, "b": "dense"}
    assert abs(base.kept_fraction(ranks, shapes) - (10 * 200 + 30000) / 40000) < 1e-12
    for rho in (0.2, 0.5, 0.8, 0.95):
        got = base.kept_fraction(base.uniform_ranks(shapes, rho), shapes)
        assert rho - 0.01 <= got <= rho + 1e-9
    assert set(base.uniform_ranks(shapes, 1.0).values()) == {"dense"}
