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
    params: List[Tensor], grads: Optional[List[Optional[Tensor]]], hzs: List[Optional[Tensor]], group: Any
) -> None:
    """Replaces `grads` and `hzs` (in place, per entry) by their means over the process group
    (`grads=None`: Hz alone, for a curvature pass whose gradients are dropped).

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
        entries = [(lst, i) for lst in ((hzs,) if grads is None else (grads, hzs)) for i in idx]
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


# ------------------------------------------------------------------ sharded parameters (FSDP2 DTensors)

def _dtensor_api():
    """(DTensor, Shard, Replicate, compute_local_shape_and_global_offset), or Nones."""
    if not torch.distributed.is_available():
        return None, None, None, None
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:  # torch 2.4 keeps them private
        try:
            from torch.distributed._tensor import DTensor, Replicate, Shard
            from torch.distributed._tensor._utils import compute_local_shape_and_global_offset
        except ImportError:
            return None, None, None, None
    return DTensor, Shard, Replicate, compute_local_shape_and_global_offset


_DTENSOR, _SHARD, _REPLICATE, _LOCAL_SHAPE_AND_OFFSET = _dtensor_api()


def is_sharded(t) -> bool:
    return _DTENSOR is not None and isinstance(t, _DTENSOR)


def any_sharded(tensors) -> bool:
    """Whether any of `tensors` is a DTensor. It runs every step: the types are gathered in C and
    each distinct one checked once, rather than an isinstance call per tensor."""
    return _DTENSOR is not None and any(issubclass(kind, _DTENSOR) for kind in set(map(type, tensors)))


def local(t: Tensor) -> Tensor:
    """The rank's own part of a DTensor (a view of its storage: in-place updates land in the
    DTensor), or the tensor itself. The update is elementwise, so it runs on local shards exactly."""
    return t.to_local() if is_sharded(t) else t


def check_sharding(p, what: str) -> None:
    """ESGD draws a shard's probe as a contiguous slice of the whole parameter's: every mesh dimension
    must shard dim 0 (FSDP2's layout) or replicate."""
    for placement in p.placements:
        if not (isinstance(placement, _REPLICATE) or (isinstance(placement, _SHARD) and placement.dim == 0)):
            raise ValueError(
                f"ESGD: {what} is a DTensor with placements {tuple(p.placements)}; ESGD supports sharding "
                "along dim 0 (torch.distributed.fsdp.fully_shard's layout) and replication"
            )


def shard_offset(p: Tensor) -> int:
    """Flat (row-major) index, in the whole parameter, of the first element of this rank's shard."""
    if not is_sharded(p) or p.dim() == 0:
        return 0
    _, offset = _LOCAL_SHAPE_AND_OFFSET(p.shape, p.device_mesh, p.placements)
    row = 1
    for size in p.shape[1:]:
        row *= size
    return int(offset[0]) * row


def _shard_groups(p) -> list:
    """The process groups over which p's shards (not its replicas) are spread."""
    mesh = p.device_mesh
    return [mesh.get_group(i) for i, pl in enumerate(p.placements) if isinstance(pl, _SHARD)]


def sum_of_squares(params: List[Tensor], device: torch.device, values: Optional[List[Tensor]] = None) -> Tensor:
    """sum(p**2) over every element of every whole parameter, as a float64 0-dim tensor on `device`
    (with `values`: sum(v**2) of `values[i]`, each laid out like parameter i's local shard).

    Sharded parameters add their local shards' sums, then one all-reduce per distinct set of shard
    groups (one for an FSDP2 model) completes them; nothing is gathered, nothing syncs the host."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    partial: "OrderedDict[tuple, Tensor]" = OrderedDict()
    by_place: "OrderedDict[tuple, List[Tensor]]" = OrderedDict()
    for i, p in enumerate(params):
        key = (p.device, p.dtype)
        if is_sharded(p):
            key += (id(p.device_mesh), tuple(p.placements))
        by_place.setdefault(key, []).append(i)
    for key, idx in by_place.items():
        ps = [params[i] for i in idx]
        # Norms in the parameters' own precision (float32 for 16-bit ones, whose squares could
        # overflow): asking for float64 copies every float32 parameter first, and h needs no more
        # precision, since the perturbation and the difference's 1/h use the same h.
        dtype = torch.float32 if ps[0].dtype in (torch.float16, torch.bfloat16) else None
        tensors = [local(p).detach() for p in ps] if values is None else [values[i] for i in idx]
        norms = torch._foreach_norm(tensors, 2, dtype=dtype)
        s = torch.stack(norms).double().square().sum()
        if len(key) > 2:
            groups = tuple(_shard_groups(ps[0]))
            partial[groups] = partial[groups] + s.to(partial[groups].device) if groups in partial else s
        else:
            total = total + s.to(device)
    for groups, s in partial.items():
        for group in groups:
            torch.distributed.all_reduce(s, group=group)
        total = total + s.to(device)
    return total


def combine_shard_stats(stats: Optional[list], p: Tensor) -> Optional[list]:
    """[min, max, sum, count] of this rank's shards -> of the whole parameters (collective over p's
    shard groups; None where a rank holds no elements)."""
    inf = float("inf")
    lo, hi, total, count = stats if stats is not None else (inf, -inf, 0.0, 0)
    device = local(p).device
    extremes = torch.tensor([-lo, hi], dtype=torch.float64, device=device)
    sums = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
    for group in _shard_groups(p):
        torch.distributed.all_reduce(extremes, op=torch.distributed.ReduceOp.MAX, group=group)
        torch.distributed.all_reduce(sums, group=group)
    neg_lo, hi = extremes.tolist()
    total, count = sums.tolist()
    return None if count == 0 else [-neg_lo, hi, total, int(count)]
