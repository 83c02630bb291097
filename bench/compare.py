"""Benchmark: run allocation methods at several budgets on one whitened + decomposed run dir, then
truncate and evaluate each, and print one markdown table (method, flags, kept, dense layers, ppl,
zero-shot accuracy when evaluate.py got --tasks, the training's budget gap, times), plus mean and
spread over seeds where a (method, flags, keep) ran with several.

Needs RUN_DIR/whiten and RUN_DIR/decompose (python whiten.py && python decompose.py). Each run
overwrites RUN_DIR/allocation, compressed and metrics.json in turn; its metrics are kept in
RUN_DIR/NAME/ (--name, default bench), one JSON per run, and the table (built from every JSON in that
folder and --split, so several invocations add up) in RUN_DIR/NAME/table_SPLIT.md. --split is required:
dev numbers choose defaults, test numbers are reported, and one table never mixes them.

A method may carry its own flags after a colon, commas for spaces: `sigmoid:--guidance,0`.

  python bench/compare.py --split dev --methods uniform energy svdllm2 --keeps 0.8 0.6
  python bench/compare.py --split dev --methods ara sigmoid sigmoid:--guidance,0 --keeps 0.8 --seeds 0 1 2
  python bench/compare.py --split test --table_only         # rebuild the test table from the saved runs
"""
import argparse
import glob
import json
import os
import re
import shutil
import statistics
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


def removed(m, rows):
    """(ppl_uniform - ppl) / (ppl_uniform - ppl_original) at the same keep: the share of uniform's damage removed."""
    base = [r for r in rows if r["method"] == "uniform" and not r["flags"] and r["keep"] == m["keep"]]
    if not base:
        return "-"
    u, o = base[0]["compressed"]["ppl"], m["original"]["ppl"]
    return f"{(u - m['compressed']['ppl']) / (u - o):.0%}"


def row(m, rows):
    wall = m["bench_wall_s"]
    gap = "-" if m.get("train_budget_gap") is None else f"{m['train_budget_gap']:+.4f}"
    return (f"| {m['method']} | {m['flags'] or '-'} | {m['seed']} | {m['keep']:.2f} | "
            f"{m['kept_fraction_linear']:.2%} / {1 - m['kept_fraction_linear']:.2%} | {m['kept_fraction_model']:.2%} | "
            f"{m['layers_dense']}/{m['layers']} | {m['compressed']['ppl']:.2f} | {removed(m, rows)} | {zero_shot(m['compressed'])} | "
            f"{gap} | {m.get('steps', '-')} | {m.get('compensate', 0)} | {wall['allocation']:.0f} | {wall['evaluate']:.0f} |")


def run_one(args, spec, keep, seed, out):
    method, _, flags = spec.partition(":")
    flags = flags.replace(",", " ").split()
    wall = {"allocation": stage("learn_masks.py", "--method", method, "--keep", keep, "--seed", seed,
                                "--run_dir", args.run_dir, *flags, *args.learn_args.split())}
    wall["truncate"] = stage("truncate.py", "--run_dir", args.run_dir)
    wall["evaluate"] = stage("evaluate.py", "--run_dir", args.run_dir, "--split", args.split, *args.eval_args.split())
    metrics = json.load(open(os.path.join(args.run_dir, "metrics.json")))
    ranks = json.load(open(os.path.join(args.run_dir, "allocation", "ranks.json")))
    metrics.update(steps=ranks.get("steps", ranks.get("ppl_passes", "-")), compensate=ranks.get("compensate", 0),
                   bench_wall_s=wall, seed=seed,
                   flags=" ".join(flags + args.learn_args.split()), train_budget_gap=ranks.get("train_budget_gap"),
                   strs_tokens_per_pass=ranks.get("strs_tokens_per_pass"))
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{spec}_{keep}_s{seed}_{args.split}")
    shutil.copy(os.path.join(args.run_dir, "allocation", "ranks.json"), os.path.join(out, f"{name}.ranks"))
    json.dump(metrics, open(os.path.join(out, f"{name}.json"), "w"), indent=1)


