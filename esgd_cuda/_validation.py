"""Argument checks shared by the optimizer's constructor, its param groups and every step.

Each check raises before any state changes, with a message that names the argument (and the param
group, through `where`).
"""

import math
import numbers

import torch
from torch import Tensor

from . import _extension
from .distributed import check_sharding, is_sharded

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# A param group's state_dtype: None (float32 state, float64 for float64 parameters) or one of these.
STATE_DTYPES = (torch.float32, torch.bfloat16)


def user_step(index: int) -> int:
    """The step number an error message shows: users count the first step as step 1, the optimizer's
    index counts the steps already taken (0 during the first)."""
    return index + 1


def check_hparams(
    lr, betas, v, lr_warmup, eps, weight_decay, where: str, sync: bool = True, maximize: bool = False
) -> None:
    def bad(name, value, rule):
        raise ValueError(f"ESGD: invalid {name}{where}: {value!r} ({rule})")

    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            bad("lr", lr, "Tensor lr must be 1-element")
        if not sync or lr.device.type == "meta":
            # Capturable steps must not read device values on the host; a tensor lr was range-checked
            # when its group was added, and later in-place changes are the caller's responsibility.
            # A meta tensor has no value to check.
            lr = 0.0
        else:
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
    if not isinstance(maximize, bool):
        bad("maximize", maximize, "must be True or False")


def check_group(group: dict, where: str, sync: bool = True) -> None:
    """check_hparams on a param group's entries."""
    check_hparams(
        group["lr"], group["betas"], group["v"], group["lr_warmup"], group["eps"], group["weight_decay"],
        where, sync=sync, maximize=group.get("maximize", False),
    )
    check_state_dtype(group.get("state_dtype"), where)


def check_state_dtype(state_dtype, where: str = "") -> None:
    if state_dtype is not None and state_dtype not in STATE_DTYPES:
        raise ValueError(f"ESGD: invalid state_dtype{where}: {state_dtype!r} (must be None, torch.float32 or "
                         "torch.bfloat16)")


def check_state_for_param(p: Tensor, state_dtype, what: str) -> None:
    """float64 parameters keep float64 state: a float64 model asks for the precision."""
    if state_dtype is not None and p.dtype == torch.float64:
        raise ValueError(f"ESGD: {what} is float64, whose state is always float64; state_dtype={state_dtype} "
                         "applies to float32, float16 and bfloat16 parameters (put float64 ones in a param group "
                         "with state_dtype=None)")


def check_schedule(update_d_every, d_warmup) -> None:
    for name, value, low in (("update_d_every", update_d_every, 1), ("d_warmup", d_warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"ESGD: {name} must be an int, got {type(value).__name__} {value!r}")
        if value < low:
            raise ValueError(f"ESGD: invalid {name}: {value!r} (must be >= {low})")


def param_tensor(p):
    """The tensor of a params entry: torch.optim accepts tensors and (name, tensor) pairs."""
    if isinstance(p, tuple) and len(p) == 2 and isinstance(p[1], Tensor):
        return p[1]
    return p


def check_param(p, j: int, where: str, fused, hvp: str = "autograd", state_dtype=None) -> None:
    """A parameter ESGD can update: a real floating tensor (sharded along dim 0 with a
    finite-difference hvp) whose dtype allows the group's state_dtype, and the fused kernel's when
    fused=True."""
    name = f" ({p[0]!r})" if isinstance(p, tuple) and len(p) == 2 else ""
    p = param_tensor(p)
    if not isinstance(p, Tensor):
        return
    what = f"params[{j}]{name}{where}"
    if is_sharded(p):
        if hvp == "autograd":
            # fully_shard (FSDP2) computes with unsharded copies and reduce-scatters their gradients
            # into the sharded p.grad from post-accumulate-grad hooks; the exact estimator's double
            # backward (torch.autograd.grad) accumulates nothing, so those hooks never run: it would
            # never see a gradient, and FSDP2 has no create_graph backward either.
            raise ValueError(
                f"ESGD: {what} is a DTensor (torch.distributed.fsdp.fully_shard); the exact estimator "
                "(hvp='autograd') needs a double backward, which sharded training does not provide. Use "
                "ESGD(..., hvp='finite_difference') (or 'central_difference') with opt.step(closure): "
                "its passes are ordinary FSDP2 forward and backward passes (docs/distributed.md: Sharded "
                "training (FSDP2))."
            )
        check_sharding(p, what)
    if p.is_complex():
        raise ValueError(f"ESGD: {what} is complex ({p.dtype}); complex parameters are not supported")
    if p.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"ESGD: {what} has dtype {p.dtype}; supported: float16, bfloat16, float32, float64")
    check_state_for_param(p, state_dtype, what)
    if fused and not _extension.fused_supported(p.device, p.dtype):
        raise RuntimeError(
            f"ESGD(fused=True): the fused kernel cannot run {what} ({p.dtype} on {p.device}): "
            f"{fused_unavailable_reason()}"
        )


