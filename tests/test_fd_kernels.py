"""The finite-difference estimation update (esgd_update_fd) against a float64 reference and the twin.

hz = (g+ - b) * (hz_scale_inv * hz_scale), b = g- (central) or g (forward), is formed by the fused
kernels in registers; the reference forms it in float64 from the same inputs. Also the non-finite
rule shared by every estimation update: where the scaled hz is inf or NaN, the update's gradient is
NaN, so the parameter and its momentum become NaN there. And the update from sources (theta read
from the perturbation's saved copy, the parameters only written), which must equal
params.copy_(sources) followed by the update, bit for bit.
"""

import math

import pytest
import torch

from esgd_cuda import _extension, functional

HAS_NATIVE = _extension.LOADED
NATIVE_ONLY = pytest.mark.skipif(not HAS_NATIVE, reason=f"native kernels not loaded ({_extension.LOAD_ERROR})")
HAS_CUDA = torch.cuda.is_available() and _extension.fused_supported(torch.device("cuda"), torch.float32)
CUDA_ONLY = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
TARGETS = [
    "foreach",
    pytest.param("cpu", marks=NATIVE_ONLY),
    pytest.param("cuda-emulated", marks=NATIVE_ONLY),
    pytest.param("cuda", marks=CUDA_ONLY),
]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SIZES = [0, 1, 3, 7, 260, 4097, 65537]
MODES = ["forward", "central"]


def state_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def tolerances(dtype):
    """(rtol, atol) of a parameter after one step: a few ulps of the math dtype; 16-bit parameters
    are rounded once at the end, so half an ulp of their format."""
    if dtype == torch.float64:
        return 1e-12, 1e-12
    if dtype == torch.float32:
        return 2e-6, 1e-6
    return torch.finfo(dtype).eps, 2 * torch.finfo(dtype).tiny


STATE_TOL = {torch.float32: (2e-6, 1e-6), torch.float64: (1e-12, 1e-12)}


def hyper(seed):
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(6, generator=gen, dtype=torch.float64).tolist()
    mb, db = 0.9 ** (1 + 5 * u[3]), 0.999 ** (1 + 20 * u[4])
    beta1, v = 0.8 + 0.15 * u[0], 0.5 + 0.45 * u[1]
    return dict(beta1=beta1, beta2=0.99 + 0.009 * u[2], v=v, eps=1e-4, weight_decay=0.05 * u[5],
                step_size=0.01 + 0.1 * u[5], momentum_scale=1.0 / (1.0 - mb * v),
                denom_scale=1.0 / math.sqrt(1.0 - db))


def reference(p, g, m, d, gp, b, coeff, h, rows=None):
    """One estimation step in float64 from the formula. `coeff` is the hz multiplier; `rows` the
    (decay, lr_scale, denom_scale) of a step-scalar table row, else from h."""
    p, g, m, d, gp, b = (t.double().cpu() for t in (p, g, m, d, gp, b))
    g = g * h.get("grad_scale_inv", 1.0)
    hz = (gp - b) * coeff
    g = torch.where(torch.isfinite(hz), g, torch.nan)
    if rows is None:
        decay = 1.0 - h["weight_decay"] * h["step_size"]
        lr_scale, denom_scale = h["step_size"] * h["momentum_scale"], h["denom_scale"]
    else:
        decay, lr_scale, denom_scale = rows[:3]  # the table's fourth column is the step count
    m = h["beta1"] * m + (1.0 - h["beta1"]) * g
    d = h["beta2"] * d + (1.0 - h["beta2"]) * hz * hz
    denom = d.sqrt() * denom_scale + h["eps"]
    est = h["v"] * m + (1.0 - h["v"]) * g
    p = p * decay - lr_scale * est / denom
    return p, m, d


def make_inputs(sizes, dtype, device, seed, fd_scale=1e-3):
    """params, grads, exp_avgs, exp_hz_sqs, grads_plus, grads_minus. g+ and g- are g moved by about
    fd_scale, as gradients at theta +- h z would be, so the difference loses digits as in use."""
    gen = torch.Generator().manual_seed(seed)
    sd = state_dtype(dtype)

    def draw(n, dt, positive=False, scale=1.0):
        x = torch.rand(n, generator=gen, dtype=torch.float64) if positive else torch.randn(
            n, generator=gen, dtype=torch.float64)
        return (x * scale).to(dt).to(device)

    params = [draw(n, dtype) for n in sizes]
    grads = [draw(n, dtype) for n in sizes]
    exp_avgs = [draw(n, sd, scale=0.1) for n in sizes]
    exp_hz_sqs = [draw(n, sd, positive=True) for n in sizes]
    grads_plus = [(g.double() + draw(n, torch.float64, scale=fd_scale)).to(dtype) for g, n in zip(grads, sizes)]
    grads_minus = [(g.double() - draw(n, torch.float64, scale=fd_scale)).to(dtype) for g, n in zip(grads, sizes)]
    return params, grads, exp_avgs, exp_hz_sqs, grads_plus, grads_minus


def clone_lists(*lists):
    return [[t.clone() for t in lst] for lst in lists]


def device_of(target):
    return "cuda" if target == "cuda" else "cpu"


def run_fd(target, params, grads, exp_avgs, exp_hz_sqs, gp, gm, hz_scale, h, step_scalars=None, sources=None):
    if target == "cuda-emulated":
        from esgd_cuda import _C

        return _C.emulate_cuda_update_fd(params, grads, exp_avgs, exp_hz_sqs, gp, gm if gm is not None else [],
                                         hz_scale, step_scalars=step_scalars, sources=sources, **h)
    functional.esgd_update_fd(params, grads, exp_avgs, exp_hz_sqs, gp, gm, hz_scale, step_scalars=step_scalars,
                              sources=sources, fused=target != "foreach", **h)
    return None


def assert_close(actual, expected, rtol, atol, name):
    actual = actual.double().cpu()
    ok = ((actual - expected).abs() <= atol + rtol * expected.abs()) | (actual.isnan() & expected.isnan())
    if not bool(ok.all()):
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda s: f"{name}: {s}")


