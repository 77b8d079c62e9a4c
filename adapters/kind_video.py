"""The `video` model kind: `--model video:NAME`, a size preset of the built-in video MAE (`maskkit.adapters.video_mae`).

The run's data fix the clip (frames from `BuildRequest.num_frames`, image size, channels) and the run picks the
patch size as for timm presets (`requires_patch_size`: the preset's own if it fits the frames, else a smaller one);
the tubelet size and the model's widths are the preset's unless `--model-opt` sets them.
"""

from __future__ import annotations

from torch import nn

from maskkit.registry import Card

from . import video_mae
from .adapter import BuildRequest, ModelAdapter, ModelSpec, register_adapter


@register_adapter(
    "video",
    card=Card(
        idea="the built-in video MAE (VideoMAE's design on timm blocks: tubelets, no CLS, a narrow decoder that "
        "may reconstruct only a decoder subset), of a named size preset",
        paper="Tong et al., NeurIPS 2022; Wang et al., CVPR 2023",
        allowed={"preset": " | ".join(video_mae.list_video_presets()) + " (or register_video_preset)"},
    ),
)
class VideoAdapter(ModelAdapter):
    """A video MAE size preset (`--model video:micro`, `--model video:vit-b`)."""

    forms = ("video:NAME",)
    requires_patch_size = True

    def __init__(self, preset: str = "micro") -> None:
        video_mae.get_video_preset(preset)  # one-line ValueError listing the presets
        self.preset = preset

    @classmethod
    def parse(cls, arg: str) -> VideoAdapter:
        return cls(arg)

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec("video", self.preset)

    def preferred_patch_size(self) -> int | None:
        return video_mae.get_video_preset(self.preset).patch_size

    def build(self, request: BuildRequest) -> nn.Module:
        if request.patch_size is None:
            raise ValueError(f"video preset {self.preset!r} needs an explicit patch_size (the run chooses it)")
        return video_mae.create_video_mae(
            self.preset, num_frames=request.num_frames, img_size=request.sizes, patch_size=request.patch_size,
            in_chans=request.in_chans, norm_pix_loss=request.norm_pix_loss, seed=request.seed, **request.options,
        )  # fmt: skip