def check_capturable_lr(lr, params, where: str) -> None:
    """A tensor lr in capturable mode must live on its parameters' device: the step reads it there,
    and a copy from host memory inside the update cannot be captured in a CUDA graph."""
    if not isinstance(lr, Tensor):
        return
    for j, p in enumerate(params):
        p = param_tensor(p)
        if isinstance(p, Tensor) and p.device != lr.device:
            raise ValueError(
                f"ESGD(capturable=True): lr{where} is a tensor on {lr.device}, but params[{j}] is on "
                f"{p.device}; put lr on the parameters' device (torch.tensor(lr, device={str(p.device)!r})) "
                "or pass a float"
            )


HVP_MODES = ("autograd", "finite_difference", "central_difference")


def check_hvp(hvp, fd_step) -> None:
    if hvp not in HVP_MODES:
        raise ValueError(f"ESGD: invalid hvp: {hvp!r} (must be one of {', '.join(map(repr, HVP_MODES))})")
    if fd_step is not None:
        if isinstance(fd_step, bool) or not isinstance(fd_step, numbers.Real) or not 0.0 < fd_step < math.inf:
            raise ValueError(f"ESGD: invalid fd_step: {fd_step!r} (must be None or a finite real number > 0)")
        if hvp == "autograd":
            raise ValueError("ESGD: fd_step is the step of a finite difference; it needs "
                             "hvp='finite_difference' or 'central_difference', got hvp='autograd'")


def check_buffers(buffers):
    """None, a module (whose buffers are looked up at each step) or a list of tensors."""
    if buffers is None or isinstance(buffers, torch.nn.Module):
        return buffers
    if isinstance(buffers, Tensor):
        buffers = [buffers]
    try:
        out = list(buffers)
    except TypeError:
        raise TypeError(
            f"ESGD: buffers must be an nn.Module or an iterable of tensors, got {type(buffers).__name__}"
        ) from None
    for i, b in enumerate(out):
        if not isinstance(b, Tensor):
            raise TypeError(f"ESGD: buffers[{i}] is a {type(b).__name__}, expected a tensor")
    return out


def fused_unavailable_reason() -> str:
    if not _extension.LOADED:
        return f"the native extension is not loaded ({_extension.LOAD_ERROR})"
    return "the native extension was not built for this device or dtype (see esgd_cuda.extension_info())"


def check_closures(closure, curvature_closure) -> None:
    """step(closure, curvature_closure): both callables, and a curvature closure only with a closure
    (the closure gives the update's gradient; the curvature closure only Hz)."""
    if closure is not None and not callable(closure):
        raise TypeError(f"ESGD.step: closure must be callable, got {type(closure).__name__}")
    if curvature_closure is None:
        return
    if not callable(curvature_closure):
        raise TypeError(f"ESGD.step: curvature_closure must be callable, got {type(curvature_closure).__name__}")
    if closure is None:
        raise ValueError(
            "ESGD.step: curvature_closure needs a closure too: the closure gives the update's gradient "
            "(on every step), the curvature closure only the curvature estimate (on estimation steps). "
            "Call opt.step(closure, curvature_closure=...)."
        )


def check_curvature_loss(curvature_loss, hvp: str, phase) -> None:
    """ESGD.backward(loss, curvature_loss=...): the exact estimator's form of a curvature closure."""
    if not isinstance(curvature_loss, Tensor):
        raise TypeError(f"ESGD.backward: curvature_loss must be a Tensor, got {type(curvature_loss).__name__}")
    if hvp != "autograd":
        raise ValueError(
            f"ESGD.backward: curvature_loss is for hvp='autograd'; a finite difference (hvp={hvp!r}) "
            "re-evaluates the curvature's function at perturbed parameters, so it takes a function: "
            "opt.step(closure, curvature_closure=...)."
        )
    if phase is not None:
        raise ValueError(
            "ESGD.backward: curvature_loss inside opt.step(closure, curvature_closure): the curvature "
            "closure already gives Hz; pass one or the other."
        )
    if not curvature_loss.requires_grad:
        raise ValueError(
            "ESGD.backward: curvature_loss does not depend on the parameters (it does not require grad); "
            "pass the loss of a forward of the model, not a detached value."
        )
