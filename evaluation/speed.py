"""The speed and memory report of evaluate.py --speed (stage 5): prefill and decode tokens/s at batch 1 and
--speed_batch, the peak memory of a process that holds one model (each model runs in a fresh spawned
process, so the CPU's peak RSS is that model's alone) and the bytes on disk, original vs compressed.
Kept apart from evaluate.py so the perplexity and zero-shot path reads alone; bench/gpu.sh reaches it through
`evaluate.py --speed`.
"""
import os
import time

import torch

from plumbing import cli, loading
from plumbing.modeling_lowrank import LowRankForCausalLM


@torch.no_grad()
def throughput(model, device, batch, seqlen, new_tokens, vocab):
    """Prefill tokens/s (one forward of batch x seqlen) and decode tokens/s (greedy, KV cache)."""
    ids = torch.randint(0, vocab, (batch, seqlen), generator=torch.Generator().manual_seed(0)).to(device)
    model(ids[:, :16])  # warm-up
    cli.sync(device)
    t0 = time.perf_counter()
    model(ids)
    cli.sync(device)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.generate(ids[:, :16], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   pad_token_id=0)
    cli.sync(device)
    return {"prefill_tok_s": batch * seqlen / prefill, "decode_tok_s": batch * new_tokens / (time.perf_counter() - t0)}


def peak_rss_bytes():
    """This process's peak resident memory so far (Linux VmHWM, reset by writing 5 to /proc/self/clear_refs)."""
    return int([line for line in open("/proc/self/status") if line.startswith("VmHWM")][0].split()[1]) * 1024


def speed_child(which, run_dir, model_spec, device_name, cfg):
    """Runs in a fresh process, so the CPU's peak RSS belongs to this model alone."""
    import resource
    device = torch.device(device_name)
    if which == "original":
        model = loading.load_model(model_spec, device)
    else:
        model = LowRankForCausalLM.from_pretrained(f"{run_dir}/compressed", dtype="auto").to(device).eval()
    if device.type == "cuda":
        model = model.to(torch.bfloat16)  # bf16 on GPU
        torch.cuda.reset_peak_memory_stats()
    elif os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset the RSS high-water mark, so loading the model is not counted
    out = {"params": sum(p.numel() for p in model.parameters()), "dtype": str(next(model.parameters()).dtype).replace("torch.", "")}
    for b in cfg["batches"]:
        out[f"batch{b}"] = throughput(model, device, b, cfg["seqlen"], cfg["new_tokens"], model.config.vocab_size)
    if device.type == "cuda":
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    elif os.path.exists("/proc/self/status"):  # peak RSS of the process while it ran the model
        out["peak_memory_bytes"] = peak_rss_bytes()
    else:  # includes loading
        out["peak_memory_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def disk_bytes(folder):
    if not os.path.isdir(folder):
        return None  # a hub id: the files live in the hub cache
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
               if f.endswith((".safetensors", ".bin")))


def speed_report(run_dir, model_spec, device, batch, seqlen, new_tokens):
    """Both models' speed, memory and disk size, each in a fresh process: batch 1 and `batch`."""
    import multiprocessing as mp
    cfg = {"batches": [1, batch], "seqlen": seqlen, "new_tokens": new_tokens}
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
              f"cpu ({torch.get_num_threads()} threads)", **cfg}
    with mp.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        for which in ("original", "compressed"):
            report[which] = pool.apply(speed_child, (which, run_dir, model_spec, str(device), cfg))
    report["original"]["disk_bytes"] = disk_bytes(loading.resolve_model(model_spec))
    report["compressed"]["disk_bytes"] = disk_bytes(f"{run_dir}/compressed")
    return report


def print_speed(rep, kept_model):
    print(f"\nspeed and memory on {rep['device']} (prefill {rep['seqlen']} tokens, decode {rep['new_tokens']} tokens)")
    print("| model | params | disk MB | peak mem MB | " + " | ".join(
        f"prefill tok/s b{b} | decode tok/s b{b}" for b in rep["batches"]) + " |")
    print("|---" * (4 + 2 * len(rep["batches"])) + "|")
    for which in ("original", "compressed"):
        r = rep[which]
        disk = "-" if r["disk_bytes"] is None else f"{r['disk_bytes'] / 2**20:.0f}"
        print(f"| {which} | {r['params']:,} | {disk} | {r['peak_memory_bytes'] / 2**20:.0f} | " + " | ".join(
            f"{r[f'batch{b}']['prefill_tok_s']:.0f} | {r[f'batch{b}']['decode_tok_s']:.1f}" for b in rep["batches"]) + " |")
    for b in rep["batches"]:
        o, c = rep["original"][f"batch{b}"], rep["compressed"][f"batch{b}"]
        print(f"batch {b}: speedup prefill x{c['prefill_tok_s'] / o['prefill_tok_s']:.2f}, decode "
              f"x{c['decode_tok_s'] / o['decode_tok_s']:.2f} (ideal x{1 / kept_model:.2f} = 1 / kept fraction)")
