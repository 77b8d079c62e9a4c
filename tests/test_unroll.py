"""Tests for maskkit.mlo.unroll: trajectories equal torch.optim's, hypergradients equal finite differences,
write_back makes the unrolled steps the real ones, refusals, first-order semantics, math SDPA."""

from __future__ import annotations

import higher
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from maskkit.mlo.unroll import (
    DifferentiableAdamW,
    UnrollError,
    check_optimizer,
    math_attention,
    unroll,
)

DT = torch.float64


class TinyMLP(nn.Module):
    """An MLP with a frozen parameter, a parameter left out of the optimizer, and a non-forward method."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.fc2 = nn.Linear(6, 3)
        self.offset = nn.Parameter(torch.randn(4), requires_grad=False)  # fixed, like sin-cos pos_embed
        self.scale = nn.Parameter(torch.tensor(1.3))  # trainable but not given to the optimizer

    def features(self, x: torch.Tensor) -> torch.Tensor:  # [B, 4] -> [B, 6]
        return torch.tanh(self.norm(self.fc1(x + self.offset))) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 4] -> [B, 3]
        return self.fc2(self.features(x))


def make_mlp(seed: int = 0) -> TinyMLP:
    torch.manual_seed(seed)
    return TinyMLP().to(DT)


def tiny_vit(seed: int = 0, dtype: torch.dtype = DT) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=3).to(
        dtype
    )


def param_groups(model: nn.Module, lr2: float) -> list[dict]:
    """MAE-style groups: decay on matrices; no decay (and another lr) on biases and norms."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and n != "scale"]
    decay = [p for n, p in named if p.ndim >= 2]
    no_decay = [p for n, p in named if p.ndim < 2]
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "lr": lr2}]


OPTIMIZERS = {
    "sgd": lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    "sgd_damp": lambda g: torch.optim.SGD(
        g, lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.02, maximize=True
    ),
    "adam": lambda g: torch.optim.Adam(g, lr=0.01, weight_decay=0.1),
    "adam_amsgrad": lambda g: torch.optim.Adam(g, lr=0.01, betas=(0.8, 0.9), amsgrad=True),
    "adamw": lambda g: torch.optim.AdamW(g, lr=0.01, betas=(0.9, 0.95), weight_decay=0.05),
}


