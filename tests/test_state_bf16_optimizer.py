"""ESGD(state_dtype=torch.bfloat16): 16-bit state in the optimizer, its checkpoints and its modes.

The kernels' rounding is checked bit by bit in test_state_bf16_kernels.py; here: the state is
bfloat16 (4 bytes per parameter), training follows float32 state and the float64 reference, resume
is bit-identical, checkpoints load across state dtypes with the documented conversion, every path
(fused or not, capturable, finite differences) rounds alike, and the average D does not freeze
(which round-to-nearest would make it do).
"""

import io
import math

import pytest
import torch
from conftest import DEVICES, SeparableProblem, requires_cuda, run_steps
from _small_models import TanhRegression

from esgd_cuda import ESGD, _extension, probes
from esgd_cuda.functional import state_dtype

NATIVE = pytest.mark.skipif(not _extension.LOADED, reason="native extension not loaded")
BF16 = torch.bfloat16
KWARGS = dict(update_d_every=4, d_warmup=5, v=0.6, betas=(0.85, 0.95), weight_decay=0.01)


class Model(TanhRegression):
    """A small tanh regression with a non-diagonal Hessian, in float32."""

    def __init__(self, seed=30, dtype=torch.float32, device="cpu"):
        super().__init__(seed, dtype, device, shape=(40, 30), rows=64, mean=True, quartic=0.01)


def assert_same_run(got, want, what, state_agree=0.98):
    """Two runs whose float32 arithmetic may differ in the last bits (fused kernels against torch ops,
    CPU against CUDA): parameters close, and bf16 state on the same rounding for nearly every element.
    Rounding with other bits would leave about a third of the state elements apart; a last-bit
    difference flips a rounding only where the random 16 bits lie next to the threshold."""
    n = len(got) // 3
    for j, (a, b) in enumerate(zip(got[:n], want[:n])):
        a, b = a.cpu().double(), b.cpu().double()
        err = float((a - b).abs().max() / b.abs().max())
        assert err < 2e-3, f"{what}: param {j} is {err:.2e} away"
    for j, (a, b) in enumerate(zip(got[n:], want[n:])):
        a, b = a.cpu().double(), b.cpu().double()
        same = float((a == b).double().mean())
        assert same >= state_agree, f"{what}: only {same:.4f} of state tensor {j}'s elements agree"
        assert bool(((a - b).abs() <= 2.0**-6 * b.abs() + 1e-30).all()), f"{what}: state {j} off by more than a spacing"


def advance(opt, model, steps):
    values = []
    for _ in range(steps):
        opt.zero_grad()
        opt.backward(model.loss())
        opt.step()
        values.append([p.detach().clone() for p in model.params] +
                      [opt.state[p][k].clone() for p in model.params for k in ("exp_avg", "exp_hz_sq")])
    return values


def round_trip(state_dict):
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, map_location="cpu", weights_only=True)


def state_bytes(opt):
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if torch.is_tensor(v) and v.dim() > 0)


