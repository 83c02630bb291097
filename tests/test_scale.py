"""What lets the stages run at the papers' scale: block-by-block whitening
gives the whole-model numbers with one block's Grams alive, the compact artifacts round-trip, and the
compressed folder loads without random initialisation, with this repository or with plain transformers."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_inprocess, run_stage, stage, tiny_model, tiny_tokenizer
from oracle import accumulate_gram, share_groups, whitening_factor
import learn_masks
from methods import base
from plumbing.loading import checkpoint_blocks, decoder_blocks, find_linears
from whiten import block_grams, block_names, capture_block_inputs, compact_factor, expand_factor


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2", "opt"])
def test_block_by_block_grams_equal_whole_model(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, 320, (6, 48), generator=torch.Generator().manual_seed(0))
    linears = find_linears(model)
    ref_groups = share_groups(model, linears, ids[:1, :8])
    G_ref = accumulate_gram(model, linears, ref_groups, ids, 2, "cpu")  # every G of the model at once
    blocks = decoder_blocks(model)
    hidden, calls = capture_block_inputs(model, blocks, ids, 2, torch.device("cpu"))
    seen = set()
    for b, names in enumerate(block_names(linears, blocks)):
        groups, G = block_grams(blocks[b], {n: linears[n] for n in names}, hidden, calls[b], ids.numel())
        assert groups == {n: ref_groups[n] for n in names}  # the same sharing (q/k/v, gate/up)
        for leader, Gb in G.items():
            assert (Gb - G_ref[leader]).abs().max() <= 1e-10 * G_ref[leader].abs().max(), (arch, leader)
            S, _, _ = whitening_factor(Gb)
            S_ref, _, _ = whitening_factor(G_ref[leader])
            assert (S - S_ref).abs().max() <= 1e-10 * S_ref.abs().max()
            seen.add(leader)
    assert seen == set(G_ref)
    with torch.no_grad():  # the stubs are gone: the model runs as before
        assert torch.isfinite(model(ids[:1]).logits).all()


def test_only_one_blocks_grams_are_alive(tiny_dir, text_file, tmp_path, monkeypatch):
    """Counted (weakrefs on every Gram tensor block_grams returns), not timed: the peak equals the groups of one
    block, so a stage that kept an earlier block's Grams would fail."""
    import weakref
    import whiten
    count, real = {"alive": 0, "peak": 0}, whiten.block_grams

    def counted(*a, **kw):
        groups, G = real(*a, **kw)
        for g in G.values():
            count["alive"] += 1
            weakref.finalize(g, lambda: count.__setitem__("alive", count["alive"] - 1))
        count["peak"] = max(count["peak"], count["alive"])
        return groups, G
    monkeypatch.setattr(whiten, "block_grams", counted)
    code, err = run_inprocess("whiten.py", "--model", tiny_dir, "--data", text_file, "--nsamples", 4, "--seqlen", 32,
                              "--run_dir", tmp_path)
    assert code == 0, err
    man = json.load(open(tmp_path / "whiten" / "manifest.json"))
    per_block = {}
    for leader, shard in man["shards"].items():
        per_block[shard] = per_block.get(shard, 0) + 1
    assert len(per_block) == 2  # two decoder blocks, one shard each
    assert count["peak"] == max(per_block.values()) == 4  # qkv, o, gate/up, down
    assert sorted(f for f in man["files"] if f.startswith("block_")) == sorted(per_block)


