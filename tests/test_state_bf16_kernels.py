"""The update with bfloat16 state (m and D stored with stochastic rounding) against a float64 reference.

Targets: "foreach" (the pure-PyTorch twin), "cpu" (the fused CPU kernel), "cuda-emulated" (the CUDA
kernel's own code run on the CPU, esgd_cuda._C.emulate_cuda_update[_fd]) and "cuda" (skips without a
GPU). Self-contained: the rounding bits are written here again from their definition
(esgd_cuda/probes.py's docstring), so the test does not share the code it checks.

The reference computes m and D in float64 from the widened bfloat16 state, rounds them to float32
(the kernels' math type) and applies stochastic rounding with the reference bits. The kernels' float32
arithmetic differs from float64 by a few float32 ulps, which flips a rounding only where the random
16 bits lie within a few units of the threshold (about 5e-5 of the elements): so at most 0.1% of the
elements may differ from the reference, and those by one bfloat16 spacing. Wrong bits (another key,
another index, another step) would disagree on about a third of the elements.
"""

import math

import pytest
import torch

from esgd_cuda import _extension, functional

NATIVE = pytest.mark.skipif(not _extension.LOADED, reason=f"native kernels not loaded ({_extension.LOAD_ERROR})")
HAS_CUDA = torch.cuda.is_available() and _extension.fused_supported(torch.device("cuda"), torch.float32)
CUDA_ONLY = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
TARGETS = ["foreach", pytest.param("cpu", marks=NATIVE), pytest.param("cuda-emulated", marks=NATIVE),
           pytest.param("cuda", marks=CUDA_ONLY)]
PARAM_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [0, 1, 3, 7, 260, 4097, 65537]
M32 = (1 << 32) - 1
M64 = (1 << 64) - 1


# ------------------------------------------------------------------ the bits, from their definition

def mix64(x):
    x &= M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def step_key(base, t):
    """word(B, t) = mix64(B + (t + 1) * golden)."""
    return mix64(base + (t + 1) * 0x9E3779B97F4A7C15)


def bits(key, j):
    """lowbias32(((j mod 2^32) ^ lo32(K)) + ((j >> 32) ^ hi32(K)) * 0x9E3779B9), on an int64 index tensor."""
    lo, hi = key & M32, key >> 32
    x = (((j & M32) ^ lo) + ((j >> 32) ^ hi) * 0x9E3779B9) & M32
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & M32
    x = x ^ (x >> 15)
    x = (x * 0xD35A2D97) & M32
    return x ^ (x >> 15)


def positions(t):
    """Each element's position in t's memory order if t is dense, else its row-major index."""
    index = torch.arange(t.numel(), dtype=torch.int64)
    if t.is_contiguous() or t.numel() <= 1:
        return index.view(t.shape)
    dims = sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1)
    expected = 1
    for st, sz in dims:
        if st != expected:
            return index.view(t.shape)
        expected *= sz
    return index.as_strided(t.shape, t.stride())


def stochastic_round(x64, r16):
    """float64 values -> float32 -> bfloat16, away from zero iff the discarded 16 bits + r16 carry."""
    x32 = x64.float()
    u = x32.view(torch.int32).long() & M32
    toward_zero = u & 0xFFFF0000
    away = toward_zero + 0x10000
    out = torch.where((u & 0xFFFF) + r16 >= 0x10000, away, toward_zero)
    out = ((out >> 16) ^ 0x8000) - 0x8000
    result = out.to(torch.int16).view(torch.bfloat16).double()
    return torch.where(torch.isnan(x32.double()), x32.double(), result)


# ------------------------------------------------------------------ inputs and the reference

def hyper(seed):
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(6, generator=gen, dtype=torch.float64).tolist()
    mb, db = 0.9 ** (1 + 5 * u[3]), 0.999 ** (1 + 20 * u[4])
    beta1, v = 0.8 + 0.15 * u[0], 0.5 + 0.45 * u[1]
    return dict(beta1=beta1, beta2=0.99 + 0.009 * u[2], v=v, eps=1e-4, weight_decay=0.05 * u[5],
                step_size=0.01 + 0.1 * u[5], momentum_scale=1.0 / (1.0 - mb * v),
                denom_scale=1.0 / math.sqrt(1.0 - db))