def assert_step(before, after, grads, gp, b, coeff, h, dtype, rows=None):
    rtol, atol = tolerances(dtype)
    srtol, satol = STATE_TOL[state_dtype(dtype)]
    for i in range(len(before[0])):
        row = None if rows is None else rows[i]
        rp, rm, rd = reference(before[0][i], grads[i], before[1][i], before[2][i], gp[i], b[i], coeff, h, row)
        assert_close(after[0][i], rp, rtol, atol, f"params[{i}]")
        assert_close(after[1][i], rm, srtol, satol, f"exp_avgs[{i}]")
        assert_close(after[2][i], rd, srtol, satol, f"exp_hz_sqs[{i}]")


def math_coeff(hz_scale, hz_scale_inv, dtype):
    """S(hz_scale_inv * h_scale): the product in float64, rounded to the math dtype."""
    return float(torch.tensor(hz_scale_inv * hz_scale, dtype=torch.float64).to(state_dtype(dtype)))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_fd_update_matches_reference_and_twin(target, dtype, mode):
    device = device_of(target)
    params, grads, exp_avgs, exp_hz_sqs, gp, gm = make_inputs(SIZES, dtype, device, 1)
    inv_h = 1.0 / (2e-3 if mode == "central" else 1e-3) / 3.0
    hz_scale = torch.tensor(inv_h, dtype=torch.float64, device=device)
    gm_arg = gm if mode == "central" else None
    for step in range(2):
        h = hyper(step)
        before = clone_lists(params, exp_avgs, exp_hz_sqs)
        run_fd(target, params, grads, exp_avgs, exp_hz_sqs, gp, gm_arg, hz_scale, h)
        b = gm if mode == "central" else grads
        assert_step(before, (params, exp_avgs, exp_hz_sqs), grads, gp, b, math_coeff(inv_h, 1.0, dtype), h, dtype)
        twin = clone_lists(*before)
        functional.esgd_update_fd(twin[0], grads, twin[1], twin[2], gp, gm_arg, hz_scale, fused=False, **h)
        rtol, atol = tolerances(dtype)
        for a, t in zip(params, twin[0]):
            torch.testing.assert_close(a, t, rtol=rtol, atol=atol)
        for a, t in zip(exp_avgs + exp_hz_sqs, twin[1] + twin[2]):
            torch.testing.assert_close(a, t, rtol=STATE_TOL[a.dtype][0], atol=STATE_TOL[a.dtype][1])


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("gscale, hscale", [(2.0**12, 2.0**12), (3000.0, 1.0), (1.0, 0.125)])
def test_fd_update_loss_scales(target, dtype, mode, gscale, hscale):
    """grad_scale_inv undoes the gradient's scale; hz_scale_inv multiplies the device hz_scale."""
    device = device_of(target)
    params, grads, exp_avgs, exp_hz_sqs, gp, gm = make_inputs([1, 3, 7, 4097], dtype, device, 2)
    scaled = [[(t.double() * gscale).to(dtype) for t in lst] for lst in (grads, gp, gm)]
    h = dict(hyper(3), grad_scale_inv=1.0 / gscale, hz_scale_inv=1.0 / hscale)
    hz_scale = torch.tensor(250.0, dtype=torch.float64, device=device)
    gm_arg = scaled[2] if mode == "central" else None
    before = clone_lists(params, exp_avgs, exp_hz_sqs)
    run_fd(target, params, scaled[0], exp_avgs, exp_hz_sqs, scaled[1], gm_arg, hz_scale, h)
    b = scaled[2] if mode == "central" else scaled[0]
    ref_h = dict(h, grad_scale_inv=1.0 / gscale)
    assert_step(before, (params, exp_avgs, exp_hz_sqs), scaled[0], scaled[1], b,
                math_coeff(250.0, 1.0 / hscale, dtype), ref_h, dtype)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_fd_update_step_scalars(target, dtype, mode):
    """With a step-scalar table each tensor's decay, lr scale and denominator scale come from its row
    (the host scalars are ignored, so they are set to nonsense here)."""
    device = device_of(target)
    sizes = [1, 3, 4097, 0, 65537]
    params, grads, exp_avgs, exp_hz_sqs, gp, gm = make_inputs(sizes, dtype, device, 4)
    steps = [torch.tensor(t, device=device) for t in (3, 10, 1, 7, 100)]
    estimates = [torch.tensor(k, device=device) for k in (1, 4, 1, 2, 30)]
    table = functional.step_scalar_table(steps, estimates, lr=0.05, beta1=0.9, beta2=0.99, v=0.7,
                                         lr_warmup=0.9, weight_decay=0.01)
    h = dict(hyper(5), weight_decay=123.0, step_size=-1.0, momentum_scale=7.0, denom_scale=0.0)
    hz_scale = torch.tensor(500.0, dtype=torch.float64, device=device)
    gm_arg = gm if mode == "central" else None
    before = clone_lists(params, exp_avgs, exp_hz_sqs)
    run_fd(target, params, grads, exp_avgs, exp_hz_sqs, gp, gm_arg, hz_scale, h, step_scalars=table)
    rows = [tuple(r) for r in table.cpu().tolist()]
    assert_step(before, (params, exp_avgs, exp_hz_sqs), grads, gp, gm if mode == "central" else grads,
                math_coeff(500.0, 1.0, dtype), h, dtype, rows=rows)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_fd_update_views(target, dtype, mode):
    """Misaligned (scalar path), strided and transposed tensors, updated through their views."""
    device = device_of(target)
    sd = state_dtype(dtype)
    gen = torch.Generator().manual_seed(6)

    def rand(shape, dt, positive=False):
        x = torch.rand(shape, generator=gen, dtype=torch.float64) if positive else torch.randn(
            shape, generator=gen, dtype=torch.float64)
        return x.to(dt).to(device)

    def views(dt, positive=False):
        return [rand(4099, dt, positive)[1:], rand((37, 66), dt, positive)[:, ::2],
                rand((33, 65), dt, positive).t(), rand(4098, dt, positive)[2:]]

    params, grads, gp, gm = views(dtype), views(dtype), views(dtype), views(dtype)
    exp_avgs, exp_hz_sqs = views(sd), views(sd, positive=True)
    # Mixed layouts force the copy-and-write-back path.
    exp_avgs[2] = exp_avgs[2].contiguous()
    gp[0] = gp[0].contiguous()
    h = hyper(7)
    hz_scale = torch.tensor(3.0, dtype=torch.float64, device=device)
    gm_arg = gm if mode == "central" else None
    before = clone_lists(params, exp_avgs, exp_hz_sqs)
    run_fd(target, params, grads, exp_avgs, exp_hz_sqs, gp, gm_arg, hz_scale, h)
    assert_step(before, (params, exp_avgs, exp_hz_sqs), grads, gp, gm if mode == "central" else grads,
                math_coeff(3.0, 1.0, dtype), h, dtype)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_fd_non_finite_difference_poisons_the_parameter(target, dtype, mode):
    """Where g+ - b is inf/NaN (or overflows once scaled), p and m become NaN; elsewhere the step is
    the ordinary one."""
    device = device_of(target)
    n = 4101
    params, grads, exp_avgs, exp_hz_sqs, gp, gm = make_inputs([n], dtype, device, 8)
    big = torch.finfo(dtype).max
    bad = {5: math.inf, 6: -math.inf, 7: math.nan, 4100: math.nan}
    for i, value in bad.items():
        gp[0][i] = value
    # A finite difference that overflows only once multiplied by hz_scale (fp32/fp64 math only: the
    # difference of two 16-bit values times 4 is finite in float32).
    if dtype in (torch.float32, torch.float64):
        gp[0][9] = big / 2
        (gm if mode == "central" else grads)[0][9] = -big / 2
    hz_scale = torch.tensor(4.0, dtype=torch.float64, device=device)
    gm_arg = gm if mode == "central" else None
    run_fd(target, params, grads, exp_avgs, exp_hz_sqs, gp, gm_arg, hz_scale, hyper(9))
    p, m = params[0].cpu(), exp_avgs[0].cpu()
    expect_nan = torch.zeros(n, dtype=torch.bool)
    expect_nan[list(bad)] = True
    if dtype in (torch.float32, torch.float64):
        expect_nan[9] = True
    hz = (gp[0].double() - (gm if mode == "central" else grads)[0].double()).cpu() * float(hz_scale)
    expect_nan |= ~torch.isfinite(hz.to(state_dtype(dtype)))
    assert torch.equal(p.isnan(), expect_nan)
    assert torch.equal(m.isnan(), expect_nan)


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=NATIVE_ONLY)])
@pytest.mark.parametrize("case", [
    (lambda a: a.update(hz_scale=a["hz_scale"].float()), r"hz_scale has dtype (torch\.)?float32"),
    (lambda a: a.update(hz_scale=torch.ones(2, dtype=torch.float64)), r"hz_scale has 2 elements"),
    (lambda a: a["grads_plus"].pop(), r"grads_plus has 1 tensors but params has 2"),
    (lambda a: a["grads_minus"].pop(), r"grads_minus has 1 tensors but params has 2"),
    (lambda a: a.update(step_scalars=torch.zeros(3, 3, dtype=torch.float64)), r"step_scalars .*\[3, 3\]"),
], ids=["scale_dtype", "scale_numel", "gp_len", "gm_len", "table_shape"])
def test_fd_bad_input_rejected_before_any_write(fused, case):
    corrupt, message = case
    params, grads, exp_avgs, exp_hz_sqs, gp, gm = make_inputs([5, 3], torch.float32, "cpu", 10)
    args = dict(grads_plus=gp, grads_minus=gm, hz_scale=torch.tensor(2.0, dtype=torch.float64), step_scalars=None)
    corrupt(args)
    snapshot = clone_lists(params, exp_avgs, exp_hz_sqs)
    with pytest.raises((RuntimeError, ValueError, TypeError), match=message):
        functional.esgd_update_fd(params, grads, exp_avgs, exp_hz_sqs, args["grads_plus"], args["grads_minus"],
                                  args["hz_scale"], step_scalars=args["step_scalars"], fused=fused, **hyper(0))
    for got, want in zip(params + exp_avgs + exp_hz_sqs, sum(snapshot, [])):
        assert torch.equal(got, want), "a rejected call changed its inputs"


