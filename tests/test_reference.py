"""Every equation checked against an INDEPENDENT computation: a slow reference written here, a
hand-computed case, or the paper's closed form, never the code path under test. Each test names, in its
docstring, a wrong result it catches."""
import argparse
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

import evaluate
import learn_masks
import oracle
from evaluation.tasks import prepare_tasks, zero_shot
from conftest import run_inprocess, stage, tiny_model, tiny_tokenizer
import methods
from methods import ara
from methods import base
from methods import closed_form
from plumbing.loading import find_linears, weight_matrix


# ----------------------------------------------------------------------------- whitening and factors on disk

@pytest.fixture(scope="module")
def oracle_gram(run_dir, tiny_dir):
    """The reference for whiten/ and decompose/: the whole-model Gram of tests/oracle.py over whiten/'s own
    calibration windows, from a fresh float32 load of the model. (whiten manifest, linears, groups, G)."""
    from transformers import AutoModelForCausalLM
    whiten = json.load(open(f"{run_dir}/whiten/manifest.json"))
    ids = load_file(f"{run_dir}/whiten/calib_ids.safetensors")["ids"]
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    linears = find_linears(model)
    groups = oracle.share_groups(model, linears, ids[:1])
    return whiten, linears, groups, oracle.accumulate_gram(model, linears, groups, ids, 4, "cpu")


@pytest.fixture(scope="module")
def compressed_06(run_dir):
    """learn_masks.py (uniform, 60% kept) and truncate.py once for this module's tests of the saved model
    (the tests between its users leave run_dir alone). Returns the compressed folder."""
    assert run_inprocess("learn_masks.py", "--keep", 0.6, "--run_dir", run_dir)[0] == 0
    assert run_inprocess("truncate.py", "--run_dir", run_dir)[0] == 0
    return f"{run_dir}/compressed"


def test_factors_on_disk_are_the_whitened_svd_of_an_independent_gram(run_dir, oracle_gram):
    """decompose/'s files (the triangular-solve path the pipeline uses, through whiten/'s shards) against
    the whole-model Gram of tests/oracle.py, torch's own Cholesky and SVD: sigma = svdvals(W S), U has
    orthonormal columns, (V^T S^-1) S has orthonormal rows, and the whitened loss of rank k is the dropped
    sigma^2 (SVD-LLM Thm. 3.2). Catches a wrong Gram (scaling, grouping), a wrong solve side (S^-1 V^T),
    a transposed factor, sigma out of order."""
    whiten, linears, groups, G = oracle_gram
    decomp = json.load(open(f"{run_dir}/decompose/manifest.json"))
    checked = 0
    for name, v in decomp["layers"].items():
        if groups[name] in whiten["fixes"]:
            continue  # a jittered group: its S is not chol(G)
        f = load_file(f"{run_dir}/decompose/{decomp['shards'][name]}")
        U, sigma, VtSinv = f[f"{name}.U"].double(), f[f"{name}.sigma"].double(), f[f"{name}.VtSinv"].double()
        W = weight_matrix(linears[name]).detach().double()
        S = torch.linalg.cholesky(G[groups[name]])
        ref = torch.linalg.svdvals(W @ S)
        torch.testing.assert_close(sigma, ref, rtol=1e-5, atol=1e-7)
        k_max = v["k_max"]
        torch.testing.assert_close(U.T @ U, torch.eye(k_max, dtype=torch.float64), rtol=0, atol=1e-5)
        Vt = VtSinv @ S
        torch.testing.assert_close(Vt @ Vt.T, torch.eye(k_max, dtype=torch.float64), rtol=0, atol=1e-4)
        for k in (1, k_max // 2, k_max):
            loss = ((W - U[:, :k] * sigma[:k] @ VtSinv[:k]) @ S).pow(2).sum()
            torch.testing.assert_close(loss, ref[k:].pow(2).sum(), rtol=1e-3, atol=1e-6 * ref.pow(2).sum().item())
        checked += 1
    assert checked >= len(decomp["layers"]) // 2


def jacobi_singular_values(A):
    """One-sided Jacobi (Hestenes) in float64: rotate column pairs of A until they are orthogonal; the column
    norms are then the singular values. Independent of LAPACK's gesdd / gesvd, and accurate to ~eps relative."""
    A = A.clone().double()
    if A.shape[0] < A.shape[1]:
        A = A.T.clone()  # same singular values
    n = A.shape[1]
    for _ in range(30):
        rotated = False
        for p in range(n - 1):
            for q in range(p + 1, n):
                a, b, g = A[:, p] @ A[:, p], A[:, q] @ A[:, q], A[:, p] @ A[:, q]
                if abs(g) <= 1e-15 * math.sqrt(a * b):
                    continue
                rotated = True
                zeta = (b - a) / (2 * g)
                t = math.copysign(1.0, zeta) / (abs(zeta) + math.sqrt(1 + zeta * zeta))
                c = 1 / math.sqrt(1 + t * t)
                ap, aq = A[:, p].clone(), A[:, q].clone()
                A[:, p], A[:, q] = c * ap - c * t * aq, c * t * ap + c * aq
        if not rotated:
            break
    return A.norm(dim=0).sort(descending=True).values


@pytest.mark.parametrize("m, n", [(24, 40), (40, 24)])  # both sides of the 7B shapes (4096 x 11008, 11008 x 4096)
def test_the_production_svd_path_equals_a_jacobi_reference_to_1e_10(m, n):
    """decompose.whitened_svd with a Cholesky S (the pipeline's triangular-solve path, torch's float64 gesdd)
    against one-sided Jacobi on W S: every sigma to 1e-10 relative to sigma_1 (gesdd, the faster driver:
    bench/svd.py), and W = U diag(sigma) V^T S^-1 to 1e-10. Catches a float32 SVD (~1e-6),
    an eigh of W S (W S)^T (small sigmas lose half their digits), a solve against S^T."""
    import decompose
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4 * n, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    X[:, -3:] *= 1e-3  # nearly dead input directions, as real activations have
    S = torch.linalg.cholesky(X.T @ X)
    Q1, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64))
    Q2, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64))
    W = Q1 * torch.logspace(0, -9, min(m, n), dtype=torch.float64) @ Q2.T  # a spectrum over 9 decades
    U, sigma, VtSinv = decompose.whitened_svd(W, S)
    ref = jacobi_singular_values(W @ S)
    assert (sigma - ref).abs().max() <= 1e-10 * ref[0]
    assert (U * sigma @ VtSinv - W).abs().max() <= 1e-10 * W.abs().max()