def make_inputs(sizes, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)

    def draw(n, dt, positive=False, scale=1.0):
        x = torch.rand(n, generator=gen, dtype=torch.float64) if positive else torch.randn(
            n, generator=gen, dtype=torch.float64)
        return (x * scale).to(dt).to(device)

    params = [draw(n, dtype) for n in sizes]
    grads = [draw(n, dtype) for n in sizes]
    exp_avgs = [draw(n, torch.bfloat16, scale=0.1) for n in sizes]
    exp_hz_sqs = [draw(n, torch.bfloat16, positive=True) for n in sizes]
    hzs = [draw(n, dtype) for n in sizes]
    return params, grads, exp_avgs, exp_hz_sqs, hzs


def rounding_args(n, seed):
    gen = torch.Generator().manual_seed(seed)
    keys = [int(k) for k in torch.randint(0, 2**62, (n,), generator=gen, dtype=torch.int64)]
    offsets = [int(o) for o in torch.randint(0, 2**40, (n,), generator=gen, dtype=torch.int64)]
    return keys, offsets


def reference(p, g, m, d, hz, h, key, offset, step, like=None):
    """(p, m, d) in float64 after one step, m and d as the stored bfloat16 values."""
    p, g, m, d = (t.double().cpu() for t in (p, g, m, d))
    m = h["beta1"] * m + (1.0 - h["beta1"]) * g
    if hz is not None:
        hz = hz.double().cpu()
        d = h["beta2"] * d + (1.0 - h["beta2"]) * hz * hz
    denom = d.sqrt() * h["denom_scale"] + h["eps"]
    est = h["v"] * m + (1.0 - h["v"]) * g
    p = p * (1.0 - h["weight_decay"] * h["step_size"]) - (h["step_size"] * h["momentum_scale"]) * est / denom
    r = bits(step_key(key, step), positions(p if like is None else like.cpu()) + offset)
    m = stochastic_round(m, r & 0xFFFF)
    if hz is not None:
        d = stochastic_round(d, r >> 16)
    return p, m, d


def clone_lists(*lists):
    return [[t.clone() for t in lst] for lst in lists]


def device_of(target):
    return "cuda" if target == "cuda" else "cpu"


def run(target, params, grads, exp_avgs, exp_hz_sqs, hzs, h, keys, offsets, step):
    rounding = dict(rounding_keys=keys, rounding_offsets=offsets, rounding_step=step)
    if target == "cuda-emulated":
        from esgd_cuda import _C

        return _C.emulate_cuda_update(params, grads, exp_avgs, exp_hz_sqs, hzs, **h, **rounding)
    functional.esgd_update(params, grads, exp_avgs, exp_hz_sqs, hzs, fused=target != "foreach", **h, **rounding)
    return None


def param_tolerance(dtype):
    return (2e-6, 1e-6) if dtype == torch.float32 else (torch.finfo(dtype).eps, 2 * torch.finfo(dtype).tiny)


def assert_state(actual, expected, name):
    """Stored bfloat16 values: the reference's except for at most 0.1% (at least one) of the
    elements, each of those one bfloat16 spacing away, plus float32's own error where the update
    cancels (beta*m and (1-beta)*g of opposite signs leave a value far below both)."""
    actual = actual.double().cpu().reshape(-1)
    expected = expected.reshape(-1)
    assert actual.shape == expected.shape
    same = (actual == expected) | (actual.isnan() & expected.isnan())
    differ = int((~same).sum())
    assert differ <= max(1, actual.numel() // 1000), (
        f"{name}: {differ} of {actual.numel()} elements are not the reference's rounding "
        f"(first at {(~same).nonzero().flatten()[:6].tolist()})")
    if differ:
        allowed = expected.abs() * 2.0**-7 + 1e-6 * expected.abs().max()
        assert bool(((actual - expected).abs() <= allowed)[~same].all()), f"{name}: off by more than one spacing"


def assert_step(before, after, grads, hzs, h, dtype, keys, offsets, step):
    rtol, atol = param_tolerance(dtype)
    for i in range(len(before[0])):
        hz = None if hzs is None else hzs[i]
        rp, rm, rd = reference(before[0][i], grads[i], before[1][i], before[2][i], hz, h, keys[i], offsets[i], step,
                               like=after[0][i])
        got = after[0][i].double().cpu()
        ok = (got - rp).abs() <= atol + rtol * rp.abs()
        assert bool(ok.all()), f"params[{i}]: max error {(got - rp).abs().max():.3e}"
        assert_state(after[1][i], rm, f"exp_avgs[{i}]")
        assert_state(after[2][i], rd, f"exp_hz_sqs[{i}]")


# ------------------------------------------------------------------ the update

