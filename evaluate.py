"""Stage 5: evaluate the original and the compressed model (docs/METHODS.md §4).

Perplexity on held-out text, --split dev (for choosing defaults) or test (the reported numbers); no document
is in two of calibration, dev and test (embedded / local text: documents i % 5 == 3 dev, i % 5 == 4 test, the
rest calibration; wikitext2: train / validation / test; c4: train / validation 2000-3999 / validation 0-1999).
Non-overlapping --seqlen windows; ppl = exp(sum NLL / #predicted tokens). --protocol paper is the
papers' setting (docs/METHODS.md §4): WikiText-2 test joined with blank lines (or C4: the first 2000 validation
documents, as SVD-LLM's evaluator), every 2048-token window, float32. Every printed perplexity names
its protocol: data, split, window length, windows, tokens, dtype. A non-finite loss is an
error, never a dropped window (docs/METHODS.md §4). Also parameter counts and kept fractions
(of the compressed linears and of the whole model, printed as kept AND removed). --speed: evaluation/speed.py.

Writes RUN_DIR/metrics.json: original.{ppl, params}, compressed.{ppl, params}, kept_fraction_linear,
kept_fraction_model, eval settings, wall time of every stage; RUN_DIR/heatmap.png, the allocation scored
(evaluation/plots.py; a learned run's r_l over training: python -m evaluation.plots --trajectory RUN_DIR/allocation/ranks.json).

  python evaluate.py --run_dir runs/default
  python evaluate.py --run_dir runs/llama2 --protocol paper     # online: WikiText-2, as the papers report
"""
import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from evaluation import plots
from evaluation.speed import print_speed, speed_report
from evaluation.tasks import prepare_tasks, zero_shot
from plumbing import artifacts, cli, loading
from plumbing.cli import UserError
from plumbing.loading import decoder_blocks, is_linear
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
        x = windows[i:i + batch_size].to(loading.input_device(model))  # (B, T)
        logits = model(x, use_cache=False).logits.float()  # (B, T, V); no KV cache: never reused
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
        if not torch.isfinite(loss):
            raise UserError(f"non-finite loss on the {label} model, windows {i}..{i + len(x) - 1} (never dropped, "
                            "docs/METHODS.md §4): the model is broken here; check the allocation or raise --keep")
        nll, count = nll + loss.item(), count + x[:, 1:].numel()
    return math.exp(nll / count)


PROTOCOLS = {  # what --protocol fixes; flags left unset take these values
    "default": {"data": "embedded", "seqlen": 512, "max_windows": 40, "dtype": "auto"},
    # the papers' (SVD-LLM, ARA; docs/METHODS.md §4): WikiText-2 test joined with blank lines (or --data c4: the first
    # 2000 validation documents, as SVD-LLM's evaluator), every non-overlapping 2048-token window, float32
    "paper": {"data": "wikitext2", "seqlen": 2048, "max_windows": 0, "dtype": "float32"},
}


def resolve_protocol(args):
    """The flags with --data / --seqlen / --max_windows / --dtype filled from --protocol where not given (a new
    namespace); under 'paper' an explicit flag that contradicts it is refused (a number reported as 'paper
    protocol' must be one)."""
    fixed = PROTOCOLS[args.protocol]
    for key, value in fixed.items():
        given = getattr(args, key)
        if args.protocol == "paper" and given is not None and given != value and not (key == "data" and given == "c4"):
            raise UserError(f"--protocol paper fixes --{key} {value}; drop --{key} {given} (or use --protocol default)")
    return argparse.Namespace(**{**vars(args), **{k: v for k, v in fixed.items() if getattr(args, k) is None}})


def split_rule(data, split):
    """Which documents a split holds, in words (printed and recorded with every perplexity)."""
    if data in loading.HUB_SPLITS:
        return f"the {loading.HUB_SPLITS[data][split]} split"
    return f"documents i % 5 == {4 if split == 'test' else 3}"


def protocol_line(ev):
    """What every printed perplexity says about how it was measured."""
    windows = f"{ev['windows']} x {ev['seqlen']} tokens" + (" (every window)" if ev["all_windows"] else "")
    return (f"protocol {ev['protocol']}: {ev['data']} {ev['split'].upper()} split ({ev['split_rule']}), "
            f"non-overlapping windows {windows}, "
            f"{ev['tokens']:,} tokens, {ev['dtype']}")


