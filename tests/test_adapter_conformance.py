"""One conformance suite for every registered MAE adapter (`maskkit.adapters.ADAPTERS`: timm, official, hf, video,
hf-video, videomae).

Each registered adapter is one `AdapterCase` in `CASES` (keyed by its registered name), one param of the
`case` fixture; a new adapter gets every test here by adding one more entry, and a registered adapter
without one fails `test_every_registered_adapter_has_a_case`. A plugin's adapter runs the same suite
through `check_conformance(case)` (tests/test_plugin_adapter.py). A case declares its input: images [B, C, H, W],
or clips [B, C, T, H, W] cut into t x p x p tubelets (`num_frames`, `tubelet_size`; a video MAE, `is_video_mae`),
and whether the model has a CLS token (`has_cls`; VideoMAE's have none). For every adapter:

1. maskkit's loss (`mae_step_loss` + the random policy, same noise) is bit-identical to the codebase's
   own loss, for norm_pix_loss False and True, and a weighted plan weights the codebase's own per-patch loss;
2. the plan round trip: patchify / unpatchify, ids_keep / ids_restore / mask, gather / restore,
   encode / decode;
3. `features(images)` is the unmasked encoder's CLS after the final norm (without CLS: its pooled tokens, as the
   codebase pools them, e.g. VideoMAE's mean then norm);
4. a learned masker gets gradients through the loss;
5. attaching maskkit to the codebase's own model and detaching it leaves that model exactly as it was;
6. the wrapper's state_dict survives torch.save / torch.load into a differently seeded wrapper;
7. the registered adapter (`create_mae_from_spec(case.spec, ...)`) builds the case's model, weight for weight.

Adapter-specific behaviour (timm_compat, use_policy, hf_loss, presets, ...) stays in test_adapter_*.py.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from torch import Tensor, nn

from maskkit import MaskPlan, create_policy, gather_tokens, is_mae, mae_forward, mae_step_loss, num_visible
from maskkit.adapters import ADAPTERS, create_mae_from_spec
from maskkit.adapters.models import load_official_module
from maskkit.compile import compile_blocks, is_compiled, transformer_blocks
from maskkit.mae import is_video_mae, token_grid

B = 3
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
Triple = tuple[Tensor, Tensor, Tensor]  # (loss, pred [B, N, P], mask [B, N])
#: a video case's clips: [B, C, T, H, W]; an image case's images: [B, C, H, W] (the suite calls both `images`)

pytestmark = pytest.mark.usefixtures("one_thread")  # bit-exact comparisons need one thread count


@dataclass(frozen=True)
class Noise:
    """Uniform noise [B, N] and its seed: `torch.manual_seed(seed)` then `torch.rand(B, N)` draws the same
    values, which is how a codebase that draws its own noise (official MAE) is driven by it."""

    seed: int
    values: Tensor

    @classmethod
    def draw(cls, seed: int, batch: int, num_patches: int) -> Noise:
        return cls(seed, torch.rand(batch, num_patches, generator=torch.Generator().manual_seed(seed)))


@dataclass(frozen=True)
class AdapterCase:
    """What the suite needs to know of one adapter. Its inputs are images [B, C, H, W], or clips [B, C, T, H, W]
    when `num_frames` is set (a video adapter: T frames, tubelets of `tubelet_size` x p x p pixels)."""

    name: str  # the adapter's registered name (its model kind)
    img_size: int  # H = W
    in_chans: int  # C
    patch_size: int  # p
    embed_dim: int  # D
    #: (seed, norm_pix_loss) -> the wrapped, MAE-protocol model (eval mode, weights fixed by the seed)
    build: Callable[[int, bool], nn.Module]
    #: (wrapper, images, noise, ratio) -> the codebase's OWN (loss, pred [B, N, P], mask [B, N]) for it
    own_loss: Callable[[nn.Module, Tensor, Noise, float], Triple]
    #: (wrapper, images) -> the codebase's own CLS after the final norm with nothing masked [B, D] (without CLS:
    #: its own pooled feature, e.g. VideoMAE's mean of the tokens, then its norm)
    own_features: Callable[[nn.Module, Tensor], Tensor]
    #: assert_close tolerances of `features` against `own_features` (summation order may differ)
    features_tol: dict[str, float]
    #: wrapper -> the codebase's own model inside it
    raw_of: Callable[[nn.Module], nn.Module]
    #: seed -> a codebase model as a user has it (before maskkit touches it)
    build_raw: Callable[[int], nn.Module]
    #: (raw model, images) -> take hold of the raw model the adapter's way, train one step through it,
    #: and return the undo (called twice by the suite: it must be idempotent)
    attach: Callable[[nn.Module, Tensor], Callable[[], None]]
    #: (raw model, images, noise) -> the raw model's own outputs, deterministic for fixed weights and noise
    raw_output: Callable[[nn.Module, Tensor, Noise], tuple[Tensor, ...]]
    norm_pix_options: tuple[bool, ...] = (False, True)
    #: the wrapper has parameters of its own beside the codebase model's (timm: maskkit's decoder)
    adds_parameters: bool = False
    #: (wrapper, images) -> the targets [B, N, P] the codebase's own loss compares predictions with, written
    #: independently of the adapter; None: `patchify` (MAE's, normalised per patch by `patch_loss` if asked)
    own_targets: Callable[[nn.Module, Tensor], Tensor] | None = None
    #: a package the adapter needs (the case skips without it)
    needs: str | None = None
    #: the `--model` spec and `--model-opt` options under which the registered adapter builds `build`'s model
    spec: str = ""
    spec_options: dict = field(default_factory=dict)
    #: T, the frames of a clip: set for a video adapter (inputs [B, C, T, H, W]); None for images [B, C, H, W]
    num_frames: int | None = None
    #: t, the frames of one tubelet (a video adapter's); 1 for images
    tubelet_size: int = 1
    #: whether the encoder prepends a CLS token (latent [B, 1 + K, D]); False: latent [B, K, D] (VideoMAE's)
    has_cls: bool = True

    @property
    def is_video(self) -> bool:
        return self.num_frames is not None

    @property
    def grid(self) -> tuple[int, ...]:
        """The token grid: (H/p, W/p) for images, (T/t, H/p, W/p) for clips (time slowest)."""
        side = self.img_size // self.patch_size
        return (self.num_frames // self.tubelet_size, side, side) if self.is_video else (side, side)

    @property
    def num_patches(self) -> int:
        return math.prod(self.grid)

    @property
    def patch_dim(self) -> int:
        """P = t*p*p*C (t = 1 for images)."""
        return self.tubelet_size * self.patch_size**2 * self.in_chans

    def input_shape(self, batch: int) -> tuple[int, ...]:
        """[B, C, H, W] for images, [B, C, T, H, W] for clips."""
        frames = (self.num_frames,) if self.is_video else ()
        return (batch, self.in_chans, *frames, self.img_size, self.img_size)

    @property
    def build_sizes(self) -> dict:
        """What `create_mae_from_spec` needs beyond the image sizes: the frames of a clip."""
        return {"num_frames": self.num_frames} if self.is_video else {}


def reference_patchify(case: AdapterCase, x: Tensor) -> Tensor:
    """MAE's patch layout ('nchpwq->nhwpqc') for images; VideoMAE's 'b c (t p0) (h p1) (w p2) -> b (t h w)
    (p0 p1 p2 c)' for clips: [B, N, P]."""
    p, c, n = case.patch_size, case.in_chans, case.num_patches
    if not case.is_video:
        g = case.img_size // p
        return torch.einsum("nchpwq->nhwpqc", x.reshape(x.shape[0], c, g, p, g, p)).reshape(x.shape[0], n, p * p * c)
    (gt, gh, gw), t = case.grid, case.tubelet_size
    x = x.reshape(x.shape[0], c, gt, t, gh, p, gw, p)
    return torch.einsum("bctuhpwq->bthwupqc", x).reshape(x.shape[0], n, case.patch_dim)