@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=str)
def test_matches_reference(target, dtype):
    """Estimation and plain steps alternate, each checked from the target's own previous state."""
    params, grads, exp_avgs, exp_hz_sqs, hzs = make_inputs(SIZES, dtype, device_of(target), 1)
    keys, offsets = rounding_args(len(SIZES), 2)
    for step, estimate in enumerate([True, False, True, False]):
        h = hyper(step)
        step_hzs = hzs if estimate else None
        before = clone_lists(params, exp_avgs, exp_hz_sqs)
        run(target, params, grads, exp_avgs, exp_hz_sqs, step_hzs, h, keys, offsets, step + 5)
        assert_step(before, (params, exp_avgs, exp_hz_sqs), grads, step_hzs, h, dtype, keys, offsets, step + 5)
        assert all(t.dtype == torch.bfloat16 for t in exp_avgs + exp_hz_sqs)
        if not estimate:
            assert all(torch.equal(a, b) for a, b in zip(before[2], exp_hz_sqs)), "a plain step wrote exp_hz_sqs"


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("estimate", [True, False], ids=["hz", "plain"])
def test_repeated_call_is_bit_identical(target, estimate):
    """The bits are a function of (key, step, index): the same call on the same inputs rounds alike."""
    params, grads, exp_avgs, exp_hz_sqs, hzs = make_inputs([4097, 3, 70000], torch.float32, device_of(target), 3)
    keys, offsets = rounding_args(3, 4)
    results = []
    for _ in range(2):
        p, m, d = clone_lists(params, exp_avgs, exp_hz_sqs)
        run(target, p, grads, m, d, hzs if estimate else None, hyper(1), keys, offsets, 17)
        results.append(p + m + d)
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("target", TARGETS)
def test_step_key_and_offset_select_the_bits(target):
    """Another step count rounds differently; a slice of a tensor passed with its offset rounds
    exactly as that part of the whole tensor (what makes every shard round as one process)."""
    device = device_of(target)
    params, grads, exp_avgs, exp_hz_sqs, hzs = make_inputs([5000], torch.float32, device, 5)
    keys, offsets = [123456789], [1000]
    h = hyper(2)

    def step(t, lo=0, hi=5000):
        p, m, d = clone_lists(params, exp_avgs, exp_hz_sqs)
        parts = [[x[0][lo:hi].clone()] for x in (p, grads, m, d, hzs)]
        run(target, parts[0], parts[1], parts[2], parts[3], parts[4], h, keys, [offsets[0] + lo], t)
        return parts[0][0], parts[2][0], parts[3][0]

    whole = step(3)
    other = step(4)
    assert not torch.equal(whole[1], other[1]) and not torch.equal(whole[2], other[2])
    for lo, hi in ((0, 1717), (1717, 5000), (2, 3)):
        part = step(3, lo, hi)
        for a, b in zip(part, whole):
            assert torch.equal(a, b[lo:hi]), f"the slice [{lo}, {hi}) rounds differently from the whole"


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_indices_past_2_32(target, dtype):
    """An index's upper word enters the bits: a tensor whose indices cross 2^32 (the CPU kernel splits
    its loop there) and one far beyond."""
    device = device_of(target)
    sizes = [300, 70000]
    params, grads, exp_avgs, exp_hz_sqs, hzs = make_inputs(sizes, dtype, device, 6)
    keys, offsets = [2**62 + 12345, 987654321], [2**32 - 150, 2**45 + 2**32 - 30000]
    h = hyper(3)
    before = clone_lists(params, exp_avgs, exp_hz_sqs)
    run(target, params, grads, exp_avgs, exp_hz_sqs, hzs, h, keys, offsets, 2)
    assert_step(before, (params, exp_avgs, exp_hz_sqs), grads, hzs, h, dtype, keys, offsets, 2)


