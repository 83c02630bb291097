"""The exported model is the trained model (docs/METHODS.md §3.3, §3.8): for every learned method and with the
compensation stage, the fixed masked model and truncate.py's model give the same logits; the compensation
stage lowers the KL at a fixed allocation; SoCo's allocation is learned; hard-concrete starts on sigmoid's
ramp; the dense flags training froze are the exported ones; a new method is one registered Gate subclass.
The tests of learning run on a tiny model trained on news text (conftest.trained_tiny)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import run_stage
from test_allocators import fake_layer
from test_learn import factorize, learn, learn_args
from truncate import compress_model
import learn_masks
import methods
from methods import ara
from methods import base
from methods import hardconcrete
from methods import soco
from plumbing.loading import set_module

LEARNED = ["sigmoid", "hardconcrete", "ara", "soco"]


def kl_to_teacher(model, layers, ids):
    """KL(teacher || model) per token on ids, the teacher being the same model with every layer original."""
    state = next(iter(layers.values())).state
    with torch.no_grad():
        state["teacher"] = True
        t = F.log_softmax(model(ids).logits.float(), -1).flatten(0, 1)
        state["teacher"] = False
        s = F.log_softmax(model(ids).logits.float(), -1).flatten(0, 1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean").item()


def truncated_logits(model, layers, ranks, factors, components, ids):
    for name, l in layers.items():  # back to the original layers, then truncate.py's path
        set_module(model, name, l.orig)
    compress_model(model, ranks, factors, components)
    with torch.no_grad():
        return model(ids).logits


# ----------------------------------------------------------------------------- trained = exported

@pytest.mark.parametrize("method,compensate", [(m, 0) for m in LEARNED] + [("ara", 10), ("hardconcrete", 10)])
def test_the_fixed_masked_model_is_the_truncated_model(method, compensate, trained_tiny):
    make, ids = trained_tiny
    model = make()
    factors, shapes = factorize(model, ids)
    args = learn_args(method, steps=20, batch_size=4, train_seqlen=32, compensate=compensate)
    layers, record, ranks, components = learn(model, factors, shapes, 0.6, args, ids)
    assert all(l.is_fixed for l in layers.values())  # the state the export reads
    with torch.no_grad():
        fixed_out = model(ids[:4]).logits
    truncated = truncated_logits(model, layers, ranks, factors, components, ids[:4])
    assert (truncated - fixed_out).norm() / fixed_out.norm() <= 1e-4
    assert abs(base.kept_fraction(ranks, shapes) - 0.6) <= 0.01
    assert len(record["compensation_curve"]) == compensate


def test_hardconcrete_exports_its_test_time_gate_as_scales(trained_tiny):
    make, ids = trained_tiny
    model = make()
    factors, shapes = factorize(model, ids)
    args = learn_args("hardconcrete", steps=20, batch_size=4, train_seqlen=32, beta_end=2 / 3)  # Louizos' fixed beta
    layers, _, ranks, components = learn(model, factors, shapes, 0.6, args, ids)
    name = next(n for n in ranks if ranks[n] != "dense")
    g = layers[name].gate  # the test-time gate by hand (Louizos et al. Eq. 13) at the kept indices
    expect = (torch.sigmoid(g.log_alpha.detach()) * 1.2 - 0.1).clamp(0, 1)[components[f"{name}.index"]]
    torch.testing.assert_close(components[f"{name}.scale"], expect.clamp(min=1e-4), rtol=1e-5, atol=1e-6)
    assert not torch.equal(expect, torch.ones_like(expect))  # fractional gates: not a 0/1 top-k export


def test_annealed_hardconcrete_ends_on_hard_gates_and_exports_them(trained_tiny):
    """--beta_end 0.05: the temperature anneals from 2/3, the last steps' sampled gates are nearly all 0 or 1,
    the count sum P(z != 0) is continuous across the schedule (log a moves with the shift), and the export
    is the hard gate (every kept scale 1) and computes what the fixed masked model computes."""
    make, ids = trained_tiny
    model = make()
    factors, shapes = factorize(model, ids)
    args = learn_args("hardconcrete", steps=20, batch_size=4, train_seqlen=32, beta_end=0.05)
    probe = learn_masks.attach_gates(make(), factors, shapes, 0.6, args)
    g = next(iter(probe.values())).gate

    def fractional():  # the share of sampled gates strictly between 0 and 1
        z = torch.stack([g.mask(torch.Generator().manual_seed(i)) for i in range(50)])
        return ((z > 0.01) & (z < 0.99)).float().mean().item()
    before, frac_before = g.k_hat().item(), fractional()
    g.at_step(19, args.steps)  # the last step's temperature
    assert abs(g.beta_t - 0.05) < 1e-9 and abs(g.k_hat().item() - before) < 1e-3 * before
    assert fractional() < min(0.03, frac_before / 5), frac_before  # nearly binary, unlike at 2/3
    layers, _, ranks, components = learn(model, factors, shapes, 0.6, args, ids)
    assert components is None or all(torch.equal(v, torch.ones_like(v)) for k, v in components.items() if k.endswith(".scale"))
    with torch.no_grad():
        fixed_out = model(ids[:4]).logits
    truncated = truncated_logits(model, layers, ranks, factors, components, ids[:4])
    assert (truncated - fixed_out).norm() / fixed_out.norm() <= 1e-4


def test_the_settle_phase_follows_the_budget_down_for_hardconcrete(trained_tiny):
    """From gates started at 90% kept, 30 settle steps (dense flags frozen, alpha growing) toward a 60%
    budget must close at least half of the gap, as the other gates do: gates that move as one block on a plateau
    cannot, and the finalisation would then cut every low-rank layer to meet the budget."""
    make, ids = trained_tiny
    model = make()
    factors, shapes = factorize(model, ids)
    args = learn_args("hardconcrete", steps=30, batch_size=4, train_seqlen=32, settle=1.0, guidance=0.0)
    layers = learn_masks.attach_gates(model, factors, shapes, 0.9, args)  # the gates start at 90% kept's uniform ranks
    record = learn_masks.train(model, layers, learn_masks.Feed(model, ids, args, args.steps), 0.6, args, torch.device("cpu"))
    start, end = record["curve"][0]["rho_hat"], record["curve"][-1]["rho_hat"]
    assert start > 0.85 and (start - end) >= 0.5 * (start - 0.6), (start, end)


def test_hardconcrete_starts_on_sigmoids_ramp():
    """The uniform init (annealed, the default): P(z_i != 0) = sigmoid(6 (1 - i / k0)), sigmoid's P(keep), by a
    Monte-Carlo count of the sampled gates (nonzero), and k_hat within a component of k0. Catches a plateau init (P ~ 1 or 0 except
    near k0), whose gates move as one block under AdamW (docs/METHODS.md §3.2)."""
    layer = fake_layer(hardconcrete.HardConcreteGate, m=200, n=200, k0=60, beta_end=0.05)  # the default, annealed
    g = torch.Generator().manual_seed(0)
    nonzero = torch.stack([layer.gate.mask(g) > 0 for _ in range(2000)]).float().mean(0)  # (k_max,)
    i = torch.arange(layer.gate.k_max, dtype=torch.float32)
    torch.testing.assert_close(nonzero, torch.sigmoid(6 * (1 - i / 60)), rtol=0, atol=0.04)
    assert abs(layer.gate.k_hat().item() - 60) <= 1


# ----------------------------------------------------------------------------- finalisation

def test_a_dense_flag_frozen_in_training_is_exported_dense():
    """A layer trained dense stays dense in the export even where its r has drifted below 1. Catches an export
    that recomputes dense from r (r >= 0.99, say), which would give such a layer 0.9 k*."""
    a, b = fake_layer(ara.AraGate), fake_layer(ara.AraGate)  # both at r = 0.5 (k0 = 10 of k* = 20)
    shapes = {"a": (40, 40), "b": (40, 40)}
    a.dense, b.dense = True, False  # a was frozen dense in the settle phase, then its gate drifted
    assert a.ratio().item() < 0.99
    base.fix_trained({"a": a, "b": b}, shapes, (1600 + 10 * 80) / 3200)
    ranks, _ = base.export({"a": a, "b": b})
    assert ranks == {"a": "dense", "b": 10}


def test_frozen_dense_gates_do_not_move_in_the_settle_phase(trained_tiny):
    """Zero gradients (not None) let AdamW's momentum keep moving a frozen dense gate (~0.85 logits)."""
    make, ids = trained_tiny
    model = make()
    factors, shapes = factorize(model, ids)
    args = learn_args("ara", steps=30, batch_size=4, train_seqlen=32, settle=0.5)
    layers = learn_masks.attach_gates(model, factors, shapes, 0.85, args)
    first = next(iter(layers.values()))
    with torch.no_grad():  # one layer starts well past r = 1 (pi on c = 1): dense when settling begins
        first.gate.p.zero_()[0] = 12.0
    snap = {}

    def spy(step_fn):  # record each dense layer's gate when the settle phase begins (step 15)
        def wrapped(step, plan, a):
            out = step_fn(step, plan, a)
            if step == 15:
                snap.update({n: l.gate.p.detach().clone() for n, l in layers.items() if l.dense})
            return out
        return wrapped
    learn_masks.schedule, orig = spy(learn_masks.schedule), learn_masks.schedule
    try:
        learn_masks.train(model, layers, learn_masks.Feed(model, ids, args, args.steps), 0.85, args, torch.device("cpu"))
    finally:
        learn_masks.schedule = orig
    assert snap, "no layer was dense when the settle phase began: the test needs one"
    for n, p0 in snap.items():
        assert layers[n].dense and torch.equal(layers[n].gate.p.detach(), p0), n