def targets_of(case: AdapterCase, mae: nn.Module, images: Tensor) -> Tensor:
    """The codebase's own loss targets [B, N, P] for an unnormalised loss (the suite's weighted checks use
    norm_pix_loss False): the case's `own_targets`, else `patchify`."""
    return mae.patchify(images) if case.own_targets is None else case.own_targets(mae, images)


def seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """`build()` under `torch.manual_seed(seed)`, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


# ---- timm: maskkit's TimmMAE; its "own" loss is the official MAE's forward re-done by hand ----------

TIMM_ENCODER = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2)
TIMM_DECODER = dict(decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=2)


def timm_build(seed: int, norm_pix_loss: bool) -> nn.Module:
    from maskkit.adapters.timm import create_mae

    return create_mae("tiny", seed=seed, norm_pix_loss=norm_pix_loss, **TIMM_ENCODER, **TIMM_DECODER).eval()


def official_mae_loss(m: nn.Module, imgs: Tensor, noise: Tensor, ratio: float) -> Triple:
    """MAE's forward (random masking by noise, encoder, decoder, loss) re-done by hand on the TimmMAE."""
    enc = m.encoder
    b, c, hgt, wid = imgs.shape
    p = m.patch_size
    x = enc.patch_embed(imgs) + enc.pos_embed[:, 1:, :]
    n, d = x.shape[1], x.shape[2]
    keep = int(n * (1 - ratio))
    shuffle = torch.argsort(noise, dim=1)
    restore = torch.argsort(shuffle, dim=1)
    kept = shuffle[:, :keep]
    x = torch.gather(x, 1, kept[..., None].repeat(1, 1, d))
    mask = torch.ones(b, n)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, restore)
    cls = (enc.cls_token + enc.pos_embed[:, :1, :]).expand(b, -1, -1)
    x = torch.cat([cls, x], dim=1)
    for blk in enc.blocks:
        x = blk(x)
    x = m.decoder_embed(enc.norm(x))
    filler = m.mask_token.repeat(b, n + 1 - x.shape[1], 1)
    y = torch.cat([x[:, 1:, :], filler], dim=1)
    y = torch.gather(y, 1, restore[..., None].repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], y], dim=1) + m.decoder_pos_embed
    for blk in m.decoder_blocks:
        x = blk(x)
    pred = m.decoder_pred(m.decoder_norm(x))[:, 1:, :]
    gh, gw = hgt // p, wid // p
    target = imgs.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, p * p * c)
    if m.norm_pix_loss:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum(), pred, mask


def timm_own_loss(m: nn.Module, images: Tensor, noise: Noise, ratio: float) -> Triple:
    return official_mae_loss(m, images, noise.values, ratio)


def timm_own_features(m: nn.Module, images: Tensor) -> Tensor:
    return m.encoder.forward_features(images)[:, 0]  # timm's own full, unmasked forward


def timm_build_raw(seed: int) -> nn.Module:
    return seeded(seed, lambda: timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, **TIMM_ENCODER
    ).eval())  # fmt: skip


