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
FD = "esgd_fd_update_kernel"


def mangled(key):
    """A mangled name shaped like nvcc's for (kernel, dtype, state dtype, variant)."""
    kernel, dtype, state, variant = key
    extra = {"esgd_rademacher_kernel": "", "esgd_fd_perturb_kernel": f"Lb{variant}E"}.get(kernel, f"Li{variant}E")
    # A class type named before is a substitution, as nvcc 13.0 writes it in this namespace: bf16 state
    # of a bf16 kernel repeats the parameter's type (S3_), after c10::Half the c10 namespace (NS2_).
    second = MANGLED[state]
    if state == "bf16" and dtype == "bf16":
        second = "S3_"
    elif state == "bf16" and dtype == "fp16":
        second = "NS2_8BFloat16E"
    return (f"_ZN4esgd45_GLOBAL__N__e6bec232_12_esgd_cuda_cu_64d951a4{len(kernel)}{kernel}I"
            f"{MANGLED[dtype]}{second}{extra}EEvNS_11TensorTableIXT1_EEENS_6CoeffsIT0_EE")


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
    kernels = {k for k, _, _, _ in checker.EXPECTED}
    assert kernels == {UPDATE, FD, FROM_SOURCE, "esgd_rademacher_kernel", "esgd_fd_perturb_kernel"}
    assert {v for k, _, _, v in checker.EXPECTED if k == UPDATE} == {4, 5}
    assert {v for k, _, _, v in checker.EXPECTED if k == FD} == {5, 6}
    assert {v for k, _, _, v in checker.EXPECTED if k == FROM_SOURCE} == {6, 7}
    # bf16 state (stochastic rounding) for every 16- and 32-bit parameter dtype of every update kernel.
    assert {(p, s) for k, p, s, _ in checker.EXPECTED if k == FD} == {
        ("fp32", "fp32"), ("fp16", "fp32"), ("bf16", "fp32"), ("fp64", "fp64"),
        ("fp32", "bf16"), ("fp16", "bf16"), ("bf16", "bf16")}
    assert {s for k, _, s, _ in checker.EXPECTED if k == "esgd_rademacher_kernel"} == {"fp32", "fp64"}
    assert len(checker.EXPECTED) == 7 * (2 + 2 + 2) + 4 * (1 + 2) == 54


def test_parses_every_instantiation(checker):
    kernels = checker.parse_resource_usage(report(checker, {(UPDATE, "bf16", "fp32", 5): (63, 0, 0, 0)}))
    assert set(kernels) == checker.EXPECTED
    assert kernels[(UPDATE, "bf16", "fp32", 5)] == dict(registers=63, stack=0, spill_stores=0, spill_loads=0)
    assert kernels[(UPDATE, "fp64", "fp64", 4)]["registers"] == 60
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
    ) == ("esgd_rademacher_kernel", "fp16", "fp32", 0)
    assert checker.kernel_signature(
        prefix + "22esgd_fd_perturb_kernelIddLb1EEEvNS_10ProbeTableILi2EEENS_11PerturbArgsE"
    ) == ("esgd_fd_perturb_kernel", "fp64", "fp64", 1)
    # The update from sources is not mistaken for the finite-difference update (a shared prefix).
    assert checker.kernel_signature(
        "_ZN4esgd45_GLOBAL__N__e6bec232_12_esgd_cuda_cu_64d951a433esgd_fd_update_from_source_kernelI"
        "N3c108BFloat16EfLi7EEEvNS_11TensorTableIXT1_EEENS_6CoeffsIT0_EENS_11DeviceScaleE"
    ) == (FROM_SOURCE, "bf16", "fp32", 7)
    # bf16 state: the second template argument is the state's storage type.
    assert checker.kernel_signature(
        "_ZN4esgd45_GLOBAL__N__e6bec232_12_esgd_cuda_cu_64d951a424esgd_multi_tensor_kernelI"
        "fN3c108BFloat16ELi5EEEvNS_11TensorTableIXT1_EEENS_6CoeffsIT0_EE"
    ) == (UPDATE, "fp32", "bf16", 5)
    # nvcc 13.0's spelling of bf16 state for bf16 and fp16 parameters: substitutions, not the type's name.
    prefix = "_ZN4esgd45_GLOBAL__N__e6bec232_12_esgd_cuda_cu_64d951a421esgd_fd_update_kernelI"
    suffix = "EEvNS_11TensorTableIXT1_EEENS_6CoeffsINS_12StateStorageIT0_E4MathEEENS_11DeviceScaleE"
    assert checker.kernel_signature(prefix + "N3c108BFloat16ES3_Li6E" + suffix) == (FD, "bf16", "bf16", 6)
    assert checker.kernel_signature(prefix + "N3c104HalfENS2_8BFloat16ELi5E" + suffix) == (FD, "fp16", "bf16", 5)
    # A substitution where the parameter is not a class type cannot be a state type we build.
    with pytest.raises(ValueError, match="unrecognised"):
        checker.kernel_signature(prefix + "fS3_Li6E" + suffix)


