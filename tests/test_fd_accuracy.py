"""Finite-difference Hessian-vector products against autograd's exact product, on smooth models.

Each check takes one estimation step's products the way the optimizer takes them (same probe z, one
global h, the closure run at theta and perturbed) and compares them with the float64 double-backward
product H z of the same model at the same parameters, with the same z:

    err = ||Hz_fd - Hz|| / ||Hz||     over all parameters together

Bounds (issue 12): float64 <= 1e-3 (forward) and 1e-5 (central); float32 with the default step
<= 1e-2 (forward) and 1e-3 (central). The default step is sqrt(eps) (forward) or eps**(1/3)
(central) of the parameter dtype, times RMS(theta): it balances the truncation error (~h) against the
rounding error of the gradient difference (~eps/h).
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from esgd_cuda import ESGD

BOUNDS = {
    (torch.float64, "finite_difference"): 1e-3,
    (torch.float64, "central_difference"): 1e-5,
    (torch.float32, "finite_difference"): 1e-2,
    (torch.float32, "central_difference"): 1e-3,
}


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Transformer(nn.Module):
    """Two pre-LN blocks (LayerNorm, SDPA attention, GELU MLP) over token embeddings."""

    def __init__(self, vocab=11, d=16, heads=2, ctx=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(ctx, d) * 0.1)
        self.blocks = nn.ModuleList()
        for _ in range(2):
            self.blocks.append(nn.ModuleDict(dict(
                ln1=nn.LayerNorm(d), attn=Attention(d, heads), ln2=nn.LayerNorm(d),
                mlp=nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)))))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.emb(idx) + self.pos[: idx.shape[1]]
        for blk in self.blocks:
            x = x + blk["attn"](blk["ln1"](x))
            x = x + blk["mlp"](blk["ln2"](x))
        return self.head(self.ln(x))


class Problem:
    """A model and a data stream from a fixed noisy teacher: fresh batches train it without letting
    it memorize them, so its curvature after 100 steps is that of training, not of an interpolated
    batch (where cross-entropy's curvature collapses)."""

    def __init__(self, name, dtype, seed=0):
        torch.manual_seed(seed)
        self.name = name
        if name == "mlp":
            self.model = nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 24), nn.GELU(), nn.Linear(24, 5))
            self.teacher = torch.randn(12, 5)
        elif name == "convnet":
            self.model = nn.Sequential(
                nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.GELU(), nn.Conv2d(6, 6, 3, stride=2),
                nn.Tanh(), nn.Flatten(), nn.Linear(6 * 3 * 3, 4))
        else:
            self.model = Transformer()
        self.model = self.model.to(dtype)
        self.eval_batch = self.batch(torch.Generator().manual_seed(seed + 1000))

    def batch(self, gen):
        """(input, target): teacher labels, one in five of them replaced by a random one."""
        if self.name == "transformer":
            idx = torch.randint(0, 11, (4, 9), generator=gen)
            x, y = idx[:, :-1], (idx[:, :-1] * 3 + 1) % 11  # a fixed map of the current token
            noise = torch.rand(y.shape, generator=gen) < 0.2
            return x, torch.where(noise, torch.randint(0, 11, y.shape, generator=gen), y).reshape(-1)
        if self.name == "mlp":
            x = torch.randn(32, 12, generator=gen)
            y = (x @ self.teacher).argmax(1)
        else:  # the brightest quadrant of channel 0
            x = torch.randn(16, 2, 8, 8, generator=gen)
            y = x[:, 0].reshape(16, 2, 4, 2, 4).mean((2, 4)).reshape(16, 4).argmax(1)
        noise = torch.rand(y.shape, generator=gen) < 0.2
        return x, torch.where(noise, torch.randint(0, 4 if self.name == "convnet" else 5, y.shape, generator=gen), y)

    def loss_of(self, model, batch=None):
        x, y = self.eval_batch if batch is None else batch
        if x.is_floating_point():
            x = x.to(next(model.parameters()).dtype)
        out = model(x)
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y)


def make_problem(name, dtype, seed=0):
    """(model, loss of a model on the problem's evaluation batch)."""
    problem = Problem(name, dtype, seed)
    return problem.model, problem.loss_of


def exact_products(model, loss_of, zs):
    """H z in float64 by double backward, through the math SDPA kernel (the others have none)."""
    model64 = copy.deepcopy(model).double()
    params = list(model64.parameters())
    with sdpa_kernel(SDPBackend.MATH):
        loss = loss_of(model64)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        return torch.autograd.grad(grads, params, grad_outputs=[z.double() for z in zs])