# ----------------------------------------------------------------------------- main

def linear_census(model):
    """What the budget counts, read off the model itself (never copied from an upstream manifest): the weight
    parameters of the compressed linears inside the decoder blocks (m n dense, k (m + n) low-rank), how many
    such layers there are and how many are low-rank."""
    params = layers = lowrank = 0
    for block in decoder_blocks(model):
        for mod in block.modules():
            if type(mod).__name__ == "LowRankLinear":  # by name: a folder's own copy of the class counts too
                params, layers, lowrank = params + mod.A.numel() + mod.B.numel(), layers + 1, lowrank + 1
            elif is_linear(mod):
                params, layers = params + mod.weight.numel(), layers + 1
    return {"linear_params": params, "layers": layers, "lowrank_layers": lowrank}


def measure(model, tok, windows, tasks, manager, args, device, label):
    out = {"ppl": perplexity(model, windows, args.batch_size, device, label), "params": count_params(model),
           **linear_census(model)}
    if tasks:
        out["zero_shot"] = zero_shot(model, tok, tasks, manager, args.batch_size)
    return out


def original_metrics(model, tok, windows, tasks, manager, task_keys, args, device, whiten):
    """The original model's numbers, cached in RUN_DIR keyed on the CONTENTS they depend on: the
    weights, the exact evaluation tokens, each task's items. An unreadable cache is rebuilt."""
    dtype = str(next(model.parameters()).dtype)
    key = "|".join(map(str, ["census", whiten["weights_hash"], whiten["config_hash"], artifacts.tensor_hash(windows),
                             device.type, dtype,
                             *task_keys]))
    path = os.path.join(args.run_dir, "original_eval.json")
    try:
        with open(path) as f:
            cache = json.load(f)
        assert isinstance(cache, dict)
    except (OSError, ValueError, AssertionError):
        cache = {}
    if key not in cache:
        cache[key] = measure(model, tok, windows, tasks, manager, args, device, "original")
        artifacts.write_json(path, cache)
    return cache[key]


def check_config(original, compressed, run_dir):
    """compressed/config.json is the original model's config plus lowrank_ranks and auto_map (its path and the
    dtype it was loaded in aside): any other difference (an edit, a tool's bug) would score another model
    under this one's name."""
    skip = {"_name_or_path", "lowrank_ranks", "auto_map", "dtype", "torch_dtype"}
    differ = sorted(k for k in (set(original) | set(compressed)) - skip if original.get(k) != compressed.get(k))
    if differ:
        raise UserError(f"{run_dir}/compressed/config.json differs from the original model's config in "
                        f"{differ[0]!r}: re-run `python truncate.py --run_dir {run_dir}`")


def label(alloc, run_dir):
    """The method and the budget asked for, as learn_masks.py recorded them in its manifest and its ranks.json
    (both read and cross-checked: a row's label is never taken from one edited file)."""
    rerun = f"python learn_masks.py --run_dir {run_dir}"
    ranks = artifacts.read_json(f"{run_dir}/allocation/ranks.json", rerun, artifacts.RANKS)
    for key in ("method", "keep"):
        if ranks[key] != alloc[key]:
            raise UserError(f"{run_dir}/allocation: ranks.json and manifest.json disagree on {key!r} ({ranks[key]!r} "
                            f"vs {alloc[key]!r}): re-run `{rerun}`")
    return ranks


def check_chain(run_dir):
    """compressed <- allocation <- decompose <- whiten: every link made from what is on disk now."""
    return artifacts.read_chain(run_dir, "whiten", "decompose", "allocation", "compressed",  # files not read here:
                                reads={"whiten": (), "decompose": (), "allocation": ("ranks.json",)})  # size only