def test_truncated_layers_are_the_oracle_whitened_truncation(compressed_06, oracle_gram):
    """The whole factor path at a rank below full (whiten/ -> decompose/ -> learn_masks -> truncate.py's saved
    model): every low-rank layer's A B equals W_k = U_k Sigma_k V_k^T S^-1 rebuilt from the oracle Gram with
    torch's Cholesky and SVD (the product is free of the components' signs). Catches truncate keeping the
    last k components, sigma folded twice or not at all, A and B from different layers, the ranks of
    ranks.json not the ones applied."""
    from truncate import load_compressed
    whiten, linears, groups, G = oracle_gram
    model, _ = load_compressed(compressed_06)
    ranks = json.load(open(f"{compressed_06}/ranks.json"))["layers"]
    mods, checked = dict(model.named_modules()), 0
    for name, k in ranks.items():
        if k == "dense" or groups[name] in whiten["fixes"]:
            continue
        W = weight_matrix(linears[name]).detach().double()
        S = torch.linalg.cholesky(G[groups[name]])
        U, sig, Vt = torch.linalg.svd(W @ S, full_matrices=False)
        W_k = (U[:, :k] * sig[:k]) @ torch.linalg.solve(S.T, Vt[:k].T).T  # V_k^T S^-1
        AB = mods[name].A.detach().double() @ mods[name].B.detach().double()
        assert AB.shape == W.shape
        assert (AB - W_k).norm() <= 1e-4 * W_k.norm(), name
        checked += 1
    assert checked >= len(ranks) // 2


# ----------------------------------------------------------------------------- budget and allocations

def test_uniform_ranks_by_hand():
    """k = floor(rho m n / (m + n)), then the leftover budget handed out one rank per layer per pass:
    a (100, 100) at 0.5 -> 25, b (300, 100) -> floor(37.5) = 37; cost 5000 + 14800, 200 left -> a 26.
    Catches ceil for floor, (m + n) / (m n) for its inverse, a fill that overshoots."""
    assert base.uniform_ranks({"a": (100, 100), "b": (300, 100)}, 0.5) == {"a": 26, "b": 37}
    assert base.rank_or_dense(0.995, 160, 64) == 44  # k(0.995) = 45 = k*: dense would cost 10240 > 10189
    assert base.rank_or_dense(1.0, 160, 64) == "dense"