def test_state_is_bfloat16_and_4_bytes_per_parameter(fused):
    model = Model()
    opt = ESGD(model.params, state_dtype=BF16, fused=fused, seed=0)
    advance(opt, model, 2)
    for p in model.params:
        assert opt.state[p]["exp_avg"].dtype == BF16 and opt.state[p]["exp_hz_sq"].dtype == BF16
    assert state_bytes(opt) == 4 * sum(p.numel() for p in model.params)
    other = Model()
    reference = ESGD(other.params, fused=fused, seed=0)
    advance(reference, other, 1)
    assert state_bytes(reference) == 8 * sum(p.numel() for p in model.params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_follows_the_float64_reference(fused, dtype):
    """Separable quartics (the reference's exact curvature): bf16 state stays within a few bfloat16
    spacings of the float64 trajectory, as far as float32 state does with 16-bit parameters."""
    shapes = [(7,), (3, 5), (33,)]
    problem = SeparableProblem(shapes, dtype=torch.float64, seed=3)
    ref = [rp for rp in problem.refs]
    from reference import run_reference

    expected = run_reference(ref, 30, d_warmup=5, update_d_every=4)
    low = problem.astype(dtype)
    opt = ESGD(low.params, update_d_every=4, d_warmup=5, seed=0, fused=fused, state_dtype=BF16)
    got = run_steps(opt, low, 30)
    for j, shape in enumerate(shapes):
        want = torch.tensor([step[j] for step in expected], dtype=torch.float64)
        have = torch.stack([step[j].flatten() for step in got])
        err = float((have - want).abs().max() / want.abs().max())
        assert err < 0.03, f"param {j}: {err:.3e} from the float64 reference"


def test_training_matches_float32_state(fused):
    """Same seed, same data: bf16 state ends within about a bfloat16 spacing's worth of float32 state."""
    finals = {}
    for sdtype in (None, BF16):
        model = Model()
        opt = ESGD(model.params, lr=0.3, state_dtype=sdtype, fused=fused, seed=5)
        advance(opt, model, 60)
        with torch.no_grad():
            finals[sdtype] = (float(model.loss()), [p.detach().clone() for p in model.params])
    with torch.no_grad():
        start = float(Model().loss())
    assert finals[None][0] < 0.8 * start, "the run barely trained"
    assert abs(finals[BF16][0] - finals[None][0]) < 0.02 * finals[None][0]
    for a, b in zip(finals[BF16][1], finals[None][1]):
        assert float((a - b).abs().max() / b.abs().max()) < 0.02


@pytest.mark.parametrize("hvp", ["autograd", "central_difference"])
def test_bf16_state_is_float32_state_rounded_after_each_step(fused, hvp):
    """What state_dtype=bfloat16 does, bit for bit: float32 state's step, then m and D stochastically
    rounded with the documented bits (m the low 16 of bits(step_key(rounding_key(seed, ordinal), t), j),
    D the high 16; probes.py). So its effect on training is the rounding's alone, and
    benchmarks/lm_state_rounding.py's float32-state emulation measures the same thing with other bits."""
    runs = {}
    for sdtype in (BF16, None):
        model = Model()
        opt = ESGD(model.params, **KWARGS, lr=0.3, seed=11, fused=fused, hvp=hvp, state_dtype=sdtype)

        def closure():
            opt.zero_grad()
            loss = model.loss()
            opt.backward(loss)
            return loss

        trace = []
        for _ in range(14):
            opt.step(closure)
            if sdtype is None:
                with torch.no_grad():
                    for ordinal, p in enumerate(model.params):
                        state = opt.state[p]
                        key = probes.step_key(probes.rounding_key(opt.seed, ordinal), state["step"])
                        bits = probes.rounding_bits(key, 0, p)
                        for name, r16 in (("exp_avg", bits & 0xFFFF), ("exp_hz_sq", bits >> 16)):
                            state[name].copy_(probes.round_bf16_stochastic(state[name], r16).float())
            trace.append([p.detach().clone() for p in model.params] +
                         [opt.state[p][k].to(torch.float32, copy=True) for p in model.params for k in ("exp_avg", "exp_hz_sq")])
        runs[sdtype] = trace
    for s, (got, want) in enumerate(zip(runs[BF16], runs[None])):
        for j, (a, b) in enumerate(zip(got, want)):
            assert torch.equal(a, b), f"step {s}, tensor {j}: bf16 state is not float32 state rounded"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("how", ["live", "torch.save"])
def test_resume_is_bit_identical(fused, how, device):
    total, split = 24, 11
    model_full = Model(device=device)
    full = advance(ESGD(model_full.params, **KWARGS, seed=7, fused=fused, state_dtype=BF16), model_full, total)
    model = Model(device=device)
    opt = ESGD(model.params, **KWARGS, seed=7, fused=fused, state_dtype=BF16)
    head = advance(opt, model, split)
    state = opt.state_dict() if how == "live" else round_trip(opt.state_dict())
    resumed_model = model.copy()
    resumed = ESGD(resumed_model.params, **KWARGS, seed=99, fused=fused, state_dtype=BF16)
    resumed.load_state_dict(state)
    tail = advance(resumed, resumed_model, total - split)
    for s, got in enumerate(head + tail):
        for a, b in zip(got, full[s]):
            assert torch.equal(a, b), f"step {s} differs"


def test_every_path_rounds_alike():
    """fused and pure PyTorch, host and capturable counters: the same bits (up to the rare flip of
    a float32 rounding difference)."""
    runs = {}
    for name, kw in (("foreach", dict(fused=False)), ("fused", dict(fused=None)),
                     ("capturable", dict(fused=None, capturable=True)),
                     ("capturable-foreach", dict(fused=False, capturable=True))):
        if kw["fused"] is None and not _extension.LOADED:
            continue
        model = Model()
        opt = ESGD(model.params, **KWARGS, seed=3, state_dtype=BF16, **kw)
        runs[name] = advance(opt, model, 12)[-1]
    for name, got in runs.items():
        assert_same_run(got, runs["foreach"], name)


@NATIVE
def test_capturable_plain_step_matches_step():
    model, twin = Model(), Model()
    opt = ESGD(model.params, **KWARGS, seed=3, state_dtype=BF16, capturable=True)
    ref = ESGD(twin.params, **KWARGS, seed=3, state_dtype=BF16)
    for s in range(14):
        for o, m in ((opt, model), (ref, twin)):
            o.zero_grad()
            o.backward(m.loss())
        if opt.is_estimation_step():
            opt.step()
        else:
            opt.plain_step()
            opt.count_plain_step()
        ref.step()
    def run(o, m):
        return [p.detach() for p in m.params] + [o.state[p][k] for p in m.params for k in ("exp_avg", "exp_hz_sq")]

    assert_same_run(run(opt, model), run(ref, twin), "plain_step()")


@pytest.mark.parametrize("hvp", ["finite_difference", "central_difference"])
def test_finite_difference_estimators(fused, hvp):
    finals = {}
    for sdtype in (None, BF16):
        model = Model()
        opt = ESGD(model.params, lr=0.3, state_dtype=sdtype, fused=fused, seed=5, hvp=hvp)

        def closure():
            opt.zero_grad()
            loss = model.loss()
            loss.backward()
            return loss

        for _ in range(40):
            opt.step(closure)
        finals[sdtype] = float(model.loss().detach())
        if sdtype is BF16:
            assert all(opt.state[p]["exp_hz_sq"].dtype == BF16 for p in model.params)
    assert abs(finals[BF16] - finals[None]) < 0.02 * finals[None]


# ------------------------------------------------------------------ the reason for stochastic rounding

def _sqrt_d_error(opt, problem):
    """Relative error of the mean bias-corrected sqrt(D) against |H| on a quadratic (Hz^2 = H^2 exactly)."""
    want = torch.cat([b.flatten().abs() for _, b, _ in problem.coeffs]).double().mean().item()
    got = opt.diagnostics()[0]["sqrt_d"]["mean"]
    return abs(got / want - 1.0)


def _long_quadratic_run(fused, monkeypatch=None):
    """A diagonal quadratic (a = 0: H = b, constant) estimated on every one of 1200 steps at lr=0 (the
    parameters stay put), so D is the average of a constant: its bias-corrected square root is |b|
    at every step, in exact arithmetic."""
    problem = SeparableProblem([(4096,)], dtype=torch.float32, seed=11)
    problem.coeffs = [(torch.zeros_like(a), b, c) for a, b, c in problem.coeffs]
    opt = ESGD(problem.params, lr=0.0, lr_warmup=0.0, update_d_every=1, d_warmup=0, seed=1, fused=fused,
               state_dtype=BF16)
    run_steps(opt, problem, 1200)
    return _sqrt_d_error(opt, problem)


def test_average_d_does_not_freeze(fused):
    """With round-to-nearest, D stops moving after a few hundred estimates (each moves it by 0.1%,
    under half a bfloat16 spacing) while the bias correction keeps shrinking: the preconditioner
    would be 40% small after 1200 estimates. Stochastic rounding keeps it within 1%."""
    err = _long_quadratic_run(fused)
    assert err < 0.01, f"mean sqrt(D) is {err:.2%} from |H|"


def test_the_freezing_test_fails_with_round_to_nearest(monkeypatch):
    """The test above can fail: the pure-PyTorch path with its rounding replaced by round-to-nearest
    misses |H| by far more than its 1% bound."""
    from esgd_cuda import functional

    def nearest(states, values, params, rounding, high):
        for state, value in zip(states, values):
            state.copy_(value.to(BF16))

    monkeypatch.setattr(functional, "_store_rounded", nearest)
    assert _long_quadratic_run(False) > 0.2


# ------------------------------------------------------------------ checkpoints across state dtypes

@pytest.mark.parametrize("saved, loading", [(None, BF16), (BF16, None), (BF16, torch.float32)],
                         ids=["fp32-to-bf16", "bf16-to-fp32", "bf16-to-explicit-fp32"])
def test_checkpoint_loads_across_state_dtypes(fused, saved, loading):
    """The loading optimizer keeps its state_dtype: float32 state is rounded to nearest into
    bfloat16; bfloat16 state widens exactly; training then goes on in the loader's mode."""
    model = Model()
    opt = ESGD(model.params, **KWARGS, seed=7, fused=fused, state_dtype=saved)
    advance(opt, model, 9)
    state = round_trip(opt.state_dict())
    other = model.copy()
    loader = ESGD(other.params, **KWARGS, seed=1, fused=fused, state_dtype=loading)
    loader.load_state_dict(state)
    assert [g["state_dtype"] for g in loader.param_groups] == [loading]
    want = state_dtype(torch.float32, loading)
    for p, q in zip(model.params, other.params):
        for key in ("exp_avg", "exp_hz_sq"):
            got, original = loader.state[q][key], opt.state[p][key]
            assert got.dtype == want
            assert torch.equal(got, original.to(want)), f"{key}: not the documented conversion"
    advance(loader, other, 5)
    assert all(loader.state[q]["exp_avg"].dtype == want for q in other.params)


def test_checkpoint_of_an_older_version_loads_into_bf16_state():
    """A state dict without state_dtype in its groups (written before the option existed) loads."""
    model = Model()
    opt = ESGD(model.params, **KWARGS, seed=7)
    advance(opt, model, 6)
    state = opt.state_dict()
    for group in state["param_groups"]:
        del group["state_dtype"]
    other = model.copy()
    loader = ESGD(other.params, **KWARGS, seed=1, state_dtype=BF16)
    loader.load_state_dict(state)
    assert loader.param_groups[0]["state_dtype"] is BF16
    assert loader.state[other.params[0]]["exp_avg"].dtype == BF16
    advance(loader, other, 3)


def test_param_groups_choose_their_state_dtype(fused):
    model = Model()
    opt = ESGD([{"params": [model.w], "state_dtype": BF16}, {"params": [model.b]}], seed=0, fused=fused)
    advance(opt, model, 3)
    assert opt.state[model.w]["exp_avg"].dtype == BF16
    assert opt.state[model.b]["exp_avg"].dtype == torch.float32


def test_changing_a_groups_state_dtype_converts_its_state(fused):
    model = Model()
    opt = ESGD(model.params, seed=0, fused=fused, **KWARGS)
    advance(opt, model, 6)
    before = {p: opt.state[p]["exp_hz_sq"].clone() for p in model.params}
    opt.param_groups[0]["state_dtype"] = BF16
    advance(opt, model, 1)  # a plain step: D is converted (round-to-nearest), then only read
    for p in model.params:
        assert opt.state[p]["exp_hz_sq"].dtype == BF16
        assert torch.equal(opt.state[p]["exp_hz_sq"], before[p].to(BF16))


def test_invalid_state_dtype_and_float64_parameters_are_refused():
    model = Model(dtype=torch.float64)
    with pytest.raises(ValueError, match="invalid state_dtype: torch.float16"):
        ESGD(Model().params, state_dtype=torch.float16)
    with pytest.raises(ValueError, match="is float64, whose state is always float64"):
        ESGD(model.params, state_dtype=BF16)
    opt = ESGD(model.params)
    opt.param_groups[0]["state_dtype"] = BF16
    opt.zero_grad()
    opt.backward(model.loss())
    with pytest.raises(ValueError, match="is float64, whose state is always float64"):
        opt.step()


def test_rounding_keys_follow_the_seed_and_the_parameter():
    assert probes.rounding_key(1, 0) != probes.rounding_key(1, 1) != probes.rounding_key(2, 1)
    assert probes.rounding_key(1, 0) == probes.rounding_key(1, 0)
    assert probes.rounding_key(1, 0) != probes.probe_key(1, 0, 0)
    assert 0 <= probes.rounding_key(2**62, 10**6) < 2**63


@requires_cuda
@pytest.mark.parametrize("source, target", [("cpu", "cuda"), ("cuda", "cpu")])
def test_checkpoint_moves_between_devices(source, target):
    """A bf16-state checkpoint written on one device resumes on the other; the two devices round with
    the same bits, so the runs agree up to rare flips of float32 rounding differences."""
    model = Model(device=source)
    opt = ESGD(model.params, **KWARGS, seed=7, state_dtype=BF16)
    advance(opt, model, 9)
    state = round_trip(opt.state_dict())
    moved = Model(device=target)
    with torch.no_grad():
        for p, q in zip(moved.params, model.params):
            p.copy_(q.to(target))
    loader = ESGD(moved.params, **KWARGS, seed=1, state_dtype=BF16)
    loader.load_state_dict(state)
    assert all(loader.state[p]["exp_avg"].device.type == target for p in moved.params)
    assert_same_run(advance(loader, moved, 6)[-1], advance(opt, model, 6)[-1], f"{source} -> {target}")