@NATIVE_ONLY
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_cuda_fd_vector_path_choice(dtype, mode):
    """Which blocks of the CUDA FD kernel take the 16-byte vector path (through the emulation):
    exactly those where every list it reads (5 forward, 6 central) is aligned and the chunk is
    whole vectors; a misaligned grads_minus only matters to the central difference."""
    from esgd_cuda import _C

    chunk = _C.CHUNK_SIZE
    sd = state_dtype(dtype)
    width = 16 // torch.empty((), dtype=dtype).element_size()
    gen = torch.Generator().manual_seed(12)

    def draw(n, dt, offset=0, positive=False, scale=1.0):
        x = torch.rand(n + offset, generator=gen, dtype=torch.float64) if positive else torch.randn(
            n + offset, generator=gen, dtype=torch.float64)
        return (x * scale).to(dt)[offset:]

    # (numel, offset of grads_plus, offset of grads_minus)
    layouts = [(2 * chunk + 3, 0, 0), (chunk + width, 0, 0), (chunk, 1, 0), (chunk, 0, 1), (chunk, width, width),
               (width - 1, 0, 0)]
    params = [draw(n, dtype) for n, _, _ in layouts]
    grads = [draw(n, dtype) for n, _, _ in layouts]
    exp_avgs = [draw(n, sd, scale=0.1) for n, _, _ in layouts]
    exp_hz_sqs = [draw(n, sd, positive=True) for n, _, _ in layouts]
    gp = [draw(n, dtype, po) for n, po, _ in layouts]
    gm = [draw(n, dtype, mo) for n, _, mo in layouts]
    gm_arg = gm if mode == "central" else None
    hz_scale = torch.tensor(2.0, dtype=torch.float64)
    h = hyper(4)
    before = clone_lists(params, exp_avgs, exp_hz_sqs)
    rows = run_fd("cuda-emulated", params, grads, exp_avgs, exp_hz_sqs, gp, gm_arg, hz_scale, h)
    assert_step(before, (params, exp_avgs, exp_hz_sqs), grads, gp, gm if mode == "central" else grads,
                math_coeff(2.0, 1.0, dtype), h, dtype)
    blocks = {(t, c): bool(v) for t, c, v in rows}
    assert len(blocks) == len(rows)
    assert set(blocks) == {(t, c) for t, (n, _, _) in enumerate(layouts) for c in range(-(-n // chunk))}
    lists = [params, grads, exp_avgs, exp_hz_sqs, gp] + ([gm] if mode == "central" else [])
    for (t, c), vectorized in blocks.items():
        n = min(chunk, layouts[t][0] - c * chunk)
        aligned = all(
            (x[t].data_ptr() + c * chunk * x[t].element_size()) % (width * x[t].element_size()) == 0
            for x in lists)
        assert vectorized == (aligned and n % width == 0), f"tensor {t} chunk {c}"
    assert blocks[(0, 0)] and blocks[(1, 1)] and blocks[(4, 0)]
    assert not blocks[(0, 2)] and not blocks[(2, 0)] and not blocks[(5, 0)]
    assert blocks[(3, 0)] == (mode == "forward")


@NATIVE_ONLY
@pytest.mark.parametrize("target", ["cuda-emulated", pytest.param("cuda", marks=CUDA_ONLY)])
def test_fd_central_launch_boundaries(target):
    """The six-list (central) table: more tensors than a launch holds, empty tensors, and one tensor
    spanning more blocks than a launch holds."""
    from esgd_cuda import _C

    chunk = _C.CHUNK_SIZE
    sizes = [(i * 977) % 3000 for i in range(_C.MAX_TENSORS_CENTRAL + 40)]
    sizes[10:10] = [0, chunk - 1, chunk, chunk + 1, 0, 1, 3]
    sizes.append(chunk * _C.MAX_BLOCKS + 5)
    sizes += [0, 0]
    params, grads, exp_avgs, exp_hz_sqs, gp, gm = make_inputs(sizes, torch.float32, device_of(target), 13)
    hz_scale = torch.tensor(500.0, dtype=torch.float64, device=device_of(target))
    h = hyper(4)
    before = clone_lists(params, exp_avgs, exp_hz_sqs)
    run_fd(target, params, grads, exp_avgs, exp_hz_sqs, gp, gm, hz_scale, h)
    assert_step(before, (params, exp_avgs, exp_hz_sqs), grads, gp, gm, math_coeff(500.0, 1.0, torch.float32), h,
                torch.float32)


@NATIVE_ONLY
@pytest.mark.parametrize("case", [
    (lambda a: a.update(hz_scale=torch.tensor(2.0)), r"esgd_update_fd_: hz_scale has dtype float32, expected float64"),
    (lambda a: a.update(hz_scale=torch.ones(1, 2, dtype=torch.float64)), r"esgd_update_fd_: hz_scale has 2 elements"),
    (lambda a: a["gp"].__setitem__(1, a["gp"][1].double()), r"grads_plus\[1\] has dtype float64, expected float32"),
    (lambda a: a["gm"].__setitem__(0, a["gm"][0][:2]), r"grads_minus\[0\] has shape \[2\], expected \[5\]"),
    (lambda a: a["gm"].pop(), r"esgd_update_fd_: grads_minus has 1 tensors but params has 2"),
    (lambda a: a.update(step_scalars=torch.zeros(2, 3)), r"step_scalars has dtype float32, expected float64"),
], ids=["scale_dtype", "scale_numel", "gp_dtype", "gm_shape", "gm_len", "table_dtype"])
def test_native_fd_errors_name_the_argument(case):
    from esgd_cuda import ops

    corrupt, message = case
    params, grads, exp_avgs, exp_hz_sqs, gp, gm = make_inputs([5, 3], torch.float32, "cpu", 10)
    args = dict(gp=gp, gm=gm, hz_scale=torch.tensor(2.0, dtype=torch.float64), step_scalars=None)
    corrupt(args)
    snapshot = clone_lists(params, exp_avgs, exp_hz_sqs)
    with pytest.raises(RuntimeError, match=message):
        ops.esgd_update_fd_(params, grads, exp_avgs, exp_hz_sqs, args["gp"], args["gm"], args["hz_scale"],
                            args["step_scalars"], **hyper(0))
    for got, want in zip(params + exp_avgs + exp_hz_sqs, sum(snapshot, [])):
        assert torch.equal(got, want), "a rejected call changed its inputs"


OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor") + (
    ("test_aot_dispatch_dynamic",) if _extension.COMPILABLE else ()
)


@NATIVE_ONLY
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA_ONLY)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(device, dtype):
    params, grads, exp_avgs, exp_hz_sqs, gp, gm = make_inputs([3, 0, 130], dtype, device, 5)
    hz_scale = torch.tensor(100.0, dtype=torch.float64, device=device)
    table = torch.tensor([[0.99, 1e-3, 2.0], [1.0, 1e-2, 1.5], [0.9, 1e-3, 3.0]], dtype=torch.float64, device=device)
    kwargs = dict(hyper(1), grad_scale_inv=0.25, hz_scale_inv=0.5)
    sources = fresh_sources([3, 0, 130], dtype, device, 6)
    for minus in ([], gm):
        for rows in (None, table):
            for theta in (None, sources):
                torch.library.opcheck(torch.ops.esgd_cuda.esgd_update_fd_.default,
                                      (params, grads, exp_avgs, exp_hz_sqs, gp, minus, hz_scale, rows),
                                      dict(kwargs, sources=theta), test_utils=OPCHECK_UTILS)


@CUDA_ONLY
@pytest.mark.parametrize("mode", MODES)
def test_cuda_fd_update_capture_and_no_sync(mode):
    """1/h is read on the device: no host sync, and a graph replay sees a new hz_scale."""
    params, grads, exp_avgs, exp_hz_sqs, gp, gm = make_inputs([1000, 3, 70000], torch.float32, "cuda", 17)
    gm_arg = gm if mode == "central" else None
    hz_scale = torch.tensor(10.0, dtype=torch.float64, device="cuda")
    h = hyper(5)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        functional.esgd_update_fd(params, grads, exp_avgs, exp_hz_sqs, gp, gm_arg, hz_scale, fused=True, **h)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    snapshot = clone_lists(params, exp_avgs, exp_hz_sqs)
    expected = clone_lists(*snapshot)
    functional.esgd_update_fd(expected[0], grads, expected[1], expected[2], gp, gm_arg,
                              torch.tensor(20.0, dtype=torch.float64, device="cuda"), fused=True, **h)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        functional.esgd_update_fd(params, grads, exp_avgs, exp_hz_sqs, gp, gm_arg, hz_scale, fused=True, **h)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        functional.esgd_update_fd(params, grads, exp_avgs, exp_hz_sqs, gp, gm_arg, hz_scale, fused=True, **h)
    for dst, src in zip(params + exp_avgs + exp_hz_sqs, sum(snapshot, [])):
        dst.copy_(src)
    hz_scale.fill_(20.0)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(params + exp_avgs + exp_hz_sqs, sum(expected, [])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ sources
# esgd_update_fd(..., sources=S): theta is read from S (the copy the perturbation saved) and the
# parameters are only written, which fuses the restore after a finite difference's perturbed passes
# into the update. Defined as params[i].copy_(sources[i]) followed by the update, so every path is
# held to that, bit for bit, on its own (the paths differ from each other by rounding).


def twin(t):
    """A copy of t with its strides and its alignment: a view's copy is the same view of a copy of
    its base, so each kernel takes the same (vector or scalar, in-place or copy) path on both."""
    if t._base is None:
        return t.clone()  # preserves a dense layout
    return t._base.clone().as_strided(t.shape, t.stride(), t.storage_offset())


def fresh_sources(sizes, dtype, device, seed):
    """theta for the update from sources: values unlike the params' of make_inputs."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen, dtype=torch.float64).to(dtype).to(device) for n in sizes]


def copy_then_update(target, params, grads, exp_avgs, exp_hz_sqs, gp, gm, hz_scale, h, step_scalars, sources):
    """What the call with sources must equal, on twins of params and state: (params, m, D, rows)."""
    expected = [[twin(t) for t in lst] for lst in (params, exp_avgs, exp_hz_sqs)]
    with torch.no_grad():
        for p, s in zip(expected[0], sources):
            p.copy_(s)
    rows = run_fd(target, *expected[:1], grads, *expected[1:], gp, gm, hz_scale, h, step_scalars=step_scalars)
    return expected + [rows]


def assert_equal_lists(actual, expected, name):
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape and torch.equal(a, e), f"{name}[{i}] differs from copy-then-update"


def assert_sources_unchanged(sources, kept):
    for i, (s, k) in enumerate(zip(sources, kept)):
        assert torch.equal(s, k), f"sources[{i}] was written"


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("table", [False, True], ids=["host_scalars", "step_scalars"])
def test_fd_sources_equal_copy_then_update(target, dtype, mode, table):
    """Odd and empty sizes, forward and central, with and without the step-scalar table: the result
    is copy-then-update's, bit for bit (with the same blocks on the same path in the emulation),
    follows the float64 reference from the sources' values, and the sources are only read."""
    device = device_of(target)
    sizes = [1, 3, 4, 0, 7, 260, 4097, 65537]
    params, grads, exp_avgs, exp_hz_sqs, gp, gm = make_inputs(sizes, dtype, device, 20)
    sources = fresh_sources(sizes, dtype, device, 21)
    kept = clone_lists(sources)[0]
    gm_arg = gm if mode == "central" else None
    hz_scale = torch.tensor(250.0, dtype=torch.float64, device=device)
    h, step_scalars, rows = hyper(22), None, None
    if table:
        counts = [torch.tensor(3 + t, device=device) for t in range(len(sizes))]
        step_scalars = functional.step_scalar_table(counts, counts[::-1], lr=0.05, beta1=0.9, beta2=0.99, v=0.7,
                                                    lr_warmup=0.9, weight_decay=0.01)
        h = dict(h, weight_decay=123.0, step_size=-1.0, momentum_scale=7.0, denom_scale=0.0)  # ignored
        rows = [tuple(r) for r in step_scalars.cpu().tolist()]
    *expected, expected_rows = copy_then_update(target, params, grads, exp_avgs, exp_hz_sqs, gp, gm_arg, hz_scale,
                                                h, step_scalars, sources)
    before = clone_lists(sources, exp_avgs, exp_hz_sqs)
    got_rows = run_fd(target, params, grads, exp_avgs, exp_hz_sqs, gp, gm_arg, hz_scale, h,
                      step_scalars=step_scalars, sources=sources)
    for name, actual, want in zip(("params", "exp_avgs", "exp_hz_sqs"), (params, exp_avgs, exp_hz_sqs), expected):
        assert_equal_lists(actual, want, name)
    assert got_rows == expected_rows
    assert_sources_unchanged(sources, kept)
    assert_step(before, (params, exp_avgs, exp_hz_sqs), grads, gp, gm if mode == "central" else grads,
                math_coeff(250.0, 1.0, dtype), h, dtype, rows=rows)


def _layout_cases(dtype, device, gen):
    """(param, source) pairs in the layouts the optimizer meets: the parameter's gradient and state
    are laid out like it (as the optimizer allocates them), the source as named."""

    def rand(shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device)

    cl = torch.channels_last
    base = rand((16, 66))
    return [
        ("channels_last/contiguous", rand((3, 8, 5, 7)).to(memory_format=cl), rand((3, 8, 5, 7))),
        ("channels_last/channels_last", rand((3, 8, 5, 7)).to(memory_format=cl),
         rand((3, 8, 5, 7)).to(memory_format=cl)),
        ("transposed/same_strides", rand((65, 33)).t(), rand((65, 33)).t()),
        ("strided/contiguous", base[:, ::2], rand((16, 33))),
        ("contiguous/transposed", rand((33, 65)), rand((65, 33)).t()),
        ("contiguous/strided", rand((16, 33)), rand((16, 66))[:, 1::2]),
        ("misaligned/contiguous", rand(4100)[3:], rand(4097)),
        ("contiguous/misaligned", rand(4097), rand(4098)[1:]),
    ]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_fd_sources_in_any_layout(target, dtype, mode):
    """A source's layout may differ from its parameter's (the backups are contiguous, parameters
    may be channels-last, transposed or strided views): the result is copy-then-update's in every
    case, written through the parameter's own view, and the sources are only read."""
    device = device_of(target)
    gen = torch.Generator().manual_seed(23)
    cases = _layout_cases(dtype, device, gen)
    params = [p for _, p, _ in cases]
    sources = [s for _, _, s in cases]
    sd = state_dtype(dtype)

    def like(p, dt, positive=False):
        values = torch.rand(p.shape, generator=gen, dtype=torch.float64) if positive else torch.randn(
            p.shape, generator=gen, dtype=torch.float64)
        return torch.empty_like(p, dtype=dt).copy_(values.to(dt))  # the parameter's layout where dense

    grads = [like(p, dtype) for p in params]
    gp = [(g.double() + 1e-3 * like(g, torch.float64)).to(dtype) for g in grads]
    gm = [(g.double() - 1e-3 * like(g, torch.float64)).to(dtype) for g in grads]
    exp_avgs = [like(p, sd) for p in params]
    exp_hz_sqs = [like(p, sd, positive=True) for p in params]
    kept = clone_lists(sources)[0]
    bases = [p._base for p in params]  # the strided and misaligned views write into these
    gm_arg = gm if mode == "central" else None
    hz_scale = torch.tensor(3.0, dtype=torch.float64, device=device)
    h = hyper(24)
    *expected, _ = copy_then_update(target, params, grads, exp_avgs, exp_hz_sqs, gp, gm_arg, hz_scale, h, None,
                                    sources)
    before = clone_lists(sources, exp_avgs, exp_hz_sqs)
    untouched = [b.clone() if b is not None else None for b in bases]
    run_fd(target, params, grads, exp_avgs, exp_hz_sqs, gp, gm_arg, hz_scale, h, sources=sources)
    for name, actual, want in zip(("params", "exp_avgs", "exp_hz_sqs"), (params, exp_avgs, exp_hz_sqs), expected):
        assert_equal_lists(actual, want, name)
    assert_sources_unchanged(sources, kept)
    assert_step(before, (params, exp_avgs, exp_hz_sqs), grads, gp, gm if mode == "central" else grads,
                math_coeff(3.0, 1.0, dtype), h, dtype)
    # A view's writes stay inside it: the rest of its base is as it was.
    for (label, p, _), b, old in zip(cases, bases, untouched):
        if b is not None:
            outside = torch.ones(b.shape, dtype=torch.bool, device=b.device)
            outside.as_strided(p.shape, p.stride(), p.storage_offset()).fill_(False)
            assert torch.equal(b[outside], old[outside]), f"{label}: wrote outside the parameter's view"


def _copies_made(fn):
    """The aten::copy_ calls (and the allocations) one call of `fn` makes on the CPU."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    names = [e.name for e in prof.events()]
    return names.count("aten::copy_"), sum(n in ("aten::empty", "aten::empty_strided") for n in names)


@NATIVE_ONLY
def test_fd_sources_in_the_params_layout_are_read_in_place():
    """The fast path: a source with its parameter's strides (dense) is read where it is; one in
    another layout costs one copy, into the parameter's layout, and leaves every other list in
    place (no contiguous copies of the parameter, gradients or state, no write-back)."""
    gen = torch.Generator().manual_seed(25)

    def rand(shape, transform):
        return transform(torch.randn(shape, generator=gen))

    def channels_last(t):
        return t.contiguous(memory_format=torch.channels_last)

    for transform, shape in ((channels_last, (4, 6, 5, 3)), (lambda t: t.t(), (40, 30)), (lambda t: t, (7, 9))):
        params, grads, gp, exp_avgs = ([rand(shape, transform) for _ in range(3)] for _ in range(4))
        exp_hz_sqs = [t.abs() for t in exp_avgs]
        own = [torch.empty_like(p).copy_(torch.randn(p.shape, generator=gen)) for p in params]
        contiguous = [s.contiguous() for s in own]
        hz_scale = torch.tensor(2.0, dtype=torch.float64)
        h = hyper(26)

        def call(sources):
            return lambda: functional.esgd_update_fd(params, grads, exp_avgs, exp_hz_sqs, gp, None, hz_scale,
                                                     sources=sources, fused=True, **h)

        assert _copies_made(call(own)) == (0, 0)
        dense_elsewhere = not params[0].is_contiguous()
        assert _copies_made(call(contiguous)) == ((3, 3) if dense_elsewhere else (0, 0))


@NATIVE_ONLY
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_cuda_fd_sources_vector_path_choice(dtype, mode):
    """Which blocks of the CUDA kernel from sources take the 16-byte vector path (emulation): those
    where every list, the source and the written parameter included, is aligned and the chunk is
    whole vectors; a misaligned source alone sends its chunks to the scalar path."""
    from esgd_cuda import _C

    chunk = _C.CHUNK_SIZE
    sd = state_dtype(dtype)
    width = 16 // torch.empty((), dtype=dtype).element_size()
    gen = torch.Generator().manual_seed(27)

    def draw(n, dt, offset=0, positive=False, scale=1.0):
        x = torch.rand(n + offset, generator=gen, dtype=torch.float64) if positive else torch.randn(
            n + offset, generator=gen, dtype=torch.float64)
        return (x * scale).to(dt)[offset:]

    # (numel, offset of params, offset of sources)
    layouts = [(2 * chunk + 3, 0, 0), (chunk, 0, 1), (chunk, 1, 0), (chunk, width, width), (chunk + width, 0, width),
               (width - 1, 0, 0)]
    params = [draw(n, dtype, po) for n, po, _ in layouts]
    sources = [draw(n, dtype, so) for n, _, so in layouts]
    grads, gp, gm = ([draw(n, dtype) for n, _, _ in layouts] for _ in range(3))
    exp_avgs = [draw(n, sd, scale=0.1) for n, _, _ in layouts]
    exp_hz_sqs = [draw(n, sd, positive=True) for n, _, _ in layouts]
    gm_arg = gm if mode == "central" else None
    hz_scale = torch.tensor(2.0, dtype=torch.float64)
    h = hyper(28)
    before = clone_lists(sources, exp_avgs, exp_hz_sqs)
    rows = run_fd("cuda-emulated", params, grads, exp_avgs, exp_hz_sqs, gp, gm_arg, hz_scale, h, sources=sources)
    assert_step(before, (params, exp_avgs, exp_hz_sqs), grads, gp, gm if mode == "central" else grads,
                math_coeff(2.0, 1.0, dtype), h, dtype)
    blocks = {(t, c): bool(v) for t, c, v in rows}
    assert len(blocks) == len(rows)
    assert set(blocks) == {(t, c) for t, (n, _, _) in enumerate(layouts) for c in range(-(-n // chunk))}
    lists = [params, grads, exp_avgs, exp_hz_sqs, gp, sources] + ([gm] if mode == "central" else [])
    for (t, c), vectorized in blocks.items():
        n = min(chunk, layouts[t][0] - c * chunk)
        aligned = all(
            (x[t].data_ptr() + c * chunk * x[t].element_size()) % (width * x[t].element_size()) == 0
            for x in lists)
        assert vectorized == (aligned and n % width == 0), f"tensor {t} chunk {c}"
    assert blocks[(0, 0)] and blocks[(0, 1)] and blocks[(3, 0)] and blocks[(4, 0)] and blocks[(4, 1)]
    assert not blocks[(0, 2)] and not blocks[(1, 0)] and not blocks[(2, 0)] and not blocks[(5, 0)]


@NATIVE_ONLY
@pytest.mark.parametrize("target", ["cuda-emulated", pytest.param("cuda", marks=CUDA_ONLY)])
def test_fd_sources_launch_boundaries(target):
    """The seven-list table (central difference from sources): more tensors than a launch holds,
    empty tensors, and one tensor spanning more blocks than a launch holds, whose later chunks read
    their source from the next launch's table. Equal to copy-then-update bit for bit (whose plan
    test_fd_central_launch_boundaries holds to the reference), and the small tensors to the
    float64 reference here too (the big one's reference would take most of the test's time)."""
    from esgd_cuda import _C

    chunk = _C.CHUNK_SIZE
    sizes = [(i * 977) % 3000 for i in range(_C.MAX_TENSORS_CENTRAL_SOURCES + 30)]
    sizes[10:10] = [0, chunk - 1, chunk, chunk + 1, 0, 1, 3]
    big, big_numel = len(sizes), chunk * _C.MAX_BLOCKS + 5
    sizes += [0, 0, 0]
    device = device_of(target)
    lists = list(make_inputs(sizes, torch.float32, device, 29)) + [fresh_sources(sizes, torch.float32, device, 30)]
    # The big tensor repeats a random pattern whose period is no multiple of the chunk, so that
    # chunks differ (drawing 21M values of each list would take most of the test's time).
    pattern = list(make_inputs([chunk + 7], torch.float32, device, 31)) + [fresh_sources([chunk + 7], torch.float32,
                                                                                         device, 32)]
    for lst, (piece,) in zip(lists, pattern):
        lst[big] = piece.repeat(-(-big_numel // piece.numel()))[:big_numel].clone()
    params, grads, exp_avgs, exp_hz_sqs, gp, gm, sources = lists
    hz_scale = torch.tensor(500.0, dtype=torch.float64, device=device)
    h = hyper(31)
    *expected, _ = copy_then_update(target, params, grads, exp_avgs, exp_hz_sqs, gp, gm, hz_scale, h, None, sources)
    small = [i for i in range(len(sizes)) if i != big]
    before = [[lst[i].clone() for i in small] for lst in (sources, exp_avgs, exp_hz_sqs)]
    run_fd(target, params, grads, exp_avgs, exp_hz_sqs, gp, gm, hz_scale, h, sources=sources)
    for name, actual, want in zip(("params", "exp_avgs", "exp_hz_sqs"), (params, exp_avgs, exp_hz_sqs), expected):
        assert_equal_lists(actual, want, name)
    assert_step(before, [[lst[i] for i in small] for lst in (params, exp_avgs, exp_hz_sqs)],
                [grads[i] for i in small], [gp[i] for i in small], [gm[i] for i in small],
                math_coeff(500.0, 1.0, torch.float32), h, torch.float32)


def _source_cases():
    """(corrupt(args), message, id) for the checks of sources, on params of sizes [5, 3] (float32)."""

    def overlapping(a):
        buf = torch.zeros(9)
        a["params"][0], a["sources"][0] = buf[:5], buf[4:]

    def interleaved(a):
        buf = torch.zeros(10)
        a["params"][0], a["sources"][0] = buf[0::2], buf[1::2]

    return [
        (lambda a: a["sources"].pop(), r"sources has 1 tensors but params has 2", "length"),
        (lambda a: a["sources"].__setitem__(1, a["sources"][1].double()),
         r"sources\[1\] has dtype float64, expected float32", "dtype"),
        (lambda a: a["sources"].__setitem__(0, a["sources"][0][:4]),
         r"sources\[0\] has shape \[4\], expected \[5\]", "shape"),
        (lambda a: a["sources"].__setitem__(0, a["params"][0]), r"sources\[0\] shares memory with params\[0\]",
         "alias"),
        (overlapping, r"sources\[0\] shares memory with params\[0\]", "overlap"),
        (interleaved, r"sources\[0\] shares memory with params\[0\]", "interleaved"),
        (lambda a: a["sources"].__setitem__(1, a["params"][0][1:4]), r"sources\[1\] shares memory with params\[0\]",
         "other_param"),
        (lambda a: a["sources"].__setitem__(0, a["exp_avgs"][0]), r"sources\[0\] shares memory with exp_avgs\[0\]",
         "exp_avgs"),
        (lambda a: a["sources"].__setitem__(1, a["exp_hz_sqs"][0][2:]),
         r"sources\[1\] shares memory with exp_hz_sqs\[0\]", "exp_hz_sqs"),
    ]


SOURCE_CASES = _source_cases()


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=NATIVE_ONLY)])
@pytest.mark.parametrize("case", [c[:2] for c in SOURCE_CASES], ids=[c[2] for c in SOURCE_CASES])
def test_fd_bad_sources_rejected_before_any_write(fused, case):
    """Wrong length, dtype or shape, or memory shared with a tensor the update writes (its own
    parameter, another parameter, the state; by memory span, so interleaved views too): refused
    with the argument named, on both paths, before anything is written."""
    corrupt, message = case
    params, grads, exp_avgs, exp_hz_sqs, gp, gm = make_inputs([5, 3], torch.float32, "cpu", 32)
    args = dict(params=params, exp_avgs=exp_avgs, exp_hz_sqs=exp_hz_sqs,
                sources=fresh_sources([5, 3], torch.float32, "cpu", 33))
    corrupt(args)
    params = args["params"]
    snapshot = clone_lists(params, exp_avgs, exp_hz_sqs, args["sources"])
    with pytest.raises((RuntimeError, ValueError, TypeError), match=message):
        functional.esgd_update_fd(params, grads, exp_avgs, exp_hz_sqs, gp, gm, torch.tensor(2.0, dtype=torch.float64),
                                  sources=args["sources"], fused=fused, **hyper(0))
    for got, want in zip(params + exp_avgs + exp_hz_sqs + args["sources"], sum(snapshot, [])):
        assert torch.equal(got, want), "a rejected call changed its inputs"


@NATIVE_ONLY
@pytest.mark.parametrize("case", [c[:2] for c in SOURCE_CASES], ids=[c[2] for c in SOURCE_CASES])
def test_native_fd_source_errors_name_the_argument(case):
    """The op itself (and the CUDA emulation, which shares its checks) names the argument."""
    from esgd_cuda import _C, ops

    corrupt, message = case
    for call in ("op", "emulation"):
        params, grads, exp_avgs, exp_hz_sqs, gp, gm = make_inputs([5, 3], torch.float32, "cpu", 34)
        args = dict(params=params, exp_avgs=exp_avgs, exp_hz_sqs=exp_hz_sqs,
                    sources=fresh_sources([5, 3], torch.float32, "cpu", 35))
        corrupt(args)
        params = args["params"]
        snapshot = clone_lists(params, exp_avgs, exp_hz_sqs)
        hz_scale = torch.tensor(2.0, dtype=torch.float64)
        with pytest.raises(RuntimeError, match=message):
            if call == "op":
                ops.esgd_update_fd_(params, grads, exp_avgs, exp_hz_sqs, gp, gm, hz_scale, None,
                                    sources=args["sources"], **hyper(0))
            else:
                _C.emulate_cuda_update_fd(params, grads, exp_avgs, exp_hz_sqs, gp, gm, hz_scale,
                                          sources=args["sources"], **hyper(0))
        for got, want in zip(params + exp_avgs + exp_hz_sqs, sum(snapshot, [])):
            assert torch.equal(got, want), "a rejected call changed its inputs"


def test_fd_source_device_and_type_rejected():
    """The pure-PyTorch path's own checks: a source on another device, or not a tensor."""
    params, grads, exp_avgs, exp_hz_sqs, gp, gm = make_inputs([5, 3], torch.float32, "cpu", 36)
    hz_scale = torch.tensor(2.0, dtype=torch.float64)
    for sources, error, message in (
            ([torch.zeros(5), torch.zeros(3, device="meta")], ValueError,
             r"sources\[1\] is on meta, expected cpu \(the device of params\[1\]\)"),
            ([torch.zeros(5), None], TypeError, r"sources\[1\] is NoneType, expected a tensor")):
        snapshot = clone_lists(params, exp_avgs, exp_hz_sqs)
        with pytest.raises(error, match=message):
            functional.esgd_update_fd(params, grads, exp_avgs, exp_hz_sqs, gp, gm, hz_scale, sources=sources,
                                      fused=False, **hyper(0))
        for got, want in zip(params + exp_avgs + exp_hz_sqs, sum(snapshot, [])):
            assert torch.equal(got, want), "a rejected call changed its inputs"


@CUDA_ONLY
def test_cuda_fd_source_on_another_device_rejected():
    params, grads, exp_avgs, exp_hz_sqs, gp, gm = make_inputs([5, 3], torch.float32, "cuda", 37)
    sources = [torch.zeros(5, device="cuda"), torch.zeros(3)]
    with pytest.raises(RuntimeError, match=r"sources\[1\] is on cpu, expected cuda:0 \(the device of params\[1\]\)"):
        functional.esgd_update_fd(params, grads, exp_avgs, exp_hz_sqs, gp, gm,
                                  torch.tensor(2.0, dtype=torch.float64, device="cuda"), sources=sources,
                                  fused=True, **hyper(0))


@pytest.mark.parametrize("target", TARGETS)
def test_fd_sources_may_share_memory_with_read_only_inputs(target):
    """Only the written tensors are off limits: a source that is also a gradient (read-only, like the
    source) is accepted, with copy-then-update's result."""
    device = device_of(target)
    params, grads, exp_avgs, exp_hz_sqs, gp, gm = make_inputs([5, 4097], torch.float32, device, 38)
    sources = [grads[0], gm[1]]
    hz_scale = torch.tensor(2.0, dtype=torch.float64, device=device)
    h = hyper(39)
    *expected, _ = copy_then_update(target, params, grads, exp_avgs, exp_hz_sqs, gp, gm, hz_scale, h, None, sources)
    run_fd(target, params, grads, exp_avgs, exp_hz_sqs, gp, gm, hz_scale, h, sources=sources)
    for name, actual, want in zip(("params", "exp_avgs", "exp_hz_sqs"), (params, exp_avgs, exp_hz_sqs), expected):
        assert_equal_lists(actual, want, name)


@CUDA_ONLY
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["same", "contiguous"])
def test_cuda_fd_sources_capture_and_no_sync(mode, layout):
    """With sources, in the parameters' layout or copied into it: no host sync, and a captured graph
    replays the update from whatever the sources then hold."""
    gen = torch.Generator().manual_seed(40)

    def rand(shape, positive=False):
        x = torch.rand(shape, generator=gen) if positive else torch.randn(shape, generator=gen)
        return x.cuda().contiguous(memory_format=torch.channels_last)

    shapes = [(4, 6, 5, 3), (2, 16, 9, 9), (8, 3, 1, 1)]
    params, grads, gp, gm, exp_avgs = ([rand(s) for s in shapes] for _ in range(5))
    exp_hz_sqs = [rand(s, positive=True) for s in shapes]
    sources = [rand(s) for s in shapes]
    if layout == "contiguous":
        sources = [s.contiguous() for s in sources]
    gm_arg = gm if mode == "central" else None
    hz_scale = torch.tensor(10.0, dtype=torch.float64, device="cuda")
    h = hyper(41)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        functional.esgd_update_fd(params, grads, exp_avgs, exp_hz_sqs, gp, gm_arg, hz_scale, sources=sources,
                                  fused=True, **h)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    snapshot = clone_lists(params, exp_avgs, exp_hz_sqs)
    new_sources = [torch.randn(s.shape, generator=gen).cuda() for s in sources]
    *expected, _ = copy_then_update("cuda", *snapshot[:1], grads, *snapshot[1:], gp, gm_arg, hz_scale, h, None,
                                    new_sources)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        functional.esgd_update_fd(params, grads, exp_avgs, exp_hz_sqs, gp, gm_arg, hz_scale, sources=sources,
                                  fused=True, **h)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        functional.esgd_update_fd(params, grads, exp_avgs, exp_hz_sqs, gp, gm_arg, hz_scale, sources=sources,
                                  fused=True, **h)
    for dst, src in zip(params + exp_avgs + exp_hz_sqs + sources, sum(snapshot, []) + new_sources):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    for name, actual, want in zip(("params", "exp_avgs", "exp_hz_sqs"), (params, exp_avgs, exp_hz_sqs), expected):
        assert_equal_lists(actual, want, name)
