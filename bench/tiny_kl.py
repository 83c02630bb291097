"""How far each learned method's exported model is from the original on the trained tiny Llama, against
uniform at the same budget and compensation: the margins behind tests/test_trained_is_exported.py's
"learning helps" test, over seeds, and how many layers the allocation moves away from the uniform ranks.

Same setting as that test (the tiny Llama trained on news text, 16 calibration windows, the last 8 windows
held out; 60 allocation steps, 20 compensation steps, 60% kept by default). Per run: KL(original || exported)
per token on the held-out windows before and after compensation, and the number of layers whose rank is
at least 10% away from uniform's (a dense layer counts as unmoved, as in test_export's SoCo test). The learned
runs are the test's own (test_trained_is_exported.trained).

  python bench/tiny_kl.py --methods sigmoid ara soco soco:sparsity=0 --seeds 0 1 2
  python bench/tiny_kl.py --methods soco --keep 0.8 --steps 300
"""
import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [HERE, os.path.join(HERE, "tests")]

import learn_masks  # noqa: E402
from conftest import news_windows, tiny_model, train_tiny  # noqa: E402
from methods import base  # noqa: E402
from test_export import kl_to_teacher  # noqa: E402
from test_learn import learn_args  # noqa: E402
from test_learn import factorize  # noqa: E402
from test_trained_is_exported import trained  # noqa: E402


def uniform_fixed(trained_tiny, keep, compensate):
    """The uniform allocation's layers, fixed, with a Feed for `compensate` steps."""
    make, ids = trained_tiny
    model = make()
    factors, shapes = factorize(model, ids)
    args = learn_args("sigmoid", compensate=compensate)
    ranks = base.uniform_ranks(shapes, keep)
    layers = base.attach(model, factors, ranks)
    base.fix_prefix(layers, ranks)
    return model, layers, shapes, learn_masks.Feed(model, ids, args, compensate), args


def run(make, calib, held, method, flags, keep, steps, compensate):
    """(KL before compensation, KL after, layers moved >= 10% from uniform's rank) of one run."""
    if method == "uniform":
        model, layers, shapes, data, args = uniform_fixed((make, calib), keep, compensate)
    else:
        model, layers, shapes, data, args = trained(method, (make, calib), keep, steps=steps, compensate=compensate,
                                                    **flags)
        base.fix_trained(layers, shapes, keep)
    uniform = base.uniform_ranks(shapes, keep)
    before = kl_to_teacher(model, layers, held)
    learn_masks.compensate(model, layers, data, args, torch.device("cpu"))
    ranks, _ = base.export(layers)
    moved = sum(abs((1.0 if ranks[n] == "dense" else ranks[n] / uniform[n]) - 1) >= 0.1
                for n in shapes if uniform[n] != "dense")
    return before, kl_to_teacher(model, layers, held), moved


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=["uniform", "sigmoid", "hardconcrete", "ara", "soco"],
                   help="method or method:flag=value:flag=value (flags as learn_masks.py's, without --)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--keep", type=float, default=0.6)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--compensate", type=int, default=20)
    a = p.parse_args()
    windows = news_windows()  # (N, 64)
    calib, held = windows[:16], windows[-8:]
    state = train_tiny(windows[16:-8]).state_dict()

    def make():  # conftest.trained_tiny's copies
        model = tiny_model("llama")
        model.load_state_dict(state)
        return model.eval()
    print(f"keep {a.keep}, {a.steps} + {a.compensate} steps\n")
    print("| method | seed | KL before compensation | KL after | layers moved |\n|---|---|---|---|---|")
    for spec in ["uniform"] + [m for m in a.methods if m != "uniform"]:
        method, *kv = spec.split(":")
        flags = {k: type(getattr(learn_args(method), k))(v) for k, v in (x.split("=") for x in kv)}
        for seed in a.seeds if method != "uniform" else a.seeds[:1]:
            before, after, moved = run(make, calib, held, method, {**flags, "seed": seed}, a.keep, a.steps,
                                       a.compensate)
            print(f"| {spec} | {seed} | {before:.4f} | {after:.4f} | {moved} |", flush=True)


if __name__ == "__main__":
    main()