def data(seed: int = 1, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def inner_loss(model: nn.Module, x, y, w=None) -> torch.Tensor:
    """Per-sample cross-entropy weighted by w (like a masker's weights), via the non-forward method."""
    per = F.cross_entropy(model.fc2(model.features(x)), y, reduction="none")  # [B]
    return (per if w is None else per * w).mean()


def real_steps(model, opt, batches, w=None) -> None:
    for x, y in batches:
        opt.zero_grad()
        inner_loss(model, x, y, None if w is None else w.detach()).backward()
        opt.step()


def assert_same_state(opt_a, params_a, opt_b, params_b, exact: bool) -> None:
    for pa, pb in zip(params_a, params_b, strict=True):
        sa, sb = opt_a.state.get(pa, {}), opt_b.state.get(pb, {})
        assert sa.keys() == sb.keys()
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and sa[k].device == sb[k].device, k
            if exact:
                assert torch.equal(sa[k], sb[k]), k
            else:
                torch.testing.assert_close(sa[k], sb[k], rtol=1e-12, atol=1e-14)


def twin(name: str, seed: int = 0):
    """Two identical (model, optimizer) pairs."""
    out = []
    for _ in range(2):
        m = make_mlp(seed)
        out.append((m, OPTIMIZERS[name](param_groups(m, lr2=0.03))))
    return out


# ---------------------------------------------------------------- (1) trajectories


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("warm", [False, True])
def test_trajectory_equals_torch(name, K, warm):
    (m_ref, opt_ref), (m, opt) = twin(name)
    warmup = [data(10 + i) for i in range(2)] if warm else []
    real_steps(m_ref, opt_ref, warmup)
    real_steps(m, opt, warmup)
    batches = [data(20 + i) for i in range(K)]
    real_steps(m_ref, opt_ref, batches)
    before = [p.detach().clone() for p in m.parameters()]
    with unroll(m, opt) as u:
        for x, y in batches:
            u.step(inner_loss(u.fmodel, x, y))
        fast = [p.detach() for p in u.params]
        assert u.num_steps == K and len(u.params) == len(before)
    assert all(torch.equal(a, b) for a, b in zip(u.params, fast, strict=True))  # still there after the block
    for f, r in zip(fast, m_ref.parameters(), strict=True):
        assert torch.equal(f, r)  # bit-for-bit on CPU: same ops in the same order as torch.optim
    # Without write_back nothing real changed; frozen and non-optimized params stayed the same tensors.
    for p, b in zip(m.parameters(), before, strict=True):
        assert torch.equal(p, b)
    names = [n for n, _ in m.named_parameters()]
    assert u.params[names.index("offset")] is m.offset
    assert u.params[names.index("scale")] is m.scale


# ---------------------------------------------------------------- (2) hypergradient vs finite differences


def outer_after_unroll(m, opt, w, batches, xv, yv, grad: bool):
    with unroll(m, opt) as u:
        for x, y in batches:
            u.step(inner_loss(u.fmodel, x, y, w))
        outer = F.cross_entropy(u.fmodel(xv), yv)
        if grad:
            (g,) = torch.autograd.grad(outer, w)
            return outer.detach(), g
    return outer.detach(), None


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("K", [1, 3])
def test_hypergradient_matches_finite_differences(name, K):
    m = make_mlp(3)
    opt = OPTIMIZERS[name](param_groups(m, lr2=0.03))
    real_steps(m, opt, [data(30), data(31)])  # realistic: optimizer state already populated
    batches = [data(40 + i) for i in range(K)]
    xv, yv = data(50, n=8)
    w = torch.rand(6, generator=torch.Generator().manual_seed(5), dtype=DT).requires_grad_()
    _, g = outer_after_unroll(m, opt, w, batches, xv, yv, grad=True)
    h, fd = 1e-5, torch.zeros_like(w)
    for j in range(w.numel()):
        e = torch.zeros_like(w)
        e[j] = h
        fp, _ = outer_after_unroll(m, opt, (w + e).detach(), batches, xv, yv, grad=False)
        fm, _ = outer_after_unroll(m, opt, (w - e).detach(), batches, xv, yv, grad=False)
        fd[j] = (fp - fm) / (2 * h)
    assert fd.norm() > 1e-6  # the check is not vacuous
    assert (g - fd).norm() / fd.norm() < 1e-4


# ---------------------------------------------------------------- (3) write_back


@pytest.mark.parametrize("name", ["sgd", "sgd_damp", "adam_amsgrad", "adamw"])
@pytest.mark.parametrize("warm", [False, True])
def test_write_back_makes_unrolled_steps_real(name, warm):
    (m_ref, opt_ref), (m, opt) = twin(name)
    warmup = [data(10)] if warm else []
    real_steps(m_ref, opt_ref, warmup)
    real_steps(m, opt, warmup)
    batches, after = [data(60 + i) for i in range(3)], [data(70), data(71)]
    w = torch.rand(6, dtype=DT, requires_grad=True)
    real_steps(m_ref, opt_ref, batches, w)
    with unroll(m, opt) as u:
        for x, y in batches:
            u.step(inner_loss(u.fmodel, x, y, w))
        torch.autograd.grad(F.cross_entropy(u.fmodel(data(80)[0]), data(80)[1]), w)
        final = [p.detach().clone() for p in u.params]
        u.write_back()
    for p, f, r in zip(m.parameters(), final, m_ref.parameters(), strict=True):
        assert torch.equal(p, f)  # module params are the final fast weights, bit for bit
        assert torch.equal(p, r)
    assert_same_state(opt, list(m.parameters()), opt_ref, list(m_ref.parameters()), exact=True)
    real_steps(m_ref, opt_ref, after)  # training continues with the real optimizer
    real_steps(m, opt, after)
    for p, r in zip(m.parameters(), m_ref.parameters(), strict=True):
        assert torch.equal(p, r)
    assert_same_state(opt, list(m.parameters()), opt_ref, list(m_ref.parameters()), exact=True)


def test_write_back_order_is_enforced():
    m = make_mlp()
    opt = OPTIMIZERS["adamw"](m.parameters())
    x, y = data()
    w = torch.rand(6, dtype=DT, requires_grad=True)
    with unroll(m, opt) as u:
        u.step(inner_loss(u.fmodel, x, y, w))
        outer = F.cross_entropy(u.fmodel(x), y)
        u.write_back()
        with pytest.raises(RuntimeError, match="inplace"):  # stale graph: autograd refuses loudly
            torch.autograd.grad(outer, w)
        with pytest.raises(UnrollError, match="after write_back"):
            u.step(inner_loss(u.fmodel, x, y))
        with pytest.raises(UnrollError, match="twice"):
            u.write_back()


# ---------------------------------------------------------------- (4) refusals


class MySGD(torch.optim.SGD):
    pass


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda p: torch.optim.RMSprop(p), "RMSprop"),
        (lambda p: __import__("torch_optimizer").Lamb(p), "Lamb"),
        (lambda p: MySGD(p, lr=0.1), "MySGD"),
        (lambda p: torch.optim.SGD(p, lr=torch.tensor(0.1, requires_grad=True)), "'lr'"),
        (lambda p: torch.optim.SGD(list(p) + [nn.Parameter(torch.zeros(2))], lr=0.1), "not in the module"),
    ],
)
def test_refusals_name_the_problem(make, needle):
    m = make_mlp()
    opt = make(m.parameters())
    with pytest.raises(UnrollError, match=needle):
        check_optimizer(opt, m)
    with pytest.raises(ValueError, match=needle):  # UnrollError is a ValueError
        with unroll(m, opt):
            pass


