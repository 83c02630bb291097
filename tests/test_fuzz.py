"""Generated bad inputs: for every artifact a stage reads, hypothesis removes, retypes, reshapes and rescales
(NaN, inf, out of range) its fields and tensors, one at a time, with the manifests' sizes and hashes kept in
step (as a buggy tool or a hand edit that also fixes the hashes leaves them), and generates malformed rows of
a local task file. Every case must end in exit 2 with an `error:` line and no traceback, or be accepted and
give the intact run's result (a case accepted with another result is silently wrong, and fails).

CI runs a fixed seed and 25 examples per target (about a minute); RANKALLOC_FUZZ=long runs 300 per target;
-s prints the tally per target: RANKALLOC_FUZZ=long python -m pytest -q tests/test_fuzz.py -s
"""
import collections
import hashlib
import json
import os
import shutil
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from conftest import run_inprocess, stage
from plumbing.artifacts import file_hash

LONG = os.environ.get("RANKALLOC_FUZZ") == "long"
settings.register_profile("fuzz", max_examples=300 if LONG else 25, derandomize=True, deadline=None, database=None,
                          suppress_health_check=list(HealthCheck))
STAGES = ("whiten", "decompose", "allocation", "compressed")
TALLY = collections.Counter()


def readers(text_file):
    """Each stage that reads an artifact, with a small run of it."""
    return {"decompose": ("decompose.py", []),
            "learn": ("learn_masks.py", ["--method", "ara", "--keep", 0.6, "--steps", 1, "--compensate", 0]),
            "truncate": ("truncate.py", []),
            "evaluate": ("evaluate.py", ["--data", text_file, "--seqlen", 64, "--max_windows", 2])}


def result(reader, d):
    """What a reader produced, as a digest: the tensors and numbers it wrote (not times, versions or hashes
    of its inputs)."""
    h = hashlib.sha256()
    if reader == "decompose":
        for f in sorted(os.listdir(f"{d}/decompose")):
            if f.endswith(".safetensors"):
                for k, t in sorted(load_file(f"{d}/decompose/{f}").items()):
                    h.update(k.encode() + t.float().numpy().tobytes())
        h.update(json.dumps(json.load(open(f"{d}/decompose/manifest.json"))["layers"], sort_keys=True).encode())
    elif reader == "learn":
        h.update(json.dumps(json.load(open(f"{d}/allocation/ranks.json"))["layers"], sort_keys=True).encode())
    elif reader == "truncate":
        h.update(open(f"{d}/compressed/model.safetensors", "rb").read())
        for f, key in (("ranks.json", "layers"), ("config.json", "lowrank_ranks")):
            h.update(json.dumps(json.load(open(f"{d}/compressed/{f}"))[key], sort_keys=True).encode())
        m = json.load(open(f"{d}/compressed/manifest.json"))
        h.update(json.dumps([m["params_original"], m["params_compressed"], m["kept_fraction_linear"]]).encode())
    else:
        m = json.load(open(f"{d}/metrics.json"))
        h.update(json.dumps([m["original"], m["compressed"], m["method"], m["keep"], m["kept_fraction_linear"],
                             m["layers"], m["layers_dense"]], sort_keys=True).encode())
    return h.hexdigest()


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_dir, text_file):
    """The five stages once on the tiny model (SoCo, so the allocation carries learned components), and each
    reader's result on it."""
    d = str(tmp_path_factory.mktemp("fuzz"))
    stage("whiten.py", "--model", tiny_dir, "--data", text_file, "--nsamples", 8, "--seqlen", 64, "--run_dir", d)
    stage("decompose.py", "--run_dir", d)
    stage("learn_masks.py", "--method", "soco", "--keep", 0.6, "--steps", 2, "--compensate", 1, "--run_dir", d)
    stage("truncate.py", "--run_dir", d)
    stage("evaluate.py", *readers(text_file)["evaluate"][1], "--run_dir", d)
    want = {}
    for name, (script, args) in readers(text_file).items():
        e = tempfile.mkdtemp()
        shutil.copytree(d, f"{e}/run")
        stage(script, *args, "--run_dir", f"{e}/run")
        want[name] = result(name, f"{e}/run")
        shutil.rmtree(e)
    return d, want


