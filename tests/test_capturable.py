"""esgd_update_capturable (device-side step scalars) against the host-scalar foreach update."""

import math

import pytest
import torch

from esgd_cuda import _extension
from esgd_cuda.functional import _esgd_update_foreach, esgd_update_capturable, state_dtype, step_scalar_table

# "foreach": the pure-PyTorch capturable path; "fused": the native op esgd_update_capturable_ on the
# CPU; "cuda-emulated": the CUDA kernel's plan, tables and per-thread code (with the device-side
# scalar table) run on the CPU by esgd_cuda._C.emulate_cuda_update; "cuda": the native op on a GPU
# (the tensors copied there and back).
NATIVE = pytest.mark.skipif(not _extension.LOADED, reason="native extension not loaded")
HAS_CUDA = torch.cuda.is_available() and _extension.fused_supported(torch.device("cuda"), torch.float32)
CUDA_ONLY = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and the CUDA kernels")
TARGETS = ["foreach", pytest.param("fused", marks=NATIVE), pytest.param("cuda-emulated", marks=NATIVE),
           pytest.param("cuda", marks=CUDA_ONLY)]

SHAPES = [(7,), (3, 5), (1,), (33,), (2, 3, 4)]
HYPER = dict(beta1=0.9, beta2=0.99, v=0.7, lr_warmup=0.9, eps=1e-4)
# Relative to the parameter scale. 16-bit parameters are rounded once from float32 math in both
# paths; the few-ulp float32 differences of the coefficients may flip that rounding, so one ulp
# of the parameter dtype is allowed.
RTOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.bfloat16: torch.finfo(torch.bfloat16).eps,
    torch.float16: torch.finfo(torch.float16).eps,
}


def _tensors(dtype, gen, shapes=SHAPES):
    sdtype = state_dtype(dtype)

    def draw(fn, dt):
        return [fn(s, generator=gen, dtype=torch.float64).to(dt) for s in shapes]

    return dict(
        params=draw(torch.randn, dtype),
        grads=draw(torch.randn, dtype),
        exp_avgs=draw(torch.randn, sdtype),
        exp_hz_sqs=[d + 0.01 for d in draw(torch.rand, sdtype)],
        hzs=draw(torch.randn, dtype),
    )


def _clone(ts):
    return {k: [t.clone() for t in v] for k, v in ts.items()}


def _capturable(target, params, grads, exp_avgs, exp_hz_sqs, hzs, **kw):
    if target == "cuda":
        lists = [None if ts is None else [t.cuda() for t in ts]
                 for ts in (params, grads, exp_avgs, exp_hz_sqs, hzs)]
        kw = dict(kw, steps=[s.cuda() for s in kw["steps"]], estimates=[k.cuda() for k in kw["estimates"]])
        if isinstance(kw["lr"], torch.Tensor):
            kw["lr"] = kw["lr"].cuda()
        esgd_update_capturable(*lists, fused=True, **kw)
        for host, device in zip((params, exp_avgs, exp_hz_sqs), (lists[0], lists[2], lists[3])):
            for h, d in zip(host, device):
                h.copy_(d.cpu())
        return
    if target != "cuda-emulated":
        esgd_update_capturable(params, grads, exp_avgs, exp_hz_sqs, hzs, fused=target == "fused", **kw)
        return
    from esgd_cuda import _C

    table = step_scalar_table(
        kw["steps"], kw["estimates"], lr=kw["lr"], beta1=kw["beta1"], beta2=kw["beta2"], v=kw["v"],
        lr_warmup=kw["lr_warmup"], weight_decay=kw["weight_decay"],
    )
    # The host scalars are placeholders: the table overrides them for every tensor.
    _C.emulate_cuda_update(
        params, grads, exp_avgs, exp_hz_sqs, hzs, beta1=kw["beta1"], beta2=kw["beta2"], v=kw["v"],
        eps=kw["eps"], weight_decay=0.0, step_size=123.0, momentum_scale=7.0, denom_scale=5.0,
        grad_scale_inv=kw.get("grad_scale_inv", 1.0), hz_scale_inv=kw.get("hz_scale_inv", 1.0),
        step_scalars=table,
    )


