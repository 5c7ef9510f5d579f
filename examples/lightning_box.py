"""Train a compiled fpidsl layer (the box projection, specs/box_projection.fpi) with PyTorch Lightning: a progress
bar, checkpoints every epoch, and resuming from one restores the layer exactly.

    pip install 'fpidsl[lightning]'     # or, keeping the installed torch: pip install --no-deps
                                        #   pytorch-lightning lightning-utilities torchmetrics
    python examples/lightning_box.py --epochs 20 --out runs/box
    python examples/lightning_box.py --epochs 30 --out runs/box --resume runs/box/last.ckpt

The layer is an ordinary submodule of the LightningModule: Lightning's checkpoint holds its parameters (its
state_dict), the optimizer's state and the loop's position, so training 20 epochs, stopping, and resuming to 30
gives the parameters of 30 epochs straight (tests/test_lightning.py checks that, bit for bit, on 4 epochs).
Lightning's multi-process strategies were not tried here; examples/ddp_train.py trains with DDP by hand.
"""
from __future__ import annotations

import argparse
import os

import pytorch_lightning as pl
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import fpidsl

SPEC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "specs", "box_projection.fpi")


class BoxProjection(pl.LightningModule):
    """The compiled layer learning x = clamp(a, -1, 1); logs the loss and the forward's iterations."""

    def __init__(self, lr: float = 1e-2, tol: float = 1e-6):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        cls = fpidsl.load(SPEC, name="BoxProjectionNN")
        self.layer = cls(solve={"tol": tol, "max_iter": 1000}, backward={"tol": tol, "max_iter": 1000})

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.layer(a)

    def training_step(self, batch, batch_idx):
        a, target = batch
        loss = F.mse_loss(self.layer(a), target)
        self.log("loss", loss, prog_bar=True)
        self.log("iters", self.layer.stats.forward.iterations.max().float(), prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def data(samples: int = 256, batch: int = 64, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    a = 2 * torch.randn(samples, 10, generator=gen)
    return DataLoader(TensorDataset(a, a.clamp(-1, 1)), batch_size=batch, shuffle=False)


def trainer(epochs: int, out: str, progress: bool = True) -> pl.Trainer:
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=out, save_last=True, every_n_epochs=1)
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, default_root_dir=out, logger=False,
                      callbacks=[checkpoints], enable_progress_bar=progress, enable_model_summary=False,
                      deterministic=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--out", default="runs/lightning_box")
    ap.add_argument("--resume", default=None, help="a checkpoint to resume from (e.g. OUT/last.ckpt)")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    model = BoxProjection(lr=args.lr)
    trainer(args.epochs, args.out, not args.no_progress).fit(model, data(), ckpt_path=args.resume)
    a = 2 * torch.randn(512, 10, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        test = F.mse_loss(model(a), a.clamp(-1, 1)).item()
    print(f"test MSE after {args.epochs} epochs: {test:.3e}; checkpoints in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
