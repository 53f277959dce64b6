"""Stage `bandwidth` of benchmarks/gpu_suite.sh: the fused kernels' effective bandwidth against a copy.

128M parameters in 100 tensors, fp32 and bf16 parameters (fp32 state): the plain and estimation
steps, the finite-difference update (forward, central; from the params and from sources), the
perturbation and the probe fill; then with bf16 state (stochastic rounding, 2 B per state element):
the plain and estimation steps and the forward-difference update.
Bytes per parameter (what each must move at best): plain 3 x param + 3 x state (read p, g, m, D;
write p, m), estimation 4 x param + 4 x state (also read Hz, write D); a forward difference reads g+
instead of Hz (same bytes), a central one also g- (one more param); from sources, theta is read from
the saved copy instead of p (same bytes, and no separate restore, which moves 2 x param); the
perturbation with save reads p and writes the backup and p (3 x param); the probe fill writes z
(1 x param). A copy moves 2 x 4 B per fp32 element. Times are CUDA-event medians of 50 calls after
5 warm-ups.
"""

import sys

import _stage

esgd_cuda = _stage.import_built()

import torch  # noqa: E402
from esgd_cuda import ops, probes  # noqa: E402

KW = dict(beta1=0.9, v=0.7, eps=1e-4, weight_decay=0.0, step_size=1e-3, momentum_scale=1.2,
          denom_scale=1.5)
ELEMENTS, TENSORS = 128 * 2**20, 100


def sizes_for(total, count):
    return [total // count + (i % 7) * 1024 for i in range(count)]


def steps(dtype, sizes, device):
    """(name, bytes per parameter, one call) for the plain and the estimation step."""
    p, g, hz = ([torch.randn(n, device=device).to(dtype) for n in sizes] for _ in range(3))
    m = [torch.randn(n, device=device) for n in sizes]
    d = [torch.rand(n, device=device) for n in sizes]
    ps, ss = p[0].element_size(), m[0].element_size()
    gm = [t.clone() for t in hz]
    backups = [t.clone() for t in p]  # theta's saved copy: also the sources of the update from sources
    scale = torch.tensor(1e-3, dtype=torch.float64, device=device)
    keys, zeros = list(range(1, len(p) + 1)), [0] * len(p)
    rounding = dict(rounding_keys=list(range(7, len(p) + 7)), rounding_offsets=[0] * len(p), rounding_step=9)
    mb, db = [t.bfloat16() for t in m], [t.bfloat16() for t in d]
    bf16_state = [("plain, bf16 state", 3 * ps + 6, lambda: ops.esgd_update_(p, g, mb, db, **KW, **rounding)),
                  ("estimation, bf16 state", 4 * ps + 8,
                   lambda: ops.esgd_update_hz_(p, g, mb, db, hz, beta2=0.999, **KW, **rounding)),
                  ("forward-difference update, bf16 state", 4 * ps + 8,
                   lambda: ops.esgd_update_fd_(p, g, mb, db, hz, [], scale, None, beta2=0.999, **KW, **rounding))]
    return [("plain", 3 * ps + 3 * ss, lambda: ops.esgd_update_(p, g, m, d, **KW)),
            ("estimation", 4 * ps + 4 * ss,
             lambda: ops.esgd_update_hz_(p, g, m, d, hz, beta2=0.999, **KW)),
            ("forward-difference update", 4 * ps + 4 * ss,
             lambda: ops.esgd_update_fd_(p, g, m, d, hz, [], scale, None, beta2=0.999, **KW)),
            ("central-difference update", 5 * ps + 4 * ss,
             lambda: ops.esgd_update_fd_(p, g, m, d, hz, gm, scale, None, beta2=0.999, **KW)),
            ("forward-difference update from sources", 4 * ps + 4 * ss,
             lambda: ops.esgd_update_fd_(p, g, m, d, hz, [], scale, None, beta2=0.999, sources=backups, **KW)),
            ("central-difference update from sources", 5 * ps + 4 * ss,
             lambda: ops.esgd_update_fd_(p, g, m, d, hz, gm, scale, None, beta2=0.999, sources=backups, **KW)),
            ("perturbation (save)", 3 * ps,
             lambda: probes.fd_perturb_(p, backups, scale, keys, zeros, sign=1.0, save=True, fused=True)),
            ("probe fill", ps, lambda: probes.rademacher_(hz, keys, zeros, fused=True))] + bf16_state


def timed(fn, reps=50):
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def main():
    for dtype in (torch.float32, torch.bfloat16):
        for _, _, fn in steps(dtype, sizes_for(4096, 4), torch.device("cpu")):
            fn()
    device = _stage.device_check(esgd_cuda, "time the fused steps on the GPU")
    sizes = sizes_for(ELEMENTS, TENSORS)
    elements = sum(sizes)
    src = torch.empty(elements, device=device)
    dst = torch.empty_like(src)
    copy_gbs = 8 * elements / timed(lambda: dst.copy_(src)) / 1e9
    del src, dst
    print(f"bandwidth: {torch.cuda.get_device_name(device)}, {elements} parameters in {len(sizes)} "
          f"tensors; copy {copy_gbs:.0f} GB/s")
    for dtype in (torch.float32, torch.bfloat16):
        for name, per_param, fn in steps(dtype, sizes, device):
            seconds = timed(fn)
            gbs = per_param * elements / seconds / 1e9
            print(f"bandwidth: {str(dtype).replace('torch.', '')} {name} {seconds * 1e3:.3f} ms, "
                  f"{per_param} B/param, {gbs:.0f} GB/s = {gbs / copy_gbs:.1%} of copy", flush=True)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