def test_a_layer_trained_low_rank_is_exported_low_rank():
    """The finalisation follows the training's dense flags: a layer trained low-rank keeps a rank of at most
    k* - 1 however far c k_hat reaches past k*, and only a layer training left dense is exported dense.
    Catches an export that turns a low-rank layer dense because its rescaled count reached k* (it then runs
    a model it was never trained as)."""
    shapes = {"a": (40, 40), "b": (40, 40)}  # k* = 20
    k_hat = {"a": 19.6, "b": 4.0}
    ranks, c = base.ara_ranks(k_hat, shapes, (1600 + 5 * 80) / 3200, set())
    assert ranks == {"a": 19, "b": 6}, (ranks, c)  # a at its top (k* - 1); the rest of the budget (6 x 80) to b
    ranks, c = base.ara_ranks(k_hat, shapes, (1600 + 5 * 80) / 3200, {"a"})
    assert ranks == {"a": "dense", "b": 5}, (ranks, c)


def test_the_budget_reaches_a_low_rank_layer_pushed_past_one_in_the_settle_phase():
    """Settle phase: the dense flags are frozen and dense layers count as constants; a LOW-RANK layer whose r
    was pushed past 1 is still low-rank (it runs its mask and is exported low-rank), so the budget must pull it
    back: d rho_hat / d r_l = m_l n_l / sum m n. Catches min(r, 1) with a plain clamp (zero gradient past 1)."""
    r = torch.tensor([1.3, 0.4, 1.5], requires_grad=True)  # low-rank past 1, low-rank, dense
    mn = torch.tensor([100.0, 100.0, 200.0])
    rho_hat = base.rho_hat_of(r, mn, dense=torch.tensor([False, False, True]))
    assert abs(rho_hat.item() - (1.0 * 100 + 0.4 * 100 + 1.0 * 200) / 400) < 1e-6
    rho_hat.backward()
    torch.testing.assert_close(r.grad, torch.tensor([0.25, 0.25, 0.0]))


