"""Compile the CUDA kernels for one architecture and check their code, without a GPU.

Runs `nvcc --cubin --resource-usage --keep` on each CUDA source of csrc/ (device code only,
seconds rather than minutes), then reads ptxas's report and the PTX for every instantiation of
every kernel:
  - no stack frame and no spill stores or loads: a spill turns a memory-bound kernel into one
    that also waits on local memory;
  - at most MAX_REGISTERS registers per thread, so two 512-thread blocks fit one SM's register
    file (the occupancy every kernel's __launch_bounds__ asks for);
  - at least as many 16-byte global loads and stores (ld/st.global.v4 of 32-bit or .v2 of 64-bit
    words) as one iteration of the aligned vector path needs, in every kernel, and as many 8-byte
    ones (.v2 of 32-bit, .v4 of 16-bit or one 64-bit word) where a list's vector is 8 bytes (the
    bfloat16 state of fp32 parameters);
  - every parameter dtype (fp32, fp16, bf16, fp64) for every variant, each with its state dtypes
    (fp32 or bf16, fp64 for fp64 parameters): the update with 4 lists (plain) and 5 (Hz), the
    finite-difference update with 5 (forward) and 6 (central), and from sources (theta read from
    the saved copy, the parameters only written) with 6 (forward) and 7 (central), the probe fill,
    and the perturbation with and without saving a backup.
Prints one line per kernel and exits 1 naming what failed.
Usage: python scripts/check_kernel_resources.py [--arch sm_90] [--nvcc PATH]
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from typing import Dict, Iterator, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("esgd_cuda.cu", "probes_cuda.cu")
# Kernel template -> its variants: the update kernels' list depth, the perturbation's bool save
# (0/1), and 0 for the probe fill, which has no such argument.
KERNELS = {
    "esgd_multi_tensor_kernel": (4, 5),
    "esgd_fd_update_kernel": (5, 6),
    "esgd_fd_update_from_source_kernel": (6, 7),
    "esgd_rademacher_kernel": (0,),
    "esgd_fd_perturb_kernel": (0, 1),
}
# 65536 registers per SM on sm_70..sm_100 / (2 blocks x 512 threads).
MAX_REGISTERS = 64
# Itanium-mangled template arguments: <P, S[, int Depth | bool kSave]>, S the state's storage type
# (update kernels) or the math type (probe kernels).
PARAM_TYPES = {"N3c104HalfE": "fp16", "N3c108BFloat16E": "bf16", "f": "fp32", "d": "fp64"}
STATE_TYPES = {"f": "fp32", "d": "fp64", "N3c108BFloat16E": "bf16"}
UPDATE_KERNELS = ("esgd_multi_tensor_kernel", "esgd_fd_update_kernel", "esgd_fd_update_from_source_kernel")
Key = Tuple[str, str, str, int]  # (kernel, parameter dtype, state dtype, variant)


def state_types(kernel: str, param: str) -> Tuple[str, ...]:
    """The state dtypes a kernel is instantiated with for a parameter dtype."""
    if param == "fp64":
        return ("fp64",)
    return ("fp32", "bf16") if kernel in UPDATE_KERNELS else ("fp32",)


EXPECTED = {(k, p, st, v) for k, variants in KERNELS.items() for p in PARAM_TYPES.values()
            for st in state_types(k, p) for v in variants}

_FUNCTION = re.compile(r"ptxas info\s*:\s*(?:Compiling entry function|Function properties for) '?([^'\s]+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"ptxas info\s*:\s*Used (\d+) registers")
# Kernels (.entry) and device functions (.func, whose lines must not count for the kernel before).
_ENTRY = re.compile(r"^\s*(?:\.(?:visible|weak|extern)\s+)*\.(?:entry|func)\s+(?:\([^)]*\)\s*)?([^\s(]+)\s*\(")
_WIDE = re.compile(r"^\s*(?:@!?%p\d+\s+)?(ld|st)\.global(?:\.nc)?(?:\.L1::\S+)?\.(?:v4\.[bfsu]32|v2\.[bfsu]64)\b")
_HALF_WIDE = re.compile(
    r"^\s*(?:@!?%p\d+\s+)?(ld|st)\.global(?:\.nc)?(?:\.L1::\S+)?\.(?:v2\.[bfsu]32|v4\.[bfsu]16|[bsu]64)\b")
# A class type already named earlier in the symbol is mangled as a substitution: the state type of a
# bf16 kernel with bf16 state is "S<n>_" (the parameter's type again), c10::BFloat16 after c10::Half is
# "NS<n>_8BFloat16E" (the c10 namespace again); n depends on the enclosing namespaces.
_SIGNATURE = re.compile(r"\d+(" + "|".join(KERNELS) + r")I(N3c104HalfE|N3c108BFloat16E|f|d)"
                        r"(N3c108BFloat16E|NS[0-9A-Z]*_8BFloat16E|S[0-9A-Z]*_|f|d)(?:L[ib](\d+)E)?E")


def label(key: Key) -> str:
    kernel, dtype, state, variant = key
    if kernel == "esgd_rademacher_kernel":
        return f"{kernel}<{dtype}>"
    if kernel == "esgd_fd_perturb_kernel":
        return f"{kernel}<{dtype}, {'save' if variant else 'restore'}>"
    return f"{kernel}<{dtype}, {state} state, depth {variant}>"


def kernel_signature(mangled: str) -> Key:
    """(kernel, parameter dtype, state dtype, variant) of a mangled instantiation of one of KERNELS."""
    match = _SIGNATURE.search(mangled)
    if match is None:
        raise ValueError(f"unrecognised kernel instantiation {mangled!r}")
    kernel, param, state, variant = match.groups()
    if re.fullmatch(r"S[0-9A-Z]*_", state):
        if param not in ("N3c108BFloat16E", "N3c104HalfE"):
            raise ValueError(f"unrecognised kernel instantiation {mangled!r}")
        state = param  # the same class type as the parameter's
    elif state.endswith("8BFloat16E"):
        state = "N3c108BFloat16E"
    if state not in STATE_TYPES:
        raise ValueError(f"unrecognised kernel instantiation {mangled!r}")
    return kernel, PARAM_TYPES[param], STATE_TYPES[state], int(variant or 0)


def _is_ours(name: str) -> bool:
    return any(kernel in name for kernel in KERNELS)


def kernel_lines(text: str, header: "re.Pattern[str]") -> Iterator[Tuple[Key, Optional[str]]]:
    """(kernel, None) where one of our kernels' sections starts (a `header` match), then
    (kernel, line) for each line of it; lines of other functions are dropped."""
    current = None
    for line in text.splitlines():
        match = header.search(line)
        if match:
            name = match.group(1)
            current = kernel_signature(name) if _is_ours(name) else None
            if current is not None:
                yield current, None
        elif current is not None:
            yield current, line


def parse_resource_usage(text: str) -> Dict[Key, Dict[str, int]]:
    """Per kernel: registers, stack, spill_stores, spill_loads, from ptxas -v style output."""
    kernels: Dict[Key, Dict[str, int]] = {}
    for key, line in kernel_lines(text, _FUNCTION):
        usage = kernels.setdefault(key, {})
        frame = _FRAME.search(line) if line else None
        if frame:
            stack, stores, loads = map(int, frame.groups())
            usage.update(stack=stack, spill_stores=stores, spill_loads=loads)
        used = _USED.search(line) if line else None
        if used:
            usage["registers"] = int(used.group(1))
    return kernels


ACCESSES = ("wide_loads", "wide_stores", "half_wide_loads", "half_wide_stores")


def parse_ptx_vector_accesses(ptx: str) -> Dict[Key, Dict[str, int]]:
    """Per kernel: how many 16-byte global loads (wide_loads) and stores (wide_stores), and 8-byte
    ones (half_wide_loads, half_wide_stores), its PTX has."""
    kernels: Dict[Key, Dict[str, int]] = {}
    for key, line in kernel_lines(ptx, _ENTRY):
        counts = kernels.setdefault(key, dict.fromkeys(ACCESSES, 0))
        if not line:
            continue
        wide = _WIDE.search(line)
        half = None if wide else _HALF_WIDE.search(line)
        if wide:
            counts["wide_loads" if wide.group(1) == "ld" else "wide_stores"] += 1
        elif half:
            counts["half_wide_loads" if half.group(1) == "ld" else "half_wide_stores"] += 1
    return kernels


def expected_wide_accesses(key: Key) -> Tuple[int, int, int, int]:
    """16-byte (loads, stores) and 8-byte (loads, stores) one vector-path iteration needs. Update
    kernels: one 16-byte access per parameter-typed list (p, g and the depth's extra lists read; p
    written), and per state list (m, d read; m[, d] written) one, or two for 16-bit parameters,
    whose eight elements of fp32 state span 32 bytes, or one 8-byte access for fp32 parameters with
    bf16 state (four elements of 2 bytes); the update from sources reads the source instead of p.
    Probe fill: one store. Perturbation: one load (p, or the backup), one store of p, one more of
    the backup when saving."""
    kernel, dtype, state, variant = key
    if kernel == "esgd_rademacher_kernel":
        return 0, 1, 0, 0
    if kernel == "esgd_fd_perturb_kernel":
        return 1, 2 if variant else 1, 0, 0
    # Bytes of state per thread and list: 16 / sizeof(P) elements of sizeof(state).
    param_size = {"fp16": 2, "bf16": 2, "fp32": 4, "fp64": 8}[dtype]
    state_bytes = (16 // param_size) * {"fp32": 4, "bf16": 2, "fp64": 8}[state]
    state_words, state_halves = (state_bytes // 16, 0) if state_bytes >= 16 else (0, 1)
    # The parameter-typed lists read: all but m and d, less p where the source stands in for it.
    param_reads = variant - 2 - (1 if kernel == "esgd_fd_update_from_source_kernel" else 0)
    state_writes = 1 if variant == 4 and kernel == "esgd_multi_tensor_kernel" else 2
    return (param_reads + 2 * state_words, 1 + state_writes * state_words,
            2 * state_halves, state_writes * state_halves)


def problems(kernels: Dict[Key, Dict[str, int]]) -> List[str]:
    found = []
    for key in sorted(EXPECTED - set(kernels)):
        found.append(f"no {label(key)} in the ptxas report")
    for key, usage in sorted(kernels.items()):
        name = label(key)
        missing = {"registers", "stack", "spill_stores", "spill_loads"} - set(usage)
        if missing:
            found.append(f"{name}: ptxas did not report {', '.join(sorted(missing))}")
            continue
        if usage["stack"] or usage["spill_stores"] or usage["spill_loads"]:
            found.append(
                f"{name}: {usage['stack']} bytes stack frame, {usage['spill_stores']} bytes spill "
                f"stores, {usage['spill_loads']} bytes spill loads (want none)"
            )
        for access, want in zip(ACCESSES, expected_wide_accesses(key)):
            if access in usage and usage[access] < want:
                size = "8-byte" if access.startswith("half") else "16-byte"
                found.append(f"{name}: {usage[access]} {size} global {access.split('_')[-1]} in the "
                             f"PTX, want at least {want} (a list left the vector path)")
        if usage["registers"] > MAX_REGISTERS:
            found.append(f"{name}: {usage['registers']} registers (at most {MAX_REGISTERS} for two "
                         "512-thread blocks per SM)")
    return found


def compile_report(nvcc: str, arch: str) -> Tuple[str, str]:
    """(ptxas's resource report, the PTX) of the CUDA sources of csrc/ compiled for `arch`."""
    import torch

    torch_include = os.path.join(os.path.dirname(torch.__file__), "include")
    cuda_home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    includes = [torch_include, os.path.join(torch_include, "torch", "csrc", "api", "include"),
                os.path.join(cuda_home, "include"), sysconfig.get_paths()["include"]]
    # The flags torch.utils.cpp_extension passes for every CUDA source, plus this project's.
    base = [nvcc, "--cubin", f"-arch={arch}", "--resource-usage", "--keep", "-O3",
            "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
            "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
            "--expt-relaxed-constexpr", "-DTORCH_API_INCLUDE_EXTENSION_H",
            "-DTORCH_EXTENSION_NAME=_C", "-DESGD_WITH_CUDA"]
    base += [f"-I{path}" for path in includes]
    reports, ptxs = [], []
    for source in SOURCES:
        report, ptx = _compile_one(base, os.path.join(ROOT, "csrc", source))
        reports.append(report)
        ptxs.append(ptx)
    return "\n".join(reports), "\n".join(ptxs)


def _compile_one(base: List[str], source: str) -> Tuple[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "kernels.cubin")
        # Newer torch headers need C++20 and torch 2.4's were written for C++17: take the first
        # standard the installed headers compile with, as cpp_extension would.
        errors = []
        for std in ("-std=c++20", "-std=c++17"):
            cmd = base + [std, f"--keep-dir={tmp}", source, "-o", out]
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode == 0:
                ptx_files = [f for f in os.listdir(tmp) if f.endswith(".ptx")]
                if len(ptx_files) != 1:
                    raise RuntimeError(f"expected one .ptx file from nvcc --keep, found {ptx_files}")
                with open(os.path.join(tmp, ptx_files[0])) as f:
                    return run.stdout + run.stderr, f.read()
            errors.append(f"$ {' '.join(cmd)}\n{(run.stdout + run.stderr)[-3000:]}")
    raise RuntimeError(f"nvcc failed to compile {source}:\n" + "\n".join(errors))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90", help="real architecture, e.g. sm_90 (default)")
    parser.add_argument("--nvcc", default=None, help="nvcc to use (default: $CUDA_HOME/bin/nvcc)")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"sm_\d+a?", args.arch):
        parser.error(f"--arch must look like sm_90, got {args.arch!r}")
    nvcc = args.nvcc
    if nvcc is None and os.environ.get("CUDA_HOME"):
        nvcc = os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
    nvcc = nvcc or shutil.which("nvcc")
    if not nvcc or not os.path.isfile(nvcc):
        parser.error("no nvcc found: set CUDA_HOME or pass --nvcc")
    report, ptx = compile_report(nvcc, args.arch)
    kernels = parse_resource_usage(report)
    for key, accesses in parse_ptx_vector_accesses(ptx).items():
        kernels.setdefault(key, {}).update(accesses)
    for key, usage in sorted(kernels.items()):
        print(f"{args.arch} {label(key)}: {usage.get('registers')} registers, "
              f"{usage.get('stack')} B stack, {usage.get('spill_stores')}/{usage.get('spill_loads')} "
              f"B spill stores/loads, {usage.get('wide_loads')}/{usage.get('wide_stores')} "
              f"16-byte and {usage.get('half_wide_loads')}/{usage.get('half_wide_stores')} 8-byte loads/stores")
    found = problems(kernels)
    for problem in found:
        print(f"check_kernel_resources: {problem}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
