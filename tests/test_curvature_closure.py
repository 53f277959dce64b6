"""Curvature from another function than the update's gradient: `opt.step(closure, curvature_closure)`
(every estimator) and `opt.backward(loss, curvature_loss=...)` (the exact one).

On an estimation step the closure runs once, at theta, for the update's gradient, and Hz comes from the
curvature closure (typically a slice of the step's batch): at theta and theta + h z (forward), at
theta +- h z (central), or once with a double backward (exact). Same protocol as the closure: random
numbers replayed, parameters restored bit for bit, buffers restored, p.grad holding the closure's
gradient only. Plain steps never call it.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from _small_models import data, mlp

from esgd_cuda import ESGD
from esgd_cuda.curvature import default_fd_step

HVPS = ["autograd", "finite_difference", "central_difference"]
FD = ["finite_difference", "central_difference"]
# Passes of the curvature closure on an estimation step.
CURVATURE_PASSES = {"autograd": 1, "finite_difference": 2, "central_difference": 2}


def make_closure(opt, model, x, y, calls=None):
    """The protocol's closure: zero_grad, forward, backward (opt.backward: every estimator), loss."""

    def closure():
        if calls is not None:
            calls.append(len(x))
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        opt.backward(loss)
        return loss

    return closure


def states(opt, model):
    return [(p.detach().clone(), opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_hz_sq"].clone())
            for p in model.parameters()]


def assert_same(a, b):
    for (pa, ma, da), (pb, mb, db) in zip(a, b):
        assert torch.equal(pa, pb) and torch.equal(ma, mb) and torch.equal(da, db)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("hvp", HVPS)
def test_full_batch_curvature_closure_equals_todays_path_bit_for_bit(hvp, dropout, fused):
    """A curvature closure over the step's whole batch estimates what the closure alone does, with
    the same random numbers (dropout masks), so training is bit-identical over warm-up estimates,
    plain steps and later estimates."""
    x, y = data()
    runs = []
    for with_curvature in (False, True):
        model = mlp(dropout=dropout)
        opt = ESGD(model.parameters(), lr=0.3, hvp=hvp, d_warmup=3, update_d_every=2, seed=5, fused=fused)
        torch.manual_seed(77)
        for _ in range(7):
            closure = make_closure(opt, model, x, y)
            if with_curvature:
                opt.step(closure, curvature_closure=make_closure(opt, model, x, y))
            else:
                opt.step(closure)
        runs.append((states(opt, model), torch.get_rng_state()))
    assert_same(runs[0][0], runs[1][0])
    assert torch.equal(runs[0][1], runs[1][1]), "the generators must end where one pass per step leaves them"


@pytest.mark.parametrize("hvp", HVPS)
def test_closures_run_as_the_schedule_says(hvp, fused):
    model = mlp()
    x, y = data()
    opt = ESGD(model.parameters(), hvp=hvp, d_warmup=2, update_d_every=3, seed=0, fused=fused)
    seen = []
    for _ in range(6):
        calls, curvature_calls = [], []
        estimating = opt.is_estimation_step()
        opt.step(make_closure(opt, model, x, y, calls),
                 curvature_closure=make_closure(opt, model, x[:8], y[:8], curvature_calls))
        seen.append((estimating, len(calls), len(curvature_calls)))
    est = (True, 1, CURVATURE_PASSES[hvp])
    # A finite difference's first estimate repeats the curvature closure's pass at theta + h z once
    # (the consistency check).
    first = (True, 1, CURVATURE_PASSES[hvp] + (hvp != "autograd"))
    assert seen == [first, est, (False, 1, 0), (False, 1, 0), est, (False, 1, 0)]


def fd_hz_direct(model, x, y, z, h, central):
    """Hz of a finite difference on (x, y), formed here with the given probe and step: the model is
    perturbed by hand, on a copy."""
    def grads_at(sign):
        m = copy.deepcopy(model)
        with torch.no_grad():
            for p, zp in zip(m.parameters(), z):
                p.add_(zp, alpha=sign * h)
        F.cross_entropy(m(x), y).backward()
        return [p.grad.double() for p in m.parameters()]

    plus = grads_at(1.0)
    base = grads_at(-1.0) if central else grads_at(0.0)
    return [(a - b) / ((2.0 if central else 1.0) * h) for a, b in zip(plus, base)]


@pytest.mark.parametrize("hvp", FD)
def test_sub_batch_estimate_is_the_finite_difference_on_that_sub_batch(hvp, fused):
    """D after one estimate is (1 - beta2) (Hz)^2 of the sub-batch's function, Hz formed directly:
    with the optimizer's probe and h, by perturbing a copy of the model by hand."""
    model = mlp()
    x, y = data(n=32)
    xs, ys = x[5:13], y[5:13]
    beta2 = 0.999
    opt = ESGD(model.parameters(), lr=0.0, hvp=hvp, seed=3, fused=fused)
    trainable = list(model.parameters())
    z = opt._curvature.probes(trainable, trainable, 0, opt._use_fused)
    rel = default_fd_step(hvp, [torch.float64])
    h = float(opt._curvature.step_size(trainable, rel)[trainable[0].device])
    expected = fd_hz_direct(model, xs, ys, z, h, hvp == "central_difference")
    opt.step(make_closure(opt, model, x, y), curvature_closure=make_closure(opt, model, xs, ys))
    for p, hz in zip(model.parameters(), expected):
        d = opt.state[p]["exp_hz_sq"]
        torch.testing.assert_close(d, (1 - beta2) * hz * hz, rtol=1e-9, atol=1e-20)
    # ...and it is not the whole batch's estimate.
    full = fd_hz_direct(model, x, y, z, h, hvp == "central_difference")
    assert not torch.allclose(opt.state[trainable[0]]["exp_hz_sq"], (1 - beta2) * full[0] ** 2, rtol=1e-3)


def test_exact_sub_batch_estimate_is_the_hessian_vector_product_on_that_sub_batch(fused):
    model = mlp()
    x, y = data(n=32)
    xs, ys = x[:8], y[:8]
    opt = ESGD(model.parameters(), lr=0.0, seed=3, fused=fused)
    trainable = list(model.parameters())
    z = opt._curvature.probes(trainable, trainable, 0, opt._use_fused)
    reference = copy.deepcopy(model)
    params = list(reference.parameters())
    g = torch.autograd.grad(F.cross_entropy(reference(xs), ys), params, create_graph=True)
    hz = torch.autograd.grad(g, params, grad_outputs=z)
    opt.step(make_closure(opt, model, x, y), curvature_closure=make_closure(opt, model, xs, ys))
    for p, h in zip(model.parameters(), hz):
        torch.testing.assert_close(opt.state[p]["exp_hz_sq"], 0.001 * h * h, rtol=1e-12, atol=0)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")
@pytest.mark.parametrize("form", ["opt.backward", "create_graph", "returned loss"])
def test_exact_curvature_closure_forms_agree(form, fused):
    """The exact estimator takes the curvature closure's Hz from opt.backward, from a
    create_graph backward, or from the double backward of a loss it returns without a backward;
    and opt.backward(loss, curvature_loss=...) is the same estimate without closures."""
    x, y = data(n=32)
    xs, ys = x[:8], y[:8]

    def curvature_closure_for(opt, model):
        def curvature_closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(xs), ys)
            if form == "opt.backward":
                opt.backward(loss)
            elif form == "create_graph":
                assert opt.should_create_graph()
                loss.backward(create_graph=opt.should_create_graph())
            return loss
        return curvature_closure

    results = []
    for use_closures in (True, False):
        model = mlp()
        opt = ESGD(model.parameters(), lr=0.2, d_warmup=2, update_d_every=2, seed=9, fused=fused)
        for _ in range(5):
            if use_closures:
                opt.step(make_closure(opt, model, x, y), curvature_closure=curvature_closure_for(opt, model))
            else:
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                curvature_loss = F.cross_entropy(model(xs), ys) if opt.is_estimation_step() else None
                opt.backward(loss, curvature_loss=curvature_loss)
                opt.step()
        results.append(states(opt, model))
    assert_same(results[0], results[1])


