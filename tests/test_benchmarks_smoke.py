"""The benchmark scripts run end to end at a tiny size, so they cannot rot unnoticed.

Each script's main() is called in-process with its --smoke preset; the JSON, markdown and PNG it writes
must exist and hold finite, sane numbers. The analysis helpers are checked on hand-made inputs.
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    import convergence
    import step_time

    return step_time, convergence


def _finite_positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


# ------------------------------------------------------------------------------------------ step time

def test_step_time_byte_model(bench):
    step_time, _ = bench
    assert step_time.bytes_per_param("esgd", torch.float32) == 24
    assert step_time.bytes_per_param("esgd_hz", torch.float32) == 32
    assert step_time.bytes_per_param("adam", torch.float32) == 28
    # 16-bit parameters keep float32 state: p, g (and Hz) shrink, m and D do not.
    assert step_time.bytes_per_param("esgd", torch.bfloat16) == 18
    assert step_time.bytes_per_param("esgd_hz", torch.bfloat16) == 24
    assert step_time.bytes_per_param("adam", torch.bfloat16) == 14
    assert step_time.bytes_per_param("esgd", torch.float64) == 48
    # bf16 state (state_dtype=torch.bfloat16): 2-byte m and D.
    assert step_time.bytes_per_param("esgd_bf16state", torch.float32) == 18
    assert step_time.bytes_per_param("esgd_hz_bf16state", torch.float32) == 24
    assert step_time.bytes_per_param("esgd_bf16state", torch.bfloat16) == 12
    assert step_time.bytes_per_param("esgd_hz_bf16state", torch.bfloat16) == 16
    assert step_time.bytes_per_param("esgd_fd_forward_bf16state", torch.float32) == 24
    # The peers keep their state in the parameter dtype; torchzero's ESGD has no momentum.
    assert step_time.bytes_per_param("peer", torch.float32) == 24
    assert step_time.bytes_per_param("peer_hz", torch.float32) == 32
    assert step_time.bytes_per_param("peer", torch.bfloat16) == 12
    assert step_time.bytes_per_param("tz", torch.float32) == 16
    assert step_time.bytes_per_param(None, torch.float32) is None
    # Finite differences: the forward update reads g+ in place of Hz, the central one also g-.
    assert step_time.bytes_per_param("esgd_fd_forward", torch.float32) == 32
    assert step_time.bytes_per_param("esgd_fd_central", torch.float32) == 36
    assert step_time.bytes_per_param("esgd_fd_forward", torch.bfloat16) == 24
    assert step_time.bytes_per_param("esgd_fd_central", torch.bfloat16) == 26
    assert step_time.bytes_per_param("esgd_fd_central", torch.float64) == 72
    # Perturbation: read p, write backup and p (save) or read backup, write p; fills write once.
    assert step_time.bytes_per_param("perturb_save", torch.float32) == 12
    assert step_time.bytes_per_param("perturb_restore", torch.bfloat16) == 4
    assert step_time.bytes_per_param("fill", torch.float16) == 2
    assert step_time.bytes_per_param("fill", torch.float64) == 8
    with pytest.raises(ValueError, match="unknown byte model"):
        step_time.bytes_per_param("esgd_fd", torch.float32)


def test_step_time_shapes_match_the_issue(bench):
    step_time, _ = bench
    issue3 = step_time.SHAPES["issue3-19M"]
    assert len(issue3.sizes) == 150
    assert 18.5e6 < issue3.numel < 19.5e6
    assert issue3.sizes.count(4 << 20) >= 2 and sum(n < 10_000 for n in issue3.sizes) >= 100
    assert step_time.SHAPES["many-small"].sizes == (1024,) * 1000
    assert step_time.SHAPES["gpt2-124M"].numel >= 100e6
    assert 0.9e6 < step_time.SHAPES["gpt-1M"].numel < 1.5e6
    assert "gpt2-124M" in step_time.PRESETS["cuda"]["shapes"]


# The peers' documented backward(create_graph=True) warns about the parameter <-> gradient cycle; the
# benchmark sets p.grad to None after each such step, which breaks it.
@pytest.mark.filterwarnings(r"ignore:Using backward\(\) with create_graph=True")
def test_step_time_smoke(bench, tmp_path):
    step_time, _ = bench
    import esgd_cuda._extension as ext

    result = step_time.main(["--smoke", "--device", "cpu", "--out", str(tmp_path), "--quiet"])
    data = json.loads(result["outputs"]["json"].read_text())
    markdown = result["outputs"]["markdown"].read_text()
    assert _finite_positive(data["copy_gbs"])
    assert "torch" in markdown and data["environment"]["torch"] == torch.__version__

    rows = data["rows"]
    groups = {(r["shape"], r["dtype"]) for r in rows}
    assert groups == {(s, d) for s in ("smoke-mix", "smoke-small") for d in ("fp32", "bf16")}
    for r in rows:
        fused_row = re.match(r"(quadratic: )?ESGD fused[: ]", r["case"]) is not None
        expected_to_run = not fused_row or ext.fused_supported(torch.device("cpu"),
                                                               step_time.DTYPES[r["dtype"]])
        if not expected_to_run:
            assert r["skipped"] and r["ms"] is None
            continue
        assert r["skipped"] is None, r
        # Rows that include autograd or a closure's finite difference have no byte model.
        measured = ("ms", "vs_adam_fused") if r["bytes_per_param"] is None else (
            "ms", "gbs", "copy_fraction", "vs_adam_fused")
        for key in measured:
            assert _finite_positive(r[key]), (key, r)
        assert r["case"] in markdown
        if r["case"] == "Adam fused":
            assert r["vs_adam_fused"] == 1.0
    cases = {r["case"] for r in rows}
    assert {"ESGD fused=False: opt.step() plain", "ESGD fused=False: esgd_update estimation (+Hz)",
            "ESGD fused: opt.step() plain", "ESGD fused: esgd_update estimation (+Hz)",
            "Adam fused", "Adam foreach", "AdamW fused", "AdamW foreach"} <= cases
    assert {"ESGD fused bf16 state: opt.step() plain", "ESGD fused bf16 state: esgd_update plain",
            "ESGD fused bf16 state: esgd_update estimation (+Hz)", "ESGD fused bf16 state: esgd_update_fd forward"} <= cases
    assert {"ESGD fused: esgd_update_fd forward", "ESGD fused: esgd_update_fd central",
            "ESGD fused: fd_perturb_ save", "ESGD fused: fd_perturb_ restore", "ESGD fused: rademacher_",
            "Tensor.fill_ (the rademacher_ tensors)"} <= cases
    # Every peer row ran (scripts/setup.sh installs the peers; a missing one would be n/a).
    peer_rows = {step_time._step_label(name, kind) for name, kind in step_time.PEER_ROWS}
    assert peer_rows <= cases and len(peer_rows) == len(step_time.PEER_ROWS)
    assert {"AdaHessian: step() plain", "AdaHessian: step(hessian=Hz) estimation", "SophiaH: step() plain",
            "SophiaH: step(hessian=Hz) estimation", "torchzero ESGD: step(closure) plain",
            "torchzero ESGD fd_forward: step(closure) estimation"} <= peer_rows
    for r in rows:
        if r["case"] in peer_rows and not r["case"].startswith("quadratic: ESGD"):
            assert r["skipped"] is None and _finite_positive(r["ms"]), r


def test_step_time_peer_steps_move_the_parameters(bench):
    """Each timed peer step does the update it claims: the parameters change, the estimation rows
    update the Hessian statistics, the plain rows leave them alone."""
    step_time, _ = bench
    import esgd_cuda

    import esgd_cuda._extension as ext

    shape = step_time.SHAPES["smoke-mix"]
    for name, kind in step_time.PEER_ROWS:
        if name == "esgd" and not ext.fused_supported(torch.device("cpu"), torch.float32):
            continue  # the row times the fused kernel; test_step_time_smoke checks it is n/a then
        gen = torch.Generator().manual_seed(0)
        case = step_time.peer_case(esgd_cuda, name, kind, shape, torch.float32, torch.device("cpu"), gen)
        opt = case.optimizer
        params = [p for g in opt.param_groups for p in g["params"]]
        before = [p.detach().clone() for p in params]
        stats = {"adahessian": "exp_hessian_diag_sq", "sophiah": "hessian_moment"}.get(name)
        d_before = [opt.state[p][stats].clone() for p in params] if stats else None
        case.fn()
        if not (name == "tz-esgd" and kind == "fd"):  # its gradient is zero from the first estimate on
            assert any(not torch.equal(b, p) for b, p in zip(before, params)), (name, kind)
        if stats:
            changed = any(not torch.equal(b, opt.state[p][stats]) for b, p in zip(d_before, params))
            assert changed == (kind != "plain"), (name, kind)


def test_step_time_rejects_unknown_shape(bench, tmp_path):
    step_time, _ = bench
    with pytest.raises(SystemExit, match="--shapes"):
        step_time.main(["--shapes", "nope", "--device", "cpu", "--out", str(tmp_path)])


def test_step_time_cases_selects_rows_and_keeps_adam(bench, tmp_path):
    """--cases REGEX: the matching rows and fused Adam, each ratio paired with Adam's round."""
    step_time, _ = bench
    data = step_time.main(["--smoke", "--device", "cpu", "--shapes", "smoke-mix", "--dtypes", "fp32",
                           "--rounds", "2", "--cases", r"bf16 state: esgd_update plain|^Adam foreach$",
                           "--out", str(tmp_path), "--quiet"])
    rows = data["rows"]
    assert sorted(r["case"] for r in rows) == sorted(["ESGD fused bf16 state: esgd_update plain", "Adam fused",
                                                      "Adam foreach"])
    adam = next(r for r in rows if r["case"] == "Adam fused")
    for r in rows:
        assert len(r["round_ms"]) == 2
        paired = sorted(a / b for a, b in zip(r["round_ms"], adam["round_ms"]))
        assert r["vs_adam_fused"] == pytest.approx((paired[0] + paired[1]) / 2)
    with pytest.raises(SystemExit):
        step_time.parse_args(["--cases", "("])


