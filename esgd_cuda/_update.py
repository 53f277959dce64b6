"""The update of a step: the optimizer's parameters grouped into the kernels' lists, state created on
the first estimation step that sees a parameter (in its group's `state_dtype`), counters advanced,
and one `functional` call per (device, dtype, state dtype, counters), on the host's step scalars or,
in capturable mode, on the device's. bfloat16 state also gets each parameter's rounding key and
shard offset.

`ESGD.step` decides what the step is (plain, exact products, finite difference) and validates
everything before calling `apply`; nothing here raises on user input.
"""

import math
from itertools import chain
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ._closures import FiniteDifference
from .distributed import any_sharded, local, shard_offset
from .functional import esgd_update, esgd_update_capturable, esgd_update_fd, state_dtype, step_scalar_table
from .probes import rounding_key


def exact_hzs(params: List[Tensor], hz_of: Dict[Tensor, Tensor]) -> List[Tensor]:
    """The autograd products of `params`; a parameter whose gradient had no graph has Hz = 0."""
    return [hz_of[p] if p in hz_of else torch.zeros_like(p) for p in params]


def signed(grad_scale_inv: float, group: dict) -> float:
    """The gradient's multiplier in the update: maximize ascends by negating the gradient, which
    the update already multiplies by the inverse loss scale. Hz needs no sign: only (Hz)^2 is used,
    and the Hessian of -f is -H."""
    return -grad_scale_inv if group.get("maximize", False) else grad_scale_inv


def scalar_lr(lr):
    # functional.esgd_update_capturable takes a float or a 0-dim tensor; torch.optim accepts any
    # 1-element tensor. A view keeps in-place schedule changes visible.
    return lr.reshape(()) if isinstance(lr, Tensor) else lr


def init_state(opt, p: Tensor, state: dict, group: dict) -> None:
    # Counters are ints, or 0-dim float32 device tensors in capturable mode (exact to 2**24 steps).
    if opt.capturable:
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        state["estimates"] = torch.zeros((), dtype=torch.float32, device=p.device)
    else:
        state["step"] = 0
        state["estimates"] = 0
    sdtype = state_dtype(p.dtype, group.get("state_dtype"))
    state["exp_avg"] = torch.zeros_like(p, dtype=sdtype, memory_format=torch.preserve_format)
    state["exp_hz_sq"] = torch.zeros_like(p, dtype=sdtype, memory_format=torch.preserve_format)


def convert_state(state: dict, dtype: torch.dtype) -> None:
    """m and D in `dtype`: exact from bfloat16 to float32, round-to-nearest from float32 to bfloat16
    (one rounding, of at most half a bfloat16 spacing; docs/memory.md)."""
    for key in ("exp_avg", "exp_hz_sq"):
        if state[key].dtype != dtype:
            state[key] = state[key].to(dtype)


def buckets(
    opt, group: dict, params: List[Tensor], grads: List[Tensor], estimate: bool,
    key_of: Callable[[Tensor, dict], tuple],
) -> Dict[tuple, Tuple[list, ...]]:
    """The parameters to update, grouped by key_of(p, state) and the state dtype into lists (params,
    grads, exp_avgs, exp_hz_sqs, states, owners). State starts on an estimation step, in the group's
    state dtype (state of another dtype, after the group's state_dtype changed, is converted to it);
    key_of is called once per updated parameter, in order. The first four lists hold what the kernels
    update: of a sharded parameter (DTensor) its rank's local shard; `owners` holds the parameters."""
    out: Dict[tuple, Tuple[list, ...]] = {}
    sharded = any_sharded(params)
    group_sdtype = group.get("state_dtype")
    sdtype_of: Dict[torch.dtype, torch.dtype] = {}  # parameter dtype -> state dtype, in this group
    state_of = opt.state
    for p, g in zip(params, grads):
        state = state_of[p]
        if not state:
            if not estimate:
                continue  # no curvature estimate yet: wait for the next estimation step
            init_state(opt, p, state, group)
        pdtype = p.dtype
        sdtype = sdtype_of.get(pdtype)
        if sdtype is None:
            sdtype = sdtype_of[pdtype] = state_dtype(pdtype, group_sdtype)
        m, d = state["exp_avg"], state["exp_hz_sq"]
        if m.dtype != sdtype:
            convert_state(state, sdtype)
            m, d = state["exp_avg"], state["exp_hz_sq"]
        key = key_of(p, state) + (sdtype,)
        lists = out.get(key)
        if lists is None:
            lists = out[key] = ([], [], [], [], [], [])
        if sharded:
            lists[0].append(local(p))
            lists[1].append(local(g))
            lists[2].append(local(m))
            lists[3].append(local(d))
        else:
            lists[0].append(p)
            lists[1].append(g)
            lists[2].append(m)
            lists[3].append(d)
        lists[4].append(state)
        lists[5].append(p)
    return out


def rounding(opt, owners: List[Tensor], exp_avgs: List[Tensor]) -> dict:
    """The rounding arguments of a bucket: for bfloat16 state each parameter's key (from the probe
    seed and its position in the param groups, so every replica and shard agrees) and the index of
    its local part's first element in the whole parameter; nothing for float32/float64 state."""
    if exp_avgs[0].dtype != torch.bfloat16:
        return {}
    # The keys are cached per layout of the param groups (compared by identity, in C, every step)
    # and seed: rebuilding them took a tenth of a plain step with 1000 small tensors.
    ids = tuple(map(id, chain.from_iterable(g["params"] for g in opt.param_groups)))
    seed = opt.seed
    cached = opt.__dict__.get("_ordinals")
    if cached is None or cached[0] != ids or cached[1] != seed:
        cached = opt.__dict__["_ordinals"] = (ids, seed, {pid: rounding_key(seed, i) for i, pid in enumerate(ids)})
    key_of = cached[2]
    return dict(rounding_keys=[key_of[pid] for pid in map(id, owners)],
                rounding_offsets=[shard_offset(p) for p in owners] if any_sharded(owners) else [0] * len(owners))


