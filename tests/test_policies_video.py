"""Policies on space-time token grids: tube (against VideoMAE's TubeMaskingGenerator, re-done here), frame,
motion, the decoder rules (VideoMAE V2's running cell, re-done here), and every image policy either working on
N space-time tokens or refusing the grid in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maskkit import MaskPlan, create_policy, list_policies
from maskkit.mae import masked_loss
from maskkit.policies.decoder import apply_decoder_rule, num_decoded, running_cell_hidden
from maskkit.policies.learned import grid_position_code, position_code
from maskkit.positions import sinusoid_table

GRID = (4, 4, 4)  # T' x H' x W' = 64 tokens
N = 64


def tokens(batch: int = 3, n: int = N, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, n, 16, generator=torch.Generator().manual_seed(seed))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def videomae_tube_masks(seed: int, batch: int, grid: tuple[int, int, int], ratio: float) -> np.ndarray:
    """VideoMAE's TubeMaskingGenerator as published: per clip, S - int(ratio S) zeros then the ones, shuffled by
    numpy's stream, tiled over the frames and flattened."""
    np.random.seed(seed)
    frames, space = grid[0], grid[1] * grid[2]
    per_frame = int(ratio * space)
    out = []
    for _ in range(batch):
        mask_per_frame = np.hstack([np.zeros(space - per_frame), np.ones(per_frame)])
        np.random.shuffle(mask_per_frame)
        out.append(np.tile(mask_per_frame, (frames, 1)).flatten())
    return np.stack(out)


@pytest.mark.parametrize(("ratio", "grid"), [(0.9, (8, 14, 14)), (0.75, GRID), (0.5, (2, 3, 5))])
def test_tube_gives_videomaes_masks_for_the_same_numpy_stream(ratio: float, grid: tuple[int, int, int]) -> None:
    n = int(np.prod(grid))
    expected = videomae_tube_masks(7, 2, grid, ratio)
    np.random.seed(7)
    plan = create_policy("tube", ratio=ratio)(torch.zeros(2, n, 4), grid=grid, numpy_rng=np.random)
    assert np.array_equal(plan.mask.numpy(), expected)
    frames, space = grid[0], grid[1] * grid[2]
    assert plan.num_visible == frames * (space - int(ratio * space))
    assert torch.equal(plan.ids_keep, torch.sort(plan.ids_keep, dim=1).values)  # visible in patch order (x[~mask])


def test_tube_from_a_generator_or_noise_repeats_one_spatial_mask() -> None:
    policy = create_policy("tube", ratio=0.75)
    a = policy(tokens(), grid=GRID, generator=gen(1))
    b = policy(tokens(), grid=GRID, generator=gen(1))
    assert torch.equal(a.mask, b.mask)
    per_slice = a.mask.view(3, 4, 16)
    assert bool((per_slice == per_slice[:, :1]).all()) and bool((per_slice.sum(-1) == 12).all())
    noise = torch.rand(3, N, generator=gen(2))
    c = policy(tokens(), grid=GRID, noise=noise)
    top = torch.topk(noise[:, :16], 12, dim=1).indices
    expected = torch.zeros(3, 16).scatter(1, top, 1.0).repeat(1, 4)
    assert torch.equal(c.mask, expected)


def test_frame_hides_whole_time_slices() -> None:
    plan = create_policy("frame", ratio=0.5)(tokens(), grid=GRID, generator=gen(3))
    per_slice = plan.mask.view(3, 4, 16).sum(-1)  # [B, T']
    assert bool(((per_slice == 0) | (per_slice == 16)).all()) and bool(((per_slice == 16).sum(-1) == 2).all())
    noise = torch.rand(3, N, generator=gen(4))
    by_noise = create_policy("frame", ratio=0.5)(tokens(), grid=GRID, noise=noise)
    hidden = torch.topk(noise[:, ::16], 2, dim=1).indices
    assert torch.equal(by_noise.mask.view(3, 4, 16)[:, :, 0], torch.zeros(3, 4).scatter(1, hidden, 1.0))
    for grid, ratio, words in [((8, 8), 0.5, "image grid 8x8"), (GRID, 0.2, "hides 0 of 4 time slices")]:
        with pytest.raises(ValueError, match=words):
            create_policy("frame", ratio=ratio)(tokens(), grid=grid)