# ------------------------------------------------------------------------------------------ convergence

def _run(problem, opt, lr, seed, losses, seconds_per_step, every=10):
    steps = [i * every for i in range(len(losses))]
    return dict(problem=problem, optimizer=opt, lr=lr, seed=seed, steps=steps, loss=list(losses),
                time=[s * seconds_per_step for s in steps], steps_done=steps[-1],
                train_seconds=steps[-1] * seconds_per_step, final_loss=losses[-1], test_metric=0.5,
                diverged=not math.isfinite(losses[-1]))


def test_state_precision_smoke(tmp_path, monkeypatch):
    """benchmarks/state_precision.py: the noise of bf16 state in D next to the estimator's own, at a
    tiny size; every number finite, stochastic rounding below the probes' own noise (which, after
    a few tens of estimates, is many times D itself where D is small) and unbiased, the float32 copy
    far closer to float64 than either 16-bit one."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import state_precision

    result = state_precision.main(["--smoke", "--out", str(tmp_path)])
    (run,) = result["runs"]
    assert run["problem"] == "digits-mlp" and [r["estimates"] for r in run["rows"]] == [10, 30]
    for r in run["rows"]:
        for key in ("sr_rms", "rn_rms", "m_sr", "m_rn"):
            assert 0 < r[key] < 1, (key, r)
        assert r["sr_rms"] < r["estimator_rms"] < math.inf, r
        assert abs(r["sr_mean"]) < 1e-3, r
        assert r["fp32_rms"] < 1e-3 * r["sr_rms"]
    assert (tmp_path / "state_precision_smoke.md").read_text().count("|") > 20


def test_convergence_aggregate(bench):
    _, convergence = bench
    p = "rosenbrock"
    runs = [
        # Adam: lr 1e-2 is best (mean final 0.2); target = 0.2
        _run(p, "adam", 1e-2, 0, [1.0, 0.5, 0.3, 0.1], 1e-3),
        _run(p, "adam", 1e-2, 1, [1.0, 0.7, 0.5, 0.3], 1e-3),
        _run(p, "adam", 1e-1, 0, [1.0, 0.9, 0.8, 0.7], 1e-3),
        _run(p, "adam", 1e-1, 1, [1.0, 0.9, 0.8, 0.7], 1e-3),
        # ESGD: lr 1 diverges on one seed, so lr 0.1 is best; mean curve 1, 0.4, 0.15 hits at step 20.
        # Seed 1 ran on a busier core: timings take the faster seed.
        _run(p, "esgd", 1e-1, 0, [1.0, 0.3, 0.1, 0.05], 3e-3),
        _run(p, "esgd", 1e-1, 1, [1.0, 0.5, 0.2, 0.05], 5e-3),
        _run(p, "esgd", 1.0, 0, [1.0, 0.01, 0.001, 0.0001], 3e-3),
        _run(p, "esgd", 1.0, 1, [1.0, math.inf], 3e-3),
    ]
    agg = convergence.aggregate(runs)
    rows = {r["optimizer"]: r for r in agg["summary"]}
    adam, esgd = rows["adam"], rows["esgd"]
    assert adam["best_lr"] == 1e-2 and esgd["best_lr"] == 1e-1
    assert adam["target"] == pytest.approx(0.2) and esgd["target"] == pytest.approx(0.2)
    assert adam["final_loss"] == pytest.approx(0.2) and esgd["final_loss"] == pytest.approx(0.05)
    assert adam["steps_to_target"] == 30 and esgd["steps_to_target"] == 20
    assert adam["seconds_to_target"] == pytest.approx(0.03)
    assert esgd["seconds_to_target"] == pytest.approx(0.06)
    assert esgd["time_to_target_vs_adam"] == pytest.approx(2.0)
    assert esgd["step_time_vs_adam"] == pytest.approx(3.0)
    assert esgd["ms_per_step"] == pytest.approx(3.0)
    diverged = next(s for s in agg["sweeps"] if s["optimizer"] == "esgd" and s["lr"] == 1.0)
    assert diverged["diverged"] == 1 and math.isinf(diverged["final_loss"])


OPTIONAL_PACKAGES = ("sklearn", "matplotlib", "tqdm")  # what convergence.py imports besides torch


def test_convergence_smoke(bench, tmp_path):
    for name in OPTIONAL_PACKAGES:
        pytest.importorskip(name)
    _, convergence = bench
    result = convergence.main(["--smoke", "--device", "cpu", "--out", str(tmp_path), "--no-progress"])
    outputs = result["outputs"]
    data = json.loads(outputs["json"].read_text())
    markdown = outputs["markdown"].read_text()
    assert len(outputs["png"]) == 1
    png = outputs["png"][0].read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000

    problems = list(convergence.PROBLEMS)
    optimizers = convergence.DEFAULT_OPTIMIZERS
    summary = data["aggregate"]["summary"]
    assert {(r["problem"], r["optimizer"]) for r in summary} == {(p, o) for p in problems for o in optimizers}
    assert len(data["runs"]) == len(problems) * len(optimizers) * convergence.SEEDS["smoke"]
    for problem in problems:
        assert f"| {problem} | ESGD-M |" in markdown
    for r in summary:
        assert _finite_positive(r["ms_per_step"]), r
        if r["optimizer"] in ("esgd", "esgd-fd", "adam"):
            assert _finite_positive(r["final_loss"]), r
            assert r["diverged_seeds"] == 0, r
        if r["optimizer"] == "adam":
            # Adam's mean curve ends at the target, so it must reach it.
            assert r["steps_to_target"] is not None and r["time_to_target_vs_adam"] == 1.0
        if convergence.PROBLEMS[r["problem"]].metric and r["final_loss"] is not None:
            assert r["test_metric"] is not None and math.isfinite(r["test_metric"]), r
    # ESGD-M (exact and finite-difference) and Adam make progress on every problem in 24 steps.
    for best in data["aggregate"]["best"]:
        if best["optimizer"] in ("esgd", "esgd-fd", "adam"):
            assert best["loss"][-1] < best["loss"][0], best
    acc = next(r["test_metric"] for r in summary if r["problem"] == "digits-mlp" and r["optimizer"] == "adam")
    assert 0.1 < acc <= 1.0
    # The second-order peers ran every problem in the same run (scripts/setup.sh installs them), each
    # with its own learning rate and a finite amortized step time.
    peers = set(convergence._peers.PEERS)
    assert peers <= set(optimizers)
    for r in summary:
        if r["optimizer"] in peers:
            assert r["best_lr"] == convergence._peers.PEERS[r["optimizer"]].default_lr, r
            assert _finite_positive(r["run_ms_per_step"]), r
    for run in data["runs"]:
        assert run["steps_done"] > 0, run
    assert "Hessian-vector products, each optimizer on its library's default schedule" in markdown
    assert "SophiaH every 10th step" in markdown and "torchzero ESGD every 20th step" in markdown


def _quadratic_instance(dim=6, seed=0):
    """A separable quadratic 0.5*sum(a*x^2), minibatch-free: its Hessian is diag(a)."""
    torch.manual_seed(seed)
    a = torch.linspace(0.5, 3.0, dim, dtype=torch.float64)
    x = torch.nn.Parameter(torch.randn(dim, dtype=torch.float64))
    return a, x, lambda: 0.5 * (a * x * x).sum()


def test_peer_drivers_estimate_on_their_default_schedules(bench):
    """convergence.train_step drives each peer as its source asks: AdaHessian takes z*Hz from the graph
    on every step (Rademacher z, so z*Hz = diag(H) exactly on a diagonal Hessian), SophiaH on steps
    0, 10, 20, ..., torchzero's ESGD on steps 0, 20, 40, ..."""
    _, convergence = bench
    a, x, loss = _quadratic_instance()
    opt = convergence.make_optimizer("adahessian", [x], 1e-2, 0, torch.device("cpu"))
    for step in range(3):
        convergence.train_step("adahessian", opt, lambda step: loss(), step)
        torch.testing.assert_close(opt.state[x]["hessian"], a)
        assert x.grad is None  # the graph (and the parameter <-> gradient cycle) is gone after the step

    a, x, loss = _quadratic_instance()
    opt = convergence.make_optimizer("sophiah", [x], 1e-2, 0, torch.device("cpu"))
    estimated, graphs = [], []
    for step in range(25):
        moment = opt.state[x]["hessian_moment"].clone() if x in opt.state else None
        convergence.train_step("sophiah", opt, lambda step: loss(), step)
        estimated.append(moment is None or not torch.equal(moment, opt.state[x]["hessian_moment"]))
        # The double-backward graph is built (and dropped after the step) only when SophiaH uses it.
        graphs.append(x.grad is None)
        assert x.grad is None or not x.grad.requires_grad
    assert [i for i, e in enumerate(estimated) if e] == [0, 10, 20]
    assert graphs == estimated

    a, x, loss = _quadratic_instance()
    opt = convergence.make_optimizer("tz-esgd", [x], 1e-2, 0, torch.device("cpu"))
    calls = []

    def batch_loss(step):
        calls.append((step, torch.is_grad_enabled()))
        return loss()

    counts = []
    for step in range(41):
        convergence.train_step("tz-esgd", opt, batch_loss, step)
        counts.append(opt.modules[0].global_state["num_Hzs"])
    assert [i for i in range(41) if counts[i] != (counts[i - 1] if i else 0)] == [0, 20, 40]
    # One loss evaluation per step, with autograd on (torchzero takes the graph's gradient itself on
    # estimating steps).
    assert calls == [(step, True) for step in range(41)]


