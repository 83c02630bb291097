"""Stage 5: evaluate the original and the compressed model (METHODS.md §4).

Perplexity on held-out text: the evaluation split never overlaps the calibration split
(embedded / local text: every 5th document; wikitext2: test vs train; c4: validation vs train).
Non-overlapping --seqlen windows; ppl = exp(sum NLL / #predicted tokens). A non-finite loss is an
error, never a dropped window (METHODS.md §4). Also parameter counts and kept fractions
(of the compressed linears and of the whole model, printed as kept AND removed).

Writes RUN_DIR/metrics.json: original.{ppl, params}, compressed.{ppl, params}, kept_fraction_linear,
kept_fraction_model, eval settings, wall time of every stage.

  python evaluate.py --run_dir runs/default
"""
import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
from common import UserError
from truncate import count_params, load_compressed


def eval_windows(stream, seqlen, max_windows):
    """Non-overlapping windows (N, seqlen) of the token stream; the tail shorter than seqlen is unused."""
    n = len(stream) // seqlen
    if n == 0:
        raise UserError(f"evaluation text has {len(stream)} tokens, less than one --seqlen {seqlen} window; "
                        "lower --seqlen or pass more text with --data")
    n = n if max_windows <= 0 else min(n, max_windows)
    return stream[:n * seqlen].view(n, seqlen)


@torch.no_grad()
def perplexity(model, windows, batch_size, device, label):
    """exp(mean next-token NLL) over all windows; raises on a non-finite loss."""
    nll, count = 0.0, 0
    for i in tqdm(range(0, len(windows), batch_size), desc=f"ppl {label}"):
        x = windows[i:i + batch_size].to(device)  # (B, T)
        logits = model(x).logits.float()  # (B, T, V)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss on {label} model, windows {i}..{i + len(x) - 1}")
        nll, count = nll + loss.item(), count + x[:, 1:].numel()
    return math.exp(nll / count)


def original_metrics(model, windows, args, device, whiten_hash):
    """The original model's numbers, cached in RUN_DIR keyed on everything they depend on."""
    key = f"{whiten_hash}|{args.data}|{args.seqlen}|{len(windows)}|{device.type}"
    path = os.path.join(args.run_dir, "original_eval.json")
    cache = json.load(open(path)) if os.path.isfile(path) else {}
    if key not in cache:
        cache[key] = {"ppl": perplexity(model, windows, args.batch_size, device, "original"),
                      "params": count_params(model)}
        with open(path, "w") as f:
            json.dump(cache, f, indent=1)
    return cache[key]


def main(args):
    whiten = common.read_manifest(args.run_dir, "whiten", "python whiten.py")
    comp = common.read_manifest(args.run_dir, "compressed", "python truncate.py")
    device = common.pick_device(args.device)
    model, tok = common.load_model(whiten["model"], device)
    if common.config_hash(model) != whiten["config_hash"]:
        raise UserError(f"model {whiten['model']!r} changed since whiten/ was made: re-run the pipeline")
    windows = eval_windows(common.token_stream(tok, common.load_documents(args.data, "eval")),
                           args.seqlen, args.max_windows)
    print(f"evaluating on {windows.numel()} held-out tokens ({len(windows)} x {args.seqlen}) of {args.data!r}")
    t0 = time.time()
    original = original_metrics(model, windows, args, device, whiten["hash"])
    del model
    model, _ = load_compressed(f"{args.run_dir}/compressed", device)
    compressed = {"ppl": perplexity(model, windows, args.batch_size, device, "compressed"),
                  "params": count_params(model)}
    walls = {s: json.load(open(f"{args.run_dir}/{s}/manifest.json")).get("wall_time_s")
             for s in ("whiten", "decompose", "allocation", "compressed")}
    ranks = json.load(open(f"{args.run_dir}/compressed/ranks.json"))
    metrics = {"original": original, "compressed": compressed, "method": ranks["method"], "keep": ranks["keep"],
               "kept_fraction_linear": comp["kept_fraction_linear"],
               "kept_fraction_model": compressed["params"] / original["params"],
               "layers_dense": sum(r == "dense" for r in ranks["layers"].values()),
               "layers": len(ranks["layers"]),
               "eval": {"data": args.data, "seqlen": args.seqlen, "windows": len(windows),
                        "tokens": windows.numel(), "device": str(device)},
               "wall_time_s": {**walls, "evaluate": round(time.time() - t0, 1)}}
    tmp = os.path.join(args.run_dir, ".metrics.json.tmp")
    with open(tmp, "w") as f:
        json.dump(metrics, f, indent=1)
    os.replace(tmp, os.path.join(args.run_dir, "metrics.json"))
    print(f"\n| model | params | kept (linears) | kept (model) | ppl |\n|---|---|---|---|---|\n"
          f"| original | {original['params']:,} | 100% | 100% | {original['ppl']:.2f} |\n"
          f"| compressed ({metrics['method']}) | {compressed['params']:,} | "
          f"{metrics['kept_fraction_linear']:.2%} | {metrics['kept_fraction_model']:.2%} | {compressed['ppl']:.2f} |")
    print(f"removed: {1 - metrics['kept_fraction_linear']:.2%} of the linears, "
          f"{1 - metrics['kept_fraction_model']:.2%} of the model; wrote {args.run_dir}/metrics.json")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="embedded", help="'embedded', 'wikitext2', 'c4' or a .txt/.jsonl path")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per evaluation window")
    p.add_argument("--max_windows", type=int, default=40, help="evaluate at most this many windows (0 = all)")
    p.add_argument("--batch_size", type=int, default=4, help="windows per forward pass")
    p.add_argument("--run_dir", default="runs/default", help="folder holding every stage's artifacts")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda ...")
    common.run_main(main, p.parse_args())
