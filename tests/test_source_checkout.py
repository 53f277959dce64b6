"""Importing esgd_cuda from its source checkout (Python run from the repository root): the warning
must say that the checkout, not the installed package, was imported and what to do, and an
in-place build must make the checkout work. Each case runs in a fresh interpreter."""

import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

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
    print(json.dumps({
        "file": esgd_cuda.__file__,
        "loaded": _extension.LOADED,
        "warnings": [str(w.message) for w in caught if "esgd_cuda" in str(w.message)],
    }))
    """
)


def run_probe(cwd, pythonpath="", args=None):
    env = dict(os.environ, PYTHONPATH=pythonpath)
    env.pop(_extension._DISABLE_VAR, None)
    out = subprocess.run([sys.executable, *(args or ["-c", PROBE])], cwd=cwd, env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def make_package(where, with_kernels):
    pkg = where / "esgd_cuda"
    pkg.mkdir(parents=True)
    for src in glob.glob(os.path.join(PACKAGE_DIR, "*.py")):
        shutil.copy(src, pkg)
    if with_kernels:
        for lib in glob.glob(os.path.join(PACKAGE_DIR, "_C*")):
            shutil.copy(lib, pkg)
    return pkg


@pytest.fixture
def checkout(tmp_path):
    """An unbuilt source checkout: setup.py, csrc/ and the package's Python files."""
    root = tmp_path / "repo"
    make_package(root, with_kernels=False)
    (root / "setup.py").write_text("")
    (root / "csrc").mkdir()
    return root


needs_kernels = pytest.mark.skipif(not _extension.LOADED, reason="the native extension is not loaded here")


@needs_kernels
def test_checkout_shadowing_the_installed_package_is_named(checkout, tmp_path):
    installed = make_package(tmp_path / "site", with_kernels=True)
    result = run_probe(cwd=checkout, pythonpath=str(installed.parent))
    assert result["file"].startswith(str(checkout)) and not result["loaded"]
    [message] = result["warnings"]
    assert f"imported from the source checkout {checkout / 'esgd_cuda'}" in message
    assert f"instead of the installed package in {installed}" in message
    assert f"Run from outside {checkout}" in message and "build_ext --inplace" in message
    assert "Reinstall" not in message, "reinstalling cannot help when the checkout shadows the install"
    assert f"sys.path[0] is the current directory {checkout}" in message


@needs_kernels
@pytest.mark.parametrize("how", ["python -m", "script in the checkout", "sys.path.insert"])
def test_shadowing_names_the_sys_path_entry_and_its_cause(how, checkout, tmp_path):
    """What Python puts first on sys.path depends on how it was started: the directory of the script,
    whatever the working directory, or the working directory for -c/-m/the prompt. Anything else on
    sys.path came from PYTHONPATH or code (as in an example that inserted the repository root)."""
    installed = make_package(tmp_path / "site", with_kernels=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if how == "python -m":
        (checkout / "probe.py").write_text(PROBE)
        cwd, args = checkout, ["-m", "probe"]
        cause = f"sys.path[0] is the current directory {checkout}"
    elif how == "script in the checkout":
        (checkout / "probe.py").write_text(PROBE)
        cwd, args = elsewhere, [str(checkout / "probe.py")]
        cause = f"sys.path[0] is {checkout}, the directory of the script {checkout / 'probe.py'}"
    else:
        (elsewhere / "probe.py").write_text(f"import sys\nsys.path.insert(0, {str(checkout)!r})\n{PROBE}")
        cwd, args = checkout, [str(elsewhere / "probe.py")]
        cause = f"sys.path[0] is {checkout}, put there by PYTHONPATH, a .pth file or code that edits sys.path"
    result = run_probe(cwd=cwd, pythonpath=str(installed.parent), args=args)
    assert result["file"].startswith(str(checkout)) and not result["loaded"]
    [message] = result["warnings"]
    assert cause in message, message
    assert f"instead of the installed package in {installed}" in message and "build_ext --inplace" in message


def test_unbuilt_checkout_without_an_install_says_how_to_build(checkout, monkeypatch):
    # In-process, with sys.path holding only the checkout: as on a machine without an install.
    monkeypatch.setattr(_extension, "_PACKAGE_DIR", str(checkout / "esgd_cuda"))
    monkeypatch.setattr(sys, "path", [str(checkout)])
    reason = _extension._missing_reason()
    assert f"imported from the source checkout {checkout / 'esgd_cuda'}, whose kernels have not been built" in reason
    assert "python setup.py build_ext --inplace" in reason and "pip install -e . --no-build-isolation --use-pep517" in reason


@needs_kernels
def test_checkout_built_in_place_loads_its_kernels(checkout, tmp_path):
    for lib in glob.glob(os.path.join(PACKAGE_DIR, "_C*")):
        shutil.copy(lib, checkout / "esgd_cuda")
    installed = make_package(tmp_path / "site", with_kernels=True)
    result = run_probe(cwd=checkout, pythonpath=str(installed.parent))
    assert result["file"].startswith(str(checkout))
    assert result["loaded"] and result["warnings"] == []


def test_installed_package_without_kernels_keeps_the_reinstall_advice(tmp_path, monkeypatch):
    monkeypatch.setattr(_extension, "_PACKAGE_DIR", str(make_package(tmp_path, with_kernels=False)))
    reason = _extension._missing_reason()
    assert "_C is not installed" in reason and "source checkout" not in reason
    monkeypatch.setattr(_extension, "LOAD_ERROR", reason)
    assert _extension._remedy().startswith("Reinstall with `pip install --no-build-isolation .`")