def timm_attach(raw: nn.Module, images: Tensor, decoder: dict = TIMM_DECODER) -> Callable[[], None]:
    from maskkit.adapters.timm import TimmMAE

    # wraps the instance in place; fixed_pos_embed=False: keep the user's own pos_embed
    mae = seeded(1, lambda: TimmMAE(raw, fixed_pos_embed=False, **decoder))
    assert mae.encoder is raw
    mae(images).loss.backward()
    return lambda: None  # nothing to undo: wrapping must not change the encoder


def timm_raw_output(raw: nn.Module, images: Tensor, noise: Noise) -> tuple[Tensor, ...]:
    return raw.forward_features(images), raw(images)


# ---- official MAE: the test double examples/models_mae.py (loaded under timm_compat) ----------------


models_mae = load_official_module(EXAMPLES / "models_mae.py")  # the official-MAE test double


def official_build_raw(seed: int, norm_pix_loss: bool = False) -> nn.Module:
    from maskkit.adapters.official_mae import timm_compat

    def build() -> nn.Module:
        with timm_compat(models_mae):
            return models_mae.mae_vit_tiny_patch4(norm_pix_loss=norm_pix_loss)

    return seeded(seed, build).eval()


def official_build(seed: int, norm_pix_loss: bool) -> nn.Module:
    from maskkit.adapters.official_mae import wrap

    return wrap(official_build_raw(seed, norm_pix_loss))


def official_raw_output(model: nn.Module, images: Tensor, noise: Noise, ratio: float = 0.75) -> Triple:
    """`model(imgs, mask_ratio)`: its random_masking draws torch.rand(B, N) from the global RNG, set to
    the state that draws exactly `noise` (checked)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(noise.seed)
        assert torch.equal(torch.rand(noise.values.shape), noise.values)
        torch.manual_seed(noise.seed)
        return model(images, mask_ratio=ratio)


def official_own_loss(mae: nn.Module, images: Tensor, noise: Noise, ratio: float) -> Triple:
    return official_raw_output(mae.model, images, noise, ratio)


def official_own_features(mae: nn.Module, images: Tensor) -> Tensor:
    """With nothing masked, the CLS output does not depend on the shuffle of the patches."""
    with torch.random.fork_rng(devices=[]):
        latent, _, _ = mae.model.forward_encoder(images, 0.0)
    return latent[:, 0]


def official_attach(raw: nn.Module, images: Tensor) -> Callable[[], None]:
    from maskkit.adapters.official_mae import POLICY_MODULE, use_policy

    handle = use_policy(raw, create_policy("hpm"))  # a policy with parameters: registered on the model
    assert any(key.startswith(f"{POLICY_MODULE}.") for key in raw.state_dict())
    loss, _, _ = raw(images, mask_ratio=0.75)  # the user's unchanged call, masked by the policy
    loss.backward()
    return handle.remove


# ---- Hugging Face transformers ViTMAEForPreTraining (tiny, randomly initialised) -------------------

HF_TINY = dict(
    image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    intermediate_size=64, decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
    decoder_intermediate_size=32,
)  # fmt: skip


@contextlib.contextmanager
def hf_mask_ratio(model: nn.Module, ratio: float) -> Iterator[None]:
    """ViTMAE reads its mask ratio from the config: set it for one call."""
    configs = list({id(c): c for c in (model.config, model.vit.config, model.vit.embeddings.config)}.values())
    saved = [c.mask_ratio for c in configs]
    try:
        for c in configs:
            c.mask_ratio = ratio
        yield
    finally:
        for c, value in zip(configs, saved, strict=True):
            c.mask_ratio = value


def hf_build_raw(seed: int, norm_pix_loss: bool = False) -> nn.Module:
    from maskkit.adapters.hf import create_hf_mae

    return seeded(seed, lambda: create_hf_mae(**HF_TINY, norm_pix_loss=norm_pix_loss)).eval()


def hf_build(seed: int, norm_pix_loss: bool) -> nn.Module:
    from maskkit.adapters.hf import wrap

    return wrap(hf_build_raw(seed, norm_pix_loss))


def hf_raw_output(model: nn.Module, images: Tensor, noise: Noise) -> tuple[Tensor, ...]:
    """The user's call: at the config's own mask_ratio (a leaked override would show)."""
    out = model(pixel_values=images, noise=noise.values)
    return out.loss, out.logits, out.mask


def hf_own_loss(mae: nn.Module, images: Tensor, noise: Noise, ratio: float) -> Triple:
    with hf_mask_ratio(mae.model, ratio):
        return hf_raw_output(mae.model, images, noise)


def hf_own_features(mae: nn.Module, images: Tensor) -> Tensor:
    """HF's encoder with nothing masked and the patches in order (mask_ratio 0, increasing noise)."""
    order = torch.arange(mae.num_patches, dtype=torch.float32).expand(images.shape[0], -1)
    with hf_mask_ratio(mae.model, 0.0):
        return mae.model.vit(pixel_values=images, noise=order).last_hidden_state[:, 0]


def hf_attach(raw: nn.Module, images: Tensor) -> Callable[[], None]:
    from maskkit.adapters.hf import hf_loss, wrap

    mae = wrap(raw)
    assert mae.model is raw
    mae(images).loss.backward()
    # hf_loss overrides the config's mask_ratio for this call only
    hf_loss(raw, images, create_policy("random"), ratio=0.5).loss.backward()
    return lambda: None  # nothing to undo: wrapping must not change the model


# ---- video: maskkit's built-in TimmVideoMAE; its "own" loss is VideoMAE's forward re-done by hand ------

