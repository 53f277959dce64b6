"""scripts/check_cpu_vectorization.py: the parser on hand-written disassembly, and the built library."""

import importlib.util
import shutil
from pathlib import Path

import pytest

import esgd_cuda
from esgd_cuda import _extension

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "check_cpu_vectorization.py"
spec = importlib.util.spec_from_file_location("check_cpu_vectorization", SCRIPT)
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)

DISASSEMBLY = """
0000000000062530 <_ZN4esgd12_GLOBAL__N_19range_f32EPfPKfS1_S1_S3_S3_lRKNS_6CoeffsIfEE.avx2>:
   62530:	vmovups (%rdi,%rax,1),%ymm0
   62535:	vsqrtps %ymm1,%ymm1

00000000000644c0 <_ZN4esgd12_GLOBAL__N_112range_f32_hzEPfPKfS1_S1_S3_S3_lRKNS_6CoeffsIfEE.avx2>:
   644c0:	vmovss (%rdi,%rax,4),%xmm0
   644c5:	vsqrtss %xmm1,%xmm1,%xmm1

0000000000064700 <_ZN4esgd12_GLOBAL__N_19range_f16EPN3c104HalfEPKS2_PfS6_S5_S5_lRKNS_6CoeffsIfEE.avx2>:
   64700:	vmovss (%rdi,%rax,4),%xmm0

0000000000064900 <_ZN4esgd12_GLOBAL__N_114range_f16_f16cILNS_8HzSourceE0EEEvPN3c104HalfEPKS4_PfS8_S7_S7_lRKNS_6CoeffsIfEE>:
   64900:	vcvtph2ps %xmm0,%ymm0

0000000000064a00 <_ZN4esgd12_GLOBAL__N_19range_f32EPfPKfS1_S1_S3_S3_lRKNS_6CoeffsIfEE.default>:
   64a00:	movss (%rdi,%rax,4),%xmm0

0000000000064c00 <_ZN4esgd12_GLOBAL__N_19range_f32EPfPKfS1_S1_S3_S3_lRKNS_6CoeffsIfEE.arch_x86_64_v4>:
   64c00:	vmovups (%rdi,%rax,1),%zmm0
   64c05:	vsqrtps %zmm1,%zmm1

0000000000064e00 <_ZN4esgd12_GLOBAL__N_112range_f32_hzEPfPKfS1_S1_S3_S3_lRKNS_6CoeffsIfEE.arch_x86_64_v4>:
   64e00:	vmovups (%rdi,%rax,1),%ymm0
   64e05:	vsqrtps %ymm1,%ymm1
"""


def test_parser_finds_the_loops_avx2_and_avx512_machines_run():
    bodies = check.clone_bodies(DISASSEMBLY)
    names = sorted(n.split("_GLOBAL__N_1")[1] for n in bodies)
    # The scalar .default clone and the float16 clone (replaced by the F16C loop) are not checked.
    assert len(bodies) == 5, names
    scalar = sorted(n.split("_GLOBAL__N_1")[1] for n in check.unvectorized(bodies))
    # An AVX2 clone left scalar, and an AVX-512 clone that only reaches 256-bit registers (half its
    # width) are both reported; the F16C loop's ymm and the good clones pass.
    assert len(scalar) == 2, scalar
    assert all(n.startswith("12range_f32_hz") for n in scalar), scalar
    assert sorted(n.rsplit(".", 1)[1] for n in scalar) == ["arch_x86_64_v4", "avx2"]


def test_a_fused_multiply_add_is_reported():
    """-ffp-contract=off keeps FMA out of the clones: one would round differently from the others."""
    bodies = check.clone_bodies(DISASSEMBLY)
    assert check.contracted(bodies) == []
    name = next(n for n in bodies if n.endswith(".arch_x86_64_v4") and "range_f32E" in n)
    bodies[name] = bodies[name] + ["   64c0a:\tvfmadd231ps %zmm2,%zmm1,%zmm0"]
    other = next(n for n in bodies if n.endswith(".avx2") and "range_f32E" in n)
    bodies[other] = bodies[other] + ["   62540:\tvfnmsub213ps %ymm2,%ymm1,%ymm0"]
    assert sorted(check.contracted(bodies)) == sorted([name, other])


def test_every_expected_loop_is_required():
    """A loop missing from the library (left out of the clones, renamed) is reported, by name."""
    # Update loops: 3 parameter types with their default state and 2 with bf16 state (_sbf16), 6
    # variants each; 3 perturbation types x 2; the F16C loop for 2 state types x 6 variants.
    assert len(check.EXPECTED_LOOPS) == 5 * 6 + 3 * 2 + 2 * 6
    assert "27range_f32_fd_forward_sourceE" in check.EXPECTED_LOOPS
    assert "34range_bf16_sbf16_fd_central_sourceE" in check.EXPECTED_LOOPS
    assert "14range_f16_f16cIfLNS_8HzSourceE3ELb1EEE" in check.EXPECTED_LOOPS
    assert "14range_f16_f16cIN3c108BFloat16ELNS_8HzSourceE3ELb1EEE" in check.EXPECTED_LOOPS
    names = [f"_ZN4esgd12_GLOBAL__N_1{loop}PfPKfS3_S1_S1_S3_S3_lRKNS_6CoeffsIfEE{suffix}"
             for loop in check.EXPECTED_LOOPS if "f16_f16c" not in loop for suffix in (".avx2", ".arch_x86_64_v4")]
    names += [f"_ZN4esgd12_GLOBAL__N_1{loop}PN3c104HalfEPKS4_" for loop in check.EXPECTED_LOOPS if "f16_f16c" in loop]
    assert check.missing_loops(dict.fromkeys(names, [])) == []
    without = [n for n in names if "range_bf16_fd_central_source" not in n]
    assert check.missing_loops(dict.fromkeys(without, [])) == ["28range_bf16_fd_central_sourceE (.avx2)",
                                                               "28range_bf16_fd_central_sourceE (.arch_x86_64_v4)"]
    # A build without AVX-512 clones (GCC < 12) is asked for the AVX2 ones alone.
    avx2_only = [n for n in names if not n.endswith(".arch_x86_64_v4")]
    assert check.missing_loops(dict.fromkeys(avx2_only, [])) == []
    # Once there are AVX-512 clones, each is required: the AVX2 one does not stand in for it.
    without = [n for n in names if not ("range_f32_hzE" in n and n.endswith(".arch_x86_64_v4"))]
    assert check.missing_loops(dict.fromkeys(without, [])) == ["12range_f32_hzE (.arch_x86_64_v4)"]
    # The bf16-state loops are not stood in for by the default state's, nor the reverse.
    without = [n for n in names if not ("range_f32_sbf16_hzE" in n and n.endswith(".avx2"))]
    assert check.missing_loops(dict.fromkeys(without, [])) == ["18range_f32_sbf16_hzE (.avx2)"]
    # The F16C loop of one instantiation does not stand in for another's.
    without = [n for n in names if "IfLNS_8HzSourceE2ELb1E" not in n]
    assert check.missing_loops(dict.fromkeys(without, [])) == ["14range_f16_f16cIfLNS_8HzSourceE2ELb1EEE (F16C)"]


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) is not installed")
@pytest.mark.skipif(not _extension.LOADED, reason="the native extension is not loaded")
def test_the_built_cpu_loops_are_vectorized(capsys):
    path = esgd_cuda.extension_info()["path"]
    assert check.main(["check_cpu_vectorization.py", path]) == 0, capsys.readouterr()