def test_bad_loss_is_refused():
    m = make_mlp()
    with unroll(m, torch.optim.SGD(m.parameters(), lr=0.1)) as u:
        with pytest.raises(UnrollError, match="scalar"):
            u.step(u.fmodel(data()[0]))
        with pytest.raises(UnrollError, match="does not depend"):
            u.step(torch.tensor(1.0))


# ---------------------------------------------------------------- (5) Adam(decoupled_weight_decay=True) is AdamW


def test_adam_decoupled_is_adamw():
    batches = [data(90 + i) for i in range(3)]
    results = {}
    for key, make in {
        "torch_adam_decoupled": lambda p: torch.optim.Adam(
            p, lr=0.01, weight_decay=0.2, decoupled_weight_decay=True
        ),
        "torch_adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.2),
        "torch_adam_l2": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.2),
    }.items():
        m = make_mlp()
        real_steps(m, make(m.parameters()), batches)
        results[key] = [p.detach() for p in m.parameters()]
    m = make_mlp()
    opt = torch.optim.Adam(m.parameters(), lr=0.01, weight_decay=0.2, decoupled_weight_decay=True)
    assert check_optimizer(opt) == "adamw"
    with unroll(m, opt) as u:
        for x, y in batches:
            u.step(inner_loss(u.fmodel, x, y))
        fast = [p.detach() for p in u.params]
    for f, a, b in zip(fast, results["torch_adam_decoupled"], results["torch_adamw"], strict=True):
        assert torch.equal(f, a) and torch.equal(a, b)
    assert any(
        not torch.allclose(f, c) for f, c in zip(fast, results["torch_adam_l2"], strict=True)
    )  # L2 would differ
    # higher itself now dispatches AdamW to the registered differentiable AdamW
    assert higher.optim._opt_mapping[torch.optim.AdamW] is DifferentiableAdamW


# ---------------------------------------------------------------- (6) first order


class Quadratic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor([0.5, -1.0, 2.0], dtype=DT))


A = torch.tensor([[2.0, 0.3, 0.0], [0.3, 1.0, -0.2], [0.0, -0.2, 0.5]], dtype=DT)
B = torch.tensor([1.0, -2.0, 0.5], dtype=DT)


