"""The MAE protocol: the one view of a Masked Autoencoder that the engine and the CLI use.

Adapters (maskkit.adapters) provide it for timm, the official MAE and Hugging Face ViTMAE, and for
video MAEs, which take clips [B, C, T, H, W] cut into tubelets of t x p x p pixels on a (T/t, H/p, W/p)
token grid (`is_video_mae`: the model declares `num_frames`, `tubelet_size` and `grid`).
An implementation is an `nn.Module` (so it can be unrolled functionally by `higher`) with
the attributes and methods of `MAEProtocol`. The losses below are shared by every adapter.
Optional: `transformer_blocks()` (the encoder and decoder blocks), which `--compile` compiles.
The functions here check what they are given (`check_images`, the plan's batch and patches) and
refuse an empty batch or a shape the model does not take with one ValueError naming the argument and
the shapes expected and given, before any torch operation can fail deep inside.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from maskkit.plan import MaskPlan, check_grid

__all__ = [
    "MAEOutput",
    "MAEProtocol",
    "check_images",
    "is_mae",
    "is_video_mae",
    "mae_forward",
    "mae_step_loss",
    "masked_loss",
    "patch_loss",
    "policy_aux_loss",
    "policy_context",
    "token_grid",
]


@runtime_checkable
class MAEProtocol(Protocol):
    """What maskkit needs of an MAE. Shapes: B batch, N patches, K visible, D width, P = p*p*C.

    A video MAE takes clips [B, C, T, H, W] wherever images [B, C, H, W] are written below, and also declares
    `num_frames` (T), `tubelet_size` (t) and `grid` (T/t, H/p, W/p); then N = T/t * H/p * W/p, P = t*p*p*C with
    a tubelet's pixels ordered (t, p, p, C), tokens row-major over the grid (time slowest), `features` may
    mean-pool its tokens (VideoMAE has no CLS) and `cls_attention` may give the attention each token receives.
    `decode` may reconstruct only the visible and `plan.decoder_ids` tokens, with zeros elsewhere.

    Optional `pixel_loss(pred, images, plan) -> (loss, per_patch [B, N])`: a codebase whose own loss is not MAE's
    (VideoMAE's targets are un-normalised with ImageNet's statistics and normalised per channel of a tubelet, and
    it averages over the hidden tokens' elements) computes it here, so that `mae_forward` equals it bit for bit.
    Such a model also gives `prediction_pixels(pred, images) -> [B, N, P]`: its predictions back in the inputs'
    pixels (patchify's layout), for pictures, since undoing `norm_pix_loss` per patch would not.
    """

    patch_size: int  # p
    num_patches: int  # N
    embed_dim: int  # D (encoder width)
    in_chans: int  # C
    norm_pix_loss: bool

    def patch_tokens(self, images: Tensor) -> Tensor:
        """Patch embedding plus positional embedding, no CLS: [B, C, H, W] -> [B, N, D]."""
        ...

    def encode(self, tokens: Tensor, plan: MaskPlan) -> Tensor:
        """Encode the visible tokens of `plan` (CLS prepended): [B, N, D] -> latent [B, 1 + K, D]."""
        ...

    def decode(self, latent: Tensor, plan: MaskPlan) -> Tensor:
        """Predict every patch from the latent: [B, 1 + K, D] -> [B, N, P]."""
        ...

    def patchify(self, images: Tensor) -> Tensor:
        """Images to per-patch pixel targets: [B, C, H, W] -> [B, N, P]."""
        ...

    def unpatchify(self, patches: Tensor) -> Tensor:
        """Inverse of patchify: [B, N, P] -> [B, C, H, W]."""
        ...

    def features(self, images: Tensor) -> Tensor:
        """CLS embedding of the encoder with nothing masked (after the final norm): [B, D]."""
        ...

    def cls_attention(self, images: Tensor) -> Tensor:
        """CLS-to-patch attention of the last encoder block, averaged over heads: [B, N]."""
        ...


def is_video_mae(mae: Any) -> bool:
    """Whether `mae` takes clips [B, C, T, H, W] (it declares an integer `num_frames`, T), not images."""
    frames = getattr(mae, "num_frames", None)
    return isinstance(frames, int) and not isinstance(frames, bool)


def token_grid(mae: Any) -> tuple[int, ...] | None:
    """The MAE's token grid, which every policy reads as the context key `grid`: the model's own `grid`
    ((T', H', W') for a video MAE), else its `grid_size` (H/p, W/p), else a square sqrt(N) x sqrt(N), else
    None (a model that does not say, with N not a square)."""
    for name in ("grid", "grid_size"):
        grid = getattr(mae, name, None)
        if isinstance(grid, (tuple, list)):
            return check_grid(tuple(grid), mae.num_patches)
    side = math.isqrt(mae.num_patches)
    return (side, side) if side * side == mae.num_patches else None


def check_images(mae: Any, images: Any, name: str = "images") -> None:
    """ValueError naming `name` unless `images` is a batch the MAE takes: [B, C, H, W] for an image MAE, [B, C,
    T, H, W] for a video MAE (`is_video_mae`, T its `num_frames`); B >= 1, C its `in_chans`, T a multiple of its
    `tubelet_size`, H and W multiples of its `patch_size`, together giving its `num_patches`."""
    shape = tuple(images.shape) if isinstance(images, Tensor) else None
    c, p, n = mae.in_chans, mae.patch_size, mae.num_patches
    video = is_video_mae(mae)
    if video:
        frames, tube = mae.num_frames, mae.tubelet_size
        expected = (f"clips [B, {c}, {frames}, H, W] with B >= 1 and ({frames}/{tube}) x (H/{p}) x (W/{p}) = {n} "
                    "tokens of the model")  # fmt: skip
    else:
        expected = f"[B, {c}, H, W] with B >= 1 and (H/{p}) x (W/{p}) = {n} patches of the model"
    if shape is None or len(shape) != (5 if video else 4):
        got = type(images).__name__ if shape is None else f"shape {shape}"
        hint = "" if shape is None or len(shape) not in (4, 5) else (
            " (a clip batch given to an image MAE)" if len(shape) == 5 else " (an image batch given to a video MAE)")
        raise ValueError(f"{name} must be {expected}, got {got}{hint}")
    b, channels, h, w = shape[0], shape[1], shape[-2], shape[-1]
    if b == 0:
        raise ValueError(f"{name} is an empty batch (B=0, shape {shape}); give at least one {'clip' if video else 'image'}")
    tokens_in_time = 1
    if video:
        if shape[2] != mae.num_frames or shape[2] % mae.tubelet_size:
            raise ValueError(f"{name} must be {expected}, got shape {shape}")
        tokens_in_time = shape[2] // mae.tubelet_size
    if channels != c or h % p or w % p or tokens_in_time * (h // p) * (w // p) != n:
        raise ValueError(f"{name} must be {expected}, got shape {shape}")


def _check_plan(mae: Any, images: Tensor, plan: Any) -> None:
    """ValueError naming the plan unless it is a MaskPlan for these images (B) and this model (N)."""
    if not isinstance(plan, MaskPlan):
        raise ValueError(f"plan must be a MaskPlan, got {type(plan).__name__}")
    if (plan.batch_size, plan.num_patches) != (images.shape[0], mae.num_patches):
        raise ValueError(f"plan is for {plan.batch_size} images of {plan.num_patches} patches, but images has "
                         f"{images.shape[0]} and the model {mae.num_patches} patches")  # fmt: skip


def patch_loss(pred: Tensor, target: Tensor, norm_pix_loss: bool = False, eps: float = 1e-6) -> Tensor:
    """Per-patch mean squared error [B, N], as MAE's `forward_loss` before masking.

    With `norm_pix_loss`, each target patch is normalised by its own mean and variance
    (unbiased variance, eps 1e-6, exactly as the official code). `pred` and `target` must have one
    shape [B, N, P] (ValueError otherwise: a broadcast would give a loss of the wrong patches).
    """
    if pred.dim() != 3 or pred.shape != target.shape:
        raise ValueError(f"pred and target must have one shape [B, N, P], got pred {tuple(pred.shape)} and "
                         f"target {tuple(target.shape)}")  # fmt: skip
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps) ** 0.5
    return ((pred - target) ** 2).mean(dim=-1)  # [B, N]


def masked_loss(per_patch: Tensor, mask: Tensor, weights: Tensor | None = None) -> Tensor:
    """sum(loss * mask * w) / sum(mask): the MLO-MAE weighting; w = 1 gives MAE's loss.

    per_patch, mask and weights share one shape [B, N] (ValueError naming the one that does not)."""
    for name, t in (("mask", mask), ("weights", weights)):
        if t is not None and t.shape != per_patch.shape:
            raise ValueError(f"{name} must have per_patch's shape {tuple(per_patch.shape)}, got {tuple(t.shape)}")
    factor = mask if weights is None else mask * weights
    return (per_patch * factor).sum() / mask.sum()


@dataclass
class MAEOutput:
    """Result of one masked forward pass (in the style of transformers' output dataclasses)."""

    loss: Tensor  # scalar weighted masked loss
    pred: Tensor  # [B, N, P]
    plan: MaskPlan
    per_patch: Tensor  # [B, N] unweighted per-patch loss
    aux_loss: Tensor | None = None  # scalar: the policy's own objective (e.g. hpm's), or None

    @property
    def total_loss(self) -> Tensor:
        """What to backpropagate: the masked loss plus the policy's own loss, if it has one."""
        return self.loss if self.aux_loss is None else self.loss + self.aux_loss


def mae_forward(mae: Any, images: Tensor, plan: MaskPlan, tokens: Tensor | None = None) -> MAEOutput:
    """Encode, decode and score one batch under `plan` through the MAE protocol.

    tokens: the `patch_tokens(images)` already computed for the policy, to avoid a second embedding.
    ValueError naming the argument when images, plan or tokens do not fit the model or each other.
    """
    check_images(mae, images)
    _check_plan(mae, images, plan)
    if tokens is not None:
        plan.check_tokens("tokens", tokens, mae.num_patches)
        if tokens.shape[-1] != mae.embed_dim:
            raise ValueError(f"tokens must be [B, N, D] with the model's width D={mae.embed_dim}, got shape "
                             f"{tuple(tokens.shape)}")  # fmt: skip
    if tokens is None:
        tokens = mae.patch_tokens(images)  # [B, N, D]
    latent = mae.encode(tokens, plan)  # [B, 1 + K, D]
    pred = mae.decode(latent, plan)  # [B, N, P]
    own_loss = getattr(mae, "pixel_loss", None)
    if callable(own_loss):  # the codebase's own targets and reduction (VideoMAE's), over plan.target_mask
        loss, per_patch = own_loss(pred, images, plan)
    else:
        per_patch = patch_loss(pred, mae.patchify(images), mae.norm_pix_loss)  # [B, N]
        loss = masked_loss(per_patch, plan.target_mask, plan.weights)  # over the decoder subset, if named
    return MAEOutput(loss=loss, pred=pred, plan=plan, per_patch=per_patch)


def policy_aux_loss(policy: Any, plan: MaskPlan, per_patch: Tensor) -> Tensor | None:
    """The policy's own loss (`MaskPolicy.aux_loss`) on its plan and the detached per-patch losses [B, N], or None."""
    if not getattr(policy, "has_aux_loss", False):
        return None
    return policy.aux_loss(plan, per_patch.detach())


def policy_context(mae: Any, images: Tensor, **extra: Any) -> dict[str, Any]:
    """The context every policy may read, built from an MAE and its images (or clips): `images`, `encoder` and
    the token `grid` (`token_grid`)."""
    grid = token_grid(mae)
    return {"images": images, "encoder": mae, **({} if grid is None else {"grid": grid}), **extra}


def mae_step_loss(
    mae: Any,
    policy: Any,
    images: Tensor,
    *,
    ratio: float | None = None,
    decoder: Callable[[MaskPlan, dict[str, Any]], MaskPlan] | None = None,
    **context: Any,
) -> MAEOutput:
    """Tokens -> policy -> plan -> encode/decode -> weighted loss: one pretraining forward.

    `decoder(plan, context)`: names the hidden patches the decoder reconstructs (e.g. a `DecoderMasking`:
    VideoMAE V2's running cell), drawing from the context's generator after the policy; None: every one.

    `aux_loss` of the output holds the policy's own objective, if any; backpropagate `total_loss`.
    """
    check_images(mae, images)
    tokens = mae.patch_tokens(images)  # [B, N, D]
    context = policy_context(mae, images, **context)
    plan = policy(tokens, ratio=ratio, **context)
    if decoder is not None:
        plan = decoder(plan, context)  # the decoder's subset of the hidden patches (`decoder_ids`)
    out = mae_forward(mae, images, plan, tokens=tokens)
    out.aux_loss = policy_aux_loss(policy, plan, out.per_patch)
    return out


def is_mae(obj: Any) -> bool:
    """Whether `obj` provides the MAE protocol (attributes and methods, not their signatures)."""
    return isinstance(obj, MAEProtocol) and isinstance(obj, torch.nn.Module)
