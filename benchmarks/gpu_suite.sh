#!/usr/bin/env bash
# Everything a session with a GPU should check, in one call on the device machine (run from the
# repository root; no network; torch preinstalled): build the extension in place for sm_90, run the
# test suite (its CUDA tests included), run compute-sanitizer memcheck and racecheck on a small
# kernel workload, measure the plain step against copy bandwidth, run benchmarks/step_time.py on
# CUDA, and profile the kernels with Nsight Compute.
# Every stage runs even when an earlier one failed (later stages that need the build are skipped);
# a summary table is printed last and the exit status is non-zero if any stage failed.
# The stages share one time budget, ESGD_SUITE_BUDGET seconds (default 540, inside the device tool's
# 10-minute call): a stage's own limit is cut to what is left, and a stage that would start with
# under 20 s left is skipped, so the summary is always printed. Logs and the step_time results are
# copied to $OUT when it is set (the device tool brings that folder back).
# Knobs: ESGD_ARCH (default 9.0), MAX_JOBS (default 16), PYTHON, ESGD_SUITE_BUDGET.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# python3 first: on the lent GPU machines that is the interpreter that holds torch.
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
export MAX_JOBS="${MAX_JOBS:-16}"
export TORCH_CUDA_ARCH_LIST="${ESGD_ARCH:-9.0}"
export ESGD_CUDA_BUILD=cuda
export ESGD_CUDA_DISABLE_EXTENSION=
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
LOGS="$(mktemp -d "${TMPDIR:-/tmp}/esgd_gpu_suite.XXXXXX")"
SUMMARY=()
FAILED=0
BUILT=0
BUDGET="${ESGD_SUITE_BUDGET:-540}"

stage() {  # stage NAME TIMEOUT_S COMMAND...
  local name="$1" limit="$2"
  shift 2
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 20 ]; then
    skip "$name" "suite budget of ${BUDGET}s spent"
    FAILED=1
    return 1
  fi
  if [ "$limit" -gt "$left" ]; then
    limit="$left"
  fi
  echo "== [$name] (limit ${limit}s) $*"
  local start=$SECONDS status=0
  timeout "$limit" "$@" > >(tee "$LOGS/$name.log") 2>&1 || status=$?
  local took=$((SECONDS - start))
  if [ "$status" -eq 0 ]; then
    SUMMARY+=("$(printf '%-14s %-8s %5ss' "$name" ok "$took")")
  else
    [ "$status" -eq 124 ] && echo "[$name] timed out after ${limit}s"
    SUMMARY+=("$(printf '%-14s %-8s %5ss  (exit %s, log %s)' "$name" FAILED "$took" "$status" "$LOGS/$name.log")")
    FAILED=1
  fi
  return "$status"
}

skip() {
  SUMMARY+=("$(printf '%-14s %-8s' "$1" skipped) ($2)")
}

echo "== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available())' \
  || echo "$PYTHON cannot import torch"

if stage build 300 "$PYTHON" setup.py build_ext --inplace; then
  BUILT=1
fi

if [ "$BUILT" = 1 ]; then
  stage info 60 "$PYTHON" -c '
import json, sys, torch, esgd_cuda
from esgd_cuda import _extension
info = esgd_cuda.extension_info()
print(json.dumps(info, indent=1))
if not _extension.fused_supported(torch.device("cuda"), torch.float32):
    sys.exit("the CUDA kernels do not run on this GPU")' || true
  # The whole suite: the CUDA tests are spread over several files (kernels, optimizer, state,
  # capturable, compile, accumulation), and -ra lists any that still skip, e.g. for memory.
  stage tests 240 "$PYTHON" -m pytest -q -ra -p no:cacheprovider tests || true

  cat > "$LOGS/sanitize.py" <<'PY'
import torch
from esgd_cuda import ops

gen = torch.Generator().manual_seed(0)
kw = dict(beta1=0.9, v=0.7, eps=1e-4, weight_decay=0.01, step_size=0.1, momentum_scale=1.2,
          denom_scale=1.5)
for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    sizes = [1, 3, 0, 4097, 65535, 65537, 131072]
    def mk(dt, offset=0):
        return [torch.rand(n + offset, generator=gen, dtype=torch.float64).to(dt).cuda()[offset:]
                for n in sizes]
    for offset in (0, 1):  # aligned vector path, then misaligned scalar path
        p, g, m, d, hz = mk(dtype, offset), mk(dtype, offset), mk(sd, offset), mk(sd, offset), mk(dtype, offset)
        ops.esgd_update_hz_(p, g, m, d, hz, beta2=0.999, **kw)
        ops.esgd_update_(p, g, m, d, **kw)
    # More tensors than one launch holds.
    many = [torch.rand(n % 700 + 1, generator=gen).cuda() for n in range(80)]
    st = [torch.rand(t.numel(), generator=gen).cuda() for t in many]
    ops.esgd_update_(many, [t.clone() for t in many], st, [s.clone() for s in st], **kw)
    # The capturable op: step scalars read from a device table, one row per tensor.
    from esgd_cuda.functional import step_scalar_table
    ones = [torch.ones((), device="cuda") for _ in sizes]
    table = step_scalar_table(ones, ones, lr=0.1, beta1=0.9, beta2=0.999, v=0.7, lr_warmup=0.9,
                              weight_decay=0.01)
    ops.esgd_update_capturable_(p, g, m, d, hz, table, beta1=0.9, beta2=0.999, v=0.7, eps=1e-4)
    ops.esgd_update_capturable_(p, g, m, d, [], table, beta1=0.9, beta2=0.999, v=0.7, eps=1e-4)
