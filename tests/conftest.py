"""Tiny, offline fixtures: models built from configs (fixed seed), a byte-level BPE tokenizer trained
on gensim's news text, and a .txt corpus. Nothing here touches the Hugging Face hub."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # the in-process stages too


def tiny_config(arch):
    """Hidden 64, 2 layers; llama has grouped-query attention, qwen2 biases, gpt2 Conv1D, opt fc1/fc2."""
    import transformers as tf
    common = dict(vocab_size=320, num_hidden_layers=2, max_position_embeddings=256)
    if arch == "llama":
        return tf.LlamaConfig(hidden_size=64, intermediate_size=160, num_attention_heads=4,
                              num_key_value_heads=2, **common)
    if arch == "qwen2":
        return tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                              num_key_value_heads=2, **common)
    if arch == "mistral":
        return tf.MistralConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                num_key_value_heads=1, **common)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=320, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    if arch == "opt":
        return tf.OPTConfig(vocab_size=320, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64)
    raise ValueError(arch)


def tiny_model(arch, seed=0):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch)).eval()


def news_docs():
    from gensim.test.utils import datapath
    return [line.strip() for line in open(datapath("lee_background.cor"), encoding="utf-8") if line.strip()]


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(news_docs(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A saved tiny Llama (GQA) with its tokenizer: what `--model` takes."""
    path = str(tmp_path_factory.mktemp("tiny_llama"))
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """300 news articles, one document per paragraph."""
    path = str(tmp_path_factory.mktemp("text") / "news.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n\n".join(news_docs()))
    return path


FAST = ("--nsamples", 8, "--seqlen", 64)


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, tiny_dir, text_file):
    """whiten + decompose of the tiny model once; tests allocate / truncate / evaluate on top."""
    d = str(tmp_path_factory.mktemp("run"))
    run_stage("whiten.py", "--model", tiny_dir, "--data", text_file, *FAST, "--run_dir", d)
    run_stage("decompose.py", "--run_dir", d)
    return d


@pytest.fixture(scope="session")
def trained_run_dir(tmp_path_factory, trained_tiny, text_file):
    """whiten + decompose of the trained tiny Llama (saved with its tokenizer), once: the learned methods'
    runs through the files start here."""
    model_dir = str(tmp_path_factory.mktemp("trained_llama"))
    trained_tiny[0]().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    d = str(tmp_path_factory.mktemp("trained_run"))
    stage("whiten.py", "--model", model_dir, "--data", text_file, "--nsamples", 16, "--seqlen", 64, "--run_dir", d)
    stage("decompose.py", "--run_dir", d)
    return d


def run_inprocess(script, *args):
    """Run a stage the way its command line does (its parser, cli.run_main) but in this process, so a
    case pays no interpreter and import start: returns (exit code, stderr). An exception that
    run_main does not turn into one line propagates, i.e. fails the test as a traceback would."""
    import contextlib
    import importlib
    import io
    module = importlib.import_module(script[:-3])
    err, argv = io.StringIO(), sys.argv
    sys.argv = [script]
    try:
        with contextlib.redirect_stderr(err):
            try:
                module.cli.run_main(module.main, module.parser().parse_args([str(a) for a in args]))
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv
    return code, err.getvalue()


def stage(script, *args):
    """A stage that must succeed, in this process (run_inprocess): for tests whose subject is what the stage
    computes, not its process boundary (the kills, locks and CLI tests keep run_stage)."""
    code, err = run_inprocess(script, *args)
    if code != 0:
        raise AssertionError(f"{script} {args} exited {code}:\n{err[-3000:]}")


def run_stage(script, *args, check=True, env=None):
    """Run a stage script as a user would; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {args} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc


def news_windows(T=64):
    """The news text as one token stream cut into (N, T) windows (the tiny tokenizer, eos between documents)."""
    tok = tiny_tokenizer()
    stream = torch.tensor([t for d in news_docs() for t in tok(d)["input_ids"] + [tok.eos_token_id]])
    return stream[:len(stream) // T * T].view(-1, T)


@pytest.fixture(scope="session")
def heldout_ids():
    """(8, 64) news windows neither the tiny model trained on nor any allocation calibrates on: the last 8."""
    return news_windows()[-8:]


def train_tiny(windows, steps=200):
    """A tiny Llama trained on news windows (N, 64) with AdamW, fixed seed: the structured spectra a real
    model has (a random-init model's are flat: nothing to allocate). bench/parity.py saves the same model."""
    model = tiny_model("llama").train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = windows[torch.randint(len(windows), (8,), generator=g)]
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def trained_tiny():
    """The tiny Llama trained for 200 steps on the news text between the first 16 windows and the last 8
    (seconds on the CPU). Returns (make, ids): make() builds a fresh copy of the trained model; ids (16, 64)
    held-back calibration windows."""
    windows = news_windows()  # (N, 64)
    calib, train = windows[:16], windows[16:-8]  # the last 8: heldout_ids
    state = {k: v.detach().clone() for k, v in train_tiny(train).state_dict().items()}

    def make():
        fresh = tiny_model("llama")
        fresh.load_state_dict(state)
        return fresh.eval()
    return make, calib