def test_uniform_is_svdllms_own_rounding_on_real_shapes(run_dir):
    """--method uniform is SVD-LLM's rule as its authors' code rounds it, num_s_after_trunc = int(m n ratio / (m + n))
    per layer with no leftover handed out: on SmolLM2-135M's and LLaMA-7B's shapes at 80 / 60 / 40 / 20% kept, the
    ranks below were worked out by hand from that expression (e.g. 4096 x 4096 at 0.8: 1638.4 -> 1638; 192 x 576
    at 0.8: 115.2 -> 115). --uniform_fill hands the leftover out, never past the budget. Catches the fill on by
    default, a ceil or a round for the authors' truncation, the ratio read as removed."""
    shapes = {"q": (576, 576), "k": (192, 576), "up": (1536, 576), "down": (576, 1536), "q7": (4096, 4096),
              "up7": (11008, 4096), "down7": (4096, 11008)}
    by_hand = {0.8: [230, 115, 335, 335, 1638, 2388, 2388], 0.6: [172, 86, 251, 251, 1228, 1791, 1791],
               0.4: [115, 57, 167, 167, 819, 1194, 1194], 0.2: [57, 28, 83, 83, 409, 597, 597]}
    for rho, want in by_hand.items():
        got, _, _ = closed_form.allocate_uniform(shapes, rho, {})
        assert list(got.values()) == want, rho
        filled, _, _ = closed_form.allocate_uniform(shapes, rho, {}, uniform_fill=True)
        assert all(filled[k] >= got[k] for k in shapes) and base.kept_fraction(filled, shapes) <= rho + 1e-12
    stage("learn_masks.py", "--keep", 0.8, "--run_dir", run_dir)  # the command line: the authors' rule by default
    alloc = json.load(open(f"{run_dir}/allocation/ranks.json"))
    assert alloc["layers"] == closed_form.allocate_uniform({k: tuple(v) for k, v in alloc["shapes"].items()}, 0.8, {})[0]


def test_strs_cut_search_on_a_hand_made_table():
    """ASVD's STRS on two (100, 100) layers, q in {0.1, 0.5, 0.9} (ranks 5, 25, 45), budget 0.35 (7000):
    triples by ppl  b.9 10.0, a.9 10.1, b.5 10.2, b.1 10.4, a.5 10.5, a.1 20.0; the first cut that fits is
    5 (a 25 + b 5 = 6000), then 1000 left, five components by largest remainder against the ranks scaled by
    7000 / 6000 (a 29.17, b 5.83): a 26, 27, 28, 29 (remainder 0.17), then b 6 (0.83). Catches sorting the wrong
    way (the robust layer kept, the sensitive one cut), the largest q below the cut instead of the smallest,
    a cut one too far or too short, a leftover handed out in dictionary order."""
    from methods.strs import strs_search
    table = {("a", 0.9): 10.1, ("a", 0.5): 10.5, ("a", 0.1): 20.0,
             ("b", 0.9): 10.0, ("b", 0.5): 10.2, ("b", 0.1): 10.4}
    shapes = {"a": (100, 100), "b": (100, 100)}
    assert strs_search(table, shapes, 0.35, [0.1, 0.5, 0.9]) == {"a": 29, "b": 6}


def test_parameter_counts_are_exact(compressed_06):
    """The compressed model's parameter count against the config, by hand: a tiny Llama (untied head)
    has V h (embeddings) + V h (head) + h (final norm) + per block 2 h (norms) + the linears, and each
    low-rank layer replaces m n by k (m + n). Catches a tied tensor counted twice, a bias dropped, a
    factor of the wrong size, the manifest's count drifting from the model's."""
    from truncate import load_compressed
    cfg = json.load(open(f"{compressed_06}/config.json"))
    h, V, L, I = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    shapes = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
              "gate_proj": (I, h), "up_proj": (I, h), "down_proj": (h, I)}
    original = 2 * V * h + h + L * (2 * h + sum(m * n for m, n in shapes.values()))
    ranks = json.load(open(f"{compressed_06}/ranks.json"))["layers"]
    saved = sum(m * n - ranks[name] * (m + n) for name in ranks if ranks[name] != "dense"
                for kind, (m, n) in shapes.items() if name.endswith(kind))
    man = json.load(open(f"{compressed_06}/manifest.json"))
    assert man["params_original"] == original and man["params_compressed"] == original - saved
    model, _ = load_compressed(compressed_06)
    assert sum(p.numel() for p in model.parameters()) == original - saved


# ----------------------------------------------------------------------------- the gates' expectations

def gate_args(**kw):
    return argparse.Namespace(**{"init": "uniform", "tau": 0.4, "beta_end": 2 / 3, **kw})


@pytest.mark.parametrize("method,beta_end", [("sigmoid", 2 / 3), ("hardconcrete", 2 / 3), ("hardconcrete", 0.05),
                                             ("ara", 2 / 3)])
