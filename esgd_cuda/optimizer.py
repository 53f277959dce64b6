"""ESGD-M: equilibrated SGD with quasi-hyperbolic momentum, as a torch.optim.Optimizer.

This module holds the optimizer: param groups, the estimation schedule, the step and capturable
mode. Where an estimation step's Hessian-vector products come from is `esgd_cuda.curvature`; how
the parameters become the kernels' lists and state is `_update`; argument checks are `_validation`,
checkpoints `_checkpoint`, diagnostics `_diagnostics`, GradScaler's protocol `_scaler`, data-parallel
glue `distributed`, and the per-element update `functional`.
"""

import contextlib
import copy
import numbers
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor

from . import _checkpoint, _diagnostics, _extension, _update
from ._param_watch import GraphBackwardWatch, _user_stacklevel, warn_unestimated
from ._validation import (check_buffers, check_capturable_lr, check_closures, check_curvature_loss, check_group,
                          check_hparams, check_hvp, check_param, check_schedule, check_state_dtype,
                          check_state_for_param, fused_unavailable_reason, param_tensor, user_step)
from ._closures import FiniteDifference
from ._scaler import GRADSCALER_FD, loss_scales
from .curvature import CurvatureEstimator, default_fd_step, release_graphs
from .distributed import broadcast_seed

__all__ = ["ESGD"]

# After the first, every this-many-th finite-difference estimate repeats a pass to check the closure:
# 1% more passes on estimation steps, a tenth of that per step with update_d_every=10.
REPEAT_CHECK_EVERY = 100


def _index_in(params: List[Tensor], p: Tensor) -> int:
    """The position of `p` in a param group's list, by identity (for error messages)."""
    return next(j for j, q in enumerate(params) if q is p)


