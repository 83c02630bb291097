"""Benchmark: what one training step of learn_masks.py costs against its floor, one teacher forward
plus one student forward and backward of the masked model (the issue's target: at most 1.3 x), with and
without activation checkpointing, plus peak GPU memory on a GPU and this process's peak RSS (VmHWM: per
process, so run one --checkpointing setting per process to read each one's). Reads a run dir with whiten/
and decompose/ (python whiten.py && python decompose.py); the model is the one whiten/ was made from.
--memory_only runs one real training step and no timing (its peak memory, at a seventh of the time).

  python bench/step.py --run_dir runs/default --method ara --batch_size 2 --train_seqlen 128
  python bench/step.py --run_dir runs/llama2 --batch_size 2 --train_seqlen 2048     # the 7B target, GPU
  python bench/step.py --run_dir runs/scale7b/run_llama2-7b-1 --batch_size 1 --train_seqlen 2048 \
      --checkpointing off --memory_only                                            # one setting's peak RSS
"""
import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import learn_masks  # noqa: E402
from plumbing import artifacts  # noqa: E402
from plumbing import cli  # noqa: E402
from evaluation.speed import peak_rss_bytes  # noqa: E402



def floor_step(model, layers, x, device):
    """One teacher forward + one student forward and backward, nothing else (no budget, no optimiser)."""
    state = next(iter(layers.values())).state
    with torch.no_grad():
        state["teacher"] = True
        t = model(x, use_cache=False)
        state["teacher"] = False
    learn_masks.draw_masks(layers, {}, 0)
    s = model(x, use_cache=False)
    learn_masks.task_loss("kl", s, t, x, [-1]).backward()
    learn_masks.clear_masks(layers)


def timed(fn, device, repeat, warm=True):
    if warm:
        fn()
    cli.sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    cli.sync(device)
    return (time.perf_counter() - t0) / repeat


def measure(args, checkpointing):
    ns = argparse.Namespace(**{**vars(args), "checkpointing": "on" if checkpointing else "off"})
    whiten = artifacts.read_manifest(args.run_dir, "whiten", "python whiten.py")
    decomp = artifacts.read_manifest(args.run_dir, "decompose", "python decompose.py")
    shapes = {name: (v["m"], v["n"]) for name, v in decomp["layers"].items()}
    inputs = learn_masks.load_inputs(ns, whiten, decomp, needs_model=True)
    device, model = inputs["device"], inputs["model"]
    layers = learn_masks.attach_gates(model, inputs["factors"], shapes, args.keep, ns)
    x = learn_masks.window_chunks(inputs["ids"], args.train_seqlen)[:args.batch_size].to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def steps(n):  # the real training loop for n steps (its setup included, hence the difference below)
        run = argparse.Namespace(**{**vars(ns), "steps": n})
        learn_masks.train(model, layers, learn_masks.Feed(model, inputs["ids"], run, n), args.keep, run, device)
    if args.memory_only:
        steps(1)
        floor = step = None
    else:
        floor = timed(lambda: floor_step(model, layers, x, device), device, args.repeat)
        short = timed(lambda: steps(2), device, 1, warm=False)
        long = timed(lambda: steps(2 + args.repeat), device, 1, warm=False)
        step = (long - short) / args.repeat
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return floor, step, peak


def main(args):
    print("| checkpointing | tokens / step | floor s | step s | step / floor | peak GPU GiB | peak RSS GiB (process) |\n"
          "|---|---|---|---|---|---|---|")
    rows = []
    fmt = lambda v, f: "-" if v is None else f"{v:{f}}"  # noqa: E731
    for ckpt in {"both": (False, True), "off": (False,), "on": (True,)}[args.checkpointing]:
        floor, step, peak = measure(args, ckpt)
        ratio = None if floor is None else step / floor
        rows.append({"checkpointing": ckpt, "tokens": [args.batch_size, args.train_seqlen], "floor_s": floor,
                     "step_s": step, "step_over_floor": ratio, "peak_gpu_gib": peak, "peak_rss_gib": peak_rss_bytes() / 2**30})
        print(f"| {'on' if ckpt else 'off'} | {args.batch_size} x {args.train_seqlen} | {fmt(floor, '.3f')} | "
              f"{fmt(step, '.3f')} | {fmt(ratio, '.2f')} | {fmt(peak, '.1f')} | {rows[-1]['peak_rss_gib']:.2f} |",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run_dir", default="runs/default")
    p.add_argument("--method", default="ara")
    p.add_argument("--keep", type=float, default=0.8)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--train_seqlen", type=int, default=128)
    p.add_argument("--repeat", type=int, default=4, help="timed repetitions")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--checkpointing", choices=["both", "off", "on"], default="both",
                   help="activation checkpointing settings to measure, each in turn (peak RSS is the process's)")
    p.add_argument("--memory_only", action="store_true", help="one training step, no timing: its peak memory")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args()
    # every other learn_masks.py flag at its default (its own parser: no second copy of the defaults)
    defaults = {**vars(learn_masks.parser().parse_args([])), "steps": 1, "teacher_cache": "off"}
    main(argparse.Namespace(**{**defaults, **vars(args)}))
