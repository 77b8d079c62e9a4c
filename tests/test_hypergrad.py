"""Hypergradient checks in float64 on a tiny stand-in MAE: unroll vs finite differences, darts vs unroll."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from maskkit.mae import mae_forward
from maskkit.mlo.darts import darts_masker_grad
from maskkit.mlo.derivative import optimizer_params, update_derivative
from maskkit.mlo.steps import finetune_step, pretrain_step, ridge_step
from maskkit.mlo.unrolled import UnrollWindow
from maskkit.plan import MaskPlan
from maskkit.policies import create_policy
from maskkit.policies.base import MaskPolicy

DT = torch.float64


class Block(nn.Module):
    """Pre-norm transformer block with torch's SDPA (so the unroll must switch to the math kernel)."""

    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a)
        return x + self.mlp(self.norm2(x))


class TinyMAE(nn.Module):
    """A minimal MAE implementing maskkit's MAE protocol (8x8 images, 2x2 patches, 1 channel)."""

    def __init__(self, img: int = 8, patch: int = 2, dim: int = 16, ddim: int = 8) -> None:
        super().__init__()
        self.patch_size, self.in_chans, self.embed_dim, self.norm_pix_loss = patch, 1, dim, False
        self.side = img // patch
        self.num_patches = self.side**2
        pdim = patch * patch
        self.embed = nn.Linear(pdim, dim)
        self.pos_embed = nn.Parameter(0.1 * torch.randn(1, self.num_patches, dim))
        self.cls_token = nn.Parameter(0.1 * torch.randn(1, 1, dim))
        self.block, self.norm = Block(dim), nn.LayerNorm(dim)
        self.decoder_embed = nn.Linear(dim, ddim)
        self.mask_token = nn.Parameter(0.1 * torch.randn(1, 1, ddim))
        self.decoder_pos = nn.Parameter(0.1 * torch.randn(1, self.num_patches, ddim))
        self.decoder_block, self.decoder_pred = Block(ddim), nn.Linear(ddim, pdim)

    def patchify(self, images):
        b, p, s = images.shape[0], self.patch_size, self.side
        x = images.reshape(b, 1, s, p, s, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, s * s, p * p)  # [B, N, P]

    def unpatchify(self, patches):
        b, p, s = patches.shape[0], self.patch_size, self.side
        return patches.reshape(b, s, s, p, p, 1).permute(0, 5, 1, 3, 2, 4).reshape(b, 1, s * p, s * p)

    def patch_tokens(self, images):
        return self.embed(self.patchify(images)) + self.pos_embed  # [B, N, D]

    def _trunk(self, x):
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.norm(self.block(x))

    def encode(self, tokens, plan):
        return self._trunk(plan.gather(tokens))  # [B, 1 + K, D]

    def decode(self, latent, plan):
        x = self.decoder_embed(latent)
        x = plan.fill(x[:, 1:], self.mask_token) + self.decoder_pos  # [B, N, Dd]
        return self.decoder_pred(self.decoder_block(x))  # [B, N, P]

    def features(self, images):
        return self._trunk(self.patch_tokens(images))[:, 0]  # [B, D]

    def cls_attention(self, images):
        raise NotImplementedError


class FixedSelection(MaskPolicy):
    """The learned masker's probabilities as weights, with a selection fixed by the images alone.

    Makes the outer loss a smooth function of the masker's parameters, for finite differences.
    The masker reads a fixed projection of the pixels, not the MAE's tokens: maskkit's maskers
    read the tokens detached, so the (higher-order) path T -> W_k -> tokens -> p for K >= 2 is
    not part of the hypergradient, and this keeps the finite-difference reference free of it.
    """

    learnable = True

    def __init__(self, masker: nn.Module, ratio: float = 0.5) -> None:
        super().__init__(ratio)
        self.masker = masker
        self.register_buffer("proj", torch.randn(4, 16))  # patch pixels [P] -> masker input [D]

    def forward(self, tokens, *, ratio=None, images=None, **context):
        b, n = tokens.shape[:2]
        pixels = images.reshape(b, 1, 4, 2, 4, 2).permute(0, 2, 4, 3, 5, 1).reshape(b, n, 4)  # [B, N, P]
        scores = pixels.sum(-1)  # [B, N], depends on the images only
        return MaskPlan.from_scores(scores, self.resolve_ratio(ratio, n),
                                    weights=self.masker.probabilities(pixels @ self.proj))