@pytest.mark.parametrize("key", [(UPDATE, "fp16", "fp32", 5), (FD, "bf16", "fp32", 6), (FROM_SOURCE, "fp32", "fp32", 7),
                                 (UPDATE, "fp32", "bf16", 4), (FROM_SOURCE, "bf16", "bf16", 7),
                                 ("esgd_rademacher_kernel", "fp32", "fp32", 0),
                                 ("esgd_fd_perturb_kernel", "fp16", "fp32", 1)])
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
        report(checker, skip={(UPDATE, "fp64", "fp64", 5), ("esgd_fd_perturb_kernel", "bf16", "fp32", 0),
                              (FD, "fp16", "bf16", 6)})))
    assert found == ["no esgd_fd_perturb_kernel<bf16, restore> in the ptxas report",
                     "no esgd_fd_update_kernel<fp16, bf16 state, depth 6> in the ptxas report",
                     "no esgd_multi_tensor_kernel<fp64, fp64 state, depth 5> in the ptxas report"]


def test_unknown_instantiation_is_an_error(checker):
    with pytest.raises(ValueError, match="unrecognised"):
        checker.kernel_signature("_ZN4esgd24esgd_multi_tensor_kernelIiiLi4EEEv")


def test_expected_wide_accesses(checker):
    assert checker.expected_wide_accesses((UPDATE, "bf16", "fp32", 5)) == (7, 5, 0, 0)
    assert checker.expected_wide_accesses((UPDATE, "fp32", "fp32", 4)) == (4, 2, 0, 0)
    assert checker.expected_wide_accesses((FD, "fp32", "fp32", 5)) == (5, 3, 0, 0)
    assert checker.expected_wide_accesses((FD, "fp16", "fp32", 6)) == (8, 5, 0, 0)
    # From sources: the source is read instead of p (same loads), p still written.
    assert checker.expected_wide_accesses((FROM_SOURCE, "fp32", "fp32", 6)) == (5, 3, 0, 0)
    assert checker.expected_wide_accesses((FROM_SOURCE, "bf16", "fp32", 7)) == (8, 5, 0, 0)
    assert checker.expected_wide_accesses((FROM_SOURCE, "fp64", "fp64", 7)) == (6, 3, 0, 0)
    # bf16 state: one 16-byte vector per state list for 16-bit parameters, one 8-byte one for fp32.
    assert checker.expected_wide_accesses((UPDATE, "bf16", "bf16", 5)) == (5, 3, 0, 0)
    assert checker.expected_wide_accesses((UPDATE, "fp16", "bf16", 4)) == (4, 2, 0, 0)
    assert checker.expected_wide_accesses((UPDATE, "fp32", "bf16", 4)) == (2, 1, 2, 1)
    assert checker.expected_wide_accesses((FD, "fp32", "bf16", 6)) == (4, 1, 2, 2)
    assert checker.expected_wide_accesses((FROM_SOURCE, "fp32", "bf16", 7)) == (4, 1, 2, 2)
    assert checker.expected_wide_accesses(("esgd_rademacher_kernel", "fp64", "fp64", 0)) == (0, 1, 0, 0)
    assert checker.expected_wide_accesses(("esgd_fd_perturb_kernel", "fp32", "fp32", 1)) == (1, 2, 0, 0)
    assert checker.expected_wide_accesses(("esgd_fd_perturb_kernel", "fp32", "fp32", 0)) == (1, 1, 0, 0)