def quad_loss(theta, s):  # 0.5 s theta^T A theta: s plays the masker's weight
    return 0.5 * s * theta @ A @ theta


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_first_order_sgd_analytic(first_order, wd):
    lr, K, s = 0.1, 3, torch.tensor(1.5, dtype=DT, requires_grad=True)
    mod = Quadratic()
    with unroll(mod, torch.optim.SGD(mod.parameters(), lr=lr, weight_decay=wd), first_order=first_order) as u:
        for _ in range(K):
            u.step(quad_loss(u.fmodel.theta, s))
        g_theta0, g_s = torch.autograd.grad(B @ u.fmodel.theta, [u.initial_params[0], s], allow_unused=True)
    eye = torch.eye(3, dtype=DT)
    if first_order:  # gradient of the loss is a constant: only the (1 - lr wd) identity path remains
        expected = (1 - lr * wd) ** K * B
        assert g_s is None
    else:  # d theta_K / d theta_0 = (I - lr (s A + wd I))^K
        expected = torch.linalg.matrix_power(eye - lr * (s.detach() * A + wd * eye), K).T @ B
        assert g_s is not None and g_s.abs() > 0
    torch.testing.assert_close(g_theta0, expected, rtol=1e-12, atol=1e-14)


def test_first_order_adamw_analytic():
    lr, wd, K = 0.05, 0.2, 3
    s = torch.tensor(1.5, dtype=DT, requires_grad=True)
    mod = Quadratic()
    with unroll(mod, torch.optim.AdamW(mod.parameters(), lr=lr, weight_decay=wd), first_order=True) as u:
        for _ in range(K):
            u.step(quad_loss(u.fmodel.theta, s))
        (g_theta0,) = torch.autograd.grad(B @ u.fmodel.theta, u.initial_params[0])
    torch.testing.assert_close(g_theta0, (1 - lr * wd) ** K * B, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- (7) math SDPA and a timm ViT


def vit_losses(model, x, y, w):
    per = F.cross_entropy(model.forward_head(model.forward_features(x)), y, reduction="none")  # [B]
    return (per * w).mean()


def test_vit_double_backward_inside_math_region_and_trajectory():
    m, m_ref = tiny_vit(), tiny_vit()
    assert m.blocks[0].attn.fused_attn  # timm uses F.scaled_dot_product_attention
    groups = lambda mod: [  # noqa: E731
        {"params": [p for p in mod.parameters() if p.ndim >= 2 and p.requires_grad]},
        {"params": [p for p in mod.parameters() if p.ndim < 2 and p.requires_grad], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups(m), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.05)
    opt_ref = torch.optim.AdamW(groups(m_ref), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 8, 8, generator=g, dtype=DT), torch.randint(0, 3, (4,), generator=g)
    w = torch.rand(4, generator=g, dtype=DT, requires_grad=True)
    with unroll(m, opt) as u:
        for _ in range(2):
            u.step(vit_losses(u.fmodel, x, y, w))
        (hyper,) = torch.autograd.grad(F.cross_entropy(u.fmodel(x), y), w)  # double backward through SDPA
        u.write_back()
    assert torch.isfinite(hyper).all() and hyper.abs().sum() > 0
    with math_attention():  # the same steps with torch.optim (same attention kernel)
        for _ in range(2):
            opt_ref.zero_grad()
            vit_losses(m_ref, x, y, w.detach()).backward()
            opt_ref.step()
    for p, r in zip(m.parameters(), m_ref.parameters(), strict=True):
        torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-14)
    assert_same_state(opt, list(m.parameters()), opt_ref, list(m_ref.parameters()), exact=False)


def test_vit_fused_attention_outside_has_no_double_backward():
    m = tiny_vit(dtype=torch.float32)
    x = torch.randn(2, 3, 8, 8)
    w = torch.rand(2, requires_grad=True)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)

    def attempt(math_sdpa: bool) -> None:
        with unroll(m, opt, math_sdpa=math_sdpa) as u:
            u.step(vit_losses(u.fmodel, x, torch.tensor([0, 1]), w))
            torch.autograd.grad(u.fmodel(x).sum(), w)

    attempt(True)
    try:
        attempt(False)
    except RuntimeError as err:
        assert "not implemented" in str(err)
    else:
        pytest.skip("this torch has a double backward for the fused SDPA kernel")
    with pytest.raises(RuntimeError, match="not implemented"):  # the math kernel is not left switched on
        attempt(False)


