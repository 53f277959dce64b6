"""What every stage script of benchmarks/gpu_suite.sh shares: the import of the suite's own build,
the device check, and finding the CUDA tools.

A stage script runs as `python benchmarks/gpu/<stage>.py` from the repository root. It imports
esgd_cuda from the in-place build (`import_built`), does everything it can without a GPU (argument
checks, a tiny run of its workload on the CPU kernels), then calls `device_check`. In a rehearsal
(ESGD_SUITE_REHEARSAL=1, what CI runs) the script stops there with REHEARSAL_LINE, so a script
that cannot import the build, or that calls the ops wrongly, fails in CI instead of in the rare
session with a GPU.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REHEARSAL_LINE = "rehearsal: reached device check"


def stage_name() -> str:
    return Path(sys.argv[0]).stem


def fail(message: str) -> None:
    raise SystemExit(f"[{stage_name()}] FAILED: {message}")


def rehearsal() -> bool:
    return os.environ.get("ESGD_SUITE_REHEARSAL", "").strip() not in ("", "0")


def _require_in_place(esgd_cuda) -> Path:
    where = Path(esgd_cuda.__file__).resolve().parent
    if where != ROOT / "esgd_cuda":
        fail(f"imported esgd_cuda from {where}, not the suite's in-place build in {ROOT / 'esgd_cuda'}")
    return where


def import_built():
    """esgd_cuda from the repository the suite built in place, with its native kernels loaded."""
    # `python benchmarks/gpu/x.py` puts benchmarks/gpu first on sys.path, not the working directory,
    # and the suite builds in place without installing: the root must be put first explicitly, or
    # the import fails (GPU machine) or silently finds an installed copy (CI).
    sys.path.insert(0, str(ROOT))
    import esgd_cuda
    from esgd_cuda import _extension

    where = _require_in_place(esgd_cuda)
    if not _extension.LOADED:
        fail(f"the native kernels of {where} did not load: {_extension.LOAD_ERROR}")
    library = Path(_extension._C.__file__).resolve()
    if library.parent != where:
        fail(f"esgd_cuda._C came from {library}, not from {where}")
    built = esgd_cuda.extension_info()["built"]
    print(f"[{stage_name()}] esgd_cuda from {where} ({library.name}: cuda={built['cuda']}, "
          f"archs={','.join(built['cuda_archs']) or '-'})", flush=True)
    return esgd_cuda


def device_check(esgd_cuda, next_step: str):
    """Where a stage starts to need the GPU: ends a rehearsal; else the CUDA device to use."""
    import torch

    _require_in_place(esgd_cuda)
    if rehearsal():
        print(f"{REHEARSAL_LINE} ({stage_name()}; next: {next_step})", flush=True)
        raise SystemExit(0)
    if not torch.cuda.is_available():
        fail(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device")
    device = torch.device("cuda")
    if not esgd_cuda._extension.fused_supported(device, torch.float32):
        major, minor = torch.cuda.get_device_capability(device)
        fail(f"the build's CUDA kernels do not run on {torch.cuda.get_device_name(device)} "
             f"(sm_{major}{minor}): {esgd_cuda.extension_info()['built']}")
    return device


def find_tool(name: str) -> str | None:
    """A CUDA tool on PATH, in CUDA_HOME/bin or /usr/local/cuda/bin, or (ncu) under /opt/nvidia."""
    found = shutil.which(name)
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.access(os.path.join(home, "bin", name), os.X_OK):
            return os.path.join(home, "bin", name)
    installed = sorted(glob.glob(f"/opt/nvidia/nsight-compute/*/{name}"))
    return installed[-1] if installed else None
