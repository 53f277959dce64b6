"""Curvature estimation: where an estimation step's Hessian-vector products Hz come from.

The optimizer asks this module for one thing per estimation step: Hz, for each parameter, with the
step's Rademacher probe z. Two estimators:

- "autograd" (exact, the original algorithm): a double backward, either at once in `ESGD.backward`
  (`exact_backward`, which also accumulates micro-batches and averages over a process group) or from
  the graph that `loss.backward(create_graph=True)` left in `p.grad` (`graph_products`).
- "finite_difference" / "central_difference" (`finite_difference`): two or three first-order passes
  of the user's closure, at theta and at theta + h z (and theta - h z), on the same batch with the
  same random numbers. Hz ~ (g(theta + h z) - g(theta)) / h, or (g(theta + h z) - g(theta - h z)) / 2h.
  The difference is never formed here: the fused update reads both gradients and 1/h.

Either estimator can take Hz from another function than the update's gradient: a curvature closure
(typically the loss of a slice of the step's batch). The closure then runs once, at theta, for the
update's gradient, and the curvature closure supplies every Hz pass: one double backward (exact), or
its gradients at theta and theta + h z (forward) or at theta +- h z (central). The exact estimator
also takes such a loss directly, `ESGD.backward(loss, curvature_loss=...)` (`exact_backward`).

What the passes share with the optimizer (replayed random numbers, the finite difference's pieces
and its restore, the checks on closures) is `esgd_cuda._closures`.

Probes are counter-based (`esgd_cuda.probes`): parameter i of the trainable list gets the key
probe_key(seed, step, i), so every micro-batch, replica, device, shard and replay of a step draws
the same z, and both estimators draw the same z for the same step.
"""

import math
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor

from ._validation import HVP_MODES, user_step  # noqa: F401  (HVP_MODES re-exported: the estimators this module offers)
from ._closures import (FiniteDifference, RngState, check_curvature_pass, check_repeat, check_returned,
                        cuda_devices)
from .distributed import average_over_group, local, shard_offset, sum_of_squares
from .probes import fd_perturb_, probe_key, rademacher_

UseFused = Callable[[torch.device, torch.dtype], bool]


def default_fd_step(hvp: str, dtypes: Iterable[torch.dtype]) -> float:
    """The relative step of a finite difference for parameters of `dtypes`: sqrt(eps) (forward) or
    eps^(1/3) (central) of the least precise dtype, the sizes that balance truncation against
    rounding error when the gradients carry that dtype's precision (see docs/estimators.md, "Finite
    differences")."""
    eps = max((torch.finfo(dt).eps for dt in dtypes), default=torch.finfo(torch.float32).eps)
    return math.sqrt(eps) if hvp == "finite_difference" else eps ** (1.0 / 3.0)


# What autograd says when a model has no double backward: an op without a derivative for its
# backward (flash/efficient attention, fused kernels), torch.compile's aot_autograd, reentrant
# activation checkpointing.
_NO_DOUBLE_BACKWARD = (
    "is not implemented",
    "does not currently support double backward",
    "does not require grad and does not have a grad_fn",
    "double backward",
)


def _autograd(*args, **kwargs):
    """torch.autograd.grad for the exact products; a model without a double backward gets an error
    that names the estimator which needs none."""
    try:
        return torch.autograd.grad(*args, **kwargs)
    except RuntimeError as exc:
        if not any(s in str(exc) for s in _NO_DOUBLE_BACKWARD):
            raise
        raise RuntimeError(
            f"ESGD(hvp='autograd'): the exact Hessian-vector product needs a double backward through the "
            f"model, and this one has none ({exc}). Models with flash or memory-efficient attention, "
            "torch.compile, reentrant checkpointing or fused kernels can use ESGD(..., "
            "hvp='finite_difference') (or 'central_difference') with opt.step(closure): two or three "
            "first-order passes instead (docs/estimators.md: 'Which to use')."
        ) from exc