def resync(d, stage_, name):
    """Keep the edited file's size and hash in its manifest, and every later manifest's parent hashes."""
    if name != "manifest.json":
        path, man_path = f"{d}/{stage_}/{name}", f"{d}/{stage_}/manifest.json"
        man = json.load(open(man_path))
        man["files"][name] = {"bytes": os.path.getsize(path), "sha256": file_hash(path)}
        json.dump(man, open(man_path, "w"))
    for child in STAGES[STAGES.index(stage_) + 1:]:
        man = json.load(open(f"{d}/{child}/manifest.json"))
        man["inputs"] = {p: file_hash(f"{d}/{p}/manifest.json") for p in man["inputs"]}
        json.dump(man, open(f"{d}/{child}/manifest.json", "w"))


def json_paths(obj, prefix=(), depth=3):
    """Key paths into a JSON object: every top-level key, and the first two keys of each nested object or list."""
    out = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    for i, (k, v) in enumerate(items):
        if prefix and i >= 2:
            break
        out.append(prefix + (k,))
        if depth > 1:
            out += json_paths(v, prefix + (k,), depth - 1)
    return out


VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2, 3), st.sampled_from([10 ** 9, -10 ** 9, 2 ** 63]),
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3), st.sampled_from(
                       [[], {}, [1, 2], "dense", "../x", "float16", "eigh", "cholesky"]))


def mutate_json(data, path):
    obj = json.load(open(path))
    where = data.draw(st.sampled_from(json_paths(obj)), label="field")
    parent = obj
    for k in where[:-1]:
        parent = parent[k]
    if data.draw(st.booleans(), label="remove"):
        del parent[where[-1]]
        what = f"remove {where}"
    else:
        parent[where[-1]] = data.draw(VALUES, label="value")
        what = f"set {where} = {parent[where[-1]]!r}"
    with open(path, "w") as f:
        json.dump(obj, f)  # NaN and Infinity as Python writes them
    return what


def mutate_tensors(data, path):
    tensors = load_file(path)
    key = data.draw(st.sampled_from(sorted(tensors)), label="tensor")
    t = tensors[key]
    op = data.draw(st.sampled_from(["remove", "dtype", "shape", "value"]), label="op")
    if op == "remove":
        del tensors[key]
    elif op == "dtype":
        tensors[key] = t.to(data.draw(st.sampled_from([torch.int32, torch.int64, torch.float16, torch.float64,
                                                       torch.bfloat16, torch.float32, torch.bool])))
    elif op == "shape":
        how = data.draw(st.sampled_from(["flat", "short", "narrow", "unsqueeze", "empty"]))
        new = {"flat": lambda: t.reshape(-1), "short": lambda: t[:-1], "unsqueeze": lambda: t.unsqueeze(0),
               "narrow": lambda: t[..., :-1] if t.dim() > 1 else t[1:], "empty": lambda: t[:0]}[how]()
        tensors[key] = new.contiguous()
        op = f"shape {how}"
    else:  # a value out of the tensor's range; a value inside it is a valid-looking edit no schema can see
        v, i = data.draw(st.sampled_from(out_of_range(key, t)), label="value, index")
        t = t.clone()
        if t.numel():
            t.view(-1)[i] = v
        tensors[key] = t
        op = f"value {v} at {i}"
    save_file(tensors, path)
    return f"{op} {key}"


def out_of_range(key, t):
    """(value, flat index) pairs outside what tensor `key` may hold: non-finite floats anywhere; a Cholesky
    factor's diagonal <= 0 (its first and last packed entries are diagonal); a spectrum negative or rising at
    its end; token ids and component indices below 0 or past the vocabulary / k_max; scales below 0."""
    last = max(t.numel() - 1, 0)
    if not t.is_floating_point():
        return [(-1, 0), (-1, last), (10 ** 6, 0), (10 ** 6, last)]
    cases = [(float("nan"), 0), (float("inf"), last), (-float("inf"), 0)]
    if key.endswith(".S"):
        cases += [(-1.0, 0), (0.0, last)]
    if key.endswith((".sigma", ".scale")):
        cases += [(-1.0, last)]
    if key.endswith(".sigma"):
        cases += [(1e30, last)]
    return cases


# (artifact file relative to the run dir, the reader)
TARGETS = [("whiten/manifest.json", "decompose"), ("whiten/manifest.json", "truncate"),
           ("whiten/block_000.safetensors", "decompose"),
           ("whiten/calib_ids.safetensors", "learn"), ("decompose/manifest.json", "learn"),
           ("decompose/manifest.json", "truncate"), ("decompose/block_000.safetensors", "truncate"),
           ("allocation/ranks.json", "truncate"), ("allocation/components.safetensors", "truncate"),
           ("allocation/manifest.json", "truncate"), ("allocation/ranks.json", "evaluate"),
           ("compressed/config.json", "evaluate"),
           ("compressed/ranks.json", "evaluate"), ("compressed/manifest.json", "evaluate")]


