"""Train a LightningModule with ESGD-M through Lightning's own loop: `Trainer(max_steps=...)`, automatic
optimization, no manual stepping. The model is an MLP with BatchNorm on scikit-learn's digits (offline).

ESGD-M needs a Hessian-vector product Hz on its estimation steps. Lightning offers two places to get
it, and this example does either (`--hvp`):

- `--hvp autograd` (default, exact): the LightningModule's `backward` hook calls `opt.backward(loss)`,
  which on estimation steps takes the gradient with its graph and Hz by a double backward at once, and
  frees the graph before returning (on plain steps it is `loss.backward()`). Each step runs
  `training_step` once; the model needs a double backward for every op (most have one; the fused
  attention kernels do not, see hf_transformers_esgd.py). It is the cheaper choice: Hz costs about one
  extra backward, and no forward is repeated.
- `--hvp finite_difference`: ESGD(hvp="finite_difference") takes Hz = (g(theta + h z) - g(theta)) / h
  by running Lightning's closure (training_step + zero_grad + backward) a second time at perturbed
  parameters. Works with any model, costs one more forward and backward per estimation step, and
  `training_step` (with its logging) runs twice on those steps; `buffers=self` makes ESGD restore the
  BatchNorm running statistics the perturbed forward would otherwise update a second time.

Both keep BatchNorm's `num_batches_tracked` equal to the number of steps, which the script prints.

`--curvature-fraction F` (for example 0.25) takes Hz from the first F of each batch instead, through
`LightningModule.optimizer_step`: it passes `opt.step(closure, curvature_closure=...)`, so Lightning's
closure (training_step, zero_grad, backward) runs once per step for the update's gradient, and the
curvature closure runs the model on the slice (once with a double backward, or at theta and
theta + h z). The estimate then costs a fraction of a pass; `buffers=self` keeps the slice's forward
passes out of the BatchNorm statistics.

    python examples/lightning_esgd.py                        # 150 steps, exact Hz
    python examples/lightning_esgd.py --hvp finite_difference --steps 300
    python examples/lightning_esgd.py --curvature-fraction 0.25
"""

from __future__ import annotations

import argparse
import json
import os

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import esgd_cuda
from esgd_cuda import ESGD


def esgd_kernels() -> str:
    """Which esgd_cuda runs and whether its fused kernels loaded: an unbuilt source checkout ahead of
    the installed package on sys.path would run everything on the slower pure-PyTorch path."""
    info = esgd_cuda.extension_info()
    status = "native kernels loaded" if info["loaded"] else f"native kernels NOT loaded ({info['load_error']})"
    return f"esgd_cuda {os.path.dirname(esgd_cuda.__file__)}: {status}"


class DigitsClassifier(L.LightningModule):
    def __init__(self, lr: float = 0.5, hvp: str = "autograd", seed: int = 0, curvature_fraction: float = 1.0):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.Tanh(),
                                 nn.Linear(128, 128), nn.BatchNorm1d(128), nn.Tanh(), nn.Linear(128, 10))
        self.losses: list[float] = []
        self.curvature_passes = 0

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.batch = batch  # the curvature closure's slice comes from the step's batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        sub_batch = self.hparams.curvature_fraction < 1.0
        if self.hparams.hvp == "autograd" and not sub_batch:
            return ESGD(self.parameters(), lr=self.hparams.lr, seed=self.hparams.seed)
        return ESGD(self.parameters(), lr=self.hparams.lr, seed=self.hparams.seed, hvp=self.hparams.hvp,
                    buffers=self)

    def curvature_closure(self, opt: ESGD):
        """Hz from the first curvature_fraction of the step's batch (ESGD calls it after Lightning's
        closure, so self.batch is the step's)."""
        def closure():
            x, y = self.batch
            n = max(1, int(len(x) * self.hparams.curvature_fraction))
            self.curvature_passes += 1
            opt.zero_grad()
            loss = F.cross_entropy(self.net(x[:n]), y[:n])
            opt.backward(loss)  # exact: Hz by a double backward; finite differences: a plain backward
            return loss
        return closure

    def backward(self, loss, *args, **kwargs):
        if self.hparams.hvp == "autograd":
            # Lightning's automatic optimization runs this inside the closure it hands to opt.step().
            # With a curvature closure it is a plain backward: Hz comes from the slice.
            self.trainer.optimizers[0].backward(loss)
        else:
            loss.backward(*args, **kwargs)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        # ESGD.step(closure) returns the loss at the unperturbed parameters (the closure's first call).
        curvature_closure = None
        if self.hparams.curvature_fraction < 1.0:
            curvature_closure = self.curvature_closure(self.trainer.optimizers[0])
        loss = optimizer.step(closure=optimizer_closure, curvature_closure=curvature_closure)
        self.losses.append(float(loss))


class PrintLoss(L.Callback):
    def __init__(self, every: int):
        self.every = every

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = trainer.global_step - 1
        if step % self.every == 0 or trainer.global_step == trainer.max_steps:
            print(f"step {step:4d}  loss {module.losses[-1]:.4f}", flush=True)


def digits_loaders(batch_size: int, seed: int):
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[: int(0.8 * len(x))], perm[int(0.8 * len(x)):]
    train_loader = DataLoader(TensorDataset(x[train], y[train]), batch_size=batch_size, shuffle=True,
                              drop_last=True, generator=torch.Generator().manual_seed(seed))
    return train_loader, (x[test], y[test])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150, help="Trainer(max_steps=...) (default 150)")
    parser.add_argument("--hvp", choices=["autograd", "finite_difference", "central_difference"],
                        default="autograd")
    parser.add_argument("--curvature-fraction", type=float, default=1.0,
                        help="take Hz from this fraction of each batch (default 1: the whole batch)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(esgd_kernels(), flush=True)

    L.seed_everything(args.seed, verbose=False)
    train_loader, (x_test, y_test) = digits_loaders(args.batch_size, args.seed)
    if not 0.0 < args.curvature_fraction <= 1.0:
        parser.error(f"--curvature-fraction must be in (0, 1], got {args.curvature_fraction}")
    model = DigitsClassifier(lr=args.lr, hvp=args.hvp, seed=args.seed, curvature_fraction=args.curvature_fraction)
    trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[PrintLoss(every=max(1, args.steps // 10))])
    trainer.fit(model, train_loader)

    window = max(1, min(10, len(model.losses) // 3))
    first, last = sum(model.losses[:window]) / window, sum(model.losses[-window:]) / window
    print(f"training loss: {first:.4f} (mean of the first {window} steps) -> {last:.4f} (last {window})")
    model.eval()
    with torch.no_grad():
        acc = (model.net(x_test).argmax(1) == y_test).float().mean().item()
    tracked = sorted({int(m.num_batches_tracked) for m in model.modules() if isinstance(m, nn.BatchNorm1d)})
    print(f"test accuracy: {acc:.3f}; BatchNorm num_batches_tracked after {trainer.global_step} steps: {tracked}")
    if args.curvature_fraction < 1.0:
        print(f"curvature closure passes: {model.curvature_passes}")
    print("ESGD-M diagnostics:", json.dumps(trainer.optimizers[0].diagnostics()))


if __name__ == "__main__":
    main()