def seed_summary(rows):
    """mean and spread (min..max, sample std) of ppl over seeds, per (method, flags, keep) with > 1 seed."""
    groups = {}
    for m in rows:
        groups.setdefault((m["method"], m["flags"], m["keep"]), []).append(m["compressed"]["ppl"])
    lines = [f"| {meth} | {flags or '-'} | {keep:.2f} | {len(p)} | {statistics.mean(p):.2f} | {min(p):.2f} .. "
             f"{max(p):.2f} | {statistics.stdev(p):.2f} |" for (meth, flags, keep), p in groups.items() if len(p) > 1]
    if not lines:
        return []
    return ["", "| method | flags | keep | seeds | mean ppl | min .. max | std |", "|---|---|---|---|---|---|---|", *lines]


def main(args):
    out = os.path.join(args.run_dir, args.name)
    os.makedirs(out, exist_ok=True)
    if not args.table_only:
        for spec in args.methods:
            for keep in args.keeps:
                for seed in args.seeds:
                    run_one(args, spec, keep, seed, out)
    rows = []
    for path in glob.glob(os.path.join(out, "*.json")):
        m = json.load(open(path))
        if "compensate" not in m and os.path.isfile(path[:-5] + ".ranks"):  # a row saved before the column
            ranks = json.load(open(path[:-5] + ".ranks"))
            m.update(compensate=ranks.get("compensate", 0), steps=len(ranks.get("curve", [])) or m["steps"])
        if "split" not in m["eval"]:  # made before the splits: its text is unknown, never counted as either
            sys.exit(f"{path} has no eval.split (scored before the calibration / dev / test splits): delete it or "
                     "re-run that row")
        if m["eval"]["split"] == args.split:  # a table never mixes dev and test numbers
            rows.append(m)
    rows.sort(key=lambda m: (-m["keep"], m["method"], m["flags"], m["seed"]))
    whiten = json.load(open(os.path.join(args.run_dir, "whiten", "manifest.json")))
    decomp = json.load(open(os.path.join(args.run_dir, "decompose", "manifest.json")))
    first = rows[0]
    table = "\n".join([
        f"{args.split.upper()} split. original: ppl {first['original']['ppl']:.2f}, zero-shot acc {zero_shot(first['original'])}; "
        f"eval {first['eval']}; whiten {whiten['wall_time_s']} s and decompose {decomp['wall_time_s']} s "
        "(once for all rows)", "",
        "| method | flags | seed | keep | kept / removed (linears) | kept (model) | dense layers | ppl | uniform's "
        "increase removed | zero-shot acc | train gap | steps | compensation steps | allocation s | evaluate s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|", *(row(m, rows) for m in rows),
        *seed_summary(rows)])
    open(os.path.join(out, f"table_{args.split}.md"), "w").write(table + "\n")
    print(table)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=["uniform"],
                   help="allocation methods of learn_masks.py, each optionally METHOD:--flag,value")
    p.add_argument("--keeps", nargs="+", type=float, default=[0.9, 0.8, 0.6], help="KEPT fractions")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="learn_masks.py --seed values, one run each")
    p.add_argument("--run_dir", default="runs/default", help="run dir with whiten/ and decompose/ in it")
    p.add_argument("--learn_args", default="", help="extra flags for learn_masks.py, one string: '--steps 200'")
    p.add_argument("--eval_args", default="", help="extra flags for evaluate.py, one string: '--max_windows 80'")
    p.add_argument("--split", choices=["dev", "test"], required=True,
                   help="the evaluation split: dev to choose defaults, test for the reported tables")
    p.add_argument("--name", default="bench", help="sub-folder of RUN_DIR for the runs and table.md")
    p.add_argument("--table_only", action="store_true", help="only rebuild the table from the saved runs")
    main(p.parse_args())