torch.cuda.synchronize()
print("sanitize workload done")
PY
  SANITIZER="$(command -v compute-sanitizer || true)"
  if [ -z "$SANITIZER" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/compute-sanitizer" ]; then
    SANITIZER="$CUDA_HOME/bin/compute-sanitizer"
  fi
  if [ -n "$SANITIZER" ]; then
    # Without the caching allocator every tensor is its own allocation, so memcheck sees
    # out-of-bounds accesses that would otherwise land inside a pooled block.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 stage memcheck 150 "$SANITIZER" --tool memcheck \
      --error-exitcode 1 --kernel-name regex:esgd "$PYTHON" "$LOGS/sanitize.py" || true
  else
    skip memcheck "compute-sanitizer not found"
  fi

  stage bandwidth 120 "$PYTHON" - <<'PY' || true
import torch
from esgd_cuda import ops

# 128M fp32 parameters in 100 tensors; a plain step moves 24 B per element
# (reads p, g, m, d; writes p, m), a copy 8 B (read + write).
n_total, count = 128 * 2**20, 100
sizes = [n_total // count + (i % 7) * 1024 for i in range(count)]
p, g, m = ([torch.randn(n, device="cuda") for n in sizes] for _ in range(3))
d = [torch.rand(n, device="cuda") for n in sizes]
kw = dict(beta1=0.9, v=0.7, eps=1e-4, weight_decay=0.0, step_size=1e-3, momentum_scale=1.2,
          denom_scale=1.5)
src = torch.empty(sum(sizes), device="cuda")
dst = torch.empty_like(src)

def timed(fn, reps=50):
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record(); fn(); end.record(); end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]

elements = sum(sizes)
t_copy = timed(lambda: dst.copy_(src))
t_plain = timed(lambda: ops.esgd_update_(p, g, m, d, **kw))
hz = [torch.randn(n, device="cuda") for n in sizes]
t_hz = timed(lambda: ops.esgd_update_hz_(p, g, m, d, hz, beta2=0.999, **kw))
bw_copy = 8 * elements / t_copy / 1e9
bw_plain = 24 * elements / t_plain / 1e9
bw_hz = 32 * elements / t_hz / 1e9
print(f"elements {elements}: copy {bw_copy:.0f} GB/s, plain step {t_plain*1e3:.3f} ms {bw_plain:.0f} GB/s "
      f"({bw_plain / bw_copy:.1%} of copy), estimation step {t_hz*1e3:.3f} ms {bw_hz:.0f} GB/s "
      f"({bw_hz / bw_copy:.1%} of copy)")
PY
  if [ -f benchmarks/step_time.py ]; then
    stage step_time 240 "$PYTHON" benchmarks/step_time.py --device cuda || true
  else
    skip step_time "benchmarks/step_time.py not found"
  fi

  # After the benchmarks, as the stages a short budget can best spare. racecheck looks for shared
  # memory hazards, and the kernel uses no shared memory: it guards against a future change.
  if [ -n "$SANITIZER" ]; then
    stage racecheck 150 "$SANITIZER" --tool racecheck --error-exitcode 1 \
      --kernel-name regex:esgd "$PYTHON" "$LOGS/sanitize.py" || true
  else
    skip racecheck "compute-sanitizer not found"
  fi

  # Nsight Compute's view of the kernels, to tell
  # a memory-bound kernel (DRAM throughput near peak) from one starved of warps.
  cat > "$LOGS/profile.py" <<'PY'
import torch
from esgd_cuda import ops

kw = dict(beta1=0.9, v=0.7, eps=1e-4, weight_decay=0.0, step_size=1e-3, momentum_scale=1.2,
          denom_scale=1.5)
for dtype in (torch.float32, torch.bfloat16):
    sizes = [16 * 2**20] * 4  # 64M parameters: whole 320-block launches
    p, g, hz = ([torch.randn(n, device="cuda").to(dtype) for n in sizes] for _ in range(3))
    m = [torch.randn(n, device="cuda") for n in sizes]
    d = [torch.rand(n, device="cuda") for n in sizes]
    ops.esgd_update_(p, g, m, d, **kw)
    ops.esgd_update_hz_(p, g, m, d, hz, beta2=0.999, **kw)
torch.cuda.synchronize()
PY
  NCU="$(command -v ncu || true)"
  if [ -z "$NCU" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/ncu" ]; then
    NCU="$CUDA_HOME/bin/ncu"
  fi
  if [ -n "$NCU" ]; then
    # All 16 launches: 4 per call (64M parameters in 320-block launches) for fp32 and bf16, plain
    # and estimation.
    stage ncu 120 "$NCU" --kernel-name regex:esgd_multi_tensor --launch-count 16 --csv \
      --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread,launch__grid_size \
      "$PYTHON" "$LOGS/profile.py" || true
  else
    skip ncu "ncu not found"
  fi
else
  for s in info tests memcheck bandwidth step_time racecheck ncu; do skip "$s" "build failed"; done
fi

if [ -n "${OUT:-}" ] && [ -d "${OUT}" ]; then
  # One file for all logs: the tool brings back at most 8 files.
  for f in "$LOGS"/*.log; do echo "===== $(basename "$f")"; cat "$f"; done >"$OUT/gpu_suite.log" 2>/dev/null || true
  cp benchmarks/results/step_time_cuda.md benchmarks/results/step_time_cuda.json "$OUT"/ 2>/dev/null || true
fi

echo
echo "== gpu_suite summary (logs in $LOGS)"
grep -h "GB/s" "$LOGS/bandwidth.log" 2>/dev/null || true
tail -n 3 "$LOGS/tests.log" 2>/dev/null | grep -E "passed|failed" || true
printf '%-14s %-8s %6s\n' stage status time
printf '%s\n' "${SUMMARY[@]}"
exit "$FAILED"