def test_the_dense_switch_turns_a_layer_dense_and_back():
    """ARA's switch in the explore phase (learn_masks.update_dense): r_l >= 1 runs W x + b, r_l < 1 the factors
    again, and each flip is recorded."""
    layer = fake_layer(ara.AraGate)  # r = 0.5
    record = {"dense_flips": []}
    learn_masks.update_dense({"l": layer}, ["l"], [1.2], 3, record["dense_flips"])
    assert layer.dense and record["dense_flips"] == [[3, "l", "dense"]]
    x = torch.randn(2, 40)
    with torch.no_grad():
        assert torch.equal(layer(x), layer.orig(x))  # dense: the original layer, exactly
    learn_masks.update_dense({"l": layer}, ["l"], [0.7], 4, record["dense_flips"])
    assert not layer.dense and record["dense_flips"][-1] == [4, "l", "low-rank"]


# ----------------------------------------------------------------------------- SoCo

def test_soco_budget_reaches_kept_scores():
    """The budget's gradient reaches a kept score above 1. Catches a saturating count such as
    sum 1 - exp(-s / 0.05), whose gradient at s = 2 is below AdamW's eps."""
    layer = fake_layer(soco.SocoGate)
    with torch.no_grad():
        layer.gate.theta.fill_(2.0)  # s = 2: a compensating score
    assert abs(layer.gate.k_hat().item() - layer.gate.k_max) < 1e-4  # a score above 1 counts one component
    layer.gate.k_hat().backward()
    torch.testing.assert_close(layer.gate.theta.grad, torch.ones_like(layer.gate.theta))