def test_curvature_loss_may_share_the_forward(fused):
    """curvature_loss as a slice of the same forward's per-sample losses: one forward, the update's
    gradient of the whole batch, Hz of the slice."""
    x, y = data(n=32)
    results = []
    for shared in (True, False):
        model = mlp()
        opt = ESGD(model.parameters(), lr=0.2, seed=9, fused=fused)
        opt.zero_grad()
        if shared:
            losses = F.cross_entropy(model(x), y, reduction="none")
            opt.backward(losses.mean(), curvature_loss=losses[:8].mean())
        else:
            opt.backward(F.cross_entropy(model(x), y), curvature_loss=F.cross_entropy(model(x[:8]), y[:8]))
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        results.append((grads, states(opt, model)))
    for a, b in zip(results[0][0], results[1][0]):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    for (pa, ma, da), (pb, mb, db) in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(da, db, rtol=1e-12, atol=1e-30)
        torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("hvp", HVPS)
def test_grad_generators_buffers_and_parameters_end_as_the_protocol_says(hvp, fused):
    """p.grad holds the closure's gradient only; the generators are where one closure pass leaves
    them; BatchNorm statistics moved once (by the closure); with lr=0 the parameters are unchanged."""
    model = mlp(dropout=0.2, batchnorm=True)
    x, y = data()
    reference = copy.deepcopy(model)
    opt = ESGD(model.parameters(), lr=0.0, hvp=hvp, seed=2, fused=fused, buffers=model)
    before = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(11)
    reference_loss = F.cross_entropy(reference(x), y)
    reference_loss.backward()
    rng_after_one_pass = torch.get_rng_state()
    torch.manual_seed(11)
    loss = opt.step(make_closure(opt, model, x, y), curvature_closure=make_closure(opt, model, x[:9], y[:9]))
    assert opt._last_step_estimated
    assert torch.equal(torch.get_rng_state(), rng_after_one_pass)
    for p, q, b in zip(model.parameters(), reference.parameters(), before):
        assert torch.equal(p.grad, q.grad), "p.grad must hold the closure's gradient"
        assert not p.grad.requires_grad
        assert torch.equal(p, b), "parameters must be restored bit for bit"
    for b, r in zip(model.buffers(), reference.buffers()):
        assert torch.equal(b, r), "the curvature closure's passes must not move the running statistics"
    assert loss.item() == reference_loss.item(), "step() returns the closure's loss"


