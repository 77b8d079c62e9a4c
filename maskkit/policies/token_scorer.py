"""TokenScorer: the small per-token network behind the policies that learn a score per patch (hpm, adamae).

LayerNorm(token, no affine) concatenated with a fixed 2-D sin-cos position code -> Linear ->
GELU -> Linear -> one score per patch (the learned masker's `token` architecture). It reads the
patch tokens detached, so the MAE gets no gradient through it, and it can be built late: without
`embed_dim` it is built by `bind` (which `use_policy` and `maskkit pretrain` call with the MAE's
sizes) or, failing that, at the first call from the tokens' width.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from maskkit.policies.learned import token_mlp, token_mlp_input


def check_positive_int(name: str, value: Any) -> None:
    """ValueError naming `name` unless `value` is a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class TokenScorer(nn.Module):
    """Per-token scores [B, N] of patch tokens [B, N, D]; parameters (D + P) * H + 2H + 1.

    Args:
        embed_dim: token width D, or None to build at `bind` / the first call. Default None.
        hidden_dim: hidden width H. Default 128.
        pos_dim: width P of the sin-cos position code (a multiple of 4; 0 for none; > 0 needs a
            token grid: a call's `grid`, else a square one). Default 32.
        num_patches: N, or None for any N. Default None.
        owner: the policy's name, for error messages.
    """

    def __init__(self, embed_dim: int | None = None, hidden_dim: int = 128, pos_dim: int = 32,
                 num_patches: int | None = None, owner: str = "scorer") -> None:
        super().__init__()
        check_positive_int("hidden_dim", hidden_dim)
        for name, value in (("embed_dim", embed_dim), ("num_patches", num_patches)):
            if value is not None:
                check_positive_int(name, value)
        if isinstance(pos_dim, bool) or not isinstance(pos_dim, int) or pos_dim < 0 or pos_dim % 4:
            raise ValueError(f"pos_dim must be a non-negative multiple of 4, got {pos_dim!r}")
        self.hidden_dim, self.pos_dim, self.num_patches, self.owner = hidden_dim, pos_dim, num_patches, owner
        self.embed_dim: int | None = None
        self.norm: nn.Module | None = None
        self.net: nn.Sequential | None = None
        if embed_dim is not None:
            self.bind(embed_dim=embed_dim)

    def bind(self, *, embed_dim: int, num_patches: int | None = None) -> None:
        """Build the network for tokens of width `embed_dim` (once; another width is refused)."""
        check_positive_int("embed_dim", embed_dim)
        if self.net is not None:
            if embed_dim != self.embed_dim:
                raise ValueError(f"{self.owner} was built for embed_dim={self.embed_dim}, the MAE has {embed_dim}")
            return
        self.embed_dim = int(embed_dim)
        self.norm = nn.LayerNorm(self.embed_dim, elementwise_affine=False)
        self.net = token_mlp(self.embed_dim, self.pos_dim, self.hidden_dim)
        nn.init.normal_(self.net[-1].weight, std=0.01)  # start nearly indifferent; small variation breaks ties
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, tokens: Tensor, grid: tuple[int, ...] | None = None) -> Tensor:
        """Scores [B, N] of tokens [B, N, D] on the token `grid` (None: a square one), read detached."""
        if tokens.dim() != 3:
            raise ValueError(f"tokens must be [B, N, D], got shape {tuple(tokens.shape)}")
        if self.net is None:
            self.bind(embed_dim=tokens.shape[-1])
            self.to(tokens.device)
        if tokens.shape[-1] != self.embed_dim:
            raise ValueError(f"{self.owner} was built for embed_dim={self.embed_dim}, "
                             f"got tokens of width {tokens.shape[-1]}")
        if self.num_patches is not None and tokens.shape[1] != self.num_patches:
            raise ValueError(f"{self.owner} was built for num_patches={self.num_patches}, got N = {tokens.shape[1]}")
        x = self.norm(tokens.detach().to(self.net[-1].weight.dtype))  # [B, N, D]
        return self.net(token_mlp_input(x, self.pos_dim, grid)).squeeze(-1)  # [B, N]

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, hidden_dim={self.hidden_dim}, pos_dim={self.pos_dim}"