@pytest.mark.parametrize("target", TARGETS)
def test_layouts(target):
    """The bits follow each element's position in the parameter's memory order (dense layouts) or its
    row-major index (a strided view), whatever the other lists' layouts."""
    device = device_of(target)
    gen = torch.Generator().manual_seed(7)

    def rand(shape, dt, positive=False):
        x = torch.rand(shape, generator=gen, dtype=torch.float64) if positive else torch.randn(
            shape, generator=gen, dtype=torch.float64)
        return x.to(dt).to(device)

    def make(kind, shape, dt, positive=False):
        if kind == "transposed":
            return rand(tuple(reversed(shape)), dt, positive).t()
        if kind == "channels_last":
            return rand(shape, dt, positive).contiguous(memory_format=torch.channels_last)
        if kind == "strided":
            return rand((shape[0], 2 * shape[1]), dt, positive)[:, ::2]
        return rand(shape, dt, positive)

    cases = [  # (shape, layout of p, g, m, d, hz)
        ((33, 65), ("transposed",) * 5),
        ((33, 65), ("transposed", "contiguous", "transposed", "contiguous", "contiguous")),
        ((4, 6, 5, 3), ("channels_last",) * 5),
        ((4, 6, 5, 3), ("channels_last", "contiguous", "contiguous", "channels_last", "contiguous")),
        ((37, 33), ("strided", "contiguous", "strided", "contiguous", "strided")),
    ]
    params, grads, exp_avgs, exp_hz_sqs, hzs = [], [], [], [], []
    for shape, kinds in cases:
        for lst, kind, dt, pos in zip((params, grads, exp_avgs, exp_hz_sqs, hzs), kinds,
                                      (torch.float32, torch.float32, torch.bfloat16, torch.bfloat16, torch.float32),
                                      (False, False, False, True, False)):
            lst.append(make(kind, shape, dt, pos))
    keys, offsets = rounding_args(len(cases), 8)
    h = hyper(4)
    before = clone_lists(params, exp_avgs, exp_hz_sqs)
    run(target, params, grads, exp_avgs, exp_hz_sqs, hzs, h, keys, offsets, 9)
    assert_step(before, (params, exp_avgs, exp_hz_sqs), grads, hzs, h, torch.float32, keys, offsets, 9)
    assert params[0].stride() == (1, 33) and exp_hz_sqs[1].is_contiguous(), "the layouts of the inputs changed"


@pytest.mark.parametrize("target", TARGETS)
def test_non_finite_values(target):
    """A non-finite Hz turns p and m NaN there (as with float32 state); NaN is stored as NaN, never as
    an infinity or a zero (a NaN payload must not carry into the sign), and D turns inf or NaN."""
    device = device_of(target)
    n = 4101
    params, grads, exp_avgs, exp_hz_sqs, hzs = make_inputs([n], torch.float32, device, 9)
    bad = {5: math.inf, 6: -math.inf, 7: math.nan, 4100: math.nan}
    for i, value in bad.items():
        hzs[0][i] = value
    run(target, params, grads, exp_avgs, exp_hz_sqs, hzs, hyper(5), [77], [0], 1)
    expect = torch.zeros(n, dtype=torch.bool)
    expect[list(bad)] = True
    assert torch.equal(params[0].isnan().cpu(), expect)
    assert torch.equal(exp_avgs[0].isnan().cpu(), expect)
    d = exp_hz_sqs[0].cpu()
    assert torch.isinf(d[[5, 6]]).all() and torch.isnan(d[[7, 4100]]).all()
    assert torch.isfinite(d[~expect]).all()


def test_round_bf16_stochastic_is_unbiased_and_keeps_special_values():
    """E[round(x)] = x: over 2^16 independent draws the mean of the rounded values is x within a few
    standard errors, for values spread over a bfloat16 spacing; special values survive."""
    from esgd_cuda.probes import round_bf16_stochastic

    gen = torch.Generator().manual_seed(10)
    draws = 1 << 16
    for x in (1.0 + 0.3 * 2**-7, 1.0 + 0.9 * 2**-7, -3.0 - 0.01 * 2**-6, 1e-30 * 1.0007, 0.1234567):
        r16 = torch.randint(0, 1 << 16, (draws,), generator=gen, dtype=torch.int64)
        rounded = round_bf16_stochastic(torch.full((draws,), x, dtype=torch.float32), r16).double()
        spacing = abs(x) * 2.0**-7
        mean = rounded.mean().item()
        assert abs(mean - float(torch.tensor(x, dtype=torch.float32))) < 5 * spacing / math.sqrt(draws), x
        values = rounded.unique()
        assert values.numel() == 2 and bool(((values - x).abs() < spacing).all()), (x, values)
    specials = torch.tensor([math.inf, -math.inf, math.nan, 0.0, -0.0, 3.3895e38])
    nan_payloads = torch.tensor([0x7FFFFFFF, 0x7F800001, -1], dtype=torch.int32).view(torch.float32)
    x = torch.cat([specials, nan_payloads])
    out = round_bf16_stochastic(x, torch.full(x.shape, 0xFFFF, dtype=torch.int64)).float()
    assert torch.isinf(out[:2]).all() and (out[:2] == specials[:2]).all()
    assert torch.isnan(out[2]) and torch.isnan(out[6:]).all(), "a NaN came back as a number"
    assert (out[3:5] == 0).all() and torch.equal(out[3:5].signbit(), specials[3:5].signbit())


