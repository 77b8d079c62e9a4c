"""VideoMAE's pretraining loss, shared by the Hugging Face (`hf_video`) and official (`videomae`) adapters.

Both codebases compute the same targets (transformers' `VideoMAEForPreTraining.forward`; MCG-NJU/VideoMAE's
`engine_for_pretraining.train_one_epoch`), which differ from MAE's `patchify` + `norm_pix_loss`:
- the clips are first un-normalised with ImageNet's mean and std (3 channels; transformers skips this step for
  other channel counts, the official code cannot take them);
- tubelets [t, p, p, C] in grid order (time slowest), each normalised per channel over its t*p*p pixels
  (mean, unbiased std + 1e-6 outside the square root) when `norm_pix_loss` (VideoMAE's `normlize_target`);
- the loss is `MSELoss()` over the hidden tokens' elements: the mean over every (token, pixel), not MAE's
  mean over tokens of per-token means, which rounds differently.
`videomae_loss` returns that scalar bit for bit when the plan has no weights; a weighted plan (a learned
masker) gets maskkit's `masked_loss` of the same per-token errors.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from maskkit.mae import masked_loss
from maskkit.plan import MaskPlan
from maskkit.tubelets import patchify_clips

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "videomae_loss", "videomae_pixels", "videomae_targets"]

#: what both codebases un-normalise with (timm's / transformers' IMAGENET_DEFAULT_MEAN and _STD)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def videomae_targets(clips: Tensor, tubelet_size: int, patch_size: int, norm_pix_loss: bool) -> Tensor:
    """VideoMAE's per-token targets: clips [B, C, T, H, W] -> [B, N, t*p*p*C], tubelet pixels ordered (t, p, p, C).

    3 channels are un-normalised with ImageNet's statistics first (as both codebases do); other channel counts
    are taken as they are (transformers' rule; it then requires `norm_pix_loss`).
    """
    b, c, t, h, w = clips.shape
    tt, p = tubelet_size, patch_size
    with torch.no_grad():
        frames = clips
        if c == 3:
            mean = torch.as_tensor(IMAGENET_MEAN).to(device=clips.device, dtype=clips.dtype)[None, :, None, None, None]
            std = torch.as_tensor(IMAGENET_STD).to(device=clips.device, dtype=clips.dtype)[None, :, None, None, None]
            frames = clips * std + mean  # [B, C, T, H, W], pixels in [0, 1] for ImageNet-normalised clips
        tubes = patchify_clips(frames, tt, p).reshape(b, -1, tt * p * p, c)  # [B, N, t*p*p, C] (a copy)
        if norm_pix_loss:
            tubes = (tubes - tubes.mean(dim=-2, keepdim=True)) / (
                tubes.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6
            )  # per tubelet and channel
        return tubes.reshape(b, tubes.shape[1], -1)  # [B, N, P]


def videomae_loss(
    pred: Tensor, clips: Tensor, plan: MaskPlan, tubelet_size: int, patch_size: int, norm_pix_loss: bool
) -> tuple[Tensor, Tensor]:
    """(loss, per_patch [B, N]) of predictions [B, N, P] under `plan`, over its `target_mask` (the hidden tokens,
    or the decoder's subset): VideoMAE's `MSELoss` of the selected tokens without weights, maskkit's weighted
    `masked_loss` of the same per-token errors with them."""
    target = videomae_targets(clips, tubelet_size, patch_size, norm_pix_loss)  # [B, N, P]
    if pred.shape != target.shape:
        raise ValueError(f"pred must be the targets' shape {tuple(target.shape)}, got {tuple(pred.shape)}")
    per_patch = ((pred - target) ** 2).mean(dim=-1)  # [B, N]
    selected = plan.target_mask
    if plan.weights is not None:
        return masked_loss(per_patch, selected, plan.weights), per_patch
    chosen = selected.bool()  # the same count on every row (a plan's invariant)
    b, p = pred.shape[0], pred.shape[-1]
    loss = F.mse_loss(pred[chosen].reshape(b, -1, p), target[chosen].reshape(b, -1, p))  # VideoMAE's reduction
    return loss, per_patch


def videomae_pixels(pred: Tensor, clips: Tensor, tubelet_size: int, patch_size: int, norm_pix_loss: bool) -> Tensor:
    """Predictions [B, N, P] in VideoMAE's target space back in the clips' own (normalised) pixels, in `patchify`'s
    layout [B, N, P]: each tubelet's per-channel normalisation undone with the clip's own statistics where
    `norm_pix_loss`, then ImageNet's un-normalisation undone for 3 channels. For pictures of a reconstruction."""
    b, c = clips.shape[:2]
    p = pred.detach().reshape(b, pred.shape[1], -1, c)  # [B, N, t*p*p, C]
    if norm_pix_loss:
        target = videomae_targets(clips, tubelet_size, patch_size, False).reshape(p.shape)
        p = p * (target.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6) + target.mean(dim=-2, keepdim=True)
    if c == 3:
        mean = torch.as_tensor(IMAGENET_MEAN).to(device=p.device, dtype=p.dtype)
        std = torch.as_tensor(IMAGENET_STD).to(device=p.device, dtype=p.dtype)
        p = (p - mean) / std
    return p.reshape(b, p.shape[1], -1)
