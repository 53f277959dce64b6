"""ESGD as a torch.optim citizen, beyond PyTorch's generic tests: how params are given (iterators,
(name, tensor) pairs), tensor learning rates, the manual create_graph backward of a loss whose
gradient has no graph, and the warning for parameters a plain step cannot update."""

import warnings

import pytest
import torch

from esgd_cuda import ESGD


def linear_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 2).double()


# ------------------------------------------------------------------ param groups


def test_iterator_inside_a_param_group_dict_keeps_its_params():
    model = linear_model()
    opt = ESGD([{"params": model.parameters(), "lr": 0.1}])
    assert opt.param_groups[0]["params"] == list(model.parameters())
    assert opt.param_groups[0]["lr"] == 0.1


def test_add_param_group_with_an_iterator():
    a, b = linear_model(0), linear_model(1)
    opt = ESGD(a.parameters())
    opt.add_param_group({"params": iter(list(b.parameters())), "lr": 0.5})
    assert opt.param_groups[1]["params"] == list(b.parameters())
    x = torch.randn(4, 3, dtype=torch.float64)
    before = [p.detach().clone() for p in b.parameters()]
    opt.backward((a(x).pow(2).sum() + b(x).pow(2).sum()))
    opt.step()
    assert all(not torch.equal(p0, p) for p0, p in zip(before, b.parameters())), "the second group did not train"


def test_named_parameters_in_a_group_dict():
    model = linear_model()
    opt = ESGD([{"params": model.named_parameters(), "lr": 0.1}])
    assert opt.param_groups[0]["params"] == list(model.parameters())
    assert opt.param_groups[0]["param_names"] == ["weight", "bias"]


def test_a_set_inside_a_param_group_is_still_refused_as_in_torch_optim():
    with pytest.raises(TypeError, match="ordered collections"):
        ESGD([{"params": {torch.nn.Parameter(torch.randn(2))}}])


@pytest.mark.parametrize(
    "param, message",
    [
        (torch.randn(2, dtype=torch.complex64), r"params\[0\] \('c'\) in param_groups\[0\] is complex \(torch.complex64\)"),
        (torch.zeros(2, dtype=torch.int32), r"params\[0\] \('c'\) in param_groups\[0\] has dtype torch.int32"),
    ],
)
def test_named_params_are_checked_like_plain_ones(param, message):
    if param.is_floating_point() or param.is_complex():
        param.requires_grad_()
    with pytest.raises(ValueError, match=message):
        ESGD([("c", param)])
    opt = ESGD([("ok", torch.nn.Parameter(torch.randn(2)))])
    with pytest.raises(ValueError, match=message.replace("param_groups\\[0\\]", "param_groups\\[1\\]")):
        opt.add_param_group({"params": [("c", param)]})
    assert len(opt.param_groups) == 1


def test_named_param_listed_twice_is_refused():
    p = torch.nn.Parameter(torch.randn(2))
    with pytest.raises(ValueError, match=r"params\[1\] .*same tensor as params\[0\]"):
        ESGD([("a", p), ("b", p)])


# ------------------------------------------------------------------ tensor lr


def test_multi_element_tensor_lr_uses_torch_wording():
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        ESGD(linear_model().parameters(), lr=torch.tensor([0.1, 0.1]))


@pytest.mark.parametrize("capturable", [False, True])
def test_any_one_element_tensor_lr_matches_a_float_lr(capturable):
    models = [linear_model(), linear_model()]
    lrs = [0.1, torch.tensor([[0.1]], dtype=torch.float64)]
    opts = [ESGD(m.parameters(), lr=lr, seed=3, capturable=capturable) for m, lr in zip(models, lrs)]
    x = torch.randn(5, 3, dtype=torch.float64)
    for _ in range(12):
        for m, opt in zip(models, opts):
            opt.zero_grad()
            opt.backward(torch.tanh(m(x)).pow(2).sum())
            opt.step()
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=0)


