"""Data-parallel glue: the shared probe seed and the averaging of estimation-step gradients and Hz."""

from collections import OrderedDict
from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor


# Alignment of each gradient and Hz inside the all-reduce buffer: the CUDA kernel's vector path needs
# every list aligned to its access width, 16 bytes for gradients and Hz (32 for the float32 state of
# 16-bit parameters, which is not in this buffer); 32 is a whole number of vectors for every dtype.
BUFFER_ALIGN = 32


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
        entries = [(lst, i) for lst in (grads, hzs) for i in idx]
        # Every entry starts on a BUFFER_ALIGN-byte boundary of the flat buffer, so the views it
        # hands back keep the fused kernels' vector path (a packed buffer would misalign them).
        step = max(1, BUFFER_ALIGN // params[idx[0]].element_size())
        offsets, end = [], 0
        for _, i in entries:
            offsets.append(end)
            end += -(-params[i].numel() // step) * step
        flat = torch.zeros(end + len(entries), device=device, dtype=dtype)
        for (lst, i), start in zip(entries, offsets):
            if lst[i] is not None:
                flat[start:start + params[i].numel()].copy_(lst[i].reshape(-1))
        flags = flat[end:]
        flags.copy_(torch.tensor([float(lst[i] is not None) for lst, i in entries], dtype=dtype))
        dist.all_reduce(flat, group=group)
        flat.div_(world)
        present = flags.tolist()
        for (lst, i), start, here in zip(entries, offsets, present):
            n = params[i].numel()
            lst[i] = flat[start:start + n].view(params[i].shape) if here > 0 else None
