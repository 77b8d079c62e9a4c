"""Adapter for the official MAE (`models_mae.MaskedAutoencoderViT` of facebookresearch/mae and its forks).

Three tools, each touching only what it is given:
- `wrap(model)`: the MAE protocol (maskkit.mae) over such a model, for the engine and the CLI;
- `use_policy(model, policy)`: the user's unchanged loop `loss, _, _ = model(x, mask_ratio=r)` masks
  with a maskkit policy and weights the loss by `plan.weights`; undone by `handle.remove()`;
- `timm_compat()`: lets `models_mae.py` build under timm 1.x (it passes `qk_scale=None` to `Block`).
Plus `engine_checkpoint_entries(engine)` / `restore_engine(engine, checkpoint)`: an `MLOEngine`'s
state inside the official checkpoint dict (docs/official-mae.md); `official_patches()`: the patch
files that add maskkit to the official repository's `main_pretrain.py`.

Why one file of ~460 lines: this is the only code that knows the official codebase, and its three
tools share the same private view of `MaskedAutoencoderViT` (its `random_masking`, its loss and its
block list); split, each part would have to know that internal layout again.
"""

from __future__ import annotations

import inspect
import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from maskkit.mae import MAEOutput, mae_step_loss, masked_loss, patch_loss, policy_aux_loss
from maskkit.plan import MaskPlan
from maskkit.policies.random import RandomPolicy

if TYPE_CHECKING:
    from maskkit.mlo import MLOEngine

#: what `wrap` and `use_policy` need of a model (the official interface).
REQUIRED_ATTRIBUTES = (
    "patch_embed", "pos_embed", "cls_token", "blocks", "norm",
    "forward_decoder", "patchify", "unpatchify", "random_masking", "forward_loss",
)

_HANDLE_ATTR = "_maskkit_policy_handle"
#: the submodule name under which `use_policy` attaches the policy (so optimizers and checkpoints see it)
POLICY_MODULE = "maskkit_policy"
_PATCHED = ("forward", "random_masking", "forward_loss")


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an official-MAE nn.Module, got {type(model).__name__}")
    missing = [name for name in REQUIRED_ATTRIBUTES if not hasattr(model, name)]
    if missing:
        raise TypeError(
            f"{type(model).__name__} lacks the official MAE interface (missing: {', '.join(missing)})"
        )


def _patch_size(model: nn.Module) -> int:
    size = model.patch_embed.patch_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


# ----------------------------------------------------------------------------------------------
# a. the MAE protocol


class OfficialMAE(nn.Module):
    """The MAE protocol over an official `MaskedAutoencoderViT` (held as the submodule `model`).

    `encode`/`decode` reproduce `forward_encoder`/`forward_decoder` for a given MaskPlan, so that with
    the random policy's plan the loss is bit-identical to the model's own forward.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        _check_model(model)
        self.model = model
        self.patch_size = _patch_size(model)
        self.num_patches = int(model.patch_embed.num_patches)
        self.embed_dim = int(model.pos_embed.shape[-1])
        self.in_chans = int(model.patch_embed.proj.in_channels)

    @property
    def norm_pix_loss(self) -> bool:
        return bool(getattr(self.model, "norm_pix_loss", False))

    def patch_tokens(self, images: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, N, D]: patch embedding plus positional embedding, no CLS."""
        x = self.model.patch_embed(images)  # [B, N, D]
        return x + self.model.pos_embed[:, 1:, :]

    def _with_cls(self, x: Tensor) -> Tensor:
        """Prepend CLS (plus its positional slot): [B, K, D] -> [B, 1 + K, D]."""
        cls = self.model.cls_token + self.model.pos_embed[:, :1, :]  # [1, 1, D]
        return torch.cat((cls.expand(x.shape[0], -1, -1), x), dim=1)

    def _encoder(self, x: Tensor) -> Tensor:
        for blk in self.model.blocks:
            x = blk(x)
        return self.model.norm(x)

    def encode(self, tokens: Tensor, plan: MaskPlan) -> Tensor:
        """Visible tokens of `plan` through the encoder: [B, N, D] -> latent [B, 1 + K, D]."""
        return self._encoder(self._with_cls(plan.gather(tokens)))

    def decode(self, latent: Tensor, plan: MaskPlan) -> Tensor:
        """The model's own `forward_decoder` with the plan's `ids_restore`: -> [B, N, P]."""
        return self.model.forward_decoder(latent, plan.ids_restore)

    def transformer_blocks(self) -> list[nn.Module]:
        """Encoder then decoder blocks: what `--compile` compiles."""
        return [*self.model.blocks, *self.model.decoder_blocks]

    def patchify(self, images: Tensor) -> Tensor:
        return self.model.patchify(images)

    def unpatchify(self, patches: Tensor) -> Tensor:
        return self.model.unpatchify(patches)

    def features(self, images: Tensor) -> Tensor:
        """CLS embedding after the final norm with nothing masked: [B, C, H, W] -> [B, D].

        The last block computes only the CLS row when it is timm's Block (`cls_through_blocks`).
        """
        from maskkit.adapters.vit_attention import cls_through_blocks

        x = self._with_cls(self.patch_tokens(images))  # [B, 1 + N, D]
        return self.model.norm(cls_through_blocks(self.model.blocks, x))[:, 0]  # [B, D]

    def cls_attention(self, images: Tensor) -> Tensor:
        """CLS-to-patch attention of the last encoder block, mean over heads: [B, N]."""
        from maskkit.adapters.vit_attention import last_block_cls_attention

        x = self._with_cls(self.patch_tokens(images))  # [B, 1 + N, D]
        return last_block_cls_attention(self.model.blocks, x)

    def forward(
        self, images: Tensor, policy: nn.Module | None = None, ratio: float | None = None, **context: Any
    ) -> MAEOutput:
        """One pretraining forward through the protocol (as TimmMAE): policy (default random) -> plan -> loss."""
        return mae_step_loss(self, RandomPolicy() if policy is None else policy, images, ratio=ratio, **context)


