"""ESGD against the independent float64 reference, and its behaviour around the update rule."""

import math

import pytest
import torch
from conftest import DEVICES, SeparableProblem, assert_trajectory_matches, requires_cuda, run_steps
from reference import Hyper, run_reference

from esgd_cuda import ESGD

SHAPES = [(7,), (3, 5), (1,)]
NUM_STEPS = 60

HYPER_SETS = {
    "defaults": dict(),
    "qhm-decay": dict(
        lr=0.5,
        betas=(0.8, 0.99),
        v=0.5,
        lr_warmup=0.9,
        eps=1e-3,
        weight_decay=0.05,
        update_d_every=3,
        d_warmup=4,
    ),
    "no-momentum-every-step": dict(
        lr=0.3,
        betas=(0.0, 0.9),
        v=1.0,
        lr_warmup=0.0,
        eps=1e-6,
        weight_decay=0.2,
        update_d_every=1,
        d_warmup=1,
    ),
    "v0-fast-d": dict(
        lr=0.8,
        betas=(0.95, 0.5),
        v=0.0,
        lr_warmup=0.5,
        eps=1e-2,
        update_d_every=7,
        d_warmup=2,
    ),
    "adam-like": dict(
        lr=0.2,
        betas=(0.9, 0.999),
        v=1.0,
        lr_warmup=0.95,
        eps=1e-8,
        weight_decay=0.01,
        update_d_every=4,
        d_warmup=11,
    ),
}


def hyper_of(kwargs):
    betas = kwargs.get("betas", (0.9, 0.999))
    return Hyper(
        lr=kwargs.get("lr", 1.0),
        beta1=betas[0],
        beta2=betas[1],
        v=kwargs.get("v"),
        lr_warmup=kwargs.get("lr_warmup", 0.99),
        eps=kwargs.get("eps", 1e-4),
        weight_decay=kwargs.get("weight_decay", 0.0),
    )


def reference_for(problem, kwargs, num_steps, **extra):
    for rp in problem.refs:
        rp.hyper = hyper_of(kwargs)
    return run_reference(
        problem.refs,
        num_steps,
        kwargs.get("d_warmup", 20),
        kwargs.get("update_d_every", 10),
        **extra,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(HYPER_SETS))
@pytest.mark.parametrize(
    "dtype,rtol", [(torch.float64, 1e-9), (torch.float32, 2e-4)], ids=["fp64", "fp32"]
)
def test_matches_reference(name, dtype, rtol, fused, device):
    kwargs = HYPER_SETS[name]
    problem = SeparableProblem(SHAPES, dtype=dtype, seed=1, device=device)
    opt = ESGD(problem.params, **kwargs, seed=0, fused=fused)
    actual = run_steps(opt, problem, NUM_STEPS)
    expected = reference_for(problem, kwargs, NUM_STEPS)
    assert_trajectory_matches(actual, expected, SHAPES, rtol)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_matches_reference_with_manual_backward(fused):
    kwargs = HYPER_SETS["qhm-decay"]
    problem = SeparableProblem(SHAPES, seed=2)
    opt = ESGD(problem.params, **kwargs, seed=0, fused=fused)
    actual = run_steps(opt, problem, NUM_STEPS, use_helper=False)
    expected = reference_for(problem, kwargs, NUM_STEPS)
    assert_trajectory_matches(actual, expected, SHAPES, 1e-9)


def test_is_a_torch_optimizer():
    p = torch.zeros(3, requires_grad=True)
    opt = ESGD([p])
    assert isinstance(opt, torch.optim.Optimizer)
    group = opt.param_groups[0]
    assert group["lr"] == 1.0
    assert tuple(group["betas"]) == (0.9, 0.999)
    assert group["eps"] == 1e-4
    assert group["weight_decay"] == 0.0


def test_param_groups_with_different_hyperparameters(fused):
    shapes = [(5,), (4,), (2, 3)]
    group_kwargs = [
        dict(lr=0.7, betas=(0.85, 0.98), v=0.3, lr_warmup=0.8, eps=1e-3, weight_decay=0.1),
        dict(lr=0.2, betas=(0.5, 0.9), v=1.0, lr_warmup=0.0, eps=1e-5, weight_decay=0.0),
        dict(),
    ]
    problem = SeparableProblem(shapes, seed=3)
    groups = [dict(params=[p], **kw) for p, kw in zip(problem.params, group_kwargs)]
    opt = ESGD(groups, update_d_every=4, d_warmup=6, seed=0, fused=fused)
    actual = run_steps(opt, problem, NUM_STEPS)
    for rp, kw in zip(problem.refs, group_kwargs):
        rp.hyper = hyper_of(kw)
    expected = run_reference(problem.refs, NUM_STEPS, 6, 4)
    assert_trajectory_matches(actual, expected, shapes, 1e-9)