@pytest.mark.parametrize("method", ["cholesky", "eigh"])
def test_compact_factor_round_trips(method):
    X = torch.randn(12, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    G = X @ X.T / 40
    S, S_inv, _ = whitening_factor(G, method)
    t = compact_factor(S, method)
    assert t.dtype == torch.float32 and t.numel() == (78 if method == "cholesky" else 144)  # n (n+1) / 2 packed
    S2, S2_inv = expand_factor(t, 12, method)
    torch.testing.assert_close(S2 @ S2.T, G, rtol=1e-6, atol=1e-6)  # float32 storage: S S^T = G to 1e-7
    inv = torch.linalg.inv(S2) if S2_inv is None else S2_inv
    torch.testing.assert_close(inv @ S2, torch.eye(12, dtype=torch.float64), rtol=0, atol=1e-5)


def test_artifacts_are_compact(run_dir):
    """No S^-1 anywhere; S is a packed float32 triangle; U, V^T S^-1 about 1.2 x the linears (k_max = 1.2 k*)."""
    def size(stage):
        folder = f"{run_dir}/{stage}"
        return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.startswith("block_"))
    man = json.load(open(f"{run_dir}/whiten/manifest.json"))
    packed = sum(4 * n * (n + 1) // 2 for (_m, n) in (man["shapes"][g] for g in man["shards"]))
    assert packed <= size("whiten") <= packed + 4096 * len(set(man["shards"].values()))  # + headers only
    linear_bytes = 4 * sum(m * n for m, n in man["shapes"].values())
    assert size("decompose") / linear_bytes < 1.3


def test_load_compressed_runs_no_initialiser(run_dir, monkeypatch):
    """Every initialiser call is counted; the model is built on the meta device (no memory, no work) and
    filled from the file, so none may touch a real tensor (the old from_config path ran them all)."""
    stage("learn_masks.py", "--keep", 0.6, "--run_dir", run_dir)
    stage("truncate.py", "--run_dir", run_dir)
    from truncate import load_compressed
    real = []
    for name in ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
                 "trunc_normal_", "zeros_", "ones_", "constant_"):
        def counted(*a, _name=name, _orig=getattr(torch.nn.init, name), **k):
            t = a[0] if a else k["tensor"]
            if t.device.type != "meta":
                real.append((_name, tuple(t.shape)))
            return _orig(*a, **k)
        monkeypatch.setattr(torch.nn.init, name, counted)
    model, _ = load_compressed(f"{run_dir}/compressed")
    assert sum(type(m).__name__ == "LowRankLinear" for m in model.modules()) > 0
    assert real == [], f"weight initialisers ran on real tensors while loading: {real[:5]}"


def test_from_pretrained_with_remote_code_matches_load_compressed(run_dir):
    stage("learn_masks.py", "--keep", 0.6, "--run_dir", run_dir)
    stage("truncate.py", "--run_dir", run_dir)
    from truncate import load_compressed
    model, _ = load_compressed(f"{run_dir}/compressed")
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = model(ids).logits
    out = os.path.join(run_dir, "remote_logits.pt")
    code = ("import sys, torch; from transformers import AutoModelForCausalLM; "
            f"m = AutoModelForCausalLM.from_pretrained({run_dir + '/compressed'!r}, trust_remote_code=True).eval(); "
            f"ids = torch.load({out + '.ids'!r}); torch.save(m(ids).logits.detach(), {out!r}); "
            "print(type(m).__name__, sum(type(x).__name__ == 'LowRankLinear' for x in m.modules()))")
    torch.save(ids, out + ".ids")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/",  # not the repo
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[0].startswith("LowRank") and int(proc.stdout.split()[1]) > 0
    torch.testing.assert_close(torch.load(out), reference, rtol=0, atol=0)


def test_protocol_paper_resolves_to_the_papers_settings():
    import argparse
    from plumbing.cli import UserError
    from evaluate import protocol_line, resolve_protocol
    args = resolve_protocol(argparse.Namespace(protocol="paper", data=None, seqlen=None, max_windows=None, dtype=None))
    assert (args.data, args.seqlen, args.max_windows, args.dtype) == ("wikitext2", 2048, 0, "float32")
    c4 = resolve_protocol(argparse.Namespace(protocol="paper", data="c4", seqlen=None, max_windows=None, dtype=None))
    assert c4.data == "c4" and c4.seqlen == 2048
    with pytest.raises(UserError, match="--protocol paper fixes --seqlen 2048"):
        resolve_protocol(argparse.Namespace(protocol="paper", data=None, seqlen=512, max_windows=None, dtype=None))
    default = resolve_protocol(argparse.Namespace(protocol="default", data=None, seqlen=None, max_windows=None,
                                                  dtype=None))
    assert (default.data, default.seqlen, default.max_windows, default.dtype) == ("embedded", 512, 40, "auto")
    line = protocol_line({"protocol": "paper", "data": "wikitext2", "split": "test", "split_rule": "the test split",
                          "seqlen": 2048, "windows": 140, "all_windows": True, "tokens": 286720, "dtype": "float32"})
    assert line == ("protocol paper: wikitext2 TEST split (the test split), non-overlapping windows 140 x 2048 tokens "
                    "(every window), 286,720 tokens, float32")


