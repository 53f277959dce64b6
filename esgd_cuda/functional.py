"""The multi-tensor ESGD-M update: the seam between the optimizer and the kernels.

`esgd_update` applies one step to lists of tensors that share a device, a parameter dtype and the
per-tensor scalars. The optimizer groups parameters into such lists; the fused native ops
(`esgd_cuda.ops`) and the pure-PyTorch path below implement the same per-element formula:

    m     = beta1*m + (1-beta1)*g
    D     = beta2*D + (1-beta2)*hz*hz          (estimation steps only, hzs is not None)
    denom = sqrt(D)*denom_scale + eps          denom_scale    = 1/sqrt(1-db)
    est   = v*m + (1-v)*g
    p     = p*(1 - weight_decay*step_size)
    p     = p - (step_size*momentum_scale) * est/denom      momentum_scale = 1/(1-mb*v)

`grad_scale_inv` and `hz_scale_inv` undo a loss scale (torch.amp.GradScaler): g and hz are multiplied
by them (in the math dtype, on temporaries) before use; the gradients themselves are left as they are.
On estimation steps, where the scaled hz is not finite (inf or NaN) the update's g becomes NaN, so m
and p turn NaN there: a non-finite curvature estimate never passes silently.

`esgd_update_fd` is an estimation step whose hz is a finite difference of gradients,
hz = (g(theta + h z) - g(theta)) / h or (g(theta + h z) - g(theta - h z)) / (2h), with 1/h or 1/(2h)
in a device tensor; the fused kernels form it in registers. Its `sources` read theta from the copy
the perturbation saved, so the parameters need no separate restore.

Math runs in float32 for float16/bfloat16/float32 parameters and float64 for float64 ones. The
state has the math dtype, or bfloat16 (for 16- and 32-bit parameters): m and D are then widened to
float32 for the step and stored back with stochastic rounding, whose counter-based bits
(`esgd_cuda.probes`: `rounding_key`, `step_key`) need each tensor's rounding key, the index of its
first element in the whole parameter (`rounding_offsets`, a shard's offset) and the step count
(`rounding_step`, or the step-scalar table's last column).
"""

import bisect
from typing import List, Optional, Union

import torch
from torch import Tensor

__all__ = ["esgd_update", "esgd_update_capturable", "esgd_update_fd", "state_dtype", "step_scalar_table"]


def state_dtype(param_dtype: torch.dtype, requested: Optional[torch.dtype] = None) -> torch.dtype:
    """The dtype of the optimizer state for a parameter dtype: `requested` (a param group's
    `state_dtype`: bfloat16 or float32) when given, else float32, or float64 for float64
    parameters. The update's math runs in float32 (float64 for float64 parameters) either way."""
    if requested is not None:
        return requested
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def _math_dtype(state: torch.dtype) -> torch.dtype:
    return torch.float32 if state == torch.bfloat16 else state


RoundingKeys = Optional[List[int]]


def esgd_update(
    params: List[Tensor],
    grads: List[Tensor],
    exp_avgs: List[Tensor],
    exp_hz_sqs: List[Tensor],
    hzs: Optional[List[Tensor]],
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
    fused: bool = False,
    rounding_keys: RoundingKeys = None,
    rounding_offsets: RoundingKeys = None,
    rounding_step: int = 0,
) -> None:
    """Apply one ESGD-M step in place to `params`, `exp_avgs` and (when `hzs` is given) `exp_hz_sqs`.

    All lists have the same length and hold tensors on one device; `params`, `grads` and `hzs` share
    the parameter dtype, `exp_avgs` and `exp_hz_sqs` have `state_dtype(param dtype)` or, for 16- and
    32-bit parameters, all bfloat16. `hzs=None` is a plain step (the curvature estimate is only
    read). `fused=True` runs the native kernel (`esgd_cuda.ops`), which must support the device and
    dtype. bfloat16 state is rounded stochastically: `rounding_keys` (each tensor's base key,
    `probes.rounding_key`), `rounding_offsets` (the index of each tensor's first element in its whole
    parameter) and `rounding_step` (the step count t) select the bits; float32/float64 state ignores them.
    """
    if len(params) == 0:
        return
    rounding = dict(rounding_keys=rounding_keys, rounding_offsets=rounding_offsets, rounding_step=rounding_step)
    scalars = dict(
        beta1=beta1,
        v=v,
        eps=eps,
        weight_decay=weight_decay,
        step_size=step_size,
        momentum_scale=momentum_scale,
        denom_scale=denom_scale,
        grad_scale_inv=grad_scale_inv,
    )
    if not fused:
        _esgd_update_foreach(
            params, grads, exp_avgs, exp_hz_sqs, hzs, beta2=beta2, hz_scale_inv=hz_scale_inv, **scalars,
            **rounding,
        )
        return
    from . import ops

    if hzs is None:
        ops.esgd_update_(params, grads, exp_avgs, exp_hz_sqs, **scalars, **rounding)
    else:
        ops.esgd_update_hz_(
            params, grads, exp_avgs, exp_hz_sqs, hzs, beta2=beta2, hz_scale_inv=hz_scale_inv, **scalars,
            **rounding,
        )