@pytest.mark.parametrize("target", TARGETS)
def test_round_to_nearest_would_freeze_d(target):
    """The reason for stochastic rounding: D = beta2*D + (1-beta2)*hz^2 with beta2 = 0.999 moves by
    0.1% of D per estimate, under half a bfloat16 spacing (0.2-0.4%), so round-to-nearest never
    moves it. 300 estimates of hz^2 = 2 from D = 1: D = 2 - 0.999^300 = 1.2593 in exact arithmetic;
    the stored bfloat16 D, averaged over 8192 elements, must be within 0.5% of that (its standard
    error is about 0.05%). Round-to-nearest would leave every element at 1.0 (checked below on
    the same recurrence), 20% off."""
    device = device_of(target)
    n, steps = 8192, 300
    p = [torch.zeros(n, device=device)]
    g = [torch.zeros(n, device=device)]
    hz = [torch.full((n,), math.sqrt(2.0), device=device)]
    m = [torch.zeros(n, dtype=torch.bfloat16, device=device)]
    d = [torch.ones(n, dtype=torch.bfloat16, device=device)]
    h = dict(beta1=0.9, beta2=0.999, v=0.9, eps=1e-4, weight_decay=0.0, step_size=0.0, momentum_scale=1.0,
             denom_scale=1.0)
    for t in range(steps):
        run(target, p, g, m, d, hz, h, [4242], [0], t + 1)
    exact = 2.0 - 0.999**steps
    mean = d[0].double().mean().item()
    assert abs(mean / exact - 1.0) < 5e-3, f"mean D {mean:.5f}, exact {exact:.5f}"
    nearest = torch.ones(n, dtype=torch.bfloat16)
    for _ in range(steps):
        nearest = (0.999 * nearest.float() + 0.001 * 2.0).bfloat16()
    assert abs(nearest.double().mean().item() / exact - 1.0) > 0.15, "round-to-nearest would pass this test"


# ------------------------------------------------------------------ capturable and finite differences

