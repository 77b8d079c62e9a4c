"""The official MAE `engine_pretrain.train_one_epoch`, in shape, without its `util.misc` logging.

Written for maskkit from the published interface of facebookresearch/mae: a per-iteration
half-cycle cosine learning rate with warmup, gradient accumulation over `args.accum_iter` steps,
an optional AMP `loss_scaler`, and the one line that matters here:
`loss, _, _ = model(samples, mask_ratio=args.mask_ratio)`. maskkit's drop-in leaves it unchanged.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Iterable

import torch


def adjust_learning_rate(optimizer: torch.optim.Optimizer, epoch: float, args: Any) -> float:
    """Linear warmup for `args.warmup_epochs`, then half-cycle cosine from `args.lr` to `args.min_lr`."""
    if epoch < args.warmup_epochs:
        lr = args.lr * epoch / args.warmup_epochs
    else:
        progress = (epoch - args.warmup_epochs) / max(args.epochs - args.warmup_epochs, 1e-8)
        lr = args.min_lr + (args.lr - args.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


def train_one_epoch(
    model: torch.nn.Module,
    data_loader: Iterable,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    epoch: int,
    loss_scaler: Any = None,
    log_writer: Any = None,
    args: Any = None,
) -> dict[str, float]:
    """One epoch of MAE pretraining; returns the averaged stats {"loss", "lr"}."""
    model.train(True)
    print_freq = getattr(args, "print_freq", 20)
    accum_iter = args.accum_iter
    header = f"Epoch: [{epoch}]"
    optimizer.zero_grad()
    total, count, lr = 0.0, 0, optimizer.param_groups[0]["lr"]

    for data_iter_step, (samples, _) in enumerate(data_loader):
        # per-iteration (not per-epoch) learning rate schedule
        if data_iter_step % accum_iter == 0:
            lr = adjust_learning_rate(optimizer, data_iter_step / len(data_loader) + epoch, args)

        samples = samples.to(device, non_blocking=True)
        loss, _, _ = model(samples, mask_ratio=args.mask_ratio)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            print(f"Loss is {loss_value}, stopping training")
            sys.exit(1)

        loss = loss / accum_iter
        update = (data_iter_step + 1) % accum_iter == 0
        if loss_scaler is not None:
            loss_scaler(loss, optimizer, parameters=model.parameters(), update_grad=update)
        else:
            loss.backward()
            if update:
                optimizer.step()
        if update:
            optimizer.zero_grad()

        total, count = total + loss_value, count + 1
        if data_iter_step % print_freq == 0:
            print(f"{header}  [{data_iter_step}/{len(data_loader)}]  lr: {lr:.6f}  loss: {loss_value:.4f}")
        if log_writer is not None and update:
            epoch_1000x = int((data_iter_step / len(data_loader) + epoch) * 1000)
            log_writer.add_scalar("train_loss", loss_value, epoch_1000x)
            log_writer.add_scalar("lr", lr, epoch_1000x)

    stats = {"loss": total / max(count, 1), "lr": lr}
    print("Averaged stats:", "  ".join(f"{k}: {v:.6f}" for k, v in stats.items()))
    return stats