# ------------------------------------------------------------------ the manual create_graph backward


def train(model, opt, x, steps, manual):
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(x).sum()  # linear in the parameters: its gradient carries no graph
        if manual:
            loss.backward(create_graph=opt.should_create_graph())
        else:
            opt.backward(loss)
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("fused", [False, None])
def test_create_graph_backward_of_a_linear_loss_matches_opt_backward(fused):
    x = torch.randn(4, 3, dtype=torch.float64)
    runs = []
    for manual in (False, True):
        model = linear_model()
        opt = ESGD(model.parameters(), lr=0.01, seed=5, d_warmup=3, update_d_every=4, fused=fused)
        runs.append((train(model, opt, x, 12, manual), [p.detach().clone() for p in model.parameters()], opt))
    (loss_a, params_a, opt_a), (loss_b, params_b, opt_b) = runs
    assert loss_a == loss_b
    for a, b in zip(params_a, params_b):
        assert torch.equal(a, b)
    assert opt_a.state_dict()["param_groups"] == opt_b.state_dict()["param_groups"]


def test_plain_backward_on_an_estimation_step_still_raises():
    model = linear_model()
    opt = ESGD(model.parameters())
    model(torch.randn(4, 3, dtype=torch.float64)).pow(2).sum().backward()
    with pytest.raises(RuntimeError, match="no parameter gradient carries an autograd graph"):
        opt.step()


def test_create_graph_flag_does_not_leak_into_the_next_step():
    """A create_graph backward on one step says nothing about the next step's backward."""
    model = linear_model()
    opt = ESGD(model.parameters(), d_warmup=5)
    x = torch.randn(4, 3, dtype=torch.float64)
    model(x).sum().backward(create_graph=True)
    opt.step()
    opt.zero_grad()
    model(x).pow(2).sum().backward()  # estimation step 1, no graph
    with pytest.raises(RuntimeError, match="no parameter gradient carries an autograd graph"):
        opt.step()


def test_parameter_made_trainable_later_is_watched():
    model = linear_model()
    model.bias.requires_grad_(False)
    opt = ESGD(model.parameters(), d_warmup=5)
    model.bias.requires_grad_(True)
    model.weight.requires_grad_(False)
    x = torch.randn(4, 3, dtype=torch.float64)
    model(x).sum().backward(create_graph=opt.should_create_graph())  # only the bias gets a gradient
    opt.step()
    assert opt.state[model.bias]["estimates"] == 1


# ------------------------------------------------------------------ parameters a plain step cannot update


def test_plain_step_warns_about_parameters_without_an_estimate():
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    opt = ESGD([a, b], d_warmup=1, update_d_every=5)
    opt.backward(a.pow(2).sum())  # step 0 estimates, b has no gradient
    opt.step()
    opt.zero_grad()
    opt.backward((a.pow(2) + b.pow(2)).sum())
    before = b.detach().clone()
    with pytest.warns(UserWarning, match=r"leaves 1 of the 2 parameters that have gradients unchanged "
                                         r"\(param_groups\[0\]\['params'\]\[1\]\)"):
        opt.step()
    assert torch.equal(b, before)


def test_plain_step_that_updates_nothing_says_so():
    p = torch.nn.Parameter(torch.randn(3))
    opt = ESGD([p], d_warmup=0, update_d_every=5)
    opt.step()  # step 0 estimates, with no gradient at all
    p.grad = torch.ones(3)
    with pytest.warns(UserWarning, match="updates none of the 1 parameters that have gradients"):
        opt.step()


def test_ordinary_training_does_not_warn():
    model = linear_model()
    opt = ESGD(model.parameters(), d_warmup=2, update_d_every=3)
    x = torch.randn(4, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(8):
            opt.zero_grad()
            opt.backward(torch.tanh(model(x)).pow(2).sum())
            opt.step()
