"""Gradient accumulation with opt.backward: k micro-batches equal one big batch, at constant memory.

On estimation steps opt.backward computes Hz for the micro-batch right away (with the step's probe,
which is the same for every micro-batch) and frees the double-backward graph, so accumulating k
micro-batches of loss_i/k gives the gradient and Hz of the mean loss over the concatenated batch.
"""

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cuda
from reference import estimation_schedule

from esgd_cuda import ESGD

KWARGS = dict(lr=0.3, update_d_every=4, d_warmup=5, v=0.8, weight_decay=0.01)
NUM_STEPS = 12  # estimation steps 0-4 and 8, plain steps 5-7 and 9-11
BATCH = 32


class StashingTanh(torch.nn.Module):
    """tanh keeps its output for backward: a weakref to it tells whether the graph is still alive."""

    def __init__(self):
        super().__init__()
        self.refs = []

    def forward(self, h):
        out = torch.tanh(h)
        self.refs.append(weakref.ref(out))
        return out


def make_mlp(dtype, seed=0, hidden=16, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    stash = StashingTanh()
    model = torch.nn.Sequential(torch.nn.Linear(6, hidden), stash, torch.nn.Linear(hidden, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
    return model.to(device=device, dtype=dtype), stash


def batches(step, dtype, seed=1):
    """A fresh random batch for every step (the same for every run)."""
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    x = torch.randn(BATCH, 6, generator=gen, dtype=torch.float64)
    y = torch.sin(x.sum(1, keepdim=True)) + 0.1 * torch.randn(BATCH, 1, generator=gen, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def run(k, dtype, fused, steps=NUM_STEPS):
    model, _ = make_mlp(dtype)
    opt = ESGD(model.parameters(), **KWARGS, seed=77, fused=fused)
    traj = []
    for s in range(steps):
        x, y = batches(s, dtype)
        opt.zero_grad()
        for xb, yb in zip(x.chunk(k), y.chunk(k)):
            opt.backward(F.mse_loss(model(xb), yb) / k)
        opt.step()
        traj.append(torch.cat([p.detach().double().flatten() for p in model.parameters()]))
    return traj, opt, model


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-5), (torch.float64, 1e-12)], ids=["fp32", "fp64"])
def test_accumulated_micro_batches_equal_one_big_batch(fused, k, dtype, rtol):
    expected, opt_big, model_big = run(1, dtype, fused)
    actual, opt, model = run(k, dtype, fused)
    moved = (expected[-1] - expected[0]).abs().max()
    assert moved > 0.05, "the run barely moved: the comparison would prove nothing"
    for s, (a, b) in enumerate(zip(actual, expected)):
        err = (a - b).abs().max() / b.abs().max()
        assert err <= rtol, f"k={k} step {s}: accumulated run is {err:.3e} away from the big batch"
    for p, q in zip(model.parameters(), model_big.parameters()):
        scale = opt_big.state[q]["exp_hz_sq"].abs().max()
        err = (opt.state[p]["exp_hz_sq"] - opt_big.state[q]["exp_hz_sq"]).abs().max() / scale
        assert err <= 10 * rtol, f"k={k}: exp_hz_sq is {err:.3e} away from the big batch's"
        assert opt.state[p]["estimates"] == opt_big.state[q]["estimates"] == 6
        assert opt.state[p]["step"] == NUM_STEPS


# Two 2x2 Hessians with different eigenvectors; their sum is 2*I. If every micro-batch of a step
# sees the same probe z, the accumulated Hz is 2z and (Hz)^2 = 4 exactly in every entry; with a
# fresh probe per micro-batch, Hz = A1 z1 + A2 z2 has entries in {0, +-2, +-4}, not all of size 2.
A1 = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
A2 = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)