@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=str)
@pytest.mark.parametrize("estimate", [True, False], ids=["hz", "plain"])
def test_capturable_rounds_with_each_tensors_step_count(target, dtype, estimate):
    """The capturable update reads each tensor's step count from the table's last column (on the
    device) and rounds exactly as a host update with that count."""
    device = device_of(target)
    sizes = [7, 4097, 1, 300]
    params, grads, exp_avgs, exp_hz_sqs, hzs = make_inputs(sizes, dtype, device, 11)
    keys, offsets = rounding_args(len(sizes), 12)
    counts = [3, 40, 1, 7]
    steps = [torch.tensor(float(t), device=device) for t in counts]
    estimates = [torch.tensor(float(max(1, t // 2)), device=device) for t in counts]
    hyper_kw = dict(beta1=0.9, beta2=0.99, v=0.7, lr_warmup=0.9, weight_decay=0.01)
    table = functional.step_scalar_table(steps, estimates, lr=0.1, **hyper_kw)
    assert table.shape == (len(sizes), 4) and table[:, 3].tolist() == counts
    before = clone_lists(params, exp_avgs, exp_hz_sqs)
    step_hzs = hzs if estimate else None
    rounding = dict(rounding_keys=keys, rounding_offsets=offsets)
    if target == "cuda-emulated":
        from esgd_cuda import _C

        _C.emulate_cuda_update(params, grads, exp_avgs, exp_hz_sqs, step_hzs, beta1=0.9, beta2=0.99, v=0.7,
                               eps=1e-4, weight_decay=0.0, step_size=5.0, momentum_scale=3.0, denom_scale=2.0,
                               step_scalars=table, rounding_step=999, **rounding)
    else:
        functional.esgd_update_capturable(params, grads, exp_avgs, exp_hz_sqs, step_hzs, lr=0.1, steps=steps,
                                          estimates=estimates, eps=1e-4, fused=target != "foreach", **hyper_kw,
                                          **rounding)
    rows = table.cpu().tolist()
    for i in range(len(sizes)):
        decay, lr_scale, denom_scale, t = rows[i]
        h = dict(beta1=0.9, beta2=0.99, v=0.7, eps=1e-4, weight_decay=(1 - decay), step_size=1.0,
                 momentum_scale=lr_scale, denom_scale=denom_scale)
        rp, rm, rd = reference(before[0][i], grads[i], before[1][i], before[2][i],
                               hzs[i] if estimate else None, h, keys[i], offsets[i], int(t))
        rtol, atol = param_tolerance(dtype)
        got = params[i].double().cpu()
        assert bool(((got - rp).abs() <= atol + rtol * rp.abs()).all()), f"params[{i}]"
        assert_state(exp_avgs[i], rm, f"exp_avgs[{i}]")
        assert_state(exp_hz_sqs[i], rd, f"exp_hz_sqs[{i}]")


def run_fd(target, params, grads, exp_avgs, exp_hz_sqs, gp, gm, hz_scale, h, keys, offsets, step,
           step_scalars=None, sources=None):
    rounding = dict(rounding_keys=keys, rounding_offsets=offsets, rounding_step=step)
    if target == "cuda-emulated":
        from esgd_cuda import _C

        _C.emulate_cuda_update_fd(params, grads, exp_avgs, exp_hz_sqs, gp, gm if gm is not None else [], hz_scale,
                                  step_scalars=step_scalars, sources=sources, **h, **rounding)
        return
    functional.esgd_update_fd(params, grads, exp_avgs, exp_hz_sqs, gp, gm, hz_scale, step_scalars=step_scalars,
                              sources=sources, fused=target != "foreach", **h, **rounding)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["forward", "central"])
@pytest.mark.parametrize("from_sources", [False, True], ids=["params", "sources"])
def test_finite_difference_update(target, dtype, mode, from_sources):
    """hz = (g+ - b) / h formed in registers, D and m rounded as in the Hz update; with sources, theta
    is read from the saved copy and the parameters only written."""
    device = device_of(target)
    sizes = [1, 3, 4097, 65537]
    params, grads, exp_avgs, exp_hz_sqs, _ = make_inputs(sizes, dtype, device, 13)
    gen = torch.Generator().manual_seed(14)
    gp = [(g.double().cpu() + 1e-2 * torch.randn(g.shape, generator=gen, dtype=torch.float64)).to(dtype).to(device)
          for g in grads]
    gm = [(g.double().cpu() - 1e-2 * torch.randn(g.shape, generator=gen, dtype=torch.float64)).to(dtype).to(device)
          for g in grads] if mode == "central" else None
    sources = [p.clone() for p in params] if from_sources else None
    if from_sources:
        for p in params:
            p.fill_(123.0)  # the update must not read them
    keys, offsets = rounding_args(len(sizes), 15)
    inv_h = 50.0
    hz_scale = torch.tensor(inv_h, dtype=torch.float64, device=device)
    h = hyper(6)
    before = clone_lists(sources if from_sources else params, exp_avgs, exp_hz_sqs)
    run_fd(target, params, grads, exp_avgs, exp_hz_sqs, gp, gm, hz_scale, h, keys, offsets, 21, sources=sources)
    b = gm if mode == "central" else grads
    coeff = float(torch.tensor(inv_h, dtype=torch.float64).float())
    hzs = [((x.float() - y.float()) * coeff).double() for x, y in zip(gp, b)]
    assert_step(before, (params, exp_avgs, exp_hz_sqs), grads, hzs, h, dtype, keys, offsets, 21)


# ------------------------------------------------------------------ errors

def kwargs(h=None):
    return hyper(0) if h is None else h


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=NATIVE)])
@pytest.mark.parametrize("case", [
    (lambda a: a.update(rounding_keys=None), "rounding_keys and rounding_offsets"),
    (lambda a: a.update(rounding_offsets=None), "rounding_keys and rounding_offsets"),
    (lambda a: a.update(rounding_keys=[1]), "rounding_keys has 1 entries but params has 2"),
    (lambda a: a.update(rounding_offsets=[0, 0, 0]), "rounding_offsets has 3 entries but params has 2"),
], ids=["no_keys", "no_offsets", "keys_len", "offsets_len"])
def test_bad_rounding_arguments_rejected_before_any_write(fused, case):
    corrupt, message = case
    params, grads, exp_avgs, exp_hz_sqs, hzs = make_inputs([5, 3], torch.float32, "cpu", 16)
    args = dict(rounding_keys=[1, 2], rounding_offsets=[0, 5], rounding_step=3)
    corrupt(args)
    snapshot = clone_lists(params, exp_avgs, exp_hz_sqs)
    with pytest.raises((RuntimeError, ValueError), match=message):
        functional.esgd_update(params, grads, exp_avgs, exp_hz_sqs, hzs, fused=fused, **kwargs(), **args)
    for got, want in zip(params + exp_avgs + exp_hz_sqs, sum(snapshot, [])):
        assert torch.equal(got, want), "a rejected call changed its inputs"


