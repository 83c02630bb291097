"""Hard-concrete L0 gates (docs/METHODS.md §3.2; Louizos, Welling, Kingma, ICLR 2018), one per stored component:

  s_i = sigmoid((log u_i - log(1 - u_i) + log a_i) / beta),  u_i ~ U(0, 1)
  z_i = clip(s_i (zeta - gamma) + gamma, 0, 1)                 (Eq. 10: exact 0s and 1s occur)
  k_hat = sum_i P(z_i != 0) = sum_i sigmoid(log a_i - beta log(-gamma / zeta))   (Eq. 12)
  test-time gate: clip(sigmoid(log a_i)(zeta - gamma) + gamma, 0, 1)              (Eq. 13)

gamma = -0.1, zeta = 1.1; beta anneals from Louizos' 2/3 to --beta_end.
"""
import math
from argparse import ArgumentTypeError

import torch
import torch.nn as nn

from methods import register
from methods.base import Gate, uniform_logits


def temperature(text):
    """--beta_end: a number or a fraction such as 2/3 (Louizos' beta, which no decimal reaches exactly) in (0, 2/3]."""
    num, _, den = text.partition("/")
    try:
        beta = float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        raise ArgumentTypeError(f"{text!r} is not a number or a fraction such as 2/3") from None
    if not 0 < beta <= HardConcreteGate.beta:  # NaN fails this too
        raise ArgumentTypeError(f"{text} is outside (0, 2/3]: hard-concrete's final temperature (2/3 = Louizos' fixed beta)")
    return beta


class HardConcreteGate(Gate):
    """Louizos et al. hard-concrete L0 gates (§3.2). The temperature anneals geometrically from 2/3 to
    --beta_end over the steps (beta_t). Annealed (the default), the last steps' sampled gates are nearly 0
    or 1, so the export is that hard gate: the components of largest log a at scale 1. At beta_end = 2/3
    (Louizos' fixed beta) the forward trains fractional gates and each kept component is exported with its
    test-time gate (Eq. 13) as scale. The uniform init is sigmoid's ramp, P(z_i != 0) = sigmoid(6 (1 - i / k0)),
    so k_hat ~ k0 and every gate near the boundary is within a few log a units of it: AdamW moves each gate by
    about its lr whatever its gradient, so gates on a plateau (sampled z clipped at 1, reached only by the
    budget and guidance) would move as one block (docs/RESULTS.md, "Why each default")."""
    gamma, zeta, beta = -0.1, 1.1, 2 / 3
    skips_zeros = True  # a gate clipped to 0 has zero gradient (the clip), so its component is not computed

    def __init__(self, k_max, k0, sigma, beta_end=0.05, init="uniform"):
        super().__init__()
        self.beta_t, self.beta_end = self.beta, beta_end
        if init == "paper":
            z = torch.linspace(6, 3, k_max)
        else:  # sigmoid's ramp about the count's threshold: P(z != 0) = sigmoid(6 (1 - i / k0)) (annealed), or the
            z = uniform_logits(k_max, k0) + self.threshold()  # first k0 gates live at test time (a fixed beta)
        self.log_alpha, self.k_max = nn.Parameter(z), k_max

    flags = {"--beta_end": dict(type=temperature, default=0.05, help="hard-concrete: temperature at the last step, "
                                "annealed geometrically from 2/3: the gates end nearly 0/1 and export as a hard top-k at "
                                "scale 1 (2/3 = Louizos' fixed beta, exported with its test-time gates as scales)")}

    def at_step(self, step, steps):
        # beta_t = beta (beta_end / beta)^(t / (T - 1)): geometric, 2/3 at the first step, beta_end at the last.
        # log a keeps its P(on): the shift moves with beta_t, so k_hat = sum P(z != 0) is continuous in t
        with torch.no_grad():
            before = self.shift()
            self.beta_t = self.beta * (self.beta_end / self.beta) ** (step / max(steps - 1, 1))
            self.log_alpha += self.shift() - before

    def annealed(self):
        return self.beta_end < self.beta

    def shift(self):
        return self.beta_t * math.log(-self.gamma / self.zeta)

    def mask(self, gen):
        u = torch.rand(self.log_alpha.shape, generator=gen, device=self.log_alpha.device).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((u.log() - (-u).log1p() + self.log_alpha) / self.beta_t)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0, 1)  # exact zeros and ones occur

    def threshold(self):
        """Where k_hat counts a gate as half (annealed: P(z != 0) = 1/2) or as live (a fixed beta: the test-time
        gate clip(sigmoid(log a) (zeta - gamma) + gamma, 0, 1) > 0 iff log a > log(-gamma / zeta))."""
        return self.shift() if self.annealed() else math.log(-self.gamma / self.zeta)

    def k_hat(self):
        # annealed: the L0 norm the budget is trained on, sum_i P(z_i != 0) (Louizos et al. Eq. 12). At a fixed beta
        # the export runs the test-time gates (Eq. 13), so the budget sees their count, the live gates, with the
        # gradient of its sigmoid relaxation (straight-through)
        if self.annealed():
            return torch.sigmoid(self.log_alpha - self.shift()).sum()
        soft = torch.sigmoid((self.log_alpha - self.threshold()) / self.beta)
        return (self.log_alpha > self.threshold()).float().sum() + (soft - soft.detach()).sum()

    def order(self):
        return self.log_alpha.detach().argsort(descending=True)  # any subset, like sigmoid

    def export_count(self):
        # at a fixed beta the exported model runs the test-time gates: a component whose gate is 0 computes
        # nothing and is never kept, so the count is the components exported (annealed: sum P(z != 0) as trained)
        return self.k_hat().item() if self.annealed() else int((self.scales() > 0).sum())

    def scales(self):  # the test-time gate (Louizos et al. Eq. 13); annealed: the hard gate, scale 1
        if self.annealed():
            return None
        return (torch.sigmoid(self.log_alpha.detach()) * (self.zeta - self.gamma) + self.gamma).clamp(0, 1)


register("hardconcrete", HardConcreteGate)