def test_lr_scheduler_edits_group_lr(fused):
    shapes = [(6,), (3,)]
    base_lrs = [0.9, 0.4]
    problem = SeparableProblem(shapes, seed=4)
    opt = ESGD(
        [dict(params=[problem.params[0]], lr=base_lrs[0]), dict(params=[problem.params[1]], lr=base_lrs[1])],
        update_d_every=5,
        d_warmup=3,
        seed=0,
        fused=fused,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.93**s)
    actual = []
    for _ in range(40):
        opt.zero_grad()
        opt.backward(problem.loss())
        opt.step()
        sched.step()
        actual.append([p.detach().clone() for p in problem.params])
    expected = run_reference(
        problem.refs, 40, 3, 5, lr_at=lambda s, j: base_lrs[j] * 0.93**s
    )
    assert_trajectory_matches(actual, expected, shapes, 1e-9)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("manual", [False, True], ids=["opt.backward", "loss.backward"])
def test_closure_returns_loss_and_matches_plain_steps(fused, manual):
    kwargs = dict(update_d_every=3, d_warmup=2, v=0.6)
    problem = SeparableProblem(SHAPES, seed=5)
    twin = SeparableProblem(SHAPES, seed=5)
    opt = ESGD(problem.params, **kwargs, seed=0, fused=fused)
    opt_twin = ESGD(twin.params, **kwargs, seed=0, fused=fused)
    reference_traj = run_steps(opt_twin, twin, 25)
    for s in range(25):
        seen = []

        def closure():
            opt.zero_grad()
            loss = problem.loss()
            if manual:
                loss.backward(create_graph=opt.should_create_graph())
            else:
                opt.backward(loss)
            seen.append(loss.detach())
            return loss

        returned = opt.step(closure)
        assert len(seen) == 1
        assert torch.equal(returned.detach(), seen[0])
        for p, expected in zip(problem.params, reference_traj[s]):
            assert torch.equal(p.detach(), expected)


def test_param_first_seen_on_plain_step_waits_for_next_estimate(fused):
    shapes = [(5,), (4,)]
    d_warmup, every, late_start = 3, 6, 4
    problem = SeparableProblem(shapes, seed=6)
    initial = problem.params[1].detach().clone()
    opt = ESGD(problem.params, update_d_every=every, d_warmup=d_warmup, seed=0, fused=fused)

    def has_grad(s, j):
        return j == 0 or s >= late_start

    actual = []
    for s in range(30):
        opt.zero_grad(set_to_none=True)
        active = {j for j in range(2) if has_grad(s, j)}
        opt.backward(problem.loss(active))
        if late_start <= s < 8:
            # Steps 4..7 are plain: the late parameter has a gradient but no curvature estimate yet.
            with pytest.warns(UserWarning, match=r"leaves 1 of the 2 parameters .*\['params'\]\[1\]"):
                opt.step()
        else:
            opt.step()
        actual.append([p.detach().clone() for p in problem.params])
        late = problem.params[1].detach()
        if s < 8:
            # Steps 4..7 are plain: the late parameter has a gradient but no curvature estimate yet.
            assert torch.equal(late, initial), f"late param moved on step {s} before its first estimate"
            assert "exp_avg" not in opt.state[problem.params[1]]
        if s == 8:
            assert not torch.equal(late, initial), "late param not updated on its first estimation step"
            assert "exp_hz_sq" in opt.state[problem.params[1]]
    expected = run_reference(problem.refs, 30, d_warmup, every, has_grad=has_grad)
    assert_trajectory_matches(actual, expected, shapes, 1e-9)


def test_gradient_without_curvature_gets_zero_hz(fused):
    """A parameter whose gradient is constant (linear in the loss) has Hz = 0, not a crash."""
    shapes = [(6,), (3,)]
    kwargs = dict(eps=0.1, update_d_every=2, d_warmup=5)
    problem = SeparableProblem(shapes, seed=7, linear_only=(1,))
    opt = ESGD(problem.params, **kwargs, seed=0, fused=fused)
    actual = run_steps(opt, problem, 20)
    d = opt.state[problem.params[1]]["exp_hz_sq"]
    assert torch.equal(d, torch.zeros_like(d))
    assert opt.state[problem.params[0]]["exp_hz_sq"].abs().min() > 0
    expected = reference_for(problem, kwargs, 20)
    assert_trajectory_matches(actual, expected, shapes, 1e-9)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("poison_step", [0, 22], ids=["estimation-step", "plain-step"])