def test_convergence_batches_are_fixed_within_a_step(bench):
    """Closures re-evaluate a step's loss: the batch must not change between calls, and the stream of
    batches is the one a single evaluation per step draws."""
    _, convergence = bench
    sample = convergence._batch_sampler(1000, 8, seed=3, device=torch.device("cpu"))
    first, again, second = sample(0), sample(0), sample(1)
    assert torch.equal(first, again) and not torch.equal(first, second)
    gen = torch.Generator().manual_seed(10_003)
    assert torch.equal(first, torch.randint(0, 1000, (8,), generator=gen))
    assert torch.equal(second, torch.randint(0, 1000, (8,), generator=gen))
    inst = convergence.PROBLEMS["char-transformer"].instance(0, torch.device("cpu"), "smoke")
    assert inst.batch_loss(5).item() == inst.batch_loss(5).item() != inst.batch_loss(6).item()


def test_convergence_steady_blocks_hold_whole_estimation_periods(bench):
    _, convergence = bench
    assert convergence.steady_block(["esgd", "adam", "adamw", "sgd"], 30) == 30
    assert convergence.steady_block(convergence.DEFAULT_OPTIMIZERS, 30) == 40  # torchzero: every 20th
    assert convergence.steady_block(["adam", "adahessian"], 30) == 30
    assert convergence.steady_block(convergence.DEFAULT_OPTIMIZERS, 10) == 20