def _buckets(params: List[Tensor]) -> "OrderedDict[Tuple[torch.device, torch.dtype], List[int]]":
    out: "OrderedDict[Tuple[torch.device, torch.dtype], List[int]]" = OrderedDict()
    for i, p in enumerate(params):
        out.setdefault((p.device, p.dtype), []).append(i)
    return out


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
        self.last_h: Optional[Tensor] = None  # the latest finite-difference step size (device scalar)
        # Inside step(closure, curvature_closure) with the exact estimator: "update" while the closure
        # runs (its backward passes are first-order), "curvature" while the curvature closure runs
        # (ESGD.backward takes Hz alone). None otherwise.
        self.phase: Optional[str] = None
        # The parameters' copies during a finite-difference step, kept between steps for CPU
        # parameters: a fresh large CPU buffer is fresh zeroed pages from the kernel, whose page
        # faults cost more than the perturbation itself (CUDA's caching allocator needs no help).
        self._backups: Dict[Tensor, Tensor] = {}
        # Tests may replace the probe (a callable: list of params -> list of z); None draws Rademacher.
        self.probe_fn: Optional[Callable[[List[Tensor]], List[Tensor]]] = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_backups"] = {}  # scratch space, not state
        return state

    def _backup_for(self, p: Tensor, view: Tensor) -> Tensor:
        if view.device.type != "cpu":
            return torch.empty_like(view, memory_format=torch.contiguous_format)
        buf = self._backups.get(p)
        if buf is None or buf.shape != view.shape or buf.dtype != view.dtype:
            buf = self._backups[p] = torch.empty_like(view, memory_format=torch.contiguous_format)
        return buf

    def clear(self) -> None:
        self.hz.clear()
        self.kinds.clear()
        self.backward_estimated = False
        self.graph_backward = False

    # ------------------------------------------------------------------ probes

    def keys(self, count: int, index: int) -> List[int]:
        """The probe keys of the first `count` trainable parameters at step `index`."""
        return [probe_key(self.seed, index, i) for i in range(count)]

    def probes(self, trainable: List[Tensor], params: List[Tensor], index: int, use_fused: UseFused) -> List[Tensor]:
        """The step's probe z for each of `params` (a sublist of `trainable`, the optimizer's trainable
        parameters in param-group order): one native fill per (device, dtype)."""
        if self.probe_fn is not None:
            return list(self.probe_fn(params))
        ordinal = {p: i for i, p in enumerate(trainable)}
        zs = [torch.empty_like(p, memory_format=torch.contiguous_format) for p in params]
        keys = self.keys(len(trainable), index)
        for (device, dtype), idx in _buckets(params).items():
            rademacher_([zs[i] for i in idx], [keys[ordinal[params[i]]] for i in idx], [0] * len(idx),
                        fused=use_fused(device, dtype))
        return zs

    # ------------------------------------------------------------------ exact products (autograd)

    def _accumulate(self, p: Tensor, hz: Tensor) -> None:
        prev = self.hz.get(p)
        self.hz[p] = hz if prev is None else prev.add_(hz)

    def exact_backward(
        self, loss: Optional[Tensor], params: List[Tensor], index: int, scaler: Optional[Any],
        retain_graph: Optional[bool], use_fused: UseFused, *, curvature_loss: Optional[Tensor] = None,
    ) -> None:
        """The estimation-step backward of `ESGD.backward`: gradients into p.grad, Hz into `hz`.

        The gradient is taken with its graph, Hz with the step's probe at once, and the graph is
        released before returning. With `curvature_loss`, Hz comes from its double backward instead
        and `loss` gets a first-order backward only; `loss=None` takes Hz alone (a curvature
        closure's pass, whose gradients are dropped: not averaged, not written). Both losses are
        already scaled when `scaler` is given.
        """
        source = loss if curvature_loss is None else curvature_loss
        graph_grads = _autograd(source, params, create_graph=True, allow_unused=True, retain_graph=True)
        zs = self.probes(params, params, index, use_fused)
        outputs, grad_outputs = [], []
        for g, z in zip(graph_grads, zs):
            # A gradient without a graph does not depend on any parameter: its rows of H are zero.
            if g is not None and g.requires_grad:
                outputs.append(g)
                grad_outputs.append(z.to(g.dtype))
        # The curvature loss may share part of its graph with the loss (a slice of the same
        # forward's per-sample losses): keep it until the loss's own backward has run.
        shared = curvature_loss is not None and loss is not None
        hzs: List[Optional[Tensor]] = [None] * len(params)
        if outputs:
            hzs = list(
                _autograd(
                    outputs, params, grad_outputs=grad_outputs, allow_unused=True,
                    retain_graph=True if shared else retain_graph,
                )
            )
        del outputs, grad_outputs
        if curvature_loss is None:
            grads = graph_grads
        del graph_grads
        if shared:
            grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=retain_graph)
        with torch.no_grad():
            gs = None if loss is None else [None if g is None else g.detach() for g in grads]
            hs = [None if h is None else h.detach() for h in hzs]
            del hzs
            if loss is not None:
                del grads
            if self.process_group is not None:
                average_over_group(params, gs, hs, self.process_group)
            if scaler is not None:
                inv = 1.0 / float(scaler.get_scale())
                hs = [None if h is None else h.mul_(inv) for h in hs]
            if gs is not None:
                pairs = [(g, h) for g, h in zip(gs, hs) if g is not None and h is not None]
                if pairs:
                    # A non-finite Hz is reported through the gradient, where GradScaler (and users)
                    # look for overflow before step(): g + 0*h is g where h is finite and NaN where it
                    # is not, in one multi-tensor pass.
                    torch._foreach_add_([g for g, _ in pairs], [h for _, h in pairs], alpha=0.0)
                for p, g in zip(params, gs):
                    if g is not None:
                        if p.grad is None:
                            # The graph is gone, so g can become p.grad unless its layout differs.
                            p.grad = g if g.stride() == p.stride() else torch.empty_like(p).copy_(g)
                        else:
                            p.grad.add_(g)
            for p, h in zip(params, hs):
                if h is not None:
                    self._accumulate(p, h)
        self.kinds.add("unscaled" if scaler is not None else "raw")
        self.backward_estimated = True

    def graph_products(self, params: List[Tensor], trainable: List[Tensor], index: int, use_fused: UseFused) -> None:
        """Adds Hz for gradients that carry their graph in p.grad (``loss.backward(create_graph=True)``)."""
        graph_params = [p for p in params if p.grad is not None and p.grad.requires_grad]
        if not graph_params:
            # After a create_graph backward, gradients without a graph do not depend on the
            # parameters (a linear loss): Hz is zero, as opt.backward finds it.
            if not self.backward_estimated and not self.graph_backward:
                raise RuntimeError(
                    f"ESGD: step {user_step(index)} estimates the curvature (opt.should_create_graph() is True), but "
                    "no parameter gradient carries an autograd graph. Call opt.backward(loss), or "
                    "loss.backward(create_graph=opt.should_create_graph()), before opt.step()."
                )
            return
        zs = self.probes(trainable, graph_params, index, use_fused)
        with torch.enable_grad():
            hzs = _autograd(
                [p.grad for p in graph_params], params,
                grad_outputs=[z.to(p.grad.dtype) for p, z in zip(graph_params, zs)], allow_unused=True,
            )
        for p, hz in zip(params, hzs):
            if hz is not None:
                self._accumulate(p, hz.detach())
        self.kinds.add("raw")

    # ------------------------------------------------------------------ finite differences

    def step_size(self, params: List[Tensor], rel_step: float) -> Dict[torch.device, Tensor]:
        """h = rel_step * RMS(theta), one scalar for every parameter (a per-tensor h would estimate
        H D z for a diagonal D instead of H z), as a 0-dim float64 tensor on each parameter device.
        Computed on the devices (sharded parameters add one small all-reduce): nothing syncs the
        host. Scaling with theta keeps the estimate invariant to the scale of the parameters, as the
        exact product is."""
        devices = list(OrderedDict.fromkeys(p.device for p in params))
        home = devices[0]
        count = sum(p.numel() for p in params)  # whole parameters, sharded or not
        rms = (sum_of_squares(params, home) / max(count, 1)).sqrt()
        # All-zero parameters (or an overflow) leave no scale to be relative to: take rel_step itself.
        rms = torch.where((rms > 0) & torch.isfinite(rms), rms, torch.ones_like(rms))
        h = rms * rel_step
        return {d: h if d == home else h.to(d) for d in devices}

    def finite_difference(
        self, closure: Callable[[], Any], trainable: List[Tensor], index: int, *, central: bool,
        rel_step: float, buffers: List[Tensor], use_fused: UseFused,
        curvature_closure: Optional[Callable[[], Any]] = None, check: Optional[str] = None,
    ) -> FiniteDifference:
        """Runs the closure at theta, then at theta + h z (and theta - h z), and returns the pieces of
        the update. Leaves p.grad holding the gradient at theta, `buffers` as after the first pass, and
        the random number generators as after one pass; every pass sees the random numbers of the
        first. The parameters stay perturbed: the update restores them bit for bit from their copies
        (`FiniteDifference.sources`; not by subtracting h z), and the caller must call
        `FiniteDifference.restore()` for any it does not update, also on an error. An error in
        here restores them itself.

        With `curvature_closure`, the closure runs once (at theta, for the update's gradient) and the
        differences come from the curvature closure: at theta and theta + h z (forward) or at
        theta +- h z (central), with the same random numbers as the closure's pass.

        `check` ("raise" or "report") repeats the pass at theta + h z once more, to see that the
        function is the same on every call (`check_repeat`): "raise" raises on a mismatch (with
        everything as before the step), "report" returns it in `FiniteDifference.mismatch`."""
        rng = RngState(cuda_devices(trainable))
        with torch.enable_grad():
            loss = closure()
        grads = [p.grad for p in trainable]
        after = RngState(rng.devices)
        saved_buffers = [b.detach().clone() for b in buffers]
        h = self.step_size(trainable, rel_step)
        keys = self.keys(len(trainable), index)
        buckets = _buckets(trainable)
        # What the kernels perturb: a sharded parameter's local shard, whose probe is the slice of the
        # whole parameter's that starts at the shard's offset.
        views = [local(p) for p in trainable]
        offsets = [shard_offset(p) for p in trainable]
        backups = [self._backup_for(p, v) for p, v in zip(trainable, views)]
        probe = closure if curvature_closure is None else curvature_closure

        saved: List[List[int]] = []  # the buckets whose backups hold theta

        def perturb(sign: float, save: bool) -> None:
            for (device, dtype), idx in buckets.items():
                fd_perturb_([views[i] for i in idx], [backups[i] for i in idx], h[device],
                            [keys[i] for i in idx], [offsets[i] for i in idx], sign=sign, save=save,
                            fused=use_fused(device, dtype))
                if save:
                    saved.append(idx)

        losses: List[Any] = []  # what each perturbed pass returned

        def gradients() -> Dict[Tensor, Optional[Tensor]]:
            for p in trainable:
                p.grad = None  # the closure's zero_grad and backward must not touch the kept gradients
            rng.restore()
            with torch.enable_grad():
                value = probe()
            losses.append(value)
            out = {p: None if p.grad is None else local(p.grad) for p in trainable}
            if curvature_closure is not None:
                check_curvature_pass(value, out, exact=False)
            return out

        minus = None
        scale = 0.5 if central else 1.0
        fd = FiniteDifference(loss, {}, None, {d: v.reciprocal() * scale for d, v in h.items()},
                              sub_batch=curvature_closure is not None)
        # An error leaves the generators where they were before the step, so that the step can be
        # repeated exactly once its cause is fixed.
        end = rng
        try:
            if curvature_closure is not None and not central:
                minus = gradients()  # the curvature closure's gradient at theta
            perturb(1.0, True)
            fd.backups = {trainable[i]: (views[i], backups[i]) for idx in saved for i in idx}
            plus = gradients()
            shown = losses[-1:]
            repeat = None
            if check:
                repeat = gradients()
                shown = losses[-2:]
            if central:
                perturb(-1.0, False)
                minus = gradients()
            if check:
                base = minus if minus is not None else {p: None if g is None else local(g)
                                                        for p, g in zip(trainable, grads)}
                fd.repeat_ratio, fd.mismatch = check_repeat(
                    trainable, plus, repeat, base, shown,
                    "curvature_closure" if curvature_closure is not None else "closure")
                if fd.mismatch is not None and check == "raise":
                    raise RuntimeError(fd.mismatch)
            end = after
        except BaseException:
            fd.restore()
            raise
        finally:
            with torch.no_grad():
                for b, kept in zip(buffers, saved_buffers):
                    b.copy_(kept)
            end.restore()
            for p, g in zip(trainable, grads):
                p.grad = g
        self.last_h = h[trainable[0].device]
        fd.plus, fd.minus = plus, minus
        return fd

    # ------------------------------------------------------------------ a curvature closure, exact

    def exact_curvature_closure(
        self, closure: Callable[[], Any], curvature_closure: Callable[[], Any], trainable: List[Tensor],
        index: int, buffers: List[Tensor], use_fused: UseFused,
    ) -> Any:
        """An exact estimation step whose Hz comes from `curvature_closure`: the closure runs first,
        with first-order backward passes (`phase` "update": `ESGD.backward` and
        `should_create_graph()` act as on a plain step), then the curvature closure, with the
        closure's random numbers and `phase` "curvature" (`ESGD.backward` takes Hz alone; a
        `loss.backward(create_graph=opt.should_create_graph())` leaves the graph for
        `graph_products`; a loss returned without a backward gets its double backward here). Leaves
        p.grad holding the closure's gradients, `buffers` as the closure left them and the random
        number generators as after one pass. Returns the closure's loss."""
        rng = RngState(cuda_devices(trainable))
        self.phase = "update"
        try:
            with torch.enable_grad():
                loss = closure()
        finally:
            self.phase = None
        grads = [p.grad for p in trainable]
        after = RngState(rng.devices)
        saved_buffers = [b.detach().clone() for b in buffers]
        self.clear()
        try:
            for p in trainable:
                p.grad = None
            rng.restore()
            self.phase = "curvature"
            with torch.enable_grad():
                value = curvature_closure()
            self.phase = None
            check_returned(value)
            if not self.backward_estimated:
                left = {p: p.grad for p in trainable}
                check_curvature_pass(value, left, exact=True)
                if any(g is not None and g.requires_grad for g in left.values()):
                    self.graph_products(trainable, trainable, index, use_fused)
                elif any(g is not None for g in left.values()):
                    raise RuntimeError(
                        "ESGD.step: with hvp='autograd', curvature_closure's backward must keep the graph "
                        "for the Hessian-vector product: call opt.backward(loss) inside it, or "
                        "loss.backward(create_graph=opt.should_create_graph()), or return the loss "
                        "without a backward."
                    )
                else:
                    with torch.enable_grad():
                        self.exact_backward(None, trainable, index, None, None, use_fused, curvature_loss=value)
            self.backward_estimated = True  # Hz is complete: step() takes no products of p.grad
            end = after
        except BaseException:
            self.clear()
            end = rng  # as in finite_difference: an error leaves the generators as before the step
            raise
        finally:
            self.phase = None
            with torch.no_grad():
                for b, saved in zip(buffers, saved_buffers):
                    b.copy_(saved)
            end.restore()
            for p, g in zip(trainable, grads):
                p.grad = g
        return loss


def release_graphs(param_groups: List[dict]) -> None:
    """Detach every p.grad that still carries a double-backward graph."""
    for group in param_groups:
        for p in group["params"]:
            g = p.grad
            if g is not None and g.requires_grad:
                p.grad = g.detach()