def main(args):
    args = resolve_protocol(args)
    loading.check_dtype_placement(args.dtype, args.device_map, " (or use --protocol default)")
    chain = check_chain(args.run_dir)
    whiten, comp = chain["whiten"], chain["compressed"]
    ranks = label(chain["allocation"], args.run_dir)
    device = cli.pick_device(args.device)
    dtype, placement = cli.DTYPES[args.dtype], {"device_map": args.device_map} if args.device_map else {}
    model = loading.load_model(whiten["model"], device, **placement)
    tok = loading.load_tokenizer(whiten["model"], model)
    artifacts.check_model(model, whiten)  # in the model's own dtype (whiten/ fingerprinted that), then cast
    if dtype is None and not args.device_map:
        dtype = cli.compute_dtype(model.dtype, device)  # auto: the model's own, on the CPU float32 for bf16 / fp16
    if dtype is not None:
        model.to(dtype)
    dtype_name = str(next(model.parameters()).dtype).replace("torch.", "")
    cli.check_seqlen(model.config, args.seqlen)
    docs, where = loading.load_documents(args.data, args.split)
    stream = loading.token_stream(tok, docs)
    windows = eval_windows(stream, args.seqlen, args.max_windows)
    ev = {"protocol": args.protocol, "data": args.data, "split": args.split,
          "split_rule": split_rule(args.data, args.split), "seqlen": args.seqlen, "windows": len(windows),
          "all_windows": len(windows) == len(stream) // args.seqlen, "tokens": windows.numel(), "dtype": dtype_name,
          "documents": where["documents"], "data_sha256": where["data_sha256"],
          "calibration_text": where["data_sha256"] == whiten["data_sha256"],
          "device": str(device) if not args.device_map else f"device_map={args.device_map}"}
    print(f"evaluating: {protocol_line(ev)}")
    if not ev["calibration_text"]:  # by content, not by the name typed
        if os.path.isfile(args.data) and os.path.abspath(args.data) == whiten["data"]:
            raise UserError(f"{args.data} changed since whiten.py read it (another content hash), so its splits no "
                            f"longer hold: re-run the pipeline from `python whiten.py --data {args.data} --run_dir "
                            f"{args.run_dir}`")
        print(f"note: {args.data!r} is not the text whiten.py calibrated on ({whiten['data']!r}): its {args.split} "
              "documents are held out from nothing this run trained on, but are not that text's")
    elif isinstance(where["documents"], list) and set(where["documents"]) & set(whiten["documents"]):
        raise UserError(f"the {args.split} documents overlap the calibration documents of whiten/: re-run "
                        f"`python whiten.py --run_dir {args.run_dir}`")
    tasks, manager, task_keys = ([], None, []) if not args.tasks else \
        prepare_tasks(args.tasks.split(","), stream, tok, args.run_dir, args.task_items)
    t0 = time.time()
    original = original_metrics(model, tok, windows, tasks, manager, task_keys, args, device, whiten)
    config = model.config.to_dict()
    del model
    model, _ = load_compressed(f"{args.run_dir}/compressed", device, **({"dtype": dtype} if dtype else {}), **placement)
    check_config(config, model.config.to_dict(), args.run_dir)
    compressed = measure(model, tok, windows, tasks, manager, args, device, "compressed")
    del model
    speed = speed_report(args.run_dir, whiten["model"], device, args.speed_batch, args.speed_seqlen,
                         args.speed_new_tokens) if args.speed else None
    if artifacts.file_hash(f"{args.run_dir}/compressed/manifest.json") != comp["hash"]:  # lists every file's hash
        raise UserError(f"{args.run_dir}/compressed changed while evaluate.py ran: re-run evaluate.py")
    metrics = {"original": original, "compressed": compressed, "method": ranks["method"], "keep": ranks["keep"],
               "kept_fraction_linear": compressed["linear_params"] / original["linear_params"],
               "kept_fraction_model": compressed["params"] / original["params"],
               "layers_dense": compressed["layers"] - compressed["lowrank_layers"],
               "layers": original["layers"],
               "eval": ev,
               "chain": {stage: m["hash"] for stage, m in chain.items()},  # which artifacts these numbers describe
               "wall_time_s": {**{s: m.get("wall_time_s") for s, m in chain.items()},
                               "evaluate": round(time.time() - t0, 1)}}
    if speed:
        metrics["speed"] = speed
    artifacts.write_json(os.path.join(args.run_dir, "metrics.json"), metrics)
    shapes = {name: (v["m"], v["n"]) for name, v in chain["decompose"]["layers"].items()}
    with artifacts.one_line(f"python learn_masks.py --run_dir {args.run_dir}", f"{args.run_dir}/allocation/ranks.json: "):
        artifacts.same_keys(ranks["layers"], shapes, "'layers'", "decompose/manifest.json")
    plots.write_allocation_plots({**{k: ranks[k] for k in ("method", "keep", "layers")}, "shapes": shapes,  # read,
                                  "kept_fraction_linear": metrics["kept_fraction_linear"]}, args.run_dir)  # checked
    print(f"\nperplexity, {protocol_line(ev)}")
    print(f"| model | params | kept (linears) | kept (model) | ppl |\n|---|---|---|---|---|\n"
          f"| original | {original['params']:,} | 100% | 100% | {original['ppl']:.2f} |\n"
          f"| compressed ({metrics['method']}) | {compressed['params']:,} | "
          f"{metrics['kept_fraction_linear']:.2%} | {metrics['kept_fraction_model']:.2%} | {compressed['ppl']:.2f} |")
    for t in tasks:
        print(f"zero-shot {t}: acc {original['zero_shot'][t]['acc']:.4f} -> {compressed['zero_shot'][t]['acc']:.4f}, "
              f"acc_norm {original['zero_shot'][t].get('acc_norm', float('nan')):.4f} -> "
              f"{compressed['zero_shot'][t].get('acc_norm', float('nan')):.4f}")
    if speed:
        print_speed(speed, metrics["kept_fraction_model"])
    print(f"removed: {1 - metrics['kept_fraction_linear']:.2%} of the linears, "
          f"{1 - metrics['kept_fraction_model']:.2%} of the model; wrote {args.run_dir}/metrics.json")


