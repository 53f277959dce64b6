"""The curvature probe: when it runs, what it estimates, and the invariances that follow."""

import itertools

import pytest
import torch
from conftest import SeparableProblem
from reference import estimation_schedule

from esgd_cuda import ESGD


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize(
    "d_warmup,every",
    [(20, 10), (3, 1), (1, 4), (5, 7), (2, 100), (4, 2), (10, 3)],
)
def test_estimation_schedule(fused, d_warmup, every):
    num_steps = 45
    expected = estimation_schedule(num_steps, d_warmup, every)
    problem = SeparableProblem([(5,), (2, 3)], seed=20)
    opt = ESGD(problem.params, betas=(0.9, 0.5), update_d_every=every, d_warmup=d_warmup, seed=0, fused=fused)
    observed = []
    for s in range(num_steps):
        predicted = opt.should_create_graph()
        assert opt.should_create_graph() == predicted, "should_create_graph() changed state"
        assert predicted == expected[s], f"step {s}: should_create_graph() says {predicted}"
        before = [
            opt.state[p]["exp_hz_sq"].clone() if "exp_hz_sq" in opt.state[p] else None
            for p in problem.params
        ]
        opt.zero_grad()
        # Backward exactly as the schedule says: an optimizer that wanted to estimate on a step we
        # call plain finds no graph and must raise.
        problem.loss().backward(create_graph=expected[s])
        opt.step()
        changed = [
            b is None or not torch.equal(b, opt.state[p]["exp_hz_sq"])
            for b, p in zip(before, problem.params)
        ]
        assert changed[0] == changed[1], f"step {s}: parameters disagree about estimating"
        observed.append(changed[0])
    assert observed == expected


def test_zero_warmup_estimates_on_first_step(fused):
    """With d_warmup=0 the first step still estimates: no parameter could ever start otherwise."""
    problem = SeparableProblem([(4,)], seed=21)
    opt = ESGD(problem.params, update_d_every=5, d_warmup=0, seed=0, fused=fused)
    flags = []
    for _ in range(16):
        flags.append(opt.should_create_graph())
        opt.zero_grad()
        opt.backward(problem.loss())
        opt.step()
    assert flags == estimation_schedule(16, 0, 5)
    assert flags[0] and "exp_hz_sq" in opt.state[problem.params[0]]


def test_schedule_is_global_across_params(fused):
    """A parameter without a gradient does not shift the optimizer's estimation schedule."""
    problem = SeparableProblem([(3,), (3,)], seed=22)
    opt = ESGD(problem.params, update_d_every=4, d_warmup=2, seed=0, fused=fused)
    flags = []
    for s in range(20):
        flags.append(opt.should_create_graph())
        opt.zero_grad(set_to_none=True)
        opt.backward(problem.loss({0} if s % 3 else {0, 1}))
        opt.step()
    assert flags == estimation_schedule(20, 2, 4)


# Couples the two parameters below, so an estimator that probes each parameter separately is biased.
COUPLING = torch.tensor(
    [
        [2.0, 1.0, 0.5, -0.8, 0.3],
        [1.0, -1.0, 0.7, 0.4, 0.0],
        [0.5, 0.7, 1.5, 0.0, -0.6],
        [-0.8, 0.4, 0.0, 0.9, 1.1],
        [0.3, 0.0, -0.6, 1.1, -0.5],
    ],
    dtype=torch.float64,
)


def coupled_params(columns, seed):
    """Two parameters that together hold x (5 x columns): rows 0-2 and rows 3-4."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(5, columns, generator=gen, dtype=torch.float64)
    return [x[:3].clone().requires_grad_(), x[3:].clone().requires_grad_()]


def quadratic(x):
    """0.5 * sum over columns c of x_c^T H x_c, whose Hessian is H for every column."""
    return 0.5 * (x * (COUPLING @ x)).sum()


def probe_samples(params, loss_fn, steps, fused):
    """(Hz)^2 of every probe, read back from exp_hz_sq: with beta2 = 0 it holds the latest sample."""
    opt = ESGD(params, lr=0.0, betas=(0.9, 0.0), update_d_every=1, d_warmup=steps, seed=1234, fused=fused)
    samples = []
    for _ in range(steps):
        opt.zero_grad()
        opt.backward(loss_fn())
        opt.step()
        samples.append(torch.cat([opt.state[p]["exp_hz_sq"].double() for p in params]).clone())
    return torch.stack(samples)  # steps x 5 x columns


def assert_unbiased(samples, H, rtol_values):
    steps, _, columns = samples.shape
    # Rademacher probes: each (Hz)_i is a signed sum of row i of H, so (Hz)_i^2 takes few values.
    signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=5)), dtype=torch.float64)
    allowed = (signs @ H.T) ** 2  # 32 x 5
    for i in range(5):
        dist = (samples[:, i].reshape(-1, 1) - allowed[:, i].reshape(1, -1)).abs().min(dim=1).values
        assert dist.max() <= rtol_values * allowed[:, i].max(), f"row {i}: a probe that is not +-1 per element"

    target = torch.diagonal(H @ H)
    wrong = {
        "diag(H)^2": torch.diagonal(H) ** 2,
        "row sums of H@H": (H @ H).sum(dim=1),
        "(H @ 1)^2": H.sum(dim=1) ** 2,
        "per-parameter blocks only": torch.cat(
            [torch.diagonal(H[:3, :3] @ H[:3, :3]), torch.diagonal(H[3:, 3:] @ H[3:, 3:])]
        ),
    }
    n = steps * columns
    mean = samples.mean(dim=(0, 2))
    # Exact variance of (sum_j H_ij z_j)^2 for Rademacher z.
    var = 2 * ((H**2).sum(dim=1) ** 2 - (H**4).sum(dim=1))
    se = (var / n).sqrt()
    assert bool(((mean - target).abs() <= 6 * se).all()), f"mean {mean} vs diag(H@H) {target} (se {se})"
    for name, value in wrong.items():
        assert bool(((value - target).abs() > 40 * se).any()), f"test cannot tell diag(H@H) from {name}"

    # Fresh probes for every element and every step: per-step column means scatter like var / columns.
    step_means = samples.mean(dim=2)
    ratio = step_means.std(dim=0) / (var / columns).sqrt()
    assert bool(((ratio > 0.7) & (ratio < 1.3)).all()), f"probe reuse across elements or steps: {ratio}"


def test_probe_is_unbiased_for_diag_h_squared(fused):
    """mean over probes of (Hz)_i^2 -> (H @ H)_ii, including H's entries between parameters."""
    params = coupled_params(2000, seed=23)
    samples = probe_samples(params, lambda: quadratic(torch.cat(params)), 100, fused)
    assert_unbiased(samples, COUPLING, 1e-9)


