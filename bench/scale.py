"""Benchmark: what each stage costs as the model gets deeper. Runs all five stages (uniform allocation) as
separate processes on the embedded model and on random-weight models of the same family with more decoder
blocks, and prints one markdown table per model: wall time, peak RSS (the stage process's own VmHWM,
see LAUNCHER), peak GPU memory (from the stage's manifest, when it ran on a GPU) and bytes written, plus the
model's own bytes, so a reader can see that a stage's memory beyond the model itself does not grow with depth.

  python bench/scale.py --blocks 30 60 120                 # random SmolLM2-shaped models, 30/60/120 blocks
  python bench/scale.py --embedded --blocks                 # the embedded model only
  python bench/scale.py --shape llama2-7b --blocks 8 --dtype bfloat16 --nsamples 256 --seqlen 2048   # GPU
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPES = {  # LlamaConfig fields; the number of blocks comes from --blocks
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                    vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=4096),
    "tiny": dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=320, tie_word_embeddings=False, max_position_embeddings=256),  # bench/gpu.sh --dry
}


def random_model(folder, shape, blocks, dtype, tokenizer=None):
    """A random-weight Llama of the given shape, saved with the embedded model's tokenizer (no download; or
    the one in folder `tokenizer`). Its token ids must fit the vocabulary: where the tokenizer has more
    tokens than the shape (the embedded one has 49152, LLaMA-2's vocabulary 32000), the embeddings and the
    head take the tokenizer's size, which the run says (a larger head than the real model's: its memory
    figures are an upper bound on that term)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from plumbing import loading
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    tok = AutoTokenizer.from_pretrained(tokenizer or loading.embedded_model_dir())
    fields = dict(SHAPES[shape])
    if len(tok) > fields["vocab_size"]:
        print(f"{shape}: vocabulary {fields['vocab_size']} -> {len(tok)} (the tokenizer's), so every token id fits")
        fields["vocab_size"] = len(tok)
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=blocks, **fields)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def folder_bytes(folder, suffix=".safetensors"):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs if f.endswith(suffix))


# Each stage runs under this launcher, which writes the process's VmHWM (peak RSS since exec) when it exits.
# Not wait4's ru_maxrss: Linux carries the forking parent's high-water mark across fork + exec into it.
LAUNCHER = """import atexit, os, runpy, sys
def hwm():
    line = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
    open(os.environ["SCALE_HWM_FILE"], "w").write(line.split()[1])
atexit.register(hwm)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run(script, *args, work=os.path.join(ROOT, "runs", "scale")):
    """One stage in its own process: (wall s, peak RSS bytes of that process alone)."""
    hwm = os.path.join(work, ".hwm")
    t0 = time.time()
    cmd = [sys.executable, "-c", LAUNCHER, os.path.join(ROOT, script), *map(str, args)]
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                          env={**os.environ, "SCALE_HWM_FILE": hwm})
    if proc.returncode != 0:
        raise SystemExit(f"{script} failed:\n{proc.stderr[-2000:]}")
    return time.time() - t0, int(open(hwm).read()) * 1024  # VmHWM is in KiB


def bench_model(model, run_dir, args):
    common_flags = ["--run_dir", run_dir, "--device", args.device]
    stages = [("whiten.py", ["--model", model, "--nsamples", args.nsamples, "--seqlen", args.seqlen,
                             "--batch_size", args.batch_size], "whiten"),
              ("decompose.py", [], "decompose"),
              ("learn_masks.py", ["--keep", args.keep], "allocation"),
              ("truncate.py", [], "compressed"),
              ("evaluate.py", ["--max_windows", args.eval_windows, "--seqlen", args.seqlen], None)]
    rows = []
    for script, flags, out in stages:
        wall, rss = run(script, *flags, *(common_flags if script != "truncate.py" else common_flags[:2]), work=args.work)
        man = json.load(open(os.path.join(run_dir, out, "manifest.json"))) if out else {}
        written = folder_bytes(os.path.join(run_dir, out)) if out else 0
        rows.append((script, wall, rss, man.get("peak_gpu_bytes"), written))
    return rows


def table(name, model_bytes, blocks, rows):
    lines = [f"**{name}** ({blocks} blocks, model {model_bytes / 2**20:,.0f} MiB on disk)", "",
             "| stage | wall s | peak RSS MiB | RSS - model MiB | peak GPU MiB | written MiB |",
             "|---|---|---|---|---|---|"]
    for script, wall, rss, gpu, written in rows:
        lines.append(f"| {script} | {wall:.1f} | {rss / 2**20:,.0f} | {(rss - model_bytes) / 2**20:,.0f} | "
                     f"{'-' if gpu is None else f'{gpu / 2**20:,.0f}'} | {written / 2**20:,.1f} |")
    return "\n".join(lines)


def main(args):
    work = args.work
    os.makedirs(work, exist_ok=True)
    todo = [("embedded", "embedded")] if args.embedded else []
    todo += [(f"{args.shape}-{b}", random_model(os.path.join(work, f"model_{args.shape}_{b}"), args.shape, b, args.dtype,
                                                args.tokenizer)) for b in args.blocks]
    # what any stage costs before it touches a model: the interpreter with torch and transformers imported
    imports = os.path.join(work, "imports_only.py")
    with open(imports, "w") as f:
        f.write("import torch, transformers, safetensors, tqdm, learn_masks\n")
    _, base = run(imports, work=work)
    results = {"imports_rss_bytes": base}
    out = [f"Interpreter with torch + transformers + this project imported: {base / 2**20:,.0f} MiB peak RSS."]
    print(out[0], flush=True)
    for name, model in todo:
        from plumbing import loading
        folder = loading.resolve_model(model)
        cfg = json.load(open(os.path.join(folder, "config.json")))
        rows = bench_model(model, os.path.join(work, f"run_{name}"), args)
        out.append(table(name, folder_bytes(folder), cfg["num_hidden_layers"], rows))
        results[name] = {"blocks": cfg["num_hidden_layers"], "model_bytes": folder_bytes(folder), "stages": [
            dict(zip(("stage", "wall_s", "peak_rss_bytes", "peak_gpu_bytes", "written_bytes"), r)) for r in rows]}
        print(out[-1] + "\n", flush=True)
    with open(os.path.join(work, "table.md"), "w") as f:
        f.write("\n\n".join(out) + "\n")
    with open(os.path.join(work, "table.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--blocks", type=int, nargs="*", default=[30, 60, 120], help="decoder blocks of the random models")
    p.add_argument("--shape", choices=list(SHAPES), default="smollm2", help="width of the random models")
    p.add_argument("--embedded", action="store_true", help="also the embedded SmolLM2-135M")
    p.add_argument("--dtype", default="float32", help="dtype of the random models (bfloat16 for the 7B shape)")
    p.add_argument("--nsamples", type=int, default=8, help="calibration windows (papers: 256)")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per window (papers: 2048)")
    p.add_argument("--batch_size", type=int, default=4, help="whiten.py windows per forward")
    p.add_argument("--keep", type=float, default=0.8, help="kept fraction (uniform allocation)")
    p.add_argument("--eval_windows", type=int, default=2, help="evaluate.py windows")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--tokenizer", default=None, help="folder of the random models' tokenizer (default: the embedded one)")
    p.add_argument("--work", default=os.path.join(ROOT, "runs", "scale"), help="folder of the models, runs and table.md")
    main(p.parse_args())