def ptx(checker, skip_store_of=None, skip_half_store_of=None):
    """PTX shaped like nvcc's: each kernel's vector loop, plus another entry."""
    out = [".version 9.0", ".target sm_90", "",
           ".visible .entry _ZN2at6nativeOtherKernelEv(", ")", "{",
           "\tld.global.v4.f32 \t{%f1, %f2, %f3, %f4}, [%rd1];", "}"]
    for key in sorted(checker.EXPECTED):
        dtype = key[1]
        loads, stores, half_loads, half_stores = checker.expected_wide_accesses(key)
        word = "v2.f64" if dtype == "fp64" else ("v4.u32" if dtype in ("fp16", "bf16") else "v4.f32")
        out += [f".entry {mangled(key)}(", "\t.param .align 8 .b8 table[3936]", ")", "{"]
        out += [f"\tld.global.nc.{word} \t{{%r1, %r2, %r3, %r4}}, [%rd{i}];" for i in range(loads)]
        out += [f"\tld.global.v2.u32 \t{{%r5, %r6}}, [%rd{i}];" for i in range(half_loads)]
        out += ["\tld.global.nc.f64 \t%fd1, [%rd9];", "\tld.global.u16 \t%rs1, [%rd3];"]
        if key == skip_store_of:
            stores -= 1
        if key == skip_half_store_of:
            half_stores -= 1
        out += [f"\t@%p3 st.global.{word} \t[%rd{i}], {{%r1, %r2, %r3, %r4}};" for i in range(stores)]
        out += [f"\tst.global.v4.b16 \t[%rd{i}], {{%rs1, %rs2, %rs3, %rs4}};" for i in range(half_stores)]
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
    none = dict(half_wide_loads=0, half_wide_stores=0)
    assert accesses[(UPDATE, "bf16", "fp32", 5)] == dict(wide_loads=7, wide_stores=5, **none)
    assert accesses[("esgd_fd_perturb_kernel", "fp32", "fp32", 1)] == dict(wide_loads=1, wide_stores=2, **none)
    assert accesses[(UPDATE, "fp32", "bf16", 5)] == dict(wide_loads=3, wide_stores=1, half_wide_loads=2,
                                                         half_wide_stores=2)
    assert checker.problems(merged(checker, ptx(checker))) == []


@pytest.mark.parametrize("key", [(UPDATE, "fp16", "fp32", 5), (FD, "fp32", "fp32", 6), (FROM_SOURCE, "fp16", "fp32", 6),
                                 (UPDATE, "bf16", "bf16", 5), ("esgd_rademacher_kernel", "bf16", "fp32", 0),
                                 ("esgd_fd_perturb_kernel", "fp64", "fp64", 1)])
def test_flags_a_list_off_the_vector_path(checker, key):
    want = checker.expected_wide_accesses(key)[1]
    found = checker.problems(merged(checker, ptx(checker, skip_store_of=key)))
    assert found == [f"{checker.label(key)}: {want - 1} 16-byte global stores in the PTX, want at least {want} "
                     "(a list left the vector path)"]


@pytest.mark.parametrize("key", [(UPDATE, "fp32", "bf16", 5), (FROM_SOURCE, "fp32", "bf16", 6)])
def test_flags_bf16_state_off_its_8_byte_vector_path(checker, key):
    want = checker.expected_wide_accesses(key)[3]
    found = checker.problems(merged(checker, ptx(checker, skip_half_store_of=key)))
    assert found == [f"{checker.label(key)}: {want - 1} 8-byte global stores in the PTX, want at least {want} "
                     "(a list left the vector path)"]


def test_device_functions_end_a_kernel_section(checker):
    text = ptx(checker) + "\n.visible .func  (.param .b32 func_retval0) _Z6helperPf(\n)\n{\n" + \
        "\tst.global.v4.f32 \t[%rd1], {%f1, %f2, %f3, %f4};\n}"
    accesses = checker.parse_ptx_vector_accesses(text)
    assert accesses == checker.parse_ptx_vector_accesses(ptx(checker))