def test_nonfinite_gradients_propagate(fused, bad, poison_step):
    shapes = [(9,)]
    problem = SeparableProblem(shapes, seed=8)
    clean = SeparableProblem(shapes, seed=8)
    opt = ESGD(problem.params, seed=0, fused=fused)
    opt_clean = ESGD(clean.params, seed=0, fused=fused)
    poisoned = [2, 7]
    for s in range(poison_step + 1):
        if s == poison_step:
            problem.coeffs[0][2][poisoned] = bad
        for o, prob in ((opt, problem), (opt_clean, clean)):
            o.zero_grad()
            o.backward(prob.loss())
            o.step()
    p, q = problem.params[0].detach(), clean.params[0].detach()
    mask = torch.zeros(9, dtype=torch.bool)
    mask[poisoned] = True
    assert not torch.isfinite(p[mask]).any(), "non-finite gradient was silently dropped"
    assert torch.equal(p[~mask], q[~mask])


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_in_one_optimizer(fused, device):
    dtypes = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
    shapes = [(5,), (6,), (7,), (3,)]
    problem = SeparableProblem(shapes, dtype=dtypes, seed=9, device=device)
    opt = ESGD(problem.params, update_d_every=3, d_warmup=5, seed=0, fused=fused)
    run_steps(opt, problem, 30)
    for p, dt in zip(problem.params, dtypes):
        assert p.dtype == dt
        assert torch.isfinite(p).all()
        state_dtype = torch.float64 if dt == torch.float64 else torch.float32
        for key in ("exp_avg", "exp_hz_sq"):
            assert opt.state[p][key].dtype == state_dtype, (dt, key)
            assert opt.state[p][key].shape == p.shape
    # Each parameter still matches the reference at its own precision.
    expected = reference_for(problem, dict(update_d_every=3, d_warmup=5), 30)
    for j, tol in ((0, 1e-2), (1, 5e-2)):
        final = torch.tensor(expected[-1][j], dtype=torch.float64)
        err = (problem.params[j].detach().cpu().double() - final).abs().max() / final.abs().max()
        assert err <= tol, f"{dtypes[j]} param is {err:.2e} away from the reference"
    final = torch.tensor(expected[-1][2], dtype=torch.float64)
    torch.testing.assert_close(problem.params[2].detach().cpu().double(), final, rtol=2e-4, atol=2e-4)
    final = torch.tensor(expected[-1][3], dtype=torch.float64)
    torch.testing.assert_close(problem.params[3].detach().cpu(), final, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 4e-3)], ids=["bf16", "fp16"])
def test_low_precision_trajectory_tracks_fp32(fused, dtype, tol):
    shapes = [(33,)]
    low = SeparableProblem(shapes, dtype=dtype, seed=10)
    high = low.astype(torch.float32)
    kwargs = dict(update_d_every=4, d_warmup=6)
    opt_low = ESGD(low.params, **kwargs, seed=0, fused=fused)
    opt_high = ESGD(high.params, **kwargs, seed=0, fused=fused)
    start = high.params[0].detach().double().clone()
    traj_low = run_steps(opt_low, low, 50)
    traj_high = run_steps(opt_high, high, 50)
    assert (traj_high[-1][0] - start).abs().max() > 0.1, "problem too easy to tell runs apart"
    for s in (9, 24, 49):
        a, b = traj_low[s][0], traj_high[s][0]
        err = (a - b).abs().max() / b.abs().max()
        assert err <= tol, f"step {s}: {dtype} drifted {err:.3e} from fp32"


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("manual", [False, True], ids=["opt.backward", "loss.backward"])
def test_gradients_accumulate_over_micro_batches(fused, manual):
    """Two half-losses backpropagated in turn give the full-loss step.

    Halving is exact, but autograd may sum the halves' Hz terms in another order, so not bitwise.
    """
    kwargs = dict(update_d_every=3, d_warmup=4, v=0.8)
    whole, split = SeparableProblem(SHAPES, seed=13), SeparableProblem(SHAPES, seed=13)
    opt_whole = ESGD(whole.params, **kwargs, seed=0, fused=fused)
    opt_split = ESGD(split.params, **kwargs, seed=0, fused=fused)
    expected = run_steps(opt_whole, whole, 20)
    for s in range(20):
        opt_split.zero_grad()
        for _ in range(2):
            half = 0.5 * split.loss()
            if manual:
                half.backward(create_graph=opt_split.should_create_graph())
            else:
                opt_split.backward(half)
        opt_split.step()
        for p, want in zip(split.params, expected[s]):
            torch.testing.assert_close(p.detach(), want, rtol=1e-10, atol=1e-10, msg=f"step {s}")