def test_k_hat_is_the_expected_number_kept(method, beta_end):
    """k_hat (what the budget term trains) against a Monte-Carlo estimate of the number of components the
    sampled mask keeps (nonzero), on gates with random parameters; hard-concrete also at the last step of
    an anneal to beta 0.05 (its shift moves with beta_t). Catches P(keep) = sigmoid(z / tau) for sigmoid, a
    sign or a missing shift in hard-concrete's L0 term (or a shift left at beta = 2/3 while the samples use
    beta_t), ARA's count off by the rounding."""
    torch.manual_seed(0)
    args = gate_args(beta_end=beta_end, steps=50)
    hyper = {"beta_end": beta_end} if method == "hardconcrete" else {}
    gate = methods.GATES[method](40, 20, torch.linspace(2, 0.1, 40), **hyper)
    with torch.no_grad():
        for p in gate.parameters():
            p.add_(torch.randn_like(p) * 2)
    gate.at_step(49, args.steps)  # hard-concrete: beta_t = beta_end (a no-op for the others and at 2/3)
    gen = torch.Generator().manual_seed(1)
    counts = torch.stack([(gate.mask(gen).detach() > 0).float().sum() for _ in range(4000)])
    k_hat = float(gate.k_hat())
    if method == "ara":  # a deterministic staircase: round(k_max rho) components
        assert counts.std() == 0 and abs(counts[0].item() - k_hat) <= 0.5
    elif method == "hardconcrete" and beta_end == 2 / 3:  # Louizos' fixed beta: the export's count, the live
        test_time = torch.sigmoid(gate.log_alpha) * 1.2 - 0.1  # test-time gates (Eq. 13) computed here by hand
        assert k_hat == int((test_time > 0).sum())
    else:
        assert abs(counts.mean().item() - k_hat) < 4 * counts.std().item() / math.sqrt(len(counts)) + 1e-3


@pytest.mark.parametrize("k0", [1, 2, 13, 37, 60])
def test_ara_init_expected_rho_is_the_uniform_rank(k0):
    """ARA's two-level init: E[rho] = sum_j pi_j c_j = k0 / k_max exactly (the paper's uniform start), by
    the closed form sum over the simplex; below the eps floor's own mean (eps / 2 = 0.025 of k_max: k0 = 1
    of 64) it is that floor. Catches a j0 off by one, the eps floor left out of the mean."""
    gate = ara.AraGate(64, k0, torch.ones(64))
    pi = torch.softmax(gate.p.detach().double(), 0)
    c = 1 - torch.arange(101, dtype=torch.float64) / 100
    assert abs(float((pi * c).sum()) - max(k0 / 64, 0.05 * 0.5)) < 1e-6


def test_guidance_grid_and_its_lookup_on_a_decaying_spectrum():
    """b(r) = sqrt(sum_{i >= k(r)} sigma_i^2 / sum_i sigma_i^2), k(r) = floor(r m n / (m + n)) (ARA Eq. 9), by
    hand with Python floats on sigma_i = 0.7^i, (m, n) = (30, 20): k(r) = floor(12 r); the loss is active
    where r > 1 - b(r) (r read down to the grid), weighted 1 - r. Catches k(r) from the wrong shape term,
    the head instead of the tail, sigma for sigma^2, the lookup on the wrong side of a grid point."""
    sigma = torch.tensor([0.7 ** i for i in range(20)], dtype=torch.float64)
    grid = base.guidance_grid(sigma, 30, 20)
    s2 = [0.7 ** (2 * i) for i in range(20)]

    def b(r):
        k = math.floor(r * 600 / 50 + 1e-9)
        return math.sqrt(sum(s2[k:]) / sum(s2))
    for j in (0, 10, 25, 50, 83, 100):
        assert abs(grid[j].item() - b(j / 100)) < 1e-6, j
    r = torch.tensor([0.537, 0.2, 0.999, 1.0])
    loss = base.guidance_loss(r, grid[None].expand(4, -1))
    by_hand = sum((1 - x) * (x < 1 and x > 1 - b(math.floor(x * 100) / 100)) for x in r.tolist()) / 4
    assert abs(loss.item() - by_hand) < 1e-6 and by_hand > 0


# ----------------------------------------------------------------------------- the loss terms the learners train on

def softmax_py(row):
    z = [math.exp(v - max(row)) for v in row]
    return [v / sum(z) for v in z]


