"""Checkpointing and resuming, and the lifetime of the double-backward graph."""

import gc
import io
import warnings
import weakref

import pytest
import torch
from conftest import DEVICES, SeparableProblem, requires_cuda
from _small_models import TanhRegression

from esgd_cuda import ESGD

KWARGS = dict(update_d_every=4, d_warmup=5, v=0.6, betas=(0.85, 0.95), weight_decay=0.01)


class CoupledModel(TanhRegression):
    """Parameters with a non-diagonal Hessian, so the result depends on every probe drawn."""


def advance(opt, model, steps):
    values = []
    for _ in range(steps):
        opt.zero_grad()
        opt.backward(model.loss())
        opt.step()
        values.append([p.detach().clone() for p in model.params])
    return values


def round_trip(state_dict, how):
    if how == "live":
        return state_dict
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("how", ["live", "torch.save"])
def test_resume_is_bit_identical(fused, how, device):
    """`torch.save` checkpoints are loaded with map_location="cpu", so on CUDA the state moves back."""
    total, split = 30, 13
    full_model = CoupledModel(device=device)
    full = advance(ESGD(full_model.params, **KWARGS, seed=7, fused=fused), full_model, total)

    model = CoupledModel(device=device)
    opt = ESGD(model.params, **KWARGS, seed=7, fused=fused)
    head = advance(opt, model, split)
    state = round_trip(opt.state_dict(), how)

    resumed_model = model.copy()
    # A different seed: only the checkpoint can make the probes line up again.
    resumed = ESGD(resumed_model.params, **KWARGS, seed=12345, fused=fused)
    resumed.load_state_dict(state)
    assert resumed.should_create_graph() == opt.should_create_graph()
    tail = advance(resumed, resumed_model, total - split)
    # The original keeps going too: it must not share state tensors with the resumed copy.
    tail_original = advance(opt, model, total - split)

    for s, got in enumerate(head + tail):
        for a, b in zip(got, full[s]):
            assert torch.equal(a, b), f"resumed run differs at step {s}"
    for s, got in enumerate(tail_original):
        for a, b in zip(got, full[split + s]):
            assert torch.equal(a, b), f"original run disturbed by the resumed copy at step {s}"


def test_resume_from_checkpoint_taken_before_any_step(fused):
    full_model = CoupledModel()
    full = advance(ESGD(full_model.params, **KWARGS, seed=3, fused=fused), full_model, 12)
    model = CoupledModel()
    state = round_trip(ESGD(model.params, **KWARGS, seed=3, fused=fused).state_dict(), "torch.save")
    opt = ESGD(model.params, **KWARGS, seed=99, fused=fused)
    opt.load_state_dict(state)
    for got, want in zip(advance(opt, model, 12), full):
        assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_load_keeps_fp32_state_of_low_precision_params(fused, dtype):
    problem = SeparableProblem([(9,), (2, 5)], dtype=dtype, seed=31)
    opt = ESGD(problem.params, update_d_every=2, d_warmup=3, seed=0, fused=fused)
    advance(opt, problem_model(problem), 7)
    state = round_trip(opt.state_dict(), "torch.save")

    twin = problem.astype(dtype)
    twin_opt = ESGD(twin.params, update_d_every=2, d_warmup=3, seed=0, fused=fused)
    twin_opt.load_state_dict(state)
    for p, q in zip(problem.params, twin.params):
        for key in ("exp_avg", "exp_hz_sq"):
            loaded, original = twin_opt.state[q][key], opt.state[p][key]
            assert loaded.dtype == torch.float32, f"{key} down-cast to {loaded.dtype} on load"
            assert torch.equal(loaded, original)
    a = advance(opt, problem_model(problem), 6)
    b = advance(twin_opt, problem_model(twin), 6)
    for x, y in zip(a, b):
        assert all(torch.equal(u, v) for u, v in zip(x, y))