def outcome(code, err, got, want):
    """clean (exit 2, last line error:), accepted (exit 0, the intact result), or what went wrong."""
    lines = err.strip().splitlines()
    if code == 0:
        return "accepted" if got == want else "silently wrong"
    if code == 2 and lines and lines[-1].startswith("error:") and "Traceback" not in err:
        return "clean"
    return f"exit {code}: {lines[-1:] if lines else ''}"


@pytest.mark.parametrize("target,reader", TARGETS, ids=[f"{t}->{r}" for t, r in TARGETS])
def test_generated_damage_is_one_line_or_harmless(target, reader, base, text_file):
    d0, want = base
    script, args = readers(text_file)[reader]

    @settings(settings.get_profile("fuzz"))
    @given(data=st.data())
    def case(data):
        e = tempfile.mkdtemp()
        try:
            d = f"{e}/run"
            shutil.copytree(d0, d)
            path = f"{d}/{target}"
            what = (mutate_json if path.endswith(".json") else mutate_tensors)(data, path)
            stage_, name = target.split("/")
            resync(d, stage_, name)
            code, err = run_inprocess(script, *args, "--run_dir", d)  # a traceback raises here
            got = result(reader, d) if code == 0 else None
            kind = outcome(code, err, got, want[reader])
            TALLY[kind] += 1
            assert kind in ("clean", "accepted"), f"{target} -> {reader}: {what}: {kind}\n{err[-1500:]}"
        finally:
            shutil.rmtree(e, ignore_errors=True)
    TALLY.clear()
    try:
        case()
    finally:
        print(f"\nfuzz {target} -> {reader}: {dict(TALLY)}")  # shown with -s


ROWS = st.one_of(
    st.fixed_dictionaries({"context": st.one_of(st.text(max_size=5), st.integers(), st.none()),
                           "choices": st.one_of(st.lists(st.text(max_size=3), max_size=4), st.text(max_size=3),
                                                st.lists(st.integers(), max_size=3), st.none()),
                           "label": st.one_of(st.integers(-2, 5), st.booleans(), st.floats(), st.text(max_size=2),
                                              st.none())}),
    st.dictionaries(st.sampled_from(["context", "choices", "label", "extra"]), st.integers(), max_size=3),
    st.lists(st.integers(), max_size=2), st.text(max_size=4))


@settings(settings.get_profile("fuzz"), max_examples=500 if LONG else 50)
@given(rows=st.lists(ROWS, min_size=1, max_size=3), raw=st.sampled_from(["", "not json\n", "{\n", "\n", "  \n"]))
def test_generated_task_rows_are_one_line_or_read_as_written(rows, raw):
    """A local task file of generated rows: refused in one line naming the file and the row, or read into
    exactly the items it holds (what lm-eval is then given)."""
    from plumbing.cli import UserError
    from evaluation.tasks import read_task_file
    with tempfile.TemporaryDirectory() as e:
        path = f"{e}/items.jsonl"
        text = "".join(json.dumps(r) + "\n" for r in rows) + raw
        open(path, "w").write(text)
        try:
            items = read_task_file(path)
        except UserError as err:
            assert path in str(err) and "\n" not in str(err)
            return
        lines = [json.loads(x) for x in text.splitlines() if x.strip()]
        for it, row in zip(items, lines, strict=True):  # accepted: every row valid, read as written
            assert type(row["context"]) is str and type(row["label"]) is int and not isinstance(row["label"], bool)
            assert isinstance(row["choices"], list) and len(row["choices"]) >= 2
            assert all(type(c) is str for c in row["choices"]) and 0 <= row["label"] < len(row["choices"])
            assert it == {k: row[k] for k in ("context", "choices", "label")}


def entries(d):
    """Every file and folder of a run dir (relative paths), the lock's files aside."""
    found = []
    for root, dirs, files in os.walk(d):
        found += [os.path.relpath(os.path.join(root, x), d) for x in dirs + files if not x.startswith(".lock")]
    return sorted(found)


