"""GradScaler's fused-optimizer protocol on ESGD's side: `scaler.step(opt)` sets `opt.grad_scale` and
`opt.found_inf` around `step()`; the update undoes the scale inside the kernels, and a step with
inf/NaN gradients changes nothing. Hz carries the loss scale too unless `opt.backward(loss,
scaler=scaler)` unscaled it at once."""

import math
from typing import Iterable, List, Optional, Tuple

import torch
from torch import Tensor


def read_scaler(grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> Tuple[bool, float]:
    """(skip this step, 1/grad_scale) from GradScaler's tensors, read back in one copy."""
    present = [t for t in (found_inf, grad_scale) if t is not None]
    if not present:
        return False, 1.0
    device = present[0].device
    values = torch.cat([t.detach().reshape(-1)[:1].to(device=device, dtype=torch.float64) for t in present]).tolist()
    skip = found_inf is not None and values[0] != 0.0
    scale = values[-1] if grad_scale is not None else 1.0
    if grad_scale is not None and not skip and not (math.isfinite(scale) and scale > 0.0):
        raise ValueError(f"ESGD: grad_scale must be a finite positive number, got {scale!r}")
    return skip, 1.0 / scale


GRADSCALER_FD = (
    "ESGD: GradScaler is not supported with a finite-difference hvp: its step() passes no closure, and a "
    "loss scale would have to be undone in two gradients and h. Train with bfloat16 autocast "
    "(torch.autocast(device_type, dtype=torch.bfloat16)), which needs no loss scaling, or use hvp='autograd'."
)


def loss_scales(kinds: Iterable[str], params: List[Tensor], estimate: bool, grad_scale: Optional[Tensor],
                found_inf: Optional[Tensor]) -> Tuple[bool, float, float]:
    """(skip this step, 1/scale of the gradients, 1/scale of Hz). `kinds` are the curvature
    estimator's kinds of products this step ("raw": of a scaled loss; "unscaled": through
    opt.backward(..., scaler=)); a gradient that still requires grad carries its graph's products."""
    skip, grad_scale_inv = read_scaler(grad_scale, found_inf)
    hz_scale_inv = 1.0
    if estimate and found_inf is not None:
        raw = "raw" in kinds or any(p.grad.requires_grad for p in params)
        if raw and grad_scale is None:
            raise RuntimeError(
                "ESGD: the gradients were unscaled (scaler.unscale_(opt)) but the Hessian-vector "
                "products of this estimation step still carry the unknown loss scale. Pass the "
                "scaler to the backward pass, opt.backward(loss, scaler=scaler), which unscales Hz "
                "at once."
            )
        if raw and "unscaled" in kinds:
            raise RuntimeError(
                "ESGD: this step's backward passes mixed opt.backward(loss, scaler=scaler) with "
                "backward passes of an already scaled loss; use one or the other within a step."
            )
        if raw:
            hz_scale_inv = grad_scale_inv
    return skip, grad_scale_inv, hz_scale_inv