def _moving_clips() -> torch.Tensor:
    """Clips [3, 1, 8, 16, 16] (4x4 patches of 4 px) where one known 4x4 patch per clip flickers."""
    clips = torch.zeros(3, 1, 8, 16, 16)
    for b, (r, c) in enumerate([(0, 0), (1, 2), (3, 3)]):
        clips[b, 0, 1::2, 4 * r:4 * r + 4, 4 * c:4 * c + 4] = 1.0  # flickers on odd frames
    return clips


def test_motion_with_guided_fraction_zero_is_tube_bit_for_bit() -> None:
    noise = torch.rand(3, N, generator=gen(5))
    clips = _moving_clips()
    tube = create_policy("tube", ratio=0.75)(tokens(), grid=GRID, noise=noise)
    motion = create_policy("motion", ratio=0.75, guided_fraction=0.0)(tokens(), grid=GRID, noise=noise, images=clips)
    assert torch.equal(motion.mask, tube.mask) and torch.equal(motion.ids_keep, tube.ids_keep)
    a = create_policy("tube", ratio=0.75)(tokens(), grid=GRID, generator=gen(6))
    b = create_policy("motion", ratio=0.75, guided_fraction=0.0)(tokens(), grid=GRID, generator=gen(6), images=clips)
    assert torch.equal(a.mask, b.mask)


def test_motion_hides_where_the_clip_moves_first() -> None:
    clips = _moving_clips()
    policy = create_policy("motion", ratio=0.5, guided_fraction=0.125)  # 8 hidden per slice: 1 guided
    for seed in range(4):
        plan = policy(tokens(), grid=GRID, generator=gen(seed), images=clips)
        for b, (r, c) in enumerate([(0, 0), (1, 2), (3, 3)]):
            moving = r * 4 + c
            assert all(float(plan.mask[b, t * 16 + moving]) == 1.0 for t in range(4))
            assert int(plan.guided[b].sum()) == 4 and bool(plan.guided[b, moving])
    ramped = create_policy("motion", ratio=0.5, guided_fraction=1.0, guided_ramp=1.0)
    assert int(ramped(tokens(), grid=GRID, generator=gen(0), images=clips, progress=0.0).guided.sum()) == 0
    with pytest.raises(ValueError, match="scores the clip's pixels"):
        policy(tokens(), grid=GRID)


@pytest.mark.parametrize("name", ["block", "simmim", "uniform", "colornoise"])
def test_image_only_policies_refuse_a_space_time_grid_in_one_line(name: str) -> None:
    with pytest.raises(ValueError) as err:
        create_policy(name)(tokens(), grid=GRID)
    assert f"policy {name!r} works on image patch grids only" in str(err.value) and "4x4x4" in str(err.value)


@pytest.mark.parametrize("name", ["random", "attention", "hpm", "adamae", "learned", "tube", "motion"])
def test_token_policies_work_on_a_space_time_grid_that_is_not_square(name: str) -> None:
    grid, n = (2, 3, 4), 24
    kwargs = {"embed_dim": 16, "num_patches": n} if name == "learned" else {}
    policy = create_policy(name, **kwargs)
    context = {"grid": grid, "generator": gen(0), "images": torch.rand(3, 1, 4, 12, 16, generator=gen(1))}
    if name == "attention":
        context["attention"] = torch.rand(3, n, generator=gen(2))
    plan = policy(tokens(n=n), **context)  # checked by MaskPolicy.__call__ (validate)
    assert plan.mask.shape == (3, n)


def test_the_maskers_position_code_follows_the_grid() -> None:
    assert torch.equal(grid_position_code((4, 4), 16), position_code(4, 16))  # square grids: as before
    assert torch.equal(grid_position_code(GRID, 16), sinusoid_table(64, 16))
    rect = grid_position_code((2, 3), 8)
    assert torch.equal(rect[:3, :4], rect[0, :4].expand(3, 4))  # row 0: the row half is the same
    assert not torch.equal(rect[0, 4:], rect[1, 4:])  # the column half changes along the row