def parser():
    """The flags (a function, so the tests can parse and run a stage in-process)."""
    p = cli.Parser(description=__doc__.split("\n")[0])
    p.add_argument("--protocol", choices=list(PROTOCOLS), default="default",
                   help="default: embedded text, 40 x 512 tokens, the model's dtype (float32 on the CPU for bf16 / fp16); paper: WikiText-2 test (or --data "
                   "c4), every 2048-token window, float32 (docs/METHODS.md §4)")
    p.add_argument("--data", default=None, help="'embedded', 'wikitext2', 'c4' or a .txt/.jsonl path (default: the protocol's)")
    p.add_argument("--split", choices=["dev", "test"], default="test",
                   help="dev: the documents defaults are chosen on; test: the reported numbers (docs/METHODS.md §4)")
    p.add_argument("--seqlen", type=cli.LENGTH, default=None, help="tokens per evaluation window (default: the protocol's)")
    p.add_argument("--max_windows", type=cli.number(int, 0), default=None,
                   help="evaluate at most this many windows, 0 = all (default: the protocol's)")
    p.add_argument("--dtype", choices=list(cli.DTYPES), default=None,
                   help="dtype both models are evaluated in (default: the protocol's; auto = the model's own, but float32 "
                   "on the CPU for a bf16 / fp16 model: its matmuls are far faster there)")
    p.add_argument("--device_map", choices=["auto"], default=None,
                   help="auto: accelerate spreads each model over every visible GPU (models past one GPU; no CPU offload)")
    p.add_argument("--batch_size", type=cli.COUNT, default=4, help="windows per forward pass")
    p.add_argument("--tasks", default="", help="comma-separated zero-shot tasks through lm-eval: harness names "
                   "(online), local_continuation (built from the held-out text; NOT a standard benchmark), "
                   "local:PATH.jsonl (lines {context, choices, label})")
    p.add_argument("--task_items", type=cli.COUNT, default=100, help="items of local_continuation")
    p.add_argument("--speed", action="store_true", help="also measure prefill/decode tokens/s, peak memory, disk size")
    p.add_argument("--speed_batch", type=cli.COUNT, default=8, help="the larger batch of the speed test (batch 1 always)")
    p.add_argument("--speed_seqlen", type=cli.number(int, 17), default=256, help="prompt tokens of the prefill test")
    p.add_argument("--speed_new_tokens", type=cli.COUNT, default=32, help="generated tokens of the decode test")
    p.add_argument("--run_dir", default="runs/default", help="folder holding every stage's artifacts")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda ...")
    return p


if __name__ == "__main__":
    cli.run_main(main, parser().parse_args())
