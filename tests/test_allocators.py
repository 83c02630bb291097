"""The properties of the allocators (docs/METHODS.md §3), each one a test a wrong implementation fails:
dense layers come back when the budget asks, guidance sees the full spectrum, hard-concrete and sigmoid
export what they trained, SoCo's pruned scores can recover, every calibration token is used, the
teacher is skipped for CE, and the closed-form allocations meet the budget and follow the spectra."""
import argparse
import json
import math

import pytest
import torch
from safetensors import safe_open

from conftest import tiny_model
from test_learn import factorize, learn_args
import learn_masks
from methods import base
from methods import closed_form
from methods import hardconcrete
from methods import sigmoid
from methods import soco
from plumbing import cli


@pytest.fixture(scope="module")
def calib_ids():
    return torch.randint(0, 320, (16, 32), generator=torch.Generator().manual_seed(0))


def fake_layer(gate_cls, m=40, n=40, k0=10, **kw):
    """One MaskedLinear over random factors, with a gate of `gate_cls` (hard-concrete at Louizos' fixed beta
    unless told: its test-time gates are what these tests inspect)."""
    if gate_cls is hardconcrete.HardConcreteGate:
        kw.setdefault("beta_end", 2 / 3)
    g = torch.Generator().manual_seed(0)
    k_max = int(1.2 * base.k_star(m, n))
    sigma = torch.linspace(2, 0.1, min(m, n))
    gate = gate_cls(k_max, k0, sigma[:k_max], **kw)
    return base.MaskedLinear(torch.nn.Linear(n, m), torch.randn(m, k_max, generator=g),
                              sigma, torch.randn(k_max, n, generator=g), gate, {"teacher": False})


# ----------------------------------------------------------------------------- dense is not absorbing

def test_straight_through_clamp_reaches_dense_layers():
    r = torch.tensor([1.3, 0.5], requires_grad=True)
    out = base.straight_through_min1(r)
    assert out.tolist() == [1.0, 0.5]  # forward: min(r, 1)
    out.sum().backward()
    assert r.grad.tolist() == [1.0, 1.0]  # backward: as if unclamped, so the budget reaches a dense layer


@pytest.mark.parametrize("method", ["sigmoid", "hardconcrete", "soco"])
def test_paper_init_starts_dense_and_the_budget_brings_layers_back(method, calib_ids):
    model = tiny_model("llama")
    factors, shapes = factorize(model, calib_ids)
    args = learn_args(method, init="paper", steps=200, log_every=5)
    layers = learn_masks.attach_gates(model, factors, shapes, 0.5, args)
    assert all(l.ratio().item() >= 1 for l in layers.values())  # every layer starts past r = 1: dense
    record = learn_masks.train(model, layers, learn_masks.Feed(model, calib_ids, args, args.steps), 0.5, args, torch.device("cpu"))
    assert record["curve"][0]["rho_hat"] > 0.99 and abs(record["curve"][-1]["rho_hat"] - 0.5) < 0.03
    assert any(to == "low-rank" for _, _, to in record["dense_flips"])  # recorded, and the gates moved
    traj = record["trajectory"]
    assert traj["step"][0] == 0 and traj["step"][-1] == 199 and all(len(v) == len(traj["step"]) for v in traj["r"].values())


