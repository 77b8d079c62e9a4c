"""maskkit.optim: optimizers by name and MAE's no-weight-decay groups."""

from __future__ import annotations

import math

import pytest
import torch
import torch_optimizer
from torch import nn

from maskkit.optim import create_optimizer, list_optimizers, no_weight_decay, param_groups, warmup_cosine


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, 4))
        self.pos_embed = nn.Parameter(torch.randn(1, 5, 4))
        self.mask_token = nn.Parameter(torch.randn(1, 1, 4))
        self.fc = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.out = nn.Linear(4, 2)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def ids(params):
    return {id(p) for p in params}


def test_param_groups_split_like_mae():
    model = Toy()
    groups = param_groups(model, weight_decay=0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert ids(groups[0]["params"]) == ids([model.fc.weight, model.out.weight])
    expected_skip = [model.cls_token, model.pos_embed, model.mask_token, model.fc.bias, model.norm.weight,
                     model.norm.bias, model.out.bias]
    assert ids(groups[1]["params"]) == ids(expected_skip)
    # frozen parameters are in neither group
    assert not ids([model.frozen.weight, model.frozen.bias]) & (ids(groups[0]["params"]) | ids(groups[1]["params"]))


def test_no_weight_decay_rule():
    assert no_weight_decay("blocks.0.attn.qkv.bias", torch.zeros(3))
    assert no_weight_decay("encoder.pos_embed", torch.zeros(1, 3, 3))
    assert not no_weight_decay("blocks.0.attn.qkv.weight", torch.zeros(3, 3))


def test_adamw_decays_only_the_decay_group():
    torch.manual_seed(0)
    model = Toy()
    opt = create_optimizer("adamw", model, lr=0.1, weight_decay=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # a zero gradient: AdamW's only change is the decoupled decay
    opt.step()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in ("fc.weight", "out.weight"):
            torch.testing.assert_close(p.detach(), before[name] * (1 - 0.1 * 0.5))
        else:
            torch.testing.assert_close(p.detach(), before[name], rtol=0, atol=0)


def test_optimizers_by_name():
    model = Toy()
    assert isinstance(create_optimizer("AdamW", model, lr=1e-3), torch.optim.AdamW)
    assert isinstance(create_optimizer("sgd", model, lr=1e-3), torch.optim.SGD)
    lars = create_optimizer("lars", model.parameters(), lr=0.1, momentum=0.9)
    assert isinstance(lars, torch_optimizer.LARS) and lars.param_groups[0]["momentum"] == 0.9
    lamb = create_optimizer("lamb", model, lr=1e-3)
    assert isinstance(lamb, torch_optimizer.Lamb) and lamb.param_groups[0]["betas"] == (0.9, 0.95)
    assert {"adamw", "adam", "sgd", "lamb", "lars"} <= set(list_optimizers())


@pytest.mark.parametrize(
    "kwargs, message",
    [({"name": "nadamx", "lr": 1e-3}, "unknown optimizer 'nadamx'"),
     ({"name": "adamw", "lr": 0.0}, "learning rate must be positive"),
     ({"name": "adamw", "lr": 1e-3, "weight_decay": -1.0}, "weight decay must be non-negative"),
     ({"name": "sgd", "lr": 1e-3, "bogus": 1}, "takes no option(s) bogus")],
)
def test_bad_optimizer_arguments(kwargs, message):
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        create_optimizer(name, Toy(), **kwargs)


def test_warmup_cosine_values():
    f = warmup_cosine(total_steps=110, warmup_steps=10, min_factor=0.1)
    assert f(0) == pytest.approx(0.1)  # (0 + 1) / 10
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1)
    assert f(500) == pytest.approx(0.1)