def test_task_losses_by_hand():
    """learn_masks.task_loss on (1, 3, 4) logits, by hand with Python floats: kl = (1/3) sum_t sum_v p_t,v
    (log p_t,v - log q_t,v) (teacher p, student q, per token); ce = -(1/2) sum_t log q_t,x_{t+1} (the next
    token, the last position predicts nothing); hidden_mse = the mean squared difference of the chosen
    hidden states, averaged over the layers chosen. Catches KL's direction swapped, a mean over the
    vocabulary, the shift off by one, a sum over layers."""
    from types import SimpleNamespace
    g = torch.Generator().manual_seed(0)
    s_logits, t_logits = torch.randn(1, 3, 4, generator=g), torch.randn(1, 3, 4, generator=g)
    x = torch.tensor([[2, 0, 3]])
    hs = [torch.randn(1, 3, 2, generator=g) for _ in range(3)]
    ht = [torch.randn(1, 3, 2, generator=g) for _ in range(3)]
    student = SimpleNamespace(logits=s_logits, hidden_states=hs)
    teacher = SimpleNamespace(logits=t_logits, hidden_states=ht)
    kl = 0.0
    for t in range(3):
        p, q = softmax_py(t_logits[0, t].tolist()), softmax_py(s_logits[0, t].tolist())
        kl += sum(pv * (math.log(pv) - math.log(qv)) for pv, qv in zip(p, q)) / 3
    ce = -sum(math.log(softmax_py(s_logits[0, t].tolist())[x[0, t + 1]]) for t in range(2)) / 2
    mse = lambda a, b: sum((u - v) ** 2 for u, v in zip(a.flatten().tolist(), b.flatten().tolist())) / a.numel()
    assert abs(learn_masks.task_loss("kl", student, teacher, x, [-1]).item() - kl) < 1e-6
    assert abs(learn_masks.task_loss("ce", student, None, x, [-1]).item() - ce) < 1e-6
    by_hand = (mse(hs[-1], ht[-1]) + mse(hs[0], ht[0])) / 2
    assert abs(learn_masks.task_loss("hidden_mse", student, teacher, x, [-1, 0]).item() - by_hand) < 1e-6


def test_budget_and_sparsity_terms_by_hand():
    """ARA's budget term alpha (rho_hat - rho)^2 with rho_hat = sum_l min(r_l, 1) m_l n_l / sum m n, and SoCo's
    sparsity (sparsity / L) sum_l mean_i max(theta_l,i, 0), by hand on two layers. Catches rho_hat weighted by
    layer count instead of size, an unclamped dense layer, the square missing, a sum where a mean belongs,
    negative scores pulled further down."""
    from types import SimpleNamespace
    r, mn = torch.tensor([0.5, 1.25]), torch.tensor([1000.0, 3000.0])
    rho_hat = base.rho_hat_of(r, mn)
    assert abs(rho_hat.item() - (0.5 * 1000 + 1.0 * 3000) / 4000) < 1e-7
    from methods.soco import SocoGate
    gates = [SocoGate(3, 3, torch.ones(3), sparsity=3.0), SocoGate(2, 2, torch.ones(2), sparsity=3.0)]
    with torch.no_grad():
        gates[0].theta.copy_(torch.tensor([1.5, -0.5, 0.25]))
        gates[1].theta.copy_(torch.tensor([0.5, 0.0]))
    terms = learn_masks.loss_terms({"budget": True, "sparsity": True}, r, rho_hat, 0.6, 40.0, 0.0,
                                   torch.zeros(2, 101), gates)
    assert abs(terms["budget"].item() - 40.0 * (0.875 - 0.6) ** 2) < 1e-5
    assert abs(terms["sparsity"].item() - 3.0 * ((1.5 + 0 + 0.25) / 3 + (0.5 + 0.0) / 2) / 2) < 1e-6
    assert terms["guid"].item() == 0.0


def test_the_local_continuation_task_is_built_from_its_text():
    """Each local_continuation item against the text it came from: the context and its true continuation
    (choices[label]) are consecutive in the held-out text, every distractor is a piece of that text too, four
    choices, labels not all equal. Catches a label pointing at a distractor, a continuation not following its
    context, a shuffled choice list that loses the true one."""
    from conftest import news_docs, tiny_tokenizer
    from evaluation.tasks import continuation_items
    tok = tiny_tokenizer()
    text = "\n\n".join(news_docs()[:40])
    stream = torch.tensor(tok(text).input_ids)
    items = continuation_items(stream, tok, 20, seed=0)
    whole = tok.decode(stream)
    for it in items:
        assert len(it["choices"]) == 4 and (it["context"] + it["choices"][it["label"]]) in whole
        assert all(c in whole for c in it["choices"])
    assert len({it["label"] for it in items}) > 1


# ----------------------------------------------------------------------------- evaluation

