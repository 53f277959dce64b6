"""Curvature estimation: where an estimation step's Hessian-vector products Hz come from.

The optimizer asks this module for one thing per estimation step: Hz, for each parameter, with the
step's Rademacher probe z. The products come from autograd (a double backward), either at once in
`ESGD.backward` (`exact_backward`, which also accumulates micro-batches and averages over a process
group) or from the graph that `loss.backward(create_graph=True)` left in `p.grad`
(`graph_products`). The probe stream is counter-based, keyed by (seed, step, bucket), so every
micro-batch and every data-parallel replica of a step draws the same z.
"""

from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ._validation import SUPPORTED_DTYPES
from .distributed import average_over_group

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """splitmix64 over the values: nearby inputs (consecutive steps) give unrelated 63-bit seeds."""
    x = 0
    for value in values:
        x = ((x ^ (value & _MASK64)) + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x >> 1


class CurvatureEstimator:
    """Probes and Hessian-vector products for the optimizer's estimation steps.

    Holds the Hz accumulated for the coming step (`hz`, per parameter) and how it is scaled
    (`kinds`: "unscaled" when `exact_backward` got the GradScaler, "raw" when a loss scale may still
    be in it). The optimizer passes its trainable parameters (in param-group order) and the step
    index to every call; the probe of a parameter depends only on those and the seed.
    """

    def __init__(self, seed: int, process_group: Optional[Any] = None):
        self.seed = int(seed)
        self.process_group = process_group
        self.hz: Dict[Tensor, Tensor] = {}
        self.kinds: set = set()
        self.backward_estimated = False  # exact_backward ran since the last step
        self.graph_backward = False  # a create_graph backward filled p.grad since the last step (hooks)
        # Tests may replace the probe (a callable: list of params -> list of z); None draws Rademacher.
        self.probe_fn: Optional[Callable[[List[Tensor]], List[Tensor]]] = None

    def clear(self) -> None:
        self.hz.clear()
        self.kinds.clear()
        self.backward_estimated = False
        self.graph_backward = False

    # ------------------------------------------------------------------ probes

    def _generator(self, device: torch.device, dtype: torch.dtype, index: int, bucket: int) -> torch.Generator:
        # Each (device, dtype) bucket draws from its own stream: equal seeds would give parameters of
        # different dtypes identical probes and bias the estimate wherever the loss couples them.
        seed = mix_seed(self.seed, index, bucket, SUPPORTED_DTYPES.index(dtype))
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        return gen

    def probes(self, trainable: List[Tensor], params: List[Tensor], index: int) -> List[Tensor]:
        """The step's probe for each of `params`: one flat Rademacher draw per (device, dtype) bucket.

        The draw covers every trainable parameter of the bucket, in param-group order, whichever of
        them `params` asks for, so a parameter's probe does not depend on which others have gradients.
        """
        if self.probe_fn is not None:
            return list(self.probe_fn(params))
        buckets: "OrderedDict[Tuple[torch.device, torch.dtype], List[Tensor]]" = OrderedDict()
        for p in trainable:
            buckets.setdefault((p.device, p.dtype), []).append(p)
        wanted = set(params)
        z_of: Dict[Tensor, Tensor] = {}
        for ordinal, ((device, dtype), members) in enumerate(buckets.items()):
            if not any(p in wanted for p in members):
                continue
            sizes = [p.numel() for p in members]
            flat = torch.empty(sum(sizes), device=device, dtype=dtype)
            flat.bernoulli_(0.5, generator=self._generator(device, dtype, index, ordinal)).mul_(2).sub_(1)
            for p, chunk in zip(members, flat.split(sizes)):
                z_of[p] = chunk.view(p.shape)
        return [z_of[p] for p in params]

    # ------------------------------------------------------------------ exact products (autograd)

    def _accumulate(self, p: Tensor, hz: Tensor) -> None:
        prev = self.hz.get(p)
        self.hz[p] = hz if prev is None else prev.add_(hz)

    def exact_backward(
        self, loss: Tensor, params: List[Tensor], index: int, scaler: Optional[Any], retain_graph: Optional[bool]
    ) -> None:
        """The estimation-step backward of `ESGD.backward`: gradients into p.grad, Hz into `hz`.

        The gradient is taken with its graph, Hz with the step's probe at once, and the graph is
        released before returning. `loss` is already scaled when `scaler` is given.
        """
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True, retain_graph=True)
        zs = self.probes(params, params, index)
        outputs, grad_outputs = [], []
        for g, z in zip(grads, zs):
            # A gradient without a graph does not depend on any parameter: its rows of H are zero.
            if g is not None and g.requires_grad:
                outputs.append(g)
                grad_outputs.append(z.to(g.dtype))
        hzs: List[Optional[Tensor]] = [None] * len(params)
        if outputs:
            hzs = list(
                torch.autograd.grad(
                    outputs, params, grad_outputs=grad_outputs, allow_unused=True, retain_graph=retain_graph
                )
            )
        del outputs, grad_outputs
        with torch.no_grad():
            gs = [None if g is None else g.detach() for g in grads]
            hs = [None if h is None else h.detach() for h in hzs]
            del grads, hzs
            if self.process_group is not None:
                average_over_group(params, gs, hs, self.process_group)
            if scaler is not None:
                inv = 1.0 / float(scaler.get_scale())
                hs = [None if h is None else h.mul_(inv) for h in hs]
            for p, g, h in zip(params, gs, hs):
                if g is not None and h is not None:
                    # Reported through the gradient, where GradScaler and users look for overflow.
                    g.masked_fill_(~torch.isfinite(h), float("nan"))
                if g is not None:
                    if p.grad is None:
                        # The graph is gone, so g can become p.grad unless its layout differs.
                        p.grad = g if g.stride() == p.stride() else torch.empty_like(p).copy_(g)
                    else:
                        p.grad.add_(g)
                if h is not None:
                    self._accumulate(p, h)
        self.kinds.add("unscaled" if scaler is not None else "raw")
        self.backward_estimated = True

    def graph_products(self, params: List[Tensor], trainable: List[Tensor], index: int) -> None:
        """Adds Hz for gradients that carry their graph in p.grad (``loss.backward(create_graph=True)``)."""
        graph_params = [p for p in params if p.grad is not None and p.grad.requires_grad]
        if not graph_params:
            # After a create_graph backward, gradients without a graph do not depend on the
            # parameters (a linear loss): Hz is zero, as opt.backward finds it.
            if not self.backward_estimated and not self.graph_backward:
                raise RuntimeError(
                    f"ESGD: step {index} estimates the curvature (opt.should_create_graph() is True), but no "
                    "parameter gradient carries an autograd graph. Call opt.backward(loss), or "
                    "loss.backward(create_graph=opt.should_create_graph()), before opt.step()."
                )
            return
        zs = self.probes(trainable, graph_params, index)
        with torch.enable_grad():
            hzs = torch.autograd.grad(
                [p.grad for p in graph_params], params,
                grad_outputs=[z.to(p.grad.dtype) for p, z in zip(graph_params, zs)], allow_unused=True,
            )
        for p, hz in zip(params, hzs):
            if hz is not None:
                self._accumulate(p, hz.detach())
        self.kinds.add("raw")


def release_graphs(param_groups: List[dict]) -> None:
    """Detach every p.grad that still carries a double-backward graph."""
    for group in param_groups:
        for p in group["params"]:
            g = p.grad
            if g is not None and g.requires_grad:
                p.grad = g.detach()