def _run_both(dtype, steps, estimates, lr, weight_decay, estimate, lr_as_tensor, target="foreach", shapes=None,
              scale=1.0):
    gen = torch.Generator().manual_seed(1234)
    start = _tensors(dtype, gen, shapes or SHAPES)
    if scale != 1.0:
        # A GradScaler-style loss scale on g and Hz, undone by the update (host path: unscaled inputs).
        start["scaled_grads"] = [(g.double() * scale).to(dtype) for g in start["grads"]]
        start["scaled_hzs"] = [(h.double() * scale).to(dtype) for h in start["hzs"]]
        start["grads"] = [(g.double() / scale).to(dtype) for g in start["scaled_grads"]]
        start["hzs"] = [(h.double() / scale).to(dtype) for h in start["scaled_hzs"]]
    host, dev = _clone(start), _clone(start)
    for t, k in zip(steps, estimates):
        # The host path runs one call per distinct (t, k), as the optimizer buckets it.
        for i in range(len(start["params"])):
            _esgd_update_foreach(
                [host["params"][i]], [host["grads"][i]], [host["exp_avgs"][i]], [host["exp_hz_sqs"][i]],
                [host["hzs"][i]] if estimate else None,
                beta1=HYPER["beta1"], beta2=HYPER["beta2"], v=HYPER["v"], eps=HYPER["eps"],
                weight_decay=weight_decay,
                step_size=lr * (1.0 - HYPER["lr_warmup"] ** t[i]),
                momentum_scale=1.0 / (1.0 - HYPER["beta1"] ** t[i] * HYPER["v"]),
                denom_scale=1.0 / math.sqrt(1.0 - HYPER["beta2"] ** k[i]),
            )
        dev_grads = dev["scaled_grads"] if scale != 1.0 else dev["grads"]
        dev_hzs = dev["scaled_hzs"] if scale != 1.0 else dev["hzs"]
        _capturable(
            target, dev["params"], dev_grads, dev["exp_avgs"], dev["exp_hz_sqs"], dev_hzs if estimate else None,
            lr=torch.tensor(lr, dtype=torch.float64) if lr_as_tensor else lr,
            steps=[torch.tensor(float(x)) for x in t],
            estimates=[torch.tensor(float(x)) for x in k],
            weight_decay=weight_decay, grad_scale_inv=1.0 / scale, hz_scale_inv=1.0 / scale, **HYPER,
        )
    return start, host, dev