@pytest.mark.parametrize("hvp", FD)
def test_accumulation_inside_the_curvature_closure(hvp, fused):
    """Two half-slices accumulated inside the curvature closure estimate what the union slice does."""
    x, y = data(n=32)
    xs, ys = x[:16], y[:16]
    results = []
    for accumulate in (False, True):
        model = mlp()
        opt = ESGD(model.parameters(), lr=0.2, hvp=hvp, d_warmup=2, update_d_every=2, seed=9, fused=fused)

        def curvature_closure():
            opt.zero_grad()
            if accumulate:
                for xb, yb in zip(xs.chunk(2), ys.chunk(2)):
                    (F.cross_entropy(model(xb), yb) / 2).backward()
                return torch.zeros(())  # a value; the gradients carry the estimate
            loss = F.cross_entropy(model(xs), ys)
            loss.backward()
            return loss

        for _ in range(4):
            opt.step(make_closure(opt, model, x, y), curvature_closure=curvature_closure)
        results.append(states(opt, model))
    # The sums differ by float64 rounding (1e-16 of g), which the difference divides by h (1.5e-8 of
    # the parameters' RMS for the forward difference): about 1e-8 of Hz, and of the steps.
    for (pa, ma, da), (pb, mb, db) in zip(*results):
        torch.testing.assert_close(da, db, rtol=1e-6, atol=1e-20)
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------- errors


def snapshot(opt, model):
    return ([p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()),
            torch.get_rng_state(), opt._step_index)


def assert_nothing_changed(opt, model, snap):
    params, sd, rng, index = snap
    for p, b in zip(model.parameters(), params):
        assert torch.equal(p, b)
    assert opt._step_index == index
    assert not opt.state_dict()["state"] and not sd["state"]
    assert torch.equal(torch.get_rng_state(), rng), "an error must leave the generators as before the step"


@pytest.mark.parametrize("hvp", HVPS)
def test_curvature_closure_returning_nothing_is_refused(hvp):
    model = mlp(dropout=0.2)
    x, y = data()
    opt = ESGD(model.parameters(), hvp=hvp, seed=0)

    def curvature_closure():
        opt.zero_grad()
        opt.backward(F.cross_entropy(model(x[:8]), y[:8]))

    snap = snapshot(opt, model)
    with pytest.raises(RuntimeError, match="curvature_closure returned None"):
        opt.step(make_closure(opt, model, x, y), curvature_closure=curvature_closure)
    assert_nothing_changed(opt, model, snap)


@pytest.mark.parametrize("hvp", HVPS)
def test_curvature_closure_without_closure_is_refused(hvp):
    model = mlp()
    x, y = data()
    opt = ESGD(model.parameters(), hvp=hvp, seed=0)
    calls = []
    snap = snapshot(opt, model)
    with pytest.raises(ValueError, match="curvature_closure needs a closure"):
        opt.step(curvature_closure=make_closure(opt, model, x, y, calls))
    assert calls == []
    assert_nothing_changed(opt, model, snap)
    with pytest.raises(TypeError, match="curvature_closure must be callable"):
        opt.step(make_closure(opt, model, x, y), curvature_closure=F.cross_entropy(model(x), y))
    assert_nothing_changed(opt, model, snap)