def test_checkpointing_keeps_the_gradients_and_noise():
    """Per-block activation checkpointing recomputes each block in backward; masks are drawn once per step
    before the forward, so the recompute sees the same Gumbel noise and the gates get the same gradients."""
    from test_learn import factorize, learn_args
    ids = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        model = tiny_model("llama")
        factors, shapes = factorize(model, ids)
        layers = learn_masks.attach_gates(model, factors, shapes, 0.6, learn_args("sigmoid"))
        if checkpointing:
            checkpoint_blocks(model)
        learn_masks.draw_masks(layers, {}, 0)
        model(ids, use_cache=False).logits.float().logsumexp(-1).mean().backward()
        grads.append(torch.cat([l.gate.z.grad for l in layers.values()]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_a_weights_file_missing_a_factor_is_refused(run_dir, tmp_path):
    """transformers only warns about a tensor the file lacks (it would stay uninitialised memory):
    load_compressed and from_pretrained(trust_remote_code) refuse it."""
    import shutil
    from safetensors.torch import load_file, save_file
    from plumbing.cli import UserError
    from truncate import load_compressed
    stage("learn_masks.py", "--keep", 0.6, "--run_dir", run_dir)
    stage("truncate.py", "--run_dir", run_dir)
    from transformers import AutoModelForCausalLM
    tensors = load_file(f"{run_dir}/compressed/model.safetensors")
    # a low-rank factor, and the head of this untied model (tie_word_embeddings=False: nothing may replace it)
    for dropped in (next(k for k in tensors if k.endswith(".A")), "lm_head.weight"):
        folder = tmp_path / dropped
        shutil.copytree(f"{run_dir}/compressed", folder)
        save_file({k: v for k, v in tensors.items() if k != dropped}, folder / "model.safetensors",
                  metadata={"format": "pt"})
        with pytest.raises(UserError, match="model.safetensors is damaged or incomplete"):
            load_compressed(str(folder))
        with pytest.raises(ValueError, match="weights file does not match lowrank_ranks"):
            AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True)


def test_evaluate_in_another_dtype_names_it(run_dir):
    """--dtype casts AFTER the model is checked against whiten/'s fingerprint (taken in its own dtype), and
    the printed perplexity line says which dtype it was measured in."""
    stage("learn_masks.py", "--keep", 0.6, "--run_dir", run_dir)
    stage("truncate.py", "--run_dir", run_dir)
    proc = run_stage("evaluate.py", "--dtype", "bfloat16", "--max_windows", 2, "--seqlen", 32, "--data",
                     json.load(open(f"{run_dir}/whiten/manifest.json"))["data"], "--run_dir", run_dir)
    assert "non-overlapping windows 2 x 32 tokens, 64 tokens, bfloat16" in proc.stdout
    assert json.load(open(f"{run_dir}/metrics.json"))["eval"]["dtype"] == "bfloat16"


def test_device_map_auto_runs_and_matches(run_dir):
    """--device_map auto hands placement to accelerate (here: everything on the CPU); the allocation and the
    perplexity are the same as without it."""
    quick = ("--method", "ara", "--keep", 0.6, "--steps", 4, "--train_seqlen", 32, "--run_dir", run_dir)
    runs = []
    for extra in ([], ["--device_map", "auto"]):
        stage("learn_masks.py", *quick, *extra)
        runs.append(json.load(open(f"{run_dir}/allocation/ranks.json"))["layers"])
    assert runs[0] == runs[1]
    stage("truncate.py", "--run_dir", run_dir)
    data = json.load(open(f"{run_dir}/whiten/manifest.json"))["data"]
    ppl = []
    for extra in ([], ["--device_map", "auto"]):
        stage("evaluate.py", "--max_windows", 2, "--seqlen", 32, "--data", data, "--run_dir", run_dir, *extra)
        ppl.append(json.load(open(f"{run_dir}/metrics.json"))["compressed"]["ppl"])
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-6)