def _assert_close(got, ref, rtol, what):
    for i, (g, r) in enumerate(zip(got, ref)):
        assert g.dtype == r.dtype and g.shape == r.shape
        if r.numel() == 0:
            continue
        scale = r.double().abs().max().clamp_min(1e-3)
        err = (g.double() - r.double()).abs().max()
        assert err <= rtol * scale, f"{what}[{i}] {tuple(r.shape)}: error {err:.3e} > {rtol:g} x {scale:.3e}"


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", list(RTOL), ids=str)
@pytest.mark.parametrize("estimate", [True, False], ids=["estimation", "plain"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("lr_as_tensor", [False, True], ids=["lr=float", "lr=tensor"])
def test_matches_host_update(target, dtype, estimate, weight_decay, lr_as_tensor):
    # Several steps with per-parameter counters that differ (a parameter that joined late).
    steps = [[1, 1, 1, 1, 1], [2, 2, 1, 2, 7], [3, 3, 2, 3, 8]]
    estimates = [[1, 1, 1, 1, 1], [1, 2, 1, 1, 3], [2, 2, 1, 1, 4]]
    start, host, dev = _run_both(dtype, steps, estimates, 0.3, weight_decay, estimate, lr_as_tensor, target)
    rtol = RTOL[dtype]
    _assert_close(dev["params"], host["params"], rtol, "params")
    _assert_close(dev["exp_avgs"], host["exp_avgs"], RTOL[state_dtype(dtype)], "exp_avgs")
    _assert_close(dev["exp_hz_sqs"], host["exp_hz_sqs"], RTOL[state_dtype(dtype)], "exp_hz_sqs")
    # The update did something, and the curvature state changed only on estimation steps.
    assert any(not torch.equal(p, q) for p, q in zip(dev["params"], start["params"]))
    unchanged = all(torch.equal(d, s) for d, s in zip(dev["exp_hz_sqs"], start["exp_hz_sqs"]))
    assert unchanged != estimate


ODD_SHAPES = [(0,), (4097,), (1,), (65537,), (3,), (0,), (65536 * 2 + 5,)]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scale", [1.0, 2.0**16], ids=["unscaled", "scaled"])
def test_odd_sizes_and_loss_scale(target, dtype, scale):
    """Zero-size tensors, chunk boundaries, a tensor spanning chunks; g and Hz under a loss scale."""
    n = len(ODD_SHAPES)
    steps = [[1 + (i % 3) for i in range(n)], [2 + (i % 3) for i in range(n)]]
    estimates = [[1] * n, [1 + (i % 2) for i in range(n)]]
    start, host, dev = _run_both(dtype, steps, estimates, 0.2, 0.01, True, True, target, ODD_SHAPES, scale)
    _assert_close(dev["params"], host["params"], RTOL[dtype], "params")
    _assert_close(dev["exp_avgs"], host["exp_avgs"], RTOL[torch.float32], "exp_avgs")
    _assert_close(dev["exp_hz_sqs"], host["exp_hz_sqs"], RTOL[torch.float32], "exp_hz_sqs")


@pytest.mark.skipif(not _extension.LOADED, reason="native extension not loaded")
def test_native_op_checks_the_scalar_table():
    from esgd_cuda import ops

    ts = _tensors(torch.float32, torch.Generator().manual_seed(3))
    lists = [ts["params"], ts["grads"], ts["exp_avgs"], ts["exp_hz_sqs"], ts["hzs"]]
    before = [p.clone() for p in ts["params"]]
    kw = dict(beta1=0.9, beta2=0.99, v=0.7, eps=1e-4)
    n = len(SHAPES)
    for table, match in [
        (torch.zeros(n, 3, dtype=torch.float32), "dtype float32, expected float64"),
        (torch.zeros(n + 1, 3, dtype=torch.float64), r"expected \[5, 3\]"),
        (torch.zeros(3, n, dtype=torch.float64).t(), "contiguous"),
    ]:
        with pytest.raises(RuntimeError, match=match):
            ops.esgd_update_capturable_(*lists, table, **kw)
    assert all(torch.equal(p, b) for p, b in zip(ts["params"], before))


@pytest.mark.skipif(not _extension.LOADED, reason="native extension not loaded")
def test_native_op_opcheck():
    from esgd_cuda import ops  # noqa: F401  (registers the fake kernel)

    ts = _tensors(torch.float32, torch.Generator().manual_seed(4))
    table = step_scalar_table(
        [torch.tensor(2.0)] * len(SHAPES), [torch.tensor(1.0)] * len(SHAPES), lr=0.1, beta1=0.9,
        beta2=0.99, v=0.7, lr_warmup=0.9, weight_decay=0.01,
    )
    args = (ts["params"], ts["grads"], ts["exp_avgs"], ts["exp_hz_sqs"])
    kw = dict(beta1=0.9, beta2=0.99, v=0.7, eps=1e-4, grad_scale_inv=0.5)
    # test_aot_dispatch_dynamic compiles the op: only where torch can (see _extension.COMPILABLE).
    utils = ("test_schema", "test_autograd_registration", "test_faketensor") + (
        ("test_aot_dispatch_dynamic",) if _extension.COMPILABLE else ()
    )
    op = torch.ops.esgd_cuda.esgd_update_capturable_.default
    torch.library.opcheck(op, (*args, ts["hzs"], table), kw, test_utils=utils)
    torch.library.opcheck(op, (*args, [], table), kw, test_utils=utils)


def test_counters_are_per_parameter():
    # Swapping two parameters' counters must change their updates: each uses its own t and k.
    gen = torch.Generator().manual_seed(0)
    base = _tensors(torch.float64, gen)
    results = []
    for steps in ([1.0, 9.0], [9.0, 1.0]):
        ts = {k: [v[0].clone(), v[0].clone()] for k, v in base.items()}
        esgd_update_capturable(
            ts["params"], ts["grads"], ts["exp_avgs"], ts["exp_hz_sqs"], None, lr=0.5,
            steps=[torch.tensor(s) for s in steps], estimates=[torch.tensor(1.0)] * 2,
            weight_decay=0.0, **HYPER,
        )
        results.append(ts["params"])
    assert not torch.equal(results[0][0], results[0][1])
    assert torch.equal(results[0][0], results[1][1])
    assert torch.equal(results[0][1], results[1][0])


def test_empty_lists_are_a_no_op():
    esgd_update_capturable([], [], [], [], None, lr=1.0, steps=[], estimates=[], weight_decay=0.0, **HYPER)
