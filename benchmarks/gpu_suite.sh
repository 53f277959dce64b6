#!/usr/bin/env bash
# Everything a session with a GPU should check, in one call on the device machine, run from the
# repository root with the machine's own python3 and torch (no network, nothing installed):
#
#   stage      what                                              expected  limit (s; 16 cores + H200)
#   build      setup.py build_ext --inplace, CPU + CUDA (sm_90)      120     160
#   tests      the CUDA tests only: pytest -m cuda (316 today)         80     110
#   memcheck   compute-sanitizer memcheck over every kernel variant   50      70
#   bandwidth  fused steps vs a copy, 128M parameters                 12      30
#   step_time  benchmarks/step_time.py --device cuda --rounds 1       45      70
#   racecheck  compute-sanitizer racecheck, same workload             40      50
#   ncu        Nsight Compute over the esgd kernels, or timings       30      50
#              sum                                                   377     540 = the budget
# Expected: 377 s + ~10 s of set-up, against the budget of 540 s (ESGD_SUITE_BUDGET) inside the
# device tool's 600 s call: 150 s (28%) of margin for a slower machine and the kernels being added.
# The bf16-state kernels (issue 20) are not yet timed on a GPU: build, tests and memcheck are
# scaled from the instantiation and test counts (42 update kernels instead of 24; 316 tests, 280).
# The limits add up to the budget, so no stage can take another's time; a stage's limit is still
# cut to what is left, and one that would start with under 20 s left is skipped, so the summary
# always prints. Stages run in order of value; CI already runs every test that needs no GPU.
# How the expectations were made: benchmarks/README.md ("GPU suite: time budget").
#
# Every stage runs even when an earlier one failed (stages after a failed build are skipped); the
# summary table is printed last and the exit status is non-zero if any stage failed or was skipped.
# Each stage is a committed script, benchmarks/gpu/<stage>.py, that imports the in-place build.
# Logs are copied to $OUT as gpu_suite.log after every stage, with step_time_cuda.{md,json} and
# summary.txt at the end (the device tool brings $OUT back: at most 8 files).
#
# ESGD_SUITE_REHEARSAL=1 is what CI runs without a GPU: the suite copies the files the device tool
# would send (git's tracked and untracked-but-not-ignored files) to a temporary folder, builds the
# CPU kernels in place there (the same command; the CUDA compile is checked by scripts/check_build.sh),
# and runs every stage script up to its device check, where each must print
# "rehearsal: reached device check"; limits are scaled by ESGD_SUITE_LIMIT_SCALE (default 4 there).
# Knobs: ESGD_ARCH (default 9.0), MAX_JOBS (default: all cores), PYTHON, ESGD_SUITE_BUDGET,
# ESGD_SUITE_LIMIT_SCALE, ESGD_SUITE_KEEP_COPY=1 (keep the rehearsal's copy).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# python3 first: on the lent GPU machines that is the interpreter that holds torch.
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
REHEARSAL=0
case "${ESGD_SUITE_REHEARSAL:-}" in ""|0) ;; *) REHEARSAL=1 ;; esac
SCALE="${ESGD_SUITE_LIMIT_SCALE:-$([ "$REHEARSAL" = 1 ] && echo 4 || echo 1)}"
BUDGET="${ESGD_SUITE_BUDGET:-$((540 * SCALE))}"
export MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}"
export TORCH_CUDA_ARCH_LIST="${ESGD_ARCH:-9.0}"
export ESGD_CUDA_DISABLE_EXTENSION=
export PYTHONUNBUFFERED=1
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
# torch compiles with ninja when it finds it on PATH, else one file at a time: the ninja of a venv's
# package is not on PATH when its python3 was found some other way.
if ! command -v ninja >/dev/null 2>&1; then
  NINJA_DIR="$("$PYTHON" -c 'import ninja; print(ninja.BIN_DIR)' 2>/dev/null || true)"
  if [ -n "$NINJA_DIR" ] && [ -d "$NINJA_DIR" ]; then
    export PATH="$NINJA_DIR:$PATH"
  fi
fi
LOGS="$(mktemp -d "${TMPDIR:-/tmp}/esgd_gpu_suite.XXXXXX")"
STAGES=(build tests memcheck bandwidth step_time racecheck ncu)
SUMMARY=()
FAILED=0

if [ "$REHEARSAL" = 1 ]; then
  export ESGD_CUDA_BUILD=cpu ESGD_SUITE_REHEARSAL=1
  COPY="$LOGS/repo"
  mkdir "$COPY"
  if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files -z --cached --others --exclude-standard \
      | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C "$COPY"
  else
    tar --exclude=.git --exclude=.venv --exclude=build --exclude='*.so' --exclude=__pycache__ \
      --exclude=benchmarks/results -cf - . | tar -xf - -C "$COPY"
  fi
  if [ "${ESGD_SUITE_KEEP_COPY:-0}" != 1 ]; then
    trap 'rm -rf "$COPY"' EXIT
  fi
  cd "$COPY"
