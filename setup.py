"""Build and install esgd_cuda.

ESGD_CUDA_BUILD selects what is compiled:
  auto (default)  CUDA + CPU kernels when torch is a CUDA build and a CUDA toolkit is found (a
                  visible GPU is not needed), otherwise the CPU kernels only.
  cuda            CUDA + CPU kernels, or fail.
  cpu             CPU kernels only.
  none            no extension: the package runs on its pure-PyTorch path.
Without a visible GPU and without TORCH_CUDA_ARCH_LIST, device code is built for
ESGD_DEFAULT_ARCHS below. MAX_JOBS limits parallel compilation as usual.
"""

import glob
import os
import re
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
ESGD_DEFAULT_ARCHS = "8.0;9.0+PTX"
MODES = ("auto", "cuda", "cpu", "none")


def _log(message):
    print(f"esgd_cuda setup: {message}", file=sys.stderr)


def _is_toolkit(root):
    return bool(root) and os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isfile(
        os.path.join(root, "include", "cuda_runtime.h")
    )


def _nvcc_wrapper_target(path):
    """The toolkit a wrapper script such as `exec /usr/local/cuda-13.0/bin/nvcc "$@"` points at."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    match = re.search(rb"(/\S+)/bin/nvcc\b", head)
    return match.group(1).decode() if match else None


def _find_cuda_home():
    # torch guesses CUDA_HOME from dirname(dirname(which nvcc)), which is wrong when nvcc on PATH
    # is a wrapper script in /usr/local/bin; only accept roots that hold a real toolkit.
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var] if _is_toolkit(os.environ[var]) else None
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        candidates.append(_nvcc_wrapper_target(real))
    candidates.append("/usr/local/cuda")
    for root in candidates:
        if _is_toolkit(root):
            return root
    return None


def _mode():
    mode = os.environ.get("ESGD_CUDA_BUILD", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise SystemExit(f"ESGD_CUDA_BUILD={mode!r} is not one of {', '.join(MODES)}")
    return mode


def _built_archs(cpp_extension):
    """The real targets, e.g. "sm_80;sm_90;compute_90", recorded so the loader can tell whether a
    device can run the kernels. Derived from the flags torch will pass to nvcc."""
    try:
        flags = cpp_extension._get_cuda_arch_flags()
    except Exception as exc:  # private helper: fall back to the user's spelling
        _log(f"could not resolve CUDA arch flags ({exc}); recording TORCH_CUDA_ARCH_LIST as is")
        return os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    archs = []
    for flag in flags:
        for code in re.findall(r",code=\[?([\w,]+)", flag):
            for arch in code.split(","):
                if arch not in archs:
                    archs.append(arch)
    return ";".join(archs)


def get_extensions():
    mode = _mode()
    if mode == "none":
        _log("ESGD_CUDA_BUILD=none: installing the pure-PyTorch package without native kernels")
        return [], {}

    import torch

    cuda_home = _find_cuda_home()
    if cuda_home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = cuda_home
    from torch.utils import cpp_extension

    if cuda_home:
        cpp_extension.CUDA_HOME = cuda_home

    torch_cuda = torch.version.cuda is not None
    if mode == "cuda":
        if not torch_cuda:
            raise SystemExit(f"ESGD_CUDA_BUILD=cuda, but torch {torch.__version__} is a CPU build")
        if not cuda_home:
            raise SystemExit("ESGD_CUDA_BUILD=cuda, but no CUDA toolkit was found (set CUDA_HOME)")
    use_cuda = mode == "cuda" or (mode == "auto" and torch_cuda and cuda_home is not None)

    if use_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = ESGD_DEFAULT_ARCHS
    archs = _built_archs(cpp_extension) if use_cuda else ""

    torch_version = torch.__version__.split("+")[0]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    define_macros = [("ESGD_TORCH_VERSION", f'"{torch.__version__}"')]
    # The C++ standard is left to torch.utils.cpp_extension: torch 2.4 wants C++17, newer C++20.
    # -fno-math-errno lets the compiler vectorize sqrt; it only drops the errno side effect, every
    # result stays IEEE-exact.
    # -ffp-contract=off: the CPU loops' AVX-512 clone (csrc/cpu_clones.h) has FMA, and contracting
    # a*b + c would round differently from the AVX2 and scalar clones and the PyTorch path; without
    # contraction every clone computes the same bits.
    cxx_flags = ["-O3", "-fno-math-errno", "-ffp-contract=off"]
    # at::parallel_for is a header template whose OpenMP backend is a `#pragma omp parallel`
    # compiled into the extension: without -fopenmp it silently runs on one thread. Compile flag
    # only: the GOMP symbols bind to the OpenMP runtime libtorch_cpu already loads.
    if sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
    # -lineinfo only maps SASS to source lines for profilers; no fast-math, which would change
    # results relative to the CPU kernel and the PyTorch path.
    nvcc_flags = ["-O3", "-lineinfo"]
    if use_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "*.cu")))
        define_macros += [("ESGD_WITH_CUDA", None), ("ESGD_CUDA_ARCHS", f'"{archs}"')]
        extension = cpp_extension.CUDAExtension(
            name="esgd_cuda._C",
            sources=sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        )
        _log(
            f"building CPU + CUDA kernels against torch {torch_version} (CUDA {torch.version.cuda}), "
            f"toolkit {cuda_home}, archs {archs}"
        )
    else:
        why = {
            "cpu": "ESGD_CUDA_BUILD=cpu",
            "auto": "torch is a CPU build" if not torch_cuda else "no CUDA toolkit found",
        }[mode]
        extension = cpp_extension.CppExtension(
            name="esgd_cuda._C",
            sources=sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
        )
        _log(f"building CPU kernels only ({why}) against torch {torch_version}")
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
    return [extension], cmdclass


# The versions scripts/setup.sh installs and the examples and benchmarks are tested with (torch 2.14.1,
# Python 3.11). timm's torchvision is left to pip here: it must match the installed torch.
EXTRAS_REQUIRE = {
    "examples": ["lightning==2.6.6", "transformers==5.24.0", "accelerate==1.15.0", "timm==1.0.31",
                 "scikit-learn"],
    "bench": ["pytorch-optimizer==4.1.0", "torchzero==0.4.4", "scikit-learn", "matplotlib", "tqdm"],
}

ext_modules, cmdclass = get_extensions()

setup(
    name="esgd_cuda",
    version="0.1.0",
    description="ESGD-M optimizer for PyTorch with fused CPU and CUDA kernels",
    packages=["esgd_cuda"],
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    extras_require=EXTRAS_REQUIRE,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
