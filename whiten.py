"""Stage 1: activation whitening (SVD-LLM, docs/METHODS.md §1).

Runs calibration text through the model ONE DECODER BLOCK AT A TIME (the GPTQ / SVD-LLM low-resource
pattern): the inputs of every block are captured once (capture_block_inputs), then each block runs over
all calibration batches with hooks that accumulate its linears' input Gram matrices
G = X X^T / T (n, n) (per batch in float32, summed in float64; layers that read the same tensor, e.g.
q/k/v, share one G), its whitening factors are computed and written, and the ORIGINAL block's outputs
become the next block's inputs. Only one block's Grams are alive at a time; the model stays on the CPU
and each block visits the device in turn. A whitening factor S with S S^T = G:
  cholesky (SVD-LLM): S = chol(G), lower-triangular; if G is not positive definite we add
                      (-lambda_min + eps) I, print it and record it in the manifest.
  eigh (SVD-LLM V2):  G = Q Lambda Q^T, S = Q Lambda^1/2, S^-1 = Lambda^-1/2 Q^T (pseudo-inverse
                      on eigenvalues below rcond * lambda_max, also recorded).
Then ||(W - W') X||_F = ||(W - W') S||_F, since S^-1 X has orthonormal rows (SVD-LLM Thm 3.2).

Writes RUN_DIR/whiten/:
  block_NNN.safetensors  one shard per decoder block: {group}.S, compact (see compact_factor): cholesky
                         the packed lower triangle (n (n+1) / 2,), eigh the whole (n, n); float32. S^-1 is
                         never stored: decompose.py solves with S.
  calib_ids.safetensors  ids (nsamples, seqlen) int64: the calibration windows, reused by later stages
  manifest.json          model, data, groups, shapes, numerical fixes, seed, versions

  python whiten.py --model embedded --data embedded --nsamples 64 --seqlen 512
"""
import os
import sys
import time

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from plumbing import artifacts
from plumbing import loading
from plumbing.cli import UserError
from plumbing import cli
from plumbing.loading import decoder_blocks, find_linears, layer_shapes, weight_matrix

MIN_DISTINCT_TOKENS = 16  # below this a calibration text is degenerate (one token repeated, say)


# ----------------------------------------------------------------------------- math

def whitening_factor(G, method="cholesky", eps=1e-6, rcond=1e-10):
    """G (n, n) float64 -> S (n, n) float64 with S S^T = G, and a dict describing any fix applied. S^-1 is
    never formed: decompose.py solves with S (cholesky) or reads it off S's columns (eigh, expand_factor)."""
    n = G.shape[0]
    scale = G.diagonal().mean().item()
    if not scale > 0:
        raise ValueError("Gram matrix is all zeros: this layer never received input")
    if method == "cholesky":
        S, info = torch.linalg.cholesky_ex(G)
        if info.item() == 0:
            return S, {}
        # SVD-LLM: G is singular / indefinite (dead channels, few tokens): shift its spectrum up
        lam_min = torch.linalg.eigvalsh(G)[0].item()
        jitter = -lam_min + eps * scale
        S = torch.linalg.cholesky(G + jitter * torch.eye(n, dtype=G.dtype, device=G.device))
        return S, {"jitter": jitter, "lambda_min": lam_min}
    if method == "eigh":
        lam, Q = torch.linalg.eigh(G)  # G = Q diag(lam) Q^T
        dropped = int((lam <= rcond * lam[-1]).sum())  # pseudo-inverted as 0 by expand_factor
        S = Q * lam.clamp(min=0).sqrt()  # (n, n): S S^T = Q Lambda Q^T
        return S, ({"pinv_dropped_eigenvalues": dropped} if dropped else {})
    raise ValueError(f"unknown whitening method {method!r}")


def sample_windows(stream, nsamples, seqlen, seed):
    """nsamples random windows (nsamples, seqlen) of the token stream, one seeded generator."""
    if len(stream) < nsamples * seqlen:
        raise UserError(f"calibration text has {len(stream)} tokens, fewer than --nsamples {nsamples} x "
                        f"--seqlen {seqlen}; lower them or pass more text with --data")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seqlen + 1, (nsamples,), generator=g)
    return torch.stack([stream[s:s + seqlen] for s in starts.tolist()])


# ----------------------------------------------------------------------------- block-by-block Gram accumulation

class StopForward(Exception):
    """Raised by the last block's stub: nothing after the decoder blocks needs to run."""


