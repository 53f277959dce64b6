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


def mangled(dtype, depth):
    state = "d" if dtype == "fp64" else "f"
    return (f"_ZN4esgd45_GLOBAL__N__e6bec232_12_esgd_cuda_cu_64d951a424esgd_multi_tensor_kernelI"
            f"{MANGLED[dtype]}{state}Li{depth}EEEvNS_11TensorTableIXT1_EEENS_6CoeffsIT0_EE")


def report(overrides=None, skip=()):
    """ptxas --resource-usage text for all eight kernels, one of them possibly altered."""
    overrides = overrides or {}
    lines = ["ptxas info    : 0 bytes gmem",
             "ptxas info    : Compiling entry function '_ZN2at6nativeOtherKernelEv' for 'sm_90'",
             "ptxas info    : Function properties for _ZN2at6nativeOtherKernelEv",
             "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads",
             "ptxas info    : Used 200 registers, used 0 barriers"]
    for dtype in MANGLED:
        for depth in (4, 5):
            if (dtype, depth) in skip:
                continue
            regs, stack, stores, loads = overrides.get((dtype, depth), (60, 0, 0, 0))
            name = mangled(dtype, depth)
            lines += [f"ptxas info    : Compiling entry function '{name}' for 'sm_90'",
                      f"ptxas info    : Function properties for {name}",
                      f"    {stack} bytes stack frame, {stores} bytes spill stores, {loads} bytes spill loads",
                      f"ptxas info    : Used {regs} registers, used 0 barriers, 1024 bytes cmem[0]",
                      "ptxas info    : Compile time = 71.928 ms"]
    return "\n".join(lines)


def test_parses_every_instantiation(checker):
    kernels = checker.parse_resource_usage(report({("bf16", 5): (63, 0, 0, 0)}))
    assert set(kernels) == checker.EXPECTED
    assert kernels[("bf16", 5)] == dict(registers=63, stack=0, spill_stores=0, spill_loads=0)
    assert kernels[("fp64", 4)]["registers"] == 60
    # Other kernels in the same report (with spills) are not ours and are ignored.
    assert checker.problems(kernels) == []


@pytest.mark.parametrize("usage, phrase", [
    ((65, 0, 0, 0), "65 registers"),
    ((64, 16, 0, 0), "16 bytes stack frame"),
    ((64, 0, 8, 0), "8 bytes spill stores"),
    ((64, 0, 0, 8), "8 bytes spill loads"),
])
def test_flags_spills_and_register_pressure(checker, usage, phrase):
    found = checker.problems(checker.parse_resource_usage(report({("fp16", 5): usage})))
    assert len(found) == 1 and found[0].startswith("fp16 depth-5") and phrase in found[0], found


def test_flags_a_missing_instantiation(checker):
    found = checker.problems(checker.parse_resource_usage(report(skip={("fp64", 5)})))
    assert found == ["no fp64 depth-5 kernel in the ptxas report"]


def test_unknown_instantiation_is_an_error(checker):
    with pytest.raises(ValueError, match="unrecognised"):
        checker.kernel_signature("_ZN4esgd24esgd_multi_tensor_kernelIiiLi4EEEv")


def ptx(skip_store_of=None):
    """PTX shaped like nvcc's: a kernel's vector loop for every instantiation, plus another entry."""
    out = [".version 9.0", ".target sm_90", "",
           ".visible .entry _ZN2at6nativeOtherKernelEv(", ")", "{",
           "\tld.global.v4.f32 \t{%f1, %f2, %f3, %f4}, [%rd1];", "}"]
    for dtype in MANGLED:
        for depth in (4, 5):
            loads, stores = (3 if depth == 5 else 2, 1)
            state = 2 if dtype in ("fp16", "bf16") else 1
            loads += 2 * state
            stores += (2 if depth == 5 else 1) * state
            word = "v2.f64" if dtype == "fp64" else ("v4.u32" if dtype in ("fp16", "bf16") else "v4.f32")
            out += [f".entry {mangled(dtype, depth)}(", "\t.param .align 8 .b8 table[3936]", ")", "{"]
            out += [f"\tld.global.nc.{word} \t{{%r1, %r2, %r3, %r4}}, [%rd{i}];" for i in range(loads)]
            out += ["\tld.global.nc.f64 \t%fd1, [%rd9];", "\tld.global.u16 \t%rs1, [%rd3];"]
            if (dtype, depth) == skip_store_of:
                stores -= 1
            out += [f"\t@%p3 st.global.{word} \t[%rd{i}], {{%r1, %r2, %r3, %r4}};" for i in range(stores)]
            out += ["\tst.global.f32 \t[%rd5], %f9;", "}"]
    return "\n".join(out)


def merged(checker, text_ptx):
    kernels = checker.parse_resource_usage(report())
    for key, accesses in checker.parse_ptx_vector_accesses(text_ptx).items():
        kernels[key].update(accesses)
    return kernels


def test_counts_16_byte_accesses_per_kernel(checker):
    accesses = checker.parse_ptx_vector_accesses(ptx())
    assert set(accesses) == checker.EXPECTED
    # bf16 with Hz: p, g, hz one vector each, m and d two each (fp32 state of eight elements).
    assert accesses[("bf16", 5)] == {"wide_loads": 7, "wide_stores": 5}
    assert accesses[("fp32", 4)] == {"wide_loads": 4, "wide_stores": 2}
    assert checker.problems(merged(checker, ptx())) == []


def test_flags_a_list_off_the_vector_path(checker):
    found = checker.problems(merged(checker, ptx(skip_store_of=("fp16", 5))))
    assert found == ["fp16 depth-5: 4 16-byte global stores in the PTX, want at least 5 "
                     "(a list left the vector path)"]


def test_device_functions_end_a_kernel_section(checker):
    text = ptx() + "\n.visible .func  (.param .b32 func_retval0) _Z6helperPf(\n)\n{\n" + \
        "\tst.global.v4.f32 \t[%rd1], {%f1, %f2, %f3, %f4};\n}"
    accesses = checker.parse_ptx_vector_accesses(text)
    assert accesses == checker.parse_ptx_vector_accesses(ptx())
