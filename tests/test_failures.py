"""How the stages fail (issue 9). A table of bad inputs, each run as a subprocess the way a user would:
non-zero exit, the last stderr line starts with "error:" and names the problem, no traceback, and no
artifact a later stage would accept (every stage folder's manifest is as before, none is added). Then
SIGKILLs injected where a kill does the most harm (inside the folder swap, inside JSON writes, inside
a cache write): the next stage either works on a complete earlier artifact or fails with one line."""
import json
import os
import shutil

import pytest
import torch

from conftest import run_stage, tiny_model

STAGES = ("whiten", "decompose", "allocation", "compressed")
EVAL = ("--seqlen", 64, "--max_windows", 2)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_dir, text_file):
    """All five stages once on the tiny model; every case works on its own copy."""
    d = str(tmp_path_factory.mktemp("full"))
    run_stage("whiten.py", "--model", tiny_dir, "--data", text_file, "--nsamples", 8, "--seqlen", 64, "--run_dir", d)
    run_stage("decompose.py", "--run_dir", d)
    run_stage("learn_masks.py", "--keep", 0.6, "--run_dir", d)
    run_stage("truncate.py", "--run_dir", d)
    run_stage("evaluate.py", "--data", text_file, *EVAL, "--run_dir", d)
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
    spm = t / "sentencepiece_model"  # a tokenizer that needs sentencepiece and its tokenizer.model
    shutil.copytree(tiny_dir, spm)
    os.remove(spm / "tokenizer.json")
    cfg = json.loads((spm / "tokenizer_config.json").read_text())
    (spm / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": "LlamaTokenizer"}))
    return {p.name: str(p) for p in t.iterdir()}


def manifests(d):
    return {s: open(f"{d}/{s}/manifest.json").read() if os.path.isfile(f"{d}/{s}/manifest.json") else None
            for s in STAGES}


def edit_json(d, stage, name, change):
    """Edit a stage's JSON file by hand and keep the manifest's file sizes in step (so the edit itself,
    not the size check, is what the stage has to catch)."""
    path = f"{d}/{stage}/{name}"
    obj = json.load(open(path))
    text = change(obj) if callable(change) else change
    open(path, "w").write(text if isinstance(text, str) else json.dumps(obj))
    if name == "manifest.json":
        return
    man = json.load(open(f"{d}/{stage}/manifest.json"))
    man["files"][name] = os.path.getsize(path)
    json.dump(man, open(f"{d}/{stage}/manifest.json", "w"))


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
    ("whiten nsamples 0", None, "whiten.py", ["--nsamples", 0], "--nsamples 0 is out of range"),
    ("whiten seqlen -1", None, "whiten.py", ["--seqlen", -1], "--seqlen -1 is out of range"),
    ("whiten batch 0", None, "whiten.py", ["--batch_size", 0], "--batch_size 0 is out of range"),
    ("whiten seed -1", None, "whiten.py", ["--seed", -1], "--seed -1 is out of range"),
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
    ("decompose kmax nan", None, "decompose.py", ["--kmax_mult", "nan"], "--kmax_mult nan is out of range"),
    ("decompose kmax inf", None, "decompose.py", ["--kmax_mult", "inf"], "--kmax_mult inf is out of range"),
    ("decompose kmax < 1", None, "decompose.py", ["--kmax_mult", 0.5], "--kmax_mult 0.5 is out of range"),
    ("decompose no whiten", lambda d, f: shutil.rmtree(f"{d}/whiten"), "decompose.py", [], "run `python whiten.py"),
    ("decompose manifest not json", lambda d, f: open(f"{d}/whiten/manifest.json", "w").write("{oops"),
     "decompose.py", [], "whiten/manifest.json is damaged or incomplete"),
    ("decompose manifest key missing", lambda d, f: edit_json(d, "whiten", "manifest.json", lambda o: o.pop("files")),
     "decompose.py", [], "damaged or incomplete (no files)"),
    ("decompose whitening truncated", lambda d, f: truncate_file(f"{d}/whiten/block_000.safetensors"),
     "decompose.py", [], "block_000.safetensors is damaged or incomplete"),
    ("decompose whitening corrupt", lambda d, f: corrupt_same_size(f"{d}/whiten/block_000.safetensors"),
     "decompose.py", [], "block_000.safetensors is damaged or incomplete"),
    ("decompose file missing", lambda d, f: os.remove(f"{d}/whiten/calib_ids.safetensors"),
     "decompose.py", [], "calib_ids.safetensors is damaged or incomplete"),
    ("decompose device bogus", None, "decompose.py", ["--device", "bogus"], "is not a device"),
    ("learn keep nan", None, "learn_masks.py", ["--keep", "nan"], "outside (0, 1]"),
    ("learn keep 0", None, "learn_masks.py", ["--keep", 0], "outside (0, 1]"),
    ("learn keep 1.5", None, "learn_masks.py", ["--keep", 1.5], "outside (0, 1]"),
    ("learn keep tiny", None, "learn_masks.py", ["--keep", 0.001], "rank 1 in every layer"),
    ("learn steps -5", None, "learn_masks.py", ["--method", "ara", "--steps", -5], "--steps -5 is out of range"),
    ("learn steps 0", None, "learn_masks.py", ["--method", "ara", "--steps", 0], "--steps 0 is out of range"),
    ("learn batch 0", None, "learn_masks.py", ["--method", "ara", "--batch_size", 0], "--batch_size 0 is out of"),
    ("learn train_seqlen 0", None, "learn_masks.py", ["--train_seqlen", 0], "--train_seqlen 0 is out of range"),
    ("learn tau 0", None, "learn_masks.py", ["--method", "sigmoid", "--tau", 0], "--tau 0.0 is out of range"),
    ("learn lr nan", None, "learn_masks.py", ["--method", "ara", "--lr", "nan"], "--lr nan is out of range"),
    ("learn lr -1", None, "learn_masks.py", ["--method", "ara", "--lr", -1], "--lr -1.0 is out of range"),
    ("learn alpha nan", None, "learn_masks.py", ["--method", "ara", "--alpha", "nan"], "--alpha nan is out of"),
    ("learn soco stages sum", None, "learn_masks.py", ["--method", "soco", "--soco_stages", 0.5, 0.6],
     "must sum to 1"),
    ("learn soco stages < 0", None, "learn_masks.py", ["--method", "soco", "--soco_stages", -0.2, 1.2],
     "--soco_stages -0.2 is out of range"),
    ("learn ara init paper", None, "learn_masks.py", ["--method", "ara", "--init", "paper"], "--init paper: ARA's init"),
    ("learn compensate -1", None, "learn_masks.py", ["--compensate", -1], "--compensate -1 is out of range"),
    ("learn compensate_lr 0", None, "learn_masks.py", ["--compensate_lr", 0], "--compensate_lr 0.0 is out of range"),
    ("learn hidden layer 99", None, "learn_masks.py", ["--method", "ara", "--loss", "hidden_mse", "--hidden_layers",
                                                       99, "--steps", 1], "--hidden_layers [99]"),
    ("learn strs samples 0", None, "learn_masks.py", ["--method", "strs", "--strs_samples", 0],
     "--strs_samples 0 is out of range"),
    ("learn unknown method", None, "learn_masks.py", ["--method", "magic"], "unknown --method"),
    ("learn dtype with device_map", None, "learn_masks.py", ["--method", "ara", "--dtype", "float32", "--device_map",
                                                             "auto"], "--dtype float32 with --device_map"),
    ("learn factors corrupt", lambda d, f: corrupt_same_size(f"{d}/decompose/block_000.safetensors"),
     "learn_masks.py", ["--method", "energy"], "block_000.safetensors is damaged or incomplete"),
    ("learn decompose manifest not json", lambda d, f: open(f"{d}/decompose/manifest.json", "w").write("[]"),
     "learn_masks.py", [], "decompose/manifest.json is damaged or incomplete"),
    ("truncate rank 0", lambda d, f: edit_json(d, "allocation", "ranks.json", set_rank(0)),
     "truncate.py", [], "the rank 0"),
    ("truncate rank too big", lambda d, f: edit_json(d, "allocation", "ranks.json", set_rank(10 ** 6)),
     "truncate.py", [], "the rank 1000000"),
    ("truncate ranks not json", lambda d, f: edit_json(d, "allocation", "ranks.json", "{not json"),
     "truncate.py", [], "ranks.json is damaged or incomplete"),
    ("truncate components missing", lambda d, f: edit_json(d, "allocation", "ranks.json",
                                                           lambda o: o.update(components=True)),
     "truncate.py", [], "components.safetensors is missing"),
    ("truncate no allocation", lambda d, f: shutil.rmtree(f"{d}/allocation"), "truncate.py", [],
     "run `python learn_masks.py"),
    ("evaluate max_windows -1", None, "evaluate.py", ["--max_windows", -1], "--max_windows -1 is out of range"),
    ("evaluate seqlen 0", None, "evaluate.py", ["--seqlen", 0], "--seqlen 0 is out of range"),
    ("evaluate seqlen > positions", None, "evaluate.py", ["--seqlen", 10 ** 7], "longer than the model's 256"),
    ("evaluate batch 0", None, "evaluate.py", ["--batch_size", 0], "--batch_size 0 is out of range"),
    ("evaluate task_items 0", None, "evaluate.py", ["--task_items", 0], "--task_items 0 is out of range"),
    ("evaluate stale compressed", lambda d, f: run_stage("learn_masks.py", "--keep", 0.7, "--run_dir", d),
     "evaluate.py", [], "compressed was made from a different allocation/"),
    ("evaluate compressed corrupt", lambda d, f: corrupt_same_size(f"{d}/compressed/model.safetensors"),
     "evaluate.py", ["--max_windows", 1], "model.safetensors is damaged or incomplete"),
    ("evaluate not utf-8", None, "evaluate.py", ["--data", "F:latin1.txt"], "is not UTF-8 text"),
    ("evaluate dtype with device_map", None, "evaluate.py", ["--dtype", "bfloat16", "--device_map", "auto"],
     "--dtype bfloat16 with --device_map"),
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
    proc = run_stage(script, *defaults, *args, *run_dir, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0, f"{name}: exit 0\n{proc.stdout[-500:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines and lines[-1].startswith("error:") and expect in lines[-1], f"{name}: {lines[-1:]}"
    assert manifests(d) == before  # nothing a later stage would accept was written or replaced


def test_a_model_with_other_weights_is_caught(tmp_path, tiny_dir, text_file):
    model = str(tmp_path / "model")
    shutil.copytree(tiny_dir, model)
    d = str(tmp_path / "run")
    run_stage("whiten.py", "--model", model, "--data", text_file, "--nsamples", 8, "--seqlen", 64, "--run_dir", d)
    tiny_model("llama", seed=1).save_pretrained(model)  # same config, other weights
    proc = run_stage("decompose.py", "--run_dir", d, check=False)
    assert proc.returncode == 2 and "is not the one whiten/ was made from" in proc.stderr.strip().splitlines()[-1]


def test_keep_one_is_the_original_for_every_method(full_run, tmp_path):
    d = str(tmp_path / "run")
    shutil.copytree(full_run, d)
    for method in ("hardconcrete", "energy"):
        run_stage("learn_masks.py", "--method", method, "--keep", 1.0, "--steps", 2, "--run_dir", d)
        alloc = json.load(open(f"{d}/allocation/ranks.json"))
        assert alloc["kept_fraction_linear"] == 1.0 and set(alloc["layers"].values()) == {"dense"}


def test_caches_follow_their_contents(full_run, tmp_path, text_file):
    d = str(tmp_path / "run")
    shutil.copytree(full_run, d)
    first = json.load(open(f"{d}/metrics.json"))["original"]["ppl"]
    edited = str(tmp_path / "edited.txt")  # same name as far as the cache key once went, other contents
    docs = open(text_file).read().split("\n\n")
    open(edited, "w").write("\n\n".join(docs[::-1]))
    run_stage("evaluate.py", "--data", edited, *EVAL, "--run_dir", d)
    assert json.load(open(f"{d}/metrics.json"))["original"]["ppl"] != first
    open(f"{d}/original_eval.json", "w").write("{truncated")  # an unreadable cache is rebuilt
    run_stage("evaluate.py", "--data", text_file, *EVAL, "--run_dir", d)
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
    proc = run_stage(script, *flat(args), "--run_dir", d, check=False, env={"RANKALLOC_CRASH": point})
    assert proc.returncode == -9, f"{script} was not killed at {point}: {proc.stderr[-500:]}"
    nxt = run_stage(after, *flat(after_args), "--run_dir", d, check=False)
    if nxt.returncode != 0:
        lines = nxt.stderr.strip().splitlines()
        assert "Traceback" not in nxt.stderr and lines[-1].startswith("error:"), nxt.stderr[-2000:]
