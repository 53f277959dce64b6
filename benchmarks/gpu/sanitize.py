"""Stages `memcheck` and `racecheck` of benchmarks/gpu_suite.sh: compute-sanitizer over a small
workload that launches every kernel variant (4 dtypes x plain/estimation/capturable, the
finite-difference update (forward, central, with and without the step-scalar table, from the params
and from sources, the latter also with sources in another layout than their channels-last params),
each again with bfloat16 state (stochastic rounding) for the 16- and 32-bit dtypes, the perturbation
(save and restore) and the probe fill; aligned and misaligned views, odd and empty sizes, more
tensors than one launch holds).

    python benchmarks/gpu/sanitize.py memcheck|racecheck    # runs the workload under the sanitizer
    python benchmarks/gpu/sanitize.py --workload            # the workload alone, on the GPU

The workload first runs once at a tiny size on the CPU kernels (same calls, same arguments), so a
rehearsal catches a call that no longer matches the ops before a GPU session does.
"""

import argparse
import os
import subprocess
import sys

import _stage

esgd_cuda = _stage.import_built()

import torch  # noqa: E402
from esgd_cuda import ops, probes  # noqa: E402
from esgd_cuda.functional import step_scalar_table  # noqa: E402

KW = dict(beta1=0.9, v=0.7, eps=1e-4, weight_decay=0.01, step_size=0.1, momentum_scale=1.2,
          denom_scale=1.5)
SIZES = [1, 3, 0, 4097, 65535, 65537, 131072]
TINY = [1, 3, 0, 37]