def test_probe_is_unbiased_across_parameter_dtypes(fused):
    """Parameters of different dtypes need independent probes, or coupled rows of H bias the estimate."""
    p1, p2 = coupled_params(2000, seed=23)
    p2 = p2.detach().float().requires_grad_()
    samples = probe_samples([p1, p2], lambda: quadratic(torch.cat([p1, p2.double()])), 100, fused)
    assert_unbiased(samples, COUPLING, 1e-5)


def test_probe_uses_its_own_generator(fused):
    params = coupled_params(8, seed=23)
    opt = ESGD(params, update_d_every=1, d_warmup=3, seed=5, fused=fused)
    torch.manual_seed(77)
    rng = torch.get_rng_state()
    for _ in range(3):
        opt.zero_grad()
        opt.backward(quadratic(torch.cat(params)))
        opt.step()
    assert torch.equal(torch.get_rng_state(), rng), "the probe consumed the global RNG"


def coupled_trajectory(seed, fused, steps=30, loss_scale=1.0, reparam=1.0, **kwargs):
    """Optimize a coupled quadratic-plus-quartic loss of x = reparam * params; returns x per step."""
    params = coupled_params(3, seed=24)
    with torch.no_grad():
        for p in params:
            p /= reparam
    quartic = torch.linspace(0.2, 1.0, 15, dtype=torch.float64).reshape(5, 3)

    def loss():
        x = torch.cat(params) * reparam
        return loss_scale * (quadratic(x) + (quartic * x**4).sum() / 4)

    opt = ESGD(params, seed=seed, fused=fused, **kwargs)
    traj = []
    for _ in range(steps):
        opt.zero_grad()
        opt.backward(loss())
        opt.step()
        traj.append(torch.cat([p.detach() for p in params]) * reparam)
    return traj


def test_same_seed_same_trajectory_different_seed_differs(fused):
    kwargs = dict(update_d_every=2, d_warmup=4)
    a = coupled_trajectory(11, fused, **kwargs)
    b = coupled_trajectory(11, fused, **kwargs)
    c = coupled_trajectory(12, fused, **kwargs)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[-1], c[-1]), "the seed does not reach the probe"


INVARIANCE_KWARGS = dict(
    lr=0.5, betas=(0.9, 0.99), v=0.7, eps=1e-14, weight_decay=0.01, update_d_every=3, d_warmup=5
)


@pytest.mark.parametrize("n", [1000.0, 1e-3, 3.0])
def test_invariant_to_loss_scale(fused, n):
    base = coupled_trajectory(3, fused, steps=50, **INVARIANCE_KWARGS)
    scaled = coupled_trajectory(3, fused, steps=50, loss_scale=n, **INVARIANCE_KWARGS)
    moved = (base[-1] - base[0]).abs().max()
    assert moved > 0.1
    for s, (x, y) in enumerate(zip(base, scaled)):
        torch.testing.assert_close(y, x, rtol=1e-8, atol=1e-8, msg=f"step {s}")


@pytest.mark.parametrize("n", [1000.0, 3.0])
def test_invariant_to_reparametrization(fused, n):
    """Optimizing q with p = n * q traces the same p trajectory as optimizing p directly."""
    base = coupled_trajectory(3, fused, steps=50, **INVARIANCE_KWARGS)
    reparam = coupled_trajectory(3, fused, steps=50, reparam=n, **INVARIANCE_KWARGS)
    for s, (x, y) in enumerate(zip(base, reparam)):
        torch.testing.assert_close(y, x, rtol=1e-8, atol=1e-8, msg=f"step {s}")
