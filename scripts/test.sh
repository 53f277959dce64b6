#!/usr/bin/env bash
# Runs the esgd_cuda checks in the .venv made by scripts/setup.sh: the build checks (device code in the
# installed library, the CPU-only build path) and the pytest suite against the installed package.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck disable=SC1091
. .venv/bin/activate
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi

# The tests must exercise the installed package (with its compiled extension), not the source tree.
python - <<'PY'
import os, sys
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.getcwd()]
import esgd_cuda
where = os.path.dirname(os.path.abspath(esgd_cuda.__file__))
if where == os.path.join(os.getcwd(), "esgd_cuda"):
    sys.exit("test.sh: esgd_cuda resolves to the source tree, not the installed package")
print("== testing", where)
PY

echo "== build checks"
bash scripts/check_build.sh

echo "== pytest"
# `pytest` (not `python -m pytest`) keeps the repository root off sys.path.
pytest -q -ra tests "$@"
