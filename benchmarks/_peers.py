"""ESGD-M's second-order peers in the benchmarks: how each is built and how its training step is driven.

Each peer runs with its library's defaults apart from the learning rate, and is driven the way its own
source asks (read from pytorch-optimizer 4.1.0 and torchzero 0.4.4):

- AdaHessian (pytorch-optimizer): Hutchinson estimate z*Hz of diag(H) with Rademacher z, an Adam-style
  EMA of its square, estimated on every step (``update_period=1``). ``step()`` takes Hz from the graph
  of ``p.grad``, so every estimating step's backward is ``loss.backward(create_graph=True)``.
- SophiaH (pytorch-optimizer): EMA of z*Hz with Gaussian z, update ``m / max(h, eps)`` clipped to +-p
  (p=0.01); it estimates when ``(step - 1) % update_period == 0`` with ``update_period=10``, so steps
  0, 10, 20, ... need ``create_graph=True`` and the others a plain backward.
- torchzero ESGD: ``tz.Optimizer(params, tz.m.ESGD(), tz.m.LR(lr))``, the module's documented use:
  Hz with Gaussian z every ``update_freq=20`` steps (steps 0, 20, 40, ...), by autograd, no momentum.
  ``step(closure)`` calls the closure itself: ``closure()`` (which does the backward) on plain steps,
  ``closure(backward=False)`` on estimating steps, whose gradient it then takes with its graph.

The peers import lazily, so the benchmarks run without them when they are not asked for.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

# The peers' documented way to get Hz is backward(create_graph=True), which warns about the
# parameter <-> gradient reference cycle it creates; the drivers below set p.grad to None right after
# each such step, which breaks the cycle.
warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")


@dataclass(frozen=True)
class Peer:
    name: str
    label: str
    package: str  # the pip distribution, for error messages
    module: str  # what to import
    default_lr: float
    period: int  # it estimates once every this many steps, with its defaults
    color: str

    @property
    def schedule(self) -> str:
        return "every step" if self.period == 1 else f"every {self.period}th step"


PEERS = {
    "adahessian": Peer("adahessian", "AdaHessian", "pytorch-optimizer==4.1.0", "pytorch_optimizer", 1e-1, 1,
                       "tab:green"),
    "sophiah": Peer("sophiah", "SophiaH", "pytorch-optimizer==4.1.0", "pytorch_optimizer", 6e-2, 10,
                    "tab:purple"),
    "tz-esgd": Peer("tz-esgd", "torchzero ESGD", "torchzero==0.4.4", "torchzero", 1e-1, 20, "tab:brown"),
}


def lr_grid(name: str, preset: str) -> list[float]:
    """Decades around the peer's documented default lr (quick), half-decades over +-1.5 decades (full)."""
    lr = PEERS[name].default_lr
    if preset == "smoke":
        return [lr]
    if preset == "quick":
        return [lr / 10, lr, lr * 10]
    return [float(f"{lr * 10 ** (k / 2):.3g}") for k in range(-3, 4)]


def missing(names) -> list[str]:
    """The pip requirements of the requested peers that cannot be imported."""
    out = []
    for name in names:
        peer = PEERS.get(name)
        if peer is None:
            continue
        try:
            importlib.import_module(peer.module)
        except ImportError:
            if peer.package not in out:
                out.append(peer.package)
    return out


def make(name: str, params, lr: float, seed: int, **overrides):
    """The peer optimizer with its library defaults and this lr; `overrides` for benchmarks that must
    change its schedule (step_time.py), never for the convergence runs."""
    if name == "adahessian":
        from pytorch_optimizer import AdaHessian

        return AdaHessian(params, lr=lr, **overrides)
    if name == "sophiah":
        from pytorch_optimizer import SophiaH

        return SophiaH(params, lr=lr, **overrides)
    if name == "tz-esgd":
        import torchzero as tz

        return tz.Optimizer(params, tz.m.ESGD(seed=seed, **overrides), tz.m.LR(lr))
    raise ValueError(f"unknown peer {name!r}")


def estimates_next(opt) -> bool:
    """Whether a pytorch-optimizer Hutchinson optimizer's next step() estimates (needs the graph):
    the test it makes inside step(), on the step counter of its first param group."""
    return opt.param_groups[0].get("step", 0) % opt.update_period == 0


def train_step(name: str, opt, loss_fn: Callable[[], torch.Tensor]) -> None:
    """One training step of peer `name`. `loss_fn()` is the step's minibatch loss; it must give the
    same batch on every call, since a closure may evaluate it more than once (torchzero's
    finite-difference modes do)."""
    if name in ("adahessian", "sophiah"):
        estimate = estimates_next(opt)
        opt.zero_grad(set_to_none=True)
        loss_fn().backward(create_graph=estimate)
        opt.step()
        if estimate:
            opt.zero_grad(set_to_none=True)
        return
    if name == "tz-esgd":
        def closure(backward=True):
            loss = loss_fn()
            if backward:
                opt.zero_grad(set_to_none=True)
                loss.backward()
            return loss

        opt.step(closure)
        return
    raise ValueError(f"unknown peer {name!r}")