def test_generated_entries_of_the_wrong_kind_are_one_line_or_harmless(base, text_file):
    """Any entry of a complete run dir turned into the other kind (a file into an empty folder, a folder into a
    small file), then any reader run on it: one line and exit 2, or exit 0 with the intact result."""
    d0, want = base
    paths = entries(d0)

    @settings(settings.get_profile("fuzz"), max_examples=60 if LONG else 12)
    @given(path=st.sampled_from(paths), reader=st.sampled_from(sorted(readers(text_file))))
    def case(path, reader):
        e = tempfile.mkdtemp()
        try:
            d = f"{e}/run"
            shutil.copytree(d0, d)
            target = f"{d}/{path}"
            if os.path.isdir(target):
                shutil.rmtree(target)
                open(target, "w").write("x")
            else:
                os.remove(target)
                os.makedirs(target)
            script, args = readers(text_file)[reader]
            code, err = run_inprocess(script, *args, "--run_dir", d)  # a traceback raises here
            kind = outcome(code, err, result(reader, d) if code == 0 else None, want[reader])
            assert kind in ("clean", "accepted"), f"{path} -> {reader}: {kind}\n{err[-1500:]}"
        finally:
            shutil.rmtree(e, ignore_errors=True)
    case()


TEXT = st.text(st.characters(exclude_categories=()), max_size=6)  # any code point: controls, lone surrogates, ""


def test_generated_task_strings_are_one_line_or_scored(tmp_path):
    """Local task rows whose strings are generated (written as JSON, so a lone surrogate is a \\ud800 escape): each
    file refused in one line naming it, or accepted; then every accepted row scored end to end through lm-eval on
    a tiny model in one run (accuracy in [0, 1]). Catches text the harness chokes on (an empty choice, a template
    character, an unencodable string) accepted and reaching a traceback there."""
    from conftest import tiny_model, tiny_tokenizer
    from plumbing.cli import UserError
    from evaluation.tasks import prepare_tasks, read_task_file, zero_shot
    accepted = []

    @settings(settings.get_profile("fuzz"), max_examples=1000 if LONG else 200)
    @given(rows=st.lists(st.tuples(TEXT, st.lists(TEXT, min_size=2, max_size=3), st.integers(0, 2)), min_size=1,
                         max_size=2))
    def case(rows):
        path = tmp_path / "items.jsonl"
        path.write_text("".join(json.dumps({"context": c, "choices": ch, "label": y % len(ch)}) + "\n"
                                for c, ch, y in rows))
        try:
            accepted.extend(read_task_file(str(path)))
        except UserError as err:
            assert str(path) in str(err) and "\n" not in str(err)
    case()
    assert accepted  # some generated rows are valid
    path = tmp_path / "accepted.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in accepted))
    tasks, manager, _ = prepare_tasks([f"local:{path}"], None, tiny_tokenizer(), str(tmp_path / "run"), 1)
    acc = zero_shot(tiny_model("llama").eval(), tiny_tokenizer(), tasks, manager, 8)[tasks[0]]["acc"]
    assert 0 <= acc <= 1


@settings(settings.get_profile("fuzz"), max_examples=40 if LONG else 6)
@given(docs=st.lists(st.text(st.characters(exclude_categories=()), max_size=40), min_size=0, max_size=12),
       sep=st.sampled_from(["\n\n", "\n", "\r\n\r\n", "\n\n\n"]), suffix=st.sampled_from([".txt", ".jsonl"]))
def test_generated_text_files_are_one_line_or_calibrate(docs, sep, suffix, tiny_dir):
    """A calibration text file of generated documents (any code point, lone surrogates written as the encoder allows,
    empty documents), as .txt or .jsonl: whiten.py either refuses it in one line (exit 2) or writes whiten/."""
    with tempfile.TemporaryDirectory() as e:
        path = f"{e}/text{suffix}"
        if suffix == ".txt":
            open(path, "w", encoding="utf-8", errors="surrogateescape").write(sep.join(docs))
        else:
            open(path, "w").write("".join(json.dumps({"text": d}) + "\n" for d in docs))
        code, err = run_inprocess("whiten.py", "--model", tiny_dir, "--data", path, "--nsamples", 2, "--seqlen", 16,
                                  "--run_dir", f"{e}/run")
        lines = err.strip().splitlines()
        assert code == 0 or (code == 2 and lines and lines[-1].startswith("error:") and "Traceback" not in err), err[-800:]
        assert (code == 0) == os.path.isdir(f"{e}/run/whiten")