def test_step_inside_no_grad_still_estimates(fused):
    kwargs = dict(update_d_every=2, d_warmup=3)
    problem, twin = SeparableProblem(SHAPES, seed=15), SeparableProblem(SHAPES, seed=15)
    opt = ESGD(problem.params, **kwargs, seed=0, fused=fused)
    expected = run_steps(ESGD(twin.params, **kwargs, seed=0, fused=fused), twin, 10)
    for s in range(10):
        opt.zero_grad()
        opt.backward(problem.loss())
        with torch.no_grad():
            opt.step()
        assert all(torch.equal(p.detach(), e) for p, e in zip(problem.params, expected[s])), f"step {s}"


def test_step_without_gradients_changes_nothing(fused):
    problem = SeparableProblem(SHAPES, seed=14)
    opt = ESGD(problem.params, seed=0, fused=fused)
    before = [p.detach().clone() for p in problem.params]
    assert opt.step() is None
    assert all(torch.equal(p.detach(), b) for p, b in zip(problem.params, before))
    assert all(len(opt.state[p]) == 0 for p in problem.params)


def test_backward_helper_builds_graph_only_on_estimation_steps(fused):
    problem = SeparableProblem([(4,)], seed=11)
    opt = ESGD(problem.params, update_d_every=3, d_warmup=2, seed=0, fused=fused)
    p = problem.params[0]
    for _ in range(8):
        estimating = opt.should_create_graph()
        opt.zero_grad()
        opt.backward(problem.loss())
        if not estimating:
            assert not p.grad.requires_grad, "plain step built a double-backward graph"
        opt.step()
        assert p.grad is None or not p.grad.requires_grad


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")
def test_plain_step_releases_a_graph_the_user_built(fused):
    """loss.backward(create_graph=True) on a plain step leaves p.grad carrying a graph; step() must
    detach it (the plain step skips that pass only when no gathered gradient has a graph)."""
    problem = SeparableProblem(SHAPES, seed=12)
    opt = ESGD(problem.params, update_d_every=5, d_warmup=1, seed=0, fused=fused)
    opt.zero_grad()
    opt.backward(problem.loss())
    opt.step()  # the estimation step
    assert not opt.is_estimation_step()
    opt.zero_grad()
    problem.loss().backward(create_graph=True)
    graph, plain = problem.params[0], problem.params[1]
    plain.grad = plain.grad.detach()  # one with a graph, the others without
    assert graph.grad.requires_grad
    before = [p.detach().clone() for p in problem.params]
    opt.step()
    assert all(p.grad is not None and not p.grad.requires_grad for p in problem.params)
    assert all(not torch.equal(p.detach(), b) for p, b in zip(problem.params, before))


def test_fused_true_runs_or_refuses_clearly():
    try:
        from esgd_cuda import _extension
    except ImportError:
        pytest.skip("no esgd_cuda._extension loader module yet")
    problem = SeparableProblem([(7,)], seed=12)
    if _extension.fused_supported(torch.device("cpu"), torch.float64):
        opt = ESGD(problem.params, seed=0, fused=True)
        actual = run_steps(opt, problem, 30)
        expected = reference_for(problem, {}, 30)
        assert_trajectory_matches(actual, expected, [(7,)], 1e-9)
    else:
        before = problem.params[0].detach().clone()
        with pytest.raises(RuntimeError, match="fused"):
            opt = ESGD(problem.params, seed=0, fused=True)
            opt.backward(problem.loss())
            opt.step()
        assert torch.equal(problem.params[0].detach(), before)


@requires_cuda
@pytest.mark.parametrize("capturable", [False, True], ids=["step", "capturable-plain_step"])
def test_cuda_plain_step_does_not_synchronize(fused, capturable):
    """A plain step launches its work and returns: no device-to-host copy or stream sync, which
    would stall the training loop once per step (float lr; a tensor lr needs capturable=True)."""
    problem = SeparableProblem([(300,), (7, 9), (1,)], dtype=torch.float32, seed=2, device="cuda")
    lr = torch.tensor(0.1, device="cuda") if capturable else 0.1
    opt = ESGD(problem.params, lr=lr, d_warmup=2, update_d_every=10**6, seed=0, fused=fused,
               capturable=capturable)
    run_steps(opt, problem, 2)  # the estimation steps
    assert not opt.should_create_graph()
    opt.zero_grad(set_to_none=True)
    problem.loss().backward()
    before = [p.detach().clone() for p in problem.params]
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            if capturable:
                opt.plain_step()
                opt.count_plain_step()
            else:
                opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert all(not torch.equal(p, b) for p, b in zip(problem.params, before))