def workload(device, sizes):
    gen = torch.Generator().manual_seed(0)

    def lists(dtype, offset):
        # Slicing off `offset` elements makes a misaligned view: the kernel's scalar path.
        return [torch.rand(n + offset, generator=gen, dtype=torch.float64).to(dtype).to(device)[offset:]
                for n in sizes]

    # bfloat16 state rounds with each tensor's key and offset (the offsets cross 2^32 mid-tensor).
    rounding = dict(rounding_keys=[5 * i + 3 for i in range(len(sizes))],
                    rounding_offsets=[2**32 - 7 * i for i in range(len(sizes))])
    for dtype, state in ((torch.float32, torch.float32), (torch.float16, torch.float32),
                         (torch.bfloat16, torch.float32), (torch.float64, torch.float64),
                         (torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16),
                         (torch.bfloat16, torch.bfloat16)):
        rkw = rounding if state == torch.bfloat16 else {}
        for offset in (0, 1):
            p, g, hz = lists(dtype, offset), lists(dtype, offset), lists(dtype, offset)
            m, d = lists(state, offset), lists(state, offset)
            ops.esgd_update_hz_(p, g, m, d, hz, beta2=0.999, rounding_step=3, **KW, **rkw)
            ops.esgd_update_(p, g, m, d, rounding_step=4, **KW, **rkw)
        # The capturable op reads its step scalars (and step counts) from a device table, one row per tensor.
        ones = [torch.ones((), device=device) for _ in sizes]
        table = step_scalar_table(ones, ones, lr=0.1, beta1=0.9, beta2=0.999, v=0.7, lr_warmup=0.9,
                                  weight_decay=0.01)
        ops.esgd_update_capturable_(p, g, m, d, hz, table, beta1=0.9, beta2=0.999, v=0.7, eps=1e-4, **rkw)
        ops.esgd_update_capturable_(p, g, m, d, [], table, beta1=0.9, beta2=0.999, v=0.7, eps=1e-4, **rkw)
        # Finite differences: the update reads g+ (and g-) and 1/h from the device; the
        # perturbation draws z in the kernel, saving a backup and restoring from it.
        scale = torch.tensor(100.0, dtype=torch.float64, device=device)
        for offset in (0, 1):
            p, g, gp, gm = (lists(dtype, offset) for _ in range(4))
            m, d = lists(state, offset), lists(state, offset)
            # theta from sources (the restore fused into the update); misaligned with the rest.
            sources = lists(dtype, offset)
            for minus in ([], gm):
                ops.esgd_update_fd_(p, g, m, d, gp, minus, scale, None, beta2=0.999, rounding_step=5, **KW, **rkw)
                ops.esgd_update_fd_(p, g, m, d, gp, minus, scale, table, beta2=0.999, **KW, **rkw)
                ops.esgd_update_fd_(p, g, m, d, gp, minus, scale, None, beta2=0.999, sources=sources,
                                    rounding_step=6, **KW, **rkw)
                ops.esgd_update_fd_(p, g, m, d, gp, minus, scale, table, beta2=0.999, sources=sources, **KW, **rkw)
            if state == torch.bfloat16:
                continue  # the probe kernels do not depend on the state
            backups = [torch.empty_like(t) for t in p]
            keys, starts = [7 * i + 1 for i in range(len(p))], [3 * i for i in range(len(p))]
            probes.fd_perturb_(p, backups, scale, keys, starts, sign=1.0, save=True, fused=True)
            probes.fd_perturb_(p, backups, scale, keys, starts, sign=-1.0, save=False, fused=True)
    # Channels-last parameters (state and gradients alike) with contiguous sources: each source is
    # copied into its parameter's layout, then read in place. Central: the seven-list table.
    shapes = [(3, 8, 5, 7), (1, 16, 1, 1), (2, 4, 9, 9)]

    def channels_last(dtype):
        return [torch.rand(s, generator=gen, dtype=torch.float64).to(dtype).to(device)
                .contiguous(memory_format=torch.channels_last) for s in shapes]

    p, g, gp, gm, m, d = (channels_last(dt) for dt in [torch.float32] * 6)
    sources = [torch.rand(s, generator=gen).to(device) for s in shapes]
    scale = torch.tensor(100.0, dtype=torch.float64, device=device)
    ops.esgd_update_fd_(p, g, m, d, gp, gm, scale, None, beta2=0.999, sources=sources, **KW)
    # More tensors than one launch's table holds.
    many = [torch.rand(n % 700 + 1, generator=gen).to(device) for n in range(80)]
    state = [torch.rand(t.numel(), generator=gen).to(device) for t in many]
    ops.esgd_update_(many, [t.clone() for t in many], state, [s.clone() for s in state], **KW)
    # Probe fills: mixed dtypes and sizes, nonzero offsets, a misaligned view, two launches' worth.
    dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    fills = [torch.empty(n % 900 + (n % 3), dtype=dtypes[n % 4], device=device) for n in range(60)]
    fills.append(torch.empty(4097, device=device)[1:])
    probes.rademacher_(fills, [11 * i + 5 for i in range(len(fills))], [i * 65 for i in range(len(fills))],
                       fused=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tool", nargs="?", choices=["memcheck", "racecheck"])
    parser.add_argument("--workload", action="store_true", help="run the workload alone on the GPU")
    args = parser.parse_args()
    if args.workload:
        workload(torch.device("cuda"), SIZES)
        print("[sanitize] workload done", flush=True)
        return 0
    if args.tool is None:
        parser.error("name the tool: memcheck or racecheck")

    workload(torch.device("cpu"), TINY)
    sanitizer = _stage.find_tool("compute-sanitizer")
    print(f"[{args.tool}] compute-sanitizer: {sanitizer or 'not found'}", flush=True)
    _stage.device_check(esgd_cuda, f"compute-sanitizer --tool {args.tool}")
    if sanitizer is None:
        _stage.fail("compute-sanitizer not found on PATH, in CUDA_HOME/bin or /usr/local/cuda/bin")
    env = dict(os.environ)
    if args.tool == "memcheck":
        # Without the caching allocator every tensor is its own allocation, so an out-of-bounds
        # access cannot land unseen inside a pooled block.
        env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"
    # No kernel filter: the workload launches the esgd kernels and a few torch fills and copies,
    # so a kernel added under another name is checked too.
    command = [sanitizer, "--tool", args.tool, "--error-exitcode", "1",
               sys.executable, os.path.abspath(__file__), "--workload"]
    print("[{}] {}".format(args.tool, " ".join(command)), flush=True)
    return subprocess.call(command, env=env)


if __name__ == "__main__":
    sys.exit(main())
