"""The learned masker of MLO-MAE: a network that maps patch tokens to a masking probability.

The patches with the highest probabilities are hidden; the probabilities go into
`plan.weights`, the per-patch weights of the reconstruction loss, which is how the
downstream-feedback hypergradient reaches the masker's parameters.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from maskkit.plan import MaskPlan, check_grid
from maskkit.policies.card import CardInfo
from maskkit.policies.registry import register_policy
from maskkit.policies.scored import ScoredPolicy, uniform_noise
from maskkit.positions import sinusoid_table

ARCHS = ("token", "paper")
SELECTIONS = ("topk", "gumbel")
WEIGHTINGS = ("prob", "normalized", "straight")
DEFAULT_HIDDEN = {"paper": 512, "token": 128}


def grid_side(num_patches: int) -> int:
    """sqrt(N) for a square patch grid, else ValueError."""
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"expected a square patch grid, but N = {num_patches} is not a square")
    return side


def position_code(
    side: int, dim: int, dtype: torch.dtype = torch.float32, device: Any = None
) -> Tensor:
    """Fixed 2-D sin-cos position code of a side x side grid, row-major: [side*side, dim].

    The first half of `dim` encodes the row, the second half the column, each as
    [sin(p * w_i), cos(p * w_i)] with w_i = 10000^(-i / (dim/4)), i < dim/4 (MAE's frequencies; MAE
    itself puts the column first: the masker's own input needs no particular order).
    """
    return _row_col_code(side, side, dim, device).to(dtype)


def _row_col_code(num_rows: int, num_cols: int, dim: int, device: Any = None) -> Tensor:
    """`position_code` of a num_rows x num_cols grid, float64: [num_rows * num_cols, dim]."""
    if dim % 4:
        raise ValueError(f"sin-cos position width must be divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (
        torch.arange(dim // 4, dtype=torch.float64, device=device) / (dim // 4)
    )  # [dim/4]
    rows = torch.arange(num_rows, dtype=torch.float64, device=device).repeat_interleave(num_cols)  # [N] row of each
    cols = torch.arange(num_cols, dtype=torch.float64, device=device).repeat(num_rows)  # [N] column of each patch

    def code(p: Tensor) -> Tensor:
        angles = p[:, None] * omega[None, :]  # [N, dim/4]
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # [N, dim/2]

    return torch.cat([code(rows), code(cols)], dim=1)  # [N, dim]


def token_mlp(embed_dim: int, pos_dim: int, hidden_dim: int) -> nn.Sequential:
    """The per-token scorer: Linear(D + P, hidden) -> GELU -> Linear(hidden, 1), shared by all tokens."""
    return nn.Sequential(
        nn.Linear(embed_dim + pos_dim, hidden_dim),
        nn.GELU(),
        nn.Linear(hidden_dim, 1),  # [B, N, 1]
    )


def grid_position_code(grid: tuple[int, ...], dim: int, dtype: torch.dtype = torch.float32, device: Any = None) -> Tensor:
    """The fixed position code of a token grid, row-major: [N, dim]. A square image grid: `position_code` (bit for
    bit what the maskers always used); (H', W'): the same code on H' rows and W' columns; a clip's (T', H', W'):
    VideoMAE's 1-D sinusoid table over the N tokens (`maskkit.positions.sinusoid_table`: what the video MAE itself
    embeds its tokens with)."""
    if len(grid) == 3:
        return sinusoid_table(math.prod(grid), dim).to(dtype=dtype, device=device)
    rows, cols = grid
    if rows == cols:
        return position_code(rows, dim, dtype, device)
    return _row_col_code(rows, cols, dim, device).to(dtype)


def token_mlp_input(normed: Tensor, pos_dim: int, grid: tuple[int, ...] | None = None) -> Tensor:
    """Normalised tokens [B, N, D] with the grid's position code appended (`grid_position_code`; None: the square
    sqrt(N) x sqrt(N)): [B, N, D + P]."""
    batch, n, _ = normed.shape
    if not pos_dim:
        return normed
    shape = (grid_side(n),) * 2 if grid is None else check_grid(grid, n)
    pos = grid_position_code(shape, pos_dim, dtype=normed.dtype, device=normed.device)  # [N, P]
    return torch.cat([normed, pos.unsqueeze(0).expand(batch, -1, -1)], dim=-1)  # [B, N, D + P]


def weights_from_probs(probs: Tensor, mask: Tensor, weighting: str = "prob") -> Tensor:
    """Per-patch loss weights [B, N] from masking probabilities [B, N] and the mask [B, N] (1 = hidden).

    "prob": probs. "normalized": probs / (mean of probs over each image's hidden patches).
    "straight": 1 in value, d/d probs = 1 (straight-through).
    """
    if weighting == "prob":
        return probs
    if weighting == "normalized":
        hidden_mean = (probs * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True)  # [B, 1]
        return probs / hidden_mean
    if weighting == "straight":
        return (probs - probs.detach()) + 1.0  # exactly 1: the difference is exactly 0
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def gumbel_from_uniform(noise: Tensor) -> Tensor:
    """Standard Gumbel samples -log(-log(u)) from uniforms u in [0, 1] (clamped away from 0 and 1)."""
    tiny = torch.finfo(noise.dtype).tiny
    u = noise.clamp(min=tiny, max=1.0 - torch.finfo(noise.dtype).eps)
    return -torch.log(-torch.log(u))


@register_policy("learned")
class LearnedMasker(ScoredPolicy):
    """Learned masker (MLO-MAE): a network gives each patch a masking probability; the highest are hidden.

    Architectures:
        token (default): one MLP shared by all tokens, reading LayerNorm(token) concatenated with a
            fixed 2-D sin-cos position code of width `pos_dim` (square grid, sqrt(N) x sqrt(N)):
            Linear(D + pos_dim, hidden) -> GELU -> Linear(hidden, 1). Parameter count
            (D + pos_dim) * hidden + hidden + hidden + 1, independent of N: any resolution works.
        paper: the MLO-MAE reference masker: flatten [N * D] -> Linear -> ReLU -> Linear -> N logits.
            Parameter count N * D * hidden + hidden + hidden * N + N (100.8M at D=768, N=256,
            hidden=512); tied to the N it was built for.

    Selection:
        topk (default, as the paper): hide the N - K patches of highest probability.
        gumbel: Gumbel-top-k sampling, i.e. sampling N - K patches without replacement from
            softmax(logits / temperature): hide the top N - K of logits / temperature + G, with G
            standard Gumbel noise from `noise` [B, N] (uniforms) or `generator`. As the
            temperature goes to 0 this becomes topk.

    Loss weights (`plan.weights` [B, N], differentiable w.r.t. the masker's parameters):
        prob (default, as the paper): the probabilities p = sigmoid(logits).
        normalized: p divided, per image, by its mean over the hidden patches, so the weights of
            an image's hidden patches average 1: the masker cannot scale the whole loss (and so
            the MAE's effective learning rate) up or down, only shift weight between patches.
        straight: (p - p.detach()) + 1, i.e. value 1 (the MAE trains exactly as with unweighted
            masks) and the gradient of p (the same gradient w.r.t. p as "prob"): the masker acts
            on the MAE only through which patches it hides. With `detach_input` the tokens are detached first, so the MAE gets no
    gradient through the masker.

    Args:
        ratio: fraction of patches hidden, in (0, 1). Default 0.75.
        arch: "token" or "paper". Default "token".
        embed_dim: token width D. Default 192 (ViT-Tiny); must match the MAE's patch tokens.
        num_patches: N; required for arch="paper" (it sizes the Linear layers), optional for "token"
            (if given, calls with another N are rejected).
        hidden_dim: MLP width; None means 512 for "paper" (as the reference), 128 for "token".
        selection: "topk" or "gumbel". Default "topk".
        temperature: Gumbel-top-k temperature (> 0). Default 1.0.
        weighting: "prob", "normalized" or "straight" (above). Default "prob".
        detach_input: detach tokens before the masker. Default True.
        pos_dim: width of the sin-cos position code of the "token" arch (divisible by 4). Default 32.
        guided_fraction: share of the hidden patches chosen by the masker's selection, in [0, 1];
            the rest are uniformly random (`ScoredPolicy`). The loss weights still cover every
            hidden patch, so the hypergradient flows as before. Default 1.0 (the paper).
        guided_ramp: the guided share rises from 0 over this first fraction of training. Default 0.0.
    """

    card_info = CardInfo(
        paper="Guo et al., TMLR 2025",
        idea="MLO-MAE: a network gives each patch a masking probability; trained from labels by multi-level optimisation",
        learns="labels",
        allowed={"arch": "token | paper", "embed_dim": "int >= 1", "hidden_dim": "int >= 1 | None",
                 "selection": "topk | gumbel", "temperature": "> 0", "weighting": "prob | normalized | straight",
                 "detach_input": "bool"},
    )

    learned_scores = True

    learnable = True

    def __init__(
        self,
        ratio: float = 0.75,
        arch: str = "token",
        embed_dim: int = 192,
        num_patches: int | None = None,
        hidden_dim: int | None = None,
        selection: str = "topk",
        temperature: float = 1.0,
        weighting: str = "prob",
        detach_input: bool = True,
        pos_dim: int = 32,
        guided_fraction: float = 1.0,
        guided_ramp: float = 0.0,
    ) -> None:
        super().__init__(ratio, guided_fraction, guided_ramp)
        if arch not in ARCHS:
            raise ValueError(f"learned masker arch must be one of {ARCHS}, got {arch!r}")
        if selection not in SELECTIONS:
            raise ValueError(f"learned masker selection must be one of {SELECTIONS}, got {selection!r}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"learned masker weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        _check_positive_int("embed_dim", embed_dim)
        if num_patches is not None:
            _check_positive_int("num_patches", num_patches)
        if hidden_dim is None:
            hidden_dim = DEFAULT_HIDDEN[arch]
        _check_positive_int("hidden_dim", hidden_dim)
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        self.arch = arch
        self.embed_dim = embed_dim
        self.num_patches = num_patches
        self.hidden_dim = hidden_dim
        self.selection = selection
        self.temperature = float(temperature)
        self.weighting = weighting
        self.detach_input = detach_input
        self.pos_dim = pos_dim

        if arch == "paper":
            if num_patches is None:
                raise ValueError("learned masker arch='paper' needs num_patches (it is tied to one N)")
            self.net = nn.Sequential(
                nn.Flatten(1),  # [B, N, D] -> [B, N * D]
                nn.Linear(num_patches * embed_dim, hidden_dim),
                nn.ReLU(),
                nn.Linear(hidden_dim, num_patches),  # [B, N] logits
            )
        else:
            if pos_dim < 0 or pos_dim % 4:
                raise ValueError(f"pos_dim must be a non-negative multiple of 4, got {pos_dim!r}")
            self.norm = nn.LayerNorm(embed_dim, elementwise_affine=False)
            self.net = token_mlp(embed_dim, pos_dim, hidden_dim)
        # start near p = 0.5 everywhere, with small variation so that ties break
        last = self.net[-1]
        nn.init.normal_(last.weight, std=0.01)
        nn.init.zeros_(last.bias)

    def logits(self, tokens: Tensor, grid: tuple[int, ...] | None = None) -> Tensor:
        """Masking logits [B, N] of patch tokens [B, N, D] on the token `grid` (None: a square one)."""
        if tokens.dim() != 3:
            raise ValueError(f"tokens must be [B, N, D], got shape {tuple(tokens.shape)}")
        batch, n, d = tokens.shape
        if d != self.embed_dim:
            raise ValueError(
                f"learned masker was built for embed_dim={self.embed_dim}, got tokens of width {d}"
            )
        if self.num_patches is not None and n != self.num_patches:
            raise ValueError(
                f"learned masker (arch={self.arch!r}) was built for num_patches={self.num_patches}, got N = {n}"
            )
        weight = self.net[-1].weight
        x = tokens.detach() if self.detach_input else tokens
        x = x.to(dtype=weight.dtype)
        if self.arch == "paper":
            return self.net(x)  # [B, N]
        return self.net(token_mlp_input(self.norm(x), self.pos_dim, grid)).squeeze(-1)  # [B, N]

    def probabilities(self, tokens: Tensor, grid: tuple[int, ...] | None = None) -> Tensor:
        """Masking probability of each patch: [B, N, D] -> [B, N] in (0, 1)."""
        return torch.sigmoid(self.logits(tokens, grid))

    def score(self, tokens: Tensor, **context: Any) -> Tensor:
        """The masking logits [B, N] (attached to the masker's graph)."""
        return self.logits(tokens, context.get("grid"))

    def selection_key(self, scores: Tensor, *, ratio: float, noise: Tensor | None,
                      generator: torch.Generator | None) -> Tensor:
        """topk: the logits; gumbel: logits / temperature + Gumbel noise (from `noise` or `generator`)."""
        if self.selection == "topk":
            return scores.detach()  # highest probability sorts last: hidden
        batch, n = scores.shape
        uniforms = uniform_noise(noise, batch, n, scores.device, generator, dtype=scores.dtype)  # [B, N]
        return scores.detach() / self.temperature + gumbel_from_uniform(uniforms.to(scores))  # top N - K hidden

    def finish(self, plan: MaskPlan, scores: Tensor) -> MaskPlan:
        """Loss weights from the probabilities sigmoid(logits), over every hidden patch (guided or not)."""
        probs = torch.sigmoid(scores)  # [B, N]
        return replace(plan, weights=weights_from_probs(probs, plan.mask, self.weighting), probs=probs, scores=scores)

    def extra_repr(self) -> str:
        return (
            f"ratio={self.ratio}, arch={self.arch!r}, embed_dim={self.embed_dim}, "
            f"num_patches={self.num_patches}, hidden_dim={self.hidden_dim}, selection={self.selection!r}, "
            f"temperature={self.temperature}, weighting={self.weighting!r}, detach_input={self.detach_input}, "
            f"{self.guided_repr()}"
        )


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