def make_problem(opt_name: str, seed: int = 0, k: int = 1):
    """MAE, head, masker, optimizers (state warmed up) and data: the state every method starts from."""
    torch.manual_seed(seed)
    mae = TinyMAE().to(DT)
    head = nn.Linear(16, 3).to(DT)
    learned = create_policy("learned", embed_dim=16, num_patches=16, hidden_dim=4, pos_dim=4, ratio=0.5)
    with torch.no_grad():  # a non-trivial masker (the default init is nearly constant)
        learned.net[-1].weight.normal_(0, 0.5)
        learned.net[-1].bias.fill_(0.3)
    masker = FixedSelection(learned).to(DT)

    def make_opt(params, lr):
        if opt_name == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-3)
        if opt_name == "adam":
            return torch.optim.Adam(params, lr=lr * 0.1, weight_decay=1e-3)
        return torch.optim.AdamW(params, lr=lr * 0.1, betas=(0.9, 0.95), weight_decay=0.05)

    mae_opt, head_opt = make_opt(mae.parameters(), 0.5), make_opt(head.parameters(), 0.5)
    images = [torch.randn(4, 1, 8, 8, dtype=DT) for _ in range(k)]
    train = (torch.randn(5, 1, 8, 8, dtype=DT), torch.randint(0, 3, (5,)))
    val = (torch.randn(6, 1, 8, 8, dtype=DT), torch.randint(0, 3, (6,)))
    for _ in range(2):  # warm up optimizer state (momentum, Adam moments, step counts)
        pretrain_step(mae, masker, mae_opt, torch.randn(4, 1, 8, 8, dtype=DT))
        finetune_step(mae, head, head_opt, train, val, paths=None)
    return dict(mae=mae, head=head, masker=masker, mae_opt=mae_opt, head_opt=head_opt,
                images=images, train=train, val=val)


def outer_loss(p) -> float:
    """Reference: K real pretrain steps, one real head step, validation CE (no maskkit.mlo code)."""
    mae, head, masker, mae_opt, head_opt = p["mae"], p["head"], p["masker"], p["mae_opt"], p["head_opt"]
    for images in p["images"]:
        tokens = mae.patch_tokens(images)
        plan = masker(tokens, images=images).detach()
        loss = mae_forward(mae, images, plan, tokens=tokens).loss
        mae_opt.zero_grad()
        loss.backward()
        mae_opt.step()
    (x_tr, y_tr), (x_va, y_va) = p["train"], p["val"]
    head_opt.zero_grad()
    F.cross_entropy(head(mae.features(x_tr).detach()), y_tr).backward()
    head_opt.step()
    with torch.no_grad():
        return F.cross_entropy(head(mae.features(x_va)), y_va).item()


def fd_directional(problem, directions: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    """Central finite differences of outer_loss along each row of `directions` (masker parameter space)."""
    out = []
    for d in directions:
        vals = []
        for sign in (1, -1):
            q = copy.deepcopy(problem)
            with torch.no_grad():
                offset = 0
                for p in q["masker"].parameters():
                    p.add_(d[offset : offset + p.numel()].view_as(p), alpha=sign * h)
                    offset += p.numel()
            vals.append(outer_loss(q))
        out.append((vals[0] - vals[1]) / (2 * h))
    return torch.tensor(out, dtype=DT)


def random_directions(problem, count: int = 12, seed: int = 0) -> torch.Tensor:
    n = sum(p.numel() for p in problem["masker"].parameters())
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, count, generator=g, dtype=DT))
    return q.T  # [count, n] orthonormal rows


def run_unroll(problem) -> torch.Tensor:
    q = copy.deepcopy(problem)
    window = UnrollWindow(q["mae"], q["masker"], q["mae_opt"])
    for images in q["images"]:
        window.pretrain_step(images)
    grads, _ = window.finish(q["head"], q["head_opt"], q["train"], q["val"])
    return torch.cat([g.reshape(-1) for g in grads]), q


def run_darts(problem, *, scale="optimizer", paths="both", r=0.01, fd="central") -> torch.Tensor:
    q = copy.deepcopy(problem)
    step = pretrain_step(q["mae"], q["masker"], q["mae_opt"], q["images"][0], keep_params=True)
    ft = finetune_step(q["mae"], q["head"], q["head_opt"], q["train"], q["val"],
                       mae_params=optimizer_params(q["mae_opt"]), paths=paths, scale=scale)
    grads = darts_masker_grad(q["mae"], q["masker"], step, ft.vector, q["mae_opt"], scale=scale, r=r, fd=fd)
    return torch.cat([g.reshape(-1) for g in grads]), q


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def cosine(a, b):
    return F.cosine_similarity(a, b, dim=0).item()


