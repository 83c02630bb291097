"""LLRC's sigmoid mask (docs/METHODS.md §3.1; LLRC arXiv 2512.13733, ARS Gao et al. 2024): one logit z_i per
stored component, a Gumbel-sigmoid sample, hard in the forward and straight-through in the backward:

  g_i = sigmoid((z_i + log u_i - log(1 - u_i)) / tau),  u_i ~ U(0, 1)
  mask_i = 1[g_i > 1/2] + g_i - sg(g_i)                        (straight-through)
  k_hat = sum_i P(mask_i = 1) = sum_i sigmoid(z_i)              (the count the budget sees)

It learns any subset of the components; the export keeps the k of largest z (methods/base.py).
"""
import torch
import torch.nn as nn

from methods import register
from methods.base import Gate, uniform_logits
from plumbing.cli import POSITIVE


class SigmoidGate(Gate):
    """LLRC / ARS Gumbel-sigmoid mask with straight-through estimator (§3.1). The forward mask is hard
    (1[g > .5]), so P(keep) = sigmoid(z) at any tau: tau only sets the slope of the backward surrogate."""

    flags = {"--tau": dict(type=POSITIVE, default=0.4, help="sigmoid: temperature of the straight-through surrogate's "
                           "backward (LLRC code 0.4, paper 0.1); the forward mask is hard, P(keep) = sigmoid(z) at any tau")}

    def __init__(self, k_max, k0, sigma, tau=0.4, init="uniform"):
        super().__init__()
        z = torch.linspace(6, 3, k_max) if init == "paper" else uniform_logits(k_max, k0)
        self.z, self.tau, self.k_max = nn.Parameter(z), tau, k_max

    def mask(self, gen):
        u = torch.rand(self.z.shape, generator=gen, device=self.z.device).clamp(1e-6, 1 - 1e-6)
        g = torch.sigmoid((self.z + u.log() - (-u).log1p()) / self.tau)  # logistic noise = Gumbel-sigmoid
        return (g > 0.5).float() + g - g.detach()  # straight-through

    def k_hat(self):
        # P(g > 0.5) = P(z + logistic noise > 0) = sigmoid(z): the expected number the hard mask keeps
        return torch.sigmoid(self.z).sum()

    def order(self):
        return self.z.detach().argsort(descending=True)  # trained as "any subset": the k largest logits


register("sigmoid", SigmoidGate)
