"""ESGD-M: equilibrated SGD with quasi-hyperbolic momentum, as a torch.optim.Optimizer."""

import math
import numbers
from collections import OrderedDict
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor

from . import _extension
from .functional import esgd_update, state_dtype

__all__ = ["ESGD"]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_STATE_KEYS = ("exp_avg", "exp_hz_sq")
# Probe seeds are derived from (seed, step index, device): a counter-based stream whose whole state is
# two integers, so checkpoints are portable across devices and resumed runs draw the same probes.
_MASK64 = (1 << 64) - 1


def _mix_seed(*values: int) -> int:
    """splitmix64 over the values: nearby inputs (consecutive steps) give unrelated 63-bit seeds."""
    x = 0
    for value in values:
        x = ((x ^ (value & _MASK64)) + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x >> 1


def _check_hparams(lr, betas, v, lr_warmup, eps, weight_decay, where: str) -> None:
    def bad(name, value, rule):
        raise ValueError(f"ESGD: invalid {name}{where}: {value!r} ({rule})")

    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            bad("lr", lr, "a tensor lr must have one element")
        lr = lr.item()
    if not isinstance(lr, numbers.Real) or not lr >= 0.0:
        bad("lr", lr, "must be a real number >= 0")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        bad("betas", betas, "must be a pair (beta1, beta2)")
    for i, beta in enumerate(betas):
        if not isinstance(beta, numbers.Real) or not 0.0 <= beta < 1.0:
            bad(f"betas[{i}]", beta, "must be in [0, 1)")
    if v is not None and (not isinstance(v, numbers.Real) or not 0.0 <= v <= 1.0):
        bad("v", v, "must be None (= beta1) or in [0, 1]")
    if not isinstance(lr_warmup, numbers.Real) or not 0.0 <= lr_warmup < 1.0:
        bad("lr_warmup", lr_warmup, "must be in [0, 1)")
    if not isinstance(eps, numbers.Real) or not eps >= 0.0 or math.isinf(eps):
        bad("eps", eps, "must be a finite real number >= 0")
    if not isinstance(weight_decay, numbers.Real) or not weight_decay >= 0.0 or math.isinf(weight_decay):
        bad("weight_decay", weight_decay, "must be a finite real number >= 0")


def _check_schedule(update_d_every, d_warmup) -> None:
    for name, value, low in (("update_d_every", update_d_every, 1), ("d_warmup", d_warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"ESGD: {name} must be an int, got {type(value).__name__} {value!r}")
        if value < low:
            raise ValueError(f"ESGD: invalid {name}: {value!r} (must be >= {low})")


def _fused_unavailable_reason() -> str:
    if not _extension.LOADED:
        return f"the native extension is not loaded ({_extension.LOAD_ERROR})"
    return "the native extension was not built for this device or dtype (see esgd_cuda.extension_info())"


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
    ``estimates`` (k).

    Estimation steps need the gradient's autograd graph: call ``opt.backward(loss)`` (recommended),
    or ``loss.backward(create_graph=opt.should_create_graph())``, before ``opt.step()``.

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

    A parameter's state starts on the first estimation step on which it has a gradient; until
    then (no curvature estimate exists) it is not updated. NaN/Inf in gradients propagate into the
    parameters, as in torch.optim.
    """

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
    ):
        _check_hparams(lr, betas, v, lr_warmup, eps, weight_decay, "")
        _check_schedule(update_d_every, d_warmup)
        if fused not in (None, True, False):
            raise ValueError(f"ESGD: invalid fused: {fused!r} (must be None, True or False)")
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
        elif isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"ESGD: seed must be an int or None, got {type(seed).__name__} {seed!r}")

        self.fused = fused
        self.update_d_every = int(update_d_every)
        self.d_warmup = int(d_warmup)
        self.seed = int(seed)
        self._step_index = 0  # optimizer steps taken so far
        self._last_estimate: Optional[int] = None  # step index of the latest estimation step
        # Gradients carrying their autograd graph, kept by `backward()` for the next estimation step.
        self._graph_grads: Dict[Tensor, Tensor] = {}
        self._graph_requested = False
        # Tests may replace the probe (a callable: list of params -> list of z); None draws Rademacher.
        self._probe_fn: Optional[Callable[[List[Tensor]], List[Tensor]]] = None
        defaults = dict(lr=lr, betas=tuple(betas), v=v, lr_warmup=lr_warmup, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ param groups

    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"ESGD: a param group must be a dict, got {type(param_group).__name__}")
        params = param_group.get("params")
        plist = [params] if isinstance(params, Tensor) else list(params or [])
        where = f" in param_groups[{len(self.param_groups)}]"
        merged = {**self.defaults, **param_group}
        _check_hparams(
            merged["lr"], merged["betas"], merged["v"], merged["lr_warmup"], merged["eps"],
            merged["weight_decay"], where,
        )
        for j, p in enumerate(plist):
            if isinstance(p, Tensor) and p.is_complex():
                raise ValueError(f"ESGD: params[{j}]{where} is complex ({p.dtype}); complex parameters are not supported")
            if isinstance(p, Tensor) and p.dtype not in _SUPPORTED_DTYPES:
                raise ValueError(
                    f"ESGD: params[{j}]{where} has dtype {p.dtype}; supported: float16, bfloat16, float32, float64"
                )
            if isinstance(p, Tensor) and self.fused and not _extension.fused_supported(p.device, p.dtype):
                raise RuntimeError(
                    f"ESGD(fused=True): the fused kernel cannot run params[{j}]{where} "
                    f"({p.dtype} on {p.device}): {_fused_unavailable_reason()}"
                )
        if "betas" in param_group:
            param_group = {**param_group, "betas": tuple(param_group["betas"])}
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ schedule

    def _is_estimation_step(self, index: int) -> bool:
        return (
            index < self.d_warmup
            or self._last_estimate is None
            or index - self._last_estimate >= self.update_d_every
        )

    def should_create_graph(self) -> bool:
        """True when the next ``step()`` estimates the curvature and so needs the gradient's graph.

        Use as ``loss.backward(create_graph=opt.should_create_graph())``.
        """
        return self._is_estimation_step(self._step_index)

    def _trainable_params(self) -> List[Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def backward(self, loss: Tensor, **kwargs) -> None:
        """Backward pass for the next step: first-order on plain steps, with the graph on estimation steps.

        On estimation steps the graph-carrying gradients are kept by the optimizer until ``step()``
        (which consumes them) and ``p.grad`` receives detached copies, so no parameter <-> gradient
        reference cycle is created. Gradients accumulate into ``p.grad`` as with ``loss.backward()``.
        Extra keyword arguments (e.g. ``retain_graph``) go to the underlying autograd call.
        """
        if not isinstance(loss, Tensor):
            raise TypeError(f"ESGD.backward: loss must be a Tensor, got {type(loss).__name__}")
        if not self.should_create_graph():
            loss.backward(**kwargs)
            return
        params = self._trainable_params()
        if not params:
            return
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True, **kwargs)
        self._graph_requested = True
        with torch.enable_grad():
            for p, g in zip(params, grads):
                if g is not None:
                    # Summed with grad mode on: the accumulated gradient must keep both graphs.
                    prev = self._graph_grads.get(p)
                    self._graph_grads[p] = g if prev is None else prev + g
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is None:
                    continue
                # A copy, not a view: in-place edits of p.grad (clipping, unscaling) must not bump the
                # version of a tensor the double-backward may need.
                if p.grad is None:
                    p.grad = g.detach().clone(memory_format=torch.preserve_format)
                else:
                    p.grad.add_(g.detach())

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._graph_grads.clear()
        self._graph_requested = False
        super().zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------ the step

    def _probe_generator(self, device: torch.device, dtype: torch.dtype, index: int) -> torch.Generator:
        # Each (device, dtype) bucket draws from its own stream: equal seeds would give parameters of
        # different dtypes identical probes and bias the estimate wherever the loss couples them.
        dev_index = device.index if device.index is not None else -1
        seed = _mix_seed(self.seed, index, dev_index + 1, _SUPPORTED_DTYPES.index(dtype))
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        return gen

    def _draw_probes(self, params: List[Tensor], index: int) -> List[Tensor]:
        # One flat Rademacher draw per (device, dtype): few launches whatever the number of tensors.
        buckets: "OrderedDict[Tuple[torch.device, torch.dtype], List[int]]" = OrderedDict()
        for i, p in enumerate(params):
            buckets.setdefault((p.device, p.dtype), []).append(i)
        zs: List[Optional[Tensor]] = [None] * len(params)
        for (device, dtype), idx in buckets.items():
            sizes = [params[i].numel() for i in idx]
            flat = torch.empty(sum(sizes), device=device, dtype=dtype)
            flat.bernoulli_(0.5, generator=self._probe_generator(device, dtype, index)).mul_(2).sub_(1)
            for i, chunk in zip(idx, flat.split(sizes)):
                zs[i] = chunk.view(params[i].shape)
        return zs  # type: ignore[return-value]

    def _hessian_vector_products(self, params: List[Tensor], index: int) -> List[Tensor]:
        graph_grads = []
        for p in params:
            g = self._graph_grads.get(p)
            if g is None and p.grad.requires_grad:
                g = p.grad
            graph_grads.append(g)
        if all(g is None for g in graph_grads) and not self._graph_requested:
            raise RuntimeError(
                f"ESGD: step {index} estimates the curvature (opt.should_create_graph() is True), but no "
                "parameter gradient carries an autograd graph. Call opt.backward(loss), or "
                "loss.backward(create_graph=opt.should_create_graph()), before opt.step()."
            )
        if self._probe_fn is not None:
            zs = list(self._probe_fn(params))
        else:
            zs = self._draw_probes(params, index)
        outputs, grad_outputs = [], []
        for g, z in zip(graph_grads, zs):
            # A gradient without a graph does not depend on any parameter: its rows of H are zero.
            if g is not None and g.requires_grad:
                outputs.append(g)
                grad_outputs.append(z.to(g.dtype))
        hzs: List[Optional[Tensor]] = [None] * len(params)
        if outputs:
            with torch.enable_grad():
                hzs = list(torch.autograd.grad(outputs, params, grad_outputs=grad_outputs, allow_unused=True))
        return [torch.zeros_like(p) if hz is None else hz.detach() for p, hz in zip(params, hzs)]

    def _release_graphs(self) -> None:
        self._graph_grads.clear()
        self._graph_requested = False
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad
                if g is not None and g.requires_grad:
                    p.grad = g.detach()

    def _collect(self) -> List[Tuple[List[Tensor], List[Tensor]]]:
        """Validate everything before any state changes; return each group's params with gradients."""
        work = []
        checked = set()
        for i, group in enumerate(self.param_groups):
            _check_hparams(
                group["lr"], group["betas"], group["v"], group["lr_warmup"], group["eps"],
                group["weight_decay"], f" in param_groups[{i}]",
            )
            params, grads = [], []
            for j, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError(
                        f"ESGD does not support sparse gradients (param_groups[{i}]['params'][{j}])"
                    )
                if self.fused and (p.device, p.dtype) not in checked:
                    if not _extension.fused_supported(p.device, p.dtype):
                        raise RuntimeError(
                            f"ESGD(fused=True): the fused kernel cannot run param_groups[{i}]['params'][{j}] "
                            f"({p.dtype} on {p.device}): {_fused_unavailable_reason()}"
                        )
                    checked.add((p.device, p.dtype))
                params.append(p)
                grads.append(g)
            work.append((params, grads))
        return work

    def _use_fused(self, device: torch.device, dtype: torch.dtype) -> bool:
        if self.fused is False:
            return False
        return _extension.fused_supported(device, dtype)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        """Perform one optimization step; ``closure`` re-evaluates the model and does the backward."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        index = self._step_index
        estimate = self._is_estimation_step(index)
        work = self._collect()
        all_params = [p for params, _ in work for p in params]
        hz_of: Dict[Tensor, Tensor] = {}
        if estimate and all_params:
            hz_of = dict(zip(all_params, self._hessian_vector_products(all_params, index)))
        self._release_graphs()

        for group, (params, grads) in zip(self.param_groups, work):
            beta1, beta2 = group["betas"]
            v = beta1 if group["v"] is None else group["v"]
            # Tensors that share device, dtype and counters share one kernel call. Counters are per
            # parameter (a parameter may join late), but normally all of a group's are equal.
            buckets: Dict[tuple, Tuple[List[Tensor], ...]] = {}
            for p, g in zip(params, grads):
                state = self.state[p]
                if not state:
                    if not estimate:
                        continue  # no curvature estimate yet: wait for the next estimation step
                    sdtype = state_dtype(p.dtype)
                    state["step"] = 0
                    state["estimates"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=sdtype, memory_format=torch.preserve_format)
                    state["exp_hz_sq"] = torch.zeros_like(p, dtype=sdtype, memory_format=torch.preserve_format)
                t = state["step"] + 1
                state["step"] = t
                k = state["estimates"]
                if estimate:
                    k += 1
                    state["estimates"] = k
                key = (p.device, p.dtype, t, k)
                lists = buckets.get(key)
                if lists is None:
                    lists = buckets[key] = ([], [], [], [], [])
                lists[0].append(p)
                lists[1].append(g)
                lists[2].append(state["exp_avg"])
                lists[3].append(state["exp_hz_sq"])
                if estimate:
                    lists[4].append(hz_of[p])

            for (device, dtype, t, k), lists in buckets.items():
                # mb = beta1**t, db = beta2**k, warm = lr_warmup**t: the running products of the
                # algorithm, in closed form (as torch.optim.Adam does) so state is two integers.
                step_size = float(group["lr"]) * (1.0 - group["lr_warmup"] ** t)
                esgd_update(
                    lists[0],
                    lists[1],
                    lists[2],
                    lists[3],
                    lists[4] if estimate else None,
                    beta1=beta1,
                    beta2=beta2,
                    v=v,
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    step_size=step_size,
                    momentum_scale=1.0 / (1.0 - beta1**t * v),
                    denom_scale=1.0 / math.sqrt(1.0 - beta2**k),
                    fused=self._use_fused(device, dtype),
                )

        self._step_index = index + 1
        if estimate:
            self._last_estimate = index
        return loss

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["esgd"] = {
            "step_index": self._step_index,
            "last_estimate": self._last_estimate,
            "update_d_every": self.update_d_every,
            "d_warmup": self.d_warmup,
            "seed": self.seed,
        }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict) or "esgd" not in state_dict:
            raise ValueError("ESGD.load_state_dict: state_dict has no 'esgd' entry; it was not saved by ESGD")
        sd = dict(state_dict)
        glob = dict(sd.pop("esgd"))
        _check_schedule(glob["update_d_every"], glob["d_warmup"])
        saved_state = sd.get("state", {})
        saved_ids = [i for g in sd.get("param_groups", []) for i in g["params"]]
        super().load_state_dict(sd)
        # torch.optim casts floating state to the parameter dtype; ESGD keeps float32 state for 16-bit
        # parameters, so reload those tensors from the checkpoint at full precision.
        current = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, current):
            if pid not in saved_state or p not in self.state:
                continue
            for key in _STATE_KEYS:
                value = saved_state[pid].get(key)
                if isinstance(value, Tensor):
                    self.state[p][key] = value.to(device=p.device, dtype=state_dtype(p.dtype), copy=True)
        self._step_index = int(glob["step_index"])
        self._last_estimate = None if glob["last_estimate"] is None else int(glob["last_estimate"])
        self.update_d_every = int(glob["update_d_every"])
        self.d_warmup = int(glob["d_warmup"])
        self.seed = int(glob["seed"])
        self._graph_grads.clear()
        self._graph_requested = False
