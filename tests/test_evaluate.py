"""Evaluation users trust: zero-shot through lm-eval on a local task, speed/memory report, STRS,
and the allocation heatmap, on the tiny model."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, run_inprocess, stage
from plumbing import cli
from evaluation.tasks import prepare_tasks

EVAL = ("--seqlen", 64, "--max_windows", 4)


@pytest.fixture(scope="module")
def evaluated(run_dir, text_file):
    stage("learn_masks.py", "--method", "uniform", "--keep", 0.5, "--run_dir", run_dir)
    stage("truncate.py", "--run_dir", run_dir)
    out = []
    for speed in (("--speed", "--speed_batch", 2, "--speed_seqlen", 32, "--speed_new_tokens", 4), ()):
        if os.path.exists(f"{run_dir}/original_eval.json"):  # the second run measures the original again,
            os.remove(f"{run_dir}/original_eval.json")  # not a cache hit, so equal numbers mean determinism
        stage("evaluate.py", "--data", text_file, *EVAL, "--tasks", "local_continuation", "--task_items", 12,
              *speed, "--run_dir", run_dir)
        out.append(json.load(open(f"{run_dir}/metrics.json")))
    return out


def test_zero_shot_is_in_range_and_repeatable(evaluated):
    first, second = evaluated
    for which in ("original", "compressed"):
        acc = first[which]["zero_shot"]["local_continuation"]
        assert set(acc) == {"acc", "acc_norm"} and all(0 <= v <= 1 for v in acc.values())
        assert acc == second[which]["zero_shot"]["local_continuation"]


def test_speed_report_counts_what_it_measured(evaluated):
    """The speed report against independent counts: its parameter counts are the ones the perplexity run
    counted in another process, the files on disk hold those float32 parameters (plus headers), and each
    process's peak memory holds at least its weights. Catches the wrong folder measured, a file left out,
    a child that loaded the other model."""
    metrics = evaluated[0]
    speed = metrics["speed"]
    assert speed["device"] and speed["batches"] == [1, 2]
    for which in ("original", "compressed"):
        r = speed[which]
        assert r["params"] == metrics[which]["params"]
        assert r["dtype"] == "float32" and r["peak_memory_bytes"] >= 4 * r["params"]
        for b in (1, 2):
            assert r[f"batch{b}"]["prefill_tok_s"] > 0 and r[f"batch{b}"]["decode_tok_s"] > 0
    comp = speed["compressed"]
    assert 4 * comp["params"] <= comp["disk_bytes"] <= 4 * comp["params"] + 2**20  # safetensors: data + header
    assert comp["params"] < speed["original"]["params"]


def test_throughput_is_tokens_over_seconds_on_a_fake_clock(monkeypatch):
    """Prefill tok/s = batch x seqlen / the forward's seconds, decode tok/s = batch x new tokens / generate's
    seconds, on a clock that ticks 2 s for the prefill and 5 s for the decode; generate really makes the new
    tokens. Catches a missing batch factor, the prompt counted as decoded, the two timings swapped."""
    import torch

    from evaluation import speed
    from conftest import tiny_model
    model = tiny_model("llama").eval()
    ticks = iter([0.0, 2.0, 10.0, 15.0])
    monkeypatch.setattr(speed.time, "perf_counter", lambda: next(ticks))
    made, generate = [], model.generate

    def recorded(*a, **kw):  # generate as it is, its output's shape noted
        out = generate(*a, **kw)
        made.append(out.shape)
        return out
    monkeypatch.setattr(model, "generate", recorded)
    out = speed.throughput(model, torch.device("cpu"), 3, 24, 5, model.config.vocab_size)
    assert out == {"prefill_tok_s": 3 * 24 / 2.0, "decode_tok_s": 3 * 5 / 5.0}
    assert made == [torch.Size([3, 16 + 5])]  # 16 prompt tokens, 5 generated


def test_bad_tasks(run_dir, text_file, tmp_path):
    bad_file = tmp_path / "bad.jsonl"
    bad_file.write_text('{"context": "a", "choices": ["b", "c"], "label": 0}\n{"context": "a", "label": 0}\n')
    for tasks, expect in (("no_such_task_xyz", "unknown task"), (f"local:{bad_file}", "line 2: the row has no 'choices'"),
                          (f"local:{tmp_path}/none.jsonl", "does not exist")):
        code, err = run_inprocess("evaluate.py", "--data", text_file, *EVAL, "--tasks", tasks, "--run_dir", run_dir)
        assert code == 2 and expect in err.strip().splitlines()[-1], err[-800:]


def test_missing_lm_eval_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)
    with pytest.raises(cli.UserError, match="pip install lm-eval"):
        prepare_tasks(["local_continuation"], None, None, None, 1)


def test_strs_meets_budget_and_reloads(run_dir):
    stage("learn_masks.py", "--method", "strs", "--keep", 0.6, "--strs_samples", 2, "--train_seqlen", 32,
          "--run_dir", run_dir)
    alloc = json.load(open(f"{run_dir}/allocation/ranks.json"))
    assert abs(alloc["kept_fraction_linear"] - 0.6) <= 0.01
    assert alloc["ppl_passes"] == 9 * len(alloc["layers"])
    stage("truncate.py", "--run_dir", run_dir)
    assert abs(json.load(open(f"{run_dir}/compressed/manifest.json"))["kept_fraction_linear"] - 0.6) <= 0.01


def test_heatmap_png(run_dir, text_file, tmp_path):
    from evaluation import plots
    stage("learn_masks.py", "--keep", 0.7, "--run_dir", run_dir)
    stage("truncate.py", "--run_dir", run_dir)
    stage("evaluate.py", "--data", text_file, *EVAL, "--run_dir", run_dir)
    alloc = json.load(open(f"{run_dir}/allocation/ranks.json"))
    blocks, kinds, cells = plots.grid(alloc["layers"], alloc["shapes"])
    assert len(blocks) * len(kinds) == len(alloc["layers"]) == sum(len(r) for r in cells)
    assert open(f"{run_dir}/heatmap.png", "rb").read()[:4] == b"\x89PNG"  # drawn by evaluate.py
    subprocess.run([sys.executable, "-m", "evaluation.plots", f"{run_dir}/allocation/ranks.json",
                    f"{run_dir}/allocation/ranks.json", "-o", str(tmp_path / "cmp.png")], cwd=ROOT, check=True)
    data = (tmp_path / "cmp.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > height / 2 > 0  # two panels side by side


def test_perplexity_builds_no_kv_cache():
    """The perplexity forward never reuses a KV cache, so it asks for none."""
    import torch

    from conftest import tiny_model
    from evaluate import perplexity
    model, calls = tiny_model("llama").eval(), []
    model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw.get("use_cache")), with_kwargs=True)
    perplexity(model, torch.randint(0, model.config.vocab_size, (3, 16)), 2, torch.device("cpu"), "test")
    assert calls == [False, False]  # two batches of windows, no cache either time


def test_the_three_splits_are_disjoint_and_each_stage_reads_its_own(run_dir, text_file):
    """Local text: document i is test if i % 5 == 4, dev if i % 5 == 3, calibration otherwise, so each document
    is in exactly one split, in order; whiten.py calibrates on 'calib' (its manifest says so) and evaluate.py
    scores 'test' unless --split dev. Catches a document in two splits, a dev split taken from the test
    documents, evaluation on calibration text."""
    import evaluate
    from plumbing import loading
    docs = [d for d in loading.read_text(text_file).split("\n\n") if d.strip()]
    parts = {split: loading.load_documents(text_file, split)[0] for split in loading.SPLITS}
    for split, rest in (("calib", (0, 1, 2)), ("dev", (3,)), ("test", (4,))):
        assert parts[split] == [d for i, d in enumerate(docs) if i % 5 in rest], split
    assert sum(map(len, parts.values())) == len(docs)
    assert json.load(open(f"{run_dir}/whiten/manifest.json"))["split"] == "calib"
    assert evaluate.parser().parse_args([]).split == "test"
    assert evaluate.parser().parse_args(["--split", "dev"]).split == "dev"


def test_the_splits_are_wired_through_the_stages(run_dir, text_file, tmp_path):
    """Through the command lines: whiten/ records the calibration documents it read, evaluate.py --split dev and
    --split test record the documents they scored, each by the i % 5 rule computed here by hand, disjoint, and
    the tokens scored are those documents' tokens; a text with other content is named as not the calibration
    text. Catches a split recorded as a constant, evaluation on the wrong split, the text compared by name."""
    from conftest import tiny_tokenizer
    docs = [d for d in open(text_file, encoding="utf-8").read().split("\n\n") if d.strip()]
    by_hand = {s: [i for i in range(len(docs)) if i % 5 in r] for s, r in (("calib", (0, 1, 2)), ("dev", (3,)),
                                                                           ("test", (4,)))}
    assert json.load(open(f"{run_dir}/whiten/manifest.json"))["documents"] == by_hand["calib"]
    stage("learn_masks.py", "--keep", 0.7, "--run_dir", run_dir)
    stage("truncate.py", "--run_dir", run_dir)
    tok = tiny_tokenizer()
    for split in ("dev", "test"):
        stage("evaluate.py", "--data", text_file, "--split", split, "--seqlen", 32, "--max_windows", 0, "--run_dir", run_dir)
        ev = json.load(open(f"{run_dir}/metrics.json"))["eval"]
        assert ev["split"] == split and ev["documents"] == by_hand[split] and ev["calibration_text"]
        n = len(tok("\n\n".join(docs[i] for i in by_hand[split])).input_ids)
        assert ev["tokens"] == n // 32 * 32  # every window of exactly those documents
    other = tmp_path / "other.txt"
    other.write_text(open(text_file, encoding="utf-8").read().replace("the", "a"), encoding="utf-8")
    code, err = run_inprocess("evaluate.py", "--data", other, "--seqlen", 32, "--max_windows", 2, "--run_dir", run_dir)
    assert code == 0, err
    assert not json.load(open(f"{run_dir}/metrics.json"))["eval"]["calibration_text"]  # by content, not by name


def test_calibration_text_changed_after_whiten_is_refused(tiny_dir, text_file, tmp_path):
    """The calibration text edited in place after whiten.py (same path, a document dropped, so every later
    document moves to another split): evaluate.py refuses it in one line by its content hash, whatever
    working directory it runs from, instead of scoring shifted documents, some of them calibration documents,
    as test."""
    text, d = tmp_path / "news.txt", tmp_path / "run"
    text.write_text(open(text_file, encoding="utf-8").read(), encoding="utf-8")
    stage("whiten.py", "--model", tiny_dir, "--data", text, "--nsamples", 4, "--seqlen", 32, "--run_dir", d)
    stage("decompose.py", "--run_dir", d)
    stage("learn_masks.py", "--keep", 0.7, "--run_dir", d)
    stage("truncate.py", "--run_dir", d)
    text.write_text(text.read_text(encoding="utf-8").split("\n\n", 1)[1], encoding="utf-8")
    code, err = run_inprocess("evaluate.py", "--data", os.path.relpath(text), "--seqlen", 32, "--max_windows", 2,
                              "--run_dir", d)
    assert code == 2 and "changed since whiten.py read it" in err.strip().splitlines()[-1], err[-500:]
    assert not (d / "metrics.json").exists()


def test_text_too_small_to_split_is_refused(tiny_dir, tmp_path):
    """A .txt with no blank line is one document: nothing would be left for dev and test, so whiten.py refuses it
    in one line instead of evaluate.py failing later on an empty split."""
    one = tmp_path / "one.txt"
    one.write_text(" ".join(["some words of text"] * 400), encoding="utf-8")
    code, err = run_inprocess("whiten.py", "--model", tiny_dir, "--data", one, "--nsamples", 2, "--seqlen", 32,
                              "--run_dir", tmp_path / "run")
    assert code == 2 and "1 document(s), too few to split" in err.strip().splitlines()[-1], err[-500:]
    assert not (tmp_path / "run" / "whiten").exists()


def test_local_continuation_has_one_right_answer_per_item():
    """On a text that repeats every 96 tokens, distractors drawn anywhere often equal the true continuation: each
    item's choices must be distinct strings, the labelled one the text's own continuation of the context.
    Catches distractors drawn without a check, which give items with two right answers."""
    from types import SimpleNamespace

    import torch
    from evaluation.tasks import continuation_items
    stream = torch.arange(2000) % 96
    tok = SimpleNamespace(decode=lambda ids: " ".join(map(str, ids.tolist())))
    items = continuation_items(stream, tok, 50, 0)
    for item in items:
        assert len(set(item["choices"])) == 4, item["choices"]
        first = int(item["context"].split()[-1])  # the context's last token; the continuation follows it
        assert item["choices"][item["label"]].split()[0] == str((first + 1) % 96)