def running_cell_by_hand(grid: tuple[int, int, int], ratio: float, start: int) -> np.ndarray:
    """VideoMAE V2's RunningCellMaskingGenerator for one pointer start, as published: a queue of m ones then zeros,
    read cyclically from the pointer, which advances before every frame; the 2x2 cell tiled over the frame."""
    frames, rows, cols = grid
    masked = int(4 * ratio)
    queue = np.hstack([np.ones(masked), np.zeros(4 - masked)])
    pointer, out = start, []
    for _ in range(frames):
        pointer += 1
        cell = queue[(np.arange(4) + pointer) % 4].reshape(2, 2)
        out.append(np.tile(cell, (rows // 2, cols // 2)).flatten())
    return np.stack(out).flatten().astype(bool)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_running_cell_is_videomae_v2s(ratio: float) -> None:
    starts = torch.arange(4)
    ours = running_cell_hidden((4, 6, 8), ratio, starts)
    for s in range(4):
        assert np.array_equal(ours[s].numpy(), running_cell_by_hand((4, 6, 8), ratio, s))


@pytest.mark.parametrize("rule", ["random", "runningcell"])
def test_decoder_rules_name_a_constant_subset_of_the_hidden_tokens(rule: str) -> None:
    plan = create_policy("tube", ratio=0.75)(tokens(), grid=GRID, generator=gen(0))
    sub = apply_decoder_rule(plan, rule, 0.5, grid=GRID, generator=gen(1))
    m = num_decoded(plan.num_hidden, 0.5)
    assert sub.decoder_ids.shape == (3, m) == (3, 24)
    assert bool(plan.mask.gather(1, sub.decoder_ids).eq(1).all())
    again = apply_decoder_rule(plan, rule, 0.5, grid=GRID, generator=gen(1))
    assert torch.equal(sub.decoder_ids, again.decoder_ids)
    per_patch = torch.rand(3, N, generator=gen(2))
    expected = float(per_patch.gather(1, sub.decoder_ids).sum()) / (3 * m)
    assert masked_loss(per_patch, sub.target_mask, sub.weights).item() == pytest.approx(expected, rel=1e-6)


def test_running_cell_reconstructs_the_hidden_tokens_the_cell_shows_first() -> None:
    plan = create_policy("tube", ratio=0.75)(tokens(), grid=GRID, generator=gen(0))
    g = gen(5)
    sub = apply_decoder_rule(plan, "runningcell", 0.5, grid=GRID, generator=g)
    g = gen(5)
    torch.rand(3, N, generator=g, dtype=torch.float64)  # the tie-break draw comes first
    start = torch.randint(0, 4, (3,), generator=g)
    cell_hidden = running_cell_hidden(GRID, 0.5, start)  # [B, N]
    for b in range(3):
        shown_hidden = int((plan.mask[b].bool() & ~cell_hidden[b]).sum())
        chosen_cell_hidden = int(cell_hidden[b, sub.decoder_ids[b]].sum())
        assert chosen_cell_hidden == max(0, 24 - shown_hidden)


def test_bad_decoder_rules_and_ratios_are_one_line() -> None:
    plan = create_policy("random")(tokens(n=16), generator=gen(0))
    for rule, ratio, words in [("cells", 0.5, "decoder rule must be one of random, runningcell"),
                               ("random", 1.0, "decoder mask ratio must be a number in [0, 1)"),
                               ("runningcell", 0.5, "needs the token grid")]:  # fmt: skip
        with pytest.raises(ValueError) as err:
            apply_decoder_rule(plan, rule, ratio)
        assert words in str(err.value)


def test_every_registered_policy_is_covered_here_or_refuses_clips() -> None:
    video = {"random", "attention", "hpm", "adamae", "learned", "tube", "motion", "frame"}
    image_only = {"block", "simmim", "uniform", "colornoise"}
    assert set(list_policies()) == video | image_only


def test_a_plan_keeps_its_decoder_subset_through_the_policy_check() -> None:
    plan = create_policy("tube")(tokens(n=4 * 16), grid=(4, 4, 4), generator=gen(0))
    assert isinstance(plan, MaskPlan) and plan.decoder_ids is None


def test_block_reads_a_non_square_image_grid_from_the_context() -> None:
    """block on the context's (H', W'): the same plan as grid_size=(H', W'); (S, S) changes nothing for squares."""
    seq = tokens(n=24)
    by_context = create_policy("block")(seq, generator=gen(4), grid=(4, 6))
    by_option = create_policy("block", grid_size=(4, 6))(seq, generator=gen(4))
    assert torch.equal(by_context.mask, by_option.mask)
    with pytest.raises(ValueError, match="not a square"):
        create_policy("block")(seq, generator=gen(4))
    square = tokens(n=16)
    plain = create_policy("block")(square, generator=gen(5))
    given = create_policy("block")(square, generator=gen(5), grid=(4, 4))
    assert torch.equal(plain.mask, given.mask) and torch.equal(plain.ids_keep, given.ids_keep)
