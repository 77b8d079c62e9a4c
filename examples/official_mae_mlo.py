"""MLO-MAE inside the official MAE pretraining loop: a learned masker trained by downstream feedback.

The shape of facebookresearch/mae `main_pretrain.py` + `engine_pretrain.train_one_epoch` (here the
test doubles next to this file), shrunk to run on CPU in seconds on 8x8 digits upsampled to 16x16.
The official model is used through `maskkit.adapters.official_mae.wrap`; `maskkit.mlo.MLOEngine`
holds the MAE, a classification head and the learned masker. The whole change to the loop body:

     for data_iter_step, (samples, _) in enumerate(data_loader):
         if data_iter_step % accum_iter == 0:
             lr = adjust_learning_rate(optimizer, data_iter_step / len(data_loader) + epoch, args)
         samples = samples.to(device, non_blocking=True)
    -    loss, _, _ = model(samples, mask_ratio=args.mask_ratio)
    -    loss_value = loss.item()
    -    loss.backward()
    -    optimizer.step()
    -    optimizer.zero_grad()
    +    stats = engine.step(samples)          # pretrain step; every 2nd: head step + masker step
    +    loss_value = stats["pretrain_loss"]

(`optimizer` is `engine.mae_optimizer`; the engine makes its own steps, so gradient accumulation
and the AMP loss scaler of the official loop are not used.) The labeled data is split 80/20,
stratified, into the head's train split and the masker's validation split (`stratified_split`).

Run: python examples/official_mae_mlo.py --epochs 2
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from typing import Any, Callable, Iterable

import models_mae  # the official file (here: its test double next to this script)
import torch
from digits16 import digits_dataset
from engine_pretrain import adjust_learning_rate
from torch import nn
from torch.utils.data import DataLoader, Subset

from maskkit import create_policy  # maskkit
from maskkit.adapters.official_mae import timm_compat, wrap  # maskkit
from maskkit.data.splits import stratified_split  # maskkit
from maskkit.mlo import MLOConfig, MLOEngine, default_optimizers  # maskkit


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("MLO-MAE pre-training (maskkit engine in the official loop)", add_help=True)
    parser.add_argument("--batch_size", default=64, type=int)
    parser.add_argument("--epochs", default=2, type=int)
    parser.add_argument("--model", default="mae_vit_tiny_patch4", type=str)
    parser.add_argument("--mask_ratio", default=0.75, type=float)
    parser.add_argument("--norm_pix_loss", action="store_true")
    parser.add_argument("--lr", default=1e-3, type=float)
    parser.add_argument("--min_lr", default=0.0, type=float)
    parser.add_argument("--warmup_epochs", default=0, type=int)
    parser.add_argument("--num_samples", default=512, type=int, help="digits used (of 1797)")
    parser.add_argument("--print_freq", default=4, type=int)
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hypergrad", default="darts", choices=["darts", "unroll"])  # maskkit
    parser.add_argument("--masker_every", default=2, type=int)  # maskkit
    return parser


def endless(loader: DataLoader, device: torch.device) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """A callable returning the next (images, labels) batch of `loader`, cycling forever."""
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    return lambda: tuple(t.to(device) for t in next(batches))


def train_one_epoch(engine: MLOEngine, data_loader: Iterable, device: torch.device, epoch: int,
                    args: Any = None) -> dict[str, float]:
    """The official `train_one_epoch`, with the engine in place of forward/backward/step."""
    header = f"Epoch: [{epoch}]"
    total, count, lr, last = 0.0, 0, engine.mae_optimizer.param_groups[0]["lr"], {}
    for data_iter_step, (samples, _) in enumerate(data_loader):
        lr = adjust_learning_rate(engine.mae_optimizer, data_iter_step / len(data_loader) + epoch, args)
        samples = samples.to(device, non_blocking=True)
        stats = engine.step(samples)  # maskkit
        loss_value = stats["pretrain_loss"]
        if not math.isfinite(loss_value):
            print(f"Loss is {loss_value}, stopping training")
            sys.exit(1)
        total, count = total + loss_value, count + 1
        last.update(stats)
        if data_iter_step % args.print_freq == 0:
            extra = f"  val_loss: {last['val_loss']:.4f}" if "val_loss" in last else ""
            print(f"{header}  [{data_iter_step}/{len(data_loader)}]  lr: {lr:.6f}  loss: {loss_value:.4f}"
                  f"  mask_prob: {stats['mask_prob_mean']:.3f}{extra}")
    out = {"loss": total / max(count, 1), "lr": lr, **{k: last[k] for k in ("val_loss", "val_acc") if k in last}}
    print("Averaged stats:", "  ".join(f"{k}: {v:.6f}" for k, v in out.items()))
    return out


def main(args: argparse.Namespace) -> dict[str, float]:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)

    dataset = digits_dataset(args.num_samples)
    parts = stratified_split(dataset.tensors[1], {"train": 0.8, "val": 0.2}, seed=args.seed)  # maskkit
    data_loader_train = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True)
    labeled = {name: DataLoader(Subset(dataset, idx.tolist()), batch_size=args.batch_size, shuffle=True, drop_last=True)
               for name, idx in parts.items()}

    with timm_compat():  # only under timm>=1.0: models_mae.py passes Block(..., qk_scale=None)
        model = models_mae.__dict__[args.model](norm_pix_loss=args.norm_pix_loss, img_size=16, in_chans=1)
    model.to(device)

    mae = wrap(model)  # maskkit: the MAE protocol over the official model
    masker = create_policy("learned", embed_dim=mae.embed_dim, num_patches=mae.num_patches,
                           ratio=args.mask_ratio).to(device)
    head = nn.Linear(mae.embed_dim, 10).to(device)
    engine = MLOEngine(
        mae, masker, head, **default_optimizers(mae, head, masker, preset="cifar"),
        config=MLOConfig(ratio=args.mask_ratio, masker_every=args.masker_every, hypergrad=args.hypergrad),
        train_batches=endless(labeled["train"], device), val_batches=endless(labeled["val"], device),
    )
    stats: dict[str, float] = {}
    for epoch in range(args.epochs):
        stats = train_one_epoch(engine, data_loader_train, device, epoch, args=args)
    print(f"final loss: {stats['loss']:.6f}, validation accuracy of the head: {stats.get('val_acc', float('nan')):.3f}")
    if not math.isfinite(stats["loss"]):
        raise SystemExit("non-finite loss")
    return stats


if __name__ == "__main__":
    main(get_args_parser().parse_args())
