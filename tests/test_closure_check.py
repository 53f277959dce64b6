"""The closure check of the finite-difference estimators: a closure (or curvature closure) that computes
another function on its next call (another batch, unreplayed randomness) is caught.

The first estimate from each kind of closure repeats its pass at theta + h z and compares the two
gradients, relative to the finite difference they are part of: a mismatch raises before anything
changes (parameters bit for bit, no state, no counters, generators as before the step). Later
estimates repeat the pass every REPEAT_CHECK_EVERY-th time (and every time after a failure): a
mismatch then skips the estimate with a warning. Correct closures never trip it: deterministic
passes are bit-identical.
"""

import contextlib
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import esgd_cuda.optimizer as optimizer_module
from esgd_cuda import ESGD

MODES = ["finite_difference", "central_difference"]


def mlp(dtype=torch.float32, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 16), nn.GELU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(16, 3))
    return nn.Sequential(*layers).to(dtype)


DATA = torch.Generator().manual_seed(1)
X = torch.randn(256, 6, generator=DATA)
Y = torch.randint(0, 3, (256,), generator=DATA)


def batches(seed=5, n=32):
    gen = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(0, len(X), (n,), generator=gen)
        yield X[idx], Y[idx]


def closure_for(opt, model, draw, scale=1.0, autocast=False, dropout_gen=None):
    """draw() gives the batch: called inside the closure, on every call."""

    def closure():
        opt.zero_grad()
        x, y = draw()
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            h = model[1](model[0](x))
            if dropout_gen is not None:
                h = h * (torch.rand(h.shape, generator=dropout_gen) > 0.3) / 0.7
            loss = scale * F.cross_entropy(model[-1](h).float(), y)
        loss.backward()
        return loss

    return closure


def snapshot(opt, model):
    return [p.detach().clone() for p in model.parameters()], torch.get_rng_state(), opt._step_index


def assert_unchanged(opt, model, snap):
    params, rng, index = snap
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), params)), "parameters not restored"
    assert not opt.state and opt._step_index == index
    assert torch.equal(torch.get_rng_state(), rng), "generators advanced"


@pytest.mark.parametrize("hvp", MODES)
@pytest.mark.parametrize("cause", ["next(iterator)", "own generator", "unreplayed dropout"])
def test_first_estimate_refuses_a_closure_that_changes_between_calls(hvp, cause, fused):
    model = mlp()
    opt = ESGD(model.parameters(), hvp=hvp, seed=0, fused=fused)
    if cause == "next(iterator)":
        it = batches()
        closure = closure_for(opt, model, lambda: next(it))
    elif cause == "own generator":
        gen = torch.Generator().manual_seed(3)

        def draw():
            idx = torch.randint(0, len(X), (32,), generator=gen)
            return X[idx], Y[idx]
        closure = closure_for(opt, model, draw)
    else:
        batch = next(batches())
        closure = closure_for(opt, model, lambda: batch, dropout_gen=torch.Generator().manual_seed(4))
    snap = snapshot(opt, model)
    with pytest.raises(RuntimeError, match="closure computed another function") as info:
        opt.step(closure)
    assert "draw the batch outside" in str(info.value) and "global generators" in str(info.value)
    assert_unchanged(opt, model, snap)


@pytest.mark.parametrize("hvp", MODES)
def test_first_estimate_refuses_a_curvature_closure_that_changes_between_calls(hvp, fused):
    model = mlp()
    opt = ESGD(model.parameters(), hvp=hvp, seed=0, fused=fused)
    batch = next(batches())
    it = batches(seed=9, n=8)
    snap = snapshot(opt, model)
    with pytest.raises(RuntimeError, match="curvature_closure computed another function"):
        opt.step(closure_for(opt, model, lambda: batch), curvature_closure=closure_for(opt, model, lambda: next(it)))
    assert_unchanged(opt, model, snap)
    # The same curvature closure on a fixed slice is accepted.
    opt.step(closure_for(opt, model, lambda: batch),
             curvature_closure=closure_for(opt, model, lambda: (batch[0][:8], batch[1][:8])))
    assert opt._last_step_estimated


SETTINGS = {
    "fp32": dict(),
    "fp64": dict(dtype=torch.float64),
    "bf16 autocast, fd_step 0.1": dict(autocast=True, fd_step=0.1),
    "bf16 autocast, default fd_step": dict(autocast=True),
    "dropout": dict(dropout=0.3),
    "loss x 1e-8": dict(scale=1e-8),
    "loss x 1e8": dict(scale=1e8),
    "sub-batch curvature": dict(sub_batch=True),
    "accumulation": dict(accumulate=True),
    "compiled": dict(compiled=True, dropout=0.2),
}


