"""Tier 3: all five stages as subprocesses on a tiny model in a temp dir, plus every bad input."""
import json
import os

import torch

from conftest import FAST, run_inprocess, run_stage, stage

EVAL = ("--seqlen", 64, "--max_windows", 6)


def test_end_to_end_uniform(run_dir, tiny_dir, text_file):
    from truncate import load_compressed
    run_stage("learn_masks.py", "--method", "uniform", "--keep", 0.6, "--run_dir", run_dir)
    out = run_stage("truncate.py", "--run_dir", run_dir).stdout
    assert "kept" in out and "removed" in out
    run_stage("evaluate.py", "--data", text_file, *EVAL, "--run_dir", run_dir)
    metrics = json.load(open(f"{run_dir}/metrics.json"))
    layers = json.load(open(f"{run_dir}/decompose/manifest.json"))["layers"].values()
    slack = sum(v["m"] + v["n"] for v in layers) / sum(v["m"] * v["n"] for v in layers)  # < 1 component a layer
    assert 0.6 - slack <= metrics["kept_fraction_linear"] <= 0.6  # SVD-LLM's floor: never over, never far under
    assert metrics["kept_fraction_model"] < 1 and metrics["compressed"]["params"] < metrics["original"]["params"]
    assert all(torch.isfinite(torch.tensor(metrics[k]["ppl"])) for k in ("original", "compressed"))
    model, tok = load_compressed(f"{run_dir}/compressed")  # the documented one-call reload
    assert sum(type(m).__name__ == "LowRankLinear" for m in model.modules()) > 0
    out = model.generate(**tok("The fire", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert out.shape[1] > 2
    assert os.path.getsize(f"{run_dir}/compressed/model.safetensors") < \
        os.path.getsize(f"{tiny_dir}/model.safetensors")


def test_keep_one_is_the_original_model(run_dir, text_file):
    stage("learn_masks.py", "--keep", 1.0, "--run_dir", run_dir)
    stage("truncate.py", "--run_dir", run_dir)
    run_stage("evaluate.py", "--data", text_file, *EVAL, "--run_dir", run_dir)
    metrics = json.load(open(f"{run_dir}/metrics.json"))
    assert metrics["layers_dense"] == metrics["layers"] and metrics["kept_fraction_linear"] == 1.0
    assert abs(metrics["compressed"]["ppl"] / metrics["original"]["ppl"] - 1) < 1e-5


def bad(script, *args, expect):
    """In-process (run_inprocess: a traceback would propagate and fail the test); the CLI's one-line errors as
    subprocesses are test_failures.py's subject."""
    code, err = run_inprocess(script, *args)
    assert code != 0, f"{script} {args} should fail"
    lines = err.strip().splitlines()
    assert lines and expect in lines[-1] and lines[-1].startswith("error:"), err[-1500:]


def test_stale_artifacts_are_refused(tmp_path, tiny_dir, text_file):
    d = str(tmp_path / "run")
    stage("whiten.py", "--model", tiny_dir, "--data", text_file, *FAST, "--run_dir", d)
    stage("decompose.py", "--run_dir", d)
    stage("whiten.py", "--model", tiny_dir, "--data", text_file, "--nsamples", 4, "--seqlen", 64,
          "--run_dir", d)  # other settings: decompose/ is now stale
    bad("learn_masks.py", "--run_dir", d, expect="different whiten/ run")