def test_teacher_cache_is_exact_and_skips_revisits():
    """Three epochs over 16 chunks in batches of 4: with the cache the teacher runs on the first epoch's 4
    batches only, and training is bit-for-bit the same."""
    from test_learn import factorize, learn_args
    ids = torch.randint(0, 320, (16, 32), generator=torch.Generator().manual_seed(0))
    out = {}
    for mode in ("off", "on"):
        model = tiny_model("llama")
        factors, shapes = factorize(model, ids)
        args = learn_args("ara", steps=12, batch_size=4, train_seqlen=32, teacher_cache=mode)
        layers = learn_masks.attach_gates(model, factors, shapes, 0.6, args)
        data = learn_masks.Feed(model, ids, args, args.steps)
        record = learn_masks.train(model, layers, data, 0.6, args, torch.device("cpu"))
        base.fix_trained(layers, shapes, 0.6)
        out[mode] = ({**record, **data.record}, base.export(layers)[0])
    assert out["off"][0]["teacher_forwards"] == 12 and out["on"][0]["teacher_forwards"] == 4
    assert [c["loss"] for c in out["on"][0]["curve"]] == [c["loss"] for c in out["off"][0]["curve"]]
    assert out["on"][1] == out["off"][1]
    fits = dict(steps=12, batch=4, seqlen=32, vocab=320, itemsize=4, gb=16.0)
    assert learn_masks.use_teacher_cache("auto", "kl", n_chunks=16, **fits)  # 48 chunk visits of 16 chunks
    assert not learn_masks.use_teacher_cache("auto", "kl", n_chunks=64, **fits)  # no chunk revisited
    assert not learn_masks.use_teacher_cache("auto", "kl", n_chunks=16, **{**fits, "gb": 1e-6})  # does not fit
    assert not learn_masks.use_teacher_cache("on", "ce", n_chunks=16, **fits)  # no teacher to cache


def test_scale_random_model_fits_a_tokenizer_larger_than_its_shape(tiny_dir, tmp_path, monkeypatch):
    """bench/scale.py --shape llama2-7b stopped at a bare AssertionError (the embedded tokenizer has 49152
    tokens, the shape 32000): the random model now takes the tokenizer's vocabulary, so every id fits."""
    import importlib.util
    from transformers import AutoModelForCausalLM, AutoTokenizer
    spec = importlib.util.spec_from_file_location("scale_bench", os.path.join(ROOT, "bench", "scale.py"))
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    monkeypatch.setitem(scale.SHAPES, "small", dict(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                                    num_key_value_heads=2, vocab_size=100, max_position_embeddings=64))
    folder = scale.random_model(str(tmp_path / "m"), "small", 1, "bfloat16", tokenizer=tiny_dir)
    model, tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    assert model.config.vocab_size == len(tok) == 320 and model.dtype == torch.bfloat16
    ids = torch.tensor([tok("The minister said on Monday")["input_ids"]])
    assert ids.max() < model.config.vocab_size and torch.isfinite(model(ids).logits.float()).all()


def test_a_bf16_block_computes_in_float32_on_the_cpu_and_comes_back_unchanged():
    """whiten_block on the CPU upcasts a bf16 block (cli.compute_dtype: bf16 matmuls are slow there):
    its linears see float32 inputs, its weights come back bit-identical in bf16, and the Grams are those of the
    float32 model (up to the bf16 rotary tables, which the bf16 model itself computes)."""
    from whiten import whiten_block
    model = tiny_model("llama").to(torch.bfloat16)
    ids = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    reference = tiny_model("llama").to(torch.bfloat16).float()  # the same weights, float32 throughout
    linears, blocks = find_linears(model), decoder_blocks(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    hooks = [m.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0].dtype)) for m in linears.values()]
    hidden, calls = capture_block_inputs(model, blocks, ids, 2, torch.device("cpu"))
    S = {}
    for b, names in enumerate(block_names(linears, blocks)):
        _, tensors, _ = whiten_block(b, blocks[b], names, linears, hidden, calls[b], ids.numel(), "cholesky",
                                     torch.device("cpu"))
        S.update(tensors)
    for h in hooks:
        h.remove()
    assert seen and set(seen) == {torch.float32}
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    ref_linears = find_linears(reference)
    G_ref = accumulate_gram(reference, ref_linears, share_groups(reference, ref_linears, ids[:1, :8]), ids, 2, "cpu")
    for key, t in S.items():
        leader = key[:-len(".S")]
        n = G_ref[leader].shape[0]
        S_full, _ = expand_factor(t, n, "cholesky")
        G = S_full @ S_full.T
        err = ((G - G_ref[leader]).norm() / G_ref[leader].norm()).item()
        assert err < 1e-4, (leader, err)  # a block computed in bf16 would be ~1e-3 off