def test_peer_learning_rates_centre_on_their_documented_defaults(bench):
    _, convergence = bench
    for name, peer in convergence._peers.PEERS.items():
        quick, full = convergence.LR_GRIDS["quick"][name], convergence.LR_GRIDS["full"][name]
        assert quick == [pytest.approx(peer.default_lr / 10), peer.default_lr, pytest.approx(peer.default_lr * 10)]
        assert len(full) == 7 and full[3] == pytest.approx(peer.default_lr)
        assert len(quick) == len(convergence.LR_GRIDS["quick"]["adam"])


@pytest.mark.parametrize("package", OPTIONAL_PACKAGES)
def test_convergence_smoke_skips_without_an_optional_package(tmp_path, package):
    """A machine's image (the GPU machines' among them) may lack a package CI installs."""
    (tmp_path / "block_package.py").write_text(f"import sys\nsys.modules[{package!r}] = None\n")
    import esgd_cuda

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path),
                                                       str(Path(esgd_cuda.__file__).parents[1])]))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                          "-p", "block_package", f"{__file__}::test_convergence_smoke"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "1 skipped" in run.stdout, run.stdout[-3000:]
    assert f"could not import '{package}'" in run.stdout, run.stdout[-3000:]


# ------------------------------------------------------------------------------------------ GPU suite
# benchmarks/gpu_suite.sh is meant for the rare session with a GPU, inside one 10-minute call. These
# run it for real in its rehearsal mode (the project's interpreter, every stage script up to its
# device check) and with stand-in interpreters (its control flow), so it cannot rot between sessions.
GPU_SUITE = BENCH_DIR / "gpu_suite.sh"
SUITE_ORDER = ["build", "tests", "memcheck", "bandwidth", "step_time", "racecheck", "ncu"]
DEVICE_BUDGET = 540  # seconds, inside the device tool's 600 s call
REHEARSAL_LINE = "rehearsal: reached device check"