@pytest.mark.parametrize("method", ["sigmoid", "hardconcrete", "ara", "soco"])
def test_the_gates_start_at_a_given_allocation(method, calib_ids):
    """--init energy: attach(start=ranks) starts every gate at that allocation: a "dense" layer on ARA's dense
    switch (r_l >= 1), a low-rank one with k_hat at its start rank (not at the uniform one)."""
    model = tiny_model("llama")
    factors, shapes = factorize(model, calib_ids)
    names = sorted(shapes)
    start = {n: "dense" if i % 3 == 0 else max(1, base.k_star(*shapes[n]) // (2 + i % 2)) for i, n in enumerate(names)}
    layers = learn_masks.attach_gates(model, factors, shapes, 0.5, learn_args(method, init="energy"), start=start)
    for n, l in layers.items():
        if start[n] == "dense":
            assert l.ratio().item() >= 1, (n, l.ratio().item())
        else:
            assert abs(l.gate.k_hat().item() - start[n]) <= 0.02 * start[n] + 0.5, (n, l.gate.k_hat().item(), start[n])


# ----------------------------------------------------------------------------- the full spectrum in b_l(r)

def test_guidance_grid_equals_decompose_relative_errors(run_dir):
    decomp = json.load(open(f"{run_dir}/decompose/manifest.json"))
    for name, info in decomp["layers"].items():
        with safe_open(f"{run_dir}/decompose/{decomp['shards'][name]}", "pt") as f:
            grid = base.guidance_grid(f.get_tensor(f"{name}.sigma"), info["m"], info["n"])
            for r, err in info["rel_err"].items():
                assert abs(grid[round(float(r) * 100)].item() - err) < 6e-5, (name, r)


# ----------------------------------------------------------------------------- export what was trained

def test_hardconcrete_at_a_fixed_beta_counts_what_it_exports():
    """At Louizos' fixed beta the exported layer runs the test-time gates (Eq. 13), so the budget's count is the
    number of gates whose test-time value is above 0, by hand here: sigmoid(log a) 1.2 - 0.1 > 0, i.e. log a >
    log(1/11) = -2.398; and it still carries a gradient. Catches sum_i P(z_i != 0) (Eq. 12), which counts a dead
    gate at log a = -3 as 0.20 and a live one at -2 as 0.40."""
    gate = hardconcrete.HardConcreteGate(12, 6, torch.ones(12), beta_end=2 / 3)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([3.0, 1.0, 0.0, -1.0, -2.0, -2.3, -2.5, -3.0, -4.0, -6.0, 2.0, -2.39]))
    k_hat = gate.k_hat()
    assert k_hat.item() == 8 == int((gate.scales() > 0).sum())  # 3, 1, 0, -1, -2, -2.3, 2, -2.39
    k_hat.backward()
    assert gate.log_alpha.grad.abs().sum() > 0


def test_hardconcrete_at_a_fixed_beta_never_keeps_or_counts_a_dead_gate():
    """Louizos' fixed beta 2/3: a gate at log a = -3.0 has test-time gate (Eq. 13) clip(sigmoid(-3) 1.2 - 0.1,
    0, 1) = 0, though P(z != 0) = 0.20 (Eq. 12). a: 16 live gates at -1.0 (test-time 0.22), 8 dead; b: 10 live
    at 0.1, 14 dead. The exported model runs the test-time gates, so it is 16 + 10 components: at that budget
    a keeps its 16 live components and b its 10, each at a test-time gate above 0. Catches a dead component
    kept at a clamped scale (it costs m + n and computes nothing) and the dead gates' P(z != 0) counted."""
    a = fake_layer(hardconcrete.HardConcreteGate, beta_end=2 / 3)
    b = fake_layer(hardconcrete.HardConcreteGate, beta_end=2 / 3)
    with torch.no_grad():
        a.gate.log_alpha.copy_(torch.cat([torch.full((16,), -1.0), torch.full((8,), -3.0)]))
        b.gate.log_alpha.copy_(torch.cat([torch.full((10,), 0.1), torch.full((14,), -3.0)]))
    layers, shapes = {"a": a, "b": b}, {"a": (40, 40), "b": (40, 40)}
    base.fix_trained(layers, shapes, (16 + 10) * 80 / 3200)
    ranks, components = base.export(layers)
    assert ranks == {"a": 16, "b": 10}, ranks
    assert torch.equal(components["a.index"], torch.arange(16)) and torch.equal(components["b.index"], torch.arange(10))
    for n in layers:
        assert (components[f"{n}.scale"] > 0.2).all(), components[f"{n}.scale"]  # live gates only, no clamp


def test_sigmoid_exports_its_learned_subset_and_truncate_applies_it():
    layer = fake_layer(sigmoid.SigmoidGate)
    keep = torch.tensor([0, 2, 3, 7, 11])  # not a prefix
    with torch.no_grad():
        layer.gate.z.fill_(-20.0)
        layer.gate.z[keep] = 20.0
    shapes = {"l": (40, 40)}
    factors = {"l.U": layer.U, "l.sigma": layer.sigma_full.float(), "l.VtSinv": layer.VtSinv}  # k_max stored
    base.fix_trained({"l": layer}, shapes, 5 * 80 / 1600)
    ranks, components = base.export({"l": layer})
    assert ranks["l"] == 5 and components["l.index"].tolist() == keep.tolist()
    x = torch.randn(3, 40)
    with torch.no_grad():
        fixed_out = layer(x)
        model = torch.nn.Module()
        model.l = layer.orig
        from truncate import lowrank_layer
        low = lowrank_layer(layer.orig, factors, "l", 5, index=components["l.index"], scale=components["l.scale"])
        torch.testing.assert_close(low(x), fixed_out, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- SoCo

def test_soco_pruned_score_can_recover():
    layer = fake_layer(soco.SocoGate)
    with torch.no_grad():
        layer.gate.theta[3] = -0.5  # a score pushed below 0: s = 0 (a relu's gradient would be 0 for good)
    assert layer.gate.scores()[3].item() == 0
    opt = torch.optim.AdamW(layer.gate.parameters(), lr=0.1, weight_decay=0)
    for _ in range(20):
        opt.zero_grad()
        (-layer.gate.scores()[3]).backward()  # the task wants component 3 back
        opt.step()
    assert layer.gate.scores()[3].item() > 1


def test_soco_counts_components_not_score_mass():
    layer = fake_layer(soco.SocoGate)
    with torch.no_grad():
        layer.gate.theta.copy_(torch.cat([torch.full((5,), 3.0), torch.full((19,), -1.0)]))  # 5 scores 3, 19 at 0
    assert abs(layer.gate.k_hat().item() - 5) < 0.05  # 5 kept, though their score mass is ~15


def test_soco_runs_the_components_its_budget_counts():
    """24 scores at 0.3 count k_hat = sum min(s, 1) = 7.2 components: the forward must run 7 of them (the largest
    s_i sigma_i, the set the export keeps at c = 1), not all 24; the gradient still reaches every score (1 each,
    straight-through). Catches a mask that runs every s_i > 0 while the budget counts 7.2."""
    layer = fake_layer(soco.SocoGate)
    k_max = layer.gate.k_max
    with torch.no_grad():
        layer.gate.theta.copy_(torch.cat([torch.full((24,), 0.3), torch.full((k_max - 24,), -1.0)]))
    mask = layer.gate.mask(None)
    assert abs(layer.gate.k_hat().item() - 7.2) < 1e-5
    assert torch.equal(mask.detach().nonzero().squeeze(1), torch.arange(7))  # sigma decreases: the first 7
    torch.testing.assert_close(mask.detach()[:7], torch.full((7,), 0.3))
    mask.sum().backward()
    torch.testing.assert_close(layer.gate.theta.grad, torch.ones(k_max))


def test_soco_relaxes_in_its_coarse_stage_and_runs_what_it_counts_from_the_refine_stage():
    """24 scores at 0.3 (k_hat 7.2): in the coarse stage the forward runs all 24 at 0.3 (the relaxation), from the
    refine stage on exactly the 7 it counts, and a gate not stepped (the state training ends in, the export) the
    7. Catches a relaxation that stays on in the refine stage or a hard forward from the first step."""
    layer = fake_layer(soco.SocoGate)
    k_max = layer.gate.k_max
    with torch.no_grad():
        layer.gate.theta.copy_(torch.cat([torch.full((24,), 0.3), torch.full((k_max - 24,), -1.0)]))
    args = learn_args("soco", steps=10)  # coarse: steps 0-4, refine: 5-9
    running = {}
    for step in (0, 4, 5, 9):
        layer.gate.at_step(step, args.steps)
        running[step] = int((layer.gate.mask(None).detach() != 0).sum())
    assert running == {0: 24, 4: 24, 5: 7, 9: 7}
    assert int((soco.SocoGate(k_max, 8, layer.gate.sigma).mask(None).detach() != 0).sum()) == 8


def test_soco_stages_alternate_and_restart_the_learning_rate():
    gate = soco.SocoGate(4, 4, torch.ones(4), soco_stages=(0.5, 0.5))
    plans = [gate.plan(s, 100) for s in range(100)]
    assert [p["stage"] for p in plans[49:52]] == [1, 2, 2]
    assert all(p["task"] and p["sparsity"] and p["budget"] for p in plans[:50])  # coarse: every term
    refine = plans[50:]
    assert all(p["task"] != p["sparsity"] and p["budget"] for p in refine)  # refine alternates task and sparsity
    assert plans[50]["t"] == 0 and plans[50]["T"] == 50  # the cosine lr restarts at the refine stage


def test_soco_selection_ranks_by_score_times_sigma():
    """SoCo prunes by s_i sigma_i (§3.4), not by s_i alone nor by sigma_i alone: a hand-made case where the
    three orders differ (sigma 4 3 2 1, s .5 1 .9 2.5 -> s sigma 2 3 1.8 2.5). Catches an order on the
    scores only ([3, 1, 2, 0]) or the prefix ([0, 1, 2, 3])."""
    gate = soco.SocoGate(4, 4, torch.tensor([4.0, 3.0, 2.0, 1.0]))
    with torch.no_grad():
        gate.theta.copy_(torch.tensor([0.5, 1.0, 0.9, 2.5]))
    assert gate.order().tolist() == [1, 3, 0, 2]


# ----------------------------------------------------------------------------- every calibration token, the teacher

def test_every_calibration_token_is_reachable():
    ids = torch.arange(3 * 50).view(3, 50)
    chunks = learn_masks.window_chunks(ids, 16)
    assert chunks.shape == (3 * 4, 16) and set(chunks.flatten().tolist()) == set(range(150))
    seen = set()
    order = learn_masks.batch_indices(len(chunks), 2, torch.Generator().manual_seed(0))
    for _ in range(len(chunks) // 2):
        seen |= set(chunks[next(order)].flatten().tolist())
    assert seen == set(range(150))  # one epoch of batches covers every token


def test_ce_loss_runs_no_teacher(calib_ids):
    model = tiny_model("llama")
    factors, shapes = factorize(model, calib_ids)
    args = learn_args("ara", loss="ce", steps=3)
    layers = learn_masks.attach_gates(model, factors, shapes, 0.6, args)
    state, calls = next(iter(layers.values())).state, []
    model.register_forward_pre_hook(lambda m, a, kw: calls.append((state["teacher"], kw.get("use_cache"))),
                                    with_kwargs=True)
    learn_masks.train(model, layers, learn_masks.Feed(model, calib_ids, args, args.steps), 0.6, args, torch.device("cpu"))
    assert calls == [(False, False)] * 3  # one student forward a step, no teacher, no KV cache


# ----------------------------------------------------------------------------- closed-form allocations

def spectra(decays, n=64):
    """Layers of shape (n, n) whose whitened spectra decay at the given rates."""
    i = torch.arange(n, dtype=torch.float64)
    return {f"model.layers.{b}.mlp.proj": torch.exp(-d * i) for b, d in enumerate(decays)}


@pytest.mark.parametrize("method", ["energy", "svdllm2"])
@pytest.mark.parametrize("rho", [0.3, 0.6, 0.85])
def test_closed_form_meets_budget_and_keeps_more_of_a_flat_spectrum(method, rho):
    sigmas = spectra([0.1, 0.1, 0.01, 0.1])  # layer 2's spectrum is flat: truncating it costs most
    shapes = {name: (64, 64) for name in sigmas}
    fn = getattr(closed_form, f"allocate_{method}")
    ranks, _, _ = fn(shapes, rho, {"sigmas": sigmas, "tokens": 10 ** 6})
    assert rho - 64 * 2 / (4 * 64 * 64) <= base.kept_fraction(ranks, shapes) <= rho + 1e-9  # within one component
    flat, uniform = ranks["model.layers.2.mlp.proj"], base.uniform_ranks(shapes, rho)["model.layers.2.mlp.proj"]
    assert flat == "dense" or (uniform != "dense" and flat > uniform), (flat, uniform)


def test_svdllm2_ratios_follow_the_paper():
    sigmas = spectra([0.3, 0.1])
    shapes = {name: (64, 64) for name in sigmas}
    _, _, rec = closed_form.allocate_svdllm2(shapes, 0.6, {"sigmas": sigmas, "tokens": 10 ** 6})
    kept = list(rec["kept_ratio"].values())
    assert abs(sum(kept) / 2 - 0.6) < 1e-12 and kept[1] > kept[0]  # ratios average R; larger loss kept more
    L = [math.sqrt(10 ** 6 * (s[int(0.6 * 32):] ** 2).sum().item()) for s in sigmas.values()]
    s = [1 / math.log(x) for x in L]
    assert abs((1 - kept[0]) - 2 * 0.4 * s[0] / sum(s)) < 1e-12  # Alg. 1 line 11


def test_a_nan_loss_names_its_term(calib_ids):
    model = tiny_model("llama")
    factors, shapes = factorize(model, calib_ids)
    args = learn_args("ara", steps=2, guidance=float("nan"))
    layers = learn_masks.attach_gates(model, factors, shapes, 0.6, args)
    with pytest.raises(cli.UserError, match="guid term of the loss became nan at step 0: check --guidance"):
        learn_masks.train(model, layers, learn_masks.Feed(model, calib_ids, args, args.steps), 0.6, args, torch.device("cpu"))


def test_svdllm2_never_exceeds_the_budget_when_a_ratio_clamps():
    """Alg. 1 line 11 can ask a matrix with a tiny loss to remove more than all of it (kept < 0).
    Clamped matrices keep their bound and the others share
    the rest of the group's removal in the same proportions, so the group still averages R."""
    i = torch.arange(64, dtype=torch.float64)
    T, k = 10 ** 6, int(0.4 * 32)  # tokens; the uniform rank at 40% kept of a 64 x 64 matrix
    sharp = torch.exp(-0.1 * i)
    sharp *= math.sqrt(1.1 / (T * (sharp[k:] ** 2).sum().item()))  # L_min = sqrt(1.1): s = 1 / log L is large
    sigmas = {f"model.layers.{b}.mlp.proj": torch.exp(-0.02 * i) for b in range(3)}
    sigmas["model.layers.3.mlp.proj"] = sharp
    shapes = {name: (64, 64) for name in sigmas}
    ranks, _, rec = closed_form.allocate_svdllm2(shapes, 0.4, {"sigmas": sigmas, "tokens": T})
    assert base.kept_fraction(ranks, shapes) <= 0.4 + 1e-9
    kept = list(rec["kept_ratio"].values())
    assert min(kept) >= 2 * 64 / (64 * 64) - 1e-12 and abs(sum(kept) / 4 - 0.4) < 1e-9


def test_hard_concrete_skips_its_zero_gates_with_the_same_loss_and_gradients():
    """A gate clipped to exactly 0 adds nothing to the output and gets no gradient (the clip), so the layer
    computes only the drawn nonzero components (learn_masks.draw_masks): the same output and gate gradients as
    computing all k_max. Fails if the skip drops a nonzero gate or the clip passes gradient."""
    layer = fake_layer(hardconcrete.HardConcreteGate)
    x = torch.randn(2, 5, 40, generator=torch.Generator().manual_seed(1))
    outs, grads = [], []
    for skip in (False, True):
        layer.gate.skips_zeros = skip  # this instance only: the first pass computes all k_max
        layer.gate.log_alpha.grad = None
        learn_masks.draw_masks({"l": layer}, {}, seed=2)  # a fresh stream, the same seed: the same draw both times
        assert (layer.step_index is not None) == skip
        zeros = int((layer.step_mask == 0).sum())
        y = layer(x)
        (y ** 2).sum().backward()
        outs.append(y.detach())
        grads.append(layer.gate.log_alpha.grad.clone())
    assert hardconcrete.HardConcreteGate.skips_zeros and 0 < zeros < layer.gate.k_max  # some skipped, some kept
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)
    assert (grads[0][layer.step_mask.detach() == 0] == 0).all()  # the clip: a zero gate learns nothing this step
