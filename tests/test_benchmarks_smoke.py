"""The benchmark scripts run end to end at a tiny size, so they cannot rot unnoticed.

Each script's main() is called in-process with its --smoke preset; the JSON, markdown and PNG it writes
must exist and hold finite, sane numbers. The analysis helpers are checked on hand-made inputs.
"""

import json
import math
import os
import re
import subprocess
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
    # The peers keep their state in the parameter dtype; torchzero's ESGD has no momentum.
    assert step_time.bytes_per_param("peer", torch.float32) == 24
    assert step_time.bytes_per_param("peer_hz", torch.float32) == 32
    assert step_time.bytes_per_param("peer", torch.bfloat16) == 12
    assert step_time.bytes_per_param("tz", torch.float32) == 16
    assert step_time.bytes_per_param(None, torch.float32) is None


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


# ------------------------------------------------------------------------------------------ convergence

def _run(problem, opt, lr, seed, losses, seconds_per_step, every=10):
    steps = [i * every for i in range(len(losses))]
    return dict(problem=problem, optimizer=opt, lr=lr, seed=seed, steps=steps, loss=list(losses),
                time=[s * seconds_per_step for s in steps], steps_done=steps[-1],
                train_seconds=steps[-1] * seconds_per_step, final_loss=losses[-1], test_metric=0.5,
                diverged=not math.isfinite(losses[-1]))


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


def test_convergence_smoke(bench, tmp_path):
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
        if r["optimizer"] in ("esgd", "adam"):
            assert _finite_positive(r["final_loss"]), r
            assert r["diverged_seeds"] == 0, r
        if r["optimizer"] == "adam":
            # Adam's mean curve ends at the target, so it must reach it.
            assert r["steps_to_target"] is not None and r["time_to_target_vs_adam"] == 1.0
        if convergence.PROBLEMS[r["problem"]].metric and r["final_loss"] is not None:
            assert r["test_metric"] is not None and math.isfinite(r["test_metric"]), r
    # Both ESGD-M and Adam make progress on every problem in 24 steps.
    for best in data["aggregate"]["best"]:
        if best["optimizer"] in ("esgd", "adam"):
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


# benchmarks/gpu_suite.sh is meant for the rare session with a GPU, inside one 10-minute call; these
# run it with a stand-in interpreter, so its control flow is checked on every CI run.
GPU_SUITE = BENCH_DIR / "gpu_suite.sh"


def _suite_stages():
    return re.findall(r"\bstage (\w+) \d+ ", GPU_SUITE.read_text())


def _run_suite(tmp_path, python, budget):
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHON=str(python), OUT=str(out), TMPDIR=str(tmp_path),
               ESGD_SUITE_BUDGET=str(budget), PATH="/usr/bin:/bin")
    env.pop("CUDA_HOME", None)  # no compute-sanitizer or ncu: those stages report "not found"
    run = subprocess.run(["bash", str(GPU_SUITE)], env=env, capture_output=True, text=True, timeout=120)
    assert "== gpu_suite summary" in run.stdout, run.stdout + run.stderr
    summary = run.stdout[run.stdout.index("== gpu_suite summary"):]
    return run, summary, out


def test_gpu_suite_reports_every_stage_when_the_build_fails(tmp_path):
    stages = _suite_stages()
    assert stages[0] == "build" and len(stages) == len(set(stages)) >= 8, stages
    run, summary, out = _run_suite(tmp_path, "false", 540)
    assert run.returncode == 1
    assert re.search(r"^build\s+FAILED", summary, re.M), summary
    for name in stages[1:]:
        assert re.search(rf"^{name}\s+skipped\s+\(build failed\)", summary, re.M), (name, summary)
    assert (out / "gpu_suite.log").is_file()


def test_gpu_suite_budget_skips_stages_but_prints_the_summary(tmp_path):
    slow = tmp_path / "slow-python"
    slow.write_text("#!/bin/sh\nsleep 2\nexit 0\n")
    slow.chmod(0o755)
    run, summary, _ = _run_suite(tmp_path, slow, 24)
    assert run.returncode == 1, summary
    assert re.search(r"^build\s+ok", summary, re.M), summary
    cut = re.findall(r"^(\w+)\s+skipped\s+\(suite budget of 24s spent\)", summary, re.M)
    assert "bandwidth" in cut and "step_time" in cut, summary
    for name in _suite_stages():
        assert re.search(rf"^{name}\s", summary, re.M), (name, summary)