@NATIVE
@pytest.mark.parametrize("case", [
    (lambda L, a: a.update(rounding_keys=[-1, 2]), r"rounding_keys\[0\] = -1 is negative"),
    (lambda L, a: a.update(rounding_offsets=[0, 2**63 - 2]), r"rounding_offsets\[1\] \+ params\[1\].numel\(\) exceeds"),
    (lambda L, a: a.update(rounding_step=-2), "rounding_step = -2 is negative"),
    (lambda L, a: L[3].__setitem__(1, L[3][1].float()), r"exp_hz_sqs\[1\] has dtype float32, expected bfloat16"),
    (lambda L, a: L[2].__setitem__(1, L[2][1].float()), r"exp_avgs\[1\] has dtype float32, expected bfloat16"),
    (lambda L, a: L[2].__setitem__(0, L[2][0].half()), r"exp_avgs\[0\] has dtype float16, expected float32 or bfloat16"),
], ids=["negative_key", "offset_overflow", "negative_step", "mixed_d", "mixed_m", "fp16_state"])
def test_native_rounding_errors_name_the_argument(case):
    from esgd_cuda import ops

    corrupt, message = case
    lists = [list(x) for x in make_inputs([5, 3], torch.float32, "cpu", 17)]
    args = dict(rounding_keys=[1, 2], rounding_offsets=[0, 5], rounding_step=3)
    corrupt(lists, args)
    h = kwargs()
    with pytest.raises(RuntimeError, match=message):
        ops.esgd_update_hz_(*lists, **h, **args)


@NATIVE
def test_float64_parameters_keep_float64_state():
    from esgd_cuda import ops

    params, grads, exp_avgs, exp_hz_sqs, hzs = make_inputs([5], torch.float64, "cpu", 18)
    with pytest.raises(RuntimeError, match=r"exp_avgs\[0\] has dtype bfloat16, expected float64"):
        ops.esgd_update_hz_(params, grads, exp_avgs, exp_hz_sqs, hzs, **kwargs(), rounding_keys=[1],
                            rounding_offsets=[0])


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=NATIVE)])
def test_a_table_without_step_counts_is_refused_for_bf16_state(fused):
    params, grads, exp_avgs, exp_hz_sqs, hzs = make_inputs([5, 3], torch.float32, "cpu", 19)
    ones = [torch.ones(())] * 2
    table = functional.step_scalar_table(ones, ones, lr=0.1, beta1=0.9, beta2=0.99, v=0.7, lr_warmup=0.9,
                                         weight_decay=0.0)[:, :3].contiguous()
    with pytest.raises((RuntimeError, ValueError), match=r"expected \[2, 4\]"):
        functional.esgd_update_fd(params, grads, exp_avgs, exp_hz_sqs, hzs, None,
                                  torch.tensor(1.0, dtype=torch.float64), step_scalars=table, fused=fused,
                                  rounding_keys=[1, 2], rounding_offsets=[0, 0], **kwargs())


@NATIVE
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(dtype):
    """The schemas, fake kernels and (where torch can compile the ops) AOT dispatch, with bf16 state."""
    utils = ("test_schema", "test_autograd_registration", "test_faketensor") + (
        ("test_aot_dispatch_dynamic",) if _extension.COMPILABLE else ())
    params, grads, exp_avgs, exp_hz_sqs, hzs = make_inputs([3, 0, 130], dtype, "cpu", 20)
    h = hyper(1)
    rounding = dict(rounding_keys=[5, 6, 7], rounding_offsets=[0, 3, 2**33])
    plain = {k: v for k, v in h.items() if k != "beta2"}
    torch.library.opcheck(torch.ops.esgd_cuda.esgd_update_.default, (params, grads, exp_avgs, exp_hz_sqs),
                          dict(plain, rounding_step=4, **rounding), test_utils=utils)
    torch.library.opcheck(torch.ops.esgd_cuda.esgd_update_hz_.default, (params, grads, exp_avgs, exp_hz_sqs, hzs),
                          dict(h, rounding_step=4, **rounding), test_utils=utils)
    ones = [torch.ones(())] * 3
    table = functional.step_scalar_table(ones, ones, lr=0.1, beta1=0.9, beta2=0.99, v=0.7, lr_warmup=0.9,
                                         weight_decay=0.0)
    torch.library.opcheck(torch.ops.esgd_cuda.esgd_update_capturable_.default,
                          (params, grads, exp_avgs, exp_hz_sqs, hzs, table),
                          dict(beta1=0.9, beta2=0.99, v=0.7, eps=1e-4, **rounding), test_utils=utils)
    torch.library.opcheck(torch.ops.esgd_cuda.esgd_update_fd_.default,
                          (params, grads, exp_avgs, exp_hz_sqs, hzs, [], torch.tensor(2.0, dtype=torch.float64),
                           None), dict(h, rounding_step=1, **rounding), test_utils=utils)