def wrap(model: nn.Module) -> OfficialMAE:
    """The MAE protocol over an official MAE model (which stays usable and unchanged)."""
    return OfficialMAE(model)


# ----------------------------------------------------------------------------------------------
# b. drop-in policies for the user's own training loop


class PolicyHandle:
    """Undoes `use_policy`; also a context manager. `plan` is the last MaskPlan the policy made."""

    def __init__(self, model: nn.Module, policy: nn.Module, context_defaults: dict[str, Any]) -> None:
        self.model = model
        self.policy = policy
        self.context_defaults = context_defaults
        self.mae = wrap(model)  # the `encoder` context: the protocol view of the same model
        self.plan: MaskPlan | None = None
        self._call: dict[str, Any] | None = None  # images and context of the forward in progress
        self._shadowed = {name: model.__dict__[name] for name in _PATCHED if name in model.__dict__}
        self.active = False

    def set_progress(self, progress: float) -> None:
        """How far training has come, in [0, 1], for the policy's schedules (e.g. `guided_ramp`)."""
        value = float(progress)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"progress must lie in [0, 1], got {progress!r}")
        self.context_defaults["progress"] = value

    def remove(self) -> None:
        """Restore the model's own masking and loss and detach the policy; a second call does nothing."""
        if not self.active:
            return
        if self.model._modules.get(POLICY_MODULE) is self.policy:
            del self.model._modules[POLICY_MODULE]
        for name in _PATCHED:
            self.model.__dict__.pop(name, None)
        self.model.__dict__.update(self._shadowed)  # instance attributes the user had set before
        self.model.__dict__.pop(_HANDLE_ATTR, None)
        self.active = False
        self._call = None

    def __enter__(self) -> PolicyHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"PolicyHandle({type(self.policy).__name__} on {type(self.model).__name__}, {state})"


