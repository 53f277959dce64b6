"""The examples in examples/ run end to end, as users run them (a subprocess each, from a working
directory outside the repository, few steps, bounded time): they exit 0, run the esgd_cuda these tests
import with its native kernels loaded (an example that imported the unbuilt source tree would train
on the pure-PyTorch path and pass everything else), the training loss goes down, ESGD-M estimated the
curvature (`estimates > 0` in `opt.diagnostics()`), and what each example claims about its library
holds. scripts/setup.sh installs their libraries (pinned); none of them may be imported by esgd_cuda
itself.
"""

import ast
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import esgd_cuda

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
# Imported by the examples or the benchmarks, never by the core package.
CLIENT_LIBRARIES = ("lightning", "pytorch_lightning", "transformers", "accelerate", "timm", "torchvision",
                    "pytorch_optimizer", "torchzero", "sklearn", "matplotlib", "tqdm")


PACKAGE = Path(esgd_cuda.__file__).resolve().parent


def example_env() -> dict:
    # PYTHONPATH: the examples import the esgd_cuda these tests import (installed, or an in-place
    # build). The libraries' own warnings are noise here, but esgd_cuda's missing-kernels warning is
    # an error: it is what an example importing an unbuilt source tree prints.
    env = dict(os.environ, PYTHONPATH=str(PACKAGE.parent), HF_HUB_OFFLINE="1",
               PYTHONWARNINGS="ignore,error::RuntimeWarning:esgd_cuda")
    env.pop("ESGD_CUDA_DISABLE_EXTENSION", None)
    return env


def check_kernels(out: str, ranks: int = 1) -> None:
    """Every process of the example ran this package with its native kernels (examples print it)."""
    assert esgd_cuda.extension_info()["loaded"], "the tests' own esgd_cuda has no native kernels"
    found = re.findall(r"^(?:rank \d+: )?esgd_cuda (.*): (native kernels .*)$", out, re.M)
    assert found == [(str(PACKAGE), "native kernels loaded")] * ranks, out


def run_example(name: str, *args: str, cwd: Path, timeout: int = 420) -> str:
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                          timeout=timeout, env=example_env(), cwd=cwd)
    assert proc.returncode == 0, f"{name} {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    check_kernels(proc.stdout)
    return proc.stdout


def training_summary(out: str) -> tuple[float, float, list[dict]]:
    """(mean loss of the first steps, of the last steps, opt.diagnostics()) from an example's output."""
    match = re.search(r"^training loss: ([\d.]+) \(mean of the first \d+ steps\) -> ([\d.]+)", out, re.M)
    assert match, out
    diagnostics = re.search(r"^ESGD-M diagnostics: (.*)$", out, re.M)
    assert diagnostics, out
    return float(match[1]), float(match[2]), json.loads(diagnostics[1])


def check_trained(out: str, steps: int) -> list[dict]:
    first, last, diagnostics = training_summary(out)
    assert last < 0.9 * first, (first, last)
    assert len(diagnostics) == 1 and diagnostics[0]["step"] == steps, diagnostics
    assert diagnostics[0]["estimates"] > 0 and diagnostics[0]["sqrt_d"]["mean"] > 0, diagnostics
    # Every step printed along the way is finite.
    losses = [float(v) for v in re.findall(r"^step +\d+ +loss ([-+\d.eE]+|nan|inf)", out, re.M)]
    assert losses and all(v == v and abs(v) != float("inf") for v in losses), out
    return diagnostics


def test_lightning_exact_hvp_through_the_backward_hook(tmp_path):
    out = run_example("lightning_esgd.py", "--steps", "40", cwd=tmp_path)
    check_trained(out, 40)
    # One forward per step: BatchNorm saw each training batch once.
    assert "BatchNorm num_batches_tracked after 40 steps: [40]" in out, out


def test_lightning_finite_difference_through_lightning_closure(tmp_path):
    out = run_example("lightning_esgd.py", "--steps", "40", "--hvp", "finite_difference", cwd=tmp_path)
    check_trained(out, 40)
    # The perturbed forward of each estimation step left the running statistics as one forward does
    # (ESGD's buffers=self).
    assert "BatchNorm num_batches_tracked after 40 steps: [40]" in out, out


def test_lightning_sub_batch_curvature_through_optimizer_step(tmp_path):
    """LightningModule.optimizer_step passes a curvature closure on a quarter of each batch: it runs
    once per estimation step (exact) or twice (forward difference), never on plain steps, and its
    forward passes leave the BatchNorm statistics alone (buffers=self). The first finite-difference
    estimate repeats its pass at theta + h z once (the closure check), and that check passes."""
    for hvp, passes, checks in (("autograd", 1, 0), ("finite_difference", 2, 1)):
        out = run_example("lightning_esgd.py", "--steps", "40", "--hvp", hvp, "--curvature-fraction", "0.25",
                          cwd=tmp_path)
        diagnostics = check_trained(out, 40)
        assert "BatchNorm num_batches_tracked after 40 steps: [40]" in out, out
        assert diagnostics[0]["rejected_estimates"] == 0, out
        assert f"curvature closure passes: {passes * diagnostics[0]['estimates'] + checks}" in out, out


def test_timm_batchnorm_cnn(tmp_path):
    out = run_example("timm_esgd.py", "--steps", "50", cwd=tmp_path)
    check_trained(out, 50)
    assert ("num_batches_tracked after 50 steps: [50]; "
            "eval() forward left the running statistics unchanged: True") in out, out
    # Evaluation with the running statistics works (ten classes: chance is 0.1; 40 steps reach ~0.7).
    acc = float(re.search(r"test accuracy \(eval mode, running statistics\): ([\d.]+)", out)[1])
    assert acc > 0.5, out


