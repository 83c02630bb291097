"""The whole-model reference computations the stages are tested against (code only the tests use):
every layer's Gram matrix at once from one pass over the calibration windows, and the groups of
layers that read the same tensor, found by identity of the input tensor."""
import torch
from tqdm import tqdm
from plumbing.loading import weight_matrix



@torch.no_grad()
def share_groups(model, linears, probe):
    """Group layers that receive the very same input tensor (q/k/v, gate/up): one G per group."""
    seen, groups, hooks, alive = {}, {}, [], []
    for name, mod in linears.items():
        def hook(_m, inp, name=name):
            x = inp[0]
            alive.append(x)  # keep every input alive, so a freed buffer's address is never reused
            key = (x.data_ptr(), tuple(x.shape))
            groups[name] = seen.setdefault(key, name)
        hooks.append(mod.register_forward_pre_hook(hook))
    model(probe)
    for h in hooks:
        h.remove()
    return groups  # {layer: group leader}


@torch.no_grad()
def accumulate_gram(model, linears, groups, ids, batch_size, device):
    """(Whole-model oracle: every G of the model alive at once.) G_g = sum_t x_t x_t^T / T, float64."""
    G, hooks = {}, []
    for leader in sorted(set(groups.values())):
        n = weight_matrix(linears[leader]).shape[1]
        G[leader] = torch.zeros(n, n, dtype=torch.float64, device=device)

        def hook(_m, inp, leader=leader):
            x = inp[0].reshape(-1, inp[0].shape[-1]).float()  # (B*T, n)
            # one batch's X X^T in float32 (fast), the running sum over batches in float64 (docs/METHODS.md §1)
            G[leader] += (x.T @ x).double()
        hooks.append(linears[leader].register_forward_pre_hook(hook))
    for i in tqdm(range(0, len(ids), batch_size), desc="calibration"):
        model(ids[i:i + batch_size].to(device))
    for h in hooks:
        h.remove()
    T = ids.numel()
    return {k: v / T for k, v in G.items()}


def whitening_factor(G, method="cholesky"):
    """whiten.whitening_factor's S and fix, plus S^-1 (the stages never form it): a triangular solve for
    cholesky, the pseudo-inverse off S's orthogonal columns for eigh (whiten.expand_factor, in float64)."""
    import whiten
    S, fix = whiten.whitening_factor(G, method)
    if method == "cholesky":
        eye = torch.eye(len(S), dtype=S.dtype, device=S.device)
        return S, torch.linalg.solve_triangular(S, eye, upper=False), fix
    return S, whiten.expand_factor(S, len(S), "eigh")[1], fix
