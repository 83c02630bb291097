"""Stage 4: apply the allocation and save a compressed model made of real low-rank layers.

For a layer kept at rank k (docs/METHODS.md §1):
  A = U_k Sigma_k D (m, k),  B = D^-1 V_k^T S^-1 (k, n),  y = A (B x) + b,  k (m + n) parameters
  (D diagonal: each component's largest entries equal in A and B, so a float16 layer holds them)
A layer whose rank is "dense" (or >= k*, where dense is cheaper AND exact, docs/METHODS.md §2) keeps W.
If the allocation chose a subset of components with learned scales (SoCo, docs/METHODS.md §3.4),
component i enters with sigma_i * s_i: the learned spectrum is folded into A and B.

The model is built layer by layer: each layer's factors are read from decompose/'s shards when it is
swapped in, and the original layer is dropped at once, so memory stays at about one model.

Writes RUN_DIR/compressed/: config.json (with "lowrank_ranks" and an auto_map entry), modeling_lowrank.py,
tokenizer files, model.safetensors, ranks.json, manifest.json. Reload it with one call (generate() works):

  from truncate import load_compressed
  model, tok = load_compressed("runs/default/compressed")
  # or, anywhere, without this repository:
  model = AutoModelForCausalLM.from_pretrained("runs/default/compressed", trust_remote_code=True)

  python truncate.py --run_dir runs/default
"""
import os
import shutil
import time

import torch

from methods import base
from plumbing import artifacts, cli, loading
from plumbing.cli import UserError
from plumbing.loading import find_linears, set_module, weight_matrix
from plumbing.modeling_lowrank import lowrank_factors, lowrank_layer  # noqa: F401 (the math of the docstring)


# ----------------------------------------------------------------------------- math

def count_params(model):
    return sum(p.numel() for p in model.parameters())  # shared (tied) tensors counted once


def compress_model(model, ranks, factors, components=None):
    """Swap every non-dense layer in `ranks` for a LowRankLinear, in place, one layer at a time: the original
    layer is dropped as soon as its replacement is in, so at most one layer's factors are alive beside the
    model (never the original model plus every factor). `factors` may be a lazy artifacts.Shards."""
    for name in list(find_linears(model)):  # names only: holding the modules would keep every W alive
        rank = ranks.get(name, "dense")
        if rank == "dense":
            continue
        mod = model.get_submodule(name)
        if rank >= base.k_star(*weight_matrix(mod).shape):
            continue  # past break-even the dense W is cheaper and exact (docs/METHODS.md §2)
        sub = {} if components is None or f"{name}.index" not in components else \
            {"index": components[f"{name}.index"], "scale": components[f"{name}.scale"]}
        set_module(model, name, lowrank_layer(mod, factors, name, rank, **sub))
        del mod
    return model


class LowRankConfig(artifacts.Model):
    """What compressed/config.json adds to the original config."""
    lowrank_ranks: dict[str, artifacts.Positive]


def load_compressed(path, device="cpu", dtype="auto", **kwargs):
    """Rebuild a model saved by truncate.py: (model, tokenizer), ready for generate(). The same code as
    `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` (modeling_lowrank.py): the
    architecture is built on the meta device and filled from the weights file, never randomly initialised.
    kwargs go to from_pretrained (device_map="auto" for a model past one GPU)."""
    from transformers import AutoTokenizer
    from plumbing.modeling_lowrank import LowRankForCausalLM
    rerun = "python truncate.py"
    if not os.path.isfile(os.path.join(path, "ranks.json")):
        raise UserError(f"{path} is not a compressed model folder (no ranks.json): run truncate.py")
    artifacts.read_json(os.path.join(path, "config.json"), rerun, LowRankConfig)
    try:
        model = LowRankForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    except Exception:  # truncated or corrupt file, tensors of the wrong shape or missing
        raise UserError(f"{path}/model.safetensors is damaged or incomplete: re-run `{rerun}`") from None
    if "device_map" not in kwargs:
        model = model.to(device)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def check_components(components, ranks, layers, path, rerun):
    """Each low-rank layer's learned subset: `index` distinct integers in 0..k_max-1, as many as its rank, and a
    non-negative `scale` of the same length (artifacts checked the dtypes and finiteness); no other tensor."""
    known = {f"{n}.{w}" for n, r in ranks.items() if r != "dense" for w in ("index", "scale")}
    stray = sorted(set(components) - known)
    if stray:
        raise UserError(f"{path} holds {stray[0]}, not a low-rank layer's index or scale: re-run `{rerun}`")
    for name, r in ranks.items():
        if (f"{name}.index" in components) != (f"{name}.scale" in components):
            raise UserError(f"{path}: {name} has an index without a scale or a scale without an index: re-run `{rerun}`")
        if f"{name}.index" not in components:  # the prefix 0..r-1 at scale 1, truncate's default
            continue
        index, scale = components[f"{name}.index"], components.get(f"{name}.scale")
        k_max = layers[name]["k_max"]
        if scale is None or index.dim() != 1 or scale.shape != index.shape or (r != "dense" and len(index) != r):
            raise UserError(f"{path}: {name}'s index and scale do not match its rank {r}: re-run `{rerun}`")
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= k_max or len(set(index.tolist())) < len(index)):
            raise UserError(f"{path}: {name}'s index holds values outside 0..{k_max - 1} or repeats: re-run `{rerun}`")
        if len(scale) and float(scale.min()) < 0:
            raise UserError(f"{path}: {name}'s scale holds negative values: re-run `{rerun}`")


