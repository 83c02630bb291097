"""What the training loop of learn_masks.py is fed, and the memory plumbing around it: the model in its compute
dtype with its factors and calibration windows (load_context), the calibration chunks in seeded epochs, and
the teacher's outputs (the same model with every gate off), cached per chunk where the steps revisit them.
Every calibration token is reachable: windows are cut into chunks and the steps walk seeded epochs over them.
"""
from types import SimpleNamespace

import torch

from plumbing import artifacts, cli, layers, loading, schema
from plumbing.cli import UserError


def add_flags(p):
    """learn_masks.py's flags for what feeds the training and what it costs in memory."""
    p.add_argument("--teacher_cache", choices=["auto", "on", "off"], default="auto",
                   help="keep the teacher's logits per calibration chunk on the CPU, so a revisited chunk needs no "
                   "teacher forward (auto: with the KL loss, when the steps revisit chunks and it fits --teacher_cache_gb)")
    p.add_argument("--teacher_cache_gb", type=float, default=16.0, help="CPU memory the teacher cache may use (auto)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="dtype of the frozen weights and factors (auto: bfloat16 on a GPU, float32 on the CPU, where "
                   "half-precision matmuls are slow there); the gates always train in float32")
    p.add_argument("--checkpointing", choices=["auto", "on", "off"], default="auto",
                   help="activation checkpointing per decoder block (auto: on a GPU): memory for recompute")
    p.add_argument("--device_map", choices=["auto"], default=None,
                   help="auto: accelerate spreads the model over every visible GPU (models past one GPU; no CPU offload)")


def check_args(args):
    cli.check_flags(args, teacher_cache_gb=(0, None))
    loading.check_dtype_placement(args.dtype, args.device_map)


def load_context(args, run_dir, whiten, decomp, needs_model):
    """What a method reads: the closed-form ones only the spectra; STRS, the learned ones and any method run
    with --compensate also the model, the calibration windows and the factors."""
    rerun = f"python decompose.py --run_dir {run_dir}"
    f = artifacts.Shards(run_dir, "decompose", rerun, decomp["shards"], shape=schema.factor_shape(decomp))
    sigmas = {name: f.get(f"{name}.sigma") for name in decomp["layers"]}
    ids = artifacts.read_ids(run_dir, whiten)
    ctx = {"sigmas": sigmas, "tokens": ids.numel()}  # counted, not read off the manifest
    if not needs_model:
        return ctx
    device = cli.pick_device(args.device)
    model, _ = loading.load_model(whiten["model"], device, device_map=args.device_map)
    artifacts.check_model(model, whiten)  # in the model's own dtype, before any cast
    # bf16 on a GPU; on the CPU float32 for a half-precision model (cli.compute_dtype: half-precision matmuls are
    # slow there), and float16 is never used for the factors: its range cannot hold V^T S^-1, see decompose.py
    dtype = cli.DTYPES[args.dtype] or (torch.bfloat16 if device.type == "cuda" else
                                       cli.compute_dtype(model.dtype, device))
    if dtype is not None and not args.device_map:  # a dispatched model is not cast (check_dtype_placement)
        model.to(dtype)  # weights once in bf16 on a GPU; the gates stay float32
    if args.checkpointing == "on" or args.checkpointing == "auto" and device.type == "cuda":
        checkpoint_blocks(model)
    if args.loss == "hidden_mse":
        L = model.config.num_hidden_layers  # hidden_states holds L + 1 tensors (embeddings first)
        if any(not -(L + 1) <= i <= L for i in args.hidden_layers):
            raise UserError(f"--hidden_layers {args.hidden_layers}: this model has hidden states 0..{L} "
                            f"(or -{L + 1}..-1)")
    for p in model.parameters():
        p.requires_grad_(False)
    artifacts.check_vocabulary(ids, model.get_input_embeddings().weight.shape[0], run_dir)
    # factors: the same lazy CPU reader as the spectra; each layer's factors are read when attached
    return {**ctx, "model": model, "ids": ids, "factors": f, "device": device}


def checkpoint_blocks(model):
    """Activation checkpointing per decoder block: only each block's input is kept for backward, and the
    block is recomputed there (non-reentrant, so gradients reach the gates through the drawn masks)."""
    from torch.utils.checkpoint import checkpoint
    for block in layers.decoder_blocks(model):
        def forward(*args, _f=block.forward, **kwargs):
            if not torch.is_grad_enabled():  # the teacher pass: nothing to save
                return _f(*args, **kwargs)
            return checkpoint(_f, *args, use_reentrant=False, **kwargs)
        block.forward = forward


def window_chunks(ids, length):
    """Cut every calibration window (N, T) into ceil(T / length) chunks (N * ceil(T / length), length),
    the last chunk ending at T, so every calibration token is seen, not only each window's start."""
    T = ids.shape[1]
    if length >= T:
        return ids
    starts = list(range(0, T - length + 1, length))
    if starts[-1] + length < T:
        starts.append(T - length)
    return torch.cat([ids[:, s:s + length] for s in starts])


def batch_indices(n_chunks, batch_size, gen):
    """Epochs over a seeded permutation of the chunk indices: every chunk once before any repeats."""
    while True:
        perm = torch.randperm(n_chunks, generator=gen)
        for i in range(0, len(perm) - batch_size + 1, batch_size):
            yield perm[i:i + batch_size]


def batches(chunks, batch_size, gen):
    for idx in batch_indices(len(chunks), batch_size, gen):
        yield chunks[idx]


class TeacherCache:
    """The teacher's logits per calibration chunk, on the CPU in their own dtype, once computed: on a schedule that
    revisits chunks (ARA: 10 epochs) every later visit skips the teacher forward. Exact: the same numbers
    a fresh teacher forward gives."""

    def __init__(self):
        self.logits = {}

    def get(self, idx):  # (B, T, V) or None unless every chunk of the batch is cached
        return torch.stack([self.logits[i] for i in idx]) if all(i in self.logits for i in idx) else None

    def put(self, idx, logits):  # in the logits' own dtype (bf16 on a GPU): exact, half of float32
        for i, row in zip(idx, logits.cpu()):
            self.logits[i] = row.clone()


def use_teacher_cache(args, n_chunks, vocab, itemsize=4):
    """--teacher_cache auto: only where it pays (KL loss, the steps revisit chunks) and fits
    --teacher_cache_gb of CPU memory (itemsize: bytes per logit, 2 in bf16); on / off force it (on still
    needs the KL loss)."""
    if args.loss != "kl" or args.teacher_cache == "off":
        return False
    revisits = args.steps * min(args.batch_size, n_chunks) > n_chunks
    fits = n_chunks * args.train_seqlen * vocab * itemsize <= args.teacher_cache_gb * 2 ** 30
    return args.teacher_cache == "on" or revisits and fits


def teacher_outputs(model, x, idx, cache, state, args, record):
    """The teacher's outputs on chunk batch x (B, T) (None for --loss ce): from the cache where every chunk
    of the batch is in it (logits only), else one forward with the gates off."""
    if args.loss == "ce":
        return None
    cached = cache.get(idx) if cache else None
    if cached is not None:
        return SimpleNamespace(logits=cached)
    with torch.no_grad():
        state["teacher"] = True  # the teacher: same weights, masks off
        out = model(x, output_hidden_states=args.loss == "hidden_mse", use_cache=False)
        state["teacher"] = False
    record["teacher_forwards"] += 1
    if cache:
        cache.put(idx, out.logits)
    return out


class Feed:
    """The calibration chunks, the seeded batch order and the teacher (cached where it pays), shared by the
    allocation and the compensation stage, so the second continues the first's epochs and cache."""

    def __init__(self, model, ids, args, steps):
        self.model, self.args = model, args
        self.chunks = window_chunks(ids, args.train_seqlen)  # (C, train_seqlen)
        self.batch = min(args.batch_size, len(self.chunks))
        self.order = batch_indices(len(self.chunks), self.batch, torch.Generator().manual_seed(args.seed))
        itemsize = next(model.parameters()).element_size()
        probe = SimpleNamespace(**{**vars(args), "steps": steps})
        use = use_teacher_cache(probe, len(self.chunks), model.config.vocab_size, itemsize)
        self.cache = TeacherCache() if use else None
        self.record = {"teacher_cache": use, "teacher_forwards": 0, "task_steps": 0}

    def next(self, state):
        """The next batch x (B, train_seqlen) on the model's input device, and the teacher's outputs on it
        (None for --loss ce). state: the masked layers' shared switch, set while the teacher runs."""
        idx = next(self.order)
        x = self.chunks[idx].to(loading.input_device(self.model))  # (B, train_seqlen)
        t_out = teacher_outputs(self.model, x, idx.tolist(), self.cache, state, self.args, self.record)
        self.record["task_steps"] += 1
        return x, t_out

    def seen(self):
        return round(min(1.0, self.record["task_steps"] * self.batch / len(self.chunks)), 4)
