"""The model that is trained is the model that is exported, for every learned method: (a) from the state
training ended in, before any compensation; (b) through the files on disk, learn_masks.py -> truncate.py ->
load_compressed / from_pretrained, with and without compensation; (c) learning helps: each learned method's
exported model is closer to the original than uniform's at the same budget and compensation. On the tiny
Llama trained on news text (a random-init model has flat spectra and nothing to allocate)."""
import pytest
import torch

import learn_masks
from conftest import stage
from methods import base
from test_export import kl_to_teacher
from test_learn import factorize, learn_args

LEARNED = ["sigmoid", "hardconcrete", "ara", "soco"]
KEEP, STEPS, COMPENSATE = 0.6, 60, 20


def trained(method, trained_tiny, keep=KEEP, **flags):
    """A learned method's layers in the state its training ended in (not yet finalised). bench/tiny_kl.py
    prints the margins of (c) from the same runs."""
    make, ids = trained_tiny
    model = make()
    factors, shapes = factorize(model, ids)
    args = learn_args(method, **{"steps": STEPS, "batch_size": 4, "train_seqlen": 32, "beta_end": 0.05,
                                 "compensate": COMPENSATE, **flags})
    layers = learn_masks.attach_gates(model, factors, shapes, keep, args)
    data = learn_masks.Feed(model, ids, args, args.steps + args.compensate)
    learn_masks.train(model, layers, data, keep, args, torch.device("cpu"))
    return model, layers, shapes, data, args


# ----------------------------------------------------------------------------- (a) the state training ended in

@pytest.mark.parametrize("keep", [0.6, 0.8])
@pytest.mark.parametrize("method", ["ara", "soco"])
def test_a_deterministic_mask_is_exported_as_trained(method, keep, trained_tiny, heldout_ids):
    """ARA's prefix and SoCo's scored set are deterministic: each low-rank layer's exported multipliers (its
    scale at each kept component, 0 elsewhere) are its mask at the end of training, except in a layer whose
    rank the finalisation's c moved by rounding (|k - c k_hat| <= 1/2, plus one from the leftover), where they
    differ at exactly the components between the two sizes in the gate's order. Layers trained dense are
    exported dense. Where no rank moved, the logits agree to 1e-4. Catches a count the forward does not run
    (SoCo counting min(s, 1) of components it runs at full), an export in another order, scales dropped."""
    model, layers, shapes, _, _ = trained(method, trained_tiny, keep)
    with torch.no_grad():
        masks = {n: l.gate.mask(None).detach().clone() for n, l in layers.items() if not l.dense}
        k_hat = {n: layers[n].gate.k_hat().item() for n in masks}
        order = {n: layers[n].gate.order().clone() for n in masks}
        learn_masks.draw_masks(layers, {}, 0)
        logits_trained = model(heldout_ids).logits
        learn_masks.clear_masks(layers)
    c = base.fix_trained(layers, shapes, keep)["export_scale"]
    assert abs(c - 1) < 0.02, c  # the settle phase ends on the budget
    assert {n for n, l in layers.items() if l.dense} == set(layers) - set(masks)  # dense as trained
    moved = []
    with torch.no_grad():
        for n, mask in masks.items():
            l = layers[n]
            k, runs = l.index.numel(), int((mask != 0).sum())
            assert abs(k - c * k_hat[n]) <= 1.5, (n, k, k_hat[n], c)
            exported = torch.zeros_like(mask)
            exported[l.index] = l.scale()
            differ = set(((exported - mask).abs() > 1e-4).nonzero().squeeze(1).tolist())
            lo, hi = sorted((k, runs))
            assert differ == set(order[n][lo:hi].tolist()), (n, k, runs)
            moved += [n] if k != runs else []
        logits_fixed = model(heldout_ids).logits
    assert len(moved) <= len(masks) // 4, moved
    if not moved:
        assert ((logits_fixed - logits_trained).norm() / logits_trained.norm()).item() <= 1e-4