def _math_inputs(params, grads, hzs, math_dtype, grad_scale_inv, hz_scale_inv):
    """(params, grads, hzs) as the update's math sees them: in the math dtype and unscaled.

    16-bit parameters: the whole update runs on float32 copies and is rounded once at the end, so the
    result matches the fused kernels, which also round only the final parameter. Loss scales are
    undone on copies, in the math dtype, as the kernels do in registers.
    """
    if params[0].dtype != math_dtype:
        work_params = [p.to(math_dtype) for p in params]
        grads = [g.to(math_dtype) for g in grads]
        if hzs is not None:
            hzs = [h.to(math_dtype) for h in hzs]
        if grad_scale_inv != 1.0:
            torch._foreach_mul_(grads, grad_scale_inv)
        if hzs is not None and hz_scale_inv != 1.0:
            torch._foreach_mul_(hzs, hz_scale_inv)
        return work_params, grads, hzs
    if grad_scale_inv != 1.0:
        grads = torch._foreach_mul(grads, grad_scale_inv)
    if hzs is not None and hz_scale_inv != 1.0:
        hzs = torch._foreach_mul(hzs, hz_scale_inv)
    return params, grads, hzs


def _esgd_update_foreach(
    params: List[Tensor],
    grads: List[Tensor],
    exp_avgs: List[Tensor],
    exp_hz_sqs: List[Tensor],
    hzs: Optional[List[Tensor]],
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
    rounding_keys: RoundingKeys = None,
    rounding_offsets: RoundingKeys = None,
    rounding_step: int = 0,
) -> None:
    _foreach_apply(
        params, grads, exp_avgs, exp_hz_sqs, hzs, beta1=beta1, beta2=beta2, v=v, eps=eps,
        decay=1.0 - weight_decay * step_size, lr_scale=step_size * momentum_scale, denom_scale=denom_scale,
        grad_scale_inv=grad_scale_inv, hz_scale_inv=hz_scale_inv,
        rounding=_host_rounding(exp_avgs, rounding_keys, rounding_offsets, rounding_step),
    )


def _check_rounding(op: str, n: int, exp_avgs, keys, offsets) -> bool:
    """Whether the state is bfloat16 (so it rounds), after checking its keys and offsets."""
    rounds = bool(exp_avgs) and exp_avgs[0].dtype == torch.bfloat16
    if rounds and (keys is None or offsets is None):
        raise ValueError(f"{op}: exp_avgs are bfloat16, whose stochastic rounding needs rounding_keys and "
                         "rounding_offsets (one per tensor; esgd_cuda.probes.rounding_key)")
    for name, values in (("rounding_keys", keys), ("rounding_offsets", offsets)):
        if values is not None and len(values) != n:
            raise ValueError(f"{op}: {name} has {len(values)} entries but params has {n} tensors")
    return rounds


def _host_rounding(exp_avgs, keys, offsets, step, op: str = "esgd_update"):
    """(step key, offset) per tensor for the twin when the state rounds, else None."""
    if not _check_rounding(op, len(exp_avgs), exp_avgs, keys, offsets):
        return None
    from .probes import step_key

    return [(step_key(int(k), int(step)), int(o)) for k, o in zip(keys, offsets)]


