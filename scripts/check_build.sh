#!/usr/bin/env bash
# Build checks for esgd_cuda, run after the package is installed into the active environment:
#   1. the installed extension loads and, when torch is a CUDA build and a toolkit is present,
#      carries sm_90 device code (read from its .nv_fatbin section), and the sm_90 kernels compile
#      without spills inside their register budget (scripts/check_kernel_resources.py);
#      and that the CPU kernel's AVX2 loops are vectorized (scripts/check_cpu_vectorization.py);
#   2. the CPU-only build path (what a user without nvcc gets) compiles in a temporary directory,
#      and the kernel, planning and loading tests pass against it.
# Exits non-zero on the first failure. PYTHON overrides the interpreter; ESGD_CHECK_ARCH the arch.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
ARCH="${ESGD_CHECK_ARCH:-sm_90}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/esgd_check_build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

fail() {
  echo "check_build: FAILED: $*" >&2
  exit 1
}

echo "== check_build 1/2: installed extension"
# Run from an empty directory so that the source tree cannot shadow the installed package.
INSTALLED="$(cd "$WORK" && "$PYTHON" - <<'PY'
import json, os, shutil, torch
import esgd_cuda
from esgd_cuda import _extension
info = esgd_cuda.extension_info()
toolkit = bool(os.environ.get("CUDA_HOME")) or shutil.which("nvcc") is not None
print(json.dumps({"loaded": info["loaded"], "error": info["load_error"], "path": info["path"],
                  "cuda": info["built"]["cuda"], "want_cuda": bool(torch.version.cuda) and toolkit}))
PY
)" || fail "importing the installed esgd_cuda"
read -r LOADED CUDA WANT_CUDA LIB < <("$PYTHON" -c '
import json, sys
d = json.loads(sys.argv[1])
if not d["loaded"]:
    sys.exit("check_build: FAILED: the installed extension did not load: %s" % d["error"])
print(int(d["loaded"]), int(d["cuda"]), int(d["want_cuda"]), d["path"])' "$INSTALLED") \
  || fail "the installed extension did not load"
echo "installed extension: $LIB (cuda=$CUDA)"
if [ "$WANT_CUDA" = 1 ] && [ "$CUDA" != 1 ]; then
  fail "torch is a CUDA build and a CUDA toolkit is present, but the installed extension has no CUDA kernels"
fi
if [ "$CUDA" = 1 ]; then
  "$PYTHON" "$ROOT/scripts/check_fatbin.py" "$LIB" "$ARCH" || fail "no $ARCH device code in $LIB"
  # ptxas's register and spill report for every kernel instantiation (device code only, seconds).
  "$PYTHON" "$ROOT/scripts/check_kernel_resources.py" --arch "$ARCH" \
    || fail "the $ARCH kernels spill or exceed their register budget"
else
  echo "no CUDA kernels in this build (torch $("$PYTHON" -c 'import torch; print(torch.__version__)')), skipping the device-code check"
fi
# The CPU kernel's AVX2 loops must be vectorized (a loop the compiler leaves scalar is 4x slower).
"$PYTHON" "$ROOT/scripts/check_cpu_vectorization.py" "$LIB" | tail -n 1 \
  || fail "a CPU kernel loop is not vectorized"

echo "== check_build 2/2: CPU-only build (ESGD_CUDA_BUILD=cpu) in $WORK"
mkdir -p "$WORK/pkg/esgd_cuda" "$WORK/tests"
cp "$ROOT"/esgd_cuda/*.py "$WORK/pkg/esgd_cuda/"
if ! (cd "$ROOT" && ESGD_CUDA_BUILD=cpu "$PYTHON" setup.py -q build_ext -b "$WORK/pkg" -t "$WORK/obj" \
      > "$WORK/build.log" 2>&1); then
  tail -n 60 "$WORK/build.log" >&2
  fail "the CPU-only build"
fi
grep -E "^esgd_cuda setup" "$WORK/build.log" || true
cp "$ROOT"/tests/test_kernels.py "$ROOT"/tests/test_planning.py "$ROOT"/tests/test_extension_loading.py \
  "$ROOT"/tests/test_probes.py "$ROOT"/tests/test_fd_kernels.py "$WORK/tests/"
(cd "$WORK/tests" && PYTHONPATH="$WORK/pkg" "$PYTHON" - <<'PY'
import os, sys
import esgd_cuda
info = esgd_cuda.extension_info()
expected = os.path.join(os.environ["PYTHONPATH"], "esgd_cuda")
if os.path.dirname(esgd_cuda.__file__) != expected:
    sys.exit(f"check_build: FAILED: esgd_cuda resolved to {esgd_cuda.__file__}, not {expected}")
if not info["loaded"] or info["built"]["cuda"]:
    sys.exit(f"check_build: FAILED: the CPU-only build did not load as CPU-only: {info}")
print("CPU-only extension:", info["path"])
PY
) || fail "loading the CPU-only build"
# --noconftest: the repository's conftest puts the source tree first on sys.path.
(cd "$WORK/tests" && PYTHONPATH="$WORK/pkg" ESGD_CUDA_DISABLE_EXTENSION= \
  "$PYTHON" -m pytest -q --noconftest -p no:cacheprovider test_kernels.py test_planning.py \
  test_extension_loading.py test_probes.py test_fd_kernels.py) || fail "kernel tests against the CPU-only build"
echo "check_build: OK"