def _suite_stages():
    """(name, limit in seconds, arguments after the interpreter) of each stage call, in order."""
    calls = re.findall(r'^\s*(?:if )?stage (\w+) (\d+) "\$PYTHON" (.*?)(?:; then| \|\| true)$',
                       GPU_SUITE.read_text(), re.M)
    return [(name, int(limit), args) for name, limit, args in calls]


def _suite_env(tmp_path, python, budget=None, **extra):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ESGD_SUITE_") and k not in ("MAX_JOBS", "ESGD_CUDA_BUILD")}
    env.update(PYTHON=str(python), OUT=str(out), TMPDIR=str(tmp_path), **extra)
    if budget is not None:
        env["ESGD_SUITE_BUDGET"] = str(budget)
    return env, out


def _run_suite(tmp_path, python, budget, timeout=120, **extra):
    # Only /usr/bin and /bin: no compute-sanitizer, ncu or nvcc, as on a machine without CUDA.
    env, out = _suite_env(tmp_path, python, budget, PATH="/usr/bin:/bin", **extra)
    env.pop("CUDA_HOME", None)
    run = subprocess.run(["bash", str(GPU_SUITE)], env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert "== gpu_suite summary" in run.stdout, run.stdout + run.stderr
    summary = run.stdout[run.stdout.index("== gpu_suite summary"):]
    return run, summary, out


def _stage_logs(log_text):
    """{stage: its log} from the combined gpu_suite.log."""
    parts = re.split(r"^===== (\w+)\.log\n", log_text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_gpu_suite_stages_fit_the_device_budget():
    stages = _suite_stages()
    assert [name for name, _, _ in stages] == SUITE_ORDER
    assert sum(limit for _, limit, _ in stages) <= DEVICE_BUDGET, stages
    for name, _, args in stages[1:]:
        script = args.split()[0]
        assert script.startswith("benchmarks/gpu/") and (BENCH_DIR.parent / script).is_file(), (name, args)
    # The header's budget table is the arithmetic the limits come from: it must agree with them.
    text = GPU_SUITE.read_text()
    table = re.findall(r"^#   (\w+)\s.*\s(\d+)\s+(\d+)$", text, re.M)
    assert {name: int(limit) for name, _, limit in table} == {n: lim for n, lim, _ in stages}, table
    assert f"budget of {DEVICE_BUDGET} s" in text


# The suite's `tests` stage runs `pytest -m cuda`; tests/conftest.py adds the marker. Evaluated here
# without a GPU: each test that skips for lack of one must be selected, and only those.
_SELECTION_PLUGIN = """
import json, os, re
from _pytest.skipping import evaluate_skip_marks

GPU = re.compile(r"\\b(cuda|gpu)\\b", re.IGNORECASE)


def pytest_collection_finish(session):
    rows = []
    for item in session.items:
        skip = evaluate_skip_marks(item)
        rows.append(dict(id=item.nodeid, marked=item.get_closest_marker("cuda") is not None,
                         gpu_skip=bool(skip and GPU.search(skip.reason))))
    with open(os.environ["SELECTION_OUT"], "w") as f:
        json.dump(rows, f)
"""


def _collect(tmp_path, *args):
    (tmp_path / "selection_plugin.py").write_text(_SELECTION_PLUGIN)
    out = tmp_path / f"selection{len(args)}.json"
    import esgd_cuda

    env = dict(os.environ, SELECTION_OUT=str(out),
               PYTHONPATH=os.pathsep.join([str(tmp_path), str(Path(esgd_cuda.__file__).parents[1])]))
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "-p", "selection_plugin", *args, str(BENCH_DIR.parent / "tests")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(out.read_text())


def test_cuda_marker_selects_every_test_that_needs_a_gpu(tmp_path):
    rows = _collect(tmp_path)
    marked = {r["id"] for r in rows if r["marked"]}
    selected = {r["id"] for r in _collect(tmp_path, "-m", "cuda")}
    assert selected == marked
    files = {i.split("::")[0].rsplit("/", 1)[-1] for i in marked}
    assert {"test_kernels.py", "test_optimizer.py", "test_capturable.py", "test_compile.py",
            "test_accumulation.py", "test_optimizer_state.py"} <= files, files
    if not torch.cuda.is_available():
        needs_gpu = {r["id"] for r in rows if r["gpu_skip"]}
        assert marked == needs_gpu, (sorted(needs_gpu - marked), sorted(marked - needs_gpu))


def test_an_unmarked_test_that_skips_for_lack_of_a_gpu_fails(tmp_path):
    """Skips from a test's body are only known at run time: the conftest turns an unmarked one into
    a failure, so a CUDA test the suite would never run cannot pass CI as a skip."""
    tests = tmp_path / "tests"
    tests.mkdir()
    for name in ("conftest.py", "reference.py"):
        (tests / name).write_text((BENCH_DIR.parent / "tests" / name).read_text())
    (tests / "test_skips.py").write_text(
        "import pytest\n\n"
        "def test_unmarked():\n    pytest.skip('needs a CUDA device')\n\n"
        "@pytest.mark.cuda\ndef test_marked():\n    pytest.skip('needs a CUDA device')\n\n"
        "def test_other_skip():\n    pytest.skip('needs scipy')\n")
    import esgd_cuda

    env = dict(os.environ, PYTHONPATH=str(Path(esgd_cuda.__file__).parents[1]))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", str(tests)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stdout
    assert re.search(r"^FAILED .*test_unmarked", run.stdout, re.M), run.stdout
    assert "add @pytest.mark.cuda" in run.stdout
    assert re.search(r"^SKIPPED .*test_skips.py:\d+: needs a CUDA device", run.stdout, re.M), run.stdout
    assert re.search(r"^SKIPPED .*needs scipy", run.stdout, re.M), run.stdout
    assert "1 failed, 2 skipped" in run.stdout, run.stdout


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """One real rehearsal (a CPU-only build in a copy, then every stage script), kept for inspection."""
    tmp_path = tmp_path_factory.mktemp("rehearsal")
    env, out = _suite_env(tmp_path, sys.executable, ESGD_SUITE_REHEARSAL="1", ESGD_SUITE_KEEP_COPY="1")
    # The build needs the environment's ninja and compilers, as scripts/test.sh has them.
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "/usr/bin:/bin")])
    run = subprocess.run(["bash", str(GPU_SUITE)], env=env, capture_output=True, text=True,
                         timeout=1800, cwd=BENCH_DIR.parent)
    copy = re.search(r"^rehearsal: CPU-only build .* in (\S+)$", run.stdout, re.M)
    return run, out, Path(copy.group(1)) if copy else None


