"""How the stages fail (issues 9 and 14). A table of bad inputs, each run through the stage's own parser and
cli.run_main in this process (conftest.run_inprocess: what a user's command runs, without the interpreter
start): non-zero exit, the last stderr line starts with "error:" and names the problem, no traceback, and no
artifact a later stage would accept (every stage folder's manifest is as before, none is added). Then
SIGKILLs injected where a kill does the most harm (tests/crash.py: inside the folder swap, inside JSON writes,
inside a cache write): the next stage either works on a complete earlier artifact or fails with one line."""
import json
import os
import shutil

import pytest
import torch

from conftest import run_inprocess, run_stage, stage, tiny_model
from methods import base
from plumbing import cli
from evaluation.tasks import prepare_tasks

STAGES = ("whiten", "decompose", "allocation", "compressed")
EVAL = ("--seqlen", 64, "--max_windows", 2)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_dir, text_file):
    """All five stages once on the tiny model; every case works on its own copy."""
    d = str(tmp_path_factory.mktemp("full"))
    stage("whiten.py", "--model", tiny_dir, "--data", text_file, "--nsamples", 8, "--seqlen", 64, "--run_dir", d)
    stage("decompose.py", "--run_dir", d)
    stage("learn_masks.py", "--keep", 0.6, "--run_dir", d)
    stage("truncate.py", "--run_dir", d)
    stage("evaluate.py", "--data", text_file, *EVAL, "--run_dir", d)
    return d


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_dir):
    """Bad text files and bad model folders."""
    t = tmp_path_factory.mktemp("bad")
    (t / "latin1.txt").write_bytes("caf\xe9 au lait\n\n".encode("latin-1") * 200)
    (t / "bad.jsonl").write_text('{"text": "fine"}\nnot json\n')
    (t / "notext.jsonl").write_text('{"body": "no text key"}\n')
    (t / "nonstr.jsonl").write_text('{"text": 5}\n')
    (t / "degenerate.txt").write_text("the " * 6000)
    (t / "table.csv").write_text("a,b\n")
    (t / "afile").write_text("not a folder")
    corrupt = t / "corrupt_model"
    shutil.copytree(tiny_dir, corrupt)
    w = corrupt / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    fewer = t / "fewer_layers_model"  # config says 1 block, the weights hold 2 (transformers only warns)
    shutil.copytree(tiny_dir, fewer)
    cfg = json.loads((fewer / "config.json").read_text())
    (fewer / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1}))
    small = t / "small_embedding_model"  # 300 embedding rows under a 320-token tokenizer
    from conftest import tiny_config, tiny_tokenizer
    from transformers import AutoModelForCausalLM
    cfg = tiny_config("llama")
    cfg.vocab_size = 300
    AutoModelForCausalLM.from_config(cfg).save_pretrained(small)
    tiny_tokenizer().save_pretrained(small)
    spm = t / "sentencepiece_model"  # a tokenizer that needs sentencepiece and its tokenizer.model
    shutil.copytree(tiny_dir, spm)
    os.remove(spm / "tokenizer.json")
    cfg = json.loads((spm / "tokenizer_config.json").read_text())
    (spm / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": "LlamaTokenizer"}))
    import torch
    from conftest import tiny_model
    nan = t / "nan_weight_model"  # one non-finite weight deep inside a block
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    model.save_pretrained(nan)
    tiny_tokenizer().save_pretrained(nan)
    from transformers import BertConfig
    bert = t / "bidirectional_model"  # an encoder loaded as a causal LM: it attends to later tokens
    AutoModelForCausalLM.from_config(BertConfig(vocab_size=320, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=2, intermediate_size=64)).save_pretrained(bert)
    tiny_tokenizer().save_pretrained(bert)
    return {p.name: str(p) for p in t.iterdir()}


def manifests(d):
    return {s: open(f"{d}/{s}/manifest.json").read() if os.path.isfile(f"{d}/{s}/manifest.json") else None
            for s in STAGES}


def rehash(d, stage, name):
    """Keep the manifest's size and content hash of an edited file in step, so the damage itself, not the
    hash check, is what the stage has to catch (a user who edits both, or a bug that writes bad values)."""
    from plumbing.artifacts import file_hash
    path = f"{d}/{stage}/{name}"
    man = json.load(open(f"{d}/{stage}/manifest.json"))
    man["files"][name] = {"bytes": os.path.getsize(path), "sha256": file_hash(path)}
    json.dump(man, open(f"{d}/{stage}/manifest.json", "w"))
    for child in STAGES[STAGES.index(stage) + 1:]:  # and the chain of manifest hashes after it
        man = json.load(open(f"{d}/{child}/manifest.json"))
        man["inputs"] = {parent: file_hash(f"{d}/{parent}/manifest.json") for parent in man["inputs"]}
        json.dump(man, open(f"{d}/{child}/manifest.json", "w"))


def edit_json(d, stage, name, change, keep_hash=True):
    """Edit a stage's JSON file by hand; keep_hash: and its manifest entry (see rehash)."""
    path = f"{d}/{stage}/{name}"
    obj = json.load(open(path))
    text = change(obj) if callable(change) else change
    open(path, "w").write(text if isinstance(text, str) else json.dumps(obj))
    if name != "manifest.json" and keep_hash:
        rehash(d, stage, name)


def edit_tensor(d, stage, name, key, change, keep_hash=True):
    """Rewrite one tensor of a stage's safetensors file (change(t) -> new tensor, or None to drop it)."""
    from safetensors.torch import load_file, save_file
    path = f"{d}/{stage}/{name}"
    tensors = load_file(path)
    new = change(tensors[key].clone())
    if new is None:
        del tensors[key]
    else:
        tensors[key] = new
    save_file(tensors, path)
    if keep_hash:
        rehash(d, stage, name)


def first_layer(d):
    return next(iter(json.load(open(f"{d}/decompose/manifest.json"))["layers"]))


def nan_at_0(t):
    t.view(-1)[0] = float("nan")
    return t


def with_components(d, change=None):
    """Turn the uniform allocation into one with learned components (index 0..k-1, scale 1), as a learned
    method writes it; change(components) damages them."""
    from safetensors.torch import save_file
    alloc = json.load(open(f"{d}/allocation/ranks.json"))
    comps = {}
    for name, r in alloc["layers"].items():
        if r != "dense":
            comps[f"{name}.index"], comps[f"{name}.scale"] = torch.arange(r), torch.ones(r)
    if change:
        change(comps)
    save_file(comps, f"{d}/allocation/components.safetensors")
    edit_json(d, "allocation", "ranks.json", lambda o: o.update(components=True))
    rehash(d, "allocation", "components.safetensors")


def flip_header_dtype(path):
    """Same size, other meaning: the first F32 tensor's dtype in the safetensors header becomes I32."""
    data = open(path, "rb").read()
    open(path, "wb").write(data.replace(b'"F32"', b'"I32"', 1))


def first(d, stage):
    return sorted(f for f in os.listdir(f"{d}/{stage}") if f.startswith("block_"))[0]


def corrupt_same_size(path):
    data = bytearray(open(path, "rb").read())
    data[:16] = b"\xff" * 16  # the safetensors header length: garbage
    open(path, "wb").write(bytes(data))


def truncate_file(path):
    open(path, "r+b").truncate(os.path.getsize(path) // 2)


def set_rank(value):
    def change(obj):
        obj["layers"][next(iter(obj["layers"]))] = value
    return change


# (case id, setup(d, f) or None, script, args (F = files, T = tiny model dir), expected text in the error line)
CASES = [
    ("whiten nsamples 0", None, "whiten.py", ["--nsamples", 0], "--nsamples: 0 is out of range"),
    ("whiten seqlen -1", None, "whiten.py", ["--seqlen", -1], "--seqlen: -1 is out of range"),
    ("whiten batch 0", None, "whiten.py", ["--batch_size", 0], "--batch_size: 0 is out of range"),
    ("whiten seed -1", None, "whiten.py", ["--seed", -1], "--seed: -1 is out of range"),
    ("whiten device bogus", None, "whiten.py", ["--device", "bogus"], "is not a device"),
    ("whiten device cuda", None, "whiten.py", ["--device", "cuda"], "no CUDA GPU"),
    ("whiten run_dir file", None, "whiten.py", ["--run_dir", "F:afile"], "is a file, not a folder"),
    ("whiten model file", None, "whiten.py", ["--model", "F:afile"], "is a file, not a model folder"),
    ("whiten model missing", None, "whiten.py", ["--model", "./no/such/model"], "does not exist"),
    ("whiten not utf-8", None, "whiten.py", ["--data", "F:latin1.txt"], "is not UTF-8 text"),
    ("whiten jsonl not json", None, "whiten.py", ["--data", "F:bad.jsonl"], "line 2 is not JSON"),
    ("whiten jsonl no text", None, "whiten.py", ["--data", "F:notext.jsonl"], "line 1 has no string \"text\""),
    ("whiten jsonl text not str", None, "whiten.py", ["--data", "F:nonstr.jsonl"], "line 1 has no string \"text\""),
    ("whiten seqlen > positions", None, "whiten.py", ["--seqlen", 512], "longer than the model's 256 positions"),
    ("whiten degenerate text", None, "whiten.py", ["--data", "F:degenerate.txt"], "degenerate"),
    ("whiten corrupt weights", None, "whiten.py", ["--model", "F:corrupt_model"], "cannot load model"),
    ("whiten needs sentencepiece", None, "whiten.py", ["--model", "F:sentencepiece_model"], "the tokenizer of"),
    ("whiten unknown data", None, "whiten.py", ["--data", "nosuchdata"], "unknown data"),
    ("whiten data file missing", None, "whiten.py", ["--data", "F:missing.txt"], "does not exist"),
    ("whiten data wrong suffix", None, "whiten.py", ["--data", "F:table.csv"], "must end in .txt or .jsonl"),
    ("whiten too few tokens", None, "whiten.py", ["--nsamples", 100000], "fewer than"),
    ("decompose kmax nan", None, "decompose.py", ["--kmax_mult", "nan"], "--kmax_mult: nan is out of range"),
    ("decompose kmax inf", None, "decompose.py", ["--kmax_mult", "inf"], "--kmax_mult: inf is out of range"),
    ("decompose kmax < 1", None, "decompose.py", ["--kmax_mult", 0.5], "--kmax_mult: 0.5 is out of range"),
    ("decompose no whiten", lambda d, f: shutil.rmtree(f"{d}/whiten"), "decompose.py", [], "run `python whiten.py"),
    ("decompose manifest not json", lambda d, f: open(f"{d}/whiten/manifest.json", "w").write("{oops"),
     "decompose.py", [], "whiten/manifest.json is damaged or incomplete"),
    ("decompose manifest key missing", lambda d, f: edit_json(d, "whiten", "manifest.json", lambda o: o.pop("files")),
     "decompose.py", [], "is damaged: the file has no 'files'"),
    ("decompose whitening truncated", lambda d, f: truncate_file(f"{d}/whiten/block_000.safetensors"),
     "decompose.py", [], "block_000.safetensors is damaged or incomplete"),
    ("decompose whitening corrupt", lambda d, f: corrupt_same_size(f"{d}/whiten/block_000.safetensors"),
     "decompose.py", [], "block_000.safetensors is damaged or was edited (content hash)"),
    ("decompose file missing", lambda d, f: os.remove(f"{d}/whiten/calib_ids.safetensors"),
     "decompose.py", [], "calib_ids.safetensors is damaged or incomplete"),
    ("decompose device bogus", None, "decompose.py", ["--device", "bogus"], "is not a device"),
    ("learn keep nan", None, "learn_masks.py", ["--keep", "nan"], "--keep: nan is out of range"),
    ("learn keep 0", None, "learn_masks.py", ["--keep", 0], "--keep: 0.0 is out of range"),
    ("learn keep 1.5", None, "learn_masks.py", ["--keep", 1.5], "--keep: 1.5 is out of range"),
    ("learn keep tiny", None, "learn_masks.py", ["--keep", 0.001], "rank 1 in every layer"),
    ("learn steps -5", None, "learn_masks.py", ["--method", "ara", "--steps", -5], "--steps: -5 is out of range"),
    ("learn steps 0", None, "learn_masks.py", ["--method", "ara", "--steps", 0], "--steps: 0 is out of range"),
    ("learn batch 0", None, "learn_masks.py", ["--method", "ara", "--batch_size", 0], "--batch_size: 0 is out of"),
    ("learn train_seqlen 0", None, "learn_masks.py", ["--train_seqlen", 0], "--train_seqlen: 0 is out of range"),
    ("learn tau 0", None, "learn_masks.py", ["--method", "sigmoid", "--tau", 0], "--tau: 0.0 is out of range"),
    ("learn lr nan", None, "learn_masks.py", ["--method", "ara", "--lr", "nan"], "--lr: nan is out of range"),
    ("learn lr -1", None, "learn_masks.py", ["--method", "ara", "--lr", -1], "--lr: -1.0 is out of range"),
    ("learn alpha nan", None, "learn_masks.py", ["--method", "ara", "--alpha", "nan"], "--alpha: nan is out of"),
    ("learn soco stages sum", None, "learn_masks.py", ["--method", "soco", "--soco_stages", 0.5, 0.6],
     "must sum to 1"),
    ("learn soco stages < 0", None, "learn_masks.py", ["--method", "soco", "--soco_stages", -0.2, 1.2],
     "--soco_stages: -0.2 is out of range"),
    ("learn ara init paper", None, "learn_masks.py", ["--method", "ara", "--init", "paper"], "--init paper: ARA's init"),
    ("learn compensate -1", None, "learn_masks.py", ["--compensate", -1], "--compensate: -1 is out of range"),
    ("learn compensate_lr 0", None, "learn_masks.py", ["--compensate_lr", 0], "--compensate_lr: 0.0 is out of range"),
    ("learn hidden layer 99", None, "learn_masks.py", ["--method", "ara", "--loss", "hidden_mse", "--hidden_layers",
                                                       99, "--steps", 1], "--hidden_layers [99]"),
    ("learn strs samples 0", None, "learn_masks.py", ["--method", "strs", "--strs_samples", 0],
     "--strs_samples: 0 is out of range"),
    ("learn unknown method", None, "learn_masks.py", ["--method", "magic"], "unknown --method"),
    ("learn dtype with device_map", None, "learn_masks.py", ["--method", "ara", "--dtype", "float32", "--device_map",
                                                             "auto"], "--dtype float32 with --device_map"),
    ("learn factors corrupt", lambda d, f: corrupt_same_size(f"{d}/decompose/block_000.safetensors"),
     "learn_masks.py", ["--method", "energy"], "block_000.safetensors is damaged or was edited"),
    ("learn decompose manifest not json", lambda d, f: open(f"{d}/decompose/manifest.json", "w").write("[]"),
     "learn_masks.py", [], "decompose/manifest.json is damaged: the file is []: Input should be a valid dictionary"),
    ("truncate rank 0", lambda d, f: edit_json(d, "allocation", "ranks.json", set_rank(0)),
     "truncate.py", [], "'] is 0: not \"dense\" or an integer rank >= 1"),
    ("truncate rank too big", lambda d, f: edit_json(d, "allocation", "ranks.json", set_rank(10 ** 6)),
     "truncate.py", [], "the rank 1000000"),
    ("truncate ranks not json", lambda d, f: edit_json(d, "allocation", "ranks.json", "{not json"),
     "truncate.py", [], "ranks.json is damaged or incomplete"),
    ("truncate components missing", lambda d, f: edit_json(d, "allocation", "ranks.json",
                                                           lambda o: o.update(components=True)),
     "truncate.py", [], "components.safetensors is missing"),
    ("truncate no allocation", lambda d, f: shutil.rmtree(f"{d}/allocation"), "truncate.py", [],
     "run `python learn_masks.py"),
    ("evaluate max_windows -1", None, "evaluate.py", ["--max_windows", -1], "--max_windows: -1 is out of range"),
    ("evaluate seqlen 0", None, "evaluate.py", ["--seqlen", 0], "--seqlen: 0 is out of range"),
    ("evaluate seqlen > positions", None, "evaluate.py", ["--seqlen", 10 ** 7], "longer than the model's 256"),
    ("evaluate batch 0", None, "evaluate.py", ["--batch_size", 0], "--batch_size: 0 is out of range"),
    ("evaluate task_items 0", None, "evaluate.py", ["--task_items", 0], "--task_items: 0 is out of range"),
    ("evaluate stale compressed", lambda d, f: run_stage("learn_masks.py", "--keep", 0.7, "--run_dir", d),
     "evaluate.py", [], "compressed was made from a different allocation/"),
    ("evaluate compressed corrupt", lambda d, f: corrupt_same_size(f"{d}/compressed/model.safetensors"),
     "evaluate.py", ["--max_windows", 1], "model.safetensors is damaged or was edited"),
    ("evaluate not utf-8", None, "evaluate.py", ["--data", "F:latin1.txt"], "is not UTF-8 text"),
    ("evaluate dtype with device_map", None, "evaluate.py", ["--dtype", "bfloat16", "--device_map", "auto"],
     "--dtype bfloat16 with --device_map"),
]


def config_edit(old, new):
    """Edit compressed/config.json in place, same size: only a content check sees it."""
    def setup(d, f):
        path = f"{d}/compressed/config.json"
        text = open(path).read()
        assert old in text and len(old) == len(new)
        open(path, "w").write(text.replace(old, new, 1))
    return setup


# damage checked by content, JSON fields by presence and type, tensors by kind, shape and
# finiteness, indices and scales by range; flags through argparse in the same one-line format
CASES += [
    # content hashes: same-size edits a size check cannot see
    ("content: whitening NaN, same size", lambda d, f: edit_tensor(d, "whiten", first(d, "whiten"),
     f"{first_layer(d)}.S", nan_at_0, keep_hash=False), "decompose.py", [], "(content hash)"),
    ("content: spectrum NaN, same size", lambda d, f: edit_tensor(d, "decompose", first(d, "decompose"),
     f"{first_layer(d)}.sigma", nan_at_0, keep_hash=False), "learn_masks.py", ["--method", "energy"], "(content hash)"),
    ("content: header dtype flipped", lambda d, f: flip_header_dtype(f"{d}/decompose/{first(d, 'decompose')}"),
     "truncate.py", [], "(content hash)"),
    ("content: compressed config hidden_act", config_edit('"silu"', '"gelu"'),
     "evaluate.py", [], "compressed/config.json is damaged or was edited (content hash)"),
    ("content: compressed config layers", config_edit('"num_hidden_layers": 2', '"num_hidden_layers": 1'),
     "evaluate.py", [], "compressed/config.json is damaged or was edited (content hash)"),
    ("content: ranks.json edited, manifest not", lambda d, f: edit_json(d, "allocation", "ranks.json",
     set_rank(3), keep_hash=False), "truncate.py", [], "allocation/ranks.json is damaged"),
    # tensors whose hash was kept in step: the reader checks the values themselves
    ("tensor: whitening NaN", lambda d, f: edit_tensor(d, "whiten", first(d, "whiten"), f"{first_layer(d)}.S",
     nan_at_0), "decompose.py", [], "holds NaN or inf"),
    ("tensor: spectrum NaN", lambda d, f: edit_tensor(d, "decompose", first(d, "decompose"),
     f"{first_layer(d)}.sigma", nan_at_0), "learn_masks.py", ["--method", "energy"], "holds NaN or inf"),
    ("tensor: factor inf", lambda d, f: edit_tensor(d, "decompose", first(d, "decompose"), f"{first_layer(d)}.U",
     lambda t: t.fill_(float("inf"))), "truncate.py", [], "holds NaN or inf"),
    ("tensor: factor wrong shape", lambda d, f: edit_tensor(d, "decompose", first(d, "decompose"),
     f"{first_layer(d)}.VtSinv", lambda t: t[:, :-1].contiguous()), "truncate.py", [], "has shape"),
    ("tensor: factor int dtype", lambda d, f: edit_tensor(d, "decompose", first(d, "decompose"),
     f"{first_layer(d)}.U", lambda t: t.to(torch.int32)), "truncate.py", [], "not a float tensor"),
    ("tensor: calibration ids beyond vocab", lambda d, f: edit_tensor(d, "whiten", "calib_ids.safetensors", "ids",
     lambda t: t + 10 ** 6), "learn_masks.py", ["--method", "ara", "--steps", 1], "outside the model's vocabulary"),
    ("tensor: calibration ids wrong shape", lambda d, f: edit_tensor(d, "whiten", "calib_ids.safetensors", "ids",
     lambda t: t[:2].contiguous()), "learn_masks.py", ["--method", "ara", "--steps", 1], "has shape (2, 64)"),
    # JSON fields: presence and type
    ("json: whiten manifest without groups", lambda d, f: edit_json(d, "whiten", "manifest.json",
     lambda o: o.pop("groups")), "decompose.py", [], "the file has no 'groups'"),
    ("json: whiten groups a list", lambda d, f: edit_json(d, "whiten", "manifest.json",
     lambda o: o.update(groups=[])), "decompose.py", [], "'groups' is []: Input should be a valid dictionary"),
    ("json: whiten shard path escapes", lambda d, f: edit_json(d, "whiten", "manifest.json",
     lambda o: o["shards"].update({k: "../x" for k in o["shards"]})), "decompose.py", [], "is '../x', a file the manifest does not list"),
    ("json: decompose layer without k_max", lambda d, f: edit_json(d, "decompose", "manifest.json",
     lambda o: next(iter(o["layers"].values())).pop("k_max")), "learn_masks.py", [], "has no 'k_max'"),
    ("json: decompose m a string", lambda d, f: edit_json(d, "decompose", "manifest.json",
     lambda o: next(iter(o["layers"].values())).update(m="64")), "truncate.py", [], "['m'] is '64': Input should be a valid integer"),
    ("json: manifest file entry a number", lambda d, f: edit_json(d, "allocation", "manifest.json",
     lambda o: o["files"].update({"ranks.json": 5})), "truncate.py", [], "'files'['ranks.json'] is 5: Input should be a valid dictionary"),
    ("json: ranks layers a list", lambda d, f: edit_json(d, "allocation", "ranks.json", lambda o: o.update(layers=[])),
     "truncate.py", [], "'layers' is []: Input should be a valid dictionary"),
    ("json: ranks components a string", lambda d, f: edit_json(d, "allocation", "ranks.json",
     lambda o: o.update(components="yes")), "truncate.py", [], "'components' is 'yes': Input should be a valid boolean"),
    ("json: rank true", lambda d, f: edit_json(d, "allocation", "ranks.json", set_rank(True)), "truncate.py", [],
     "is True: not \"dense\" or an integer rank >= 1"),
    ("json: allocation ranks without method", lambda d, f: edit_json(d, "allocation", "ranks.json",
     lambda o: o.pop("method") and None), "evaluate.py", [], "the file has no 'method'"),
    # indices and scales: range
    ("range: component index 10**6", lambda d, f: with_components(d, lambda c: c[next(iter(c))].fill_(10 ** 6)),
     "truncate.py", [], "outside 0.."),
    ("range: component index repeated", lambda d, f: with_components(d, lambda c: c[next(iter(c))].fill_(0)),
     "truncate.py", [], "or repeats"),
    ("range: component scale missing", lambda d, f: with_components(d, lambda c: c.pop(
     next(k for k in c if k.endswith(".scale")))), "truncate.py", [], "an index without a scale"),
    ("range: component scale NaN", lambda d, f: with_components(d, lambda c: nan_at_0(
     c[next(k for k in c if k.endswith(".scale"))])), "truncate.py", [], "holds NaN or inf"),
    ("range: component index float", lambda d, f: with_components(d, lambda c: c.update(
     {k: v.float() for k, v in c.items() if k.endswith(".index")})), "truncate.py", [], "not an int tensor"),
    # flags: argparse's own errors in the project's format; ranges argparse cannot see
    ("flag: nsamples abc", None, "whiten.py", ["--nsamples", "abc"], "argument --nsamples: 'abc' is not an integer"),
    ("flag: loss bogus", None, "learn_masks.py", ["--loss", "bogus"], "argument --loss: invalid choice"),
    ("flag: unknown flag", None, "truncate.py", ["--keep", 0.5], "unrecognized arguments: --keep 0.5"),
    ("flag: seed 2**32", None, "learn_masks.py", ["--seed", 2 ** 32], "--seed: 4294967296 is out of range"),
    ("flag: whiten seed 2**32", None, "whiten.py", ["--seed", 2 ** 32], "--seed: 4294967296 is out of range"),
    ("model: config disagrees with weights", None, "whiten.py", ["--model", "F:fewer_layers_model"],
     "its config and its checkpoint disagree"),
    # fields that contradict the tensors or the model, with every hash kept in step
    ("schema: whitening says eigh, factors are packed", lambda d, f: edit_json(d, "whiten", "manifest.json",
     lambda o: o.update(whitening="eigh")), "decompose.py", [], "has shape (2080,), not (64, 64)"),
    ("schema: whitening factor of the wrong shape", lambda d, f: edit_tensor(d, "whiten", first(d, "whiten"),
     f"{first_layer(d)}.S", lambda t: t[:-3].contiguous()), "decompose.py", [], "has shape (2077,), not (2080,)"),
    ("schema: k_star contradicts m and n", lambda d, f: edit_json(d, "decompose", "manifest.json",
     lambda o: next(iter(o["layers"].values())).update(k_star=7)), "truncate.py", [], "k_star 7 is not"),
    ("schema: ranks name a layer the model lacks", lambda d, f: edit_json(d, "allocation", "ranks.json",
     lambda o: o["layers"].update({"model.layers.9.mlp.up_proj": 3})), "truncate.py", [],
     "names 'model.layers.9.mlp.up_proj', which decompose/manifest.json 'layers' does not have"),
    ("schema: a spectrum that rises", lambda d, f: edit_tensor(d, "decompose", first(d, "decompose"),
     f"{first_layer(d)}.sigma", lambda t: t.flip(0).contiguous()), "learn_masks.py", ["--method", "energy"],
     "is not a spectrum"),
    ("schema: components flag off, file listed", lambda d, f: with_components(d) or edit_json(
     d, "allocation", "ranks.json", lambda o: o.update(components=False)), "truncate.py", [], "components False"),
    ("schema: compressed config edited", lambda d, f: edit_json(d, "compressed", "config.json",
     lambda o: o.update(rms_norm_eps=0.5)), "evaluate.py", [], "differs from the original model's config in 'rms_norm_eps'"),
    ("schema: allocation label edited", lambda d, f: edit_json(d, "allocation", "ranks.json",
     lambda o: o.update(method="soco")), "evaluate.py", [], "disagree on 'method'"),
    ("model: embedding smaller than the tokenizer", None, "whiten.py", ["--model", "F:small_embedding_model"],
     "its tokenizer has 320 tokens but its input embeddings only 300 rows"),
    ("model: a NaN weight", None, "whiten.py", ["--model", "F:nan_weight_model"],
     "model.layers.1.mlp.down_proj.weight holds 1 NaN or inf value(s)"),
    ("model: bidirectional", None, "whiten.py", ["--model", "F:bidirectional_model"], "is not causal"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_leaves_nothing(case, full_run, files, tiny_dir, text_file, tmp_path):
    name, setup, script, args, expect = case
    if name == "whiten device cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    d = str(tmp_path / "run")
    shutil.copytree(full_run, d)
    if setup:
        setup(d, files)
    before = manifests(d)
    args = [files.get(a[2:], os.path.join(os.path.dirname(files["afile"]), a[2:])) if isinstance(a, str)
            and a.startswith("F:") else a for a in args]
    defaults = {"whiten.py": ["--model", tiny_dir, "--data", text_file, "--nsamples", 8, "--seqlen", 64],
                "evaluate.py": ["--data", text_file, *EVAL]}.get(script, [])
    run_dir = [] if "--run_dir" in args else ["--run_dir", d]
    code, stderr = run_inprocess(script, *defaults, *args, *run_dir)  # a traceback would raise here
    lines = stderr.strip().splitlines()
    assert code != 0, f"{name}: exit 0"
    assert lines and lines[-1].startswith("error:") and expect in lines[-1], f"{name}: {lines[-1:]}"
    assert manifests(d) == before  # nothing a later stage would accept was written or replaced


def test_a_model_with_other_weights_is_caught(tmp_path, tiny_dir, text_file):
    model = str(tmp_path / "model")
    shutil.copytree(tiny_dir, model)
    d = str(tmp_path / "run")
    stage("whiten.py", "--model", model, "--data", text_file, "--nsamples", 8, "--seqlen", 64, "--run_dir", d)
    tiny_model("llama", seed=1).save_pretrained(model)  # same config, other weights
    code, err = run_inprocess("decompose.py", "--run_dir", d)
    assert code == 2 and "is not the one whiten/ was made from" in err.strip().splitlines()[-1]


def test_the_same_model_in_another_folder_has_the_same_fingerprint(tmp_path, tiny_dir):
    """The config fingerprint is the config's content, not the folder it was read from: a model copied (or a
    cache folder re-keyed) is the same model, and one edited config field is not."""
    from transformers import AutoModelForCausalLM
    from plumbing.artifacts import config_hash
    copy = str(tmp_path / "copy")
    shutil.copytree(tiny_dir, copy)
    a, b = (AutoModelForCausalLM.from_pretrained(p) for p in (tiny_dir, copy))
    assert config_hash(a) == config_hash(b)
    b.config.rms_norm_eps *= 2
    assert config_hash(a) != config_hash(b)


def test_keep_one_is_the_original_for_every_method(full_run, tmp_path):
    d = str(tmp_path / "run")
    shutil.copytree(full_run, d)
    for method in ("hardconcrete", "energy"):
        stage("learn_masks.py", "--method", method, "--keep", 1.0, "--steps", 2, "--run_dir", d)
        alloc = json.load(open(f"{d}/allocation/ranks.json"))
        assert alloc["kept_fraction_linear"] == 1.0 and set(alloc["layers"].values()) == {"dense"}


def test_caches_follow_their_contents(full_run, tmp_path, text_file):
    d = str(tmp_path / "run")
    shutil.copytree(full_run, d)
    first = json.load(open(f"{d}/metrics.json"))["original"]["ppl"]
    edited = str(tmp_path / "edited.txt")  # same name as far as the cache key once went, other contents
    docs = open(text_file).read().split("\n\n")
    open(edited, "w").write("\n\n".join(docs[::-1]))
    stage("evaluate.py", "--data", edited, *EVAL, "--run_dir", d)
    assert json.load(open(f"{d}/metrics.json"))["original"]["ppl"] != first
    open(f"{d}/original_eval.json", "w").write("{truncated")  # an unreadable cache is rebuilt
    stage("evaluate.py", "--data", text_file, *EVAL, "--run_dir", d)
    metrics = json.load(open(f"{d}/metrics.json"))
    assert abs(metrics["original"]["ppl"] - first) < 1e-9
    assert set(metrics["chain"]) == set(STAGES)  # metrics.json names the artifacts it describes


# (stage that is killed, its args, where, the next stage and its args)
CRASHES = [
    ("whiten.py", "W", "json", "decompose.py", []),
    ("whiten.py", "W", "commit:aside", "decompose.py", []),
    ("whiten.py", "W", "commit:in", "decompose.py", []),
    ("decompose.py", [], "commit:before", "learn_masks.py", []),
    ("learn_masks.py", ["--keep", 0.7], "commit:aside", "truncate.py", []),
    ("learn_masks.py", ["--method", "strs", "--strs_samples", 1, "--strs_seqlen", 16], "json",
     "learn_masks.py", ["--method", "strs", "--strs_samples", 1, "--strs_seqlen", 16]),
    ("truncate.py", [], "commit:in", "evaluate.py", ["E"]),
    ("evaluate.py", ["E"], "json", "evaluate.py", ["E"]),
]


@pytest.mark.parametrize("crash", CRASHES, ids=[f"{c[0]}@{c[2]}" for c in CRASHES])
def test_a_kill_leaves_nothing_a_later_stage_accepts(crash, full_run, tiny_dir, text_file, tmp_path):
    script, args, point, after, after_args = crash
    d = str(tmp_path / "run")
    shutil.copytree(full_run, d)
    expand = {"W": ["--model", tiny_dir, "--data", text_file, "--nsamples", 4, "--seqlen", 64],
              "E": ["--data", text_file, *EVAL]}
    flat = lambda a: [x for y in ([a] if isinstance(a, str) else a) for x in expand.get(y, [y])]
    proc = run_stage("tests/crash.py", point, script, *flat(args), "--run_dir", d, check=False)
    assert proc.returncode == -9, f"{script} was not killed at {point}: {proc.stderr[-500:]}"
    nxt = run_stage(after, *flat(after_args), "--run_dir", d, check=False)
    if nxt.returncode != 0:
        lines = nxt.stderr.strip().splitlines()
        assert "Traceback" not in nxt.stderr and lines[-1].startswith("error:"), nxt.stderr[-2000:]


# ----------------------------------------------------------------------------- one process per run dir, full
# disks, budgets, caches

HOLD = ("import sys, time; sys.path.insert(0, {root!r}); from plumbing import cli; "
        "held = cli.run_dir_lock({d!r}, 'holder.py'); print('held', flush=True); time.sleep(60)")


def test_a_second_process_on_one_run_dir_is_refused_and_a_dead_holder_is_not(full_run, tmp_path):
    import signal
    import subprocess
    import sys
    from conftest import ROOT
    d = str(tmp_path / "run")
    shutil.copytree(full_run, d)
    holder = subprocess.Popen([sys.executable, "-c", HOLD.format(root=ROOT, d=d)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = manifests(d)
        proc = run_stage("learn_masks.py", "--keep", 0.7, "--run_dir", d, check=False)
        line = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and "is in use by holder.py (pid" in line, line
        assert manifests(d) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the killed holder's lock is gone with it (flock), and what a killed stage left is cleaned up
    os.makedirs(f"{d}/.allocation.tmp999999")
    open(f"{d}/.allocation.tmp999999/ranks.json", "w").write("{}")
    for name in ("metrics.json.tmp999999", "decompose/strs_x.json.tmp999999"):  # JSON writes cut short
        open(f"{d}/{name}", "w").write("{")
    run_stage("learn_masks.py", "--keep", 0.7, "--run_dir", d)
    assert json.load(open(f"{d}/allocation/ranks.json"))["keep"] == 0.7
    assert not [f for f in os.listdir(d) + os.listdir(f"{d}/decompose") if ".tmp" in f or ".old" in f]


def test_a_full_disk_is_one_line_and_leaves_the_previous_artifact(full_run, tmp_path):
    """A real full disk: the run dir on a tmpfs just larger than what is there (where this machine lets the
    test mount one), truncate.py needs a second compressed model's worth of space."""
    import subprocess
    d = str(tmp_path / "small")
    os.makedirs(d)
    pages = sum(-(-os.path.getsize(os.path.join(r, f)) // 4096) for r, _, fs in os.walk(full_run) for f in fs)
    size = (pages + 64) * 4096  # what is there, rounded to tmpfs pages, + 256 KB: less than a compressed model
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", d], capture_output=True)
    if mount.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (test_a_failed_write_* covers the class with a patched write)")
    try:
        shutil.copytree(full_run, d, dirs_exist_ok=True)
        before = manifests(d)
        proc = run_stage("truncate.py", "--run_dir", d, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert lines[-1].startswith("error: No space left on device while truncate.py ran"), lines[-1]
        assert manifests(d) == before and not [f for f in os.listdir(d) if ".tmp" in f or ".old" in f]
        ev = run_stage("evaluate.py", "--data", json.load(open(f"{d}/whiten/manifest.json"))["data"], *EVAL,
                       "--run_dir", d, check=False)  # the previous compressed/ still scores (or fails in one line)
        assert ev.returncode == 0 or ev.stderr.strip().splitlines()[-1].startswith("error: No space left"), ev.stderr
    finally:
        subprocess.run(["umount", d])


@pytest.mark.parametrize("where", ["safetensors", "json"])
def test_a_failed_write_is_one_line_and_leaves_the_previous_artifact(where, full_run, tmp_path, monkeypatch,
                                                                     capsys):
    """The same class in-process, with the write patched to fail as a full disk does (safetensors wraps
    the OS error in its own exception; json.dump raises OSError)."""
    import errno
    import safetensors.torch
    from plumbing import artifacts
    import learn_masks
    d = str(tmp_path / "run")
    shutil.copytree(full_run, d)
    before = manifests(d)
    if where == "safetensors":
        def fail(*a, **k):
            raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device "
                                              "(os error 28)")
        monkeypatch.setattr(learn_masks, "save_file", fail)
        args = ["--method", "ara", "--steps", 1, "--compensate", 1, "--keep", 0.7, "--train_seqlen", 32]
    else:
        real = json.dump

        def fail(obj, f, **k):
            real(obj, f, **k)
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(artifacts.json, "dump", fail)
        args = ["--keep", 0.7]
    monkeypatch.setattr("sys.argv", ["learn_masks.py"])
    with pytest.raises(SystemExit) as exit_:
        cli.run_main(learn_masks.main, learn_masks.parser().parse_args([*map(str, args), "--run_dir", d]))
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 1 and line.startswith("error: No space left on device while learn_masks.py ran")
    assert manifests(d) == before and not [f for f in os.listdir(d) if ".tmp" in f or ".old" in f]
    assert not [f for f in os.listdir(f"{d}/allocation") if ".tmp" in f]


def test_keep_is_never_exceeded(full_run, tmp_path):
    """Near 1 the break-even rounding made uniform and svdllm2 give a layer "dense" (m n) where k(rho) (m + n)
    was the budget: 0.99 -> 0.994 on the tiny model. Every method, at budgets where k(rho) lands on k*."""
    import learn_masks
    d = str(tmp_path / "run")
    shutil.copytree(full_run, d)
    decomp = json.load(open(f"{d}/decompose/manifest.json"))
    shapes = {name: (v["m"], v["n"]) for name, v in decomp["layers"].items()}
    hit = [rho for rho in (0.95, 0.99, 0.999) if any(base.rank_at_fraction(rho, m, n) >= base.k_star(m, n)
                                                     for m, n in shapes.values())]
    assert hit, "no budget here puts k(rho) at break-even: the test would not see the defect"
    for method in ("uniform", "svdllm2", "energy", "strs"):
        for rho in hit:
            args = learn_masks.parser().parse_args(["--method", method, "--keep", str(rho), "--run_dir", d,
                                                    "--strs_samples", "1", "--strs_seqlen", "16"])
            cli.run_main(learn_masks.main, args)
            kept = json.load(open(f"{d}/allocation/ranks.json"))["kept_fraction_linear"]
            assert kept <= rho + 1e-12, (method, rho, kept)


def test_strs_cache_is_keyed_on_dtype(full_run, tmp_path):
    d = str(tmp_path / "run")
    shutil.copytree(full_run, d)
    for dtype in ("float32", "bfloat16"):
        stage("learn_masks.py", "--method", "strs", "--strs_samples", 1, "--strs_seqlen", 16, "--dtype", dtype,
              "--run_dir", d)
    caches = sorted(f for f in os.listdir(f"{d}/decompose") if f.startswith("strs_"))
    assert len(caches) == 2 and "bfloat16" in caches[0] and "float32" in caches[1], caches


@pytest.mark.parametrize("edit", ["drop an entry", "NaN", "a string", "a layer renamed", "another q"])
def test_an_edited_strs_cache_is_rebuilt(edit, full_run, tmp_path):
    """A sensitivity table in decompose/ that no longer covers every (layer, q) pair with a finite perplexity is
    rebuilt like an unreadable one, and the allocation is the one a fresh table gives."""
    d = str(tmp_path / "run")
    shutil.copytree(full_run, d)
    flags = ("--method", "strs", "--keep", 0.6, "--strs_samples", 1, "--strs_seqlen", 16, "--run_dir", d)
    stage("learn_masks.py", *flags)
    want = json.load(open(f"{d}/allocation/ranks.json"))["layers"]
    (cache,) = [f"{d}/decompose/{f}" for f in os.listdir(f"{d}/decompose") if f.startswith("strs_")]
    saved = json.load(open(cache))
    row = saved["table"][0]
    if edit == "drop an entry":
        del saved["table"][0]
    else:
        i = {"NaN": 2, "a string": 2, "a layer renamed": 0, "another q": 1}[edit]
        row[i] = {"NaN": float("nan"), "a string": "x", "a layer renamed": "no.such.layer", "another q": 0.55}[edit]
    json.dump(saved, open(cache, "w"))  # NaN as Python writes it
    stage("learn_masks.py", *flags)
    assert json.load(open(f"{d}/allocation/ranks.json"))["layers"] == want


def test_huge_kmax_mult_is_full_rank_not_a_traceback(full_run, tmp_path):
    d = str(tmp_path / "run")
    shutil.copytree(full_run, d)
    stage("decompose.py", "--kmax_mult", "1e308", "--run_dir", d)
    for v in json.load(open(f"{d}/decompose/manifest.json"))["layers"].values():
        assert v["k_max"] == min(v["m"], v["n"])


def test_a_task_file_rewritten_in_place_is_read_from_its_new_items(tmp_path):
    """The datasets library (lm-eval's loader) caches a local JSON file keyed on its path and modification time:
    a file rewritten in place with the same mtime (and size) would be read from its old rows. What lm-eval
    is given must therefore be named by content: the rows it loads are the new file's."""
    import argparse
    import datasets
    import yaml
    path = tmp_path / "items.jsonl"
    args = argparse.Namespace(run_dir=str(tmp_path / "run"), task_items=1)
    for flip in (0, 1):
        path.write_text("".join(json.dumps({"context": "a", "choices": [" b", " c"], "label": (i + flip) % 2}) + "\n"
                                for i in range(4)))
        os.utime(path, ns=(10 ** 18, 10 ** 18))  # the same modification time both times, the same size
        (name,), _, _ = prepare_tasks([f"local:{path}"], None, None, args.run_dir, args.task_items)
        spec = yaml.safe_load(open(f"{args.run_dir}/tasks/{name}.yaml"))
        rows = datasets.load_dataset("json", data_files=spec["dataset_kwargs"]["data_files"], split="test")
        assert list(rows["label"]) == [(i + flip) % 2 for i in range(4)]


def test_two_local_task_files_with_one_name_are_two_tasks(tmp_path):
    import argparse
    items = [{"context": "a", "choices": [" b", " c"], "label": i % 2} for i in range(4)]
    paths = []
    for sub, flip in (("x", 0), ("y", 1)):
        os.makedirs(tmp_path / sub)
        path = tmp_path / sub / "items.jsonl"
        path.write_text("".join(json.dumps({**it, "label": (it["label"] + flip) % 2}) + "\n" for it in items))
        paths.append(str(path))
    args = argparse.Namespace(run_dir=str(tmp_path / "run"), task_items=1)
    names, _, keys = prepare_tasks([f"local:{p}" for p in paths], None, None, args.run_dir, args.task_items)
    assert len(set(names)) == 2 and len(set(keys)) == 2, names


def test_a_model_with_non_finite_weights_is_never_saved():
    import truncate
    from plumbing.cli import UserError
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(UserError, match="mlp.down_proj.weight holds NaN or inf"):
        truncate.check_finite(model, "python decompose.py")


def test_an_all_zero_layer_gives_a_strict_json_manifest(tmp_path, text_file):
    """A weight that is all zeros has an all-zero spectrum: its relative truncation errors are 0 (nothing to lose),
    not 0 / 0, so decompose/manifest.json stays strict JSON. Catches a bare NaN written into the manifest."""
    import torch
    from conftest import tiny_model, tiny_tokenizer
    folder = tmp_path / "zero_layer_model"
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.zero_()
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    d = tmp_path / "run"
    stage("whiten.py", "--model", folder, "--data", text_file, "--nsamples", 4, "--seqlen", 32, "--run_dir", d)
    stage("decompose.py", "--run_dir", d)
    reject = lambda c: (_ for _ in ()).throw(ValueError(f"{c} in a manifest"))  # noqa: E731
    manifest = json.loads(open(d / "decompose" / "manifest.json").read(), parse_constant=reject)
    assert set(manifest["layers"]["model.layers.0.mlp.down_proj"]["rel_err"].values()) == {0.0}


def test_ctrl_c_is_one_line_and_the_shells_status(tmp_path, capsys):
    """A KeyboardInterrupt inside a stage ends with exit status 130 (128 + SIGINT, what a shell reports) and one
    line, and leaves no temporary folder. Catches a traceback on Ctrl-C."""
    import argparse
    from plumbing import artifacts, cli

    def main(args):
        artifacts.stage_dir(args.run_dir, "allocation")  # a half-made stage folder, as a real stage has
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as e:
        cli.run_main(main, argparse.Namespace(run_dir=str(tmp_path)))
    assert e.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted" in err[0]
    assert not [p for p in os.listdir(tmp_path) if "tmp" in p]
