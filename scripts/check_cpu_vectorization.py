"""Check that the CPU kernel's AVX2 clones are vectorized, by reading the built library's code.

The CPU update loops are plain scalar C++ that the compiler vectorizes (csrc/esgd_cpu.cpp): one
construct it cannot if-convert (a floating-point compare and select, say) silently leaves a loop
scalar, 4x slower, with every test still green. This reads the disassembly of the loops that run on
an AVX2 machine (objdump): every `range_*` AVX2 clone, except the float16 ones, which the F16C loops
(`range_f16_f16c`) replace at run time because the clone cannot convert halves in vector registers,
and those F16C loops; it fails unless each uses 256-bit (ymm) registers, and unless every loop of
EXPECTED_LOOPS is there (a loop left out of the clones would otherwise go unchecked).
Usage: python scripts/check_cpu_vectorization.py LIBRARY.so
"""

import re
import shutil
import subprocess
import sys

# The update's loops per parameter type: plain, with Hz, the finite differences, and the finite
# differences that read theta from sources (the restore fused into the update).
UPDATE_VARIANTS = ("", "_hz", "_fd_forward", "_fd_central", "_fd_forward_source", "_fd_central_source")
# Each loop an AVX2 build runs, as the (length-prefixed, E-terminated) piece of its mangled name:
# the update's AVX2 clones for float32, float64 and bfloat16 parameters with their default state and
# for float32 and bfloat16 parameters with bfloat16 state (_sbf16: stochastically rounded), the
# perturbation's for float32, float64 and bfloat16, and the F16C update loop per (state type,
# HzSource, from sources) instantiation.
UPDATE_TYPES = ("f32", "f64", "bf16", "f32_sbf16", "bf16_sbf16")
EXPECTED_LOOPS = tuple(
    f"{len(name)}{name}E"
    for name in [f"range_{t}{v}" for t in UPDATE_TYPES for v in UPDATE_VARIANTS]
    + [f"range_perturb_{t}_{k}" for t in ("f32", "f64", "bf16") for k in ("inplace", "from")]
) + tuple(f"14range_f16_f16cI{state}LNS_8HzSourceE{src}ELb{from_source}EEE"
          for state in ("f", "N3c108BFloat16E")
          for src, from_source in ((0, 0), (1, 0), (2, 0), (3, 0), (2, 1), (3, 1)))


def runs_on_avx2(name: str) -> bool:
    if "range_f16_f16c" in name:
        return True
    return "range_" in name and name.endswith(".avx2") and "range_f16E" not in name and "range_f16_" not in name


def clone_bodies(disassembly: str) -> dict:
    """{symbol: lines} of the loops an AVX2 machine runs (see runs_on_avx2)."""
    bodies, current = {}, None
    for line in disassembly.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if header:
            name = header.group(1)
            current = name if runs_on_avx2(name) else None
            if current:
                bodies[current] = []
        elif current is not None:
            bodies[current].append(line)
    return bodies


def missing_loops(bodies: dict) -> list:
    """The EXPECTED_LOOPS that no checked loop of `bodies` is."""
    return [loop for loop in EXPECTED_LOOPS if not any(loop in name for name in bodies)]


def main(argv) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    if shutil.which("objdump") is None:
        print("check_cpu_vectorization: objdump not found (binutils); cannot check", file=sys.stderr)
        return 1
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", argv[1]], capture_output=True, text=True,
                          check=True).stdout
    bodies = clone_bodies(text)
    if not bodies:
        # Builds for other ISAs (or compilers without target_clones) have no AVX2 clones to check.
        print("check_cpu_vectorization: no range_*.avx2 clones in this build; nothing to check")
        return 0
    scalar = [name for name, lines in bodies.items() if not any("ymm" in line for line in lines)]
    for name in sorted(bodies):
        print(f"{'SCALAR' if name in scalar else 'ok    '} {name}")
    missing = missing_loops(bodies)
    for loop in missing:
        print(f"MISSING {loop}")
    if scalar:
        print(f"check_cpu_vectorization: {len(scalar)} of {len(bodies)} AVX2 loops are not vectorized",
              file=sys.stderr)
        return 1
    if missing:
        print(f"check_cpu_vectorization: {len(missing)} of the {len(EXPECTED_LOOPS)} expected AVX2 loops are "
              "not in the library", file=sys.stderr)
        return 1
    print(f"check_cpu_vectorization: all {len(bodies)} AVX2 loops use 256-bit registers")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