def test_perplexity_is_exp_of_the_mean_token_nll_by_hand():
    """exp(sum of -log p(x_{t+1} | x_<=t) / number of predicted tokens), by an explicit float64 loop over
    windows and positions; 3 windows in batches of 2, so a mean of batch means differs. Catches the
    shift off by one, the mean over batches instead of tokens, the first token counted."""
    model = tiny_model("llama")
    windows = torch.randint(0, 320, (3, 17), generator=torch.Generator().manual_seed(0))
    windows[2] = windows[2].flip(0)
    ppl = evaluate.perplexity(model, windows, 2, torch.device("cpu"), "test")
    with torch.no_grad():
        logits = model(windows).logits.double()
    nll, count = 0.0, 0
    for b in range(3):
        for t in range(16):
            row = logits[b, t]
            nll -= (row[windows[b, t + 1]] - torch.logsumexp(row, 0)).item()
            count += 1
    assert abs(ppl - math.exp(nll / count)) < 1e-5 * ppl


def test_zero_shot_accuracy_equals_a_hand_count(tmp_path):
    """lm-eval's acc on a local multiple-choice task against a hand count: each choice's log-likelihood is
    the sum of log p over its tokens after the context (continuation tokens = tokens of context + choice
    past those of the context, as the harness splits them), the prediction its argmax. The labels are set
    so the hand count is 3 of 6 right. Catches a label off by one, choices read in another order, the
    continuation scored from the wrong position."""
    tok, model = tiny_tokenizer(), tiny_model("llama")
    contexts = ["The minister said", "Police in Sydney", "The market fell", "Rain is expected",
                "The team won", "Officials confirmed"]
    choices = [" the talks", " the fire", " on Monday"]

    def loglik(ctx, cont):
        whole, head = tok(ctx + cont)["input_ids"], tok(ctx)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
        return sum(lp[t - 1, whole[t]].item() for t in range(len(head), len(whole)))
    best = [max(range(3), key=lambda j: loglik(c, choices[j])) for c in contexts]
    labels = [p if i % 2 == 0 else (p + 1) % 3 for i, p in enumerate(best)]  # right on items 0, 2, 4
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps({"context": c, "choices": choices, "label": y}) + "\n"
                            for c, y in zip(contexts, labels)))
    args = argparse.Namespace(run_dir=str(tmp_path / "run"), task_items=1)
    tasks, manager, _ = prepare_tasks([f"local:{path}"], None, tok, args.run_dir, args.task_items)
    acc = zero_shot(model, tok, tasks, manager, 2)[tasks[0]]["acc"]
    assert acc == pytest.approx(3 / 6)