#: tubelets 2x4x4: a (4, 4, 4) grid, N = 64 (a square N: the learned masker's position code is 2-D on sqrt(N))
VIDEO_CLIP = dict(num_frames=8, img_size=16, patch_size=4, in_chans=3)
VIDEO_MODEL = dict(tubelet_size=2, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                   decoder_num_heads=2)  # fmt: skip


def video_build(seed: int, norm_pix_loss: bool) -> nn.Module:
    from maskkit.adapters.video_mae import create_video_mae

    return create_video_mae("micro", seed=seed, norm_pix_loss=norm_pix_loss, **VIDEO_CLIP, **VIDEO_MODEL).eval()


def video_tokens(m: nn.Module, clips: Tensor) -> Tensor:
    """VideoMAE's embedding by hand: a Conv3d of kernel = stride = (t, p, p), flattened time slowest, plus the
    fixed positional table: [B, C, T, H, W] -> [B, N, D]."""
    proj = m.patch_embed.proj
    x = torch.nn.functional.conv3d(clips, proj.weight, proj.bias, stride=proj.stride)  # [B, D, T', H', W']
    return x.flatten(2).transpose(1, 2) + m.pos_embed  # [B, N, D]


def video_own_loss(m: nn.Module, clips: Tensor, noise: Noise, ratio: float) -> Triple:
    """The encoder on the visible tubelets, the decoder on them and mask tokens in patch order, the loss over the
    hidden ones (MAE's random masking by noise on VideoMAE's model), re-done by hand on the TimmVideoMAE."""
    b, c, frames, hgt, wid = clips.shape
    x = video_tokens(m, clips)  # [B, N, D]
    n, d = x.shape[1], x.shape[2]
    keep = int(n * (1 - ratio))
    shuffle = torch.argsort(noise.values, dim=1)
    restore = torch.argsort(shuffle, dim=1)
    x = torch.gather(x, 1, shuffle[:, :keep, None].repeat(1, 1, d))  # [B, K, D]
    mask = torch.ones(b, n)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, restore)
    for blk in m.blocks:
        x = blk(x)
    x = m.decoder_embed(m.norm(x))  # [B, K, Dd]
    y = torch.cat([x, m.mask_token.repeat(b, n - keep, 1)], dim=1)
    y = torch.gather(y, 1, restore[..., None].repeat(1, 1, x.shape[2])) + m.decoder_pos_embed  # [B, N, Dd]
    for blk in m.decoder_blocks:
        y = blk(y)
    pred = m.decoder_pred(m.decoder_norm(y))  # [B, N, P]
    t, p = m.tubelet_size, m.patch_size
    target = clips.reshape(b, c, frames // t, t, hgt // p, p, wid // p, p).permute(0, 2, 4, 6, 3, 5, 7, 1)
    target = target.reshape(b, n, t * p * p * c)  # 'b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2 c)'
    if m.norm_pix_loss:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum(), pred, mask


def video_own_features(m: nn.Module, clips: Tensor) -> Tensor:
    """VideoMAE's pooling on the unmasked clip: every token through the blocks, their mean, then the norm."""
    x = video_tokens(m, clips)
    for blk in m.blocks:
        x = blk(x)
    return m.norm(x.mean(dim=1))


def video_attach(raw: nn.Module, clips: Tensor) -> Callable[[], None]:
    """The built-in model is maskkit's own: one step through its forward and through mae_step_loss."""
    raw(clips).loss.backward()
    mae_step_loss(raw, create_policy("random", ratio=0.5), clips).loss.backward()
    return lambda: None  # nothing to undo: training through the protocol must not change the model


def video_raw_output(raw: nn.Module, clips: Tensor, noise: Noise) -> tuple[Tensor, ...]:
    out = raw(clips, noise=noise.values)
    return out.loss, out.pred, raw.features(clips)


# ---- VideoMAE's own loss, as both VideoMAE codebases compute it (for hf-video and videomae) --------------------

STANDIN = Path(__file__).resolve().parent / "data" / "videomae_standin" / "modeling_pretrain.py"


def videomae_targets_by_hand(clips: Tensor, tubelet: int, patch: int, normalise: bool) -> Tensor:
    """engine_for_pretraining.py's labels before masking: un-normalised with ImageNet's statistics (3 channels),
    'b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2) c', per tubelet and channel normalised if asked: [B, N, P]."""
    b, c, frames, hgt, wid = clips.shape
    mean = torch.as_tensor((0.485, 0.456, 0.406))[None, :, None, None, None]
    std = torch.as_tensor((0.229, 0.224, 0.225))[None, :, None, None, None]
    x = clips * std + mean
    x = torch.einsum("bctuhpwq->bthwupqc", x.reshape(b, c, frames // tubelet, tubelet, hgt // patch, patch,
                                                      wid // patch, patch))  # fmt: skip
    x = x.reshape(b, -1, tubelet * patch * patch, c)  # [B, N, t*p*p, C]
    if normalise:
        x = (x - x.mean(dim=-2, keepdim=True)) / (x.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6)
    return x.reshape(b, x.shape[1], -1)


def hidden_mask(noise: Noise, ratio: float) -> Tensor:
    """MAE's random masking as a boolean mask [B, N]: the K tokens of lowest noise visible, the rest hidden."""
    b, n = noise.values.shape
    keep = int(n * (1 - ratio))
    return torch.ones(b, n).scatter(1, torch.argsort(noise.values, dim=1)[:, :keep], 0.0).bool()


def in_place(rows: Tensor, mask: Tensor) -> Tensor:
    """The hidden tokens' predictions [B, M, P] (ascending, as both codebases return them) at their tokens, zeros
    elsewhere: [B, N, P]."""
    b, n = mask.shape
    out = rows.new_zeros(b, n, rows.shape[-1])
    out[mask] = rows.reshape(-1, rows.shape[-1])
    return out


# ---- Hugging Face transformers VideoMAEForPreTraining (tiny, randomly initialised) -------------------------

#: 8 frames of 8x8 in tubelets 2x4x4: a (4, 2, 2) grid, N = 16 (square, for the learned masker)
HF_VIDEO_TINY = dict(
    image_size=8, patch_size=4, num_channels=3, num_frames=8, tubelet_size=2, hidden_size=32, num_hidden_layers=2,
    num_attention_heads=2, intermediate_size=64, decoder_hidden_size=16, decoder_num_hidden_layers=1,
    decoder_num_attention_heads=2, decoder_intermediate_size=32,
)  # fmt: skip


def hf_video_build_raw(seed: int, norm_pix_loss: bool = False) -> nn.Module:
    from maskkit.adapters.hf_video import create_hf_video_mae

    return seeded(seed, lambda: create_hf_video_mae(**HF_VIDEO_TINY, norm_pix_loss=norm_pix_loss)).eval()


def hf_video_build(seed: int, norm_pix_loss: bool) -> nn.Module:
    from maskkit.adapters.hf_video import wrap

    return wrap(hf_video_build_raw(seed, norm_pix_loss))


def hf_video_call(model: nn.Module, clips: Tensor, mask: Tensor) -> Any:
    """The user's call: pixel_values [B, T, C, H, W] (frames before channels) and bool_masked_pos [B, N]."""
    return model(pixel_values=clips.permute(0, 2, 1, 3, 4).contiguous(), bool_masked_pos=mask)


def hf_video_own_loss(mae: nn.Module, clips: Tensor, noise: Noise, ratio: float) -> Triple:
    mask = hidden_mask(noise, ratio)
    out = hf_video_call(mae.model, clips, mask)
    return out.loss, in_place(out.logits, mask), mask.float()


def hf_video_own_features(mae: nn.Module, clips: Tensor) -> Tensor:
    """transformers' encoder with nothing masked (bool_masked_pos None), its tokens' mean."""
    return mae.model.videomae(clips.permute(0, 2, 1, 3, 4).contiguous()).last_hidden_state.mean(dim=1)


def hf_video_attach(raw: nn.Module, clips: Tensor) -> Callable[[], None]:
    from maskkit.adapters.hf_video import hf_video_loss, wrap

    mae = wrap(raw)
    assert mae.model is raw
    mae(clips).loss.backward()
    hf_video_loss(raw, clips, create_policy("random"), ratio=0.5).loss.backward()
    return lambda: None  # nothing to undo: wrapping must not change the model


def hf_video_raw_output(model: nn.Module, clips: Tensor, noise: Noise) -> tuple[Tensor, ...]:
    out = hf_video_call(model, clips, hidden_mask(noise, 0.9))
    return out.loss, out.logits


# ---- the official VideoMAE interface: the stand-in tests/data/videomae_standin/modeling_pretrain.py ------------

#: the v1 class always builds 16 frames; tubelets 4x4x4 on 8x8 frames: a (4, 2, 2) grid, N = 16
VIDEOMAE_MODEL = dict(
    encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, decoder_embed_dim=16, decoder_depth=1,
    decoder_num_heads=2, mlp_ratio=2.0, qkv_bias=True, tubelet_size=4,
)  # fmt: skip


def videomae_build_raw(seed: int) -> nn.Module:
    from maskkit.adapters.kind_videomae import load_videomae_module

    module = load_videomae_module(STANDIN)
    return seeded(seed, lambda: module.PretrainVisionTransformer(
        img_size=8, patch_size=4, encoder_in_chans=3, decoder_num_classes=3 * 4 * 4 * 4, **VIDEOMAE_MODEL
    )).eval()  # fmt: skip


def videomae_build(seed: int, norm_pix_loss: bool) -> nn.Module:
    from maskkit.adapters.videomae import wrap

    return wrap(videomae_build_raw(seed), norm_pix_loss)


def videomae_own_loss(mae: nn.Module, clips: Tensor, noise: Noise, ratio: float) -> Triple:
    """engine_for_pretraining's step: `outputs = model(videos, bool_masked_pos)`, labels by hand, `MSELoss()`."""
    mask = hidden_mask(noise, ratio)
    outputs = mae.model(clips, mask)  # [B, M, P]
    target = videomae_targets_by_hand(clips, 4, 4, mae.norm_pix_loss)
    labels = target[mask].reshape(clips.shape[0], -1, target.shape[-1])
    return nn.MSELoss()(input=outputs, target=labels), in_place(outputs, mask), mask.float()


def videomae_own_features(mae: nn.Module, clips: Tensor) -> Tensor:
    """The encoder's own forward_features with nothing hidden, its tokens' mean."""
    nothing = torch.zeros(clips.shape[0], mae.num_patches, dtype=torch.bool)
    return mae.model.encoder.forward_features(clips, nothing).mean(dim=1)


def videomae_attach(raw: nn.Module, clips: Tensor) -> Callable[[], None]:
    from maskkit.adapters.videomae import videomae_step_loss, wrap

    mae = wrap(raw)
    assert mae.model is raw
    mae(clips).loss.backward()
    videomae_step_loss(raw, clips, create_policy("random"), ratio=0.5).loss.backward()
    return lambda: None  # nothing to undo: wrapping must not change the model


def videomae_raw_output(model: nn.Module, clips: Tensor, noise: Noise) -> tuple[Tensor, ...]:
    return (model(clips, hidden_mask(noise, 0.9)),)


# ---- the cases ------------------------------------------------------------------------------------

CASES = {
    "timm": AdapterCase(
        name="timm", img_size=28, in_chans=1, patch_size=4, embed_dim=32,
        build=timm_build, own_loss=timm_own_loss, own_features=timm_own_features,
        features_tol=dict(rtol=0, atol=1e-6), raw_of=lambda mae: mae.encoder,
        build_raw=timm_build_raw, attach=timm_attach, raw_output=timm_raw_output, adds_parameters=True,
        spec="timm:tiny", spec_options={k: v for k, v in {**TIMM_ENCODER, **TIMM_DECODER}.items()
                                        if k not in ("img_size", "patch_size", "in_chans")},
    ),
    "official": AdapterCase(
        name="official", img_size=16, in_chans=3, patch_size=4, embed_dim=32,
        build=official_build, own_loss=official_own_loss, own_features=official_own_features,
        features_tol=dict(rtol=1e-5, atol=1e-5), raw_of=lambda mae: mae.model,
        build_raw=official_build_raw, attach=official_attach, raw_output=official_raw_output,
        spec=f"official:{EXAMPLES / 'models_mae.py'}:mae_vit_tiny_patch4",
    ),
    "hf": AdapterCase(
        name="hf", img_size=16, in_chans=3, patch_size=4, embed_dim=32,
        build=hf_build, own_loss=hf_own_loss, own_features=hf_own_features,
        features_tol=dict(rtol=1e-5, atol=1e-5), raw_of=lambda mae: mae.model,
        build_raw=hf_build_raw, attach=hf_attach, raw_output=hf_raw_output, needs="transformers",
        spec="hf:tiny", spec_options={k: v for k, v in HF_TINY.items()
                                      if k not in ("image_size", "patch_size", "num_channels")},
    ),
    "video": AdapterCase(
        name="video", img_size=16, in_chans=3, patch_size=4, embed_dim=32, num_frames=8, tubelet_size=2,
        has_cls=False, build=video_build, own_loss=video_own_loss, own_features=video_own_features,
        features_tol=dict(rtol=0, atol=1e-6), raw_of=lambda mae: mae, build_raw=lambda seed: video_build(seed, False),
        attach=video_attach, raw_output=video_raw_output, spec="video:micro", spec_options=VIDEO_MODEL,
    ),
    "hf-video": AdapterCase(
        name="hf-video", img_size=8, in_chans=3, patch_size=4, embed_dim=32, num_frames=8, tubelet_size=2,
        has_cls=False, build=hf_video_build, own_loss=hf_video_own_loss, own_features=hf_video_own_features,
        features_tol=dict(rtol=1e-5, atol=1e-6), raw_of=lambda mae: mae.model, build_raw=hf_video_build_raw,
        attach=hf_video_attach, raw_output=hf_video_raw_output, needs="transformers",
        own_targets=lambda mae, clips: videomae_targets_by_hand(clips, 2, 4, mae.norm_pix_loss),
        spec="hf-video:tiny", spec_options={k: v for k, v in HF_VIDEO_TINY.items()
                                            if k not in ("image_size", "patch_size", "num_channels", "num_frames")},
    ),
    "videomae": AdapterCase(
        name="videomae", img_size=8, in_chans=3, patch_size=4, embed_dim=32, num_frames=16, tubelet_size=4,
        has_cls=False, build=videomae_build, own_loss=videomae_own_loss, own_features=videomae_own_features,
        features_tol=dict(rtol=1e-5, atol=1e-6), raw_of=lambda mae: mae.model, build_raw=videomae_build_raw,
        attach=videomae_attach, raw_output=videomae_raw_output,
        own_targets=lambda mae, clips: videomae_targets_by_hand(clips, 4, 4, mae.norm_pix_loss),
        spec=f"videomae:{STANDIN}", spec_options=VIDEOMAE_MODEL,
    ),
}  # fmt: skip
REGISTERED = ADAPTERS.names()  # every registered adapter is a param: one without a case fails


@pytest.fixture(params=REGISTERED)
def case(request) -> AdapterCase:
    if request.param not in CASES:
        pytest.fail(f"adapter {request.param!r} is registered but has no AdapterCase in CASES")
    found = CASES[request.param]
    if found.needs:
        pytest.importorskip(found.needs)
    return found


def make_images(case: AdapterCase) -> Tensor:
    """The case's input: images [B, C, H, W] or clips [B, C, T, H, W]."""
    return torch.randn(*case.input_shape(B), generator=torch.Generator().manual_seed(7))


def make_noise(case: AdapterCase) -> Noise:
    return Noise.draw(11, B, case.num_patches)


@pytest.fixture()
def images(case) -> Tensor:
    return make_images(case)


@pytest.fixture()
def noise(case) -> Noise:
    return make_noise(case)


def hidden(case: AdapterCase, ratio: float = 0.75) -> int:
    return case.num_patches - num_visible(case.num_patches, ratio)


# ---- the suite ------------------------------------------------------------------------------------


def test_protocol_attributes_and_shapes(case, images):
    mae = case.build(0, False)
    n, d = case.num_patches, case.embed_dim
    assert is_mae(mae)
    assert (mae.patch_size, mae.num_patches, mae.embed_dim, mae.in_chans, mae.norm_pix_loss) == (
        case.patch_size, n, d, case.in_chans, False,
    )  # fmt: skip
    assert is_video_mae(mae) == case.is_video and token_grid(mae) == case.grid
    if case.is_video:
        assert (mae.num_frames, mae.tubelet_size, tuple(mae.grid)) == (case.num_frames, case.tubelet_size, case.grid)
    assert mae.patch_tokens(images).shape == (B, n, d)
    assert mae.patchify(images).shape == (B, n, case.patch_dim)
    assert mae.features(images).shape == (B, d)
    attention = mae.cls_attention(images)
    assert attention.shape == (B, n) and bool((attention > 0).all())
    if case.has_cls:  # softmax rows over CLS + N: the patches' share < 1
        assert bool((attention.sum(-1) < 1).all())
    else:  # the attention each token receives, averaged over queries: the shares sum to 1
        torch.testing.assert_close(attention.sum(-1), torch.ones(B), rtol=0, atol=1e-5)
    # the wrapper trains the codebase's own parameters (the same tensors, not copies)
    raw = case.raw_of(mae)
    own = [id(p) for p in raw.parameters()]
    assert own and set(own) <= {id(p) for p in mae.parameters()}
    if not case.adds_parameters:
        assert list(mae.parameters()) == list(raw.parameters())


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_random_policy_bit_identical_to_own_loss(case, images, noise, norm_pix_loss):
    if norm_pix_loss not in case.norm_pix_options:
        pytest.skip(f"{case.name} has no norm_pix_loss={norm_pix_loss}")
    mae = case.build(0, norm_pix_loss)
    assert mae.norm_pix_loss == norm_pix_loss
    for ratio in (0.75, 0.6):
        loss, pred, mask = case.own_loss(mae, images, noise, ratio)
        assert mask.sum().item() == B * hidden(case, ratio)
        out = mae_step_loss(mae, create_policy("random", ratio=ratio), images, noise=noise.values)
        assert torch.equal(out.loss, loss) and torch.equal(out.pred, pred)
        assert torch.equal(out.plan.mask, mask) and out.aux_loss is None
        # the wrapper's forward (default policy: random) with the call's ratio
        again = mae(images, ratio=ratio, noise=noise.values)
        assert torch.equal(again.loss, loss) and torch.equal(again.pred, pred)
        # without noise, the random policy draws torch.rand(B, N) from the global RNG, as MAE does
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(noise.seed)
            drawn = mae_step_loss(mae, create_policy("random", ratio=ratio), images)
        assert torch.equal(drawn.loss, loss) and torch.equal(drawn.plan.mask, mask)
    default = mae(images, noise=noise.values)  # default policy and ratio: random, 0.75
    loss, pred, mask = case.own_loss(mae, images, noise, 0.75)
    assert torch.equal(default.loss, loss) and torch.equal(default.pred, pred)
    assert torch.equal(default.plan.mask, mask)


def test_weighted_plan_weights_the_own_per_patch_loss(case, images, noise):
    mae = case.build(0, False)
    weights = torch.rand(B, case.num_patches, generator=torch.Generator().manual_seed(3)) + 0.5
    out = mae_forward(mae, images, MaskPlan.from_scores(noise.values, 0.75, weights=weights))
    _, pred, mask = case.own_loss(mae, images, noise, 0.75)
    per_patch = ((pred - targets_of(case, mae, images)) ** 2).mean(dim=-1)  # [B, N]
    assert torch.equal(out.pred, pred) and torch.equal(out.per_patch, per_patch)
    assert torch.equal(out.loss, (per_patch * (mask * weights)).sum() / mask.sum())


def test_plan_round_trip(case, images, noise):
    mae = case.build(0, False)
    n = case.num_patches
    k = num_visible(n, 0.75)
    # patchify: MAE's layout ('nchpwq->nhwpqc'; VideoMAE's for clips), and unpatchify its exact inverse
    patches = mae.patchify(images)
    assert torch.equal(patches, reference_patchify(case, images)) and torch.equal(mae.unpatchify(patches), images)
    # the random policy's plan: the K patches of lowest noise visible, in that order
    tokens = mae.patch_tokens(images)  # [B, N, D]
    plan = create_policy("random", ratio=0.75)(tokens, noise=noise.values)
    order = torch.argsort(noise.values, dim=1)  # [B, N] the shuffle
    assert torch.equal(plan.ids_keep, order[:, :k])
    assert torch.equal(plan.ids_restore, torch.argsort(order, dim=1))
    assert torch.equal(plan.mask, torch.ones(B, n).scatter(1, order[:, :k], 0.0))
    assert torch.equal(plan.mask.gather(1, plan.ids_keep), torch.zeros(B, k))
    assert torch.equal(plan.mask.sum(1), torch.full((B,), float(n - k)))
    # gather, then restore, gives back the original order
    shuffled = gather_tokens(tokens, order)  # visible first, then hidden
    assert torch.equal(plan.gather(tokens), shuffled[:, :k])
    assert torch.equal(plan.restore(shuffled), tokens)
    token = torch.full((1, 1, tokens.shape[-1]), 7.0)
    filled = plan.fill(plan.gather(tokens), token)  # visible back in place, the token elsewhere
    expected_fill = torch.where(plan.mask[..., None].bool(), token.expand_as(tokens), tokens)
    assert torch.equal(filled, expected_fill)
    # encode / decode through the protocol: the codebase's own prediction for the same noise
    latent = mae.encode(tokens, plan)
    assert latent.shape == (B, int(case.has_cls) + k, case.embed_dim)
    pred = mae.decode(latent, plan)
    assert pred.shape == (B, n, case.patch_dim)
    _, own_pred, own_mask = case.own_loss(mae, images, noise, 0.75)
    assert torch.equal(pred, own_pred) and torch.equal(plan.mask, own_mask)


def test_features_are_the_unmasked_cls_after_the_final_norm(case, images):
    mae = case.build(0, False)
    features = mae.features(images)
    assert features.shape == (B, case.embed_dim)
    torch.testing.assert_close(features, case.own_features(mae, images), **case.features_tol)


def test_learned_masker_gets_gradients(case, images):
    mae = case.build(0, False)
    masker = seeded(0, lambda: create_policy(
        "learned", ratio=0.75, embed_dim=mae.embed_dim, num_patches=mae.num_patches
    ))  # fmt: skip
    out = mae_step_loss(mae, masker, images)
    plan = out.plan
    assert plan.weights is not None and plan.weights.requires_grad
    assert torch.equal(plan.mask.sum(1), torch.full((B,), float(hidden(case))))
    per_patch = ((out.pred - targets_of(case, mae, images)) ** 2).mean(dim=-1)
    assert torch.equal(out.loss, (per_patch * (plan.mask * plan.weights)).sum() / plan.mask.sum())
    out.loss.backward()
    params = [p for p in masker.parameters() if p.requires_grad]
    assert params
    for param in params:
        assert param.grad is not None and bool(torch.isfinite(param.grad).all())
        assert param.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in case.raw_of(mae).parameters())


def test_attach_and_undo_leave_the_codebase_model_unchanged(case, images, noise):
    raw, twin = case.build_raw(0), case.build_raw(0)
    attrs = set(raw.__dict__)
    state = {key: value.clone() for key, value in raw.state_dict().items()}
    before = case.raw_output(raw, images, noise)
    undo = case.attach(raw, images)
    undo()
    undo()  # idempotent
    assert set(raw.__dict__) == attrs and "forward" not in raw.__dict__
    assert raw.forward.__func__ is type(raw).forward
    assert list(raw.state_dict()) == list(state)
    assert all(torch.equal(value, state[key]) for key, value in raw.state_dict().items())
    after = case.raw_output(raw, images, noise)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(case.raw_output(twin, images, noise), after, strict=True))


def test_state_dict_round_trip(case, images, noise):
    mae = case.build(0, False)
    policy = create_policy("random", ratio=0.75)
    expected = mae_step_loss(mae, policy, images, noise=noise.values)
    buffer = io.BytesIO()
    torch.save(mae.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = case.build(1, False)
    assert not torch.equal(mae_step_loss(fresh, policy, images, noise=noise.values).loss, expected.loss)
    result = fresh.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert list(fresh.state_dict()) == list(mae.state_dict())
    got = mae_step_loss(fresh, policy, images, noise=noise.values)
    assert torch.equal(got.loss, expected.loss) and torch.equal(got.pred, expected.pred)
    assert torch.equal(case.own_loss(fresh, images, noise, 0.75)[0], expected.loss)  # the codebase's own, too


@pytest.mark.slow
def test_transformer_blocks_compile_to_the_same_loss(case, images, noise):
    """`--compile` compiles exactly the adapter's encoder and decoder blocks; the loss does not change."""
    mae, ref = case.build(0, False), case.build(0, False)
    blocks = transformer_blocks(mae)
    submodules = {id(m) for m in mae.modules()}
    assert len(blocks) >= 2 and all(id(b) in submodules for b in blocks)
    assert compile_blocks(mae, "eager") == len(blocks) and is_compiled(mae)
    random = create_policy("random")
    got, want = (mae_step_loss(m, random, images, noise=noise.values).loss for m in (mae, ref))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_the_registered_adapter_builds_the_case_model(case):
    """`--model SPEC` (the registered adapter) builds the very model the suite checks, weight for weight."""
    assert case.spec.partition(":")[0] == case.name  # the case is the registered adapter's
    for seed, norm_pix_loss in ((0, False), (3, True)):
        built = create_mae_from_spec(
            case.spec, img_size=case.img_size, in_chans=case.in_chans, patch_size=case.patch_size, seed=seed,
            norm_pix_loss=norm_pix_loss, options=case.spec_options, **case.build_sizes,
        )  # fmt: skip
        want = case.build(seed, norm_pix_loss)
        assert is_mae(built) and type(built) is type(want) and built.norm_pix_loss == norm_pix_loss
        got, expected = built.state_dict(), want.state_dict()
        assert list(got) == list(expected) and all(torch.equal(got[k], expected[k]) for k in got)


def test_every_registered_adapter_has_a_case():
    assert set(REGISTERED) >= {"timm", "official", "hf", "video", "hf-video", "videomae"}
    assert set(ADAPTERS.names()) <= set(CASES), "add an AdapterCase for every registered adapter"


#: the suite, for an adapter registered at run time (a plugin): every test above that takes a case
SUITE = (
    test_protocol_attributes_and_shapes,
    test_random_policy_bit_identical_to_own_loss,
    test_weighted_plan_weights_the_own_per_patch_loss,
    test_plan_round_trip,
    test_features_are_the_unmasked_cls_after_the_final_norm,
    test_learned_masker_gets_gradients,
    test_attach_and_undo_leave_the_codebase_model_unchanged,
    test_state_dict_round_trip,
    test_transformer_blocks_compile_to_the_same_loss,
    test_the_registered_adapter_builds_the_case_model,
)


def check_conformance(case: AdapterCase) -> list[str]:
    """Run every test of the suite on `case` (fresh images and noise for each); returns the tests run."""
    ran = []
    for test in SUITE:
        params = inspect.signature(test).parameters
        for norm_pix_loss in case.norm_pix_options if "norm_pix_loss" in params else (None,):
            given = {"case": case, "images": make_images(case), "noise": make_noise(case), "norm_pix_loss": norm_pix_loss}
            test(**{name: given[name] for name in params})
        ran.append(test.__name__)
    return ran