def _table_rounding(exp_avgs, keys, offsets, table: Tensor, op: str):
    """As _host_rounding, with each tensor's step count read (on the device) from the table's last column."""
    if not _check_rounding(op, len(exp_avgs), exp_avgs, keys, offsets):
        return None
    from .probes import step_key

    return [(step_key(int(k), t), int(o)) for k, o, t in zip(keys, offsets, table[:, 3].unbind())]


def _store_rounded(states: List[Tensor], values: List[Tensor], params: List[Tensor], rounding, high: bool) -> None:
    """states[i] = values[i] rounded stochastically to bfloat16 with the low (m) or high (D) 16 bits,
    each element's bits indexed by its position in params[i]'s memory order (as the kernels walk it)."""
    from .probes import round_bf16_stochastic, rounding_bits

    for state, value, param, (key, offset) in zip(states, values, params, rounding):
        bits = rounding_bits(key, offset, param)
        state.copy_(round_bf16_stochastic(value, bits >> 16 if high else bits & 0xFFFF))


def _foreach_apply(
    params: List[Tensor],
    grads: List[Tensor],
    exp_avgs: List[Tensor],
    exp_hz_sqs: List[Tensor],
    hzs: Optional[List[Tensor]],
    *,
    beta1: float,
    beta2: float,
    v: float,
    eps: float,
    decay: Union[float, List[Tensor]],
    lr_scale: Union[float, List[Tensor]],
    denom_scale: Union[float, List[Tensor]],
    grad_scale_inv: float,
    hz_scale_inv: float,
    rounding=None,
) -> None:
    """The per-element update with torch._foreach_* ops, the pure-PyTorch twin of csrc/esgd_math.h.

    decay (1 - weight_decay*step_size), lr_scale (step_size*momentum_scale) and denom_scale are
    Python floats shared by every tensor (host path), or lists with one 0-dim tensor in the math
    dtype per tensor (capturable path: no host values, nothing to sync). `rounding`: bfloat16 state's
    (step key, offset) per tensor; the step then runs on float32 copies of m and D, which are stored
    back rounded (m always, D on estimation steps), as the kernels do in registers (csrc/rounding.h).
    """
    stored_avgs, stored_hz_sqs = exp_avgs, exp_hz_sqs
    if rounding is not None:
        exp_avgs = [m.float() for m in exp_avgs]
        exp_hz_sqs = [d.float() for d in exp_hz_sqs]
    math_dtype = exp_avgs[0].dtype
    upcast = params[0].dtype != math_dtype
    work_params, grads, hzs = _math_inputs(params, grads, hzs, math_dtype, grad_scale_inv, hz_scale_inv)
    if hzs is not None:
        # g + (h - h): NaN where h is not finite, g elsewhere, as the kernels form it (esgd_math.h).
        # Out of place: grads may still be the caller's tensors.
        grads = torch._foreach_add(grads, torch._foreach_sub(hzs, hzs))

    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
    if hzs is not None:
        torch._foreach_mul_(exp_hz_sqs, beta2)
        torch._foreach_addcmul_(exp_hz_sqs, hzs, hzs, value=1.0 - beta2)

    denom = torch._foreach_sqrt(exp_hz_sqs)
    torch._foreach_mul_(denom, denom_scale)
    torch._foreach_add_(denom, eps)

    est = torch._foreach_mul(exp_avgs, v)
    torch._foreach_add_(est, grads, alpha=1.0 - v)

    if isinstance(decay, list) or decay != 1.0:
        torch._foreach_mul_(work_params, decay)
    if isinstance(lr_scale, list):
        # addcdiv's value must be a host number, so a device lr_scale scales the temporary numerator.
        torch._foreach_mul_(est, lr_scale)
        torch._foreach_addcdiv_(work_params, est, denom, value=-1.0)
    else:
        torch._foreach_addcdiv_(work_params, est, denom, value=-lr_scale)

    if upcast:
        for p, w in zip(params, work_params):
            p.copy_(w)
    if rounding is not None:
        _store_rounded(stored_avgs, exp_avgs, params, rounding, high=False)
        if hzs is not None:
            _store_rounded(stored_hz_sqs, exp_hz_sqs, params, rounding, high=True)


