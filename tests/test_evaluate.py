"""maskkit.evaluate: MAE's linear probe head and protocol, fine-tuning, accuracy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from maskkit.adapters.timm import create_mae
from maskkit.data import Batcher, load_dataset, make_splits
from maskkit.evaluate import (
    LINEAR_EPOCHS,
    MIN_DEFAULT_STEPS,
    LinearProbeHead,
    accuracy,
    default_epochs,
    evaluate_encoder,
    extract_features,
    finetune,
    linear_probe,
)


def test_default_epochs_reach_the_minimum_steps():
    assert default_epochs(90, num_train=1_281_167, batch_size=256) == 90  # ImageNet: MAE's 90
    assert default_epochs(90, num_train=1257, batch_size=256) == 250  # 4 steps per epoch -> 1000 steps


def test_accuracy_counts_argmax_hits():
    logits = torch.tensor([[0.1, 0.9], [2.0, -1.0], [0.0, 1.0], [3.0, 4.0]])
    assert accuracy(logits, torch.tensor([1, 0, 0, 0])) == 0.5


def test_probe_head_is_maes():
    head = LinearProbeHead(16, 3)
    bn, fc = head[0], head[1]
    assert isinstance(bn, nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    assert isinstance(fc, nn.Linear) and float(fc.weight.detach().std()) < 0.05 and torch.all(fc.bias == 0)


def test_linear_probe_separates_separable_features():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 8, generator=gen) * 3
    labels = torch.arange(400) % 4
    feats = centres[labels] + 0.3 * torch.randn(400, 8, generator=gen) + 50.0  # BN removes the offset
    kw = {"epochs": 30, "lr": 0.5, "batch_size": 50, "seed": 0}
    result = linear_probe(feats[:300], labels[:300], feats[300:], labels[300:], 4, **kw)
    assert result.top1 > 0.97 and result.protocol == "linear" and result.num_test == 100
    again = linear_probe(feats[:300], labels[:300], feats[300:], labels[300:], 4, **kw)
    assert again == result  # deterministic
    chance = linear_probe(feats[:300], labels[:300][torch.randperm(300, generator=gen)], feats[300:], labels[300:],
                          4, **kw)
    assert chance.top1 < 0.6  # shuffled labels carry no signal


@pytest.fixture(scope="module")
def small():
    data = load_dataset("digits")
    splits = make_splits(data, seed=0)
    splits = {k: v[::6] for k, v in splits.items()}  # a sixth of each split keeps this fast
    batcher = Batcher(data, [0.3], [0.4], torch.device("cpu"))
    mae = create_mae("pilot", img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=1, num_heads=2,
                     decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, seed=0)
    return mae, batcher, splits


def test_features_are_frozen_cls_embeddings(small):
    mae, batcher, splits = small
    feats = extract_features(mae, batcher.images, splits["test"][:10], batch_size=4)
    with torch.no_grad():
        mae.eval()
        expected = mae.features(batcher.images(splits["test"][:10]))
    torch.testing.assert_close(feats, expected)
    assert not feats.requires_grad


def test_finetune_trains_a_copy(small):
    mae, batcher, splits = small
    before = {k: v.clone() for k, v in mae.state_dict().items()}
    result = finetune(mae, batcher, splits["train"], splits["test"], epochs=40, batch_size=32, lr=1e-2, seed=0)
    assert all(torch.equal(before[k], v) for k, v in mae.state_dict().items())  # the given MAE is untouched
    assert result.protocol == "finetune" and result.num_train == len(splits["train"])
    assert result.train_top1 > 0.5  # it learned: 10 classes, chance 0.1


def test_evaluate_encoder_protocols_and_errors(small):
    mae, batcher, splits = small
    a = evaluate_encoder(mae, batcher, splits, "linear", epochs=5, seed=1)
    b = evaluate_encoder(mae, batcher, splits, "linear", epochs=5, seed=1)
    assert a == b and a.num_test == len(splits["test"])
    on_val = evaluate_encoder(mae, batcher, splits, "linear", epochs=5, seed=1, score_split="val")
    assert on_val.num_test == len(splits["val"]) and on_val.num_train == a.num_train
    with pytest.raises(ValueError, match="score_split"):
        evaluate_encoder(mae, batcher, splits, "linear", score_split="train")
    with pytest.raises(ValueError, match="unknown evaluation protocol"):
        evaluate_encoder(mae, batcher, splits, "knn")
    unlabeled = Batcher(type(batcher.data)("x", batcher.data.images, None), [0.3], [0.4], torch.device("cpu"))
    with pytest.raises(ValueError, match="needs labels"):
        evaluate_encoder(mae, unlabeled, splits)
    np.testing.assert_array_equal(np.intersect1d(splits["train"], splits["test"]), [])


@pytest.mark.parametrize("protocol, epochs", [("linear", 3), ("finetune", 1), ("linear", None)])
def test_progress_callback_counts_every_step_up_to_the_total(small, protocol, epochs):
    mae, batcher, splits = small
    calls: list[tuple[int, int]] = []
    evaluate_encoder(mae, batcher, splits, protocol, epochs=epochs, batch_size=32, seed=0,
                     on_step=lambda step, total: calls.append((step, total)))
    totals = {total for _, total in calls}
    assert len(totals) == 1  # one total, announced from the first call
    total = totals.pop()
    assert [step for step, _ in calls] == list(range(1, total + 1))
    per_epoch = len(splits["train"]) // 32
    if epochs is None:  # the default epochs grow until there are at least MIN_DEFAULT_STEPS steps
        assert total >= MIN_DEFAULT_STEPS and total == default_epochs(LINEAR_EPOCHS, len(splits["train"]), 32) * per_epoch
    else:
        assert total == epochs * per_epoch
