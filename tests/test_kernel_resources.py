"""scripts/check_kernel_resources.py reads ptxas's report correctly and flags what it must.

The compile itself runs in scripts/check_build.sh (CI, where nvcc is present); these tests feed the
parser hand-written ptxas output, so they need neither nvcc nor a GPU.
"""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "check_kernel_resources.py"


@pytest.fixture(scope="module")
def checker():
    spec = importlib.util.spec_from_file_location("check_kernel_resources", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MANGLED = {"fp16": "N3c104HalfE", "bf16": "N3c108BFloat16E", "fp32": "f", "fp64": "d"}
UPDATE = "esgd_multi_tensor_kernel"
FROM_SOURCE = "esgd_fd_update_from_source_kernel"


def mangled(key):
    """A mangled name shaped like nvcc's for (kernel, dtype, variant)."""
    kernel, dtype, variant = key
    state = "d" if dtype == "fp64" else "f"
    extra = {"esgd_rademacher_kernel": "", "esgd_fd_perturb_kernel": f"Lb{variant}E"}.get(kernel, f"Li{variant}E")
    return (f"_ZN4esgd45_GLOBAL__N__e6bec232_12_esgd_cuda_cu_64d951a4{len(kernel)}{kernel}I"
            f"{MANGLED[dtype]}{state}{extra}EEvNS_11TensorTableIXT1_EEENS_6CoeffsIT0_EE")


def report(checker, overrides=None, skip=()):
    """ptxas --resource-usage text for every expected kernel, some possibly altered or left out."""
    overrides = overrides or {}
    lines = ["ptxas info    : 0 bytes gmem",
             "ptxas info    : Compiling entry function '_ZN2at6nativeOtherKernelEv' for 'sm_90'",
             "ptxas info    : Function properties for _ZN2at6nativeOtherKernelEv",
             "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads",
             "ptxas info    : Used 200 registers, used 0 barriers"]
    for key in sorted(checker.EXPECTED):
        if key in skip:
            continue
        regs, stack, stores, loads = overrides.get(key, (60, 0, 0, 0))
        name = mangled(key)
        lines += [f"ptxas info    : Compiling entry function '{name}' for 'sm_90'",
                  f"ptxas info    : Function properties for {name}",
                  f"    {stack} bytes stack frame, {stores} bytes spill stores, {loads} bytes spill loads",
                  f"ptxas info    : Used {regs} registers, used 0 barriers, 1024 bytes cmem[0]",
                  "ptxas info    : Compile time = 71.928 ms"]
    return "\n".join(lines)


def test_every_kernel_variant_is_expected(checker):
    kernels = {k for k, _, _ in checker.EXPECTED}
    assert kernels == {UPDATE, "esgd_fd_update_kernel", FROM_SOURCE, "esgd_rademacher_kernel",
                       "esgd_fd_perturb_kernel"}
    assert {v for k, _, v in checker.EXPECTED if k == UPDATE} == {4, 5}
    assert {v for k, _, v in checker.EXPECTED if k == "esgd_fd_update_kernel"} == {5, 6}
    assert {v for k, _, v in checker.EXPECTED if k == FROM_SOURCE} == {6, 7}
    assert len(checker.EXPECTED) == 4 * (2 + 2 + 2 + 1 + 2) == 36


def test_parses_every_instantiation(checker):
    kernels = checker.parse_resource_usage(report(checker, {(UPDATE, "bf16", 5): (63, 0, 0, 0)}))
    assert set(kernels) == checker.EXPECTED
    assert kernels[(UPDATE, "bf16", 5)] == dict(registers=63, stack=0, spill_stores=0, spill_loads=0)
    assert kernels[(UPDATE, "fp64", 4)]["registers"] == 60
    # Other kernels in the same report (with spills) are not ours and are ignored.
    assert checker.problems(kernels) == []


def test_signatures(checker):
    for key in checker.EXPECTED:
        assert checker.kernel_signature(mangled(key)) == key
    # nvcc 13.0's spelling (sm_90) of a probe fill and a perturbation kernel: the anonymous
    # namespace's name ends in digits that run into the kernel name's length.
    prefix = "_ZN4esgd53_GLOBAL__N__404f18f7_14_probes_cuda_cu_431fd7ce_24666"
    assert checker.kernel_signature(
        prefix + "22esgd_rademacher_kernelIN3c104HalfEfEEvNS_10ProbeTableILi1EEE"
    ) == ("esgd_rademacher_kernel", "fp16", 0)
    assert checker.kernel_signature(
        prefix + "22esgd_fd_perturb_kernelIddLb1EEEvNS_10ProbeTableILi2EEENS_11PerturbArgsE"
    ) == ("esgd_fd_perturb_kernel", "fp64", 1)
    # The update from sources is not mistaken for the finite-difference update (a shared prefix).
    assert checker.kernel_signature(
        "_ZN4esgd45_GLOBAL__N__e6bec232_12_esgd_cuda_cu_64d951a433esgd_fd_update_from_source_kernelI"
        "N3c108BFloat16EfLi7EEEvNS_11TensorTableIXT1_EEENS_6CoeffsIT0_EENS_11DeviceScaleE"
    ) == (FROM_SOURCE, "bf16", 7)


@pytest.mark.parametrize("key", [(UPDATE, "fp16", 5), ("esgd_fd_update_kernel", "bf16", 6), (FROM_SOURCE, "fp32", 7),
                                 ("esgd_rademacher_kernel", "fp32", 0), ("esgd_fd_perturb_kernel", "fp16", 1)])
@pytest.mark.parametrize("usage, phrase", [
    ((65, 0, 0, 0), "65 registers"),
    ((64, 16, 0, 0), "16 bytes stack frame"),
    ((64, 0, 8, 0), "8 bytes spill stores"),
    ((64, 0, 0, 8), "8 bytes spill loads"),
])
def test_flags_spills_and_register_pressure(checker, key, usage, phrase):
    found = checker.problems(checker.parse_resource_usage(report(checker, {key: usage})))
    assert len(found) == 1 and found[0].startswith(checker.label(key)) and phrase in found[0], found


def test_flags_a_missing_instantiation(checker):
    found = checker.problems(checker.parse_resource_usage(
        report(checker, skip={(UPDATE, "fp64", 5), ("esgd_fd_perturb_kernel", "bf16", 0)})))
    assert found == ["no esgd_fd_perturb_kernel<bf16, restore> in the ptxas report",
                     "no esgd_multi_tensor_kernel<fp64, depth 5> in the ptxas report"]


def test_unknown_instantiation_is_an_error(checker):
    with pytest.raises(ValueError, match="unrecognised"):
        checker.kernel_signature("_ZN4esgd24esgd_multi_tensor_kernelIiiLi4EEEv")


def test_expected_wide_accesses(checker):
    assert checker.expected_wide_accesses((UPDATE, "bf16", 5)) == (7, 5)
    assert checker.expected_wide_accesses((UPDATE, "fp32", 4)) == (4, 2)
    assert checker.expected_wide_accesses(("esgd_fd_update_kernel", "fp32", 5)) == (5, 3)
    assert checker.expected_wide_accesses(("esgd_fd_update_kernel", "fp16", 6)) == (8, 5)
    # From sources: the source is read instead of p (same loads), p still written.
    assert checker.expected_wide_accesses((FROM_SOURCE, "fp32", 6)) == (5, 3)
    assert checker.expected_wide_accesses((FROM_SOURCE, "bf16", 7)) == (8, 5)
    assert checker.expected_wide_accesses((FROM_SOURCE, "fp64", 7)) == (6, 3)
    assert checker.expected_wide_accesses(("esgd_rademacher_kernel", "fp64", 0)) == (0, 1)
    assert checker.expected_wide_accesses(("esgd_fd_perturb_kernel", "fp32", 1)) == (1, 2)
    assert checker.expected_wide_accesses(("esgd_fd_perturb_kernel", "fp32", 0)) == (1, 1)


def ptx(checker, skip_store_of=None):
    """PTX shaped like nvcc's: each kernel's vector loop, plus another entry."""
    out = [".version 9.0", ".target sm_90", "",
           ".visible .entry _ZN2at6nativeOtherKernelEv(", ")", "{",
           "\tld.global.v4.f32 \t{%f1, %f2, %f3, %f4}, [%rd1];", "}"]
    for key in sorted(checker.EXPECTED):
        dtype = key[1]
        loads, stores = checker.expected_wide_accesses(key)
        word = "v2.f64" if dtype == "fp64" else ("v4.u32" if dtype in ("fp16", "bf16") else "v4.f32")
        out += [f".entry {mangled(key)}(", "\t.param .align 8 .b8 table[3936]", ")", "{"]
        out += [f"\tld.global.nc.{word} \t{{%r1, %r2, %r3, %r4}}, [%rd{i}];" for i in range(loads)]
        out += ["\tld.global.nc.f64 \t%fd1, [%rd9];", "\tld.global.u16 \t%rs1, [%rd3];"]
        if key == skip_store_of:
            stores -= 1
        out += [f"\t@%p3 st.global.{word} \t[%rd{i}], {{%r1, %r2, %r3, %r4}};" for i in range(stores)]
        out += ["\tst.global.f32 \t[%rd5], %f9;", "}"]
    return "\n".join(out)


def merged(checker, text_ptx):
    kernels = checker.parse_resource_usage(report(checker))
    for key, accesses in checker.parse_ptx_vector_accesses(text_ptx).items():
        kernels[key].update(accesses)
    return kernels


def test_counts_16_byte_accesses_per_kernel(checker):
    accesses = checker.parse_ptx_vector_accesses(ptx(checker))
    assert set(accesses) == checker.EXPECTED
    assert accesses[(UPDATE, "bf16", 5)] == {"wide_loads": 7, "wide_stores": 5}
    assert accesses[("esgd_fd_perturb_kernel", "fp32", 1)] == {"wide_loads": 1, "wide_stores": 2}
    assert checker.problems(merged(checker, ptx(checker))) == []


@pytest.mark.parametrize("key", [(UPDATE, "fp16", 5), ("esgd_fd_update_kernel", "fp32", 6), (FROM_SOURCE, "fp16", 6),
                                 ("esgd_rademacher_kernel", "bf16", 0), ("esgd_fd_perturb_kernel", "fp64", 1)])
def test_flags_a_list_off_the_vector_path(checker, key):
    want = checker.expected_wide_accesses(key)[1]
    found = checker.problems(merged(checker, ptx(checker, skip_store_of=key)))
    assert found == [f"{checker.label(key)}: {want - 1} 16-byte global stores in the PTX, want at least {want} "
                     "(a list left the vector path)"]


def test_device_functions_end_a_kernel_section(checker):
    text = ptx(checker) + "\n.visible .func  (.param .b32 func_retval0) _Z6helperPf(\n)\n{\n" + \
        "\tst.global.v4.f32 \t[%rd1], {%f1, %f2, %f3, %f4};\n}"
    accesses = checker.parse_ptx_vector_accesses(text)
    assert accesses == checker.parse_ptx_vector_accesses(ptx(checker))
