"""Loading the native extension: the fallback when it is missing, broken or disabled, and what
extension_info() / fused_supported() report. Import behaviour is checked in fresh interpreters."""

import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import esgd_cuda
from esgd_cuda import _extension

PACKAGE_DIR = os.path.dirname(os.path.abspath(esgd_cuda.__file__))

PROBE = textwrap.dedent(
    """
    import json, warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import esgd_cuda
        from esgd_cuda import _extension
        import torch
    print(json.dumps({
        "file": esgd_cuda.__file__,
        "loaded": _extension.LOADED,
        "error": _extension.LOAD_ERROR,
        "warnings": [str(w.message) for w in caught if "esgd_cuda" in str(w.message)],
        "fused_cpu": _extension.fused_supported(torch.device("cpu"), torch.float32),
        "info": esgd_cuda.extension_info(),
    }))
    """
)


def probe(pythonpath, **env):
    environ = dict(os.environ, PYTHONPATH=pythonpath, **env)
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=environ, capture_output=True, text=True, check=True,
        cwd=pythonpath,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def package_copy(tmp_path):
    """A copy of the installed package's Python files (no compiled extension) in tmp_path."""
    dst = tmp_path / "esgd_cuda"
    dst.mkdir()
    for src in glob.glob(os.path.join(PACKAGE_DIR, "*.py")):
        shutil.copy(src, dst)
    return tmp_path, dst


def test_missing_extension_warns_once_and_falls_back(package_copy):
    root, _ = package_copy
    result = probe(str(root), ESGD_CUDA_DISABLE_EXTENSION="")
    assert result["file"].startswith(str(root))
    assert not result["loaded"]
    assert "_C" in result["error"]
    assert len(result["warnings"]) == 1, result["warnings"]
    assert "pure-PyTorch" in result["warnings"][0] and result["error"] in result["warnings"][0]
    assert not result["fused_cpu"]
    assert result["info"]["loaded"] is False and result["info"]["load_error"] == result["error"]


def test_broken_extension_warns_once_and_falls_back(package_copy):
    root, pkg = package_copy
    suffix = ".cpython-%d%d-x86_64-linux-gnu.so" % sys.version_info[:2]
    (pkg / ("_C" + suffix)).write_bytes(b"\x7fELF not really a shared library")
    (pkg / "_C.so").write_bytes(b"\x7fELF not really a shared library")
    result = probe(str(root), ESGD_CUDA_DISABLE_EXTENSION="")
    assert not result["loaded"]
    assert result["error"].startswith("ImportError"), result["error"]
    assert len(result["warnings"]) == 1


@pytest.mark.parametrize("value", ["1", "true"])
def test_disable_env_skips_loading_silently(value):
    result = probe(os.path.dirname(PACKAGE_DIR), ESGD_CUDA_DISABLE_EXTENSION=value)
    assert not result["loaded"]
    assert "ESGD_CUDA_DISABLE_EXTENSION" in result["error"]
    assert result["warnings"] == []
    assert not result["fused_cpu"]
    assert result["info"]["disabled"] is True


@pytest.mark.skipif(_extension.DISABLED, reason="native kernels disabled by ESGD_CUDA_DISABLE_EXTENSION")
def test_loaded_extension_reports_its_build():
    assert _extension.LOADED, f"the extension failed to load: {_extension.LOAD_ERROR}"
    info = esgd_cuda.extension_info()
    built = info["built"]
    assert built["cpu"] is True
    assert built["torch_version"] == torch.__version__, "built against another torch"
    assert info["runtime"]["torch_version"] == torch.__version__
    if built["cuda"]:
        assert built["cuda_version"] and built["cuda_archs"]
        assert all(a.split("_")[0] in ("sm", "compute") for a in built["cuda_archs"])
    else:
        assert built["cuda_version"] is None and built["cuda_archs"] == []
    json.dumps(info)  # plain data, printable in bug reports