@pytest.mark.parametrize("keep", [0.8, 0.6])
def test_soco_learns_an_allocation_that_is_not_uniform(keep, trained_tiny):
    """At its own schedule (SocoGate.steps), SoCo's task gradients move the allocation: catches scores whose
    gradients are too small to leave the uniform ranks (a count or L1 normalised into AdamW's epsilon)."""
    make, ids = trained_tiny
    model = make()
    factors, shapes = factorize(model, ids)
    args = learn_args("soco", steps=soco.SocoGate.steps, batch_size=4, train_seqlen=32)
    _, _, ranks, _ = learn(model, factors, shapes, keep, args, ids)
    uniform = base.uniform_ranks(shapes, keep)
    ratio = {n: (1.0 if ranks[n] == "dense" else ranks[n] / uniform[n]) for n in shapes if uniform[n] != "dense"}
    moved = sum(abs(r - 1) >= 0.1 for r in ratio.values())
    assert moved >= len(ratio) // 3, ratio  # a third of the layers at least 10% away from the uniform rank


# ----------------------------------------------------------------------------- compensation

def test_compensation_keeps_the_ranks_and_lowers_the_kl(trained_tiny):
    make, ids = trained_tiny
    out = {}
    for steps in (0, 40):
        model = make()
        factors, shapes = factorize(model, ids)
        ranks = base.uniform_ranks(shapes, 0.6)
        args = learn_args("uniform", compensate=steps, batch_size=4, train_seqlen=32, steps=1)
        layers = base.attach(model, factors, ranks)
        base.fix_prefix(layers, ranks)
        learn_masks.compensate(model, layers, learn_masks.Feed(model, ids, args, steps), args, torch.device("cpu"))
        out[steps] = (base.export(layers)[0], kl_to_teacher(model, layers, ids))
    assert out[40][0] == out[0][0] == ranks  # the allocation is untouched, so the budget holds exactly
    assert out[40][1] < 0.9 * out[0][1], out


# ----------------------------------------------------------------------------- one place to add a method

class ToyGate(base.Gate):
    """A toy method defined outside the project: one logit per layer, the first round(k_max sigmoid(a)) kept."""
    lr = 0.2
    flags = {"--toy_start": dict(type=float, default=None, help="toy: the kept fraction every gate starts at")}

    def __init__(self, k_max, k0, sigma, toy_start=None):
        super().__init__()
        self.k_max = k_max
        k0 = k0 if toy_start is None else round(toy_start * k_max)
        self.a = torch.nn.Parameter(torch.tensor(math.log(k0 / (k_max - k0))))

    def mask(self, gen):
        keep = torch.sigmoid(self.a)
        hard = (torch.arange(self.k_max) < torch.round(self.k_max * keep)).float()
        return hard + keep - keep.detach()

    def k_hat(self):
        return self.k_max * torch.sigmoid(self.a)


def test_a_flag_two_methods_declare_differently_fails_loudly():
    """A subclass that inherits its parent's flags shares them; a second, different --toy_start is refused
    rather than silently dropped (the parser would otherwise keep whichever registered first)."""
    class Child(ToyGate):
        pass

    class Rival(ToyGate):
        flags = {"--toy_start": dict(type=int, default=0)}
    try:
        methods.register("toy", ToyGate)
        methods.register("toy_child", Child)
        learn_masks.parser()  # inherited, identical: added once
        methods.register("toy_rival", Rival)
        with pytest.raises(TypeError, match="--toy_start"):
            learn_masks.parser()
    finally:
        for name in ("toy", "toy_child", "toy_rival"):
            methods.GATES.pop(name, None)


def test_a_new_method_is_one_registered_gate(run_dir, tmp_path):
    methods.register("toy", ToyGate)
    try:
        d = tmp_path / "run"
        d.mkdir()
        for stage in ("whiten", "decompose"):  # a copy of the session's run dir, so others are untouched
            import shutil
            shutil.copytree(f"{run_dir}/{stage}", d / stage)
        args = learn_masks.parser().parse_args(["--method", "toy", "--keep", "0.6", "--steps", "6", "--compensate",
                                                "3", "--train_seqlen", "32", "--toy_start", "0.5", "--run_dir", str(d)])
        learn_masks.main(args)
    finally:
        del methods.GATES["toy"]
    alloc = json.load(open(d / "allocation" / "ranks.json"))
    assert alloc["method"] == "toy" and len(alloc["curve"]) == 6 and len(alloc["compensation_curve"]) == 3
    assert alloc["flags"]["toy_start"] == 0.5  # its own flag, declared as data, parsed and recorded
    assert abs(alloc["kept_fraction_linear"] - 0.6) <= 0.01
    run_stage("truncate.py", "--run_dir", d)
    run_stage("evaluate.py", "--run_dir", d, "--max_windows", 2, "--seqlen", 32)
    assert math.isfinite(json.load(open(d / "metrics.json"))["compressed"]["ppl"])
