"""Bad input: each is refused with an error naming the culprit, before anything changes."""

import copy
import math

import pytest
import torch
from conftest import SeparableProblem

from esgd_cuda import ESGD

BAD_HYPERPARAMETERS = [
    (dict(lr=-1e-3), ValueError, r"\blr\b"),
    (dict(lr=math.nan), ValueError, r"\blr\b"),
    (dict(betas=(-0.1, 0.999)), ValueError, r"beta"),
    (dict(betas=(1.0, 0.999)), ValueError, r"beta"),
    (dict(betas=(0.9, 1.0)), ValueError, r"beta"),
    (dict(betas=(0.9, -0.5)), ValueError, r"beta"),
    (dict(v=-0.1), ValueError, r"\bv\b"),
    (dict(v=1.5), ValueError, r"\bv\b"),
    (dict(lr_warmup=1.0), ValueError, r"lr_warmup"),
    (dict(lr_warmup=-0.1), ValueError, r"lr_warmup"),
    (dict(eps=-1e-8), ValueError, r"\beps\b"),
    (dict(weight_decay=-0.1), ValueError, r"weight_decay"),
    (dict(update_d_every=0), ValueError, r"update_d_every"),
    (dict(update_d_every=-3), ValueError, r"update_d_every"),
    (dict(update_d_every=2.5), (TypeError, ValueError), r"update_d_every"),
    (dict(update_d_every="10"), (TypeError, ValueError), r"update_d_every"),
    (dict(d_warmup=-1), ValueError, r"d_warmup"),
    (dict(d_warmup=1.5), (TypeError, ValueError), r"d_warmup"),
    (dict(fused=1.0), ValueError, r"fused"),
    (dict(fused="yes"), ValueError, r"fused"),
    (dict(capturable=1), ValueError, r"capturable"),
    (dict(process_group=object()), (TypeError, ValueError), r"process_group"),
]


def _id(case):
    (kwargs, _, _) = case
    return ",".join(f"{k}={v!r}" for k, v in kwargs.items())


@pytest.mark.parametrize("kwargs,exc,name", BAD_HYPERPARAMETERS, ids=[_id(c) for c in BAD_HYPERPARAMETERS])
def test_bad_hyperparameter_is_refused(kwargs, exc, name):
    p = torch.ones(3, requires_grad=True)
    with pytest.raises(exc, match=name):
        ESGD([p], **kwargs)
    assert torch.equal(p.detach(), torch.ones(3))


@pytest.mark.parametrize(
    "kwargs,name",
    [(dict(lr=-0.5), r"\blr\b"), (dict(betas=(0.9, 1.5)), "beta"), (dict(weight_decay=-1.0), "weight_decay")],
    ids=["lr", "betas", "weight_decay"],
)
def test_bad_hyperparameter_in_param_group_is_refused(kwargs, name):
    p, q = torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match=name):
        ESGD([dict(params=[p]), dict(params=[q], **kwargs)])
    opt = ESGD([p])
    with pytest.raises(ValueError, match=name):
        opt.add_param_group(dict(params=[q], **kwargs))
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("kwargs", [dict(lr=0.0), dict(betas=(0.0, 0.0)), dict(v=0.0), dict(v=1.0),
                                    dict(lr_warmup=0.0), dict(eps=0.0), dict(weight_decay=0.0),
                                    dict(update_d_every=1), dict(d_warmup=0)],
                         ids=lambda kw: ",".join(f"{k}={v!r}" for k, v in kw.items()))
def test_boundary_hyperparameters_are_accepted(kwargs):
    ESGD([torch.ones(3, requires_grad=True)], **kwargs)


