"""The module a compressed model folder carries with it (truncate.py copies this file beside the weights
and names it in config.json's auto_map, the way ACIP ships its compressed models), so the folder loads
anywhere with plain transformers, lm-eval's command line, pipelines and accelerate included:

  model = AutoModelForCausalLM.from_pretrained("runs/default/compressed", trust_remote_code=True)

Self-contained on purpose (torch and transformers only): it travels with the folder. The repository's
stages import LowRankLinear from here, so there is one definition of the layer.

A layer kept at rank k is y = A (B x) + b with A = U_k Sigma_k D (m, k), B = D^-1 V_k^T S^-1 (k, n), D diagonal
balancing each component's largest entries between A and B (docs/METHODS.md §1); config.json's "lowrank_ranks"
lists {layer name: k}; every other layer is the original.
"""
import os
import shutil

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING


class LowRankLinear(nn.Module):
    """y = A (B x) + b: k (m + n) parameters instead of m n (docs/METHODS.md §1-§2)."""

    def __init__(self, A, B, bias=None):
        super().__init__()
        self.A = nn.Parameter(A)  # (m, k)
        self.B = nn.Parameter(B)  # (k, n)
        self.bias = None if bias is None else nn.Parameter(bias)

    def forward(self, x):  # x (..., n) -> (..., m)
        return F.linear(F.linear(x, self.B), self.A, self.bias)


def lowrank_factors(U, sigma, VtSinv, rank=None, index=None, scale=None):
    """Top-`rank` components, or the components `index` (k,) with spectrum scales `scale` (k,).
    U (m, k_max), sigma (>= k_max,), VtSinv (k_max, n) -> A (m, k), B (k, n), float64."""
    if index is None:
        index = torch.arange(rank)
    s = sigma[index].double() * (1.0 if scale is None else scale.double())  # SoCo: sigma_i * s_i
    A, B = U[:, index].double() * s, VtSinv[index].double()  # (m, k), (k, n)
    # each component split between A and B so both have the same largest entry (A B unchanged): a float16 layer
    # holds them whenever that entry fits, however large V^T S^-1 is along a nearly dead input direction
    a, b = A.abs().amax(0), B.abs().amax(1)  # (k,), (k,)
    d = torch.where((a > 0) & (b > 0), (b / a.clamp(min=1e-300)).sqrt(), torch.ones_like(a))
    return A * d, B / d[:, None]


def lowrank_layer(mod, factors, name, rank, index=None, scale=None):
    """The LowRankLinear that replaces `mod` (its weight's dtype and device, bias kept) from stored factors
    {name.U, name.sigma, name.VtSinv}."""
    A, B = lowrank_factors(factors[f"{name}.U"], factors[f"{name}.sigma"], factors[f"{name}.VtSinv"],
                           rank=rank, index=index, scale=scale)
    W = mod.weight
    bias = None if mod.bias is None else mod.bias.detach().clone()
    return LowRankLinear(A.to(W), B.to(W), bias).to(W.device)


def out_in(mod):
    """(m, n) = (out, in) of nn.Linear, or of GPT-2's Conv1D (weight stored as (in, out))."""
    m, n = mod.weight.shape
    return (n, m) if type(mod).__name__ == "Conv1D" else (m, n)


def lowrank_skeleton(model, ranks):
    """Swap each layer named in `ranks` for an EMPTY LowRankLinear of its rank, on the layer's device and
    dtype (the meta device inside from_pretrained, so nothing is allocated or initialised: the weights
    file fills it)."""
    for name, k in ranks.items():
        mod = model.get_submodule(name)
        m, n = out_in(mod)
        like = dict(device=mod.weight.device, dtype=mod.weight.dtype)
        bias = None if mod.bias is None else torch.empty(m, **like)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child,
                LowRankLinear(torch.empty(m, k, **like), torch.empty(k, n, **like), bias))
    return model


class LowRankForCausalLM:
    """What auto_map names. from_pretrained builds the ORIGINAL architecture of the config (its model_type,
    no architecture names here) with LowRankLinear layers at config.lowrank_ranks, then loads the weights
    through transformers' own from_pretrained: meta-device construction, no random initialisation,
    dtype / device_map / tied embeddings handled as for any model."""

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModelForCausalLM"):
        pass  # transformers calls this on remote classes; nothing to register

    @classmethod
    def from_pretrained(cls, path, *args, config=None, **kwargs):
        kwargs.pop("trust_remote_code", None)
        config = config or AutoConfig.from_pretrained(path)
        base = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]

        class Compressed(base):
            def __init__(self, config, *a, **kw):
                super().__init__(config, *a, **kw)
                lowrank_skeleton(self, config.lowrank_ranks)

            def save_pretrained(self, folder, *a, **kw):  # a re-saved folder loads again: this file goes with it
                super().save_pretrained(folder, *a, **kw)
                dest = os.path.join(folder, "modeling_lowrank.py")
                if not (os.path.exists(dest) and os.path.samefile(__file__, dest)):
                    shutil.copy(__file__, dest)

        Compressed.__name__ = Compressed.__qualname__ = f"LowRank{base.__name__}"
        want_info = kwargs.pop("output_loading_info", False)
        model, info = Compressed.from_pretrained(path, *args, config=config, output_loading_info=True, **kwargs)
        # transformers only warns about these; a compressed model with a tensor left empty must not load
        tied = set(getattr(model, "all_tied_weights_keys", None) or {})  # the ties this config really has
        bad = {k: [n for n in v if n not in tied] for k, v in info.items()
               if k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if any(bad.values()):
            raise ValueError(f"{path}: weights file does not match lowrank_ranks: "
                             + "; ".join(f"{k} {v[:3]}" for k, v in bad.items() if v))
        return (model, info) if want_info else model
