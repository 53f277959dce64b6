"""ESGD with torch.amp: GradScaler flows, skipped steps, Hz overflow, 16-bit parameters.

Conventions used below: a *taken* step is one the optimizer applied (``diagnostics()[0]['step']``
advanced); a *skipped* step is one GradScaler found inf/NaN in. Data are fixed, so a skipped step
is simply retried, and a run with skips must trace the same taken-step trajectory as one without.

Scaling by a power of two is exact in binary floating point (barring overflow/underflow), and
every backward op is linear in its incoming gradient, so in fp32 without autocast the scaled run
must reproduce the unscaled run bit for bit; with autocast the comparison is to a tolerance.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from esgd_cuda import ESGD

KWARGS = dict(lr=0.1, update_d_every=4, d_warmup=5)
SEED = 123
# Schedule with d_warmup=5, update_d_every=4: steps 0-4 estimate, 5-7 plain, 8 estimates, 9-11 plain...
ESTIMATION_STEP, PLAIN_STEP = 2, 6


def _cpu_mse_loss_supports(dtype):
    """Whether this torch has CPU mse_loss forward and backward kernels for `dtype` (torch 2.4 lacks
    them for bfloat16 and float16)."""
    try:
        a = torch.zeros(2, dtype=dtype, requires_grad=True)
        F.mse_loss(a, torch.ones(2, dtype=dtype)).backward()
    except RuntimeError:
        return False
    return True


MSE_16BIT = {dt: _cpu_mse_loss_supports(dt) for dt in (torch.bfloat16, torch.float16)}


def make_mlp(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model.to(dtype)


def make_data(dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 6, generator=gen)
    y = torch.sin(x.sum(1, keepdim=True))
    return x.to(dtype), y.to(dtype)


def flat(params):
    return torch.cat([p.detach().double().flatten() for p in params])


def snapshot(opt, model):
    """Everything a skipped step must leave alone."""
    state = {}
    for i, p in enumerate(model.parameters()):
        state[i] = {k: (v.clone() if torch.is_tensor(v) else copy.deepcopy(v)) for k, v in opt.state[p].items()}
    diag = opt.diagnostics()
    return dict(
        params=[p.detach().clone() for p in model.parameters()],
        state=state,
        esgd={k: v for k, v in copy.deepcopy(opt.state_dict()["param_groups"][0]["esgd"]).items() if "skip" not in k},
        diag=[{k: v for k, v in d.items() if k not in ("skipped_steps", "estimated")} for d in diag],
        skipped=[d["skipped_steps"] for d in diag],
        should_create_graph=opt.should_create_graph(),
    )


def assert_unchanged(before, after, where):
    for a, b in zip(before["params"], after["params"]):
        assert torch.equal(a, b), f"{where}: a parameter changed"
    assert before["state"].keys() == after["state"].keys()
    for i in before["state"]:
        sa, sb = before["state"][i], after["state"][i]
        assert sa.keys() == sb.keys(), f"{where}: state keys of param {i} changed"
        for k in sa:
            if torch.is_tensor(sa[k]):
                assert torch.equal(sa[k], sb[k]), f"{where}: state[{i}][{k!r}] changed"
            else:
                assert sa[k] == sb[k], f"{where}: state[{i}][{k!r}] changed {sa[k]} -> {sb[k]}"
    assert before["esgd"] == after["esgd"], f"{where}: state_dict()['esgd'] changed"
    assert before["diag"] == after["diag"], f"{where}: diagnostics changed"
    assert before["should_create_graph"] == after["should_create_graph"], f"{where}: schedule moved"


def taken_steps(opt):
    return opt.diagnostics()[0]["step"]


def train(
    flow,
    num_steps,
    *,
    fused=None,
    autocast=None,
    dtype=torch.float32,
    clip=None,
    poison=None,
    init_scale=2.0**10,
    growth_interval=3,
    max_iters=None,
    on_skip=None,
):
    """Train the MLP until `num_steps` steps were taken; returns per-taken-step params and more.

    flow: "none" (no scaler), "scale" (opt.backward(scaler.scale(loss)); scaler.step(opt)) or
    "kw" (opt.backward(loss, scaler=scaler); scaler.unscale_(opt); [clip]; scaler.step(opt)).
    poison(iteration, opt, model, loss) may return a poisoned loss or edit p.grad (see below).
    """
    model = make_mlp(dtype)
    x, y = make_data(dtype)
    opt = ESGD(model.parameters(), **KWARGS, seed=SEED, fused=fused)
    scaler = None
    if flow != "none":
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=growth_interval)
    traj, losses, scales, skipped_iters = [], [], [], []
    it = 0
    max_iters = max_iters or 3 * num_steps
    while taken_steps(opt) < num_steps:
        assert it < max_iters, f"only {taken_steps(opt)} of {num_steps} steps taken in {it} iterations"
        opt.zero_grad()
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            out, target = model(x), y
            if not MSE_16BIT.get(out.dtype, True):
                out, target = out.float(), y.float()  # the parameters (and their grads) stay 16-bit
            loss = F.mse_loss(out, target)
        losses.append(loss.item())
        if poison is not None and poison.get("where") == "loss" and it == poison["iteration"]:
            loss = loss * math.inf
        if flow == "none":
            opt.backward(loss)
        elif flow == "scale":
            opt.backward(scaler.scale(loss))
        else:
            opt.backward(loss, scaler=scaler)
        if poison is not None and poison.get("where") == "grad" and it == poison["iteration"]:
            with torch.no_grad():
                next(iter(model.parameters())).grad.view(-1)[3] = math.inf
        before_steps = taken_steps(opt)
        before = snapshot(opt, model) if poison is not None and it == poison["iteration"] else None
        if flow == "none":
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
        else:
            if flow == "kw":
                scaler.unscale_(opt)
                if clip is not None:
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                    assert torch.isfinite(norm) or before is not None
            scale = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            scales.append((scale, scaler.get_scale()))
        if taken_steps(opt) == before_steps:
            skipped_iters.append(it)
            if before is not None:
                after = snapshot(opt, model)
                assert_unchanged(before, after, f"skipped iteration {it}")
                assert after["skipped"][0] == before["skipped"][0] + 1, "skipped_steps did not count the skip"
                if on_skip is not None:
                    on_skip(opt, scaler)
        else:
            traj.append(flat(model.parameters()))
        it += 1
    return dict(traj=traj, losses=losses, scales=scales, skipped=skipped_iters, opt=opt, model=model)


# ------------------------------------------------------------------ (a) the two flows track fp32


@pytest.mark.parametrize("flow", ["scale", "kw"])
def test_scaled_fp32_run_is_bit_identical_to_unscaled(fused, flow):
    """Without autocast the loss scale is a power of two: every scaled quantity is exact."""
    clip = 0.5 if flow == "kw" else None
    ref = train("none", 30, fused=fused, clip=clip)
    got = train(flow, 30, fused=fused, clip=clip)
    assert not got["skipped"], "no step should overflow in fp32"
    assert got["scales"][-1][1] > got["scales"][0][0], "growth_interval=3 should have grown the scale"
    for s, (a, b) in enumerate(zip(got["traj"], ref["traj"])):
        assert torch.equal(a, b), f"step {s}: scaled run differs from the unscaled one by {(a - b).abs().max():.3e}"
    assert ref["losses"][-1] < 0.9 * ref["losses"][0], "the run did not train"


@pytest.mark.parametrize("flow", ["scale", "kw"])
@pytest.mark.parametrize("autocast", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_scaled_run_tracks_fp32(fused, flow, autocast):
    """Autocast rounds activations, so only a tolerance: 2e-2 of the parameters' scale after 30 steps.

    (Measured deviation of an unscaled autocast run: ~7e-4 in bf16, ~1.3e-4 in fp16.) fp16 backward
    overflows once the scale has grown, so this also exercises skip-and-retry inside a real run.
    """
    ref = train("none", 30, fused=fused)
    got = train(flow, 30, fused=fused, autocast=autocast, growth_interval=2, max_iters=90)
    assert len(got["traj"]) == 30
    for s in (4, 9, 29):
        err = (got["traj"][s] - ref["traj"][s]).abs().max() / ref["traj"][s].abs().max()
        assert err <= 2e-2, f"step {s}: {autocast} + GradScaler drifted {err:.3e} from fp32"
    moved = (ref["traj"][-1] - flat(make_mlp().parameters())).abs().max()
    assert moved > 0.05, "the run barely moved: the comparison would prove nothing"
    for before, after in got["scales"]:
        assert math.isfinite(after) and after > 0


def test_p_grad_stays_scaled_through_the_step(fused):
    """ESGD unscales inside the update: p.grad still holds the scaled gradient after scaler.step."""
    model = make_mlp()
    x, y = make_data()
    opt = ESGD(model.parameters(), **KWARGS, seed=SEED, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for s in range(7):  # estimation and plain steps
        opt.zero_grad()
        opt.backward(scaler.scale(F.mse_loss(model(x), y)))
        grads = [p.grad.clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        for g, p in zip(grads, model.parameters()):
            assert torch.equal(p.grad, g), f"step {s}: p.grad was modified by the step"
        assert taken_steps(opt) == s + 1


# ------------------------------------------------------------------ (b) a skipped step changes nothing


@pytest.mark.parametrize("flow", ["scale", "kw"])
@pytest.mark.parametrize("where", ["grad", "loss"])
@pytest.mark.parametrize("iteration", [ESTIMATION_STEP, PLAIN_STEP], ids=["estimation-step", "plain-step"])
def test_injected_inf_skips_step_and_retries_with_same_probe(fused, flow, where, iteration):
    """The skip leaves everything bit-identical, and the retried run equals an uninterrupted one."""
    ref = train(flow, 14, fused=fused, growth_interval=10**6)
    halved = []

    def on_skip(opt, scaler):
        halved.append(scaler.get_scale())

    got = train(
        flow,
        14,
        fused=fused,
        growth_interval=10**6,
        poison=dict(where=where, iteration=iteration),
        on_skip=on_skip,
    )
    assert got["skipped"] == [iteration], f"expected exactly iteration {iteration} skipped, got {got['skipped']}"
    assert halved == [2.0**9], f"GradScaler did not back off after the skip: {halved}"
    assert got["opt"].diagnostics()[0]["skipped_steps"] == 1
    assert ref["opt"].diagnostics()[0]["skipped_steps"] == 0
    for s, (a, b) in enumerate(zip(got["traj"], ref["traj"])):
        assert torch.equal(a, b), f"taken step {s}: the run with a skipped step differs by {(a - b).abs().max():.3e}"
    for p, q in zip(got["model"].parameters(), ref["model"].parameters()):
        for key in ref["opt"].state[q]:
            a, b = got["opt"].state[p][key], ref["opt"].state[q][key]
            assert torch.equal(a, b) if torch.is_tensor(b) else a == b, f"state {key!r} differs"
    sd_got = {k: v for k, v in got["opt"].state_dict()["param_groups"][0]["esgd"].items() if "skip" not in k}
    sd_ref = {k: v for k, v in ref["opt"].state_dict()["param_groups"][0]["esgd"].items() if "skip" not in k}
    assert sd_got == sd_ref


# ------------------------------------------------------------------ (c) Hz overflow is a nonfinite gradient

# loss = 0.5*sum((sqrt_c*p)^2) with p = u*2^-(2*log2_sqrt_c), u in [0.5, 1.5]: the gradient c*p = u
# is of order 1 and the Hessian is c*I, so Hz = c*z = +-c. Under the loss scale S the scaled
# gradient (~S) is finite in the parameter dtype but the scaled Hz (c*S) is not: only the
# curvature overflows. One backoff by 2^-4 brings c*S back into range.
#            dtype          log2 sqrt(c)  log2 S
STIFF = {
    "fp32": (torch.float32, 20, 100),  # Hz*S = 2^140 > fp32 max; recovery at 2^96, 2^92, 2^88, 2^84
    "fp16": (torch.float16, 4, 10),  # Hz*S = 2^18 > fp16 max; recovery at S = 2^6
}


def stiff_param(dtype, log2_sqrt_c, seed=5):
    gen = torch.Generator().manual_seed(seed)
    u = torch.empty(16, dtype=torch.float64).uniform_(0.5, 1.5, generator=gen)
    return (u * 2.0 ** (-2 * log2_sqrt_c)).to(dtype).requires_grad_()


def stiff_loss(p, log2_sqrt_c):
    return 0.5 * ((2.0**log2_sqrt_c * p) ** 2).sum()


@pytest.mark.parametrize("flow", ["scale", "kw"])
@pytest.mark.parametrize("case", list(STIFF))
def test_hz_overflow_marks_gradient_nonfinite_and_backs_off(fused, flow, case):
    dtype, log2_sqrt_c, log2_scale = STIFF[case]
    p = stiff_param(dtype, log2_sqrt_c)
    check = p.detach().clone().requires_grad_()
    (first_order,) = torch.autograd.grad(stiff_loss(check, log2_sqrt_c) * 2.0**log2_scale, check)
    assert torch.isfinite(first_order).all(), "test premise: the scaled gradient alone is finite"
    # GradScaler refuses to unscale_ fp16 gradients; scaler.step alone is the fp16 flow.
    unscale = flow == "kw" and dtype != torch.float16

    def backward():
        opt.zero_grad()
        if flow == "scale":
            opt.backward(scaler.scale(stiff_loss(p, log2_sqrt_c)))
        else:
            opt.backward(stiff_loss(p, log2_sqrt_c), scaler=scaler)

    def scaler_step():
        if unscale:
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()

    opt = ESGD([p], lr=0.1, update_d_every=4, d_warmup=5, seed=SEED, fused=fused)
    scaler = torch.amp.GradScaler(
        "cpu", init_scale=2.0**log2_scale, backoff_factor=2.0**-4, growth_interval=10**6
    )
    assert opt.should_create_graph()
    start = p.detach().clone()
    backward()
    assert not torch.isfinite(p.grad).all(), "an overflowing Hz must show up as a nonfinite p.grad"
    scaler_step()
    assert torch.equal(p.detach(), start), "the step with an overflowing Hz was not skipped"
    assert scaler.get_scale() == 2.0 ** (log2_scale - 4), "GradScaler did not lower its scale"
    diag = opt.diagnostics()[0]
    assert diag["skipped_steps"] == 1 and diag["step"] == 0 and diag["estimates"] == 0
    assert diag["sqrt_d"] is None
    assert opt.should_create_graph()

    # Backing off brings the scaled Hz back into range: training resumes.
    for _ in range(6):
        backward()
        scaler_step()
    diag = opt.diagnostics()[0]
    assert diag["step"] >= 1, f"never recovered: scale {scaler.get_scale()}, diagnostics {diag}"
    assert torch.isfinite(p).all() and not torch.equal(p.detach(), start)
    assert torch.isfinite(opt.state[p]["exp_hz_sq"]).all()
    # The estimate is the unscaled one: |Hz| = c everywhere, so the bias-corrected sqrt(D) is c.
    c = 2.0 ** (2 * log2_sqrt_c)
    for key in ("min", "max"):
        assert diag["sqrt_d"][key] == pytest.approx(c, rel=1e-4), (
            f"sqrt_d[{key!r}] = {diag['sqrt_d'][key]:.6g}, expected c = {c:.6g} (scale now {scaler.get_scale()})"
        )


# ------------------------------------------------------------------ (d) unscale_ with Hz of unknown scale


def test_unscale_then_step_without_scaler_kw_raises_and_changes_nothing(fused):
    model = make_mlp()
    x, y = make_data()
    opt = ESGD(model.parameters(), **KWARGS, seed=SEED, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    # One good step first, so that there is state to protect.
    opt.zero_grad()
    opt.backward(F.mse_loss(model(x), y), scaler=scaler)
    scaler.step(opt)
    scaler.update()
    assert opt.should_create_graph()
    opt.zero_grad()
    opt.backward(scaler.scale(F.mse_loss(model(x), y)))  # Hz stays scaled: the optimizer cannot know by what
    scaler.unscale_(opt)
    before = snapshot(opt, model)
    with pytest.raises(RuntimeError, match=r"scaler="):
        scaler.step(opt)
    after = snapshot(opt, model)
    assert_unchanged(before, after, "refused step")
    assert after["skipped"] == before["skipped"]


# ------------------------------------------------------------------ (e) 16-bit parameters


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_params_train_with_fp32_state(fused, dtype):
    got = train("scale", 30, fused=fused, dtype=dtype, growth_interval=2, max_iters=90)
    model, opt = got["model"], got["opt"]
    losses = got["losses"]
    assert losses[-1] < 0.6 * losses[0], f"{dtype} loss went {losses[0]:.4f} -> {losses[-1]:.4f}"
    for p in model.parameters():
        assert p.dtype == dtype
        assert torch.isfinite(p).all()
        for key in ("exp_avg", "exp_hz_sq"):
            assert opt.state[p][key].dtype == torch.float32, (dtype, key, opt.state[p][key].dtype)
            assert torch.isfinite(opt.state[p][key]).all()
    diag = opt.diagnostics()[0]
    assert diag["step"] == 30 and diag["sqrt_d"] is not None
    assert 0 < diag["sqrt_d"]["min"] <= diag["sqrt_d"]["mean"] <= diag["sqrt_d"]["max"] < math.inf


@pytest.mark.parametrize("flow", ["scale", "kw"])
@pytest.mark.parametrize("log2_scale", [0, 24, 60, 80, 100])
def test_curvature_estimate_does_not_depend_on_the_loss_scale(fused, flow, log2_scale):
    """One estimation step under any power-of-two loss scale gives the unscaled step bit for bit.

    GradScaler's scale keeps doubling while no step overflows (fp32 or bf16 training), so scales
    far beyond 2^64 are reachable: unscaling Hz must not overflow (Hz*S)^2 nor underflow 1/S^2.
    """
    model = make_mlp()
    x, y = make_data()
    ref_model = make_mlp()
    ref = ESGD(ref_model.parameters(), **KWARGS, seed=SEED, fused=fused)
    ref.backward(F.mse_loss(ref_model(x), y))
    ref.step()

    opt = ESGD(model.parameters(), **KWARGS, seed=SEED, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**log2_scale)
    loss = F.mse_loss(model(x), y)
    if flow == "scale":
        opt.backward(scaler.scale(loss))
    else:
        opt.backward(loss, scaler=scaler)
    scaler.step(opt)
    scaler.update()
    assert taken_steps(opt) == 1, "the step was skipped"
    for j, (p, q) in enumerate(zip(model.parameters(), ref_model.parameters())):
        for key in ("exp_avg", "exp_hz_sq"):
            a, b = opt.state[p][key], ref.state[q][key]
            assert torch.equal(a, b), (
                f"scale 2^{log2_scale}: state[{j}][{key!r}] differs from the unscaled run "
                f"(max {a.abs().max():.3e} vs {b.abs().max():.3e})"
            )
        assert torch.equal(p, q), f"scale 2^{log2_scale}: param {j} differs from the unscaled run"
