"""The closure protocol of the finite-difference estimators (hvp="finite_difference" / "central_difference").

An estimation step runs the closure at theta, then at theta + h z (and theta - h z). Between runs it
replays the random number generators, so dropout draws the same masks; afterwards the parameters are
restored bit for bit from a copy, p.grad holds the unperturbed gradient, the buffers it was told
about hold what one forward left, and the RNG is where one forward left it. Plain steps run the
closure once.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from _small_models import data, mlp

from esgd_cuda import ESGD

MODES = ["finite_difference", "central_difference"]
PASSES = {"finite_difference": 2, "central_difference": 3}


def closure_for(opt, model, x, y, calls=None, zero="none"):
    def closure():
        if calls is not None:
            calls.append(1)
        if zero == "none_":
            opt.zero_grad(set_to_none=True)
        elif zero == "zeros":
            opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def fd_products(opt, closure):
    """The finite-difference Hz of the next step, as the update will form it (float64)."""
    trainable = opt._trainable_params()
    fd = opt._finite_difference(closure, opt._step_index)
    fd.restore()  # the parameters stay perturbed until the update (or this) restores them
    grads = [p.grad for p in trainable]
    plus, minus = fd.lists(trainable, grads)
    base = grads if minus is None else minus
    return [(a.double() - b.double()) * fd.hz_scale[p.device].double() for p, a, b in zip(trainable, plus, base)]


@pytest.mark.parametrize("hvp", MODES)
def test_closure_runs_once_per_pass(hvp, fused):
    model = mlp()
    x, y = data()
    opt = ESGD(model.parameters(), hvp=hvp, d_warmup=2, update_d_every=3, seed=0, fused=fused)
    counts = []
    for _ in range(8):
        calls = []
        estimating = opt.is_estimation_step()
        assert not opt.should_create_graph(), "a finite-difference estimator needs no graph"
        opt.step(closure_for(opt, model, x, y, calls, zero="none_"))
        counts.append((estimating, len(calls)))
    # The first estimate repeats its pass at theta + h z once, to check the closure (a function of
    # its own: test_closure_check.py).
    assert counts == [(True, PASSES[hvp] + 1), (True, PASSES[hvp]), (False, 1), (False, 1), (True, PASSES[hvp]),
                      (False, 1), (False, 1), (True, PASSES[hvp])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("hvp", MODES)
def test_parameters_are_restored_bit_for_bit(hvp, dtype, fused):
    """With lr=0 an estimation step must leave every parameter bit-identical. 16-bit parameters
    would not survive p + h z - h z: the perturbed value is rounded."""
    model = mlp(dtype)
    x, y = data(dtype)
    opt = ESGD(model.parameters(), lr=0.0, hvp=hvp, fd_step=0.3, seed=0, fused=fused)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(closure_for(opt, model, x, y, zero="none_"))
    assert opt._last_step_estimated
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b), "parameters not restored exactly"


@pytest.mark.parametrize("hvp", MODES)
def test_grad_holds_the_unperturbed_gradient(hvp, fused):
    model = mlp()
    x, y = data()
    reference = copy.deepcopy(model)
    F.cross_entropy(reference(x), y).backward()
    opt = ESGD(model.parameters(), lr=0.0, hvp=hvp, seed=0, fused=fused)
    loss = opt.step(closure_for(opt, model, x, y, zero="none_"))
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad)
    assert loss.item() == F.cross_entropy(reference(x), y).item()


@pytest.mark.parametrize("hvp", MODES)
def test_dropout_masks_are_replayed(hvp, fused):
    """With dropout on, the estimate equals that of the same model with the dropout mask fixed (the
    mask the first pass draws). Without the replay every pass draws a new mask and the gradient
    difference is mostly noise."""
    p_drop = 0.3
    model = mlp(dropout=p_drop)
    x, y = data()
    opt = ESGD(model.parameters(), hvp=hvp, seed=4, fused=fused)
    torch.manual_seed(123)
    with_dropout = fd_products(opt, closure_for(opt, model, x, y, zero="none_"))

    # The mask the model's dropout draws first from this RNG state (same shape, same generator).
    torch.manual_seed(123)
    mask = F.dropout(torch.ones(x.shape[0], 10, dtype=torch.float64), p_drop, training=True)
    lin1, lin2 = model[0], model[3]

    def fixed_mask_closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin2(torch.tanh(lin1(x)) * mask), y)
        loss.backward()
        return loss

    fixed = fd_products(opt, fixed_mask_closure)
    for a, b in zip(with_dropout, fixed):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("hvp", MODES)
def test_rng_ends_as_after_one_forward(hvp, fused):
    """Even when the perturbed passes draw more random numbers than the first (data-dependent code)."""
    model = mlp(dropout=0.3)
    x, y = data()
    opt = ESGD(model.parameters(), hvp=hvp, seed=4, fused=fused)
    torch.manual_seed(9)
    closure_for(opt, copy.deepcopy(model), x, y)()
    after_one = torch.get_rng_state()
    torch.manual_seed(9)
    inner = closure_for(opt, model, x, y, zero="none_")
    calls = []

    def closure():
        calls.append(1)
        if len(calls) > 1:
            torch.rand(3)
        return inner()

    opt.step(closure)
    assert torch.equal(torch.get_rng_state(), after_one)


@pytest.mark.parametrize("hvp", MODES)
def test_batchnorm_statistics_end_as_after_one_forward(hvp, fused):
    model = mlp(batchnorm=True)
    x, y = data()
    reference = copy.deepcopy(model)
    reference(x)  # one forward in training mode
    opt = ESGD(model.parameters(), lr=0.0, hvp=hvp, seed=0, fused=fused, buffers=model)
    opt.step(closure_for(opt, model, x, y, zero="none_"))
    for (name, b), (_, r) in zip(model.named_buffers(), reference.named_buffers()):
        assert torch.equal(b, r), f"{name} moved by the perturbed passes"

    # Without `buffers`, the perturbed passes update the statistics too: what the option is for.
    model = mlp(batchnorm=True)
    opt = ESGD(model.parameters(), lr=0.0, hvp=hvp, seed=0, fused=fused)
    opt.step(closure_for(opt, model, x, y, zero="none_"))
    # (one pass more: the first estimate repeats its perturbed pass to check the closure)
    assert int(model[1].num_batches_tracked) == PASSES[hvp] + 1
    # A list of tensors works as well as a module.
    model = mlp(batchnorm=True)
    opt = ESGD(model.parameters(), lr=0.0, hvp=hvp, seed=0, fused=fused, buffers=list(model.buffers()))
    opt.step(closure_for(opt, model, x, y, zero="none_"))
    assert int(model[1].num_batches_tracked) == 1


@pytest.mark.parametrize("zero", ["none_", "zeros", "outside"])
@pytest.mark.parametrize("hvp", MODES)
def test_closures_may_zero_gradients_themselves_or_not(hvp, zero, fused):
    """Lightning-style closures call opt.zero_grad() (either flavour); others leave it to the loop."""
    x, y = data()
    results = {}
    for variant in ("none_", zero):
        model = mlp()
        opt = ESGD(model.parameters(), hvp=hvp, d_warmup=3, seed=2, fused=fused)
        for _ in range(6):
            if variant == "outside":
                opt.zero_grad()
            opt.step(closure_for(opt, model, x, y, zero=variant if variant != "outside" else "none"))
        results[variant] = [p.detach().clone() for p in model.parameters()]
    for a, b in zip(results["none_"], results[zero]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("hvp", MODES)
def test_estimation_step_without_closure_is_refused_before_any_change(hvp, fused):
    model = mlp()
    x, y = data()
    opt = ESGD(model.parameters(), hvp=hvp, seed=0, fused=fused)
    F.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    # The first step is step 1, as users count.
    with pytest.raises(RuntimeError, match=r"step 1 estimates the curvature.*opt\.step\(closure\)"):
        opt.step()
    assert opt._step_index == 0 and not opt.state
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


def test_backward_is_first_order_in_finite_difference_mode(fused):
    model = mlp()
    x, y = data()
    opt = ESGD(model.parameters(), hvp="finite_difference", seed=0, fused=fused)
    opt.backward(F.cross_entropy(model(x), y))
    assert all(p.grad is not None and not p.grad.requires_grad for p in model.parameters())


@pytest.mark.parametrize("hvp", MODES)
def test_gradscaler_is_refused_with_a_pointer_to_bf16(hvp):
    model = mlp(torch.float32)
    x, y = data(torch.float32)
    opt = ESGD(model.parameters(), hvp=hvp, seed=0)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    with pytest.raises(RuntimeError, match="bfloat16 autocast"):
        scaler.step(opt)
    with pytest.raises(RuntimeError, match="bfloat16 autocast"):
        opt.backward(F.cross_entropy(model(x), y), scaler=scaler)


@pytest.mark.parametrize("hvp", MODES)
def test_non_finite_gradient_difference_poisons_the_parameters(hvp, fused):
    """A non-finite Hz from a difference behaves as a non-finite exact Hz: NaN, never silence."""
    model = mlp()
    x, y = data()
    opt = ESGD(model.parameters(), hvp=hvp, seed=0, fused=fused)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        # Finite at theta, infinite in the perturbed passes.
        (loss * (1.0 if len(calls) == 1 else float("inf"))).backward()
        return loss

    opt.step(closure)
    assert all(torch.isnan(p).any() for p in model.parameters())


@pytest.mark.parametrize("bad", [dict(hvp="exact"), dict(hvp="finite_difference", fd_step=0.0),
                                 dict(hvp="central_difference", fd_step=-1e-3),
                                 dict(hvp="finite_difference", fd_step=float("inf")),
                                 dict(fd_step=1e-3), dict(hvp="finite_difference", buffers=3),
                                 dict(hvp="finite_difference", buffers=[torch.zeros(2), "x"])])
def test_bad_arguments_are_named(bad):
    name = "buffers" if "buffers" in bad else ("fd_step" if "fd_step" in bad else "hvp")
    with pytest.raises((ValueError, TypeError), match=name):
        ESGD(mlp().parameters(), **bad)


@pytest.mark.parametrize("hvp", MODES)
def test_diagnostics_report_the_step_size(hvp, fused):
    model = mlp()
    x, y = data()
    opt = ESGD(model.parameters(), hvp=hvp, seed=0, fused=fused)
    assert opt.diagnostics()[0]["fd_h"] is None
    opt.step(closure_for(opt, model, x, y, zero="none_"))
    rms = float(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).pow(2).mean().sqrt())
    eps = torch.finfo(torch.float64).eps
    rel = eps ** 0.5 if hvp == "finite_difference" else eps ** (1 / 3)
    # Measured before the update moved the parameters: within the step's relative change.
    assert opt.diagnostics()[0]["fd_h"] == pytest.approx(rel * rms, rel=0.05)


@pytest.mark.parametrize("hvp", MODES)
def test_the_update_restores_the_perturbed_parameters_itself(hvp, fused, monkeypatch):
    """The update reads theta from the perturbation's copies (sources=), so an estimation step makes
    no restore pass of its own; a perturbed parameter the update skips (no gradient) is restored by a
    copy, bit for bit."""
    from esgd_cuda._closures import FiniteDifference

    restored = []
    real = FiniteDifference.restore

    def spy(self, params=None):
        pending = list(self.backups) if params is None else [p for p in params if p in self.backups]
        restored.append(len(pending))
        return real(self, params)

    monkeypatch.setattr(FiniteDifference, "restore", spy)
    model = mlp()
    unused = nn.Parameter(torch.randn(5, dtype=torch.float64))
    x, y = data()
    opt = ESGD(list(model.parameters()) + [unused], lr=0.1, hvp=hvp, seed=0, fused=fused)
    before = unused.detach().clone()
    trained = [p.detach().clone() for p in model.parameters()]
    opt.step(closure_for(opt, model, x, y, zero="none_"))
    assert restored == [1], "only the parameter without a gradient needs a restore of its own"
    assert torch.equal(unused, before)
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), trained))
    # The perturbed values never reach the update: the step equals one from a restored copy.
    monkeypatch.setattr(FiniteDifference, "sources", lambda self, params: self.restore(params))
    again = mlp()
    opt2 = ESGD(list(again.parameters()) + [nn.Parameter(before.clone())], lr=0.1, hvp=hvp, seed=0, fused=fused)
    opt2.step(closure_for(opt2, again, x, y, zero="none_"))
    for p, q in zip(model.parameters(), again.parameters()):
        assert torch.equal(p, q)