# ------------------------------------------------------------------ the CUDA kernel's vector path

@NATIVE
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=str)
@pytest.mark.parametrize("estimate", [True, False], ids=["hz", "plain"])
def test_cuda_vector_path_choice(dtype, estimate):
    """bf16 state takes the vector path where every list is aligned to its vector: 16 bytes of
    parameters, and the same number of state elements (8 bytes of bf16 state for fp32 parameters,
    16 for 16-bit ones); results match the reference on both paths."""
    from esgd_cuda import _C

    chunk = _C.CHUNK_SIZE
    width = 16 // torch.empty((), dtype=dtype).element_size()
    gen = torch.Generator().manual_seed(21)

    def draw(n, dt, offset=0, positive=False, scale=1.0):
        x = torch.rand(n + offset, generator=gen, dtype=torch.float64) if positive else torch.randn(
            n + offset, generator=gen, dtype=torch.float64)
        return (x * scale).to(dt)[offset:]

    layouts = [  # (numel, parameter view offset, state view offset)
        (2 * chunk + 3, 0, 0),  # two aligned chunks, then a ragged tail: scalar
        (chunk + width, 0, 0),  # vector
        (chunk, 0, width // 2),  # state half a vector off: scalar
        (chunk, width, width),  # one whole vector off, still aligned: vector
    ]
    params = [draw(n, dtype, po) for n, po, _ in layouts]
    grads = [draw(n, dtype) for n, _, _ in layouts]
    exp_avgs = [draw(n, torch.bfloat16, so, scale=0.1) for n, _, so in layouts]
    exp_hz_sqs = [draw(n, torch.bfloat16, positive=True) for n, _, _ in layouts]
    hzs = [draw(n, dtype) for n, _, _ in layouts] if estimate else None
    keys, offsets = rounding_args(len(layouts), 22)
    h = hyper(3)
    before = clone_lists(params, exp_avgs, exp_hz_sqs)
    rows = _C.emulate_cuda_update(params, grads, exp_avgs, exp_hz_sqs, hzs, rounding_keys=keys,
                                  rounding_offsets=offsets, rounding_step=4, **h)
    assert_step(before, (params, exp_avgs, exp_hz_sqs), grads, hzs, h, dtype, keys, offsets, 4)
    blocks = {(t, c): bool(v) for t, c, v in rows}
    assert blocks[(0, 0)] and blocks[(0, 1)] and not blocks[(0, 2)]
    assert blocks[(1, 1)] and not blocks[(2, 0)] and blocks[(3, 0)]


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_graph_capture_of_a_capturable_bf16_step():
    """Replays of a captured capturable step round with the step counts the replays read on the
    device: two replays equal two eager steps, bit for bit."""
    sizes = [1000, 3, 70000]
    params, grads, exp_avgs, exp_hz_sqs, _ = make_inputs(sizes, torch.float32, "cuda", 23)
    keys, offsets = rounding_args(len(sizes), 24)
    steps = [torch.zeros((), device="cuda") for _ in sizes]
    kw = dict(lr=0.1, beta1=0.9, beta2=0.99, v=0.7, lr_warmup=0.9, weight_decay=0.01, eps=1e-4, fused=True,
              rounding_keys=keys, rounding_offsets=offsets)
    expected = clone_lists(params, exp_avgs, exp_hz_sqs)
    eager_steps = [s.clone() for s in steps]
    for _ in range(2):
        torch._foreach_add_(eager_steps, 1.0)
        functional.esgd_update_capturable(expected[0], grads, expected[1], expected[2], None, steps=eager_steps,
                                          estimates=[torch.ones((), device="cuda")] * 3, **kw)
    ones = [torch.ones((), device="cuda")] * 3

    def step():
        torch._foreach_add_(steps, 1.0)
        functional.esgd_update_capturable(params, grads, exp_avgs, exp_hz_sqs, None, steps=steps, estimates=ones,
                                          **kw)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    snapshot = clone_lists(params, exp_avgs, exp_hz_sqs)
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    for dst, src in zip(params + exp_avgs + exp_hz_sqs, sum(snapshot, [])):
        dst.copy_(src)
    for s in steps:
        s.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for s in steps:
        s.zero_()
    for dst, src in zip(params + exp_avgs + exp_hz_sqs, sum(snapshot, [])):
        dst.copy_(src)
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(params + exp_avgs, expected[0] + expected[1]):
        assert torch.equal(a, b)
