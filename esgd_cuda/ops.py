"""Typed Python entry points to the fused native ops torch.ops.esgd_cuda.*.

Each op updates its mutable lists in place and returns nothing; `esgd_cuda.functional.esgd_update`
documents the per-element math. Fake (meta) implementations are registered next to the ops so that
torch.compile can trace through them.
"""

from typing import List

import torch
from torch import Tensor

from . import _extension

__all__ = ["esgd_update_", "esgd_update_hz_", "esgd_update_capturable_"]


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
) -> None:
    """Plain ESGD-M step: updates params and exp_avgs in place; exp_hz_sqs is only read."""
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
) -> None:
    """Capturable step: row i of `step_scalars` (float64 [n, 3] on the device, see
    `functional.step_scalar_table`) holds tensor i's step-dependent scalars; empty `hzs` is a plain step."""
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
    )


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


if _extension.LOADED:

    @torch.library.register_fake("esgd_cuda::esgd_update_")
    def _esgd_update_fake(
        params, grads, exp_avgs, exp_hz_sqs, *, beta1, v, eps, weight_decay, step_size,
        momentum_scale, denom_scale, grad_scale_inv=1.0
    ):
        _check_fake("esgd_update_", params, grads=grads, exp_avgs=exp_avgs, exp_hz_sqs=exp_hz_sqs)

    @torch.library.register_fake("esgd_cuda::esgd_update_hz_")
    def _esgd_update_hz_fake(
        params, grads, exp_avgs, exp_hz_sqs, hzs, *, beta1, beta2, v, eps, weight_decay,
        step_size, momentum_scale, denom_scale, grad_scale_inv=1.0, hz_scale_inv=1.0
    ):
        _check_fake(
            "esgd_update_hz_", params, grads=grads, exp_avgs=exp_avgs, exp_hz_sqs=exp_hz_sqs,
            hzs=hzs,
        )

    @torch.library.register_fake("esgd_cuda::esgd_update_capturable_")
    def _esgd_update_capturable_fake(
        params, grads, exp_avgs, exp_hz_sqs, hzs, step_scalars, *, beta1, beta2, v, eps,
        grad_scale_inv=1.0, hz_scale_inv=1.0
    ):
        lists = dict(grads=grads, exp_avgs=exp_avgs, exp_hz_sqs=exp_hz_sqs)
        if len(hzs):
            lists["hzs"] = hzs
        _check_fake("esgd_update_capturable_", params, **lists)
        torch._check(
            tuple(step_scalars.shape) == (len(params), 3),
            lambda: f"esgd_update_capturable_: step_scalars has shape {list(step_scalars.shape)}, "
            f"expected [{len(params)}, 3]",
        )
