"""What sharding costs and saves: ESGD-M on an FSDP2 (`fully_shard`) model, 2 gloo CPU ranks.

Counts, per rank and per step, the collectives (c10d ops seen by a dispatch mode: FSDP2's
all-gathers and reduce-scatters, ESGD-M's all-reduce of h) of a plain step and of an estimation step
of each finite-difference estimator (and of the first one, which the closure check makes one pass
longer), and the bytes each rank receives for them: an all-gather of a
B-byte buffer brings B (W-1)/W, a reduce-scatter into an S-byte shard S (W-1), an all-reduce of B
bytes 2 B (W-1)/W (ring algorithms, W ranks). Also the optimizer state each rank holds against the
unsharded model's. Counts, not timings: the numbers do not depend on the machine's load.

    python benchmarks/fsdp_cost.py            # an MLP with 1.1M parameters
    python benchmarks/fsdp_cost.py --smoke
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from _common import DEFAULT_OUT, command_line, environment, environment_markdown, import_esgd, markdown_table, write_outputs

WORLD = 2
PRESETS = {"smoke": [32, 64, 4], "default": [512, 1024, 512, 10]}


class CollectiveBytes(TorchDispatchMode):
    """Per c10d op: calls, and the bytes of its first tensor argument (the all-gather's gathered
    output, the reduce-scatter's shard output, the all-reduce's buffer)."""

    def __init__(self):
        super().__init__()
        self.ops: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith("c10d."):
            first = args[0] if args else None
            tensors = first if isinstance(first, (list, tuple)) else [first]
            nbytes = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
            calls, total = self.ops.get(name, (0, 0))
            self.ops[name] = (calls + 1, total + nbytes)
        return func(*args, **(kwargs or {}))


def received(op: str, nbytes: int) -> float:
    """Bytes one rank receives for a collective whose first tensor argument has `nbytes` bytes."""
    if "allgather" in op:
        return nbytes * (WORLD - 1) / WORLD
    if "reduce_scatter" in op:
        return nbytes * (WORLD - 1)
    if "allreduce" in op:
        return 2 * nbytes * (WORLD - 1) / WORLD
    raise ValueError(f"unexpected collective {op}")


def make_model(widths):
    torch.manual_seed(0)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def worker(rank, widths, out_path):
    from torch.distributed.fsdp import fully_shard

    esgd = import_esgd()
    dist.init_process_group("gloo", init_method=f"file://{out_path}.rdv", rank=rank, world_size=WORLD)
    result = {}
    for hvp in ("finite_difference", "central_difference"):
        model = make_model(widths)
        for m in model:
            if isinstance(m, nn.Linear):
                fully_shard(m)
        fully_shard(model)
        # The first estimate is checked (one pass more, see docs/estimators.md); the second is the
        # typical one; the third step is plain.
        opt = esgd.ESGD(model.parameters(), hvp=hvp, d_warmup=2, update_d_every=10**6, seed=0)
        gen = torch.Generator().manual_seed(rank)
        x = torch.randn(8, widths[0], generator=gen)
        y = torch.randint(0, widths[-1], (8,), generator=gen)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        for kind in ("checked estimation", "estimation", "plain"):
            with CollectiveBytes() as counter:
                opt.step(closure)
            result[(hvp, kind)] = counter.ops
        result["state_bytes"] = sum(v.to_local().numel() * v.to_local().element_size()
                                    for s in opt.state.values() for v in s.values()
                                    if torch.is_tensor(v) and v.dim() > 0)
    if rank == 0:
        torch.save(result, out_path)
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_const", const="smoke", dest="preset", default="default")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    esgd = import_esgd()
    widths = PRESETS[args.preset]
    n_params = sum(p.numel() for p in make_model(widths).parameters())
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "counts.pt")
        mp.spawn(worker, args=(widths, path), nprocs=WORLD)
        counts = torch.load(path, weights_only=False)
    # The unsharded model's optimizer state: exp_avg and exp_hz_sq in float32.
    unsharded_state = 2 * 4 * n_params
    rows, per_param = [], {}
    for hvp in ("finite_difference", "central_difference"):
        totals = {}
        for kind in ("plain", "estimation", "checked estimation"):
            ops = counts[(hvp, kind)]
            totals[kind] = sum(received(name, b) for name, (_, b) in ops.items())
            detail = ", ".join(f"{name.split('.')[1].rstrip('_')} x{calls}" + (f" ({b} B)" if b < 64 else "")
                               for name, (calls, b) in sorted(ops.items()))
            rows.append([hvp, kind, f"{totals[kind] / n_params:.2f}", detail])
        per_param[hvp] = (totals["estimation"] - totals["plain"]) / n_params
    env = environment(torch.device("cpu"), command=command_line("fsdp_cost.py", argv))
    md = [f"# ESGD-M on FSDP2: communication and memory ({WORLD} gloo ranks, {n_params} fp32 parameters, "
          f"MLP {'-'.join(map(str, widths))})", "", environment_markdown(env), "",
          "Bytes each rank receives per step, per parameter (ring collectives; see the script's docstring):", "",
          markdown_table(["estimator", "step", "bytes / parameter", "collectives"], rows), "",
          markdown_table(["estimator", "extra bytes / parameter of an estimation step over a plain one"],
                         [[k, f"{v:.2f}"] for k, v in per_param.items()]), "",
          f"Optimizer state per rank: {counts['state_bytes']} bytes, unsharded {unsharded_state} bytes "
          f"({counts['state_bytes'] / unsharded_state:.3f} of it; 1/{WORLD} = {1 / WORLD:.3f}).", ""]
    markdown = "\n".join(md)
    payload = dict(environment=env, widths=widths, params=n_params, per_param_extra=per_param,
                   state_bytes_per_rank=counts["state_bytes"], unsharded_state_bytes=unsharded_state,
                   counts={f"{h}/{k}": v for (h, k), v in ((k, v) for k, v in counts.items() if isinstance(k, tuple))})
    json_path, md_path = write_outputs(args.out, f"fsdp_cost_{args.preset}", payload, markdown)
    print(markdown)
    return dict(outputs=dict(json=json_path, markdown=md_path), payload=payload)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
