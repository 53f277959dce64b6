"""opt.diagnostics(): schedule fields and preconditioner statistics, checked against the state."""

import math

import pytest
import torch

from esgd_cuda import ESGD


def make_problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(7, 5, generator=gen, dtype=torch.float64).requires_grad_()
    b = torch.randn(11, generator=gen, dtype=torch.float64).requires_grad_()
    c = torch.randn(3, generator=gen, dtype=torch.float64).requires_grad_()
    return a, b, c


def loss_of(a, b, c):
    return (a**4).sum() / 4 + (b**2 * b.sin()).sum() + (c.cosh()).sum() + (a.sum() * b.sum()) ** 2 / 100


def expected_sqrt_d(opt, group):
    beta2 = group["betas"][1]
    roots = [
        (opt.state[p]["exp_hz_sq"].sqrt() / math.sqrt(1 - beta2 ** int(opt.state[p]["estimates"]))).flatten()
        for p in group["params"]
        if opt.state.get(p)
    ]
    if not roots:
        return None
    flat = torch.cat(roots).double()
    return {"min": flat.min().item(), "mean": flat.mean().item(), "max": flat.max().item()}


def test_fresh_optimizer():
    a, b, c = make_problem()
    opt = ESGD([a, b, c], lr=0.5, lr_warmup=0.9)
    (d,) = opt.diagnostics()
    assert d["step"] == 0 and d["estimates"] == 0 and d["skipped_steps"] == 0
    assert d["estimated"] is False and d["sqrt_d"] is None
    assert d["warmup_factor"] == 0.0 and d["effective_lr"] == 0.0 and d["lr"] == 0.5


@pytest.mark.parametrize("fused", [False, None], ids=["fused=False", "fused=None"])
@pytest.mark.parametrize("capturable", [False, True], ids=["host counters", "capturable"])
def test_tracks_schedule_and_state(fused, capturable):
    a, b, c = make_problem(1)
    opt = ESGD(
        [{"params": [a, b]}, {"params": [c], "lr": 0.2, "lr_warmup": 0.5, "betas": (0.8, 0.95)}],
        lr=0.1, lr_warmup=0.9, d_warmup=2, update_d_every=3, seed=4, fused=fused, capturable=capturable,
    )
    estimates = 0
    for step in range(1, 10):
        will_estimate = opt.should_create_graph()
        opt.backward(loss_of(a, b, c))
        opt.step()
        opt.zero_grad()
        estimates += will_estimate
        diags = opt.diagnostics()
        assert len(diags) == 2
        for d, group in zip(diags, opt.param_groups):
            assert type(d["step"]) is int and type(d["estimates"]) is int
            assert d["step"] == step
            assert d["estimated"] is will_estimate
            assert d["estimates"] == estimates
            assert d["warmup_factor"] == pytest.approx(1 - group["lr_warmup"] ** step, rel=1e-15)
            assert d["effective_lr"] == pytest.approx(group["lr"] * d["warmup_factor"], rel=1e-15)
            want = expected_sqrt_d(opt, group)
            for key in ("min", "mean", "max"):
                assert d["sqrt_d"][key] == pytest.approx(want[key], rel=1e-12)
            assert d["sqrt_d"]["min"] <= d["sqrt_d"]["mean"] <= d["sqrt_d"]["max"]
    # Steps 1, 2 (warm-up), then every third: 1, 2, 5, 8.
    assert estimates == 4


def test_is_read_only():
    a, b, c = make_problem(2)
    opt = ESGD([a, b, c], lr=0.1, d_warmup=1, seed=1)
    for _ in range(3):
        opt.backward(loss_of(a, b, c))
        opt.step()
        opt.zero_grad()
    before = {k: (v.clone() if torch.is_tensor(v) else v) for p in (a, b, c) for k, v in opt.state[p].items()}
    sd = opt.state_dict()["param_groups"][0]["esgd"]
    rng = torch.get_rng_state()
    opt.diagnostics()
    after = {k: v for p in (a, b, c) for k, v in opt.state[p].items()}
    for key, value in before.items():
        assert torch.equal(value, after[key]) if torch.is_tensor(value) else value == after[key]
    assert opt.state_dict()["param_groups"][0]["esgd"] == sd
    assert torch.equal(torch.get_rng_state(), rng)


def test_survives_checkpoint():
    a, b, c = make_problem(3)
    opt = ESGD([a, b, c], lr=0.1, d_warmup=1, update_d_every=2, seed=1)
    for _ in range(2):
        opt.backward(loss_of(a, b, c))
        opt.step()
        opt.zero_grad()
    opt._skipped_steps = 3  # as if GradScaler had skipped three steps
    other = ESGD([a, b, c], lr=0.1)
    other.load_state_dict(opt.state_dict())
    assert other.diagnostics() == opt.diagnostics()