@pytest.mark.parametrize("hvp", HVPS)
@pytest.mark.parametrize("kind", ["constant", "detached"])
def test_curvature_loss_that_does_not_depend_on_the_parameters_is_refused(hvp, kind):
    model = mlp()
    x, y = data()
    opt = ESGD(model.parameters(), hvp=hvp, seed=0)

    def curvature_closure():
        opt.zero_grad()
        if kind == "constant":
            return torch.tensor(1.0, dtype=torch.float64)
        return F.cross_entropy(model(x[:8]), y[:8]).detach()

    snap = snapshot(opt, model)
    with pytest.raises(RuntimeError, match="does not depend on the parameters"):
        opt.step(make_closure(opt, model, x, y), curvature_closure=curvature_closure)
    assert_nothing_changed(opt, model, snap)


@pytest.mark.parametrize("hvp", FD)
def test_finite_difference_curvature_closure_without_backward_is_refused(hvp):
    model = mlp()
    x, y = data()
    opt = ESGD(model.parameters(), hvp=hvp, seed=0)
    snap = snapshot(opt, model)
    with pytest.raises(RuntimeError, match="did no backward"):
        opt.step(make_closure(opt, model, x, y), curvature_closure=lambda: F.cross_entropy(model(x[:8]), y[:8]))
    assert_nothing_changed(opt, model, snap)


def test_exact_curvature_closure_with_a_first_order_backward_is_refused():
    model = mlp()
    x, y = data()
    opt = ESGD(model.parameters(), seed=0)

    def curvature_closure():
        loss = F.cross_entropy(model(x[:8]), y[:8])
        loss.backward()
        return loss

    snap = snapshot(opt, model)
    with pytest.raises(RuntimeError, match="must keep the graph"):
        opt.step(make_closure(opt, model, x, y), curvature_closure=curvature_closure)
    assert_nothing_changed(opt, model, snap)
    assert all(p.grad is not None and not p.grad.requires_grad for p in model.parameters())


def test_curvature_loss_errors():
    model = mlp()
    x, y = data()
    loss = F.cross_entropy(model(x), y)
    fd = ESGD(model.parameters(), hvp="finite_difference", seed=0)
    with pytest.raises(ValueError, match="curvature_loss is for hvp='autograd'"):
        fd.backward(loss, curvature_loss=F.cross_entropy(model(x[:4]), y[:4]))
    opt = ESGD(model.parameters(), seed=0)
    with pytest.raises(ValueError, match="curvature_loss does not depend on the parameters"):
        opt.backward(loss, curvature_loss=F.cross_entropy(model(x[:4]), y[:4]).detach())
    with pytest.raises(TypeError, match="curvature_loss must be a Tensor"):
        opt.backward(loss, curvature_loss=1.0)
    assert all(p.grad is None for p in model.parameters()), "errors come before the backward"

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        opt.backward(loss, curvature_loss=F.cross_entropy(model(x[:4]), y[:4]))
        return loss

    with pytest.raises(ValueError, match="pass one or the other"):
        opt.step(closure, curvature_closure=make_closure(opt, model, x[:4], y[:4]))
    assert opt._step_index == 0 and not opt.state


# ---------------------------------------------------------------------- capturable mode, GradScaler


@pytest.mark.parametrize("hvp", HVPS)
def test_capturable_full_batch_curvature_closure_equals_todays_path(hvp, fused):
    """Capturable mode (device-side counters, the step-scalar table) takes the sub-batch lists too."""
    x, y = data()
    runs = []
    for with_curvature in (False, True):
        model = mlp()
        opt = ESGD(model.parameters(), lr=torch.tensor(0.3, dtype=torch.float64), hvp=hvp, d_warmup=2,
                   update_d_every=2, seed=5, fused=fused, capturable=True)
        for _ in range(5):
            closure = make_closure(opt, model, x, y)
            opt.step(closure, curvature_closure=make_closure(opt, model, x, y) if with_curvature else None)
        runs.append(states(opt, model))
    assert_same(*runs)


def test_curvature_loss_under_grad_scaler_equals_unscaled():
    """opt.backward(loss, curvature_loss=..., scaler=scaler): both losses scaled, Hz unscaled at once;
    with a power-of-two scale the run equals the unscaled one bit for bit."""
    x, y = data(n=32)
    runs = []
    for scaled in (False, True):
        model = mlp()
        opt = ESGD(model.parameters(), lr=0.2, d_warmup=2, update_d_every=2, seed=9)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=10**6) if scaled else None
        for _ in range(5):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            curvature_loss = F.cross_entropy(model(x[:8]), y[:8]) if opt.is_estimation_step() else None
            opt.backward(loss, curvature_loss=curvature_loss, scaler=scaler)
            if scaled:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
        runs.append(states(opt, model))
    assert_same(*runs)