@pytest.mark.parametrize("hvp", MODES)
@pytest.mark.parametrize("name", list(SETTINGS))
def test_no_false_alarms(hvp, name, monkeypatch, fused):
    """Correct closures pass every check (the interval is shortened so that many steps check)."""
    s = SETTINGS[name]
    monkeypatch.setattr(optimizer_module, "REPEAT_CHECK_EVERY", 2)
    dtype = s.get("dtype", torch.float32)
    model = mlp(dtype, dropout=s.get("dropout", 0.0))
    net = torch.compile(model) if s.get("compiled") else model
    opt = ESGD(model.parameters(), lr=0.3, hvp=hvp, fd_step=s.get("fd_step"), d_warmup=4, update_d_every=2, seed=0,
               fused=fused)
    it = batches()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a rejected estimate warns: none may
        for _ in range(12):
            x, y = next(it)
            x = x.to(dtype)

            def closure(x=x, y=y):
                opt.zero_grad()
                parts = 2 if s.get("accumulate") else 1
                total = 0.0
                for xb, yb in zip(x.chunk(parts), y.chunk(parts)):
                    with torch.autocast("cpu", dtype=torch.bfloat16) if s.get("autocast") else contextlib.nullcontext():
                        loss = s.get("scale", 1.0) * F.cross_entropy(net(xb).float(), yb) / parts
                    loss.backward()
                    total = total + loss.detach()
                return total

            curvature = None
            if s.get("sub_batch"):
                curvature = closure_for(opt, net, lambda x=x, y=y: (x[:8], y[:8]))
            opt.step(closure, curvature_closure=curvature)
    assert opt.diagnostics()[0]["rejected_estimates"] == 0
    assert opt.diagnostics()[0]["estimates"] == 8


@pytest.mark.parametrize("hvp", MODES)
def test_later_checks_skip_an_estimate_from_another_function(hvp, monkeypatch, fused):
    """A closure that turns inconsistent after the first checks: the next check warns and skips the
    estimate (D unchanged, the step updates as a plain one, estimates not counted), and every
    estimate is checked again until one passes."""
    monkeypatch.setattr(optimizer_module, "REPEAT_CHECK_EVERY", 3)
    model = mlp()
    opt = ESGD(model.parameters(), lr=0.3, hvp=hvp, d_warmup=1, update_d_every=1, seed=0, fused=fused)
    batch = next(batches())
    it = batches(seed=11)
    broken = [False]
    closure = closure_for(opt, model, lambda: next(it) if broken[0] else batch)
    for _ in range(4):
        opt.step(closure)
    assert opt.diagnostics()[0]["estimates"] == 4
    broken[0] = True
    before = {p: (p.detach().clone(), opt.state[p]["exp_hz_sq"].clone()) for p in model.parameters()}
    rejected = 0
    for _ in range(4):
        checking = opt._recheck or opt._fd_estimates % 3 == 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step(closure)
        if checking:
            rejected += 1
            assert any("computed another function" in str(w.message) and "skipped this curvature estimate"
                       in str(w.message) for w in caught), [str(w.message) for w in caught]
            assert not opt._last_step_estimated
        else:
            assert opt._last_step_estimated, "between checks estimates are taken"
    assert rejected >= 2, "after a failed check every estimate is checked"
    d = opt.diagnostics()[0]
    assert d["rejected_estimates"] == rejected and d["estimates"] == 4 + 4 - rejected
    assert any(not torch.equal(p, before[p][0]) for p in model.parameters()), "rejected steps still update"
    # The repaired closure passes the next check, and estimates are counted again.
    broken[0] = False
    opt.step(closure)
    assert opt._last_step_estimated and not opt._recheck


def test_check_survives_checkpoints(fused):
    """fd_estimates and rejected_estimates are part of the checkpoint; a fresh optimizer checks its
    first estimate again (its closure is new code)."""
    model = mlp()
    opt = ESGD(model.parameters(), hvp="finite_difference", d_warmup=2, seed=0, fused=fused)
    batch = next(batches())
    for _ in range(3):
        opt.step(closure_for(opt, model, lambda: batch))
    sd = copy.deepcopy(opt.state_dict())
    fresh = ESGD(model.parameters(), hvp="finite_difference", d_warmup=2, seed=0, fused=fused)
    fresh.load_state_dict(sd)
    assert fresh._fd_estimates == opt._fd_estimates == 2
    assert fresh._checked_closures == set()