def fd_products(opt, closure):
    """The optimizer's finite-difference products for its next step, in float64, and the probes."""
    trainable = opt._trainable_params()
    zs = opt._curvature.probes(trainable, trainable, opt._step_index, opt._use_fused)
    fd = opt._finite_difference(closure, opt._step_index)
    fd.restore()  # the parameters stay perturbed until the update (or this) restores them
    grads = [p.grad for p in trainable]
    plus, minus = fd.lists(trainable, grads)
    base = grads if minus is None else minus
    hz = [(a.double() - b.double()) * fd.hz_scale[p.device].double() for p, a, b in zip(trainable, plus, base)]
    return hz, zs


def relative_error(approx, exact):
    a = torch.cat([t.reshape(-1) for t in approx])
    e = torch.cat([t.reshape(-1) for t in exact])
    return float((a - e).norm() / e.norm())


def measure(model, loss_of, opt):
    """(error of the finite-difference products, and the model must be left exactly as it was)."""
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        opt.zero_grad()
        loss = loss_of(model)
        loss.backward()
        return loss

    hz, zs = fd_products(opt, closure)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b), "the estimate left the parameters perturbed"
    return relative_error(hz, exact_products(model, loss_of, zs))


@pytest.mark.parametrize("hvp", ["finite_difference", "central_difference"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", ["mlp", "convnet", "transformer"])
def test_matches_the_exact_product_at_init_and_after_training(name, dtype, hvp, fused):
    problem = Problem(name, dtype)
    model = problem.model
    opt = ESGD(model.parameters(), lr=0.3, hvp=hvp, seed=7, fused=fused, d_warmup=5, update_d_every=10)
    errors = [measure(model, problem.loss_of, opt)]
    first = float(problem.loss_of(model).detach())
    gen = torch.Generator().manual_seed(5)
    for _ in range(100):
        batch = problem.batch(gen)

        def closure():
            opt.zero_grad()
            loss = problem.loss_of(model, batch)
            loss.backward()
            return loss

        opt.step(closure)
    trained = float(problem.loss_of(model).detach())
    assert trained < 0.9 * first, f"100 finite-difference steps did not train the model ({first} -> {trained})"
    errors.append(measure(model, problem.loss_of, opt))
    bound = BOUNDS[(dtype, hvp)]
    assert max(errors) <= bound, f"{name} {dtype} {hvp}: errors at init and after 100 steps {errors} > {bound}"


@pytest.mark.parametrize("hvp", ["finite_difference", "central_difference"])
def test_error_has_the_order_of_the_difference_formula(hvp):
    """Truncation error shrinks like h (forward) or h^2 (central): halving h in float64 (where
    rounding is negligible at these steps) must cut it by 2 or 4. A formula of the wrong order,
    e.g. a central difference missing its factor 1/2 or a forward one using the wrong base
    gradient, fails this."""
    model, loss_of = make_problem("mlp", torch.float64, seed=3)
    errs = []
    for rel in (4e-3, 2e-3, 1e-3):
        opt = ESGD(model.parameters(), hvp=hvp, fd_step=rel, seed=1, fused=False)
        errs.append(measure(model, loss_of, opt))
    ratios = [errs[0] / errs[1], errs[1] / errs[2]]
    order = 2.0 if hvp == "finite_difference" else 4.0
    for r in ratios:
        assert 0.8 * order < r < 1.25 * order, f"error ratios {ratios} for halving h; expected ~{order}"


def test_one_global_step_for_all_parameters():
    """h is one scalar: scaling one parameter tensor up must not change the others' perturbation.
    With a per-tensor h the estimate would be H D z for a diagonal D, which this detects: a loss that
    couples a tiny and a huge parameter gives a wrong product."""
    torch.manual_seed(0)
    a = (torch.randn(6, dtype=torch.float64) * 1e-3).requires_grad_()
    b = (torch.randn(6, dtype=torch.float64) * 1e3).requires_grad_()
    M = torch.randn(6, 6, dtype=torch.float64)

    def loss_of(_=None):
        return (a @ M @ (b * 1e-3)) ** 2 / 2 + (a ** 2).sum() + (b * 1e-3).pow(2).sum()

    opt = ESGD([a, b], hvp="central_difference", seed=3, fused=False)

    def closure():
        opt.zero_grad()
        loss = loss_of()
        loss.backward()
        return loss

    hz, zs = fd_products(opt, closure)
    grads = torch.autograd.grad(loss_of(), [a, b], create_graph=True)
    exact = torch.autograd.grad(grads, [a, b], grad_outputs=zs)
    assert relative_error(hz, exact) < 1e-6
    h = float(opt._curvature.last_h)
    rms = float(torch.cat([a.detach(), b.detach()]).pow(2).mean().sqrt())
    assert h == pytest.approx(rms * (torch.finfo(torch.float64).eps ** (1 / 3)), rel=1e-12)
