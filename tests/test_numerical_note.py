"""The numbers behind docs/hyperparameters.md's "Numerical note": how often default ESGD-M fails PyTorch's 20-step
"the loss goes down" check, why, and what the warm-ups do about it.

Both problems are the least-squares losses of PyTorch's generic optimizer tests (see
tests/test_torch_optim_conformance.py), whose Hessian has rank one per output row:
- "weight+bias": sum_i (w_i . x + b_i)^2 (test_forloop_goes_right_direction);
- "shared input": sum_i (w_i . x + w2_i . x)^2, two weights fed the same input
  (test_param_groups_weight_decay, test_param_group_with_lrscheduler_goes_right_direction).
Per row, H = 2 u u^T (u = [x, 1] or [x, x]), so the probe's Hz = 2 u (u . z) and
|Hz_j| / sqrt(diag(H^2))_j = |u . z| / |u| for every element j of the row: one unlucky probe makes
the whole row's first estimate small. Seeds are fixed, so the counts below are exact for this code;
the bounds around them are what docs/hyperparameters.md states.
"""

import pytest
import torch
from torch.nn import Parameter

from esgd_cuda import ESGD

SEEDS = range(40)
NO_WARMUP = {"lr_warmup": 0.0, "d_warmup": 0}


def draw(problem, seed):
    gen = torch.Generator().manual_seed(seed)
    weight = Parameter(torch.randn(10, 5, generator=gen))
    other = Parameter(torch.randn(10, 5, generator=gen) if problem == "shared input" else torch.randn(10, generator=gen))
    x = torch.randn(5, generator=gen)

    def loss():
        second = other.mv(x) if problem == "shared input" else other
        return (weight.mv(x) + second).pow(2).sum()

    u = torch.cat([x, x]) if problem == "shared input" else torch.cat([x, torch.ones(1)])
    return [weight, other], loss, u


def goes_down(problem, seed, **kwargs):
    """PyTorch's check: 20 steps of opt.backward(loss); opt.step() lower the loss."""
    params, loss, _ = draw(problem, seed)
    opt = ESGD(params, seed=1000 + seed, **kwargs)
    initial = loss().item()
    for _ in range(20):
        opt.zero_grad()
        opt.backward(loss())
        opt.step()
    return loss().item() < initial


def first_estimate_ratio(problem, seed):
    """Per row: |Hz| / sqrt(diag(H^2)) of the first (single-probe) estimate, read from the state."""
    params, loss, u = draw(problem, seed)
    beta2 = 0.999
    opt = ESGD(params, seed=1000 + seed, betas=(0.9, beta2))
    opt.backward(loss())
    opt.step()
    hz = opt.state[params[0]]["exp_hz_sq"].div(1 - beta2).sqrt()  # D_1 = (1 - beta2) (Hz)^2
    exact = 2 * u.norm() * u[:5].abs()
    return (hz / exact).mean(dim=1)  # the ratio is the same for every element of a row


@pytest.mark.parametrize("problem", ["weight+bias", "shared input"])
def test_first_estimate_is_often_far_too_small(problem):
    ratios = torch.stack([first_estimate_ratio(problem, s) for s in SEEDS])
    # E[(u.z)^2] = |u|^2: the estimate is unbiased, but one probe often lands far below.
    assert 0.7 < ratios.pow(2).mean().item() < 1.3
    small = (ratios < 0.1).float().mean().item()  # D at least 100x too small
    assert small > 0.02, small
    if problem == "shared input":
        # z_j + z'_j is 0 with probability 1/2 for each of the 5 shared inputs: the whole row
        # cancels exactly with probability 1/32 (400 rows: about 12).
        exact_zeros = int((ratios == 0).sum())
        assert 4 <= exact_zeros <= 25, exact_zeros
    else:
        assert int((ratios == 0).sum()) == 0


@pytest.mark.parametrize("problem, default_max", [("weight+bias", 2), ("shared input", 20)])
def test_twenty_step_check_failure_rates(problem, default_max):
    fails = {
        name: sum(not goes_down(problem, s, **kwargs) for s in SEEDS)
        for name, kwargs in [
            ("default", {}),
            ("lr_warmup=0", {"lr_warmup": 0.0}),
            ("d_warmup=0", {"d_warmup": 0}),
            ("both off", NO_WARMUP),
        ]
    }
    # docs/hyperparameters.md: default settings fail few of 40 draws (more with shared inputs); each warm-up helps,
    # and without both most draws fail.
    assert fails["default"] <= default_max, fails
    assert fails["default"] <= min(fails["lr_warmup=0"], fails["d_warmup=0"]), fails
    assert max(fails["lr_warmup=0"], fails["d_warmup=0"]) < fails["both off"], fails
    assert fails["both off"] >= 25, fails
    if problem == "shared input":
        assert fails["default"] >= 3, (
            f"exact cancellations no longer break default ESGD-M, update docs/hyperparameters.md: {fails}")