def test_state_dict_has_no_graph_and_loading_copies_it(fused):
    model = CoupledModel()
    opt = ESGD(model.params, **KWARGS, seed=0, fused=fused)
    advance(opt, model, 6)
    state = opt.state_dict()
    tensors = [t for s in state["state"].values() for t in s.values() if isinstance(t, torch.Tensor)]
    assert tensors, "no tensor state was saved"
    assert not any(t.requires_grad for t in tensors)

    checkpoint = round_trip(state, "torch.save")
    pristine = round_trip(state, "torch.save")
    other_model = model.copy()
    other = ESGD(other_model.params, **KWARGS, seed=0, fused=fused)
    other.load_state_dict(checkpoint)
    advance(other, other_model, 2)
    # Stepping the loaded optimizer must not write through into the checkpoint it came from.
    for idx, s in pristine["state"].items():
        for key, t in s.items():
            if isinstance(t, torch.Tensor):
                assert torch.equal(checkpoint["state"][idx][key], t), (idx, key)


@requires_cuda
@pytest.mark.parametrize("source,target", [("cpu", "cuda"), ("cuda", "cpu")])
def test_checkpoint_moves_between_devices(source, target):
    # A separable problem: the result does not depend on the probes, which may differ by device.
    problem = SeparableProblem([(9,), (2, 5)], dtype=torch.float32, seed=34, device=source)
    opt = ESGD(problem.params, update_d_every=3, d_warmup=4, seed=7)
    advance(opt, problem_model(problem), 9)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, map_location=target, weights_only=True)

    moved = problem.astype(torch.float32)
    moved.params = [p.detach().to(target).requires_grad_() for p in moved.params]
    moved.coeffs = [tuple(t.to(target) for t in abc) for abc in moved.coeffs]
    moved_opt = ESGD(moved.params, update_d_every=3, d_warmup=4, seed=1)
    moved_opt.load_state_dict(state)
    for p in moved.params:
        for key in ("exp_avg", "exp_hz_sq"):
            assert moved_opt.state[p][key].device == p.device
            assert moved_opt.state[p][key].dtype == torch.float32
    stay = advance(opt, problem_model(problem), 10)
    go = advance(moved_opt, problem_model(moved), 10)
    for a, b in zip(stay[-1], go[-1]):
        torch.testing.assert_close(b.cpu(), a.cpu(), rtol=1e-4, atol=1e-5)


def problem_model(problem):
    """Adapts a SeparableProblem to the `advance` driver."""

    class _Adapter:
        params = problem.params

        @staticmethod
        def loss():
            return problem.loss()

    return _Adapter


@pytest.mark.parametrize("manual", [False, True], ids=["opt.backward", "loss.backward"])
def test_graph_released_after_step(fused, manual):
    gen = torch.Generator().manual_seed(32)
    p = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
    q = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
    opt = ESGD([p, q], update_d_every=2, d_warmup=3, seed=0, fused=fused)
    for s in range(8):
        opt.zero_grad()
        hidden = torch.tanh(p) * q
        alive = weakref.ref(hidden)
        loss = (hidden**2).sum() + (p**4).sum()
        if manual:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                loss.backward(create_graph=opt.should_create_graph())
        else:
            opt.backward(loss)
        del hidden, loss
        opt.step()
        gc.collect()
        assert alive() is None, f"step {s}: the autograd graph outlived step()"
        for t in (p, q):
            assert t.grad is None or t.grad.grad_fn is None, f"step {s}: p.grad still holds a graph"


def test_backward_helper_makes_no_reference_cycle():
    problem = SeparableProblem([(5,)], seed=33)
    opt = ESGD(problem.params, seed=0)
    assert opt.should_create_graph()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.backward(problem.loss())
        opt.step()
    cycles = [w for w in caught if "reference cycle" in str(w.message)]
    assert not cycles, str(cycles[0].message)


def count_tensors():
    gc.collect()
    return sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())


@pytest.mark.parametrize("manual", [False, True], ids=["opt.backward", "loss.backward"])
def test_repeated_steps_do_not_accumulate_objects(fused, manual):
    model = CoupledModel()
    opt = ESGD(model.params, update_d_every=2, d_warmup=3, seed=0, fused=fused)
    counts = {}
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for s in range(31):
            opt.zero_grad()
            loss = model.loss()
            losses.append(weakref.ref(loss))
            if manual:
                loss.backward(create_graph=opt.should_create_graph())
            else:
                opt.backward(loss)
            del loss
            opt.step()
            if s in (10, 30):
                counts[s] = count_tensors()
    assert counts[30] <= counts[10], f"live tensors grew from {counts[10]} to {counts[30]}"
    gc.collect()
    assert all(r() is None for r in losses)
