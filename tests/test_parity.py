"""Tier 2: parity. Full-rank whitened factors in the generic LowRankLinear reproduce the original
logits on several architectures (GQA, biases, GPT-2's Conv1D, OPT)."""
import pytest
import torch

from conftest import tiny_model
from decompose import whitened_svd
from truncate import compress_model, lowrank_factors
from oracle import accumulate_gram, share_groups
from oracle import whitening_factor
from plumbing.loading import find_linears, set_module, weight_matrix
from plumbing.modeling_lowrank import LowRankLinear


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2", "opt"])
def test_full_rank_factors_reproduce_logits(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, 320, (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
    linears = find_linears(model)
    groups = share_groups(model, linears, ids[:1, :8])
    assert len(set(groups.values())) < len(linears) or arch in ("gpt2",)  # q/k/v share one G
    G = accumulate_gram(model, linears, groups, ids, 2, "cpu")
    for name, mod in linears.items():
        S, S_inv, _ = whitening_factor(G[groups[name]])
        W = weight_matrix(mod).detach().double()
        U, sigma, VtSinv = whitened_svd(W, S, S_inv)
        A, B = lowrank_factors(U, sigma, VtSinv, rank=len(sigma))
        bias = None if mod.bias is None else mod.bias.detach().clone()
        set_module(model, name, LowRankLinear(A.float(), B.float(), bias))
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == len(linears)
    with torch.no_grad():
        logits = model(ids).logits
    rel = (logits - reference).norm() / reference.norm()
    assert rel < 1e-4, f"{arch}: relative logit error {rel:.2e}"


def test_all_dense_allocation_is_identity():
    model = tiny_model("llama")
    ids = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids).logits
    ranks = {name: "dense" for name in find_linears(model)}
    compress_model(model, ranks, factors={})
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference)
