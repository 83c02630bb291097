"""Stage 3: rank allocation under one global parameter budget (METHODS.md §2-§3).

--keep rho is the KEPT fraction of the compressed linears' parameters:
  rho = sum_l c(k_l) / sum_l m_l n_l,  c(k) = min(k (m + n), m n)      (METHODS.md §2)
Methods:
  uniform  SVD-LLM's allocation k_l = floor(rho m_l n_l / (m_l + n_l)) (METHODS.md §2)

Writes RUN_DIR/allocation/:
  ranks.json     {"layers": {name: rank or "dense"}, "kept_fraction_linear": ..., method, flags}
  manifest.json  decompose/ hash, method, seed, wall time

  python learn_masks.py --method uniform --keep 0.8
"""
import argparse
import json
import time

import common
from common import UserError


def allocate_uniform(shapes, rho, args):
    return common.uniform_ranks(shapes, rho), {}


METHODS = {"uniform": allocate_uniform}


def main(args):
    if not 0 < args.keep <= 1:
        raise UserError(f"--keep {args.keep} is outside (0, 1]: it is the KEPT fraction, e.g. 0.8 = 20% removed")
    if args.method not in METHODS:
        raise UserError(f"unknown --method {args.method!r}; choose from {', '.join(METHODS)}")
    whiten = common.read_manifest(args.run_dir, "whiten", "python whiten.py")
    decomp = common.read_manifest(args.run_dir, "decompose", "python decompose.py")
    common.check_parent(decomp, whiten, args.run_dir, "python decompose.py")
    shapes = {name: (v["m"], v["n"]) for name, v in decomp["layers"].items()}
    floor = sum(m + n for m, n in shapes.values()) / sum(m * n for m, n in shapes.values())
    if args.keep < floor:
        raise UserError(f"--keep {args.keep} is below {floor:.4f}, the cost of rank 1 in every layer; raise it")
    common.set_seed(args.seed)
    t0 = time.time()
    ranks, record = METHODS[args.method](shapes, args.keep, args)
    rho = common.kept_fraction(ranks, shapes)
    dense = sum(r == "dense" for r in ranks.values())
    print(f"{args.method}: {common.kept_removed(rho)} of the compressed linears "
          f"(target kept {args.keep:.2%}); {dense}/{len(ranks)} layers dense")
    out = common.stage_dir(args.run_dir, "allocation")
    with open(f"{out}/ranks.json", "w") as f:
        json.dump({"method": args.method, "keep": args.keep, "kept_fraction_linear": rho,
                   "layers": ranks, **record}, f, indent=1)
    common.commit_stage(args.run_dir, "allocation", out, {
        "inputs": {"decompose": decomp["hash"]}, "method": args.method, "keep": args.keep,
        "seed": args.seed, "flags": vars(args), "wall_time_s": round(time.time() - t0, 1)})


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="uniform", help="|".join(METHODS))
    p.add_argument("--keep", type=float, default=0.8, help="KEPT fraction of the compressed linears, in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="seed of every sampler")
    p.add_argument("--run_dir", default="runs/default", help="folder holding every stage's artifacts")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda ...")
    common.run_main(main, p.parse_args())
