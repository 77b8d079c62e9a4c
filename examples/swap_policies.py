"""Ablation: the same MAE, data and seed pretrained a few steps with every registered masking policy.

Each policy gets a fresh model with identical initial weights and the same batches; only the
masking differs. Two numbers per policy: the last training loss (weighted by the plan's
weights, so a learned masker's is on its own scale) and an evaluation loss that is comparable
across policies: the reconstruction loss on held-out digits under one fixed random mask.
A learned masker stays at its initialisation here (training it is the MLO engine's job).

Run: python examples/swap_policies.py --steps 20 [--model timm|official]
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
from torch import nn

from maskkit import create_policy, list_policies, mae_forward, mae_step_loss, policy_options
from maskkit.plan import MaskPlan


def digits(num: int) -> torch.Tensor:
    """sklearn's 8x8 digits in [0, 1], upsampled 2x: [M, 1, 16, 16]."""
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images[:num], dtype=torch.float32) / 16.0
    return images.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2).unsqueeze(1)


def build_mae(kind: str, seed: int) -> nn.Module:
    """A tiny MAE seen through the MAE protocol: maskkit's timm MAE, or the official double wrapped."""
    if kind == "timm":
        from maskkit.adapters.timm import create_mae

        return create_mae(
            "tiny", img_size=16, patch_size=4, in_chans=1, embed_dim=64, depth=2, num_heads=2,
            decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, seed=seed,
        )
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import models_mae

    from maskkit.adapters.official_mae import timm_compat, wrap

    torch.manual_seed(seed)
    with timm_compat(models_mae):
        model = models_mae.mae_vit_tiny_patch4(img_size=16, in_chans=1, embed_dim=64, decoder_embed_dim=32)
    return wrap(model)


def build_policy(name: str, mae: nn.Module, ratio: float) -> nn.Module:
    """`create_policy(name)` with the model-dependent options a policy declares (embed_dim, num_patches)."""
    available = {"ratio": ratio, "embed_dim": mae.embed_dim, "num_patches": mae.num_patches}
    wanted = {opt.name for opt in policy_options(name)}
    return create_policy(name, **{k: v for k, v in available.items() if k in wanted})


#: the registered policies made for clips (a video MAE's (T', H', W') grid), which these 16x16 digits are not
CLIP_POLICIES = ("frame", "motion")


def run(args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    data = digits(args.batch_size * args.steps + args.batch_size)
    train, held_out = data[: -args.batch_size], data[-args.batch_size :]  # [S*B, 1, 16, 16], [B, 1, 16, 16]
    results: dict[str, tuple[float, float]] = {}
    for name in list_policies():
        if name in CLIP_POLICIES:  # they mask time slices or score frame differences: clips only
            continue
        mae = build_mae(args.model, args.seed)
        policy = build_policy(name, mae, args.mask_ratio)
        optimizer = torch.optim.AdamW(mae.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05)
        generator = torch.Generator().manual_seed(args.seed)  # the policies' own randomness
        mae.train()
        loss = torch.tensor(float("nan"))
        for step in range(args.steps):
            images = train[step * args.batch_size : (step + 1) * args.batch_size]
            loss = mae_step_loss(mae, policy, images, ratio=args.mask_ratio, generator=generator).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        mae.eval()
        with torch.no_grad():
            noise = torch.rand(held_out.shape[0], mae.num_patches, generator=torch.Generator().manual_seed(1234))
            plan = MaskPlan.from_scores(noise, args.mask_ratio)  # one fixed random mask for every policy
            eval_loss = mae_forward(mae, held_out, plan).loss
        results[name] = (loss.item(), eval_loss.item())
    return results


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("timm", "official"), default="timm")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--mask_ratio", type=float, default=0.75)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.batch_size * (args.steps + 1) > 1797:
        parser.error("need steps >= 1, batch_size >= 1 and batch_size * (steps + 1) <= 1797 digits")

    results = run(args)
    print(f"{args.steps} steps, batch {args.batch_size}, mask ratio {args.mask_ratio}, model {args.model}")
    print(f"{'policy':<12}{'train loss':>12}{'eval loss':>12}")
    for name, (train_loss, eval_loss) in results.items():
        print(f"{name:<12}{train_loss:>12.4f}{eval_loss:>12.4f}")
    if not all(math.isfinite(v) for pair in results.values() for v in pair):
        raise SystemExit("non-finite loss")
    return results


if __name__ == "__main__":
    main()