def apply(
    opt, work: List[Tuple[List[Tensor], List[Tensor]]], estimate: bool, hz_of: Dict[Tensor, Tensor],
    fd: Optional[FiniteDifference] = None, grad_scale_inv: float = 1.0, hz_scale_inv: float = 1.0,
) -> None:
    """Updates every param group's (params, grads) of `work`: a plain step, or an estimation step
    whose Hz comes from `hz_of` (autograd) or `fd` (a finite difference, whose update also restores
    the perturbed parameters from their copies; the caller restores the rest with `fd.restore()`)."""
    if opt.capturable:
        _apply_capturable(opt, work, estimate, hz_of, fd, grad_scale_inv, hz_scale_inv)
        return
    for group, (params, grads) in zip(opt.param_groups, work):
        beta1, beta2 = group["betas"]
        v = beta1 if group["v"] is None else group["v"]

        # Tensors that share device, dtype and counters share one kernel call. Counters are per
        # parameter (a parameter may join late), but normally all of a group's are equal.
        def advance_counters(p: Tensor, state: dict) -> tuple:
            state["step"] += 1
            if estimate:
                state["estimates"] += 1
            return (p.device, p.dtype, state["step"], state["estimates"])

        for (device, dtype, t, k, _), (ps, gs, exp_avgs, exp_hz_sqs, _, owners) in buckets(
            opt, group, params, grads, estimate, advance_counters
        ).items():
            # mb = beta1**t, db = beta2**k, warm = lr_warmup**t: the running products of the
            # algorithm, in closed form (as torch.optim.Adam does) so state is two integers.
            step_size = float(group["lr"]) * (1.0 - group["lr_warmup"] ** t)
            kw = dict(
                beta1=beta1, beta2=beta2, v=v, eps=group["eps"], weight_decay=group["weight_decay"],
                step_size=step_size, momentum_scale=1.0 / (1.0 - beta1**t * v),
                denom_scale=1.0 / math.sqrt(1.0 - beta2**k), grad_scale_inv=signed(grad_scale_inv, group),
                fused=opt._use_fused(device, dtype),
            )
            rounded = rounding(opt, owners, exp_avgs)
            if rounded:
                kw.update(rounded, rounding_step=t)
            if not estimate:
                esgd_update(ps, gs, exp_avgs, exp_hz_sqs, None, **kw)
            elif fd is None:
                esgd_update(ps, gs, exp_avgs, exp_hz_sqs, exact_hzs(owners, hz_of), hz_scale_inv=hz_scale_inv, **kw)
            else:
                plus, minus = fd.lists(owners, gs)
                esgd_update_fd(ps, gs, exp_avgs, exp_hz_sqs, plus, minus, fd.hz_scale[device],
                               sources=fd.sources(owners), **kw)
                fd.updated(owners)


def _apply_capturable(
    opt, work, estimate: bool, hz_of: Dict[Tensor, Tensor], fd: Optional[FiniteDifference],
    grad_scale_inv: float, hz_scale_inv: float,
) -> None:
    """`apply` with device-side counters: no host sync, no value-dependent branch."""
    for group, (params, grads) in zip(opt.param_groups, work):
        beta1, beta2 = group["betas"]
        v = beta1 if group["v"] is None else group["v"]
        for (device, dtype, _), (ps, gs, exp_avgs, exp_hz_sqs, states, owners) in buckets(
            opt, group, params, grads, estimate, lambda p, state: (p.device, p.dtype)
        ).items():
            steps = [state["step"] for state in states]
            estimates = [state["estimates"] for state in states]
            torch._foreach_add_(steps, 1.0)
            if estimate:
                torch._foreach_add_(estimates, 1.0)
            hyper = dict(beta1=beta1, beta2=beta2, v=v, lr_warmup=group["lr_warmup"],
                         weight_decay=group["weight_decay"])
            kw = dict(beta1=beta1, beta2=beta2, v=v, eps=group["eps"], grad_scale_inv=signed(grad_scale_inv, group),
                      fused=opt._use_fused(device, dtype))
            rounded = rounding(opt, owners, exp_avgs)
            if fd is None:
                esgd_update_capturable(
                    ps, gs, exp_avgs, exp_hz_sqs, exact_hzs(owners, hz_of) if estimate else None,
                    lr=scalar_lr(group["lr"]), steps=steps, estimates=estimates, eps=group["eps"],
                    grad_scale_inv=kw["grad_scale_inv"], hz_scale_inv=hz_scale_inv, fused=kw["fused"],
                    **hyper, **rounded,
                )
            else:
                table = step_scalar_table(steps, estimates, lr=scalar_lr(group["lr"]), **hyper)
                plus, minus = fd.lists(owners, gs)
                esgd_update_fd(ps, gs, exp_avgs, exp_hz_sqs, plus, minus, fd.hz_scale[device],
                               weight_decay=group["weight_decay"], step_size=0.0, momentum_scale=1.0,
                               denom_scale=1.0, step_scalars=table, sources=fd.sources(owners), **kw, **rounded)
                fd.updated(owners)
