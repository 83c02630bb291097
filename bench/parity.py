"""Behaviour parity of a refactor: run every allocation method through the stage scripts of a checkout
on one fixed input and print a digest of what each run wrote, so two checkouts (before and after a
change that should change no behaviour) can be diffed line by line.

The input is the tiny Llama of the tests trained for 200 steps on gensim's news text (structured
spectra, so the learned methods have something to allocate), saved once into WORK/model. For each
method, with its default --compensate and with the other choice (learned: 0; untrained: 20 steps):
learn_masks.py -> truncate.py -> evaluate.py, and one line of digests: ranks.json's layers, the kept
fraction, the export scale and budget gap, the last training / compensation losses, the bytes of every
tensor in components.safetensors, and both perplexities of metrics.json.

  python bench/parity.py --root . --work runs/parity_after > after.txt
  python bench/parity.py --root ../before --work runs/parity_before > before.txt && diff before.txt after.txt
  python bench/parity.py --root . --work runs/parity --embedded      # also uniform on the embedded default
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(HERE, "tests"))

METHODS = ["uniform", "energy", "svdllm2", "strs", "sigmoid", "hardconcrete", "ara", "soco"]
LEARNED = {"sigmoid", "hardconcrete", "ara", "soco"}


def trained_tiny_dir(folder):
    """The tests' trained tiny Llama (conftest.trained_tiny's recipe), saved with its tokenizer."""
    from conftest import news_windows, tiny_tokenizer, train_tiny
    if not os.path.exists(os.path.join(folder, "config.json")):
        train_tiny(news_windows()[16:-8]).save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
    return folder


def stage(root, script, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, os.path.join(root, script), *map(str, args)], cwd=root, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{script} {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")


def digest(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def components_digest(path):
    if not os.path.exists(path):
        return "none"
    from safetensors.torch import load_file
    t = load_file(path)
    return hashlib.sha256(b"".join(k.encode() + t[k].numpy().tobytes() for k in sorted(t))).hexdigest()[:16]


def run_method(root, run_dir, method, compensate, eval_args):
    flags = [] if compensate is None else ["--compensate", compensate]
    stage(root, "learn_masks.py", "--method", method, "--keep", 0.6, "--run_dir", run_dir, *flags)
    stage(root, "truncate.py", "--run_dir", run_dir)
    stage(root, "evaluate.py", "--run_dir", run_dir, *eval_args)
    r = json.load(open(os.path.join(run_dir, "allocation", "ranks.json")))
    m = json.load(open(os.path.join(run_dir, "metrics.json")))
    last = lambda curve, key: curve[-1][key] if curve else None
    return {"layers": digest(r["layers"]), "kept": r["kept_fraction_linear"],
            "export_scale": r.get("export_scale"), "gap": r.get("train_budget_gap"),
            "loss": last(r.get("curve"), "loss"), "comp": last(r.get("compensation_curve"), "task"),
            "components": components_digest(os.path.join(run_dir, "allocation", "components.safetensors")),
            "ppl": [m["original"]["ppl"], m["compressed"]["ppl"]]}


def main(args):
    root, work = os.path.abspath(args.root), os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    model = trained_tiny_dir(os.path.join(work, "model"))
    text = os.path.join(work, "news.txt")
    from conftest import news_docs
    with open(text, "w", encoding="utf-8") as f:
        f.write("\n\n".join(news_docs()))
    run_dir = os.path.join(work, "run")
    stage(root, "whiten.py", "--model", model, "--data", text, "--nsamples", 16, "--seqlen", 64, "--run_dir", run_dir)
    stage(root, "decompose.py", "--run_dir", run_dir)
    eval_args = ["--data", text, "--seqlen", 64, "--max_windows", 16]
    for method in METHODS:
        for compensate in (None, 0 if method in LEARNED else 20):
            d = run_method(root, run_dir, method, compensate, eval_args)
            print(f"{method:13s} compensate={'default' if compensate is None else str(compensate):7s} "
                  + " ".join(f"{k}={v}" for k, v in d.items()), flush=True)
    if args.embedded:  # the README's default pipeline: uniform at 80% kept
        emb = os.path.join(work, "embedded")
        for script in ("whiten.py", "decompose.py", "learn_masks.py", "truncate.py", "evaluate.py"):
            stage(root, script, "--run_dir", emb)
        m = json.load(open(os.path.join(emb, "metrics.json")))
        print(f"embedded uniform 0.8: original {m['original']['ppl']:.4f} compressed {m['compressed']['ppl']:.4f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default=HERE, help="the checkout whose stage scripts run")
    p.add_argument("--work", default=os.path.join(HERE, "runs", "parity"), help="folder for the model and runs")
    p.add_argument("--embedded", action="store_true", help="also the README's default pipeline (~8 minutes)")
    main(p.parse_args())