def test_gpu_suite_rehearsal_reaches_every_device_check(rehearsal):
    run, out, copy = rehearsal
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    summary = run.stdout[run.stdout.index("== gpu_suite summary (rehearsal"):]
    for name in SUITE_ORDER:
        assert re.search(rf"^{name}\s+ok\s", summary, re.M), (name, summary)
    logs = _stage_logs((out / "gpu_suite.log").read_text())
    assert list(logs) == SUITE_ORDER
    for name in SUITE_ORDER[1:]:
        # Each stage imported the build the suite made in the copy, then stopped at its device check.
        assert f"esgd_cuda from {copy / 'esgd_cuda'} " in logs[name], (name, logs[name])
        assert REHEARSAL_LINE in logs[name], (name, logs[name])
    selected = re.search(r"\[tests\] (\d+) CUDA tests selected", logs["tests"])
    assert selected and int(selected.group(1)) > 0, logs["tests"]
    assert (out / "summary.txt").read_text().startswith("== gpu_suite summary (rehearsal")


def test_gpu_stage_scripts_refuse_a_build_other_than_the_suites(rehearsal):
    """The review's bug: a stage script that does not put the repository root first on sys.path
    imports no build (GPU machine) or an installed one (CI). Either must fail before the device
    check, in every stage script."""
    run, _, copy = rehearsal
    assert run.returncode == 0 and copy is not None and copy.is_dir(), run.stdout[-3000:]
    helper = copy / "benchmarks" / "gpu" / "_stage.py"
    text = helper.read_text()
    assert "sys.path.insert(0, str(ROOT))" in text
    helper.write_text(text.replace("sys.path.insert(0, str(ROOT))", "pass"))
    env = dict(os.environ, ESGD_SUITE_REHEARSAL="1", PYTHONPATH="")
    try:
        for name, _, args in _suite_stages()[1:]:
            result = subprocess.run([sys.executable, *args.split()], cwd=copy, env=env,
                                    capture_output=True, text=True, timeout=300)
            output = result.stdout + result.stderr
            assert result.returncode != 0 and REHEARSAL_LINE not in output, (name, output)
            assert ("not the suite's in-place build" in output
                    or "No module named 'esgd_cuda'" in output), (name, output)
    finally:
        helper.write_text(text)