def test_an_extension_built_from_older_sources_is_stale():
    """An op missing, or one registered without an argument added since (esgd_update_fd_'s sources,
    the rounding arguments of bfloat16 state): the extension is not used, with a reason that says to
    rebuild it."""
    from types import SimpleNamespace

    def op(*names):
        args = [SimpleNamespace(name=n) for n in names]
        return SimpleNamespace(default=SimpleNamespace(_schema=SimpleNamespace(arguments=args)))

    current = {name: op("params", *extra) for name, extra in _extension._REQUIRED_OPS.items()}
    assert _extension._stale_ops(SimpleNamespace(**current)) is None
    older = dict(current, esgd_update_fd_=op("params", "grads_plus", "hz_scale_inv", "rounding_keys",
                                              "rounding_offsets", "rounding_step"))
    assert _extension._stale_ops(SimpleNamespace(**older)) == (
        "registered torch.ops.esgd_cuda.esgd_update_fd_ without its argument sources (built from older sources: "
        "rebuild it)")
    older = dict(current, esgd_update_=op("params", "grads", "grad_scale_inv"))
    assert _extension._stale_ops(SimpleNamespace(**older)) == (
        "registered torch.ops.esgd_cuda.esgd_update_ without its arguments rounding_keys, rounding_offsets, "
        "rounding_step (built from older sources: rebuild it)")
    del current["esgd_rademacher_"]
    assert _extension._stale_ops(SimpleNamespace(**current)) == "did not register torch.ops.esgd_cuda.esgd_rademacher_"
    if _extension.LOADED:
        assert _extension._stale_ops(torch.ops.esgd_cuda) is None


@pytest.mark.skipif(_extension.DISABLED, reason="native kernels disabled by ESGD_CUDA_DISABLE_EXTENSION")
def test_fused_supported():
    cpu = torch.device("cpu")
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        assert _extension.fused_supported(cpu, dtype)
        assert _extension.fused_supported("cpu", dtype)
    for dtype in (torch.int64, torch.complex64, torch.float8_e4m3fn):
        assert not _extension.fused_supported(cpu, dtype)
    assert not _extension.fused_supported(torch.device("meta"), torch.float32)
    expected_cuda = torch.cuda.is_available() and esgd_cuda.extension_info()["built"]["cuda"]
    if not expected_cuda:
        assert not _extension.fused_supported(torch.device("cuda"), torch.float32)


@pytest.mark.parametrize(
    "archs, capability, runs",
    [
        (["sm_80", "compute_90", "sm_90"], (9, 0), True),
        (["sm_80", "compute_90", "sm_90"], (8, 6), True),  # sm_80 SASS runs on 8.6
        (["sm_80", "compute_90", "sm_90"], (8, 0), True),
        (["sm_80", "compute_90", "sm_90"], (7, 5), False),
        (["sm_80", "compute_90", "sm_90"], (12, 0), True),  # PTX is JIT-compiled forward
        (["sm_80", "sm_90"], (10, 0), False),  # SASS does not run across major versions
        (["sm_86"], (8, 0), False),
        (["sm_90a"], (9, 0), True),
        (["compute_90a"], (10, 0), False),  # arch-specific PTX is not forward compatible
        ([], (9, 0), False),
    ],
)
def test_arch_compatibility(archs, capability, runs):
    assert _extension._arch_runs(archs, *capability) is runs


@pytest.mark.skipif(not _extension.LOADED, reason="native extension not loaded")
def test_native_ops_are_compilable_on_current_torch():
    # COMPILABLE=False silently routes compiled steps to the pure-PyTorch path; it is only expected
    # on torch 2.4-era auto_functionalize. torch 2.11 and 2.14 were checked to compile the ops.
    version = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    if version < (2, 11):
        pytest.skip(f"torch {torch.__version__} predates the versions checked to compile the ops")
    assert _extension.COMPILABLE
