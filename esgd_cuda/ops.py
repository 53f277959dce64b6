"""Typed Python entry points to the fused native ops torch.ops.esgd_cuda.*.

Each op updates its mutable lists in place and returns nothing; `esgd_cuda.functional.esgd_update`
documents the per-element math. Fake (meta) implementations are registered next to the ops so that
torch.compile can trace through them.
"""

from typing import List, Optional

import torch
from torch import Tensor

from . import _extension

__all__ = [
    "esgd_update_",
    "esgd_update_hz_",
    "esgd_update_capturable_",
    "esgd_update_fd_",
    "esgd_rademacher_",
    "esgd_fd_perturb_",
]


def _require_extension() -> None:
    if not _extension.LOADED:
        raise RuntimeError(
            f"esgd_cuda native kernels are not available ({_extension.LOAD_ERROR}); "
            "use esgd_update(..., fused=False)"
        )


def esgd_update_(
    params: List[Tensor],
    grads: List[Tensor],
    exp_avgs: List[Tensor],
    exp_hz_sqs: List[Tensor],
    *,
    beta1: float,
    v: float,
    eps: float,
    weight_decay: float,
    step_size: float,
    momentum_scale: float,
    denom_scale: float,
    grad_scale_inv: float = 1.0,
    rounding_keys: Optional[List[int]] = None,
    rounding_offsets: Optional[List[int]] = None,
    rounding_step: int = 0,
) -> None:
    """Plain ESGD-M step: updates params and exp_avgs in place; exp_hz_sqs is only read. bfloat16
    state is rounded stochastically with the bits of (rounding_keys[i], rounding_step) at index
    rounding_offsets[i] + position (`esgd_cuda.probes`)."""
    _require_extension()
    if len(params) == 0 and len(grads) == len(exp_avgs) == len(exp_hz_sqs) == 0:
        return  # nothing to dispatch on: the dispatcher picks a kernel from the tensors
    torch.ops.esgd_cuda.esgd_update_.default(
        params,
        grads,
        exp_avgs,
        exp_hz_sqs,
        beta1=beta1,
        v=v,
        eps=eps,
        weight_decay=weight_decay,
        step_size=step_size,
        momentum_scale=momentum_scale,
        denom_scale=denom_scale,
        grad_scale_inv=grad_scale_inv,
        rounding_keys=rounding_keys,
        rounding_offsets=rounding_offsets,
        rounding_step=rounding_step,
    )


def esgd_update_hz_(
    params: List[Tensor],
    grads: List[Tensor],
    exp_avgs: List[Tensor],
    exp_hz_sqs: List[Tensor],
    hzs: List[Tensor],
    *,
    beta1: float,
    beta2: float,
    v: float,
    eps: float,
    weight_decay: float,
    step_size: float,
    momentum_scale: float,
    denom_scale: float,
    grad_scale_inv: float = 1.0,
    hz_scale_inv: float = 1.0,
    rounding_keys: Optional[List[int]] = None,
    rounding_offsets: Optional[List[int]] = None,
    rounding_step: int = 0,
) -> None:
    """Estimation step: also folds hzs (Hessian-vector products) into exp_hz_sqs, then updates."""
    _require_extension()
    if len(params) == 0 and len(grads) == len(exp_avgs) == len(exp_hz_sqs) == len(hzs) == 0:
        return
    torch.ops.esgd_cuda.esgd_update_hz_.default(
        params,
        grads,
        exp_avgs,
        exp_hz_sqs,
        hzs,
        beta1=beta1,
        beta2=beta2,
        v=v,
        eps=eps,
        weight_decay=weight_decay,
        step_size=step_size,
        momentum_scale=momentum_scale,
        denom_scale=denom_scale,
        grad_scale_inv=grad_scale_inv,
        hz_scale_inv=hz_scale_inv,
        rounding_keys=rounding_keys,
        rounding_offsets=rounding_offsets,
        rounding_step=rounding_step,
    )


def esgd_update_capturable_(
    params: List[Tensor],
    grads: List[Tensor],
    exp_avgs: List[Tensor],
    exp_hz_sqs: List[Tensor],
    hzs: List[Tensor],
    step_scalars: Tensor,
    *,
    beta1: float,
    beta2: float,
    v: float,
    eps: float,
    grad_scale_inv: float = 1.0,
    hz_scale_inv: float = 1.0,
    rounding_keys: Optional[List[int]] = None,
    rounding_offsets: Optional[List[int]] = None,
) -> None:
    """Capturable step: row i of `step_scalars` (float64 [n, 4] on the device, see
    `functional.step_scalar_table`; [n, 3] for float32/float64 state) holds tensor i's step-dependent
    scalars and step count; empty `hzs` is a plain step."""
    _require_extension()
    if len(params) == 0 and len(grads) == len(exp_avgs) == len(exp_hz_sqs) == len(hzs) == 0:
        return
    torch.ops.esgd_cuda.esgd_update_capturable_.default(
        params,
        grads,
        exp_avgs,
        exp_hz_sqs,
        hzs,
        step_scalars,
        beta1=beta1,
        beta2=beta2,
        v=v,
        eps=eps,
        grad_scale_inv=grad_scale_inv,
        hz_scale_inv=hz_scale_inv,
        rounding_keys=rounding_keys,
        rounding_offsets=rounding_offsets,
    )