def block_names(linears, blocks):
    """[[full layer names inside block b] for every block b], in forward order."""
    inside = [{id(m) for m in block.modules()} for block in blocks]
    return [[name for name, mod in linears.items() if id(mod) in ids] for ids in inside]


def move_outside_blocks(model, blocks, device):
    """Put every parameter and buffer that is not inside a decoder block (embeddings, rotary tables,
    final norm, head) on `device`; the blocks stay where they are and visit the device one at a time."""
    inside = {id(t) for b in blocks for t in [*b.parameters(), *b.buffers()]}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in inside:
            t.data = t.data.to(device)  # .data keeps tied tensors tied


@torch.no_grad()
def capture_block_inputs(model, blocks, ids, batch_size, device):
    """The GPTQ / SVD-LLM low-resource pattern, architecture-agnostic: every block's forward is replaced by
    a stub that records what the model passes it (positional and keyword arguments: masks, positions,
    rotary tables, which may differ per block, e.g. sliding-window layers) and returns its input; the
    last stub stops the forward. Returns hidden (list over batches of (B, T, H): block 0's input) and
    calls[b][i] = (args, kwargs, positional) of block b on batch i, the hidden states left out."""
    hidden, calls = [], [[] for _ in blocks]
    for b, block in enumerate(blocks):
        def stub(*args, b=b, **kwargs):
            positional = len(args) > 0
            h = args[0] if positional else kwargs.pop("hidden_states")
            calls[b].append((args[1:], kwargs, positional))
            if b == 0:
                hidden.append(h)
            if b == len(blocks) - 1:
                raise StopForward
            return h
        block.forward = stub  # an instance attribute shadows the class's forward
    try:
        for i in range(0, len(ids), batch_size):
            try:
                model(ids[i:i + batch_size].to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        for block in blocks:
            del block.forward
    return hidden, calls


@torch.no_grad()
def block_grams(block, linears, hidden, calls, T):
    """Run one decoder block over every calibration batch with hooks on its linears. Layers whose input is
    the very same tensor (q/k/v, gate/up) form one group with one G = sum_t x_t x_t^T / T (float64).
    Returns ({layer: group leader}, {leader: G}); `hidden` is replaced by the block's outputs in place,
    so the next block receives the ORIGINAL block's outputs."""
    groups, G, seen, hooks = {}, {}, {}, []
    for name, mod in linears.items():
        def hook(_m, inp, name=name):
            x = inp[0]
            # group by identity of the input tensor; `seen` keeps it alive so no address is reused in this batch
            leader = seen.setdefault((x.data_ptr(), tuple(x.shape)), (name, x))[0]
            if groups.setdefault(name, leader) != leader:
                raise RuntimeError(f"{name} shares its input with {leader} on one batch but not on another")
            if leader == name:
                x = x.reshape(-1, x.shape[-1]).float()  # (B*T, n)
                if name not in G:
                    G[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
                G[name] += (x.T @ x).double()  # one batch's X X^T in float32, the sum in float64 (docs/METHODS.md §1)
        hooks.append(mod.register_forward_pre_hook(hook))
    try:
        for i, (args, kwargs, positional) in enumerate(calls):
            seen.clear()
            out = block(hidden[i], *args, **kwargs) if positional else block(*args, hidden_states=hidden[i], **kwargs)
            hidden[i] = out[0] if isinstance(out, tuple) else out
    finally:
        for h in hooks:
            h.remove()
        seen.clear()
    for g in G.values():
        g.div_(T)
    return groups, G


def compact_factor(S, method):
    """What whiten/ stores per group, never S^-1 (decompose.py solves with S instead):
    cholesky: the lower triangle of S, packed row by row, float32 (half of n^2);
    eigh:     S = Q Lambda^1/2 whole, float32 (its columns are orthogonal, so S^-1 is S^T scaled).
    float32 is exact enough: at full rank W' = W S S^-1 = W for ANY invertible S, so rounding S only makes
    the whitening optimal for S S^T = G (1 + O(1e-7)), far below G's own sampling error and the jitter."""
    if method == "cholesky":
        return S[torch.ones_like(S, dtype=torch.bool).tril()].float()  # (n (n + 1) / 2,)
    return S.float()


def expand_factor(t, n, method, rcond=1e-10):
    """Inverse of compact_factor: S (n, n) float64 and S^-1 where it is not a triangular solve (eigh:
    S^-1 = Lambda^-1/2 Q^T = (S / ||S_:j||^2)^T, rows of dropped eigenvalues zero, as in whitening_factor)."""
    if method == "cholesky":
        S = torch.zeros(n, n, dtype=torch.float64, device=t.device)
        S[torch.ones(n, n, dtype=torch.bool, device=t.device).tril()] = t.double()
        return S, None
    S = t.double().reshape(n, n)
    lam = (S ** 2).sum(0)  # (n,): the eigenvalues of G, since Q has orthonormal columns
    keep = lam > rcond * lam.max()
    return S, (S * torch.where(keep, 1 / lam.clamp(min=1e-300), torch.zeros_like(lam))).T


# ----------------------------------------------------------------------------- main

def check_calibration(ids, widest):
    """Refuse calibration text too repetitive to whiten with: with fewer distinct tokens than a handful,
    every Gram matrix is near-singular and the factors fit noise; warn when there are fewer distinct
    tokens than the widest layer has inputs."""
    distinct = ids.unique().numel()
    if distinct < MIN_DISTINCT_TOKENS:
        raise UserError(f"the calibration text has only {distinct} distinct tokens in {ids.numel()}: it is "
                        "degenerate (repeated text?); pass real text with --data")
    if distinct < widest:
        print(f"WARNING: only {distinct} distinct calibration tokens for layers with up to {widest} inputs: "
              "the Gram matrices may be poorly conditioned; more varied --data is better", file=sys.stderr)
    return distinct


@torch.no_grad()
def check_contents(spec, model):
    """The model's contents, checked once (later stages check whiten/'s fingerprint of the same weights): every weight
    finite, and the model causal, by its config and by the property itself: the logits at positions 0..6 of two inputs
    differing only at position 7 are equal (a bidirectional model's are not, and its perplexity means nothing)."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise UserError(f"model {spec!r}: {name} holds {bad} NaN or inf value(s) of {t.numel()}: the weights are "
                            "damaged; re-download or re-save the model")
    if getattr(model.config, "is_encoder_decoder", False):
        raise UserError(f"model {spec!r} is an encoder-decoder ({model.config.model_type}): this project compresses "
                        "causal (decoder-only) language models")
    x = torch.randint(0, model.get_input_embeddings().weight.shape[0], (2, 8), generator=torch.Generator().manual_seed(0))
    x[1, :7] = x[0, :7]
    logits = model(x.to(loading.input_device(model)), use_cache=False).logits.float()  # (2, 8, V)
    if not torch.allclose(logits[0, :7], logits[1, :7], rtol=1e-3, atol=1e-3 * float(logits[0, :7].abs().max())):
        raise UserError(f"model {spec!r} is not causal: its outputs at a position depend on later tokens "
                        f"({model.config.model_type}, a bidirectional model?): pass a causal language model")


def cast_floats(obj, dtype):
    """Every floating tensor in obj (nested tuples, lists, dicts: a block's masks, rotary cos / sin) cast to dtype;
    integer and bool tensors (position ids, boolean masks) and everything else unchanged."""
    if torch.is_tensor(obj):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(cast_floats(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: cast_floats(v, dtype) for k, v in obj.items()}
    return obj


def whiten_block(b, block, names, linears, hidden, calls, T, method, device):
    """Grams of block b, then each group's S (compact) and any numerical fix; the block visits `device` in its
    compute dtype (cli.compute_dtype: float32 on the CPU for a bf16 / fp16 model, whose half-precision
    matmuls are slow there) and goes back in its own dtype (bf16 -> fp32 -> bf16 is exact)."""
    own = next(block.parameters()).dtype
    dtype = cli.compute_dtype(own, device)
    block.to(device, dtype)
    hidden[:] = [h.to(dtype) for h in hidden]  # a no-op after the first block (its outputs are already dtype)
    calls = [(cast_floats(a, dtype), cast_floats(k, dtype), p) for a, k, p in calls]
    groups, G = block_grams(block, {n: linears[n] for n in names}, hidden, calls, T)
    block.to("cpu", own)
    tensors, fixes = {}, {}
    for leader in list(G):
        Gg = G.pop(leader)  # freed as soon as its factor is computed
        if not Gg.diagonal().mean().item() > 0:
            raise UserError(f"{leader} receives only zeros during calibration (its Gram matrix is zero), so it "
                            "cannot be whitened with any method: the calibration text does not exercise it")
        try:
            S, fix = whitening_factor(Gg, method)
        except (ValueError, torch.linalg.LinAlgError) as e:
            other = "eigh" if method == "cholesky" else "cholesky"
            raise UserError(f"whitening failed for {leader} ({e}); try --whitening {other} or more --nsamples") from None
        if fix:
            tqdm.write(f"  numerical fix on {leader}: {fix}")  # never silent: every numerical patch is printed and recorded
            fixes[leader] = fix
        tensors[f"{leader}.S"] = compact_factor(S, method).cpu().contiguous()
    missing = [n for n in names if n not in groups]
    if missing:
        raise UserError(f"{missing[0]} never received input during calibration: the model does not use it in "
                        "its forward pass, so it cannot be compressed")
    return groups, tensors, fixes


def main(args):
    cli.check_run_dir(args.run_dir)
    cli.set_seed(args.seed)
    device = cli.pick_device(args.device)
    t0 = time.time()
    model = loading.load_model(args.model, "cpu")  # blocks visit the device one at a time
    check_contents(args.model, model)
    tok = loading.load_tokenizer(args.model, model)
    cli.check_seqlen(model.config, args.seqlen)
    linears = find_linears(model)
    blocks = decoder_blocks(model)
    docs, where = loading.load_documents(args.data, "calib")
    stream = loading.token_stream(tok, docs)
    ids = sample_windows(stream, args.nsamples, args.seqlen, args.seed)
    distinct = check_calibration(ids, max(weight_matrix(m).shape[1] for m in linears.values()))
    print(f"{len(linears)} linear layers in {len(blocks)} decoder blocks; {ids.numel()} calibration tokens "
          f"({args.nsamples} x {args.seqlen}, {distinct} distinct) on {device}")
    move_outside_blocks(model, blocks, device)
    hidden, calls = capture_block_inputs(model, blocks, ids, args.batch_size, device)
    out = artifacts.stage_dir(args.run_dir, "whiten")
    groups, fixes, shards = {}, {}, {}
    for b, names in enumerate(tqdm(block_names(linears, blocks), desc="whiten blocks")):
        g, tensors, f = whiten_block(b, blocks[b], names, linears, hidden, calls[b], ids.numel(), args.whitening,
                                     device)
        groups.update(g)
        fixes.update(f)
        shards.update({leader: f"block_{b:03d}.safetensors" for leader in set(g.values())})
        save_file(tensors, f"{out}/block_{b:03d}.safetensors")  # one shard per block: no stage needs them all
        del tensors
    save_file({"ids": ids}, f"{out}/calib_ids.safetensors")
    artifacts.commit_stage(args.run_dir, "whiten", out, {
        "inputs": {}, "model": os.path.abspath(args.model) if os.path.isdir(args.model) else args.model,  # resolved:
        "config_hash": artifacts.config_hash(model),  # later stages read the folder from any working directory
        "weights_hash": artifacts.weights_hash(model), "dtype": str(model.dtype).replace("torch.", ""),
        "data": os.path.abspath(args.data) if os.path.isfile(args.data) else args.data, **where, "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed,
        "distinct_tokens": distinct, "whitening": args.whitening, "groups": groups, "shards": shards,
        "shapes": layer_shapes(linears), "fixes": fixes,
        **cli.peak_gpu(device), "wall_time_s": round(time.time() - t0, 1)})
    print(f"wrote {args.run_dir}/whiten in {time.time() - t0:.1f}s ({len(set(groups.values()))} input groups, "
          f"{len(fixes)} numerical fixes)")


def parser():
    """The flags (a function, so the tests can parse and run a stage in-process)."""
    p = cli.Parser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="embedded", help="'embedded' (SmolLM2-135M from pip), a local folder or a hub id")
    p.add_argument("--data", default="embedded",
                   help="'embedded' (gensim's Wikipedia), 'wikitext2', 'c4' (hub) or a .txt/.jsonl path")
    p.add_argument("--nsamples", type=cli.COUNT, default=64, help="calibration windows")
    p.add_argument("--seqlen", type=cli.LENGTH, default=512, help="tokens per calibration window")
    p.add_argument("--seed", type=cli.SEED, default=3, help="seed of the window sampler (SVD-LLM uses 3)")
    p.add_argument("--whitening", choices=["cholesky", "eigh"], default="cholesky",
                   help="cholesky (SVD-LLM) with recorded jitter, or eigh (SVD-LLM V2) with pseudo-inverse")
    p.add_argument("--batch_size", type=cli.COUNT, default=4, help="windows per forward pass")
    p.add_argument("--run_dir", default="runs/default", help="folder holding every stage's artifacts")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1 ...")
    return p


if __name__ == "__main__":
    cli.run_main(main, parser().parse_args())