def test_block_streamed_whitening_on_disk_equals_the_whole_model_gram(run_dir, oracle_gram):
    """whiten.py's shards (block by block, packed) expanded back to S S^T, against the whole-model Gram of
    tests/oracle.py on the same calibration windows (the artifacts test_scale's in-memory check does not
    read). Catches a shard holding the wrong block's factor, the packing or its expansion, T miscounted."""
    from whiten import expand_factor
    whiten, _, groups, G = oracle_gram
    assert groups == whiten["groups"]
    for leader in set(groups.values()):
        S_packed = load_file(os.path.join(run_dir, "whiten", whiten["shards"][leader]))[f"{leader}.S"]
        S, _ = expand_factor(S_packed, G[leader].shape[0], whiten["whitening"])
        jitter = whiten["fixes"].get(leader, {}).get("jitter", 0.0)
        ref = G[leader] + jitter * torch.eye(len(G[leader]), dtype=torch.float64)
        torch.testing.assert_close(S.double() @ S.double().T, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


# ----------------------------------------------------------------------------- closed forms, finalisation, folding

def test_energy_allocation_is_optimal_for_its_own_cost_by_brute_force():
    """Everett's theorem for the Lagrangian of docs/METHODS.md §3.6: the allocation chosen at any price lambda
    minimises sum_l e_l over every allocation that costs no more. Checked against ALL 4 x 4 x 5 x 3 = 240
    allocations of four small layers, e_l(k) = (sum_{i >= k} sigma_i^2 / sum_i sigma_i^2)^p written here with
    Python floats, dense costing m n and losing nothing. Catches the tail read at k - 1 or k + 1, the head
    for the tail, the argmax for the argmin, a dense option priced below m n."""
    import itertools
    from methods.closed_form import lagrangian_ranks
    shapes = {"a": (8, 8), "b": (12, 6), "c": (10, 10), "d": (6, 10)}  # k* = 4, 4, 5, 3
    decay = {"a": 0.5, "b": 0.9, "c": 0.75, "d": 0.3}
    for p in (1.0, 2.0):
        sig = {k: [decay[k] ** i for i in range(min(shapes[k]))] for k in shapes}
        def e(name, k):  # the relative whitened loss of rank k, or dense
            if k == "dense":
                return 0.0
            s2 = [x * x for x in sig[name]]
            return (sum(s2[k:]) / sum(s2)) ** p
        tails = {k: base.tail_energy(torch.tensor(sig[k], dtype=torch.float64)) for k in shapes}
        tails = {k: (t / t[0]) ** p for k, t in tails.items()}
        options = {k: list(range(1, base.k_star(m, n))) + ["dense"] for k, (m, n) in shapes.items()}
        every = [dict(zip(shapes, c)) for c in itertools.product(*options.values())]
        for rho in (0.3, 0.5, 0.7):
            limit = rho * sum(m * n for m, n in shapes.values())
            got = lagrangian_ranks(tails, shapes, limit)
            cost = base.total_cost(got, shapes)
            assert cost <= limit
            loss = sum(e(k, r) for k, r in got.items())
            best = min(sum(e(k, r) for k, r in a.items()) for a in every if base.total_cost(a, shapes) <= cost)
            assert loss <= best + 1e-12, (p, rho, got)


def test_svdllm2_two_weight_types_by_hand():
    """SVD-LLM V2 Alg. 1 per weight type, by hand with Python floats: two q_proj (16, 16) and two up_proj
    (24, 16) at R = 0.6 over T = 10^4 tokens. Per type, L_i = sqrt(T sum_{j > k} sigma_j^2) at the uniform
    rank k = floor(0.6 m n / (m + n)), s_i = 1 / ln L_i, removed_i = 2 (1 - R) s_i / sum s; a third type
    whose L_min <= 1 keeps R. Catches types pooled together, the rank from the wrong shape, the ratio applied
    as kept instead of removed, a group with L <= 1 given the paper's formula (the base of the log cancels in
    s_i / sum s, so it is not tested)."""
    T, R = 10 ** 4, 0.6
    decay = {"model.layers.0.self_attn.q_proj": 0.8, "model.layers.1.self_attn.q_proj": 0.6,
             "model.layers.0.mlp.up_proj": 0.9, "model.layers.1.mlp.up_proj": 0.7,
             "model.layers.0.mlp.down_proj": 0.5, "model.layers.1.mlp.down_proj": 0.4}
    shapes = {k: ((16, 16) if "q_proj" in k else (24, 16) if "up_proj" in k else (16, 24)) for k in decay}
    scale = {k: (1e-4 if "down_proj" in k else 1.0) for k in decay}  # down_proj: L_min <= 1
    sig = {k: [scale[k] * decay[k] ** i for i in range(16)] for k in decay}
    _, _, rec = closed_form.allocate_svdllm2(
        shapes, R, {"sigmas": {k: torch.tensor(v, dtype=torch.float64) for k, v in sig.items()}, "tokens": T})
    for kind in ("self_attn.q_proj", "mlp.up_proj"):
        names = [k for k in decay if k.endswith(kind)]
        L = {}
        for k in names:
            m, n = shapes[k]
            r = int(R * m * n // (m + n))
            L[k] = math.sqrt(T * sum(x * x for x in sig[k][r:]))
        s = {k: 1 / math.log(L[k]) for k in names}
        for k in names:
            assert abs(rec["kept_ratio"][k] - (1 - 2 * (1 - R) * s[k] / sum(s.values()))) < 1e-12, k
    assert all(rec["kept_ratio"][k] == R for k in decay if "down_proj" in k)
    assert rec["uniform_groups"] == ["mlp.down_proj"]


def test_finalisation_gives_way_the_least_wanted_dense_layer_by_hand():
    """ARA's finalisation (docs/METHODS.md §3.3) when the layers training left dense cannot all stay dense:
    three (40, 40) layers (k* = 20), a and b dense with k_hat 19 and 18 (r = 0.95, 0.90), c at k_hat 4, budget
    3279 (both dense + c at rank 1 would cost 3280). The less wanted, b, gives way; a stays dense (1600);
    one factor c on b and c: round(18 c) + round(4 c) <= 20 components (1679 left) up to c = 0.9166, so
    b = 16, c = 4, and 79 left is less than one component. With budget 3280 both stay dense and c keeps 1.
    Catches the wrong layer popped (sorted the other way), every dense layer dropped, no give-way at all."""
    shapes = {"a": (40, 40), "b": (40, 40), "c": (40, 40)}
    k_hat = {"a": 19.0, "b": 18.0, "c": 4.0}
    ranks, c = base.ara_ranks(k_hat, shapes, 3279 / 4800, {"a", "b"})
    assert ranks == {"a": "dense", "b": 16, "c": 4} and 0.9 < c < 0.917
    ranks, _ = base.ara_ranks(k_hat, shapes, 3280 / 4800, {"a", "b"})
    assert ranks == {"a": "dense", "b": "dense", "c": 1}


def test_eigh_whitening_is_a_pseudo_inverse_with_the_whitened_loss_of_svd_llm():
    """SVD-LLM V2's eigh whitening on a rank-deficient Gram (16 inputs seen by 8 tokens): S S^T = G, S^-1 is
    the Moore-Penrose pseudo-inverse of S (torch.linalg.pinv: an SVD, not eigh), also after whiten/'s
    float32 round trip (compact / expand), and the factors' whitened loss ||(W - W_k) X||^2 is the dropped
    sigma^2 at every k. Catches 1 / lambda for 1 / sqrt(lambda), the dropped rows left at 1 / sqrt(eps),
    S^-1 transposed, the round trip keeping a rounding-level eigenvalue."""
    from decompose import whitened_svd
    from oracle import whitening_factor
    from whiten import compact_factor, expand_factor
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(16, 8, generator=gen, dtype=torch.float64) * torch.linspace(3, 0.1, 16, dtype=torch.float64)[:, None]
    W = torch.randn(12, 16, generator=gen, dtype=torch.float64)
    G = X @ X.T
    S, S_inv, fix = whitening_factor(G, "eigh")
    assert fix == {"pinv_dropped_eigenvalues": 8}
    torch.testing.assert_close(S @ S.T, G, rtol=0, atol=1e-10 * G.abs().max().item())
    pinv = torch.linalg.pinv(S, rtol=1e-6)
    torch.testing.assert_close(S_inv, pinv, rtol=0, atol=1e-8 * pinv.abs().max().item())
    _, S_inv32 = expand_factor(compact_factor(S, "eigh"), 16, "eigh")
    torch.testing.assert_close(S_inv32, pinv, rtol=0, atol=1e-5 * pinv.abs().max().item())
    U, sigma, VtSinv = whitened_svd(W, S, S_inv)
    for k in range(0, 9):
        loss = ((W - U[:, :k] * sigma[:k] @ VtSinv[:k]) @ X).pow(2).sum()
        torch.testing.assert_close(loss, sigma[k:].pow(2).sum(), rtol=1e-9, atol=1e-9 * sigma.pow(2).sum().item())


def test_folded_factors_are_the_kept_components_times_their_scales():
    """truncate.py's fold of a learned subset with scales (SoCo's s_i, a compensated scale): A B equals
    sum_{i in I} s_i sigma_i u_i (v_i^T S^-1), written here as an explicit loop over the kept components.
    Catches the scale applied twice (on A and B), the index ignored (the prefix kept), sigma left out."""
    from truncate import lowrank_factors
    gen = torch.Generator().manual_seed(0)
    U, VtSinv = torch.randn(9, 6, generator=gen), torch.randn(6, 7, generator=gen)
    sigma = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.1])  # the full spectrum (longer than k_max = 6)
    index, scale = torch.tensor([0, 2, 5]), torch.tensor([1.3, 0.7, 2.0])
    A, B = lowrank_factors(U, sigma, VtSinv, index=index, scale=scale)
    ref = torch.zeros(9, 7, dtype=torch.float64)
    for i, s in zip(index.tolist(), scale.tolist()):
        ref += s * sigma[i].item() * torch.outer(U[:, i].double(), VtSinv[i].double())
    torch.testing.assert_close(A @ B, ref, rtol=1e-12, atol=1e-12)


