"""Loads the native kernels (esgd_cuda._C) and reports what they support.

A missing or broken extension is not an error: the optimizer falls back to the pure-PyTorch path,
and one warning at import says why, including the common case of Python importing an unbuilt source
checkout instead of the installed package (because the checkout's root is on sys.path ahead of
site-packages; the warning says which entry and how it got there). ESGD_CUDA_DISABLE_EXTENSION=1
skips loading altogether.
"""

import importlib
import os
import re
import sys
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch

__all__ = ["LOADED", "LOAD_ERROR", "DISABLED", "COMPILABLE", "fused_supported", "extension_info"]

SUPPORTED_DTYPES = frozenset({torch.float32, torch.float64, torch.float16, torch.bfloat16})

_DISABLE_VAR = "ESGD_CUDA_DISABLE_EXTENSION"
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_INPLACE_BUILD = "python setup.py build_ext --inplace"
# --use-pep517: pip 23's legacy `setup.py develop` path reruns pip with build isolation under
# setuptools >= 80, where torch is not importable.
_EDITABLE_INSTALL = "pip install -e . --no-build-isolation --use-pep517"


def _disabled() -> bool:
    return os.environ.get(_DISABLE_VAR, "").strip().lower() not in ("", "0", "false", "no", "off")


def _load() -> Tuple[Optional[Any], Optional[str]]:
    if _disabled():
        return None, f"disabled by {_DISABLE_VAR}={os.environ[_DISABLE_VAR]}"
    try:
        _C = importlib.import_module("._C", __package__)
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}._C":
            return None, f"{type(exc).__name__}: {exc}"
        return None, _missing_reason()
    except Exception as exc:  # an ABI mismatch surfaces as ImportError or OSError, or worse
        return None, f"{type(exc).__name__}: {exc}"
    stale = _stale_ops(torch.ops.esgd_cuda)
    if stale is not None:
        return None, f"{_C.__file__} loaded but {stale}"
    return _C, None


# The ops the package calls, each with the arguments added to it after it first appeared: an
# extension built from older sources loads, but would fail at the first call that passes them.
_ROUNDING = ("rounding_keys", "rounding_offsets")
_REQUIRED_OPS = {
    "esgd_update_": _ROUNDING + ("rounding_step",),
    "esgd_update_hz_": _ROUNDING + ("rounding_step",),
    "esgd_update_capturable_": _ROUNDING,
    "esgd_update_fd_": ("sources",) + _ROUNDING + ("rounding_step",),
    "esgd_rademacher_": (),
    "esgd_fd_perturb_": (),
}


def _stale_ops(namespace) -> Optional[str]:
    """What an extension's op namespace lacks of _REQUIRED_OPS, or None."""
    for op, arguments in _REQUIRED_OPS.items():
        if not hasattr(namespace, op):
            return f"did not register torch.ops.esgd_cuda.{op}"
        have = {a.name for a in getattr(namespace, op).default._schema.arguments}
        missing = [a for a in arguments if a not in have]
        if missing:
            return (f"registered torch.ops.esgd_cuda.{op} without its argument{'s' if len(missing) > 1 else ''} "
                    f"{', '.join(missing)} (built from older sources: rebuild it)")
    return None


def _source_checkout() -> Optional[str]:
    """The repository root when this package is being imported from its source checkout."""
    root = os.path.dirname(_PACKAGE_DIR)
    if os.path.isfile(os.path.join(root, "setup.py")) and os.path.isdir(os.path.join(root, "csrc")):
        return root
    return None


def _same_dir(entry: str, directory: str) -> bool:
    return os.path.realpath(os.path.abspath(entry or os.curdir)) == os.path.realpath(directory)


def _installed_elsewhere(checkout: str) -> Optional[str]:
    """Where an installed copy of the package lives, if sys.path holds one besides the checkout."""
    import importlib.machinery

    spec = importlib.machinery.PathFinder.find_spec(__package__, [e for e in sys.path if not _same_dir(e, checkout)])
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def _shadowing(checkout: str) -> str:
    """Which sys.path entry is the checkout and how it got there, with what to do about it.

    Python puts one entry first on sys.path, and which depends on how it was started, not on the
    working directory alone: the directory of the script it runs (wherever it was started from), or
    the current directory for `python -c`, `python -m` and the interactive prompt. Any other entry
    came from PYTHONPATH, a .pth file or code that edits sys.path."""
    index = next((i for i, e in enumerate(sys.path) if _same_dir(e, checkout)), None)
    if index == 0:
        main = sys.modules.get("__main__")
        argv0 = sys.argv[0] if sys.argv else ""
        # `python -m` runs its module with a __spec__; -c and the prompt leave argv[0] '-c' or ''.
        if getattr(main, "__spec__", None) is not None or argv0 in ("-c", ""):
            return (
                f"sys.path[0] is the current directory {checkout}, which Python puts first on sys.path for "
                f"`python -c`, `python -m` and the interactive prompt. Run from outside {checkout}"
            )
        if os.path.isfile(argv0) and _same_dir(os.path.dirname(os.path.abspath(argv0)), checkout):
            return (
                f"sys.path[0] is {checkout}, the directory of the script {argv0}, which Python puts first on "
                "sys.path whatever the current directory. Run scripts that live outside the checkout"
            )
    where = f"sys.path[{index}]" if index is not None else "an entry of sys.path"
    return (
        f"{where} is {checkout}, put there by PYTHONPATH, a .pth file or code that edits sys.path, ahead of "
        "site-packages. Take it off sys.path"
    )