else
  export ESGD_CUDA_BUILD=cuda
fi

collect_logs() {
  if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
    # One file for all logs: the tool brings back at most 8 files.
    for s in "${STAGES[@]}"; do
      if [ -f "$LOGS/$s.log" ]; then
        echo "===== $s.log"
        cat "$LOGS/$s.log"
      fi
    done >"$OUT/gpu_suite.log"
  fi
  return 0
}

record() {  # record NAME STATUS TEXT
  SUMMARY+=("$(printf '%-10s %-8s %s' "$1" "$2" "$3")")
}

stage() {  # stage NAME LIMIT_S COMMAND...
  local name="$1" limit=$(($2 * SCALE))
  shift 2
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 20 ]; then
    record "$name" skipped "(suite budget of ${BUDGET}s spent)"
    FAILED=1
    return 1
  fi
  if [ "$limit" -gt "$left" ]; then
    limit="$left"
  fi
  echo "== [$name] (limit ${limit}s, suite at ${SECONDS}s of ${BUDGET}s) $*"
  local start=$SECONDS status
  # A pipeline, not a process substitution: bash waits for tee, so the log is complete when the
  # stage returns (pipefail is on, so the if sees the stage's own status).
  if ESGD_STAGE_SECONDS="$limit" timeout -k 10 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"; then
    status=0
  else
    status=${PIPESTATUS[0]}
  fi
  local took=$((SECONDS - start)) note=""
  if [ "$status" -eq 0 ] && [ "$REHEARSAL" = 1 ] && [ "$name" != build ] \
      && ! grep -q "rehearsal: reached device check" "$LOGS/$name.log"; then
    status=1 note=", did not reach its device check"
  fi
  if [ "$status" -eq 0 ]; then
    record "$name" ok "$(printf '%5ss / %ss' "$took" "$limit")"
  else
    if [ "$status" -eq 124 ]; then
      note=", timed out"
    fi
    record "$name" FAILED "$(printf '%5ss / %ss  (exit %s%s)' "$took" "$limit" "$status" "$note")"
    FAILED=1
  fi
  echo "== [$name] $([ "$status" -eq 0 ] && echo ok || echo FAILED) after ${took}s"
  collect_logs
  return "$status"
}

echo "== environment"
if [ "$REHEARSAL" = 1 ]; then
  echo "rehearsal: CPU-only build and stage scripts up to their device checks, in $PWD"
fi
echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown), $(nproc 2>/dev/null) cores, MAX_JOBS=$MAX_JOBS, budget ${BUDGET}s"
echo "ninja: $(command -v ninja || echo 'not found: the build compiles one file at a time')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: no GPU"
"$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available())' \
  || echo "$PYTHON cannot import torch"

# Stage limits below are the `limit` column above (times ESGD_SUITE_LIMIT_SCALE).
if stage build 160 "$PYTHON" setup.py build_ext --inplace; then
  stage tests 110 "$PYTHON" benchmarks/gpu/cuda_tests.py || true
  stage memcheck 70 "$PYTHON" benchmarks/gpu/sanitize.py memcheck || true
  stage bandwidth 30 "$PYTHON" benchmarks/gpu/bandwidth.py || true
  stage step_time 70 "$PYTHON" benchmarks/gpu/step_time_cuda.py || true
  stage racecheck 50 "$PYTHON" benchmarks/gpu/sanitize.py racecheck || true
  stage ncu 50 "$PYTHON" benchmarks/gpu/kernel_profile.py || true
else
  for s in "${STAGES[@]:1}"; do record "$s" skipped "(build failed)"; done
fi

{
  echo "== gpu_suite summary ($([ "$REHEARSAL" = 1 ] && echo rehearsal || echo GPU run); logs in $LOGS)"
  grep -h "^bandwidth: " "$LOGS/bandwidth.log" 2>/dev/null || true
  grep -hE "(passed|failed|errors?|skipped|deselected|collected|no tests ran).* in [0-9.]+s( =+)?$" \
    "$LOGS/tests.log" 2>/dev/null | sed 's/^=* */tests: /; s/ *=*$//' || true
  for s in memcheck racecheck; do
    grep -h "ERROR SUMMARY" "$LOGS/$s.log" 2>/dev/null | sed "s/^=* */$s: /" || true
  done
  grep -h "^\[ncu\] \(timing-only\|no access\|ncu not found\|ncu failed\)" "$LOGS/ncu.log" 2>/dev/null || true
  printf '%-10s %-8s %s\n' stage status "time / limit"
  printf '%s\n' "${SUMMARY[@]}"
  echo "total ${SECONDS}s of the ${BUDGET}s budget"
} >"$LOGS/summary.txt"
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
  collect_logs
  cp "$LOGS/summary.txt" "$OUT/"
  cp benchmarks/results/step_time_cuda.md benchmarks/results/step_time_cuda.json "$OUT"/ 2>/dev/null || true
fi
echo
cat "$LOGS/summary.txt"
exit "$FAILED"