def use_policy(model: nn.Module, policy: nn.Module, **context_defaults: Any) -> PolicyHandle:
    """Make `model(imgs, mask_ratio=r)` mask with `policy` and weight its loss by `plan.weights`.

    Only this instance changes (instance attributes shadow `forward`, `random_masking` and
    `forward_loss`; the class is untouched). `mask_ratio` of each call is the policy's `ratio`
    (None: the policy's own); `context_defaults` and extra keyword arguments of a call (e.g.
    `attention=`, `noise=`) reach the policy, as do `images` and `encoder` (the `wrap` of the model,
    for `cls_attention`); `handle.set_progress(p)` gives it the context key `progress`.

    The policy is attached to the model as the submodule `maskkit_policy` (until `remove()`), so
    `model.to()` moves it, an optimizer built afterwards trains its parameters and the model's
    `state_dict()` saves them. A policy with its own objective (e.g. `hpm`) gets its `aux_loss`
    added to the loss the model returns. A policy built without `embed_dim` / `num_patches`
    learns them from the model (`policy.bind`). A learned MLO masker (`learnable`) is trained only
    by `MLOEngine` (the MAE loss would just drive its probabilities down): it is accepted frozen
    (every parameter `requires_grad=False`, e.g. loaded from an MLO run) and refused trainable.

    Calling it again on the same model replaces the previous policy; `copy.deepcopy(model)` gives
    a copy masked by its own copy of the policy. Undo with `handle.remove()`,
    `with use_policy(...):`, or `restore_masking(model)`.
    """
    _check_model(model)
    if not callable(policy):
        raise TypeError(f"policy must be a MaskPolicy (callable), got {type(policy).__name__}")
    if getattr(policy, "learnable", False) and any(p.requires_grad for p in policy.parameters()):
        raise ValueError(
            f"{type(policy).__name__} is trained by downstream feedback, which only MLOEngine does "
            "(maskkit.mlo); freeze it (policy.requires_grad_(False)) to apply it as it is"
        )
    restore_masking(model)
    if callable(getattr(policy, "bind", None)):
        policy.bind(embed_dim=int(model.pos_embed.shape[-1]), num_patches=int(model.patch_embed.num_patches))
    if isinstance(policy, nn.Module):
        if POLICY_MODULE in model._modules or POLICY_MODULE in model.__dict__:
            raise ValueError(f"{type(model).__name__} already has an attribute {POLICY_MODULE!r}")
        model.add_module(POLICY_MODULE, policy)

    handle = PolicyHandle(model, policy, dict(context_defaults))
    for name, fn in (("forward", _forward), ("random_masking", _random_masking), ("forward_loss", _forward_loss)):
        # bound to the instance, so that copy.deepcopy(model) rebinds to the copy and its own handle
        object.__setattr__(model, name, types.MethodType(fn, model))
    object.__setattr__(model, _HANDLE_ATTR, handle)
    handle.active = True
    return handle


# The three overrides `use_policy` installs; `self` is the model, its handle holds the policy.


def _forward(self: nn.Module, imgs: Tensor, mask_ratio: float | None = None, **context: Any) -> Any:
    """The class's own forward, with the images and per-call context kept for `_random_masking`."""
    handle = self.__dict__[_HANDLE_ATTR]
    ratio = getattr(handle.policy, "ratio", 0.75) if mask_ratio is None else mask_ratio
    handle._call = {"images": imgs, "context": context}
    try:
        return type(self).forward(self, imgs, mask_ratio=ratio)
    finally:
        handle._call = None


def _random_masking(self: nn.Module, x: Tensor, mask_ratio: float) -> tuple[Tensor, Tensor, Tensor]:
    """The policy's plan in the official return format: x [B, N, D] -> [B, K, D], mask [B, N], ids_restore [B, N]."""
    handle = self.__dict__[_HANDLE_ATTR]
    call = handle._call or {"images": None, "context": {}}  # empty when called outside forward
    context = {**handle.context_defaults, **call["context"]}
    if call["images"] is not None:
        context.setdefault("images", call["images"])
    context.setdefault("encoder", handle.mae)
    plan = handle.policy(x, ratio=mask_ratio, **context)
    if not isinstance(plan, MaskPlan):
        raise TypeError(f"policy {type(handle.policy).__name__} returned {type(plan).__name__}, not a MaskPlan")
    handle.plan = plan
    return plan.gather(x), plan.mask, plan.ids_restore


