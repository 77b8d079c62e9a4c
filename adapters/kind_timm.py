"""The `timm` model kind: `--model NAME` or `timm:NAME`, a size preset of `maskkit.adapters.timm`.

The run picks the patch size (`requires_patch_size`): the preset's own if it fits the images
(`preferred_patch_size`), else a smaller one.
"""

from __future__ import annotations

from torch import nn

from maskkit.registry import Card

from . import timm as timm_adapter
from .adapter import BuildRequest, ModelAdapter, ModelSpec, register_adapter
from .build import one_line


@register_adapter(
    "timm",
    card=Card(
        idea="an MAE around a timm VisionTransformer, of a named size preset (maskkit.adapters.timm)",
        paper="He et al., CVPR 2022",
        allowed={"preset": " | ".join(timm_adapter.list_presets()) + " (or register_preset)"},
    ),
)
class TimmAdapter(ModelAdapter):
    """A timm size preset (`--model micro`, `--model timm:vit-b`)."""

    forms = ("a timm preset name", "timm:NAME")
    requires_patch_size = True

    def __init__(self, preset: str = "micro") -> None:
        timm_adapter.get_preset(preset)  # one-line ValueError listing the presets
        self.preset = preset

    @classmethod
    def parse(cls, arg: str) -> TimmAdapter:
        return cls(arg)

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec("timm", self.preset)

    def preferred_patch_size(self) -> int | None:
        return timm_adapter.get_preset(self.preset).patch_size

    def build(self, request: BuildRequest) -> nn.Module:
        if request.patch_size is None:
            raise ValueError(f"timm preset {self.preset!r} needs an explicit patch_size (the run chooses it)")
        try:
            return timm_adapter.create_mae(
                self.preset, img_size=request.img_size, patch_size=request.patch_size, in_chans=request.in_chans,
                norm_pix_loss=request.norm_pix_loss, seed=request.seed, **request.options,
            )  # fmt: skip
        except TypeError as err:
            raise ValueError(f"timm preset {self.preset!r} rejected its options: {one_line(err)}") from None