def esgd_update_capturable(
    params: List[Tensor],
    grads: List[Tensor],
    exp_avgs: List[Tensor],
    exp_hz_sqs: List[Tensor],
    hzs: Optional[List[Tensor]],
    *,
    lr: Union[float, Tensor],
    steps: List[Tensor],
    estimates: List[Tensor],
    beta1: float,
    beta2: float,
    v: float,
    lr_warmup: float,
    eps: float,
    weight_decay: float,
    grad_scale_inv: float = 1.0,
    hz_scale_inv: float = 1.0,
    fused: bool = False,
    rounding_keys: RoundingKeys = None,
    rounding_offsets: RoundingKeys = None,
) -> None:
    """`esgd_update` with the step-dependent scalars computed on the device: no host synchronization.

    `steps[i]` is parameter i's step count t (already incremented for this step) and `estimates[i]`
    its estimate count k, as 0-dim tensors on the parameters' device; `lr` may be a 0-dim tensor
    there too. mb = beta1**t, db = beta2**k and warm = lr_warmup**t are formed with tensor ops, so
    the call can be captured in a CUDA graph and traced by torch.compile without specializing on the
    counters. The per-element math (and the 16-bit upcast rule) is that of the pure-PyTorch
    `esgd_update(..., fused=False)`. Counters are per parameter because a parameter that joined late
    has fewer steps than its group, and the host cannot group by counter value without a sync.
    `fused=True` runs the native op `esgd_update_capturable_`, which reads each tensor's scalars from
    a float64 table on the device. bfloat16 state rounds with the bits of `rounding_keys` and
    `rounding_offsets` (as for `esgd_update`) and each tensor's own step count, on the device.
    """
    if len(params) == 0:
        return
    table = step_scalar_table(
        steps, estimates, lr=lr, beta1=beta1, beta2=beta2, v=v, lr_warmup=lr_warmup, weight_decay=weight_decay
    )
    if fused:
        from . import ops

        ops.esgd_update_capturable_(
            params, grads, exp_avgs, exp_hz_sqs, hzs if hzs is not None else [], table,
            beta1=beta1, beta2=beta2, v=v, eps=eps, grad_scale_inv=grad_scale_inv,
            hz_scale_inv=hz_scale_inv, rounding_keys=rounding_keys, rounding_offsets=rounding_offsets,
        )
        return
    # The pure-PyTorch path reads the same table, one 0-dim tensor per tensor and column.
    rounding = _table_rounding(exp_avgs, rounding_keys, rounding_offsets, table, "esgd_update_capturable")
    decay, lr_scale, denom_scale = _table_columns(table, _math_dtype(exp_avgs[0].dtype))
    _foreach_apply(
        params, grads, exp_avgs, exp_hz_sqs, hzs, beta1=beta1, beta2=beta2, v=v, eps=eps,
        decay=decay if weight_decay != 0.0 else 1.0, lr_scale=lr_scale, denom_scale=denom_scale,
        grad_scale_inv=grad_scale_inv, hz_scale_inv=hz_scale_inv, rounding=rounding,
    )


def _table_columns(table: Tensor, dtype: torch.dtype):
    """decay, lr_scale, denom_scale of a step-scalar table: per column a list of 0-dim tensors."""
    return (list(col.unbind()) for col in table[:, :3].to(dtype).unbind(1))


def step_scalar_table(
    steps: List[Tensor],
    estimates: List[Tensor],
    *,
    lr: Union[float, Tensor],
    beta1: float,
    beta2: float,
    v: float,
    lr_warmup: float,
    weight_decay: float,
) -> Tensor:
    """The float64 [n, 4] table of per-tensor step scalars the capturable native op reads.

    Row i is (1 - weight_decay*step_size, step_size*momentum_scale, denom_scale, t) for tensor i, formed
    with the same operations as the host path forms them in Python floats, on the counters' device; t,
    the step count, keys the stochastic rounding of bfloat16 state (float32 state needs only the
    first three columns, and the ops accept [n, 3] tables too).
    """
    t = torch.stack([s.reshape(()) for s in steps]).to(torch.float64)
    k = torch.stack([e.reshape(()) for e in estimates]).to(torch.float64)
    if isinstance(lr, Tensor):
        lr = lr.to(device=t.device, dtype=torch.float64)
    step_size = (1.0 - torch.pow(lr_warmup, t)) * lr
    momentum_scale = (1.0 - torch.pow(beta1, t) * v).reciprocal()
    denom_scale = (1.0 - torch.pow(beta2, k)).sqrt().reciprocal()
    return torch.stack([1.0 - weight_decay * step_size, step_size * momentum_scale, denom_scale, t], dim=1)