def _forward_loss(self: nn.Module, imgs: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
    """sum(loss * mask * w) / sum(mask) with w = plan.weights (the model's own loss when there are
    none), plus the policy's `aux_loss` when it has one."""
    handle = self.__dict__[_HANDLE_ATTR]
    plan = handle.plan
    if plan is None or mask is not plan.mask:
        return type(self).forward_loss(self, imgs, pred, mask)  # untouched (also for foreign masks)
    if plan.weights is None and not getattr(handle.policy, "has_aux_loss", False):
        return type(self).forward_loss(self, imgs, pred, mask)
    per_patch = patch_loss(pred, self.patchify(imgs), bool(getattr(self, "norm_pix_loss", False)))  # [B, N]
    if plan.weights is None:
        loss = type(self).forward_loss(self, imgs, pred, mask)  # bit-identical to the model's own
    else:
        loss = masked_loss(per_patch, mask, plan.weights)
    aux = policy_aux_loss(handle.policy, plan, per_patch)
    return loss if aux is None else loss + aux


def restore_masking(model: nn.Module) -> bool:
    """Undo `use_policy` on `model`; returns whether a policy was installed."""
    handle = model.__dict__.get(_HANDLE_ATTR)
    if handle is None:
        return False
    handle.remove()
    return True


def policy_of(model: nn.Module) -> PolicyHandle | None:
    """The active `use_policy` handle of `model`, or None."""
    return model.__dict__.get(_HANDLE_ATTR)


# ----------------------------------------------------------------------------------------------
# c. timm 1.x compatibility for models_mae.py

# timm 0.3.2's Block positional order, which the official code (and forks) may rely on.
_OLD_BLOCK_ARGS = (
    "dim", "num_heads", "mlp_ratio", "qkv_bias", "qk_scale", "drop", "attn_drop", "drop_path",
    "act_layer", "norm_layer",
)


def _make_compat_block(block_cls: type) -> type:
    """A subclass of timm 1.x `Block` that accepts timm 0.3.2's `qk_scale=None` and `drop=`."""

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if len(args) > len(_OLD_BLOCK_ARGS):
            raise TypeError(f"Block takes at most {len(_OLD_BLOCK_ARGS)} positional arguments")
        for name, value in zip(_OLD_BLOCK_ARGS[4:], args[4:], strict=False):
            if name in kwargs:
                raise TypeError(f"Block got multiple values for argument {name!r}")
            kwargs[name] = value
        qk_scale = kwargs.pop("qk_scale", None)
        if qk_scale is not None:
            raise ValueError(
                f"qk_scale={qk_scale!r} is not supported by timm>=1.0 (attention always scales by "
                "head_dim**-0.5); only qk_scale=None can be translated"
            )
        if "drop" in kwargs:
            kwargs["proj_drop"] = kwargs.pop("drop")
        block_cls.__init__(self, *args[:4], **kwargs)

    return types.new_class(
        block_cls.__name__, (block_cls,), {},
        lambda ns: ns.update({"__init__": __init__, "__module__": block_cls.__module__,
                              "__doc__": f"{block_cls.__doc__ or ''}\n(maskkit timm_compat: accepts qk_scale=None)"}),
    )


def _needs_compat(block_cls: type) -> bool:
    return "qk_scale" not in inspect.signature(block_cls.__init__).parameters


class TimmCompat:
    """Handle of `timm_compat()`: `remove()` (or leaving the `with` block) restores every patched name."""

    def __init__(self) -> None:
        self._saved: list[tuple[Any, str, Any]] = []  # (module, attribute, original)
        self.compat_block: type | None = None

    def _patch(self, module: Any, name: str, value: Any) -> None:
        self._saved.append((module, name, getattr(module, name)))
        setattr(module, name, value)

    def remove(self) -> None:
        while self._saved:
            module, name, original = self._saved.pop()
            setattr(module, name, original)

    def __enter__(self) -> TimmCompat:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def timm_compat(*modules: Any) -> TimmCompat:
    """Opt-in: make code written for timm 0.3.2's `Block(..., qk_scale=None, ...)` build under timm 1.x.

    Replaces `timm.models.vision_transformer.Block` by a subclass accepting `qk_scale=None` (a
    non-None value raises ValueError: timm 1.x cannot honour it) and `drop=` (as `proj_drop=`), and
    also the `Block` name already imported into `modules` and into any loaded module named
    `models_mae`. Weights and behaviour are those of timm's Block. Use as a function (undo with
    `.remove()`) or a context manager. A no-op when timm still accepts `qk_scale`.
    """
    import timm.models.vision_transformer as vit

    for mod in modules:
        if not isinstance(mod, types.ModuleType):
            raise TypeError(f"timm_compat expects modules (e.g. models_mae), got {type(mod).__name__}")
    handle = TimmCompat()
    original = vit.Block
    if not _needs_compat(original):
        return handle
    compat = _make_compat_block(original)
    handle.compat_block = compat
    handle._patch(vit, "Block", compat)
    targets = list(modules) + [
        mod for key, mod in list(sys.modules.items())
        if mod is not None and (key == "models_mae" or key.endswith(".models_mae"))
    ]
    seen: set[int] = set()
    for mod in targets:
        if id(mod) in seen or getattr(mod, "Block", None) is not original:
            continue
        seen.add(id(mod))
        handle._patch(mod, "Block", compat)
    return handle


# ----------------------------------------------------------------------------------------------
# d. the MLO engine inside the official checkpoint (`util/misc.py` save_model / load_model)

#: the key under which `engine_checkpoint_entries` stores the engine in the official checkpoint dict
ENGINE_CHECKPOINT_KEY = "maskkit_engine"
_ENGINE_STATE_KEYS = ("step", "mae", "masker", "head", "optimizers")
_ENGINE_OPTIMIZER_KEYS = ("mae", "head", "masker")


def _check_engine(engine: Any) -> None:
    from maskkit.mlo import MLOEngine

    if not isinstance(engine, MLOEngine):
        raise TypeError(f"expected a maskkit.mlo.MLOEngine, got {type(engine).__name__}")


def engine_checkpoint_entries(engine: MLOEngine, key: str = ENGINE_CHECKPOINT_KEY) -> dict[str, Any]:
    """What to add to the official checkpoint dict (`misc.save_model`'s `to_save`) to resume `engine`.

    Returns `{key: engine.state_dict()}`: its step, MAE, masker, head, their optimizers, schedulers
    and generator. When the official `model`/`optimizer` entries are the engine's own MAE model and
    `mae_optimizer`, their tensors are the same storages, which `torch.save` writes once. Every
    value is a tensor or a plain Python value, so the entry loads with `torch.load(weights_only=True)`.
    Raises RuntimeError (from `MLOEngine.state_dict`) inside an open unroll window.
    """
    _check_engine(engine)
    return {key: engine.state_dict()}


def restore_engine(engine: MLOEngine, checkpoint: Mapping[str, Any], key: str = ENGINE_CHECKPOINT_KEY) -> bool:
    """Load the engine state that `engine_checkpoint_entries` put in an official checkpoint dict.

    Returns False (and changes nothing) when `checkpoint` has no `key` entry, e.g. a checkpoint of
    the plain official loop; True once the engine is restored. Raises a one-line ValueError when
    the entry is not an `MLOEngine.state_dict()`.
    """
    _check_engine(engine)
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"checkpoint must be a dict (the loaded official checkpoint), got {type(checkpoint).__name__}")
    if key not in checkpoint:
        return False
    state = checkpoint[key]
    if not isinstance(state, Mapping):
        raise ValueError(f"checkpoint[{key!r}] is not an MLOEngine state dict: got {type(state).__name__}")
    missing = [k for k in _ENGINE_STATE_KEYS if k not in state]
    optimizers = state.get("optimizers")
    if not missing and isinstance(optimizers, Mapping):
        missing = [f"optimizers.{k}" for k in _ENGINE_OPTIMIZER_KEYS if k not in optimizers]
    elif not missing:
        missing = ["optimizers (not a dict)"]
    if missing:
        raise ValueError(f"checkpoint[{key!r}] is not an MLOEngine state dict: missing {', '.join(missing)}")
    engine.load_state_dict(dict(state))
    return True


# ----------------------------------------------------------------------------------------------
# e. the patch files for the official repository (docs/official-mae.md)

#: the facebookresearch/mae commit that `official_patches()` apply to
OFFICIAL_MAE_COMMIT = "efb2a8062c206524e35e47d04501ed4f544c0ae8"
#: the folder of the patch files (package data of maskkit.adapters)
OFFICIAL_PATCH_DIR = Path(__file__).with_name("official_mae_patches")


def official_patches() -> list[Path]:
    """The patch files for facebookresearch/mae at `OFFICIAL_MAE_COMMIT`, in the order `git apply` takes them."""
    return sorted(OFFICIAL_PATCH_DIR.glob("*.patch"))


__all__ = [
    "ENGINE_CHECKPOINT_KEY",
    "OFFICIAL_MAE_COMMIT",
    "OFFICIAL_PATCH_DIR",
    "OfficialMAE",
    "PolicyHandle",
    "TimmCompat",
    "engine_checkpoint_entries",
    "official_patches",
    "policy_of",
    "restore_engine",
    "restore_masking",
    "timm_compat",
    "use_policy",
    "wrap",
]
