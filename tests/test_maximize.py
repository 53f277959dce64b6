"""ESGD(maximize=True): ascent on f is descent on -f, bit for bit, per param group."""

import copy

import pytest
import torch

from conftest import SeparableProblem
from esgd_cuda import ESGD

SHAPES = [(5, 3), (17,), (1,)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def two_group_optimizer(problem, maximize_second, fused, capturable):
    groups = [{"params": problem.params[:1]},
              {"params": problem.params[1:], "maximize": maximize_second}]
    return ESGD(groups, lr=0.3, d_warmup=4, update_d_every=3, seed=7, fused=fused, capturable=capturable)


def signed_loss(problem, sign_second):
    """f_0 + sign * (f_1 + f_2): group 0 is parameter 0, group 1 the others."""
    first = problem.loss(active={0})
    rest = problem.loss(active={1, 2})
    return first + sign_second * rest


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("capturable", [False, True], ids=["host", "capturable"])
def test_maximizing_the_negated_loss_is_minimizing_it(fused, dtype, capturable):
    """Group 1 maximizes -(f_1 + f_2) in one optimizer and minimizes f_1 + f_2 in the other: the
    trajectories, over estimation and plain steps, are identical. Negation is exact in floating
    point, so any difference is a wrong sign in the gradient or the curvature."""
    descend = SeparableProblem(SHAPES, dtype=dtype, seed=3)
    ascend = descend.astype(dtype)
    opt_d = two_group_optimizer(descend, False, fused, capturable)
    opt_a = two_group_optimizer(ascend, True, fused, capturable)
    for step in range(12):
        for opt, problem, sign in ((opt_d, descend, 1.0), (opt_a, ascend, -1.0)):
            opt.zero_grad(set_to_none=True)
            opt.backward(signed_loss(problem, sign))
            opt.step()
        for j, (a, d) in enumerate(zip(ascend.params, descend.params)):
            assert torch.equal(a, d), f"step {step}: param {j} differs"
    for a, d in zip(ascend.params, descend.params):
        sa, sd = opt_a.state[a], opt_d.state[d]
        assert torch.equal(sa["exp_avg"], sd["exp_avg"]) and torch.equal(sa["exp_hz_sq"], sd["exp_hz_sq"])


def test_maximize_climbs():
    """On a concave objective the parameters go uphill to the maximum."""
    p = torch.tensor([-2.0, 0.5, 3.0], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)
    opt = ESGD([p], lr=0.5, lr_warmup=0.0, maximize=True, seed=0)

    def objective():
        return -((p - target) ** 2).sum()

    start = objective().item()
    for _ in range(200):
        opt.zero_grad()
        opt.backward(objective())
        opt.step()
    assert objective().item() > start
    torch.testing.assert_close(p.detach(), target, rtol=0, atol=1e-3)


def test_bad_maximize_is_rejected_naming_it():
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"invalid maximize: 1 "):
        ESGD([p], maximize=1)
    opt = ESGD([p])
    q = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match=r"invalid maximize in param_groups\[1\]: 'yes'"):
        opt.add_param_group({"params": [q], "maximize": "yes"})
    assert len(opt.param_groups) == 1
    opt.param_groups[0]["maximize"] = None
    p.grad = torch.ones(3)
    before = p.detach().clone()
    with pytest.raises(ValueError, match=r"invalid maximize in param_groups\[0\]: None"):
        opt.step()
    assert torch.equal(p.detach(), before) and not opt.state


def test_checkpoints_keep_maximize_and_old_ones_load():
    problem = SeparableProblem(SHAPES, seed=5)
    opt = two_group_optimizer(problem, True, False, False)
    opt.zero_grad()
    opt.backward(signed_loss(problem, -1.0))
    opt.step()
    sd = opt.state_dict()
    assert [g["maximize"] for g in sd["param_groups"]] == [False, True]

    fresh = two_group_optimizer(problem.astype(torch.float64), False, False, False)
    fresh.load_state_dict(sd)
    assert [g["maximize"] for g in fresh.param_groups] == [False, True]

    # A checkpoint written before the option existed has no 'maximize' key: it means minimize.
    old = copy.deepcopy(sd)
    for group in old["param_groups"]:
        del group["maximize"]
    fresh.load_state_dict(old)
    assert [g["maximize"] for g in fresh.param_groups] == [False, False]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradients_are_not_negated_in_place(fused, dtype):
    problem = SeparableProblem(SHAPES, dtype=dtype, seed=9)
    opt = ESGD(problem.params, maximize=True, d_warmup=1, update_d_every=2, seed=1, fused=fused)
    for _ in range(3):  # an estimation step, a plain step, an estimation step
        opt.zero_grad(set_to_none=True)
        opt.backward(problem.loss())
        grads = [p.grad.clone() for p in problem.params]
        opt.step()
        for g, p in zip(grads, problem.params):
            assert torch.equal(p.grad, g)
