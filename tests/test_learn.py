"""Learned rank allocation (docs/METHODS.md §3) on tiny models: budget, determinism, guidance, SoCo's
folded scales, and a deliberately sensitive layer."""
import argparse
import json

import pytest
import torch

from conftest import run_inprocess, stage, tiny_model
from decompose import whitened_svd
from truncate import compress_model
from oracle import accumulate_gram, share_groups
from oracle import whitening_factor
import learn_masks
from methods import ara
from methods import base
from plumbing.loading import find_linears, set_module, weight_matrix

LEARNED = ["sigmoid", "hardconcrete", "ara", "soco"]
QUICK = ("--steps", 30, "--batch_size", 2, "--train_seqlen", 48)


def factorize(model, ids, kmax_mult=1.2):
    """whiten.py + decompose.py in memory: factors {layer.U/.sigma/.VtSinv} and shapes."""
    linears = find_linears(model)
    groups = share_groups(model, linears, ids[:1, :8])
    G = accumulate_gram(model, linears, groups, ids, 4, "cpu")
    factors, shapes = {}, {}
    for name, mod in linears.items():
        S, S_inv, _ = whitening_factor(G[groups[name]])
        W = weight_matrix(mod).detach().double()
        U, sigma, VtSinv = whitened_svd(W, S, S_inv)
        k_max = min(len(sigma), int(kmax_mult * base.k_star(*W.shape)))
        factors.update({f"{name}.U": U[:, :k_max].float(), f"{name}.sigma": sigma,
                        f"{name}.VtSinv": VtSinv[:k_max].float()})
        shapes[name] = tuple(W.shape)
    for p in model.parameters():
        p.requires_grad_(False)
    return factors, shapes


def learn(model, factors, shapes, rho, args, ids):
    """learn_masks.allocate in memory: attach, train, fix (ARA's finalisation), compensate, export."""
    layers = learn_masks.attach_gates(model, factors, shapes, rho, args)
    data = learn_masks.Feed(model, ids, args, args.steps + args.compensate)
    record = learn_masks.train(model, layers, data, rho, args, torch.device("cpu"))
    record.update(base.fix_trained(layers, shapes, rho))
    record["compensation_curve"] = learn_masks.compensate(model, layers, data, args, torch.device("cpu"))
    ranks, components = base.export(layers)
    return layers, record, ranks, components


def learn_args(method, **kw):
    base = dict(method=method, loss="kl", hidden_layers=[-1], steps=40, batch_size=4, train_seqlen=32,
                lr=None, alpha=100.0, alpha_growth=100.0, settle=0.5, guidance=50.0, tau=0.4, init="uniform", log_every=10,
                beta_end=0.05,
                soco_stages=[0.5, 0.5], sparsity=0.1, seed=0, teacher_cache="auto",
                teacher_cache_gb=16.0, compensate=0, compensate_lr=0.02)
    return argparse.Namespace(**{**base, **kw})


def test_learn_args_are_the_cli_defaults():
    """The tests' namespace is learn_masks.py's defaults but for the sizes of a tiny run: a default changed in
    one place and not the other fails here, not as a test of the wrong flags."""
    sized = {"steps", "batch_size", "train_seqlen", "compensate"}
    for method in LEARNED:
        cli, ours = vars(learn_masks.parser().parse_args(["--method", method])), vars(learn_args(method))
        assert {k: v for k, v in ours.items() if k not in sized} == {k: cli[k] for k in ours if k not in sized}