def esgd_update_fd_(
    params: List[Tensor],
    grads: List[Tensor],
    exp_avgs: List[Tensor],
    exp_hz_sqs: List[Tensor],
    grads_plus: List[Tensor],
    grads_minus: List[Tensor],
    hz_scale: Tensor,
    step_scalars: Optional[Tensor],
    *,
    beta1: float,
    beta2: float,
    v: float,
    eps: float,
    weight_decay: float,
    step_size: float,
    momentum_scale: float,
    denom_scale: float,
    grad_scale_inv: float = 1.0,
    hz_scale_inv: float = 1.0,
    sources: Optional[List[Tensor]] = None,
    rounding_keys: Optional[List[int]] = None,
    rounding_offsets: Optional[List[int]] = None,
    rounding_step: int = 0,
) -> None:
    """Estimation step whose Hz is a gradient difference, formed in registers: (grads_plus - grads)
    (empty `grads_minus`: forward) or (grads_plus - grads_minus) (central), times
    hz_scale_inv * hz_scale, with `hz_scale` a 1-element float64 tensor read on the device. With
    `step_scalars` (float64 [n, 3]) the step scalars come from the device table, as in
    `esgd_update_capturable_`, and weight_decay, step_size, momentum_scale, denom_scale are ignored.
    With `sources` (one tensor per parameter, its dtype and shape, any layout, sharing no memory with
    params, exp_avgs or exp_hz_sqs) theta is read from sources[i] and params[i] is only written:
    params[i].copy_(sources[i]) followed by the step, in one pass. Rounding arguments as for
    `esgd_update_` (with `step_scalars`, each tensor's step count is the table's last column)."""
    _require_extension()
    if len(params) == 0 and len(grads) == len(exp_avgs) == len(exp_hz_sqs) == len(grads_plus) == len(grads_minus) == 0 \
            and not sources:
        return
    torch.ops.esgd_cuda.esgd_update_fd_.default(
        params,
        grads,
        exp_avgs,
        exp_hz_sqs,
        grads_plus,
        grads_minus,
        hz_scale,
        step_scalars,
        beta1=beta1,
        beta2=beta2,
        v=v,
        eps=eps,
        weight_decay=weight_decay,
        step_size=step_size,
        momentum_scale=momentum_scale,
        denom_scale=denom_scale,
        grad_scale_inv=grad_scale_inv,
        hz_scale_inv=hz_scale_inv,
        sources=sources,
        rounding_keys=rounding_keys,
        rounding_offsets=rounding_offsets,
        rounding_step=rounding_step,
    )


def esgd_rademacher_(out: List[Tensor], keys: List[int], offsets: List[int]) -> None:
    """Fill each tensor with its probe: element i (row-major) of out[t] = z(keys[t], offsets[t] + i),
    +-1 in the tensor's dtype (`esgd_cuda.probes` defines z). Keys and offsets are in [0, 2**63)."""
    _require_extension()
    if len(out) == len(keys) == len(offsets) == 0:
        return
    torch.ops.esgd_cuda.esgd_rademacher_.default(out, keys, offsets)


def esgd_fd_perturb_(
    params: List[Tensor],
    backups: List[Tensor],
    scale: Tensor,
    keys: List[int],
    offsets: List[int],
    *,
    sign: float,
    save: bool,
) -> None:
    """params = P(S(x) + S(sign*h) * z) with h = scale (1-element float64, read on the device) and
    x = params (save=True: copied to backups first) or backups (save=False, backups unchanged)."""
    _require_extension()
    if len(params) == len(backups) == len(keys) == len(offsets) == 0:
        return
    torch.ops.esgd_cuda.esgd_fd_perturb_.default(params, backups, scale, keys, offsets, sign=sign, save=save)


def _check_fake(op: str, params: List[Tensor], **lists: List[Tensor]) -> None:
    # Mirrors the shape checks of the native ops so that a traced graph fails at compile time
    # with the same message instead of at run time.
    for name, tensors in lists.items():
        torch._check(
            len(tensors) == len(params),
            lambda: f"{op}: {name} has {len(tensors)} tensors but params has {len(params)}",
        )
        for i, (t, p) in enumerate(zip(tensors, params)):
            torch._check(
                t.shape == p.shape,
                lambda: f"{op}: {name}[{i}] has shape {list(t.shape)}, expected {list(p.shape)} "
                f"(the shape of params[{i}])",
            )


