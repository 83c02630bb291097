"""Layer discovery without architecture names: the decoder blocks are the ModuleList with the most
parameters, the compressed layers every nn.Linear (or GPT-2's Conv1D) inside them (docs/METHODS.md §5).
"""
import re

import torch
import torch.nn as nn

from plumbing.cli import UserError

def is_linear(mod):
    """nn.Linear, or GPT-2's Conv1D (weight stored transposed: (in, out))."""
    return isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D"


def weight_matrix(mod):
    """W of shape (m, n) = (out, in), whatever the module stores."""
    return mod.weight.T if type(mod).__name__ == "Conv1D" else mod.weight


def decoder_blocks(model):
    """The repeated decoder blocks: the ModuleList with the most parameters. No architecture names."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise UserError("model has no nn.ModuleList of decoder blocks; is it a causal LM?")
    return max(lists, key=lambda ml: sum(p.numel() for p in ml.parameters()))


def find_linears(model):
    """{full module name: module} for every linear inside the decoder blocks, in forward order."""
    inside = {id(m) for b in decoder_blocks(model) for m in b.modules()}
    found = {n: m for n, m in model.named_modules() if id(m) in inside and is_linear(m)}
    if not found:
        raise UserError("no nn.Linear / Conv1D found inside the decoder blocks")
    return found


def layer_type(name):
    """A layer's position within its decoder block ("self_attn.q_proj"): the name after the first
    integer path component, which indexes the blocks. Groups e.g. every q_proj, with no architecture names."""
    return re.sub(r"^.*?\.\d+\.", "", name)


def layer_shapes(linears):
    return {name: tuple(weight_matrix(mod).shape) for name, mod in linears.items()}


def set_module(model, name, new):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def layer_factors(factors, name, W):
    """One layer's stored factors (U, sigma, V^T S^-1), read one layer at a time (factors may be a lazy
    artifacts.Shards) onto W's device in W's dtype (bf16 on a GPU): no per-call casts, no second copy.
    float16 cannot hold V^T S^-1 (decompose.factor_dtype): a float16 layer's factors stay float32."""
    like = {"device": W.device, "dtype": torch.float32 if W.dtype == torch.float16 else W.dtype}
    U, VtSinv = factors[f"{name}.U"].to(**like), factors[f"{name}.VtSinv"].to(**like)
    return U, factors[f"{name}.sigma"].to(W.device), VtSinv


def checkpoint_blocks(model):
    """Activation checkpointing per decoder block: only each block's input is kept for backward, and the
    block is recomputed there (non-reentrant, so gradients reach the gates through the drawn masks)."""
    from torch.utils.checkpoint import checkpoint
    for block in decoder_blocks(model):
        def forward(*args, _f=block.forward, **kwargs):
            if not torch.is_grad_enabled():  # the teacher pass: nothing to save
                return _f(*args, **kwargs)
            return checkpoint(_f, *args, use_reentrant=False, **kwargs)
        block.forward = forward