@pytest.mark.parametrize("keep", [0.6, 0.8])
@pytest.mark.parametrize("method", ["sigmoid", "hardconcrete"])
def test_a_sampled_mask_is_exported_as_its_most_probable_mask(method, keep, trained_tiny):
    """Sigmoid and (annealed) hard-concrete sample their masks: the export keeps, per layer, the components of
    largest logit (P(keep) = sigmoid(z), resp. sigmoid(log a - beta log(-gamma / zeta))), so the exported set
    and the most probable mask {i: P_i > 1/2} are nested, and their sizes and the trained count k_hat agree
    to a component (c rounds, the leftover adds one). Catches an export ordered by anything else, a count
    that is not the expected kept number, gates left far from 0 / 1 at the end of training."""
    model, layers, shapes, _, _ = trained(method, trained_tiny, keep)
    with torch.no_grad():
        P = {}
        for n, l in layers.items():
            if l.dense:
                continue
            g = l.gate
            P[n] = torch.sigmoid(g.z) if method == "sigmoid" else torch.sigmoid(g.log_alpha - g.shift())
        k_hat = {n: layers[n].gate.k_hat().item() for n in P}
    c = base.fix_trained(layers, shapes, keep)["export_scale"]
    for n, p in P.items():
        kept = set(layers[n].index.tolist())
        probable = set((p > 0.5).nonzero().squeeze(1).tolist())
        assert kept <= probable or probable <= kept, n
        assert abs(len(kept) - len(probable)) <= 1 and abs(len(kept) - c * k_hat[n]) <= 1.5, \
            (n, len(kept), len(probable), k_hat[n], c)


# ----------------------------------------------------------------------------- (b) through the files

@pytest.mark.parametrize("compensate", [0, 5])
@pytest.mark.parametrize("method", LEARNED)
def test_the_files_on_disk_give_the_trained_model(method, compensate, trained_run_dir, heldout_ids, tmp_path,
                                                  monkeypatch):
    """learn_masks.py (in-process, its parser and main) leaves its model in the state it exported; truncate.py
    folds components.safetensors into the saved layers; load_compressed and from_pretrained(trust_remote_code)
    rebuild it. All three give the same logits. Catches a wrong order, count or scale anywhere between the
    trained layers and the reloaded model (the in-memory fold alone cannot: both read the same index, scale)."""
    import shutil
    from transformers import AutoModelForCausalLM
    from truncate import load_compressed
    d = tmp_path / "run"
    for part in ("whiten", "decompose"):
        shutil.copytree(f"{trained_run_dir}/{part}", d / part)
    seen = {}
    real = learn_masks.load_inputs

    def spy(*a, **kw):  # the inputs learn_masks.main trains on: its model ends fixed and compensated
        seen.update(real(*a, **kw))
        return seen
    monkeypatch.setattr(learn_masks, "load_inputs", spy)
    stage("learn_masks.py", "--method", method, "--keep", KEEP, "--steps", 30, "--compensate", compensate,
          "--train_seqlen", 32, "--batch_size", 4, "--run_dir", d)
    stage("truncate.py", "--run_dir", d)
    with torch.no_grad():
        trained_logits = seen["model"](heldout_ids).logits
        loaded, _ = load_compressed(str(d / "compressed"))
        remote = AutoModelForCausalLM.from_pretrained(str(d / "compressed"), trust_remote_code=True).eval()
        for model in (loaded, remote):
            logits = model(heldout_ids).logits
            assert ((logits - trained_logits).norm() / trained_logits.norm()).item() <= 1e-4


# ----------------------------------------------------------------------------- (c) learning helps

def uniform_fixed(trained_tiny, keep=KEEP, compensate=COMPENSATE):
    """The uniform allocation's layers, fixed, with a Feed for `compensate` steps (bench/tiny_kl.py's baseline too)."""
    make, ids = trained_tiny
    model = make()
    factors, shapes = factorize(model, ids)
    args = learn_args("sigmoid", compensate=compensate)
    ranks = base.uniform_ranks(shapes, keep)
    layers = base.attach(model, factors, ranks)
    base.fix_prefix(layers, ranks)
    return model, layers, shapes, learn_masks.Feed(model, ids, args, compensate), args


@pytest.fixture(scope="module")
def uniform_kl(trained_tiny, heldout_ids):
    model, layers, _, data, args = uniform_fixed(trained_tiny)
    learn_masks.compensate(model, layers, data, args, torch.device("cpu"))
    return kl_to_teacher(model, layers, heldout_ids)


@pytest.mark.parametrize("method", LEARNED)
def test_learning_helps(method, trained_tiny, heldout_ids, uniform_kl):
    """Each learned method at its defaults (60 steps here), then COMPENSATE steps of compensation, against
    uniform + the same COMPENSATE steps, at 60% kept: KL(original || exported) on held-out windows must be
    lower. Catches a learner whose gradients push the wrong way, or whose export loses what it learned."""
    model, layers, shapes, data, args = trained(method, trained_tiny)
    base.fix_trained(layers, shapes, KEEP)
    learn_masks.compensate(model, layers, data, args, torch.device("cpu"))
    kl = kl_to_teacher(model, layers, heldout_ids)
    assert kl < uniform_kl, (method, kl, uniform_kl)