def snapshot(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def assert_untouched(opt, params, before):
    values, state = before
    for p, v in zip(params, values):
        assert torch.equal(p.detach(), v), "a parameter changed although the step raised"
    assert_same(opt.state_dict(), state)


def assert_same(a, b, where="state_dict"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def step(opt, problem):
    opt.zero_grad()
    opt.backward(problem.loss())
    opt.step()


def twins(fused, **kwargs):
    """Two identical problems and optimizers: one gets the bad input, the other shows the way."""
    a, b = SeparableProblem([(5,), (2, 3)], seed=40), SeparableProblem([(5,), (2, 3)], seed=40)
    return (a, ESGD(a.params, seed=0, fused=fused, **kwargs)), (b, ESGD(b.params, seed=0, fused=fused, **kwargs))


def assert_same_as_twin(problem, twin):
    for p, q in zip(problem.params, twin.params):
        assert torch.equal(p.detach(), q.detach())


@pytest.mark.parametrize("at_step", [0, 4], ids=["first-step", "later-estimate"])
def test_estimation_step_without_graph_is_refused(fused, at_step):
    (problem, opt), (twin, twin_opt) = twins(fused, update_d_every=3, d_warmup=2)
    for _ in range(at_step):
        step(opt, problem)
        step(twin_opt, twin)
    assert opt.should_create_graph()
    before = snapshot(opt, problem.params)
    opt.zero_grad()
    problem.loss().backward()
    with pytest.raises(RuntimeError) as info:
        opt.step()
    message = str(info.value)
    assert "create_graph=opt.should_create_graph()" in message or "opt.backward" in message, message
    # Counted as users count: the first step is step 1.
    assert f"ESGD: step {at_step + 1} estimates the curvature" in message, message
    assert_untouched(opt, problem.params, before)
    # The failed call consumed neither a step of the schedule nor a probe.
    assert opt.should_create_graph()
    step(opt, problem)
    step(twin_opt, twin)
    assert_same_as_twin(problem, twin)


def test_sparse_gradient_is_refused(fused):
    (problem, opt), (twin, twin_opt) = twins(fused, update_d_every=100, d_warmup=1)
    step(opt, problem)
    step(twin_opt, twin)
    assert not opt.should_create_graph()
    before = snapshot(opt, problem.params)
    opt.zero_grad()
    problem.loss().backward()
    dense = problem.params[1].grad
    problem.params[1].grad = dense.to_sparse()
    with pytest.raises((RuntimeError, ValueError), match="sparse"):
        opt.step()
    # The first parameter had a valid gradient: it must not have moved either.
    assert_untouched(opt, problem.params, before)
    problem.params[1].grad = dense
    opt.step()
    step(twin_opt, twin)
    assert_same_as_twin(problem, twin)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_sparse_gradient_from_embedding_is_refused(fused):
    emb = torch.nn.Embedding(10, 3, sparse=True).double()
    opt = ESGD(emb.parameters(), seed=0, fused=fused, d_warmup=1, update_d_every=100)
    idx = torch.tensor([1, 4, 4, 7])
    (emb(idx) ** 2).sum().backward(create_graph=True)
    before = emb.weight.detach().clone()
    with pytest.raises((RuntimeError, ValueError), match="sparse"):
        opt.step()
    assert torch.equal(emb.weight.detach(), before)


def test_complex_parameters_are_refused(fused):
    z = torch.randn(4, dtype=torch.complex128, requires_grad=True)
    before = z.detach().clone()
    with pytest.raises((TypeError, ValueError, RuntimeError), match="complex"):
        opt = ESGD([z], seed=0, fused=fused)
        opt.backward((z.abs() ** 4).sum())
        opt.step()
    assert torch.equal(z.detach(), before)


@pytest.mark.parametrize("capturable", [False, True])
def test_a_parameter_listed_twice_is_refused(capturable):
    a, b = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match=r"params\[2\] in param_groups\[0\] is the same tensor as params\[0\]"):
        ESGD([a, b, a], capturable=capturable)
    opt = ESGD([b], capturable=capturable)
    with pytest.raises(ValueError, match=r"params\[1\] in param_groups\[1\] is the same tensor as params\[0\]"):
        opt.add_param_group({"params": [a, a]})
    assert len(opt.param_groups) == 1


def test_capturable_tensor_lr_must_be_on_the_parameters_device():
    # "meta" stands in for an accelerator: the check is about the device, not about CUDA.
    p = torch.zeros(4, device="meta", requires_grad=True)
    with pytest.raises(ValueError, match=r"capturable=True\): lr in param_groups\[0\] is a tensor on cpu, but params\[0\] is on meta"):
        ESGD([p], lr=torch.tensor(0.1), capturable=True)
    opt = ESGD([p], lr=torch.tensor(0.1, device="meta"), capturable=True, fused=False)
    q = torch.zeros(2, device="meta", requires_grad=True)
    with pytest.raises(ValueError, match=r"lr in param_groups\[1\] is a tensor on cpu, but params\[0\] is on meta"):
        opt.add_param_group({"params": [q], "lr": torch.tensor(0.2)})
    # Outside capturable mode the step reads lr on the host: any device will do.
    ESGD([torch.zeros(2, requires_grad=True)], lr=torch.tensor(0.1))


def test_sparse_gradient_error_names_its_parameter_and_changes_nothing():
    """The parameter is named by its index in its group, counting the ones without a gradient."""
    params = [torch.nn.Parameter(torch.randn(4)) for _ in range(3)]
    opt = ESGD([{"params": params[:1]}, {"params": params[1:]}], seed=0)
    params[0].grad = torch.randn(4)
    params[2].grad = torch.randn(4).to_sparse()  # params[1] has none
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match=r"sparse gradients \(param_groups\[1\]\['params'\]\[1\]\)"):
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert all(not opt.state[p] for p in params)
