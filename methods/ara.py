"""ARA's mask (docs/METHODS.md §3.3; Adaptive Rank Allocation, arXiv 2510.19389): a distribution pi = softmax(p)
over D + 1 candidate fractions c_j = 1 - j / D of the k_max stored components, a staircase B (D+1, k_max),
B_ji = 1[i < floor(k_max c_j)]:

  c_bar = pi . c                                               (expected kept fraction of k_max; ARA's rho)
  mask = 1[i < round(k_max c_bar)] + pi^T B - sg(pi^T B)       (a prefix, straight-through)
  k_hat = k_max c_bar

ARA's other two parts serve every gate and live in methods/base.py: the guidance loss L_guid
(guidance_loss) and the finalisation (ara_ranks).
"""
import torch
import torch.nn as nn

from methods import register
from methods.base import Gate
from plumbing.cli import UserError


class AraGate(Gate):
    """ARA's simplex mask over D + 1 candidate fractions c_j = 1 - j / D of k_max (§3.3)."""

    def __init__(self, k_max, k0, sigma, init="uniform", D=100, eps=0.05):
        super().__init__()
        self.k_max = k_max
        self.register_buffer("c", 1 - torch.arange(D + 1, dtype=torch.float32) / D)  # (D+1,)
        keep = torch.floor(k_max * self.c)
        self.register_buffer("B", (torch.arange(k_max)[None, :] < keep[:, None]).float())  # staircase (D+1, k_max)
        # two-level init: an eps floor everywhere plus a two-point mass so that E[rho] = k0 / k_max exactly
        # (where k0 / k_max >= eps / 2, the floor's own mean; below it E[rho] is that mean)
        x = (k0 / k_max - eps * self.c.mean().item()) / (1 - eps)
        x = min(max(x, 0.0), 1.0)
        j0 = min(int((1 - x) * D), D - 1)  # c[j0] >= x >= c[j0 + 1]
        a = (x - self.c[j0 + 1].item()) * D
        pi = torch.full((D + 1,), eps / (D + 1))
        pi[j0] += (1 - eps) * a
        pi[j0 + 1] += (1 - eps) * (1 - a)
        self.p = nn.Parameter(pi.clamp(min=1e-8).log())

    @classmethod
    def check(cls, init="uniform", **_):
        if init == "paper":
            raise UserError("--init paper: ARA's init is its paper's own (E[rho] = the uniform allocation); "
                            "drop --init for --method ara")

    def c_bar(self):
        # elementwise, not a matmul: bf16 autocast would round rho and move round(k_max rho) by a component
        return (torch.softmax(self.p, 0) * self.c).sum()  # expected kept fraction of k_max

    def mask(self, gen):
        c_bar = self.c_bar()
        hard = (torch.arange(self.k_max, device=c_bar.device) < torch.round(self.k_max * c_bar)).float()
        soft = (torch.softmax(self.p, 0)[:, None] * self.B).sum(0)  # pi^T B (k_max,), non-increasing in i
        return hard + soft - soft.detach()

    def k_hat(self):
        return self.k_max * self.c_bar()


register("ara", AraGate)
