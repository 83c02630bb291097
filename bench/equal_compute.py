"""The margins behind tests/test_trained_is_exported.py's test (c): each learned method at its defaults against
the uniform allocation given as many teacher steps, all of them compensation, on the trained tiny Llama with its
first decoder block made rank 2 (the test's sensitive_tiny), seeds 0, 1, 2. Per run: KL(original || the model
truncate.py rebuilds from the export) per token on the held-out windows, uniform's, and their ratio.

  python bench/equal_compute.py --methods sigmoid hardconcrete ara soco --seeds 0 1 2
"""
import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [HERE, os.path.join(HERE, "tests")]

import methods  # noqa: E402
import test_trained_is_exported as t  # noqa: E402
from conftest import news_windows, tiny_model, train_tiny  # noqa: E402
from test_learn import learn, learn_args  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=["sigmoid", "hardconcrete", "ara", "soco"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--keep", type=float, default=t.KEEP)
    a = p.parse_args()
    windows = news_windows()  # (N, 64): conftest.trained_tiny's split
    calib, held = windows[:16], windows[-8:]
    state = train_tiny(windows[16:-8]).state_dict()

    def make():
        model = tiny_model("llama")
        model.load_state_dict(state)
        return model.eval()
    build, ids, factors, shapes = t.sensitive((make, calib))
    print(f"keep {a.keep}; block 0 at rank {t.LOW}\n")
    print("| method | steps | seed | KL learned | KL uniform + as many compensation steps | ratio |\n|---|---|---|---|---|---|")
    for method in a.methods:
        cls = methods.GATES[method]
        for seed in a.seeds:
            args = learn_args(method, steps=cls.steps, compensate=cls.compensate, seed=seed)
            _, _, ranks, components = learn(build(), factors, shapes, a.keep, args, ids)
            kl = t.exported_kl(build, ranks, factors, components, held)
            kl_u = t.uniform_compensated_kl((build, ids, factors, shapes), a.keep, cls.steps + cls.compensate, seed,
                                            held)
            print(f"| {method} | {cls.steps} + {cls.compensate} | {seed} | {kl:.5f} | {kl_u:.5f} | {kl / kl_u:.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