class QuadraticWithDeadParam(Quadratic):
    def __init__(self) -> None:
        super().__init__()
        self.dead = nn.Parameter(torch.ones(2, dtype=DT))  # used, but its gradient is exactly zero


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_zero_gradient_param_gives_finite_hypergradient(amsgrad):
    """sqrt(v) at v = 0 must not turn the hypergradient into NaN (0 * inf)."""
    grads = []
    for cls in (Quadratic, QuadraticWithDeadParam):
        mod = cls()
        s = torch.tensor(1.5, dtype=DT, requires_grad=True)
        with unroll(mod, torch.optim.Adam(mod.parameters(), lr=0.05, amsgrad=amsgrad)) as u:
            for _ in range(2):
                extra = (0.0 * u.fmodel.dead).sum() * s if cls is QuadraticWithDeadParam else 0.0
                u.step(quad_loss(u.fmodel.theta, s) + extra)
            outer = B @ u.fmodel.theta
            if cls is QuadraticWithDeadParam:  # the outer loss reaches the dead param's update
                outer = outer + u.fmodel.dead.sum()
            grads.append(torch.autograd.grad(outer, s)[0])
    assert torch.isfinite(grads[1]) and grads[1] != 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=0)


def test_scheduler_lr_and_grad_callback_are_respected():
    """An LR scheduler stepped between unrolled steps, and a gradient callback, act as in real training."""
    batches = [data(100 + i) for i in range(3)]
    m_ref, m = make_mlp(), make_mlp()
    opt_ref = torch.optim.SGD(param_groups(m_ref, lr2=0.03), lr=0.1, momentum=0.5)
    sched_ref = torch.optim.lr_scheduler.LambdaLR(opt_ref, lambda k: 1.0 / (1 + k))
    for x, y in batches:
        opt_ref.zero_grad()
        inner_loss(m_ref, x, y).backward()
        for p in m_ref.parameters():
            if p.grad is not None:
                p.grad.mul_(0.5)
        opt_ref.step()
        sched_ref.step()
    opt = torch.optim.SGD(param_groups(m, lr2=0.03), lr=0.1, momentum=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + k))
    with unroll(m, opt) as u:
        for x, y in batches:
            u.step(
                inner_loss(u.fmodel, x, y),
                grad_callback=lambda gs: [None if g is None else g * 0.5 for g in gs],
            )
            sched.step()
        u.write_back()
    for p, r in zip(m.parameters(), m_ref.parameters(), strict=True):
        assert torch.equal(p, r)


class DropMLP(TinyMLP):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.features(x)))


def test_repeated_unrolls_follow_module_state_and_release_the_graph():
    """The cached functional copy follows train/eval and new weights, and keeps no fast weights alive."""
    import gc
    import weakref

    torch.manual_seed(0)
    m = DropMLP().to(DT)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x, y = data()
    with unroll(m, opt) as u:
        u.step(inner_loss(u.fmodel, x, y))
        assert u.fmodel.drop.training
        names = [n for n, _ in m.named_parameters()]
        fast = weakref.ref(u.params[names.index("fc1.weight")])  # a non-leaf fast weight (graph holder)
        assert fast().grad_fn is not None
        u.write_back()
    del u
    gc.collect()
    assert fast() is None
    m.eval()
    with unroll(m, opt) as u:
        assert not u.fmodel.drop.training
        assert torch.equal(u.fmodel(x), m(x))  # eval mode (no dropout) and the written-back weights
        with unroll(m, opt) as inner:  # nested unroll of the same module: its own functional copy
            assert inner.fmodel is not u.fmodel
            inner.step(inner_loss(inner.fmodel, x, y))
        u.step(inner_loss(u.fmodel, x, y))
        assert torch.equal(u.fmodel(x), u.fmodel.fc2(u.fmodel.features(x)))