@pytest.mark.parametrize("opt_name", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.slow
def test_unroll_matches_finite_differences(opt_name, k):
    problem = make_problem(opt_name, seed=k, k=k)
    exact, _ = run_unroll(problem)
    dirs = random_directions(problem)
    fd = fd_directional(problem, dirs)  # 12 directional derivatives of the whole procedure
    assert fd.norm() > 1e-6  # the downstream signal reaches the masker at all
    assert rel_err(dirs @ exact, fd) < 1e-4


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_unroll_write_back_is_the_real_step(opt_name):
    """After finish(), MAE, head and optimizer states equal those of real (non-differentiable) steps."""
    problem = make_problem(opt_name, seed=5, k=2)
    _, unrolled = run_unroll(problem)
    real = copy.deepcopy(problem)
    outer_loss(real)
    for a, b in zip(unrolled["mae"].parameters(), real["mae"].parameters(), strict=False):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    for a, b in zip(unrolled["head"].parameters(), real["head"].parameters(), strict=False):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    for pa, pb in zip(optimizer_params(unrolled["mae_opt"]), optimizer_params(real["mae_opt"]), strict=False):
        for key, value in real["mae_opt"].state[pb].items():
            torch.testing.assert_close(torch.as_tensor(unrolled["mae_opt"].state[pa][key]).to(DT),
                                       torch.as_tensor(value).to(DT))


def test_darts_matches_unroll_sgd():
    problem = make_problem("sgd", seed=11)
    exact, _ = run_unroll(problem)
    for scale in ("optimizer", "lr"):  # identical for SGD without dampening
        approx, _ = run_darts(problem, scale=scale)
        assert cosine(approx, exact) > 0.9999
        assert rel_err(approx, exact) < 1e-3


def test_darts_error_shrinks_with_r():
    """The only approximation is the central difference: its error falls ~ r^2."""
    problem = make_problem("sgd", seed=12)
    exact, _ = run_unroll(problem)
    err_big = rel_err(run_darts(problem, r=0.1)[0], exact)
    err_small = rel_err(run_darts(problem, r=0.01)[0], exact)
    assert err_small < err_big / 20


def test_darts_forward_difference():
    """fd='forward' (one MAE forward) is first-order accurate: close to unroll, less so than central."""
    problem = make_problem("adamw", seed=16)
    exact, _ = run_unroll(problem)
    forward, _ = run_darts(problem, fd="forward")
    central, _ = run_darts(problem, fd="central")
    assert cosine(forward, exact) > 0.99 and rel_err(forward, exact) < 0.05
    assert rel_err(central, exact) < rel_err(forward, exact) / 10


@pytest.mark.parametrize("opt_name", ["adam", "adamw"])
def test_darts_optimizer_scale_matches_unroll_adam(opt_name):
    problem = make_problem(opt_name, seed=13)
    exact, _ = run_unroll(problem)
    approx, _ = run_darts(problem, scale="optimizer")
    assert cosine(approx, exact) > 0.9999
    assert rel_err(approx, exact) < 1e-3
    betty, _ = run_darts(problem, scale="lr")  # the bare learning rate: far off with Adam
    assert rel_err(betty, exact) > 0.5


def test_darts_direct_path():
    """paths='direct' drops exactly the finetune path: with a frozen head (lr 0) there is no other."""
    problem = make_problem("sgd", seed=14)
    both, _ = run_darts(problem, paths="both")
    direct, _ = run_darts(problem, paths="direct")
    assert rel_err(direct, both) > 1e-2  # with a learning head, the finetune path contributes
    frozen = copy.deepcopy(problem)
    for group in frozen["head_opt"].param_groups:
        group["lr"] = 0.0  # C' = C: only the direct path remains
    exact, _ = run_unroll(frozen)
    direct, _ = run_darts(frozen, paths="direct")
    assert cosine(direct, exact) > 0.9999 and rel_err(direct, exact) < 1e-3


def test_darts_leaves_mae_at_the_stepped_weights():
    problem = make_problem("adamw", seed=15)
    _, q = run_darts(problem)
    real = copy.deepcopy(problem)
    outer_loss(real)
    for a, b in zip(q["mae"].parameters(), real["mae"].parameters(), strict=False):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("opt_name", ["sgd", "nesterov", "adam", "adamw"])
def test_update_derivative_matches_finite_differences(opt_name):
    """D = d(update)/d(grad) of the step just taken, vs re-running torch's own step with perturbed grads."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(50, dtype=DT))
    opt = {
        "sgd": lambda: torch.optim.SGD([w], lr=0.1, momentum=0.9, dampening=0.3),
        "nesterov": lambda: torch.optim.SGD([w], lr=0.1, momentum=0.9, nesterov=True),
        "adam": lambda: torch.optim.Adam([w], lr=0.1, weight_decay=0.1),
        "adamw": lambda: torch.optim.AdamW([w], lr=0.1, weight_decay=0.1),
    }[opt_name]()
    for _ in range(3):
        w.grad = torch.randn(50, dtype=DT)
        opt.step()
    grad = torch.randn(50, dtype=DT)
    w.grad = grad.clone()
    state = copy.deepcopy((w, opt))

    def step_with(delta):
        w2, opt2 = copy.deepcopy(state)
        before = w2.detach().clone()
        w2.grad = grad + delta
        opt2.step()
        return w2.detach() - before

    h = 1e-6
    fd = -(step_with(h) - step_with(-h)) / (2 * h)  # elementwise: the update acts per element
    before = w.detach().clone()
    opt.step()
    d = update_derivative(opt, [w], previous=[before])[0]
    torch.testing.assert_close(d, fd, rtol=1e-6, atol=1e-9)


def test_update_derivative_errors():
    w = nn.Parameter(torch.zeros(3))
    opt = torch.optim.RMSprop([w], lr=0.1)
    w.grad = torch.ones(3)
    opt.step()
    with pytest.raises(ValueError, match="SGD, Adam and AdamW"):
        update_derivative(opt, [w])
    assert torch.equal(update_derivative(opt, [w], scale="lr")[0], torch.full((3,), 0.1))
    with pytest.raises(ValueError, match="scale"):
        update_derivative(opt, [w], scale="bogus")


def test_masker_without_weights_is_refused():
    problem = make_problem("sgd")
    with pytest.raises(ValueError, match="plan.weights"):
        pretrain_step(problem["mae"], create_policy("random"), problem["mae_opt"], problem["images"][0])


def _ridge_reference(feats_tr, y_tr, feats_va, y_va, ridge, classes):
    """The ridge probe in the primal form (D + 1 unknowns), independent of ridge_step's dual form."""
    f_tr = torch.cat([feats_tr, torch.ones(len(feats_tr), 1, dtype=DT)], 1)
    f_va = torch.cat([feats_va, torch.ones(len(feats_va), 1, dtype=DT)], 1)
    t_tr, t_va = F.one_hot(y_tr, classes).to(DT), F.one_hot(y_va, classes).to(DT)
    lam = ridge * (f_tr**2).sum() / len(f_tr)
    w = torch.linalg.solve(f_tr.T @ f_tr + lam * torch.eye(f_tr.shape[1], dtype=DT), f_tr.T @ t_tr)
    return ((f_va @ w - t_va) ** 2).sum(1).mean()


def test_ridge_step_loss_and_vector_against_primal_form_and_finite_differences():
    torch.manual_seed(0)
    mae = TinyMAE().to(DT)
    g = torch.Generator().manual_seed(1)
    x_tr, x_va = torch.randn(12, 1, 8, 8, generator=g, dtype=DT), torch.randn(10, 1, 8, 8, generator=g, dtype=DT)
    y_tr, y_va = torch.randint(0, 3, (12,), generator=g), torch.randint(0, 3, (10,), generator=g)
    ft = ridge_step(mae, (x_tr, y_tr), (x_va, y_va), ridge=0.3, num_classes=3)
    params = list(mae.parameters())

    def outer() -> torch.Tensor:
        with torch.no_grad():
            return _ridge_reference(mae.features(x_tr), y_tr, mae.features(x_va), y_va, 0.3, 3)

    torch.testing.assert_close(ft.val_loss, outer(), rtol=1e-10, atol=0)  # dual form == primal form
    u = [torch.randn(p.shape, generator=g, dtype=DT) for p in params]
    eps = 1e-5
    with torch.no_grad():
        for p, d in zip(params, u, strict=True):
            p.add_(d, alpha=eps)
    plus = outer()
    with torch.no_grad():
        for p, d in zip(params, u, strict=True):
            p.add_(d, alpha=-2 * eps)
    minus = outer()
    with torch.no_grad():
        for p, d in zip(params, u, strict=True):
            p.add_(d, alpha=eps)
    fd = (plus - minus) / (2 * eps)
    exact = sum((v * d).sum() for v, d in zip(ft.vector, u, strict=True))
    assert float(abs(exact - fd) / abs(fd)) < 1e-6, (float(exact), float(fd))
    with pytest.raises(ValueError, match="ridge"):
        ridge_step(mae, (x_tr, y_tr), (x_va, y_va), ridge=0.0)
