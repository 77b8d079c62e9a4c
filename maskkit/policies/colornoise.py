"""ColorMAE masking: threshold filtered ("coloured") random noise (Hinojosa et al., ECCV 2024).

A noise bank for the `bank` option is made with

    python -m maskkit.noise_bank --color green --grid 14 --count 1024 --out bank.pt

(options: --seed, --sigma-fine, --sigma-coarse; see `maskkit.noise_bank`), or in Python with
`make_noise_bank` and `torch.save`. Nothing is downloaded.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from maskkit.plan import MaskPlan
from maskkit.policies.base import MaskPolicy
from maskkit.policies.card import CardInfo
from maskkit.policies.learned import grid_side
from maskkit.policies.registry import register_policy

COLORS = ("green", "red", "blue", "purple", "white")
DEFAULT_SIGMA_FINE = 0.5
DEFAULT_SIGMA_COARSE = 2.0


def gaussian_lowpass(
    side: int, sigma: float, dtype: torch.dtype = torch.float64, device: Any = None
) -> Tensor:
    """Transfer function [side, side] of a circular Gaussian blur of std `sigma` patches.

    H(f) = exp(-2 pi^2 sigma^2 |f|^2), f in cycles per patch (torch.fft.fftfreq layout); sigma = 0 gives 1.
    """
    freq = torch.fft.fftfreq(side, dtype=dtype, device=device)  # [S] cycles / patch
    f2 = freq[:, None] ** 2 + freq[None, :] ** 2  # [S, S]
    return torch.exp(-2.0 * math.pi**2 * sigma**2 * f2)


def color_filter(
    color: str,
    side: int,
    sigma_fine: float = DEFAULT_SIGMA_FINE,
    sigma_coarse: float = DEFAULT_SIGMA_COARSE,
    dtype: torch.dtype = torch.float64,
    device: Any = None,
) -> Tensor:
    """Real, symmetric transfer function [side, side] of a noise colour (see ColorNoisePolicy)."""
    _check_color(color)
    _check_sigmas(sigma_fine, sigma_coarse)
    fine = gaussian_lowpass(side, sigma_fine, dtype, device)  # keeps all but the highest frequencies
    coarse = gaussian_lowpass(side, sigma_coarse, dtype, device)  # keeps only the lowest
    if color == "red":
        return coarse
    if color == "blue":
        return 1.0 - fine
    if color == "green":
        return fine - coarse
    if color == "purple":
        return 1.0 - (fine - coarse)
    return torch.ones_like(fine)  # white


def filter_noise(
    white: Tensor,
    color: str,
    sigma_fine: float = DEFAULT_SIGMA_FINE,
    sigma_coarse: float = DEFAULT_SIGMA_COARSE,
) -> Tensor:
    """Colour white noise [..., S, S] by circular filtering in the Fourier domain: same shape, real."""
    side = white.shape[-1]
    if white.dim() < 2 or white.shape[-2] != side:
        raise ValueError(f"white noise must be [..., S, S], got shape {tuple(white.shape)}")
    work = white.to(torch.float64)
    h = color_filter(color, side, sigma_fine, sigma_coarse, device=white.device)  # [S, S]
    return torch.fft.ifft2(torch.fft.fft2(work) * h).real.to(
        white.dtype if white.is_floating_point() else torch.float32
    )


def make_noise_bank(
    color: str,
    grid: int,
    count: int,
    seed: int = 0,
    sigma_fine: float = DEFAULT_SIGMA_FINE,
    sigma_coarse: float = DEFAULT_SIGMA_COARSE,
) -> Tensor:
    """`count` coloured noise patterns of grid x grid patches from a seeded generator: [count, grid, grid].

    Each pattern is centred uniform white noise filtered by `filter_noise`, hence periodic: any
    circular shift (or crop) of it is as valid as the pattern itself. float32.
    """
    _check_color(color)
    if not _positive_int(grid) or grid < 2:
        raise ValueError(f"grid must be an integer >= 2, got {grid!r}")
    if not _positive_int(count):
        raise ValueError(f"count must be a positive integer, got {count!r}")
    gen = torch.Generator().manual_seed(int(seed))
    white = torch.rand(count, grid, grid, generator=gen, dtype=torch.float64) - 0.5  # [count, S, S]
    return filter_noise(white, color, sigma_fine, sigma_coarse).to(torch.float32)


def load_noise_bank(path: str, color: str | None = None) -> Tensor:
    """A bank saved by `torch.save` (a [count, S, S] tensor, or a dict with "patterns" and maybe "color").

    Loaded with weights_only=True. A dict whose "color" differs from `color` is refused.
    """
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # missing file, not a torch file, unsafe pickle ...
        raise ValueError(f"cannot read noise bank {path!r}: {err}") from None
    if isinstance(data, dict):
        saved = data.get("color")
        if color is not None and saved is not None and saved != color:
            raise ValueError(f"noise bank {path!r} holds {saved!r} noise but the policy's color is {color!r}")
        data = data.get("patterns")
    if not isinstance(data, Tensor) or data.dim() != 3 or data.shape[1] != data.shape[2] or data.shape[0] < 1:
        shape = tuple(data.shape) if isinstance(data, Tensor) else type(data).__name__
        raise ValueError(f"noise bank {path!r} must hold patterns of shape [count, S, S], got {shape}")
    if not data.is_floating_point() or not bool(torch.isfinite(data).all()):
        raise ValueError(f"noise bank {path!r} must hold finite floating-point patterns")
    return data.to(torch.float32)


@register_policy("colornoise")
class ColorNoisePolicy(MaskPolicy):
    """ColorMAE masking: threshold low-, high-, band-pass or band-stop filtered random noise.

    Hinojosa, Liu and Ghanem, "ColorMAE: Exploring data-independent masking strategies in Masked
    AutoEncoders", ECCV 2024. White noise W on the patch grid is filtered into a "colour", and the
    K = int(N * (1 - ratio)) patches with the lowest filtered value stay visible
    (`MaskPlan.from_scores`), so exactly N - K are hidden. (ColorMAE keeps the highest values
    visible; the filters are linear and W is symmetric, so -W filtered has the same law and the
    masks have the same distribution.) Colours, with G_s a Gaussian blur of std s patches:

        red    (low-pass):  G_coarse * W                  -> large blobs
        blue   (high-pass): W - G_fine * W                -> fine, evenly spread patches
        green  (band-pass): G_fine * W - G_coarse * W     -> mid-size blobs at mid spacing (DEFAULT)
        purple (band-stop): W - green = red + blue
        white:              W (no filter: random masking)

    as ColorMAE defines them (blur, original minus blur, difference of Gaussians, original minus
    band-pass). Here the blur is circular and applied in the Fourier domain (torch.fft):
    H_s(f) = exp(-2 pi^2 s^2 |f|^2), f in cycles per patch, so the two cut-offs
    1 / (2 pi s) are about 0.32 (sigma_fine = 0.5) and 0.08 (sigma_coarse = 2) cycles per patch; the
    green passband peaks near |f| = 0.19 (a period of about 5 patches). The cut-offs are in patch
    units, as ColorMAE's patterns are drawn at patch resolution; the paper's exact kernel sizes,
    and its iterative refinement of the patterns, are not reproduced. Filtering is periodic, so
    masks wrap around the grid edges and no position is favoured. With color="white" the plan
    equals `RandomPolicy`'s for the same noise.

    Randomness: on the fly, `noise` [B, N] (uniforms, one per patch: the white noise, centred)
    fixes the draw, else it is drawn from `generator`. With a `bank` (a file of precomputed
    patterns, `make_noise_bank`), each sample takes a random pattern, a random circular shift,
    its top-left S x S crop (the bank's side may exceed S, as ColorMAE crops larger patterns) and
    one of the 8 flips / transposes of the square (ColorMAE flips); those four draws are the first
    four columns of `noise` if given, else `generator` draws. The bank's patterns were filtered when
    made, so `sigma_fine` / `sigma_coarse` do not apply to them, and `color` must match the colour
    recorded in the file (if any). The bank is a non-persistent buffer: it follows `.to()` and is
    not in the state_dict.

    Args:
        ratio: fraction of patches hidden, in (0, 1). Default 0.75 (ColorMAE).
        color: "green" (default), "red", "blue", "purple" or "white".
        sigma_fine: std, in patches, of the weak blur (blue, green, purple). Default 0.5.
        sigma_coarse: std, in patches, of the strong blur (red, green, purple); > sigma_fine. Default 2.0.
        bank: path of a noise bank saved by `torch.save` (loaded with weights_only=True), or None to
            filter fresh noise at every call. Default None.
    """

    card_info = CardInfo(
        paper="Hinojosa et al., ECCV 2024",
        idea="ColorMAE: hide where filtered (coloured) random noise on the patch grid is highest",
        learns="nothing",
        allowed={"color": "green | red | blue | purple | white", "sigma_fine": "> 0",
                 "sigma_coarse": "> sigma_fine", "bank": "path | None"},
    )

    def __init__(
        self,
        ratio: float = 0.75,
        color: str = "green",
        sigma_fine: float = DEFAULT_SIGMA_FINE,
        sigma_coarse: float = DEFAULT_SIGMA_COARSE,
        bank: str | None = None,
    ) -> None:
        super().__init__(ratio)
        _check_color(color)
        _check_sigmas(sigma_fine, sigma_coarse)
        self.color = color
        self.sigma_fine = float(sigma_fine)
        self.sigma_coarse = float(sigma_coarse)
        self.bank_path = None if bank is None else str(bank)
        patterns = None if bank is None else load_noise_bank(str(bank), color)  # [count, M, M]
        self.register_buffer("bank", patterns, persistent=False)

    def make_plan(self, tokens: Tensor, ratio: float, *, noise: Tensor | None = None,
                  generator: torch.Generator | None = None, **context: Any) -> MaskPlan:
        batch, n = tokens.shape[:2]  # tokens: [B, N, D]
        self.refuse_space_time(context.get("grid"))
        side = grid_side(n)
        if noise is not None and tuple(noise.shape) != (batch, n):
            raise ValueError(f"noise must have shape {(batch, n)}, got {tuple(noise.shape)}")
        if self.bank is None:
            if noise is None:
                noise = torch.rand(batch, n, device=tokens.device, generator=generator)  # [B, N]
            white = noise.to(device=tokens.device, dtype=torch.float64) - 0.5  # [B, N] centred
            if self.color == "white":
                scores = white
            else:
                scores = filter_noise(
                    white.reshape(batch, side, side), self.color, self.sigma_fine, self.sigma_coarse
                )
        else:
            draws = None if noise is None else noise[:, :4]
            scores = self._from_bank(batch, side, draws, generator, tokens.device)  # [B, S, S]
        return MaskPlan.from_scores(scores.reshape(batch, n).to(torch.get_default_dtype()), ratio)

    def _from_bank(
        self, batch: int, side: int, draws: Tensor | None, generator: torch.Generator | None, device: Any
    ) -> Tensor:
        """Random patterns of the bank, shifted, cropped to side x side and flipped: [B, side, side]."""
        bank = self.bank.to(device)  # [count, M, M]
        count, big = bank.shape[0], bank.shape[-1]
        if big < side:
            raise ValueError(
                f"noise bank patterns are {big}x{big}, smaller than the {side}x{side} patch grid"
            )
        if draws is None:
            draws = torch.rand(batch, 4, device=device, generator=generator)  # [B, 4]
        draws = draws.to(device=device, dtype=torch.float64).clamp(0.0, 1.0 - 1e-12)
        index = (draws[:, 0] * count).long()  # [B] pattern
        shift_r = (draws[:, 1] * big).long()  # [B]
        shift_c = (draws[:, 2] * big).long()  # [B]
        sym = (draws[:, 3] * 8).long()  # [B] one of the 8 symmetries of the square
        coords = torch.arange(side, device=device)
        rows = coords[None, :, None].expand(batch, side, side)  # [B, S, S] output row
        cols = coords[None, None, :].expand(batch, side, side)  # [B, S, S] output column
        transpose = (sym & 4).bool()[:, None, None]
        rows, cols = torch.where(transpose, cols, rows), torch.where(transpose, rows, cols)
        rows = torch.where((sym & 1).bool()[:, None, None], side - 1 - rows, rows)
        cols = torch.where((sym & 2).bool()[:, None, None], side - 1 - cols, cols)
        rows = (rows + shift_r[:, None, None]) % big
        cols = (cols + shift_c[:, None, None]) % big
        flat = index[:, None, None] * big * big + rows * big + cols  # [B, S, S]
        return bank.reshape(-1)[flat]

    def extra_repr(self) -> str:
        return (
            f"ratio={self.ratio}, color={self.color!r}, sigma_fine={self.sigma_fine}, "
            f"sigma_coarse={self.sigma_coarse}, bank={self.bank_path!r}"
        )


def _check_color(color: Any) -> None:
    if color not in COLORS:
        raise ValueError(f"noise color must be one of {COLORS}, got {color!r}")


def _check_sigmas(sigma_fine: Any, sigma_coarse: Any) -> None:
    for name, value in (("sigma_fine", sigma_fine), ("sigma_coarse", sigma_coarse)):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value <= 0
        ):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if not sigma_coarse > sigma_fine:
        raise ValueError(f"sigma_coarse ({sigma_coarse}) must exceed sigma_fine ({sigma_fine})")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
