"""Data-parallel glue: the shared probe seed and the averaging of estimation-step gradients and Hz."""

from collections import OrderedDict
from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor


def check_process_group(group: Any) -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("ESGD: process_group was given but torch.distributed is not initialized")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"ESGD: process_group must be a torch.distributed.ProcessGroup, got {type(group).__name__}")


def broadcast_seed(seed: int, group: Any) -> int:
    """The probe seed of the group's first rank: every replica must draw the same probes."""
    import torch.distributed as dist

    check_process_group(group)
    box = [seed]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return int(box[0])


def average_over_group(
    params: List[Tensor], grads: List[Optional[Tensor]], hzs: List[Optional[Tensor]], group: Any
) -> None:
    """Replaces `grads` and `hzs` (in place, per entry) by their means over the process group.

    One all-reduce per (device, dtype) carries both lists plus a presence flag per parameter, so a
    parameter that has a gradient on some ranks only is averaged like DDP does, and one that has none
    anywhere stays None. The mean of Hz, not of its square, is what the update squares: averaging
    squares would estimate a different (biased) quantity.
    """
    import torch.distributed as dist

    world = dist.get_world_size(group)
    buckets: "OrderedDict[Tuple[torch.device, torch.dtype], List[int]]" = OrderedDict()
    for i, p in enumerate(params):
        buckets.setdefault((p.device, p.dtype), []).append(i)
    for (device, dtype), idx in buckets.items():
        parts = []
        for lst in (grads, hzs):
            for i in idx:
                t = lst[i]
                parts.append(torch.zeros(params[i].numel(), device=device, dtype=dtype) if t is None else t.reshape(-1))
        flags = [float(lst[i] is not None) for lst in (grads, hzs) for i in idx]
        parts.append(torch.tensor(flags, device=device, dtype=dtype))
        flat = torch.cat(parts)
        dist.all_reduce(flat, group=group)
        flat.div_(world)
        sizes = [params[i].numel() for i in idx] * 2 + [len(flags)]
        chunks = flat.split(sizes)
        present = chunks[-1].tolist()
        for j, (lst, i) in enumerate([(lst, i) for lst in (grads, hzs) for i in idx]):
            lst[i] = chunks[j].view(params[i].shape) if present[j] > 0 else None
