"""Benchmark: run allocation methods at several budgets on one whitened + decomposed run dir, then
truncate and evaluate each, and print one markdown table (method, kept, dense layers, ppl, zero-shot
accuracy when evaluate.py got --tasks, times).

Needs RUN_DIR/whiten and RUN_DIR/decompose (python whiten.py && python decompose.py). Each
(method, keep) pair overwrites RUN_DIR/allocation, compressed and metrics.json in turn; its metrics
are kept in RUN_DIR/NAME/{method}_{keep}.json and the table in RUN_DIR/NAME/table.md (--name, default bench).

  python bench/compare.py --methods uniform --keeps 0.9 0.8 0.6
  python bench/compare.py --methods uniform strs ara sigmoid hardconcrete soco --keeps 0.8 0.6 \\
      --eval_args "--tasks local_continuation --task_items 60"
  python bench/compare.py --table_only --methods ...      # rebuild the table from the saved rows
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stage(script, *args):
    t0 = time.time()
    subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], check=True)
    return time.time() - t0


def zero_shot(result):
    return " ".join(f"{v['acc']:.3f}" for v in result.get("zero_shot", {}).values()) or "-"


def row(metrics):
    wall = metrics["bench_wall_s"]
    return (f"| {metrics['method']} | {metrics['keep']:.2f} | {metrics['kept_fraction_linear']:.2%} / "
            f"{1 - metrics['kept_fraction_linear']:.2%} | {metrics['kept_fraction_model']:.2%} | "
            f"{metrics['layers_dense']}/{metrics['layers']} | {metrics['compressed']['ppl']:.2f} | "
            f"{zero_shot(metrics['compressed'])} | {metrics.get('steps', '-')} | {wall['allocation']:.0f} | "
            f"{wall['truncate']:.0f} | {wall['evaluate']:.0f} |")


def run_one(args, method, keep, out):
    wall = {"allocation": stage("learn_masks.py", "--method", method, "--keep", keep,
                                "--run_dir", args.run_dir, *args.learn_args.split())}
    wall["truncate"] = stage("truncate.py", "--run_dir", args.run_dir)
    wall["evaluate"] = stage("evaluate.py", "--run_dir", args.run_dir, *args.eval_args.split())
    metrics = json.load(open(os.path.join(args.run_dir, "metrics.json")))
    ranks = json.load(open(os.path.join(args.run_dir, "allocation", "ranks.json")))
    metrics.update(steps=ranks.get("steps", ranks.get("ppl_passes", "-")), bench_wall_s=wall)
    shutil.copy(os.path.join(args.run_dir, "allocation", "ranks.json"), os.path.join(out, f"{method}_{keep}_ranks.json"))
    json.dump(metrics, open(os.path.join(out, f"{method}_{keep}.json"), "w"), indent=1)


def main(args):
    out = os.path.join(args.run_dir, args.name)
    os.makedirs(out, exist_ok=True)
    rows = []
    for method in args.methods:
        for keep in args.keeps:
            if not args.table_only:
                run_one(args, method, keep, out)
            rows.append(json.load(open(os.path.join(out, f"{method}_{keep}.json"))))
    whiten = json.load(open(os.path.join(args.run_dir, "whiten", "manifest.json")))
    decomp = json.load(open(os.path.join(args.run_dir, "decompose", "manifest.json")))
    first = rows[0]
    table = "\n".join([
        f"original: ppl {first['original']['ppl']:.2f}, zero-shot acc {zero_shot(first['original'])}; "
        f"eval {first['eval']}; whiten {whiten['wall_time_s']} s and decompose {decomp['wall_time_s']} s "
        "(once for all rows)", "",
        "| method | keep | kept / removed (linears) | kept (model) | dense layers | ppl | zero-shot acc | steps "
        "| allocation s | truncate s | evaluate s |",
        "|---|---|---|---|---|---|---|---|---|---|---|", *map(row, rows)])
    open(os.path.join(out, "table.md"), "w").write(table + "\n")
    print(table)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=["uniform"], help="allocation methods of learn_masks.py")
    p.add_argument("--keeps", nargs="+", type=float, default=[0.9, 0.8, 0.6], help="KEPT fractions")
    p.add_argument("--run_dir", default="runs/default", help="run dir with whiten/ and decompose/ in it")
    p.add_argument("--learn_args", default="", help="extra flags for learn_masks.py, one string: '--steps 200'")
    p.add_argument("--eval_args", default="", help="extra flags for evaluate.py, one string: '--max_windows 80'")
    p.add_argument("--name", default="bench", help="sub-folder of RUN_DIR for the rows and table.md")
    p.add_argument("--table_only", action="store_true", help="only rebuild the table from saved rows")
    main(p.parse_args())