def check_finite(model, rerun):
    """Never save a model with NaN or inf weights (it would reload and score garbage)."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise UserError(f"the compressed model's {name} holds NaN or inf: the factors are broken; re-run `{rerun}`")


def check_ranks(ranks, layers, rerun):
    """Every compressed layer, and no other, has "dense" or an integer rank in 1..k_max; ranks >= k* become
    "dense"."""
    with artifacts.one_line(rerun):
        artifacts.same_keys(ranks, layers, "allocation/ranks.json 'layers'", "decompose/manifest.json 'layers'")
    for name, v in layers.items():
        r = ranks.get(name)
        if r == "dense":
            continue
        if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= v["k_max"]:
            raise UserError(f"allocation/ranks.json gives {name} the rank {r!r}: a rank must be \"dense\" or an "
                            f"integer in 1..{v['k_max']}; re-run `{rerun}`")
        if r >= base.k_star(v["m"], v["n"]):
            ranks[name] = "dense"  # normalise, so the saved ranks say what the model holds
    return ranks


# ----------------------------------------------------------------------------- main

def main(args):
    chain = artifacts.read_chain(args.run_dir, "whiten", "decompose", "allocation", reads={"whiten": ()})
    whiten, decomp, alloc = chain["whiten"], chain["decompose"], chain["allocation"]
    rerun = f"python learn_masks.py --run_dir {args.run_dir}"
    t0 = time.time()
    allocation = artifacts.read_json(f"{args.run_dir}/allocation/ranks.json", rerun, artifacts.RANKS)
    ranks = check_ranks(allocation["layers"], decomp["layers"], rerun)
    model = loading.load_model(whiten["model"], "cpu")
    tok = loading.load_tokenizer(whiten["model"], model)
    artifacts.check_model(model, whiten)
    n_before = count_params(model)
    comp_path = f"{args.run_dir}/allocation/components.safetensors"
    components, listed = None, "components.safetensors" in alloc["files"]  # listed: read_manifest checked it
    if allocation["components"] and not listed:
        raise UserError(f"{comp_path} is missing (or not in its manifest) but ranks.json needs it: re-run `{rerun}`")
    if listed and not allocation["components"]:
        raise UserError(f"{args.run_dir}/allocation/ranks.json says components False, its manifest lists "
                        f"components.safetensors: re-run `{rerun}`")
    if allocation["components"]:
        components = artifacts.read_tensors(  # as methods/base.py's export writes them: int64 indices, float32 scales
            comp_path, rerun, dtype=lambda k: torch.int64 if k.endswith(".index") else torch.float32)
        check_components(components, ranks, decomp["layers"], comp_path, rerun)
    factors = artifacts.Shards(args.run_dir, "decompose", f"python decompose.py --run_dir {args.run_dir}",
                               decomp["shards"], shape=artifacts.factor_shape(decomp))  # one layer at a time
    compress_model(model, ranks, factors, components)
    check_finite(model, f"python decompose.py --run_dir {args.run_dir}")
    shapes = {name: (v["m"], v["n"]) for name, v in decomp["layers"].items()}
    rho_linear, n_after = base.kept_fraction(ranks, shapes), count_params(model)

    out = artifacts.stage_dir(args.run_dir, "compressed")
    # the folder carries its own module: from_pretrained(out, trust_remote_code=True) rebuilds this model
    model.config.lowrank_ranks = {n: r for n, r in ranks.items() if r != "dense"}
    model.config.auto_map = {"AutoModelForCausalLM": "modeling_lowrank.LowRankForCausalLM"}
    shutil.copy(os.path.join(os.path.dirname(os.path.abspath(__file__)), "plumbing", "modeling_lowrank.py"), out)
    # config (with lowrank_ranks and auto_map) and the weights, in shards of at most 2 GB with an index for a
    # large model: the layout from_pretrained, lm-eval and accelerate expect
    model.save_pretrained(out, max_shard_size="2GB")
    tok.save_pretrained(out)
    artifacts.write_json(f"{out}/ranks.json", {**allocation, "layers": ranks})
    artifacts.commit_stage(args.run_dir, "compressed", out, {
        "inputs": {"allocation": alloc["hash"], "decompose": decomp["hash"]}, "model": whiten["model"],
        "params_original": n_before, "params_compressed": n_after, "kept_fraction_linear": rho_linear,
        "kept_fraction_model": n_after / n_before, "wall_time_s": round(time.time() - t0, 1)})
    print(f"compressed linears: {base.kept_removed(rho_linear)}; whole model: "
          f"{base.kept_removed(n_after / n_before)} ({n_before:,} -> {n_after:,} parameters)")
    print(f"wrote {args.run_dir}/compressed; reload with truncate.load_compressed('{args.run_dir}/compressed')")


def parser():
    """The flags (a function, so the tests can parse and run a stage in-process)."""
    p = cli.Parser(description=__doc__.split("\n")[0])
    p.add_argument("--run_dir", default="runs/default", help="folder holding every stage's artifacts")
    return p


if __name__ == "__main__":
    cli.run_main(main, parser().parse_args())
