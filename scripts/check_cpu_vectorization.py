"""Check that the CPU kernel's AVX2 and AVX-512 clones are vectorized, by reading the built library's code.

The CPU update loops are plain scalar C++ that the compiler vectorizes (csrc/esgd_cpu.cpp) and clones
for AVX-512 and AVX2 (csrc/cpu_clones.h): one construct it cannot if-convert (a floating-point
compare and select, say) silently leaves a loop scalar, 4x slower, with every test still green. This
reads the disassembly of the loops that run on AVX2 and AVX-512 machines (objdump): every `range_*`
`.avx2` clone, which must use 256-bit (ymm) registers, and every x86-64-v4 (AVX-512) clone, which
must use 512-bit (zmm) registers (GCC 12 and newer build them; csrc/cpu_clones.h); except the float16 ones, which the F16C loops (`range_f16_f16c`, ymm)
replace at run time because the clones cannot convert halves in vector registers. It fails unless
every loop of EXPECTED_LOOPS is there in each kind of clone the library has (a loop left out would
otherwise go unchecked).
Usage: python scripts/check_cpu_vectorization.py LIBRARY.so
"""

import re
import shutil
import subprocess
import sys

# The update's loops per parameter type: plain, with Hz, the finite differences, and the finite
# differences that read theta from sources (the restore fused into the update).
UPDATE_VARIANTS = ("", "_hz", "_fd_forward", "_fd_central", "_fd_forward_source", "_fd_central_source")
# Each checked loop, as the (length-prefixed, E-terminated) piece of its mangled name: the update's
# clones (one .avx2 and one AVX-512 each) for float32, float64 and bfloat16 parameters with their
# default state and for float32 and bfloat16 parameters with bfloat16 state (_sbf16: stochastically
# rounded), the perturbation's for float32, float64 and bfloat16, and the F16C update loop per
# (state type, HzSource, from sources) instantiation.
UPDATE_TYPES = ("f32", "f64", "bf16", "f32_sbf16", "bf16_sbf16")
EXPECTED_LOOPS = tuple(
    f"{len(name)}{name}E"
    for name in [f"range_{t}{v}" for t in UPDATE_TYPES for v in UPDATE_VARIANTS]
    + [f"range_perturb_{t}_{k}" for t in ("f32", "f64", "bf16") for k in ("inplace", "from")]
) + tuple(f"14range_f16_f16cI{state}LNS_8HzSourceE{src}ELb{from_source}EEE"
          for state in ("f", "N3c108BFloat16E")
          for src, from_source in ((0, 0), (1, 0), (2, 0), (3, 0), (2, 1), (3, 1)))


# vfmadd231ps, vfnmsub213ss, vfmaddsub...: every x86 fused multiply-add mnemonic.
FMA = re.compile(r"\bvfn?m(add|sub)")
# The register a clone's vectorized loop must use, by the clone's symbol suffix.
CLONE_REGISTERS = {".avx2": "ymm", ".arch_x86_64_v4": "zmm"}


def vector_register(name: str):
    """The register `name`'s loop must use if it is a checked loop (None if it is not checked)."""
    if "range_f16_f16c" in name:
        return "ymm"
    if "range_" not in name or "range_f16E" in name or "range_f16_" in name:
        return None
    for suffix, register in CLONE_REGISTERS.items():
        if name.endswith(suffix):
            return register
    return None


def clone_bodies(disassembly: str) -> dict:
    """{symbol: lines} of the loops an AVX2 or AVX-512 machine runs (see vector_register)."""
    bodies, current = {}, None
    for line in disassembly.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if header:
            name = header.group(1)
            current = name if vector_register(name) else None
            if current:
                bodies[current] = []
        elif current is not None:
            bodies[current].append(line)
    return bodies


def unvectorized(bodies: dict) -> list:
    """The loops of `bodies` that never touch their clone's vector register."""
    return [name for name, lines in bodies.items() if not any(vector_register(name) in line for line in lines)]


def contracted(bodies: dict) -> list:
    """The loops of `bodies` with a fused multiply-add: contraction (setup.py passes
    -ffp-contract=off) would round the AVX-512 clone differently from the AVX2 and scalar ones."""
    return [name for name, lines in bodies.items() if any(FMA.search(line) for line in lines)]


def missing_loops(bodies: dict) -> list:
    """The EXPECTED_LOOPS that no checked loop of `bodies` is, per kind of clone the library has:
    'LOOP (.avx2)'. A build without AVX-512 clones (an older compiler) is not asked for them."""
    missing = [f"{loop} (F16C)" for loop in EXPECTED_LOOPS if "f16_f16c" in loop
               and not any(loop in name for name in bodies)]
    for suffix in CLONE_REGISTERS:
        if suffix != ".avx2" and not any(name.endswith(suffix) for name in bodies):
            continue
        missing += [f"{loop} ({suffix})" for loop in EXPECTED_LOOPS if "f16_f16c" not in loop
                    and not any(loop in name and name.endswith(suffix) for name in bodies)]
    return missing


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
        # Builds for other ISAs (or compilers without target_clones) have no clones to check.
        print("check_cpu_vectorization: no range_* AVX2/AVX-512 clones in this build; nothing to check")
        return 0
    scalar = unvectorized(bodies)
    for name in sorted(bodies):
        print(f"{'SCALAR' if name in scalar else 'ok    '} {name}")
    missing = missing_loops(bodies)
    for loop in missing:
        print(f"MISSING {loop}")
    fma = contracted(bodies)
    for name in fma:
        print(f"FMA     {name}")
    if scalar:
        print(f"check_cpu_vectorization: {len(scalar)} of {len(bodies)} AVX2/AVX-512 loops are not vectorized",
              file=sys.stderr)
        return 1
    if missing:
        print(f"check_cpu_vectorization: {len(missing)} expected loops are not in the library", file=sys.stderr)
        return 1
    if fma:
        print(f"check_cpu_vectorization: {len(fma)} loops use fused multiply-add (built without -ffp-contract=off?)",
              file=sys.stderr)
        return 1
    print(f"check_cpu_vectorization: all {len(bodies)} AVX2/AVX-512 loops use their clone's vector registers "
          "(ymm/zmm)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