def _check_device_scalar(op: str, name: str, t: Tensor, device: torch.device) -> None:
    """A 1-element float64 tensor on `device`: a scalar that only device code reads."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a float64 tensor, got {type(t).__name__}")
    if t.dtype != torch.float64:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}, expected torch.float64")
    if t.numel() != 1:
        raise ValueError(f"{op}: {name} has {t.numel()} elements, expected 1")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device}, expected {device} (the device of params[0])")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _byte_span(t: Tensor):
    """The bytes [lo, hi) that a non-empty tensor's elements lie in."""
    low = sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if s < 0)
    high = sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if s > 0)
    return t.data_ptr() + low * t.element_size(), t.data_ptr() + (high + 1) * t.element_size()


def _check_sources(op: str, params, exp_avgs, exp_hz_sqs, sources) -> None:
    """The checks of the native op's sources, for the pure-PyTorch path: each source has its
    parameter's dtype, shape and device, and shares no memory with a tensor the update writes
    (by memory span, as the native check)."""
    for i, (s, p) in enumerate(zip(sources, params)):
        if not isinstance(s, Tensor):
            raise TypeError(f"{op}: sources[{i}] is {type(s).__name__}, expected a tensor")
        if s.device != p.device:
            raise ValueError(f"{op}: sources[{i}] is on {s.device}, expected {p.device} (the device of params[{i}])")
        if s.dtype != p.dtype:
            raise TypeError(f"{op}: sources[{i}] has dtype {_dtype_name(s.dtype)}, expected {_dtype_name(p.dtype)}")
        if s.shape != p.shape:
            raise ValueError(f"{op}: sources[{i}] has shape {list(s.shape)}, expected {list(p.shape)} "
                             f"(the shape of params[{i}])")
    if torch.compiler.is_compiling() or params[0].device.type == "meta":
        return  # traced and meta tensors have no memory to share
    written = sorted((_byte_span(t), name, j) for name, lst in (("params", params), ("exp_avgs", exp_avgs),
                                                                ("exp_hz_sqs", exp_hz_sqs))
                     for j, t in enumerate(lst) if t.numel())
    starts = [span[0] for span, _, _ in written]
    reach = []  # reach[k]: the written span among the first k + 1 by start that ends last
    for k, (span, _, _) in enumerate(written):
        reach.append(k if k == 0 or span[1] > written[reach[-1]][0][1] else reach[-1])
    for i, s in enumerate(sources):
        if not s.numel():
            continue
        lo, hi = _byte_span(s)
        before = bisect.bisect_left(starts, hi)
        if before and written[reach[before - 1]][0][1] > lo:
            _, name, j = written[reach[before - 1]]
            raise ValueError(f"{op}: sources[{i}] shares memory with {name}[{j}]; a source must not overlap a "
                             "tensor the update writes (params, exp_avgs, exp_hz_sqs)")


