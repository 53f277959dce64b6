#!/usr/bin/env bash
# Sets up a fresh machine for esgd_cuda: a virtual environment in .venv with torch and the build, test
# and benchmark dependencies, then builds and installs esgd_cuda into it (the CUDA kernel too when a CUDA
# toolkit is found, see setup.py). Safe to run again: an existing .venv is reused.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
# torch 2.14.1 is a CUDA 13.0 build, so the CUDA kernel compiles here even without a GPU.
TORCH_SPEC=${ESGD_TORCH_SPEC:-torch==2.14.1}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

echo "== installing $TORCH_SPEC and the build/test/benchmark dependencies"
python -m pip install --quiet --disable-pip-version-check \
  "$TORCH_SPEC" numpy pytest ninja pybind11 setuptools wheel expecttest \
  scikit-learn matplotlib tqdm

# The examples' libraries and the benchmarks' second-order peers, pinned to releases that work with
# torch 2.14.1 on Python 3.11 (torchvision 0.29.1 is torch 2.14.1's, for timm). setup.py's [examples]
# and [bench] extras carry the same pins. torch is named again so that pip fails rather than move it.
EXTRAS_SPEC=(lightning==2.6.6 transformers==5.24.0 accelerate==1.15.0 timm==1.0.31 torchvision==0.29.1
             pytorch-optimizer==4.1.0 torchzero==0.4.4)
if [ "$TORCH_SPEC" = "torch==2.14.1" ]; then
  echo "== installing the example and benchmark-peer dependencies"
  python -m pip install --quiet --disable-pip-version-check "$TORCH_SPEC" "${EXTRAS_SPEC[@]}"
else
  echo "== $TORCH_SPEC: not installing ${EXTRAS_SPEC[*]} (pinned for torch 2.14.1);" \
       "tests/test_examples.py and the peer benchmark checks need them"
fi

# torch guesses CUDA_HOME from the nvcc on PATH, which here is a wrapper script outside the toolkit.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

echo "== building and installing esgd_cuda (this compiles the native kernels: a few minutes on 2 cores)"
mkdir -p build
if ! python -m pip install -v --disable-pip-version-check --no-build-isolation --no-deps --force-reinstall . \
    > build/install.log 2>&1; then
  tail -n 80 build/install.log
  echo "setup.sh: building esgd_cuda failed (full log: build/install.log)" >&2
  exit 1
fi
grep -m1 "esgd_cuda setup:" build/install.log | sed "s/^ *//" || true
# From outside the repository, so that the installed package is imported, not the source tree.
(cd / && python - <<'PY'
import json
import esgd_cuda
info = esgd_cuda.extension_info()
print("== esgd_cuda installed:", esgd_cuda.__file__)
print(json.dumps(info, indent=1, default=str))
PY
)
