"""`ESGD.diagnostics()`: where the schedule stands and summary statistics of the preconditioner,
computed on demand from the optimizer's state."""

import math
from typing import List

import torch

from .distributed import combine_shard_stats, is_sharded, local


@torch.no_grad()
def diagnostics(opt) -> List[dict]:
    """`ESGD.diagnostics()` (its docstring lists the keys)."""
    last_h = opt._curvature.last_h
    fd_h = None if last_h is None else float(last_h)
    out = []
    for group in opt.param_groups:
        beta2 = group["betas"][1]
        t = k = 0
        mins, maxs, sums, count = [], [], [], 0
        sharded = None
        for p in group["params"]:
            state = opt.state.get(p)
            if not state:
                continue
            # int(): capturable mode keeps the counters in device tensors.
            pt, pk = int(state["step"]), int(state["estimates"])
            t, k = max(t, pt), max(k, pk)
            if is_sharded(p):
                sharded = p
            d = local(state["exp_hz_sq"])  # this rank's shard; the ranks' stats are combined below
            if pk == 0 or d.numel() == 0:
                continue
            d = d.float() if d.dtype == torch.bfloat16 else d
            root = d.sqrt().mul_(1.0 / math.sqrt(1.0 - beta2**pk))
            lo, hi = torch.aminmax(root)
            mins.append(lo.double().cpu())
            maxs.append(hi.double().cpu())
            sums.append(root.sum(dtype=torch.float64).cpu())
            count += root.numel()
        stats = None
        if count:
            stats = [float(x) for x in torch.stack(
                [torch.stack(mins).min(), torch.stack(maxs).max(), torch.stack(sums).sum()]
            ).tolist()] + [count]
        if sharded is not None:
            stats = combine_shard_stats(stats, sharded)
        sqrt_d = None
        if stats is not None:
            lo, hi, total, count = stats
            sqrt_d = {"min": lo, "mean": total / count, "max": hi}
        lr = float(group["lr"])
        warm = 1.0 - group["lr_warmup"] ** t
        out.append(
            {
                "step": t,
                "warmup_factor": warm,
                "lr": lr,
                "effective_lr": lr * warm,
                "estimated": opt._last_step_estimated,
                "estimates": k,
                "skipped_steps": opt._skipped_steps,
                "rejected_estimates": opt._rejected_estimates,
                "sqrt_d": sqrt_d,
                "hvp": opt.hvp,
                "fd_h": fd_h,
            }
        )
    return out

