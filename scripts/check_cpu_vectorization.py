"""Check that the CPU kernel's AVX2 clones are vectorized, by reading the built library's code.

The CPU update loops are plain scalar C++ that the compiler vectorizes (csrc/esgd_cpu.cpp): one
construct it cannot if-convert (a floating-point compare and select, say) silently leaves a loop
scalar, 4x slower, with every test still green. This reads the disassembly of the loops that run on
an AVX2 machine (objdump): every `range_*` AVX2 clone, except the float16 ones, which the F16C loops
(`range_f16_f16c`) replace at run time because the clone cannot convert halves in vector registers,
and those F16C loops; it fails unless each uses 256-bit (ymm) registers.
Usage: python scripts/check_cpu_vectorization.py LIBRARY.so
"""

import re
import shutil
import subprocess
import sys


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
    if scalar:
        print(f"check_cpu_vectorization: {len(scalar)} of {len(bodies)} AVX2 loops are not vectorized",
              file=sys.stderr)
        return 1
    print(f"check_cpu_vectorization: all {len(bodies)} AVX2 loops use 256-bit registers")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