def test_timm_batchnorm_cnn_finite_difference_restores_running_statistics(tmp_path):
    out = run_example("timm_esgd.py", "--steps", "24", "--hvp", "finite_difference", cwd=tmp_path)
    check_trained(out, 24)
    # Estimation steps ran the forward twice; buffers=model left the statistics as after one.
    assert ("num_batches_tracked after 24 steps: [24]; "
            "eval() forward left the running statistics unchanged: True") in out, out


def test_hf_transformers_plain_loop_default_attention(tmp_path):
    out = run_example("hf_transformers_esgd.py", "--steps", "30", cwd=tmp_path)
    assert "attention: sdpa" in out, out
    check_trained(out, 30)


def test_hf_transformers_trainer_subclass(tmp_path):
    out = run_example("hf_transformers_esgd.py", "--steps", "30", "--loop", "trainer", cwd=tmp_path)
    assert "attention: sdpa" in out, out
    diagnostics = check_trained(out, 30)
    # The Trainer's own optimizer.step() after each training_step did not step again.
    assert diagnostics[0]["step"] == 30


def test_hf_transformers_sub_batch_curvature_in_both_loops(tmp_path):
    """A quarter of each batch feeds the forward difference (two passes per estimation step, and one
    more for the closure check of the first), in the plain loop and through the Trainer subclass's
    training_step."""
    for loop in ("torch", "trainer"):
        out = run_example("hf_transformers_esgd.py", "--steps", "30", "--loop", loop, "--curvature-fraction", "0.25",
                          cwd=tmp_path)
        diagnostics = check_trained(out, 30)
        assert diagnostics[0]["rejected_estimates"] == 0, out
        assert f"curvature closure passes: {2 * diagnostics[0]['estimates'] + 1}" in out, out


def test_examples_have_a_steps_flag_and_a_docstring():
    for path in sorted(EXAMPLES.glob("*.py")):
        tree = ast.parse(path.read_text())
        assert ast.get_docstring(tree), path
        assert '"--steps"' in path.read_text(), path
    assert {p.name for p in EXAMPLES.glob("*.py")} >= {"lightning_esgd.py", "hf_transformers_esgd.py", "timm_esgd.py"}


def test_core_package_imports_no_client_library():
    # torch itself imports tqdm (torch.hub): only what importing esgd_cuda adds counts.
    code = ("import importlib, json, pkgutil, sys, torch\n"
            "before = set(sys.modules)\n"
            "import esgd_cuda\n"
            "for m in pkgutil.iter_modules(esgd_cuda.__path__):\n"
            "    importlib.import_module('esgd_cuda.' + m.name)\n"
            f"added = set(sys.modules) - before\n"
            f"print(json.dumps(sorted(m for m in added if m.split('.')[0] in {CLIENT_LIBRARIES!r})))")
    env = dict(os.environ, PYTHONPATH=str(Path(esgd_cuda.__file__).resolve().parent.parent))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
    # and the libraries are there, so the check above is not vacuous (scripts/setup.sh installs them)
    proc = subprocess.run([sys.executable, "-c", "import lightning, transformers, timm, pytorch_optimizer, torchzero"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def _setup_sh_pins() -> dict[str, str]:
    text = (ROOT / "scripts" / "setup.sh").read_text()
    block = re.search(r"EXTRAS_SPEC=\((.*?)\)", text, re.S)
    assert block, "scripts/setup.sh has no EXTRAS_SPEC"
    return dict(spec.split("==") for spec in shlex.split(block[1]))


def _setup_py_extras() -> dict[str, list[str]]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "EXTRAS_REQUIRE":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no EXTRAS_REQUIRE")


def test_setup_sh_pins_match_setup_py_extras():
    pins = _setup_sh_pins()
    extras = _setup_py_extras()
    pinned = dict(spec.split("==") for group in extras.values() for spec in group if "==" in spec)
    # torchvision is pinned in setup.sh only, to torch 2.14.1's release; users' pip matches it to their torch.
    assert {k: v for k, v in pins.items() if k != "torchvision"} == pinned
    assert pins["torchvision"] == "0.29.1"
    assert {"lightning", "transformers", "timm"} <= {s.split("==")[0] for s in extras["examples"]}
    assert {"pytorch-optimizer", "torchzero"} <= {s.split("==")[0] for s in extras["bench"]}
    assert "torch" not in pins


def test_fsdp2_with_a_dcp_checkpoint_on_two_gloo_ranks(tmp_path):
    """torchrun --nproc_per_node=2 on CPU, from outside the repository: FSDP2-sharded training through
    a DCP save and resume, every rank on the installed kernels, a clean exit."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(EXAMPLES / "fsdp2_esgd.py"), "--steps", "30"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420, env=example_env(), cwd=tmp_path)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "terminate called" not in proc.stderr, proc.stderr[-4000:]
    out = proc.stdout
    check_kernels(out, ranks=2)
    assert re.search(r"^resumed from .* at step 15$", out, re.M), out
    first, last, diagnostics = training_summary(out)
    assert last < 0.9 * first, (first, last)
    assert diagnostics[0]["step"] == 30 and diagnostics[0]["estimates"] > 0, diagnostics
    held = json.loads(re.search(r"^optimizer state per rank: (\[.*\]) elements of (\d+)$", out, re.M)[1])
    total = int(re.search(r"^optimizer state per rank: .* elements of (\d+)$", out, re.M)[1])
    assert len(held) == 2 and sum(held) == total and max(held) < 0.6 * total, (held, total)