@pytest.mark.parametrize("k", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_every_micro_batch_of_a_step_uses_the_same_probe(fused, k, dtype):
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(2, 64, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    # beta2 = 0: exp_hz_sq holds the latest (Hz)^2, and the bias correction is 1.
    opt = ESGD([x], lr=0.0, betas=(0.9, 0.0), update_d_every=1, d_warmup=6, seed=5, fused=fused)
    mats = [(A1 if i % 2 == 0 else A2).to(dtype) * (2.0 / k) for i in range(k)]
    for s in range(6):
        opt.zero_grad()
        for a in mats:
            opt.backward(0.5 * (x * (a @ x)).sum())
        opt.step()
        d = opt.state[x]["exp_hz_sq"]
        assert torch.equal(d, torch.full_like(d, 4.0)), (
            f"step {s}: (Hz)^2 is not 4 everywhere (values {sorted(set(d.flatten().tolist()))}): "
            "the micro-batches were probed with different z"
        )
        # The accumulated gradient is the full batch's: sum_i A_i x = 2x.
        torch.testing.assert_close(x.grad, 2 * x.detach())


# ------------------------------------------------------------------ memory does not grow with k

_SKIP_TYPES = (str, bytes, int, float, bool, type(None), type)


def tensors_held_by(opt):
    """Tensors reachable from the optimizer's attributes, except the parameters themselves.

    Walks containers and esgd_cuda objects generically, so it sees internal buffers (Hz
    accumulators, kept gradients) whatever they are called.
    """
    params = {id(p) for g in opt.param_groups for p in g["params"]}
    seen, found = set(), {}
    stack = list(vars(opt).values())
    while stack:
        obj = stack.pop()
        if isinstance(obj, _SKIP_TYPES) or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if id(obj) not in params:
                found[id(obj)] = obj
            continue
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif isinstance(obj, (weakref.WeakKeyDictionary, weakref.WeakValueDictionary)):
            stack.extend(vars(obj).values())
        elif type(obj).__module__.startswith(("esgd_cuda", "collections")) and hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
    return list(found.values())


def held_bytes(opt):
    tensors = tensors_held_by(opt)
    for t in tensors:
        assert t.grad_fn is None, f"the optimizer holds a tensor with an autograd graph ({t.grad_fn})"
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return len(tensors), sum(storages.values())


def accumulate_and_measure(k, fused, step_kinds):
    """Run the schedule; after every opt.backward check that the forward graph is dead and record
    what the optimizer holds. Returns {step: [(count, bytes) after each micro-batch]}."""
    model, stash = make_mlp(torch.float32, hidden=64)
    opt = ESGD(model.parameters(), **KWARGS, seed=3, fused=fused)
    record = {}
    for s in range(max(step_kinds) + 1):
        x, y = batches(s, torch.float32)
        x, y = x.repeat(8, 1), y.repeat(8, 1)  # micro-batches of the same size (32) for every k
        opt.zero_grad()
        record[s] = []
        for j, (xb, yb) in enumerate(zip(x.chunk(8)[:k], y.chunk(8)[:k])):
            stash.refs.clear()
            loss = F.mse_loss(model(xb), yb) / k
            loss_ref = weakref.ref(loss)
            opt.backward(loss)
            del loss
            if any(r() is not None for r in stash.refs) or loss_ref() is not None:
                gc.collect()  # slow with torch's heap: only when reference counting did not free it
            assert stash.refs and all(r() is None for r in stash.refs), (
                f"step {s} micro-batch {j}: an activation saved for backward outlived opt.backward"
            )
            assert loss_ref() is None, f"step {s} micro-batch {j}: the loss outlived opt.backward"
            for p in model.parameters():
                assert p.grad is not None and p.grad.grad_fn is None and not p.grad.requires_grad
            record[s].append(held_bytes(opt))
        opt.step()
    return {s: record[s] for s in step_kinds}


def test_memory_does_not_grow_with_micro_batches(fused):
    steps = [0, 5, 8]  # estimation, plain, estimation after plain steps
    assert [estimation_schedule(9, 5, 4)[s] for s in steps] == [True, False, True]
    one = accumulate_and_measure(1, fused, steps)
    eight = accumulate_and_measure(8, fused, steps)
    for s in steps:
        assert len(eight[s]) == 8
        for j, held in enumerate(eight[s]):
            assert held == one[s][0], (
                f"step {s}, after micro-batch {j}: the optimizer holds {held} (tensors, bytes) with k=8 "
                f"but {one[s][0]} with k=1"
            )


@requires_cuda
def test_cuda_peak_memory_does_not_grow_with_micro_batches(fused):
    """Peak memory of an estimation step with k micro-batches of a fixed size is that of one."""
    device = "cuda"

    def peak(k):
        gen = torch.Generator().manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(256, 2048), torch.nn.Tanh(), torch.nn.Linear(2048, 2048), torch.nn.Tanh(),
            torch.nn.Linear(2048, 1),
        ).to(device)
        opt = ESGD(model.parameters(), **KWARGS, seed=3, fused=fused)
        x = torch.randn(1024, 256, generator=gen).to(device)
        y = torch.randn(1024, 1, generator=gen).to(device)
        # A first full step so that the state tensors exist before measuring.
        opt.zero_grad()
        opt.backward(F.mse_loss(model(x), y))
        opt.step()
        assert opt.should_create_graph()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        opt.zero_grad()
        for _ in range(k):
            opt.backward(F.mse_loss(model(x), y) / k)
        opt.step()
        torch.cuda.synchronize()
        result = torch.cuda.max_memory_allocated() - base
        del model, opt
        gc.collect()
        torch.cuda.empty_cache()
        return result

    one, eight = peak(1), peak(8)
    activation_bytes = 1024 * 2048 * 4
    assert eight <= one + activation_bytes // 2, (
        f"peak memory above the start grew from {one / 2**20:.1f} MiB (k=1) to {eight / 2**20:.1f} MiB (k=8)"
    )
