"""Drop-in: the official MAE pretraining loop masking with a maskkit policy.

This is the shape of facebookresearch/mae `main_pretrain.py` (with `models_mae.py` and
`engine_pretrain.train_one_epoch`, here the test doubles next to this file), shrunk to run on CPU
in seconds on 8x8 digits upsampled to 16x16. The whole change to an official-MAE codebase:

    +from maskkit import create_policy
    +from maskkit.adapters.official_mae import timm_compat, use_policy
     ...
    +    parser.add_argument("--policy", default="attention", type=str)
     ...
    +    timm_compat()  # only under timm>=1.0: models_mae.py passes Block(..., qk_scale=None)
         model = models_mae.__dict__[args.model](norm_pix_loss=args.norm_pix_loss)
    +    use_policy(model, create_policy(args.policy, ratio=args.mask_ratio))
     ...
         train_one_epoch(model, data_loader_train, optimizer, device, epoch, loss_scaler, args=args)  # unchanged

`train_one_epoch` still calls `loss, _, _ = model(samples, mask_ratio=args.mask_ratio)`; the model now
masks with the policy (the attention policy reads the model's own CLS attention) and weights the loss
by the plan's weights. `restore_masking(model)` undoes it. With `--policy hpm` the label-free scorer is
attached to the model before the optimizer is built, so the loop's own optimizer trains it on the
ranking loss that the model's loss now includes (here at its full guided fraction; call
`handle.set_progress(epoch / epochs)` for HPM's ramp). The learned MLO masker needs the MLO engine to
train it (maskkit.mlo), so it is not offered here.

Run: python examples/official_mae_drop_in.py --policy attention --epochs 2
"""

from __future__ import annotations

import argparse
import math

import models_mae  # the official file (here: its test double next to this script)
import torch
from digits16 import digits_dataset
from engine_pretrain import train_one_epoch
from torch.utils.data import DataLoader

from maskkit import create_policy  # maskkit
from maskkit.adapters.official_mae import timm_compat, use_policy  # maskkit


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("MAE pre-training (maskkit drop-in)", add_help=True)
    parser.add_argument("--batch_size", default=64, type=int)
    parser.add_argument("--epochs", default=2, type=int)
    parser.add_argument("--accum_iter", default=1, type=int)
    parser.add_argument("--model", default="mae_vit_tiny_patch4", type=str)
    parser.add_argument("--mask_ratio", default=0.75, type=float)
    parser.add_argument("--norm_pix_loss", action="store_true")
    parser.add_argument("--weight_decay", default=0.05, type=float)
    parser.add_argument("--lr", default=1e-3, type=float)
    parser.add_argument("--min_lr", default=0.0, type=float)
    parser.add_argument("--warmup_epochs", default=0, type=int)
    parser.add_argument("--num_samples", default=512, type=int, help="digits used (of 1797)")
    parser.add_argument("--print_freq", default=4, type=int)
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--policy", default="attention", type=str)  # maskkit
    return parser


def main(args: argparse.Namespace) -> dict[str, float]:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)

    dataset_train = digits_dataset(args.num_samples)
    data_loader_train = DataLoader(dataset_train, batch_size=args.batch_size, shuffle=True, drop_last=True)

    timm_compat()  # maskkit
    model = models_mae.__dict__[args.model](norm_pix_loss=args.norm_pix_loss, img_size=16, in_chans=1)
    use_policy(model, create_policy(args.policy, ratio=args.mask_ratio))  # maskkit
    model.to(device)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    stats: dict[str, float] = {}
    for epoch in range(args.epochs):
        stats = train_one_epoch(model, data_loader_train, optimizer, device, epoch, None, args=args)
    print(f"final loss: {stats['loss']:.6f} (policy {args.policy})")
    if not math.isfinite(stats["loss"]):
        raise SystemExit("non-finite loss")
    return stats


if __name__ == "__main__":
    main(get_args_parser().parse_args())