def _check_fake_table(op: str, step_scalars: Tensor, n: int) -> None:
    torch._check(
        tuple(step_scalars.shape) in ((n, 3), (n, 4)),
        lambda: f"{op}: step_scalars has shape {list(step_scalars.shape)}, expected [{n}, 3] or [{n}, 4]",
    )


if _extension.LOADED:

    @torch.library.register_fake("esgd_cuda::esgd_update_")
    def _esgd_update_fake(
        params, grads, exp_avgs, exp_hz_sqs, *, beta1, v, eps, weight_decay, step_size,
        momentum_scale, denom_scale, grad_scale_inv=1.0, rounding_keys=None, rounding_offsets=None,
        rounding_step=0
    ):
        _check_fake("esgd_update_", params, grads=grads, exp_avgs=exp_avgs, exp_hz_sqs=exp_hz_sqs)

    @torch.library.register_fake("esgd_cuda::esgd_update_hz_")
    def _esgd_update_hz_fake(
        params, grads, exp_avgs, exp_hz_sqs, hzs, *, beta1, beta2, v, eps, weight_decay,
        step_size, momentum_scale, denom_scale, grad_scale_inv=1.0, hz_scale_inv=1.0,
        rounding_keys=None, rounding_offsets=None, rounding_step=0
    ):
        _check_fake(
            "esgd_update_hz_", params, grads=grads, exp_avgs=exp_avgs, exp_hz_sqs=exp_hz_sqs,
            hzs=hzs,
        )

    @torch.library.register_fake("esgd_cuda::esgd_update_capturable_")
    def _esgd_update_capturable_fake(
        params, grads, exp_avgs, exp_hz_sqs, hzs, step_scalars, *, beta1, beta2, v, eps,
        grad_scale_inv=1.0, hz_scale_inv=1.0, rounding_keys=None, rounding_offsets=None
    ):
        lists = dict(grads=grads, exp_avgs=exp_avgs, exp_hz_sqs=exp_hz_sqs)
        if len(hzs):
            lists["hzs"] = hzs
        _check_fake("esgd_update_capturable_", params, **lists)
        _check_fake_table("esgd_update_capturable_", step_scalars, len(params))


# An extension built before these ops existed still loads (the ops above work); their fake kernels
# are registered only where the ops are.
if _extension.LOADED and hasattr(torch.ops.esgd_cuda, "esgd_update_fd_"):

    @torch.library.register_fake("esgd_cuda::esgd_update_fd_")
    def _esgd_update_fd_fake(
        params, grads, exp_avgs, exp_hz_sqs, grads_plus, grads_minus, hz_scale, step_scalars, *, beta1,
        beta2, v, eps, weight_decay, step_size, momentum_scale, denom_scale, grad_scale_inv=1.0,
        hz_scale_inv=1.0, sources=None, rounding_keys=None, rounding_offsets=None, rounding_step=0
    ):
        lists = dict(grads=grads, exp_avgs=exp_avgs, exp_hz_sqs=exp_hz_sqs, grads_plus=grads_plus)
        if len(grads_minus):
            lists["grads_minus"] = grads_minus
        if sources is not None:
            lists["sources"] = sources
        _check_fake("esgd_update_fd_", params, **lists)
        torch._check(hz_scale.numel() == 1, lambda: "esgd_update_fd_: hz_scale must have one element")
        if step_scalars is not None:
            _check_fake_table("esgd_update_fd_", step_scalars, len(params))

    @torch.library.register_fake("esgd_cuda::esgd_rademacher_")
    def _esgd_rademacher_fake(out, keys, offsets):
        for name, values in (("keys", keys), ("offsets", offsets)):
            torch._check(
                len(values) == len(out),
                lambda: f"esgd_rademacher_: {name} has {len(values)} entries but out has {len(out)} tensors",
            )

    @torch.library.register_fake("esgd_cuda::esgd_fd_perturb_")
    def _esgd_fd_perturb_fake(params, backups, scale, keys, offsets, *, sign, save):
        _check_fake("esgd_fd_perturb_", params, backups=backups)
        for name, values in (("keys", keys), ("offsets", offsets)):
            torch._check(
                len(values) == len(params),
                lambda: f"esgd_fd_perturb_: {name} has {len(values)} entries but params has {len(params)} tensors",
            )
        torch._check(scale.numel() == 1, lambda: "esgd_fd_perturb_: scale must have one element")