def test_a_float16_layer_holds_factors_whose_product_fits():
    """lowrank_layer on a float16 weight whose V^T S^-1 has a nearly dead input direction (entries near 1e5, past
    float16's 65504) while U's are below 1: each component's split between A and B is balanced on their largest
    entries, so both fit float16 and A B is the float64 product to float16's precision. Catches the plain sqrt(s)
    split, whose B overflows to inf."""
    from plumbing.modeling_lowrank import lowrank_layer
    g = torch.Generator().manual_seed(0)
    m, n, k = 16, 12, 4
    U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0].float()
    sigma = torch.tensor([2.0, 1.0, 0.5, 0.25], dtype=torch.float64)
    VtSinv = torch.randn(k, n, generator=g)
    VtSinv[:, 0] = 1e5  # input direction 0: nearly dead in the calibration, so S^-1 is huge there
    mod = torch.nn.Linear(n, m, bias=False).half()
    layer = lowrank_layer(mod, {"l.U": U, "l.sigma": sigma, "l.VtSinv": VtSinv}, "l", k)
    assert layer.A.dtype == layer.B.dtype == torch.float16
    assert torch.isfinite(layer.A).all() and torch.isfinite(layer.B).all()
    ref = (U.double() * sigma) @ VtSinv.double()
    assert ((layer.A.double() @ layer.B.double() - ref).norm() / ref.norm()).item() < 1e-2