class ESGD(torch.optim.Optimizer):
    r"""ESGD-M: equilibrated SGD with quasi-hyperbolic momentum.

    Every ``update_d_every`` steps (and on each of the first ``d_warmup`` steps) the optimizer
    estimates the equilibration preconditioner diag(H^2) from a Hessian-vector product Hz with a
    Rademacher probe z, keeps an exponential moving average D of (Hz)^2, and divides quasi-hyperbolic
    momentum by sqrt(D) (bias-corrected) plus ``eps``. Per parameter, on its t-th step::

        m <- beta1*m + (1-beta1)*g                       mb = beta1**t
        D <- beta2*D + (1-beta2)*(Hz)^2   (estimates)    db = beta2**k   (k: estimates so far)
        step_size = lr*(1 - lr_warmup**t)
        p <- p*(1 - weight_decay*step_size)
        p <- p - step_size/(1 - mb*v) * (v*m + (1-v)*g) / (sqrt(D)/sqrt(1-db) + eps)

    The state of a parameter is ``exp_avg`` (m), ``exp_hz_sq`` (D) and the integers ``step`` (t) and
    ``estimates`` (k). m and D are float32 (float64 for float64 parameters), or bfloat16 with
    ``state_dtype=torch.bfloat16``.

    With ``hvp="autograd"`` (default) estimation steps need the gradient's autograd graph: call
    ``opt.backward(loss)`` (recommended: it supports gradient accumulation, GradScaler and data
    parallelism, and releases the graph at once), or
    ``loss.backward(create_graph=opt.should_create_graph())``, before ``opt.step()``. With a
    finite-difference ``hvp`` no double backward is needed (models with flash attention,
    ``torch.compile``, fused kernels): estimation steps call ``opt.step(closure)``, which runs the
    closure at theta and at theta + h z (and theta - h z) with identical random numbers.

    Args:
        params: parameters or param groups.
        lr: learning rate (default 1.0; ESGD is invariant to the scale of the loss and of the
            parameters, so useful values are 1e-3..1 whatever the model).
        betas: decay rates of the gradient EMA and of the (Hz)^2 EMA.
        v: quasi-hyperbolic momentum weight; ``None`` means ``beta1`` (Nesterov momentum), 1 is plain
            momentum, ``betas=(0.999, 0.999), v=0.7`` are the QHM paper's defaults.
        lr_warmup: the step size is ``lr*(1 - lr_warmup**t)``; 0 disables the warm-up.
        eps: added to the preconditioner.
        weight_decay: decoupled weight decay, scaled by the step size.
        update_d_every: estimate the preconditioner every this many steps after the warm-up.
        d_warmup: estimate on each of the first this many steps.
        seed: seed of the probe stream; default drawn from torch's global RNG at construction.
        fused: ``None`` uses the native fused kernel where it can run (and pure PyTorch elsewhere),
            ``True`` requires it (error if it cannot run), ``False`` always uses pure PyTorch.
        process_group: for data-parallel training, the ``torch.distributed`` group of the replicas:
            the seed is taken from its first rank, and estimation-step gradients and Hz are averaged
            over it in ``backward()``. None (default) does no communication.
        capturable: keep the step counters on the device (``lr`` may be a tensor) and compute the
            step scalars there, so that ``plain_step()`` does no host sync and can be compiled with
            ``torch.compile(fullgraph=True)`` or captured in a CUDA graph (see ``plain_step``).
        maximize: maximize the objective instead of minimizing it (per param group, as in
            torch.optim): the gradient is negated; the curvature estimate is unchanged, since
            (-Hz)^2 = (Hz)^2.
        hvp: how estimation steps get Hz: ``"autograd"`` (exact, double backward),
            ``"finite_difference"`` ((g(theta + h z) - g(theta))/h: two first-order passes) or
            ``"central_difference"`` ((g(theta + h z) - g(theta - h z))/2h: three passes, more accurate).
        fd_step: the finite difference's step relative to the parameters' RMS, h = fd_step * RMS(theta)
            (one h for all parameters). Default: sqrt(eps) (forward) or eps**(1/3) (central) of the
            least precise parameter dtype; under bf16/fp16 autocast pass about 0.1 (docs/mixed-precision.md).
        buffers: module buffers that a finite-difference step must leave as after one forward
            (BatchNorm running statistics): an ``nn.Module`` (all its buffers) or a list of tensors.
        state_dtype: the dtype of m and D (per param group): ``None`` (default) keeps float32 state
            (float64 for float64 parameters); ``torch.bfloat16`` halves the state (4 bytes per
            parameter) and the step's memory traffic, with the arithmetic in float32 inside the
            kernels and m and D stored back by stochastic rounding (counter-based: every device,
            shard and resumed run rounds alike), which keeps the slow average D moving where
            round-to-nearest would freeze it (docs/memory.md). float64 parameters keep float64 state.
            ``state_dict()`` saves the state as held; ``load_state_dict()`` converts it to this
            optimizer's ``state_dtype`` (bfloat16 to float32 exactly, float32 to bfloat16 by
            round-to-nearest).

    A parameter's state starts on the first estimation step on which it has a gradient; until
    then (no curvature estimate exists) it is not updated. NaN/Inf in gradients propagate into the
    parameters, as in torch.optim, except under GradScaler, whose inf/NaN steps are skipped.
    """

    # GradScaler hands the scale and its inf/NaN flag to step() instead of unscaling p.grad itself.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable,
        lr: float = 1.0,
        betas: Tuple[float, float] = (0.9, 0.999),
        v: Optional[float] = None,
        lr_warmup: float = 0.99,
        eps: float = 1e-4,
        weight_decay: float = 0.0,
        update_d_every: int = 10,
        d_warmup: int = 20,
        *,
        seed: Optional[int] = None,
        fused: Optional[bool] = None,
        process_group: Optional[Any] = None,
        capturable: bool = False,
        maximize: bool = False,
        hvp: str = "autograd",
        fd_step: Optional[float] = None,
        buffers: Optional[Union[torch.nn.Module, Iterable[Tensor]]] = None,
        state_dtype: Optional[torch.dtype] = None,
    ):
        check_hparams(lr, betas, v, lr_warmup, eps, weight_decay, "", maximize=maximize)
        check_state_dtype(state_dtype)
        check_schedule(update_d_every, d_warmup)
        check_hvp(hvp, fd_step)
        buffers = check_buffers(buffers)
        if fused is not None and not isinstance(fused, bool):
            raise ValueError(f"ESGD: invalid fused: {fused!r} (must be None, True or False)")
        if not isinstance(capturable, bool):
            raise ValueError(f"ESGD: invalid capturable: {capturable!r} (must be True or False)")
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
        elif isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"ESGD: seed must be an int or None, got {type(seed).__name__} {seed!r}")
        if process_group is not None:
            seed = broadcast_seed(int(seed), process_group)

        self.fused = fused
        self.capturable = bool(capturable)
        self.hvp = hvp
        self.fd_step = None if fd_step is None else float(fd_step)
        # Module buffers a finite-difference step restores after its perturbed passes (BatchNorm
        # running statistics): a module's buffers are looked up at each step, a list is kept as is.
        self.buffers = buffers
        self.update_d_every = int(update_d_every)
        self.d_warmup = int(d_warmup)
        self._step_index = 0  # optimizer steps taken so far
        self._last_estimate: Optional[int] = None  # step index of the latest estimation step
        self.process_group = process_group
        # Probes, and the Hessian-vector products accumulated for the next estimation step.
        self._curvature = CurvatureEstimator(int(seed), process_group)
        self._skipped_steps = 0  # steps skipped because the GradScaler found inf/NaN
        # The closure-consistency check of the finite differences (curvature.finite_difference).
        self._checked_closures: set = set()  # kinds of closure whose first estimate was checked
        self._fd_estimates = 0  # finite-difference estimation steps so far
        self._recheck = False  # the latest check failed: check the next estimate too
        self._rejected_estimates = 0  # estimates skipped because a check failed
        self._last_step_estimated = False
        self._placeholders: set = set()  # state created by DCP's initialization step (_checkpoint)
        self._graph_watch = GraphBackwardWatch(self._curvature)
        defaults = dict(lr=lr, betas=tuple(betas), v=v, lr_warmup=lr_warmup, eps=eps, weight_decay=weight_decay,
                        maximize=maximize, state_dtype=state_dtype)
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ param groups

    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"ESGD: a param group must be a dict, got {type(param_group).__name__}")
        params = param_group.get("params")
        if isinstance(params, Tensor):
            plist = [params]
        elif isinstance(params, set):
            plist = list(params)  # torch.optim refuses sets (their order changes between runs)
        else:
            # Validation reads the parameters, so an iterator is read once, here, and the list goes on.
            plist = list(params or [])
            if params is not None:
                param_group = {**param_group, "params": plist}
        where = f" in param_groups[{len(self.param_groups)}]"
        merged = {**self.defaults, **param_group}
        check_group(merged, where)
        seen: Dict[int, int] = {}
        for j, p in enumerate(plist):
            check_param(p, j, where, self.fused, self.hvp, merged.get("state_dtype"))
            p = param_tensor(p)
            if isinstance(p, Tensor):
                # A parameter listed twice would be updated twice per step, and on CUDA by two blocks
                # of one launch writing the same memory at once.
                first = seen.setdefault(id(p), j)
                if first != j:
                    raise ValueError(
                        f"ESGD: params[{j}]{where} is the same tensor as params[{first}]; list each parameter once"
                    )
        if self.capturable:
            check_capturable_lr(merged["lr"], plist, where)
        if "betas" in param_group:
            param_group = {**param_group, "betas": tuple(param_group["betas"])}
        super().add_param_group(param_group)
        self._graph_watch.watch(self.param_groups)

    @property
    def seed(self) -> int:
        """The seed of the probe stream (shared by every replica of a process group)."""
        return self._curvature.seed

    @seed.setter
    def seed(self, value: int) -> None:
        self._curvature.seed = int(value)

    # ------------------------------------------------------------------ schedule

    def _is_estimation_step(self, index: int) -> bool:
        return (
            index < self.d_warmup
            or self._last_estimate is None
            or index - self._last_estimate >= self.update_d_every
        )

    def is_estimation_step(self) -> bool:
        """True when the next ``step()`` estimates the curvature (in any ``hvp`` mode)."""
        return self._is_estimation_step(self._step_index)

    def should_create_graph(self) -> bool:
        """True when the next ``step()`` estimates the curvature with autograd and so needs the
        gradient's graph; always False with a finite-difference ``hvp``, which needs none.

        Use as ``loss.backward(create_graph=opt.should_create_graph())``.
        """
        self._graph_watch.watch(self.param_groups)  # parameters whose requires_grad was switched on later
        if self.hvp != "autograd":
            return False
        phase = self._curvature.phase  # inside step(closure, curvature_closure)
        if phase is not None:
            return phase == "curvature"
        return self._is_estimation_step(self._step_index)

    def _buffers(self) -> List[Tensor]:
        if isinstance(self.buffers, torch.nn.Module):
            return list(self.buffers.buffers())
        return list(self.buffers or [])

    def _trainable_params(self) -> List[Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def backward(
        self, loss: Tensor, *, curvature_loss: Optional[Tensor] = None, scaler: Optional[Any] = None,
        retain_graph: Optional[bool] = None,
    ) -> None:
        """Backward pass for the next step: first-order on plain steps, plus Hz on estimation steps.

        On estimation steps the gradient is taken with its graph, the Hessian-vector product Hz with
        the step's probe z is taken at once, and the graph is released before returning: nothing
        second-order outlives the call. Gradients accumulate into ``p.grad`` and Hz into the
        optimizer, so k calls on k micro-batches (each loss divided by k) followed by one ``step()``
        equal one step on the whole batch: every call of a step uses the same z, and the summed Hz is
        squared in the update.

        Args:
            loss: the (micro-batch) loss.
            curvature_loss: (``hvp="autograd"``) the loss whose double backward gives Hz on estimation
                steps, typically the loss of a slice of the batch from a forward of its own: ``loss``
                then gets a first-order backward only, and an estimation step costs a plain backward
                plus the slice's double backward instead of the whole batch's. Ignored on plain
                steps (compute it only when ``opt.is_estimation_step()``).
            scaler: a ``torch.amp.GradScaler``: the loss is scaled by it and Hz unscaled at once, so
                ``scaler.unscale_(opt)`` (e.g. for clipping) may precede ``scaler.step(opt)``.
                A non-finite Hz makes the matching gradient entries NaN, so the scaler (or any
                inf/NaN check) skips the step and lowers its scale.
            retain_graph: as in ``Tensor.backward``.

        With ``process_group`` set, estimation-step gradients and Hz are averaged over the group here
        (run the forward inside ``opt.ddp_no_sync(model)``); plain-step gradients are DDP's job.
        """
        if not isinstance(loss, Tensor):
            raise TypeError(f"ESGD.backward: loss must be a Tensor, got {type(loss).__name__}")
        if scaler is not None and not callable(getattr(scaler, "scale", None)):
            raise TypeError(f"ESGD.backward: scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        if curvature_loss is not None:
            check_curvature_loss(curvature_loss, self.hvp, self._curvature.phase)
        if scaler is not None:
            if self.hvp != "autograd":
                raise RuntimeError(GRADSCALER_FD)
            loss = scaler.scale(loss)
        if not self.should_create_graph():
            loss.backward(retain_graph=retain_graph)
            return
        params = self._trainable_params()
        if not params:
            return
        if self._curvature.phase == "curvature":
            # A curvature closure's pass: Hz alone; its gradients are not the update's.
            self._curvature.exact_backward(None, params, self._step_index, scaler, retain_graph, self._use_fused,
                                           curvature_loss=loss)
            return
        if curvature_loss is not None and scaler is not None:
            curvature_loss = scaler.scale(curvature_loss)
        self._curvature.exact_backward(loss, params, self._step_index, scaler, retain_graph, self._use_fused,
                                       curvature_loss=curvature_loss)

    def ddp_no_sync(self, model: torch.nn.Module):
        """``model.no_sync()`` when the next step estimates the curvature, else a null context.

        ``backward(create_graph=True)`` is unsupported under DistributedDataParallel, so on estimation
        steps the forward and ``opt.backward`` run outside DDP's reducer and ESGD averages gradients
        and Hz over ``process_group`` itself.
        """
        if self.should_create_graph():
            if not callable(getattr(model, "no_sync", None)):
                raise TypeError(f"ESGD.ddp_no_sync: model must be a DistributedDataParallel, got {type(model).__name__}")
            return model.no_sync()
        return contextlib.nullcontext()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._clear_pending()
        super().zero_grad(set_to_none=set_to_none)

    def _clear_pending(self) -> None:
        self._curvature.clear()

    # ------------------------------------------------------------------ the step

    def _release_graphs(self) -> None:
        self._clear_pending()
        release_graphs(self.param_groups)

    def _collect(self) -> List[Tuple[List[Tensor], List[Tensor]]]:
        """Validate everything before any state changes; return each group's params with gradients.

        One pass reads every p.grad, then each check runs over the gathered lists: a plain step's
        host time per tensor is what a model with many small tensors pays every step."""
        work = []
        checked = set()
        for i, group in enumerate(self.param_groups):
            check_group(group, f" in param_groups[{i}]", sync=not self.capturable)
            every = [p.grad for p in group["params"]]  # p.grad is a property: read it once
            params = [p for p, g in zip(group["params"], every) if g is not None]
            grads = [g for g in every if g is not None]
            if any(g.is_sparse for g in grads):
                j = _index_in(group["params"], next(p for p, g in zip(params, grads) if g.is_sparse))
                raise RuntimeError(f"ESGD does not support sparse gradients (param_groups[{i}]['params'][{j}])")
            sdtype = group.get("state_dtype")
            if sdtype is not None:
                for p in params:
                    if p.dtype == torch.float64:
                        check_state_for_param(p, sdtype, f"param_groups[{i}]['params'][{_index_in(group['params'], p)}]")
            if self.fused:
                for p in params:
                    if (p.device, p.dtype) in checked:
                        continue
                    if not _extension.fused_supported(p.device, p.dtype):
                        raise RuntimeError(
                            f"ESGD(fused=True): the fused kernel cannot run param_groups[{i}]['params']"
                            f"[{_index_in(group['params'], p)}] ({p.dtype} on {p.device}): {fused_unavailable_reason()}"
                        )
                    checked.add((p.device, p.dtype))
            work.append((params, grads))
        return work

    def _use_fused(self, device: torch.device, dtype: torch.dtype) -> bool:
        if self.fused is False:
            return False
        if self.fused is None and not _extension.COMPILABLE and torch.compiler.is_compiling():
            return False  # this torch cannot compile the native ops (see _extension.COMPILABLE)
        return _extension.fused_supported(device, dtype)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None,
             curvature_closure: Optional[Callable[[], Any]] = None):
        """Perform one optimization step; ``closure`` re-evaluates the model and does the backward.

        ``curvature_closure`` (optional; needs ``closure``): on estimation steps the closure runs once,
        at the current parameters, for the update's gradient (first-order backward passes in every
        mode), and Hz comes from the curvature closure instead, which evaluates whatever batch it
        likes (typically a slice of the step's batch) under the same protocol as the closure: it
        may call ``opt.zero_grad()``, does its own backward (``opt.backward(loss)`` works with every
        estimator; the exact estimator also takes a loss returned without a backward) and returns
        the loss. A finite difference runs it at theta and theta + h z (forward) or at theta +- h z
        (central); the exact estimator once, with a double backward. Plain steps never call it.
        ``p.grad`` ends holding the closure's gradient only.

        Under ``torch.amp.GradScaler`` (``scaler.step(opt)``) the gradient's scale is undone inside
        the update, and a step on which the scaler found inf/NaN changes nothing: parameters, state,
        counters and the estimation schedule stay bit-identical, and the step is retried (with the
        same probe) by the next call.
        """
        self._refuse_compiled_step()
        check_closures(closure, curvature_closure)
        index = self._step_index
        estimate = self._is_estimation_step(index)
        if closure is None and _checkpoint.state_init_step(self):
            return None
        # GradScaler's fused-optimizer protocol: it sets these two attributes around this call.
        grad_scale: Optional[Tensor] = getattr(self, "grad_scale", None)
        found_inf: Optional[Tensor] = getattr(self, "found_inf", None)

        # Where this step's Hz comes from: a finite difference runs the closure itself, at theta and
        # perturbed; autograd's products come from opt.backward (self._curvature.hz) or from the
        # graph in p.grad (graph_products, below).
        fd: Optional[FiniteDifference] = None
        loss = None
        if self.hvp != "autograd" and (grad_scale is not None or found_inf is not None):
            raise RuntimeError(GRADSCALER_FD)
        if estimate and self.hvp != "autograd":
            fd = self._finite_difference(closure, index, curvature_closure)
            loss = fd.loss
            if fd.mismatch is not None:
                # A later check found the closure inconsistent: the estimate would be noise, so this
                # step updates as a plain step, and the next one estimates (and checks) again.
                fd.restore()
                warnings.warn(fd.mismatch + " ESGD skipped this curvature estimate (diagnostics()"
                              "['rejected_estimates'] counts them).", stacklevel=_user_stacklevel())
                fd, estimate = None, False
                self._rejected_estimates += 1
        elif estimate and curvature_closure is not None:
            trainable = self._trainable_params()
            loss = self._curvature.exact_curvature_closure(closure, curvature_closure, trainable, index,
                                                           self._buffers(), self._use_fused)
        elif closure is not None:
            with torch.enable_grad():
                loss = closure()
        try:
            return self._apply(index, estimate, loss, fd, grad_scale, found_inf)
        finally:
            if fd is not None:
                # Parameters the update did not write from their copies (all of them, after an error).
                fd.restore()

    def _apply(self, index: int, estimate: bool, loss: Any, fd: Optional[FiniteDifference],
               grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> Any:
        """The rest of `step()` once the gradients (and a finite difference's) are in: validation,
        GradScaler's skip, the autograd products of a create_graph backward, the update."""
        work = self._collect()
        _checkpoint.drop_placeholders(self)
        all_params = [p for params, _ in work for p in params]
        if not estimate:
            warn_unestimated(self.param_groups, all_params, self.state)
        skip, grad_scale_inv, hz_scale_inv = loss_scales(self._curvature.kinds, all_params, estimate, grad_scale,
                                                         found_inf)
        if skip:
            self._release_graphs()
            self._skipped_steps += 1
            return loss

        if estimate and fd is None and all_params:
            self._curvature.graph_products(all_params, self._trainable_params(), index, self._use_fused)
        hz_of = dict(self._curvature.hz)
        if estimate or any(g.requires_grad for _, grads in work for g in grads):
            self._release_graphs()
        else:
            self._clear_pending()  # no p.grad has a graph: every non-None one was gathered above
        _update.apply(self, work, estimate, hz_of, fd, grad_scale_inv, hz_scale_inv)
        self._advance(index, estimate)
        return loss

    def _finite_difference(
        self, closure: Optional[Callable[[], Any]], index: int, curvature_closure: Optional[Callable[[], Any]] = None,
    ) -> FiniteDifference:
        if closure is None:
            raise RuntimeError(
                f"ESGD(hvp={self.hvp!r}): step {user_step(index)} estimates the curvature, which takes the gradient at "
                "perturbed parameters: call opt.step(closure) with a closure that runs the forward and the "
                "backward and returns the loss (e.g. def closure(): opt.zero_grad(); loss = loss_fn(model(x), y); "
                "loss.backward(); return loss). opt.is_estimation_step() tells which steps need it."
            )
        trainable = self._trainable_params()
        if not trainable:
            raise RuntimeError("ESGD: no parameter requires grad, so there is no curvature to estimate")
        rel_step = self.fd_step if self.fd_step is not None else default_fd_step(self.hvp, {p.dtype for p in trainable})
        # The first estimate from each kind of closure repeats a pass to check that the closure
        # computes one function (an error if not, before anything changes); later ones do every
        # REPEAT_CHECK_EVERY-th estimate, and every one after a failed check, until one passes.
        kind = "closure" if curvature_closure is None else "curvature_closure"
        check = None
        if kind not in self._checked_closures:
            check = "raise"
        elif self._recheck or self._fd_estimates % REPEAT_CHECK_EVERY == 0:
            check = "report"
        fd = self._curvature.finite_difference(
            closure, trainable, index, central=self.hvp == "central_difference", rel_step=rel_step,
            buffers=self._buffers(), use_fused=self._use_fused, curvature_closure=curvature_closure, check=check,
        )
        self._fd_estimates += 1
        if check is not None:
            self._recheck = fd.mismatch is not None
            if fd.mismatch is None:
                self._checked_closures.add(kind)
        return fd

    def _advance(self, index: int, estimate: bool) -> None:
        self._step_index = index + 1
        self._last_step_estimated = estimate
        if estimate:
            self._last_estimate = index

    # ------------------------------------------------------------------ capturable mode

    def _refuse_compiled_step(self) -> None:
        # Dynamo (torch 2.14) drops attribute stores made inside a traced Optimizer.step, so a
        # compiled step() would silently never advance the estimation schedule.
        if torch.compiler.is_compiling():
            raise RuntimeError(
                "ESGD.step() cannot be compiled: the estimation schedule is host state. Construct "
                "ESGD(..., capturable=True), compile a function that calls opt.plain_step() on steps "
                "where opt.is_estimation_step() is False, and call opt.count_plain_step() after it, "
                "outside the compiled function."
            )

    @torch.no_grad()
    def plain_step(self) -> None:
        """Apply the update of a plain (non-estimation) step without advancing the host-side schedule.

        Needs ``capturable=True``; does no host sync, so it can be compiled with
        ``torch.compile(fullgraph=True)`` or captured in a CUDA graph. Neither a compiled call nor a
        graph replay can advance the host-side schedule, so after each one call
        ``opt.count_plain_step()`` (outside the compiled function). Use it only on steps for which
        ``opt.is_estimation_step()`` is False; estimation steps run eagerly through
        ``opt.backward(loss); opt.step()`` (``opt.step(closure)`` with a finite-difference ``hvp``).
        """
        if not self.capturable:
            raise RuntimeError("ESGD.plain_step() needs capturable=True (its counters live on the device)")
        # Not checked while tracing: reading the step index would make torch.compile guard on it
        # and recompile every step; count_plain_step() checks the schedule on the host instead.
        if not torch.compiler.is_compiling() and self.is_estimation_step():
            raise RuntimeError(
                f"ESGD.plain_step(): step {user_step(self._step_index)} is an estimation step; use opt.step()"
            )
        work = self._collect()
        if not torch.compiler.is_compiling():
            _checkpoint.drop_placeholders(self)
            warn_unestimated(self.param_groups, [p for params, _ in work for p in params], self.state)
        _update.apply(self, work, False, {})

    def count_plain_step(self) -> None:
        """Advance the host-side schedule by one plain step applied by a compiled or replayed ``plain_step()``."""
        if self.is_estimation_step():
            raise RuntimeError(
                f"ESGD.count_plain_step(): step {user_step(self._step_index)} is an estimation step, which a "
                "replayed plain step does not perform; run it with opt.backward(loss); opt.step() "
                "(opt.step(closure) with a finite-difference hvp)"
            )
        self._advance(self._step_index, False)

    # ------------------------------------------------------------------ observability

    def diagnostics(self) -> List[dict]:
        """Per param group: where the schedule stands and summary statistics of the preconditioner.

        Computed on demand from the state (one host sync per call), so it costs nothing in steps that
        do not ask. Keys: ``step`` (optimizer steps taken), ``warmup_factor`` (1 - lr_warmup**t, the
        fraction of lr in use), ``lr`` and ``effective_lr`` (lr * warmup_factor), ``estimated``
        (whether the last step estimated the curvature), ``estimates`` (curvature estimates so far),
        ``skipped_steps`` (steps GradScaler skipped for inf/NaN, all groups), ``rejected_estimates``
        (finite-difference estimates skipped because the closure failed its consistency check), ``sqrt_d``: min, mean and
        max over the group's elements of the bias-corrected sqrt(D), the preconditioner the momentum is
        divided by (None before the first estimate; over every rank's shards for sharded parameters,
        so every rank of a sharded model must call it); ``hvp``, the estimator, and ``fd_h``, the step h
        of the latest finite-difference estimate (None before one).
        """
        return _diagnostics.diagnostics(self)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        return _checkpoint.state_dict(self, super().state_dict)

    def load_state_dict(self, state_dict: dict) -> None:
        _checkpoint.load(self, state_dict, super().load_state_dict)

    def __getstate__(self) -> Dict[str, Any]:
        _checkpoint.refuse_pickling_process_group(self)
        return _checkpoint.picklable_state(self, super().__getstate__())

    def __setstate__(self, state: Dict[str, Any]) -> None:
        # torch.optim's load_state_dict calls this too, with its state and param_groups only.
        super().__setstate__(state)
        self.defaults.setdefault("state_dtype", None)  # pickled before the option existed
        if "_graph_watch" not in self.__dict__ and "_curvature" in self.__dict__:
            self._graph_watch = GraphBackwardWatch(self._curvature)
            self._graph_watch.watch(self.param_groups)
        if "_curvature" in self.__dict__:
            # Optimizers pickled before the closure check: its counters start afresh.
            for name, value in (("_checked_closures", set()), ("_fd_estimates", 0), ("_recheck", False),
                                ("_rejected_estimates", 0)):
                self.__dict__.setdefault(name, value)
            self._curvature.__dict__.setdefault("phase", None)

    def __deepcopy__(self, memo: Optional[dict] = None) -> "ESGD":
        memo = _checkpoint.deepcopy_memo(self, memo)
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(_checkpoint.picklable_state(self, super().__getstate__()), memo))
        return new