@pytest.fixture(scope="module")
def calib_ids():
    return torch.randint(0, 320, (16, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", LEARNED)
def test_budget_reload_and_determinism(method, run_dir):
    d, runs = run_dir, []
    for _ in range(2):
        stage("learn_masks.py", "--method", method, "--keep", 0.6, *QUICK, "--run_dir", d)
        runs.append(json.load(open(f"{d}/allocation/ranks.json")))
    assert runs[0]["layers"] == runs[1]["layers"]  # same seed, same allocation
    curve = runs[0]["curve"]
    assert len(curve) == 30 and abs(curve[-1]["rho_hat"] - 0.6) < 0.02  # training ends on its budget
    assert abs(runs[0]["kept_fraction_linear"] - 0.6) <= 0.01  # the export meets it exactly
    stage("truncate.py", "--run_dir", d)
    assert abs(json.load(open(f"{d}/compressed/manifest.json"))["kept_fraction_linear"] - 0.6) <= 0.01


def test_each_method_runs_its_own_schedule_unless_told():
    for flags, want in [(["--method", "soco"], (200, 250)), (["--method", "ara"], (200, 100)),
                        (["--method", "uniform"], (200, 0)), (["--method", "uniform", "--compensate", "40"], (200, 40)),
                        (["--method", "soco", "--steps", "7", "--compensate", "0"], (7, 0))]:
        parsed = learn_masks.parser().parse_args(flags)
        args = learn_masks.with_schedule(parsed)
        assert (args.steps, args.compensate) == want, flags
        assert parsed.steps is None or parsed.steps == args.steps  # a new namespace: the parsed flags unchanged


def test_guidance_is_zero_at_dense_and_pushes_a_flat_spectrum_up():
    flat = torch.ones(1, 101)  # b(r) = 1: a flat spectrum loses a lot at any r < 1
    r = torch.tensor([1.0], requires_grad=True)
    assert base.guidance_loss(r, flat).item() == 0
    r = torch.tensor([0.7], requires_grad=True)
    base.guidance_loss(r, flat).backward()
    assert r.grad.item() < 0  # descending the loss raises r toward dense
    steep = torch.zeros(1, 101)  # b(r) = 0: truncation is free, no push
    assert base.guidance_loss(torch.tensor([0.7]), steep).item() == 0


def test_guidance_alone_makes_a_flat_layer_dense():
    torch.manual_seed(0)
    m = n = 32
    gate = ara.AraGate(int(1.2 * base.k_star(m, n)), 8, torch.ones(n))
    layer = base.MaskedLinear(torch.nn.Linear(n, m), torch.randn(m, gate.k_max), torch.ones(n),
                                 torch.randn(gate.k_max, n), gate, {})
    b = base.guidance_grid(layer.sigma_full, m, n)[None]
    opt = torch.optim.AdamW(gate.parameters(), lr=0.1)
    r0 = layer.ratio().item()
    for _ in range(200):
        opt.zero_grad()
        base.guidance_loss(layer.ratio()[None], b).backward()
        opt.step()
    assert r0 < 0.6 and layer.ratio().item() >= 0.99


def test_soco_folded_scales_reproduce_masked_logits(calib_ids):
    model = tiny_model("llama")
    factors, shapes = factorize(model, calib_ids)
    args = learn_args("soco", steps=20)
    layers, _, ranks, components = learn(model, factors, shapes, 0.6, args, calib_ids)
    assert any(not torch.allclose(v, torch.ones_like(v)) for k, v in components.items() if k.endswith(".scale"))
    with torch.no_grad():
        fixed_out = model(calib_ids[:2]).logits
    for name, l in layers.items():  # back to the original layers, then truncate.py's path
        set_module(model, name, l.orig)
    compress_model(model, ranks, factors, components)
    with torch.no_grad():
        truncated = model(calib_ids[:2]).logits
    assert (truncated - fixed_out).norm() / fixed_out.norm() < 1e-4
    assert abs(base.kept_fraction(ranks, shapes) - 0.6) <= 0.01


@pytest.mark.parametrize("method,flags", [("sigmoid", {}), ("hardconcrete", {}), ("ara", {}),
                                          ("soco", {"sparsity": 0.0}), ("soco", {})])
def test_learned_allocation_protects_a_sensitive_layer(method, flags, trained_tiny):
    """On the briefly trained tiny model, one layer made deliberately sensitive: v_proj of block 0 scaled by 30
    (its relative whitened spectrum, hence ARA's guidance b(r), unchanged; its error now dominates the
    residual stream). The task term of every method's loss (ARA Eq. 3: L_task + alpha (rho_hat - rho)^2 +
    beta L_guid) must give it more than the uniform rank, and the budget must take it from elsewhere.
    Catches a gate whose task gradient is lost (the allocation then stays uniform or follows the guidance
    alone), an export that ignores the gates."""
    make, ids = trained_tiny
    model = make()
    sensitive = "model.layers.0.self_attn.v_proj"
    model.get_submodule(sensitive).weight.data *= 30
    factors, shapes = factorize(model, ids)
    uniform = base.uniform_ranks(shapes, 0.5)
    args = learn_args(method, steps=60, **flags)
    _, _, ranks, _ = learn(model, factors, shapes, 0.5, args, ids)
    learned = ranks[sensitive]
    assert learned == "dense" or learned > uniform[sensitive], (learned, uniform[sensitive])
    assert abs(base.kept_fraction(ranks, shapes) - 0.5) <= 0.01


def test_bad_learning_inputs(run_dir):
    stage("learn_masks.py", "--keep", 0.7, "--run_dir", run_dir)
    before = open(f"{run_dir}/allocation/ranks.json").read()
    for args, expect in ((("--method", "sigmoid", "--alpha", "nan", "--steps", 2), "--alpha: nan is out of range"),
                         (("--method", "magic"), "unknown --method"),
                         (("--method", "ara", "--keep", 0.0001), "rank 1 in every layer")):
        code, err = run_inprocess("learn_masks.py", *args, "--run_dir", run_dir)
        assert code == 2 and expect in err.strip().splitlines()[-1], err[-800:]
    assert open(f"{run_dir}/allocation/ranks.json").read() == before  # nothing half-written
