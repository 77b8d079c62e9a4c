"""The narrow waist for video and decoder masking: token grids, clip checks and a plan's decoder subset."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from maskkit import MaskPlan, create_policy
from maskkit.mae import check_images, is_video_mae, masked_loss, policy_context, token_grid
from maskkit.plan import PlanError, check_grid, is_space_time


def _plan(batch: int = 2, n: int = 12, ratio: float = 0.5, seed: int = 0) -> MaskPlan:
    return MaskPlan.from_scores(torch.rand(batch, n, generator=torch.Generator().manual_seed(seed)), ratio)


def _hidden_subset(plan: MaskPlan, m: int) -> torch.Tensor:
    """The first m hidden patch indices of every row, ascending (an independent choice from the mask)."""
    rows = [torch.nonzero(row).flatten()[:m] for row in plan.mask]
    return torch.stack(rows)  # [B, M]


def test_without_decoder_ids_the_target_is_the_mask_itself() -> None:
    plan = _plan()
    assert plan.decoder_ids is None and plan.target_mask is plan.mask and plan.num_decoded == plan.num_hidden
    assert torch.equal(plan.loss_weights(), plan.mask)


def test_the_loss_is_taken_over_the_decoder_subset_only() -> None:
    plan = _plan()
    ids = _hidden_subset(plan, 3)
    sub = plan.with_decoder_ids(ids.flip(1))  # given unsorted: stored ascending
    assert torch.equal(sub.decoder_ids, ids)
    per_patch = torch.rand(2, 12, generator=torch.Generator().manual_seed(1))
    expected = sum(float(per_patch[b, i]) for b in range(2) for i in ids[b].tolist()) / 6
    assert masked_loss(per_patch, sub.target_mask, sub.weights).item() == pytest.approx(expected, rel=1e-6)
    assert float(sub.target_mask.sum()) == 6 and bool((sub.target_mask <= sub.mask).all())
    weights = torch.rand(2, 12) + 0.5
    weighted = MaskPlan(**{**sub.__dict__, "weights": weights})
    expected_w = sum(float(per_patch[b, i] * weights[b, i]) for b in range(2) for i in ids[b].tolist()) / 6
    assert masked_loss(per_patch, weighted.target_mask, weighted.weights).item() == pytest.approx(expected_w, rel=1e-6)


def test_decoder_positions_and_scatter_put_predictions_back_in_patch_order() -> None:
    plan = _plan()
    sub = plan.with_decoder_ids(_hidden_subset(plan, 2))
    k, m = sub.num_visible, sub.num_decoded
    positions = sub.decoder_positions  # [B, K + M]
    assert positions.shape == (2, k + m)
    assert torch.equal(positions[:, :k], sub.ids_keep) and torch.equal(positions[:, k:], sub.decoder_ids)
    pred = torch.arange(2 * (k + m) * 3, dtype=torch.float32).reshape(2, k + m, 3)
    full = sub.scatter_decoded(pred)  # [B, N, 3]
    for b in range(2):
        for j, patch in enumerate(positions[b].tolist()):
            assert torch.equal(full[b, patch], pred[b, j])
        untouched = set(range(12)) - set(positions[b].tolist())
        assert all(float(full[b, i].abs().sum()) == 0 for i in untouched)
    only = sub.scatter_decoded(pred[:, k:])  # [B, M, 3]: the reconstructed ones only
    assert torch.equal(only.gather(1, sub.decoder_ids[..., None].expand(-1, -1, 3)), pred[:, k:])
    # without a subset the positions are the shuffled order: restoring it gives patch order
    assert torch.equal(plan.decoder_positions.gather(1, plan.ids_restore), torch.arange(12).expand(2, 12))
    with pytest.raises(ValueError, match=r"pred must be \[B, M, P\]"):
        sub.scatter_decoded(pred[:, :1])


@pytest.mark.parametrize(("make", "words"), [
    (lambda p: torch.stack([torch.nonzero(1 - r).flatten()[:2] for r in p.mask]), "names a visible patch"),
    (lambda p: _hidden_subset(p, 2)[:, [0, 0]], "distinct patch indices"),
    (lambda p: _hidden_subset(p, 2)[:1], "must be [B, M] int64"),
    (lambda p: _hidden_subset(p, 2).float(), "must be [B, M] int64"),
    (lambda p: torch.full((2, 2), 99), "distinct patch indices"),
    (lambda p: torch.zeros(2, 0, dtype=torch.long), "must name 1 to 6"),
])  # fmt: skip
def test_a_bad_decoder_subset_is_refused_in_one_line(make, words: str) -> None:
    plan = _plan()
    with pytest.raises(PlanError) as err:
        plan.with_decoder_ids(make(plan))
    assert words in str(err.value) and "\n" not in str(err.value)
    bad = MaskPlan(**{**plan.__dict__, "decoder_ids": make(plan)})
    with pytest.raises(PlanError, match="decoder_ids"):
        bad.validate()


def test_to_and_replace_carry_the_decoder_subset() -> None:
    plan = _plan()
    sub = plan.with_decoder_ids(_hidden_subset(plan, 2))
    assert torch.equal(sub.to("cpu").decoder_ids, sub.decoder_ids)
    assert torch.equal(sub.detach().decoder_ids, sub.decoder_ids)


@pytest.mark.parametrize(("grid", "n", "words"), [
    ((2, 3), 7, "holds 6 tokens, but there are 7"), ((0, 3), None, "positive integers"), ((2,), None, "(H', W')"),
    ("2x3", None, "(H', W')"), ((2, 3, True), None, "positive integers"), ((1, 2, 3, 4), None, "(T', H', W')"),
])  # fmt: skip
def test_check_grid_refuses_in_one_line(grid, n, words: str) -> None:
    with pytest.raises(ValueError) as err:
        check_grid(grid, n)
    assert words in str(err.value)


def test_grids_and_the_policy_context() -> None:
    assert check_grid([2, 3, 4], 24) == (2, 3, 4) and is_space_time((2, 3, 4)) and not is_space_time((3, 4))
    policy = create_policy("random")
    assert policy.grid_of(16, {}) == (4, 4) and policy.grid_of(24, {"grid": (2, 3, 4)}) == (2, 3, 4)
    with pytest.raises(ValueError, match="not a square grid"):
        policy.grid_of(12, {})
    with pytest.raises(ValueError, match="policy 'random' works on image patch grids only.*2x3x4"):
        policy.refuse_space_time((2, 3, 4))
    policy.refuse_space_time((3, 4))  # an image grid passes
    video = SimpleNamespace(num_patches=24, grid=(2, 3, 4), num_frames=4)
    image = SimpleNamespace(num_patches=12, grid_size=(3, 4))
    odd = SimpleNamespace(num_patches=12)
    assert token_grid(video) == (2, 3, 4) and token_grid(image) == (3, 4) and token_grid(odd) is None
    assert token_grid(SimpleNamespace(num_patches=9)) == (3, 3)
    assert policy_context(video, torch.zeros(1))["grid"] == (2, 3, 4) and "grid" not in policy_context(odd, None)


def _video_mae() -> SimpleNamespace:
    # 8 frames, tubelets of 2, 16x16 pixels in 4x4 patches: 4 x 4 x 4 = 64 tokens
    return SimpleNamespace(in_chans=3, patch_size=4, num_patches=64, num_frames=8, tubelet_size=2, grid=(4, 4, 4))


def test_check_images_takes_clips_for_a_video_mae_and_images_for_an_image_mae() -> None:
    video, image = _video_mae(), SimpleNamespace(in_chans=3, patch_size=4, num_patches=16)
    assert is_video_mae(video) and not is_video_mae(image)
    assert not is_video_mae(SimpleNamespace(num_frames=True))
    check_images(video, torch.zeros(2, 3, 8, 16, 16))
    check_images(image, torch.zeros(2, 3, 16, 16))
    cases = [
        (video, torch.zeros(2, 3, 16, 16), "an image batch given to a video MAE"),
        (image, torch.zeros(2, 3, 8, 16, 16), "a clip batch given to an image MAE"),
        (video, torch.zeros(2, 3, 6, 16, 16), "clips [B, 3, 8, H, W]"),
        (video, torch.zeros(2, 1, 8, 16, 16), "got shape (2, 1, 8, 16, 16)"),
        (video, torch.zeros(2, 3, 8, 16, 12), "(8/2) x (H/4) x (W/4) = 64 tokens"),
        (video, torch.zeros(0, 3, 8, 16, 16), "give at least one clip"),
    ]
    for mae, x, words in cases:
        with pytest.raises(ValueError) as err:
            check_images(mae, x)
        assert words in str(err.value) and "\n" not in str(err.value), str(err.value)