def test_a_bf16_checkpoint_runs_the_stages_in_float32_on_the_cpu(tmp_path, text_file):
    """A bf16 checkpoint (what a 7B one is) through every stage on the CPU: whiten/ fingerprints it in bf16,
    decompose/ stores bf16 factors, learn_masks' auto dtype and evaluate's auto dtype compute in float32
    (cli.compute_dtype), and the compressed model is saved in the checkpoint's bf16."""
    import argparse

    import learn_masks
    folder, d = str(tmp_path / "bf16"), str(tmp_path / "run")
    tiny_model("llama").to(torch.bfloat16).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    stage("whiten.py", "--model", folder, "--data", text_file, "--nsamples", 4, "--seqlen", 32, "--run_dir", d)
    stage("decompose.py", "--run_dir", d)
    whiten = json.load(open(f"{d}/whiten/manifest.json"))
    decomp = json.load(open(f"{d}/decompose/manifest.json"))
    assert whiten["dtype"] == "bfloat16" and decomp["factor_dtype"] == "bfloat16"
    args = argparse.Namespace(**{**vars(learn_masks.parser().parse_args([])), "method": "ara", "run_dir": d})
    inputs = learn_masks.load_inputs(args, whiten, decomp, needs_model=True)
    assert inputs["model"].dtype == torch.float32
    stage("learn_masks.py", "--keep", 0.6, "--run_dir", d)
    stage("truncate.py", "--run_dir", d)
    assert json.load(open(f"{d}/compressed/config.json"))["dtype"] == "bfloat16"
    stage("evaluate.py", "--data", text_file, "--max_windows", 2, "--seqlen", 32, "--run_dir", d)
    assert json.load(open(f"{d}/metrics.json"))["eval"]["dtype"] == "float32"


def test_a_float16_checkpoint_whose_factors_pass_its_range_is_compressed_in_float16(tmp_path, text_file):
    """A float16 checkpoint through every stage, its block 0 reading inputs near 1e-7 through weights near 600
    (a norm scaled down, the projections up): V^T S^-1 = Sigma^-1 U^T W then reaches ~4e6, and a Sigma^1/2 split
    of A B would put ~1e5 in B, past float16's 65504. The folder truncate.py saves reloads in float16 with
    finite factors, each layer's A B the rank-k product of decompose/'s factors (float64, by hand) to float16's
    precision, and finite logits."""
    from safetensors.torch import load_file

    from truncate import load_compressed
    folder, d = str(tmp_path / "fp16"), str(tmp_path / "run")
    model = tiny_model("llama").half()
    with torch.no_grad():
        block = model.model.layers[0]
        block.input_layernorm.weight.fill_(1e-7)
        for proj in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj):
            proj.weight.mul_(3e4)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    stage("whiten.py", "--model", folder, "--data", text_file, "--nsamples", 8, "--seqlen", 64, "--run_dir", d)
    stage("decompose.py", "--run_dir", d)
    stage("learn_masks.py", "--keep", 0.6, "--run_dir", d)
    stage("truncate.py", "--run_dir", d)
    decomp = json.load(open(f"{d}/decompose/manifest.json"))
    compressed, _ = load_compressed(f"{d}/compressed")
    assert compressed.dtype == torch.float16
    ranks = json.load(open(f"{d}/compressed/config.json"))["lowrank_ranks"]
    allocated = json.load(open(f"{d}/allocation/ranks.json"))["layers"]
    assert ranks == {n: k for n, k in allocated.items() if k != "dense"} and "model.layers.0.self_attn.q_proj" in ranks
    assert not os.path.exists(f"{d}/allocation/components.safetensors")  # top-k prefixes at scale 1
    for name, k in ranks.items():
        f = load_file(f"{d}/decompose/{decomp['shards'][name]}")
        U, sigma, VtSinv = (f[f"{name}.{t}"].double() for t in ("U", "sigma", "VtSinv"))
        if name == "model.layers.0.self_attn.q_proj":  # the case this test is for: Sigma^1/2 V^T S^-1 overflows
            assert (sigma[:k, None].sqrt() * VtSinv[:k]).abs().max() > 65504
        want = (U[:, :k] * sigma[:k]) @ VtSinv[:k]  # (m, n)
        layer = compressed.get_submodule(name)
        assert layer.A.dtype == layer.B.dtype == torch.float16, name
        assert torch.isfinite(layer.A).all() and torch.isfinite(layer.B).all(), name
        got = layer.A.double() @ layer.B.double()
        assert ((got - want).norm() / want.norm()).item() < 1e-2, name
    ids = torch.randint(0, 320, (1, 16), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(compressed.float()(ids).logits).all()