def esgd_update_fd(
    params: List[Tensor],
    grads: List[Tensor],
    exp_avgs: List[Tensor],
    exp_hz_sqs: List[Tensor],
    grads_plus: List[Tensor],
    grads_minus: Optional[List[Tensor]],
    hz_scale: Tensor,
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
    step_scalars: Optional[Tensor] = None,
    sources: Optional[List[Tensor]] = None,
    fused: bool = False,
    rounding_keys: RoundingKeys = None,
    rounding_offsets: RoundingKeys = None,
    rounding_step: int = 0,
) -> None:
    """An estimation step of `esgd_update` whose Hz is a finite difference of gradients.

    hz = (S(grads_plus) - S(b)) * S(hz_scale_inv * hz_scale), with b = grads_minus (central
    difference) or grads (forward difference, grads_minus=None), S the math dtype and the product of
    the two scales formed in float64. `hz_scale` is a 1-element float64 tensor on the parameters'
    device (1/h or 1/(2h)), never read on the host. `grads_plus` and `grads_minus` have the parameter
    dtype and shapes. With `step_scalars` (the float64 [n, 3] table of `step_scalar_table`) each
    tensor's decay, lr scale and denominator scale come from its row, as in `esgd_update_capturable`,
    and weight_decay, step_size, momentum_scale and denom_scale are ignored. The fused kernels never
    materialize hz; the pure-PyTorch path does.

    `sources` (one tensor per parameter, with its dtype, shape and device, any layout): theta is read
    from sources[i] and params[i] is only written, exactly `params[i].copy_(sources[i])` followed by
    the step: the restore of the parameters after a finite difference's perturbed passes, fused into
    the update (the fused kernels save one pass over the parameters). A source must not share memory
    with params, exp_avgs or exp_hz_sqs. Sources in their parameter's layout (same strides, dense)
    are read in place; others cost one copy into it.

    bfloat16 state rounds as in `esgd_update` (`rounding_keys`, `rounding_offsets`, and the step count
    `rounding_step`, or the table's last column when `step_scalars` is given).
    """
    n = len(params)
    for name, lst in (("grads", grads), ("exp_avgs", exp_avgs), ("exp_hz_sqs", exp_hz_sqs),
                      ("grads_plus", grads_plus)) + ((("grads_minus", grads_minus),) if grads_minus is not None else ()) \
            + ((("sources", sources),) if sources is not None else ()):
        if len(lst) != n:
            raise ValueError(f"esgd_update_fd: {name} has {len(lst)} tensors but params has {n}")
    if n == 0:
        return
    _check_device_scalar("esgd_update_fd", "hz_scale", hz_scale, params[0].device)
    if step_scalars is not None and (step_scalars.dtype != torch.float64
                                     or tuple(step_scalars.shape) not in ((n, 3), (n, 4))):
        raise ValueError(f"esgd_update_fd: step_scalars is {step_scalars.dtype} {list(step_scalars.shape)}, "
                         f"expected torch.float64 [{n}, 4] (one row per tensor of params)")
    if fused:
        from . import ops

        ops.esgd_update_fd_(
            params, grads, exp_avgs, exp_hz_sqs, grads_plus, grads_minus if grads_minus is not None else [],
            hz_scale, step_scalars, beta1=beta1, beta2=beta2, v=v, eps=eps, weight_decay=weight_decay,
            step_size=step_size, momentum_scale=momentum_scale, denom_scale=denom_scale,
            grad_scale_inv=grad_scale_inv, hz_scale_inv=hz_scale_inv,
            sources=list(sources) if sources is not None else None, rounding_keys=rounding_keys,
            rounding_offsets=rounding_offsets, rounding_step=rounding_step,
        )
        return
    if step_scalars is None:
        rounding = _host_rounding(exp_avgs, rounding_keys, rounding_offsets, rounding_step, "esgd_update_fd")
    else:
        if exp_avgs[0].dtype == torch.bfloat16 and step_scalars.shape[1] != 4:
            raise ValueError(f"esgd_update_fd: step_scalars has shape {list(step_scalars.shape)}, expected "
                             f"[{n}, 4]: bfloat16 state rounds with each tensor's step count, its last column")
        rounding = _table_rounding(exp_avgs, rounding_keys, rounding_offsets, step_scalars, "esgd_update_fd")
    if sources is not None:
        # The definition itself: restore, then the step (the fused kernels do both in one pass).
        _check_sources("esgd_update_fd", params, exp_avgs, exp_hz_sqs, sources)
        torch._foreach_copy_(params, sources)
    math_dtype = _math_dtype(exp_avgs[0].dtype)
    base = grads if grads_minus is None else grads_minus
    hzs = torch._foreach_sub([t.to(math_dtype) for t in grads_plus], [t.to(math_dtype) for t in base])
    coeff = (hz_scale.reshape(()) * float(hz_scale_inv)).to(math_dtype)
    torch._foreach_mul_(hzs, coeff)
    if step_scalars is None:
        decay, lr_scale, scale = 1.0 - weight_decay * step_size, step_size * momentum_scale, denom_scale
    else:
        decay, lr_scale, scale = _table_columns(step_scalars, math_dtype)
    _foreach_apply(
        params, grads, exp_avgs, exp_hz_sqs, hzs, beta1=beta1, beta2=beta2, v=v, eps=eps,
        decay=decay, lr_scale=lr_scale, denom_scale=scale, grad_scale_inv=grad_scale_inv, hz_scale_inv=1.0,
        rounding=rounding,
    )