def test_gpu_suite_reports_every_stage_when_the_build_fails(tmp_path):
    run, summary, out = _run_suite(tmp_path, "false", DEVICE_BUDGET)
    assert run.returncode == 1
    assert re.search(r"^build\s+FAILED", summary, re.M), summary
    for name in SUITE_ORDER[1:]:
        assert re.search(rf"^{name}\s+skipped\s+\(build failed\)", summary, re.M), (name, summary)
    assert (out / "gpu_suite.log").is_file() and (out / "summary.txt").is_file()


def test_gpu_suite_budget_skips_stages_but_prints_the_summary(tmp_path):
    slow = tmp_path / "slow-python"
    slow.write_text("#!/bin/sh\nsleep 2\nexit 0\n")
    slow.chmod(0o755)
    run, summary, _ = _run_suite(tmp_path, slow, 24)
    assert run.returncode == 1, summary
    assert re.search(r"^build\s+ok", summary, re.M), summary
    cut = re.findall(r"^(\w+)\s+skipped\s+\(suite budget of 24s spent\)", summary, re.M)
    assert "bandwidth" in cut and "ncu" in cut, summary
    for name in SUITE_ORDER:
        assert re.search(rf"^{name}\s", summary, re.M), (name, summary)


def test_gpu_suite_logs_are_complete_when_copied(tmp_path):
    """Every stage's log in $OUT ends with the stage's last line, even when the suite's own output
    drains slowly (the device tool reads it over a pipe): the copy must wait for the log writer."""
    chatty = tmp_path / "chatty-python"
    chatty.write_text('#!/bin/sh\nhead -c 200000 /dev/zero | tr "\\0" x | fold -w 100; echo\n'
                      'echo "END OF $*"\n')
    chatty.chmod(0o755)
    env, out = _suite_env(tmp_path, chatty, DEVICE_BUDGET, PATH="/usr/bin:/bin")
    slow_reader = ("import sys, time\n"
                   "for chunk in iter(lambda: sys.stdin.buffer.read(16384), b''):\n"
                   "    time.sleep(0.05)\n")
    run = subprocess.run(["bash", "-c", 'bash "$0" | "$1" -c "$2"', str(GPU_SUITE), sys.executable,
                          slow_reader], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    logs = _stage_logs((out / "gpu_suite.log").read_text())
    assert list(logs) == SUITE_ORDER
    for name, _, args in _suite_stages():
        assert logs[name].rstrip("\n").rsplit("\n", 1)[-1] == f"END OF {args}", (name, logs[name][-300:])
