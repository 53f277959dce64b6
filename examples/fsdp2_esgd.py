"""ESGD-M on an FSDP2 (`fully_shard`) model, with a distributed (DCP) checkpoint and a resume.

    torchrun --standalone --nproc_per_node=2 examples/fsdp2_esgd.py                 # CPU, gloo
    torchrun --standalone --nproc_per_node=2 examples/fsdp2_esgd.py --device cuda   # GPUs, nccl

Each rank holds a shard of every parameter, of its gradient and of the optimizer state, and trains
on its share of each batch. ESGD-M's finite-difference estimator works through FSDP2's own forward
and backward (it runs the closure at theta and at theta + h z; FSDP2 gathers the perturbed shards and
reduce-scatters the gradients); the update runs on the local shards with the fused kernels; each
shard draws its slice of the probe the whole parameter would get, and h is one global scalar, so
the run does not depend on the number of ranks. Halfway, the model and optimizer are saved with
torch.distributed.checkpoint and loaded into fresh copies, which finish the run.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

import esgd_cuda
from esgd_cuda import ESGD


def esgd_kernels() -> str:
    """Which esgd_cuda runs and whether its fused kernels loaded: an unbuilt source checkout ahead of
    the installed package on sys.path would run everything on the slower pure-PyTorch path."""
    info = esgd_cuda.extension_info()
    status = "native kernels loaded" if info["loaded"] else f"native kernels NOT loaded ({info['load_error']})"
    return f"esgd_cuda {os.path.dirname(esgd_cuda.__file__)}: {status}"


def make_model(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 4))
    model.to(device)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def data(step, rank, world, device):
    """A fixed teacher's labels on fresh inputs; each rank takes its share of the global batch."""
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(64, 32, generator=gen)
    teacher = torch.randn(32, 4, generator=torch.Generator().manual_seed(7))
    y = (x @ teacher).argmax(1)
    return x.chunk(world)[rank].to(device), y.chunk(world)[rank].to(device)


def train(model, opt, steps, start, rank, world, device, losses):
    for step in range(start, start + steps):
        x, y = data(step, rank, world, device)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        loss = opt.step(closure).detach()
        dist.all_reduce(loss)
        losses.append(loss.item() / world)
        if rank == 0 and (step % 10 == 0 or step == start + steps - 1):
            print(f"step {step:3d}  loss {losses[-1]:.4f}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--hvp", default="finite_difference", choices=["finite_difference", "central_difference"])
    args = parser.parse_args()
    if "RANK" not in os.environ:
        sys.exit("run with torchrun, e.g. torchrun --nproc_per_node=2 examples/fsdp2_esgd.py")
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(args.device, int(os.environ.get("LOCAL_RANK", 0))) if args.device == "cuda" \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kernels = [None] * world
    dist.all_gather_object(kernels, esgd_kernels())
    if rank == 0:
        print("\n".join(f"rank {r}: {line}" for r, line in enumerate(kernels)), flush=True)

    model = make_model(device)
    opt = ESGD(model.parameters(), lr=0.3, hvp=args.hvp, seed=0)
    half = args.steps // 2
    losses = []
    train(model, opt, half, 0, rank, world, device, losses)

    # Save with DCP: every rank writes its shards; the schedule and seed travel in the param groups.
    path = tempfile.mkdtemp(prefix="esgd_fsdp2_") if rank == 0 else None
    box = [path]
    dist.broadcast_object_list(box, src=0)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=box[0])

    # Resume into fresh copies, as a restarted job would.
    model = make_model(device)
    opt = ESGD(model.parameters(), lr=0.3, hvp=args.hvp)
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=box[0])
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if rank == 0:
        print(f"resumed from {box[0]} at step {half}", flush=True)
    train(model, opt, args.steps - half, half, rank, world, device, losses)

    diagnostics = opt.diagnostics()  # collective for sharded parameters: every rank calls it
    held = [None] * world
    dist.all_gather_object(held, sum(s["exp_avg"].to_local().numel() for s in opt.state.values()))
    if rank == 0:
        k = max(1, len(losses) // 5)
        print(f"training loss: {sum(losses[:k]) / k:.4f} (mean of the first {k} steps) -> "
              f"{sum(losses[-k:]) / k:.4f} (mean of the last {k})")
        print(f"optimizer state per rank: {held} elements of {sum(p.numel() for p in model.parameters())}")
        print("ESGD-M diagnostics: " + json.dumps(diagnostics), flush=True)
        shutil.rmtree(box[0], ignore_errors=True)
    shut_down()


def shut_down():
    """Leave the process group and exit without finalizing the interpreter.

    A gloo worker thread drops its reference to a finished collective only after the waiting rank has
    moved on. When that reference is the last one to a tensor Python has already let go of, dropping
    it needs the GIL; if the main thread has begun finalizing the interpreter by then, Python ends the
    worker thread inside the collective's C++ destructor, which aborts the process ("terminate called
    without an active exception": twice in about 120 runs on a busy 2-core machine).
    destroy_process_group() does not stop gloo's worker threads: only the group's destructor joins
    them, and FSDP2's device mesh, which torch.distributed.tensor's caches keep, holds the group until
    exit. So: every rank past every collective
    (barrier), the group destroyed, output flushed, and os._exit, which ends the process, threads and
    all, without running the finalization the worker threads could race with."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