def _missing_reason() -> str:
    checkout = _source_checkout()
    if checkout is None:
        return (
            f"{__package__}._C is not installed: the package was built without native kernels "
            "(ESGD_CUDA_BUILD=none, or the build failed)"
        )
    installed = _installed_elsewhere(checkout)
    if installed is not None:
        return (
            f"{__package__} was imported from the source checkout {_PACKAGE_DIR}, which has no compiled "
            f"kernels, instead of the installed package in {installed}: {_shadowing(checkout)}, or build "
            f"the kernels into the checkout with `{_INPLACE_BUILD}` there"
        )
    return (
        f"{__package__} was imported from the source checkout {_PACKAGE_DIR}, whose kernels have not "
        f"been built: build them in place with `{_INPLACE_BUILD}` (or `{_EDITABLE_INSTALL}`) in "
        f"{checkout}, or install with `pip install --no-build-isolation .` and run from outside the "
        "checkout"
    )


_C, LOAD_ERROR = _load()
LOADED: bool = _C is not None
DISABLED: bool = _disabled()
_BUILD: Dict[str, Any] = dict(_C.build_info()) if LOADED else {}


def _ops_compilable() -> bool:
    # The ops mutate Tensor[] arguments, which torch.compile's auto_functionalize rejects in older
    # torch (2.4): there a compiled step must take the pure-PyTorch path.
    if not LOADED:
        return False
    try:
        from torch._higher_order_ops.auto_functionalize import can_auto_functionalize
    except ImportError:  # private helper moved: assume a torch new enough
        return True
    try:
        return bool(can_auto_functionalize(torch.ops.esgd_cuda.esgd_update_.default))
    except Exception:
        return True


# Whether torch.compile can trace the native ops (fused=None falls back to pure PyTorch when not).
COMPILABLE: bool = _ops_compilable()


def _remedy() -> str:
    checkout = _source_checkout()
    if checkout is None:
        return "Reinstall with `pip install --no-build-isolation .` to build them, or set"
    if LOAD_ERROR is not None and "source checkout" in LOAD_ERROR:
        return "Set"  # the reason already says what to do
    return f"Rebuild them with `{_INPLACE_BUILD}` in {checkout}, or set"


if not LOADED and not DISABLED:
    warnings.warn(
        f"esgd_cuda: native kernels are not available ({LOAD_ERROR}); ESGD uses the pure-PyTorch "
        f"path. {_remedy()} {_DISABLE_VAR}=1 to silence this warning.",
        RuntimeWarning,
        stacklevel=2,
    )


def _parse_archs(spec: Optional[str]) -> List[str]:
    return [a for a in (spec or "").split(";") if a]


def _arch_runs(archs: List[str], major: int, minor: int) -> bool:
    # SASS runs on the same major version with an equal or newer minor version; PTX is JIT
    # compiled for any newer device.
    for arch in archs:
        match = re.fullmatch(r"(sm|compute)_(\d+)([a-z]?)", arch)
        if match is None:
            continue
        kind, num, suffix = match.group(1), int(match.group(2)), match.group(3)
        a_major, a_minor = divmod(num, 10)
        if kind == "sm" and a_major == major and a_minor <= minor and (not suffix or a_minor == minor):
            return True
        if kind == "compute" and not suffix and (a_major, a_minor) <= (major, minor):
            return True
    return False


_cuda_device_ok: Dict[int, bool] = {}


def _cuda_device_supported(index: Optional[int]) -> bool:
    if not _BUILD.get("cuda") or not torch.cuda.is_available():
        return False
    if index is None:
        index = torch.cuda.current_device()
    if index not in _cuda_device_ok:
        major, minor = torch.cuda.get_device_capability(index)
        _cuda_device_ok[index] = _arch_runs(_parse_archs(_BUILD.get("cuda_archs")), major, minor)
    return _cuda_device_ok[index]


def fused_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the fused op can update parameters of `dtype` on `device`."""
    if not LOADED or dtype not in SUPPORTED_DTYPES:
        return False
    device = torch.device(device)
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return _cuda_device_supported(device.index)
    return False


def extension_info() -> Dict[str, Any]:
    """What was built (kernels, CUDA archs and version, torch it was built against) and what runs."""
    cuda_devices = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(index)
            cuda_devices.append(
                {
                    "index": index,
                    "name": torch.cuda.get_device_name(index),
                    "capability": f"{major}.{minor}",
                    "fused": _cuda_device_supported(index),
                }
            )
    return {
        "loaded": LOADED,
        "load_error": LOAD_ERROR,
        "disabled": DISABLED,
        "path": getattr(_C, "__file__", None),
        "built": {
            "cpu": LOADED,
            "cuda": bool(_BUILD.get("cuda", False)),
            "cuda_version": _BUILD.get("cuda_version"),
            "cuda_archs": _parse_archs(_BUILD.get("cuda_archs")),
            "torch_version": _BUILD.get("torch_version"),
        },
        "runtime": {
            "torch_version": torch.__version__,
            "torch_cuda_version": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(),
            "cuda_devices": cuda_devices,
            "fused_cpu": fused_supported(torch.device("cpu"), torch.float32),
        },
    }
