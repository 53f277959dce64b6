"""Finite-difference estimators in training: accumulation, checkpoints, maximize, invariances,
capturable mode, torch.compile with default SDPA and dropout, and the error that points to them."""

import copy
import io

import pytest
import torch
import torch._dynamo
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from esgd_cuda import ESGD

MODES = ["finite_difference", "central_difference"]
SCHEDULE = dict(d_warmup=4, update_d_every=3, weight_decay=0.01, v=0.7)


# The exact estimator is invariant to rounding; a difference divides rounding errors of the gradient
# (~1e-16 relative) by the step h (fd_step ~ 1.5e-8 forward, 6e-6 central, times RMS(theta)), so the
# invariances hold to about 1e-16 / 1.5e-8 ~ 1e-8 (forward) and ~1e-10 (central) per estimate.
INVARIANCE_TOL = {"finite_difference": 1e-6, "central_difference": 1e-8}


def model_and_data(dtype=torch.float64, seed=0, n=24):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 2)).to(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 5, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randn(n, 2, generator=gen, dtype=torch.float64).to(dtype)
    return model, x, y


def flat(model):
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def train(opt, model, x, y, steps, k=1, sign=1.0):
    """FD training through opt.step(closure); the closure accumulates k micro-batches."""
    out = []
    for _ in range(steps):
        def closure():
            opt.zero_grad()
            total = 0.0
            for xb, yb in zip(x.chunk(k), y.chunk(k)):
                loss = sign * F.mse_loss(model(xb), yb) / k
                loss.backward()
                total += loss.detach()
            return total

        opt.step(closure)
        out.append(flat(model))
    return out


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("hvp", MODES)
def test_accumulation_inside_the_closure_equals_the_whole_batch(hvp, k, fused):
    base_model, x, y = model_and_data()
    results = []
    for micro in (1, k):
        model = copy.deepcopy(base_model)
        opt = ESGD(model.parameters(), hvp=hvp, seed=3, fused=fused, **SCHEDULE)
        results.append(train(opt, model, x, y, 12, k=micro))
    moved = (results[0][-1] - flat(base_model)).abs().max()
    assert moved > 1e-2
    # Micro-batches change only the rounding of the summed gradients, which the difference divides
    # by h (see INVARIANCE_TOL); the exact estimator's accumulation test holds to 1e-12.
    for s, (a, b) in enumerate(zip(*results)):
        torch.testing.assert_close(b, a, rtol=INVARIANCE_TOL[hvp], atol=INVARIANCE_TOL[hvp], msg=f"step {s}")


@pytest.mark.parametrize("how", ["live", "torch.save"])
@pytest.mark.parametrize("hvp", MODES)
def test_resume_is_bit_identical(hvp, how, fused):
    base_model, x, y = model_and_data()
    model = copy.deepcopy(base_model)
    opt = ESGD(model.parameters(), hvp=hvp, seed=3, fused=fused, **SCHEDULE)
    full = train(opt, model, x, y, 14)

    model = copy.deepcopy(base_model)
    opt = ESGD(model.parameters(), hvp=hvp, seed=3, fused=fused, **SCHEDULE)
    train(opt, model, x, y, 6)
    sd, params = opt.state_dict(), [p.detach().clone() for p in model.parameters()]
    if how == "torch.save":
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        sd = torch.load(buf, weights_only=True)
    resumed_model = copy.deepcopy(base_model)
    with torch.no_grad():
        for p, q in zip(resumed_model.parameters(), params):
            p.copy_(q)
    # A different seed at construction: the checkpoint's seed must win.
    resumed = ESGD(resumed_model.parameters(), hvp=hvp, seed=99, fused=fused, **SCHEDULE)
    resumed.load_state_dict(sd)
    rest = train(resumed, resumed_model, x, y, 8)
    for s, (a, b) in enumerate(zip(full[6:], rest)):
        assert torch.equal(a, b), f"resumed step {6 + s} differs"


@pytest.mark.parametrize("hvp", MODES)
def test_maximizing_the_negated_loss_is_minimizing_it(hvp, fused):
    base_model, x, y = model_and_data()
    runs = []
    for sign, maximize in ((1.0, False), (-1.0, True)):
        model = copy.deepcopy(base_model)
        opt = ESGD(model.parameters(), hvp=hvp, seed=3, fused=fused, maximize=maximize, **SCHEDULE)
        runs.append(train(opt, model, x, y, 10, sign=sign))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def coupled(seed, hvp, fused, loss_scale=1.0, reparam=1.0, steps=40):
    """A coupled quadratic-plus-quartic loss of x = reparam * params (as in test_optimizer_probe)."""
    gen = torch.Generator().manual_seed(seed)
    H = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    H = H @ H.T / 5 + torch.eye(5, dtype=torch.float64)
    quartic = torch.linspace(0.2, 1.0, 15, dtype=torch.float64).reshape(5, 3)
    x0 = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    params = [(x0[:3] / reparam).clone().requires_grad_(), (x0[3:] / reparam).clone().requires_grad_()]
    opt = ESGD(params, hvp=hvp, seed=1, fused=fused, lr=0.5, betas=(0.9, 0.99), v=0.7, eps=1e-14,
               weight_decay=0.01, update_d_every=3, d_warmup=5)
    traj = []
    for _ in range(steps):
        def closure():
            opt.zero_grad()
            xx = torch.cat(params) * reparam
            loss = loss_scale * (0.5 * (xx * (H @ xx)).sum() + (quartic * xx**4).sum() / 4)
            loss.backward()
            return loss

        opt.step(closure)
        traj.append(torch.cat([p.detach() for p in params]) * reparam)
    return traj




@pytest.mark.parametrize("n", [1000.0, 1e-3])
@pytest.mark.parametrize("hvp", MODES)
def test_invariant_to_loss_scale(hvp, n, fused):
    base = coupled(3, hvp, fused)
    scaled = coupled(3, hvp, fused, loss_scale=n)
    assert (base[-1] - base[0]).abs().max() > 0.1
    for s, (a, b) in enumerate(zip(base, scaled)):
        torch.testing.assert_close(b, a, rtol=INVARIANCE_TOL[hvp], atol=INVARIANCE_TOL[hvp], msg=f"step {s}")


@pytest.mark.parametrize("n", [1000.0, 3.0])
@pytest.mark.parametrize("hvp", MODES)
def test_invariant_to_reparametrization(hvp, n, fused):
    """p = n * q: h is relative to RMS(q), so the perturbation of p, and the trajectory, are the same."""
    base = coupled(3, hvp, fused)
    reparam = coupled(3, hvp, fused, reparam=n)
    for s, (a, b) in enumerate(zip(base, reparam)):
        torch.testing.assert_close(b, a, rtol=INVARIANCE_TOL[hvp], atol=INVARIANCE_TOL[hvp], msg=f"step {s}")


@pytest.mark.parametrize("hvp", MODES)
def test_capturable_mode_matches_the_host_path(hvp, fused):
    """Estimation steps run eagerly through step(closure); plain steps through plain_step()."""
    base_model, x, y = model_and_data()
    runs = []
    for capturable in (False, True):
        model = copy.deepcopy(base_model)
        opt = ESGD(model.parameters(), hvp=hvp, seed=3, fused=fused, capturable=capturable, **SCHEDULE)
        traj = []
        for _ in range(12):
            def closure():
                opt.zero_grad()
                loss = F.mse_loss(model(x), y)
                loss.backward()
                return loss

            if capturable and not opt.is_estimation_step():
                closure()
                opt.plain_step()
                opt.count_plain_step()
            else:
                opt.step(closure)
            traj.append(flat(model))
        runs.append(traj)
    for s, (a, b) in enumerate(zip(*runs)):
        torch.testing.assert_close(b, a, rtol=1e-13, atol=1e-13, msg=f"step {s}")


class TinyLM(nn.Module):
    """One transformer block with dropout outside attention; attention through F.sdpa (default
    backend: flash on CPU, which has no double backward)."""

    def __init__(self, vocab=13, d=16, heads=2, p=0.1):
        super().__init__()
        self.heads = heads
        self.emb = nn.Embedding(vocab, d)
        self.ln1, self.ln2, self.ln = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.drop = nn.Dropout(p)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.emb(idx)
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.drop(self.proj(a))
        x = x + self.drop(self.mlp(self.ln2(x)))
        return self.head(self.ln(x))


def lm_batches(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        idx = torch.randint(0, 13, (4, 9), generator=gen)
        out.append((idx[:, :-1], ((idx[:, :-1] * 5 + 2) % 13).reshape(-1)))
    return out


def test_exact_mode_names_the_finite_difference_option_when_there_is_no_double_backward():
    model = TinyLM()
    (x, y), = lm_batches(1)
    opt = ESGD(model.parameters())
    with pytest.raises(RuntimeError, match=r"hvp='finite_difference'") as info:
        opt.backward(F.cross_entropy(model(x).reshape(-1, 13), y))
    assert "flash_attention" in str(info.value)
    assert opt._step_index == 0 and not opt.state


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_model_with_default_sdpa_and_dropout_trains(fresh_dynamo):
    """torch.compile + default SDPA + dropout, in finite-difference mode: it trains, and after 20
    estimates its preconditioner D agrees with the exact one that autograd (eager, math SDPA, double
    backward) computes at the same parameters, on the same batches, probes and dropout masks.

    At the same parameters: a shadow ESGD in exact mode follows the trained model's parameters and
    folds its exact products into its own D. (Two separately trained runs would also differ by how
    far their trajectories drift apart, which dropout's noise amplifies, not by the estimators.)
    Same masks: inductor draws with eager's generator (fallback_random) and every step starts from
    the same seed in both; the finite-difference passes replay it, so each step consumes what one
    eager forward consumes. Bound: the forward difference's error per estimate is ~1e-3 relative in
    float32 with the default step (<= 1e-2 by test_fd_accuracy); D averages (Hz)^2, whose relative
    error is at most about twice that of Hz: 2e-2. A wrong probe, h or mask is off by O(1).
    """
    import torch._inductor.config as inductor_config

    with inductor_config.patch(fallback_random=True):
        _compare_compiled_with_exact()


def _compare_compiled_with_exact():
    batches = lm_batches(20, seed=1)
    kwargs = dict(lr=0.3, d_warmup=20, seed=11)

    torch.manual_seed(0)
    model = TinyLM()
    shadow = copy.deepcopy(model)
    compiled = torch.compile(model)
    opt = ESGD(model.parameters(), hvp="finite_difference", **kwargs)
    exact = ESGD(shadow.parameters(), **kwargs)
    losses = []
    for s, (x, y) in enumerate(batches):
        with torch.no_grad():
            for a, b in zip(shadow.parameters(), model.parameters()):
                a.copy_(b)
        torch.manual_seed(1000 + s)
        with sdpa_kernel(SDPBackend.MATH):
            exact.zero_grad()
            exact.backward(F.cross_entropy(shadow(x).reshape(-1, 13), y))
        exact.step()

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(compiled(x).reshape(-1, 13), y)
            loss.backward()
            return loss

        torch.manual_seed(1000 + s)
        losses.append(float(opt.step(closure).detach()))
    assert opt.diagnostics()[0]["estimates"] == 20 == exact.diagnostics()[0]["estimates"]
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5]), f"did not train: {losses}"
    d_fd = torch.cat([opt.state[p]["exp_hz_sq"].reshape(-1) for p in model.parameters()])
    d_exact = torch.cat([exact.state[p]["exp_hz_sq"].reshape(-1) for p in shadow.parameters()])
    err = float((d_fd - d_exact).norm() / d_exact.norm())
    assert err < 2e-2, f"preconditioners differ by {err:.3e}"
