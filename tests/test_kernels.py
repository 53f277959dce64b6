"""The fused native ops against an independent float64 reference and the pure-PyTorch path.

Self-contained (no conftest imports) so scripts/check_build.sh can run it against another build.
Targets: "cpu" (the fused CPU kernel), "cuda" (skips without a GPU) and "cuda-emulated": the CUDA
kernel's own plan, tables and per-thread code run sequentially on CPU tensors
(esgd_cuda._C.emulate_cuda_update), which checks the device code's indexing without a GPU.
"""

import math

import pytest
import torch

import esgd_cuda
from esgd_cuda import _extension, functional, ops

# opcheck's test_aot_dispatch_dynamic compiles the op: only where torch can (see _extension.COMPILABLE).
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor") + (
    ("test_aot_dispatch_dynamic",) if _extension.COMPILABLE else ()
)

pytestmark = pytest.mark.skipif(
    _extension.DISABLED, reason="native kernels disabled by ESGD_CUDA_DISABLE_EXTENSION"
)

HAS_CUDA = torch.cuda.is_available() and _extension.fused_supported(torch.device("cuda"), torch.float32)
CUDA_ONLY = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA_ONLY)]
TARGETS = ["cpu", "cuda-emulated", pytest.param("cuda", marks=CUDA_ONLY)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
ODD_SIZES = [0, 1, 3, 4097, 65537]


def state_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def tolerances(dtype):
    """(rtol, atol) for a parameter of `dtype` after one step from identical inputs.

    The math is fp32 (fp64 for fp64): a few ulps of fp32. 16-bit parameters are rounded once at the
    end, so they may sit half an ulp of their format from the float64 value.
    """
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
    return dict(
        beta1=beta1,
        beta2=0.99 + 0.009 * u[2],
        v=v,
        eps=1e-4,
        weight_decay=0.05 * u[5],
        step_size=0.01 + 0.1 * u[5],
        momentum_scale=1.0 / (1.0 - mb * v),
        denom_scale=1.0 / math.sqrt(1.0 - db),
    )


def reference(p, g, m, d, hz, h):
    """ESGD-M for one step, element by element in float64, from the formula (not the code)."""
    p, g, m, d = (t.double() for t in (p, g, m, d))
    m = h["beta1"] * m + (1.0 - h["beta1"]) * g
    if hz is not None:
        hz = hz.double()
        d = h["beta2"] * d + (1.0 - h["beta2"]) * hz * hz
    denom = d.sqrt() * h["denom_scale"] + h["eps"]
    est = h["v"] * m + (1.0 - h["v"]) * g
    p = p * (1.0 - h["weight_decay"] * h["step_size"])
    p = p - (h["step_size"] * h["momentum_scale"]) * est / denom
    return p, m, d


def make_tensors(sizes, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    sd = state_dtype(dtype)

    def draw(n, dt, positive=False):
        # Drawn in the state dtype (fp32 or fp64), then rounded: cheap for the 21M-element cases.
        wide = state_dtype(dt)
        x = torch.rand(n, generator=gen, dtype=wide) if positive else torch.randn(
            n, generator=gen, dtype=wide
        )
        return x.to(dt).to(device)

    params = [draw(n, dtype) for n in sizes]
    grads = [draw(n, dtype) for n in sizes]
    exp_avgs = [draw(n, sd) * 0.1 for n in sizes]
    exp_hz_sqs = [draw(n, sd, positive=True) for n in sizes]
    hzs = [draw(n, dtype) for n in sizes]
    return params, grads, exp_avgs, exp_hz_sqs, hzs


def call(params, grads, exp_avgs, exp_hz_sqs, hzs, h, fused):
    functional.esgd_update(params, grads, exp_avgs, exp_hz_sqs, hzs, fused=fused, **h)


def device_of(target):
    return "cuda" if target == "cuda" else "cpu"


def call_target(target, params, grads, exp_avgs, exp_hz_sqs, hzs, h):
    if target == "cuda-emulated":
        from esgd_cuda import _C

        _C.emulate_cuda_update(params, grads, exp_avgs, exp_hz_sqs, hzs, **h)
    else:
        call(params, grads, exp_avgs, exp_hz_sqs, hzs, h, fused=True)


def assert_step_matches(before, after, grads, hzs, h, dtype):
    """`after` (params, exp_avgs, exp_hz_sqs) is one step from `before`, per the float64 reference."""
    rtol, atol = tolerances(dtype)
    srtol, satol = STATE_TOL[state_dtype(dtype)]
    for i in range(len(before[0])):
        hz = None if hzs is None else hzs[i]
        rp, rm, rd = reference(before[0][i], grads[i], before[1][i], before[2][i], hz, h)
        assert_close(after[0][i], rp, rtol, atol, f"params[{i}]")
        assert_close(after[1][i], rm, srtol, satol, f"exp_avgs[{i}]")
        assert_close(after[2][i], rd, srtol, satol, f"exp_hz_sqs[{i}]")


def assert_close(actual, expected, rtol, atol, name):
    """torch.testing.assert_close's criterion, checked in one pass first (the tensors can be big)."""
    actual = actual.double()
    ok = (actual - expected).abs() <= atol + rtol * expected.abs()
    if not bool(ok.all()):
        torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=rtol, atol=atol,
                                   msg=lambda s: f"{name}: {s}")


def clone_lists(*lists):
    return [[t.clone() for t in lst] for lst in lists]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference_and_foreach(target, dtype):
    params, grads, exp_avgs, exp_hz_sqs, hzs = make_tensors(
        ODD_SIZES + [7, 260], dtype, device_of(target), 1)
    foreach = clone_lists(params, exp_avgs, exp_hz_sqs)
    # Estimation and plain steps alternate; each is checked from the fused kernel's own previous
    # state so that rounding is not compounded across steps.
    for step, estimate in enumerate([True, False, True, False, False]):
        h = hyper(step)
        step_hzs = hzs if estimate else None
        before = clone_lists(params, exp_avgs, exp_hz_sqs)
        call_target(target, params, grads, exp_avgs, exp_hz_sqs, step_hzs, h)
        assert_step_matches(before, (params, exp_avgs, exp_hz_sqs), grads, step_hzs, h, dtype)
        if not estimate:
            for d0, d1 in zip(before[2], exp_hz_sqs):
                assert torch.equal(d0, d1), "a plain step must not write exp_hz_sqs"

        foreach = clone_lists(*before)
        call(*foreach[:1], grads, *foreach[1:], step_hzs, h, fused=False)
        rtol, atol = tolerances(dtype)
        for a, b in zip(params, foreach[0]):
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
        for a, b in zip(exp_avgs + exp_hz_sqs, foreach[1] + foreach[2]):
            torch.testing.assert_close(a, b, rtol=STATE_TOL[a.dtype][0], atol=STATE_TOL[a.dtype][1])


@pytest.mark.parametrize("target", TARGETS + ["foreach"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gscale, hscale", [(2.0**12, 2.0**12), (3000.0, 1.0), (1.0, 0.125)])
def test_loss_scale_is_undone(target, dtype, gscale, hscale):
    """grad_scale_inv / hz_scale_inv undo a loss scale on g and hz (GradScaler's fused protocol)."""
    params, grads, exp_avgs, exp_hz_sqs, hzs = make_tensors(ODD_SIZES[:4] + [7], dtype, device_of(target), 3)
    scaled_g = [(g.double() * gscale).to(dtype) for g in grads]
    scaled_hz = [(hz.double() * hscale).to(dtype) for hz in hzs]
    # The reference sees exactly what the kernel was given, divided by the scale in float64.
    ref_g = [g.double() / gscale for g in scaled_g]
    ref_hz = [hz.double() / hscale for hz in scaled_hz]
    for estimate in (True, False):
        h = dict(hyper(7 if estimate else 8), grad_scale_inv=1.0 / gscale)
        if estimate:
            h["hz_scale_inv"] = 1.0 / hscale
        before = clone_lists(params, exp_avgs, exp_hz_sqs)
        step_hzs = scaled_hz if estimate else None
        if target == "foreach":
            call(params, scaled_g, exp_avgs, exp_hz_sqs, step_hzs, h, fused=False)
        else:
            call_target(target, params, scaled_g, exp_avgs, exp_hz_sqs, step_hzs, h)
        plain = {k: v for k, v in h.items() if k not in ("grad_scale_inv", "hz_scale_inv")}
        assert_step_matches(before, (params, exp_avgs, exp_hz_sqs), ref_g, ref_hz if estimate else None,
                            plain, dtype)


@pytest.mark.parametrize("target", TARGETS + ["foreach", "capturable", "capturable-foreach"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_finite_hz_poisons_the_parameter(target, dtype):
    """Where the scaled Hz is inf or NaN (also where only hz_scale_inv makes it overflow), the
    update's gradient is NaN, so p and m become NaN there; elsewhere the step is the ordinary one."""
    device = device_of(target)
    n = 4101
    params, grads, exp_avgs, exp_hz_sqs, hzs = make_tensors([n], dtype, device, 21)
    bad = [5, 6, 7, 64, 4100]
    for i, value in zip(bad, [math.inf, -math.inf, math.nan, math.nan, math.inf]):
        hzs[0][i] = value
    big = torch.finfo(dtype).max
    hzs[0][9] = big  # finite, but not once multiplied by hz_scale_inv in the math dtype
    # The 16-bit maximum times 1e35 overflows float32 math; the other values (|hz| < 10) do not.
    hz_scale_inv = 4.0 if dtype in (torch.float32, torch.float64) else 1e35
    h = dict(hyper(2), hz_scale_inv=hz_scale_inv)
    before = clone_lists(params, exp_avgs, exp_hz_sqs)
    if target.startswith("capturable"):
        steps = [torch.tensor(5, device=device)]
        functional.esgd_update_capturable(
            params, grads, exp_avgs, exp_hz_sqs, hzs, lr=0.1, steps=steps, estimates=steps,
            beta1=h["beta1"], beta2=h["beta2"], v=h["v"], lr_warmup=0.9, eps=h["eps"], weight_decay=0.01,
            hz_scale_inv=hz_scale_inv, fused=target == "capturable")
    elif target == "foreach":
        call(params, grads, exp_avgs, exp_hz_sqs, hzs, h, fused=False)
    else:
        call_target(target, params, grads, exp_avgs, exp_hz_sqs, hzs, h)
    expect_nan = torch.zeros(n, dtype=torch.bool)
    expect_nan[bad + [9]] = True
    assert torch.equal(params[0].isnan().cpu(), expect_nan)
    assert torch.equal(exp_avgs[0].isnan().cpu(), expect_nan)
    if not target.startswith("capturable"):
        keep = ~expect_nan
        scaled = dict(h, hz_scale_inv=1.0)
        rp, rm, rd = reference(before[0][0][keep], grads[0][keep], before[1][0][keep], before[2][0][keep],
                               hzs[0][keep].double() * hz_scale_inv, scaled)
        rtol, atol = tolerances(dtype)
        assert_close(params[0][keep], rp, rtol, atol, "params[0]")
        assert_close(exp_avgs[0][keep], rm, *STATE_TOL[state_dtype(dtype)], "exp_avgs[0]")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("estimate", [True, False], ids=["hz", "plain"])
def test_cuda_vector_path_choice(dtype, estimate):
    """Which blocks of the CUDA kernel take the 16-byte vector path, through the emulation.

    A slower scalar path that still computes the right answer would pass every other test, so
    this pins the choice: a chunk is vectorized exactly when every list's address is aligned to
    its vector (16 bytes of parameters: 8 fp16/bf16, 4 fp32, 2 fp64 elements; the same number of
    state elements) and the chunk is a whole number of vectors. Results match the reference on
    both paths.
    """
    from esgd_cuda import _C

    chunk = _C.CHUNK_SIZE
    sd = state_dtype(dtype)
    width = 16 // torch.empty((), dtype=dtype).element_size()
    gen = torch.Generator().manual_seed(11)

    def draw(n, dt, offset=0, positive=False, scale=1.0):
        x = torch.rand(n + offset, generator=gen, dtype=torch.float64) if positive else torch.randn(
            n + offset, generator=gen, dtype=torch.float64)
        return (x * scale).to(dt)[offset:]  # the view last, so its offset reaches the kernel

    # (numel, element offset of the parameter view, element offset of the exp_avg view)
    layouts = [
        (2 * chunk + 3, 0, 0),  # two whole aligned chunks, then a 3-element tail: scalar
        (chunk + width, 0, 0),  # a tail of exactly one vector: vector
        (chunk + 2 * width, 1, 0),  # parameter view one element off: scalar throughout
        (chunk, 0, width // 2),  # state half a vector off: scalar
        (chunk, width, width),  # both one whole vector off, still aligned: vector
        (width - 1, 0, 0),  # shorter than a vector: scalar
    ]
    params = [draw(n, dtype, po) for n, po, _ in layouts]
    grads = [draw(n, dtype) for n, _, _ in layouts]
    exp_avgs = [draw(n, sd, mo, scale=0.1) for n, _, mo in layouts]
    exp_hz_sqs = [draw(n, sd, positive=True) for n, _, _ in layouts]
    hzs = [draw(n, dtype) for n, _, _ in layouts] if estimate else None
    h = hyper(4)
    before = clone_lists(params, exp_avgs, exp_hz_sqs)
    rows = _C.emulate_cuda_update(params, grads, exp_avgs, exp_hz_sqs, hzs, **h)
    assert_step_matches(before, (params, exp_avgs, exp_hz_sqs), grads, hzs, h, dtype)

    blocks = {(t, c): bool(v) for t, c, v in rows}
    assert len(blocks) == len(rows), "a chunk was processed twice"
    assert set(blocks) == {(t, c) for t, (n, _, _) in enumerate(layouts)
                           for c in range(-(-n // chunk))}, "a chunk was never processed"
    lists = [params, grads, exp_avgs, exp_hz_sqs] + ([hzs] if estimate else [])
    for (t, c), vectorized in blocks.items():
        n = min(chunk, layouts[t][0] - c * chunk)
        aligned = all(
            (x[t].data_ptr() + c * chunk * x[t].element_size()) % (width * x[t].element_size()) == 0
            for x in lists)
        assert vectorized == (aligned and n % width == 0), f"tensor {t} chunk {c}"
    # The rule above, pinned on cases whose answer does not depend on the allocator.
    assert blocks[(0, 0)] and blocks[(0, 1)] and not blocks[(0, 2)]
    assert blocks[(1, 1)] and blocks[(4, 0)]
    assert not any(blocks[(2, c)] for c in range(2)) and not blocks[(3, 0)] and not blocks[(5, 0)]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("estimate", [True, False], ids=["hz", "plain"])
def test_views(target, dtype, estimate):
    """Misaligned, strided, permuted and mixed-layout tensors are updated through their views."""
    device = device_of(target)
    sd = state_dtype(dtype)
    gen = torch.Generator().manual_seed(7)

    def rand(shape, dt, positive=False):
        x = torch.rand(shape, generator=gen, dtype=torch.float64) if positive else torch.randn(
            shape, generator=gen, dtype=torch.float64)
        return x.to(dt).to(device)

    bases = {}

    def view(kind, dt, positive=False):
        if kind == "misaligned":  # one element past a 16-byte boundary, odd length
            base = rand(4098, dt, positive)
            t = base[1:]
        elif kind == "strided":  # every other column
            base = rand((37, 66), dt, positive)
            t = base[:, ::2]
        elif kind == "transposed":
            base = rand((33, 65), dt, positive)
            t = base.t()
        else:  # "permuted": dense but not contiguous
            base = rand((5, 6, 7), dt, positive)
            t = base.permute(2, 0, 1)
        bases[id(t)] = (base, base.clone())
        return t

    # params and state share a layout in the first groups; the last mixes layouts, which forces
    # the copy-and-write-back path.
    layouts = [
        ("misaligned",) * 4,
        ("strided",) * 4,
        ("permuted",) * 4,
        ("transposed", "contiguous", "transposed", "contiguous"),
    ]
    params, grads, exp_avgs, exp_hz_sqs, hzs = [], [], [], [], []
    for pk, gk, mk, dk in layouts:
        p = view(pk, dtype)
        shape = p.shape

        def like(kind, dt, positive=False):
            if kind == "contiguous":
                return rand(shape, dt, positive)
            t = view(kind, dt, positive)
            assert t.shape == shape
            return t

        params.append(p)
        grads.append(like(gk, dtype))
        exp_avgs.append(like(mk, sd))
        exp_hz_sqs.append(like(dk, sd, positive=True))
        hzs.append(like(gk, dtype))
    h = hyper(3)
    step_hzs = hzs if estimate else None
    before = clone_lists(params, exp_avgs, exp_hz_sqs)
    call_target(target, params, grads, exp_avgs, exp_hz_sqs, step_hzs, h)
    assert_step_matches(before, (params, exp_avgs, exp_hz_sqs), grads, step_hzs, h, dtype)
    # Only the viewed elements of each base may change.
    for t in params + exp_avgs + exp_hz_sqs + grads + hzs:
        if id(t) not in bases:
            continue
        base, original = bases[id(t)]
        mask = torch.ones_like(base, dtype=torch.bool)
        if base.dim() == 1:
            mask[1:] = False
        elif base.shape == (37, 66):
            mask[:, ::2] = False
        else:
            mask[...] = False
        assert torch.equal(base[mask], original[mask]), "memory outside the view was written"


def valid_inputs(device, n=3):
    return make_tensors([5, 1, 9][:n], torch.float32, device, 11)


BAD_INPUTS = [
    ("grads", lambda L: L[1].pop(), r"esgd_update_h?z?_: grads has 2 tensors but params has 3"),
    ("exp_avgs", lambda L: L[2].pop(), r"exp_avgs has 2 tensors but params has 3"),
    ("hzs", lambda L: L[4].pop(), r"hzs has 2 tensors but params has 3"),
    ("state_dtype", lambda L: L[2].__setitem__(2, L[2][2].half()),
     r"exp_avgs\[2\] has dtype float16, expected float32"),
    ("hz_sq_dtype", lambda L: L[3].__setitem__(1, L[3][1].double()),
     r"exp_hz_sqs\[1\] has dtype float64, expected float32"),
    ("grad_dtype", lambda L: L[1].__setitem__(0, L[1][0].bfloat16()),
     r"grads\[0\] has dtype bfloat16, expected float32"),
    ("param_dtype", lambda L: L[0].__setitem__(2, L[0][2].double()),
     r"params\[2\] has dtype float64, expected float32 \(the dtype of params\[0\]\)"),
    ("int_params", lambda L: L[0].__setitem__(0, L[0][0].long()),
     r"params\[0\] has dtype int64, expected one of"),
    ("shape", lambda L: L[2].__setitem__(1, L[2][1].reshape(1, 1).expand(1, 2).contiguous()),
     r"exp_avgs\[1\] has shape \[1, 2\], expected \[1\] \(the shape of params\[1\]\)"),
    ("hz_shape", lambda L: L[4].__setitem__(2, L[4][2][:4]),
     r"hzs\[2\] has shape \[4\], expected \[9\]"),
    # One tensor passed as m and D (zeros.to(torch.float32) of float32 zeros is not a copy).
    ("state_aliased", lambda L: L[3].__setitem__(2, L[2][2]),
     r"exp_avgs\[2\] and exp_hz_sqs\[2\] are the same memory"),
    ("param_is_state", lambda L: L[2].__setitem__(0, L[0][0]),
     r"params\[0\] and its exp_avgs\[0\] are the same memory"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_rejected_before_any_write(device, case):
    _, corrupt, message = case
    lists = [list(x) for x in valid_inputs(device)]
    corrupt(lists)
    params, grads, exp_avgs, exp_hz_sqs, hzs = lists
    snapshot = clone_lists(params, exp_avgs, exp_hz_sqs)
    h = hyper(0)
    kwargs = {k: h[k] for k in ("beta1", "v", "eps", "weight_decay", "step_size",
                                "momentum_scale", "denom_scale")}
    with pytest.raises(RuntimeError, match=message):
        ops.esgd_update_hz_(params, grads, exp_avgs, exp_hz_sqs, hzs, beta2=h["beta2"], **kwargs)
    if not case[0].startswith("hz"):
        with pytest.raises(RuntimeError, match=message.replace("h?z?_", "")):
            ops.esgd_update_(params, grads, exp_avgs, exp_hz_sqs, **kwargs)
    for got, want in zip(params + exp_avgs + exp_hz_sqs, sum(snapshot, [])):
        assert torch.equal(got, want), "a rejected call changed its inputs"


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_mixed_devices_rejected():
    params, grads, exp_avgs, exp_hz_sqs, hzs = (list(x) for x in valid_inputs("cuda"))
    exp_avgs[1] = exp_avgs[1].cpu()
    snapshot = [p.clone() for p in params]
    with pytest.raises(RuntimeError, match=r"exp_avgs\[1\] is on cpu, expected cuda"):
        call(params, grads, exp_avgs, exp_hz_sqs, None, hyper(0), fused=True)
    assert all(torch.equal(a, b) for a, b in zip(params, snapshot))


def test_empty_lists_are_a_no_op():
    # The dispatcher cannot route a call without tensors, so the wrappers return early.
    h = hyper(0)
    kwargs = {k: v for k, v in h.items() if k != "beta2"}
    ops.esgd_update_([], [], [], [], **kwargs)
    ops.esgd_update_hz_([], [], [], [], [], beta2=h["beta2"], **kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(device, dtype):
    params, grads, exp_avgs, exp_hz_sqs, hzs = make_tensors([3, 0, 130], dtype, device, 5)
    h = hyper(1)
    kwargs = {k: v for k, v in h.items() if k != "beta2"}
    kwargs["grad_scale_inv"] = 0.25
    torch.library.opcheck(
        torch.ops.esgd_cuda.esgd_update_.default,
        (params, grads, exp_avgs, exp_hz_sqs),
        kwargs,
        test_utils=OPCHECK_UTILS,
    )
    torch.library.opcheck(
        torch.ops.esgd_cuda.esgd_update_hz_.default,
        (params, grads, exp_avgs, exp_hz_sqs, hzs),
        dict(kwargs, beta2=h["beta2"], hz_scale_inv=0.5),
        test_utils=OPCHECK_UTILS,
    )


@pytest.mark.skipif(
    not _extension.COMPILABLE,
    reason=f"torch {torch.__version__}: auto_functionalize does not support the ops' mutable Tensor[] arguments",
)
def test_torch_compile_fullgraph():
    h = hyper(2)

    def step(params, grads, exp_avgs, exp_hz_sqs, hzs):
        ops.esgd_update_hz_(params, grads, exp_avgs, exp_hz_sqs, hzs, **h)
        ops.esgd_update_(params, grads, exp_avgs, exp_hz_sqs,
                         **{k: v for k, v in h.items() if k != "beta2"})

    eager = make_tensors([5, 17], torch.float32, "cpu", 9)
    compiled = clone_lists(*eager)
    step(*eager)
    torch._dynamo.reset()
    torch.compile(step, fullgraph=True, backend="aot_eager")(*compiled)
    for a, b in zip(sum(eager, []), sum(compiled, [])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    "target, estimate",
    [
        # Emulated once: 21M elements take seconds on CPU, and the plain variant's smaller
        # tables are covered by test_planning.
        ("cuda-emulated", True),
        pytest.param("cuda", True, marks=CUDA_ONLY),
        pytest.param("cuda", False, marks=CUDA_ONLY),
    ],
    ids=["emulated-hz", "cuda-hz", "cuda-plain"],
)
def test_cuda_many_tensors_and_launch_boundaries(target, estimate):
    from esgd_cuda import _C

    chunk = _C.CHUNK_SIZE
    # More tensors than one launch's table, empty tensors in between and at the end, and one
    # tensor spanning more blocks than a launch holds.
    sizes = [(i * 977) % 3000 for i in range(90)]
    sizes[10:10] = [0, chunk - 1, chunk, chunk + 1, 0, 1, 3]
    sizes.append(chunk * _C.MAX_BLOCKS + 5)
    sizes += [0, 0]
    params, grads, exp_avgs, exp_hz_sqs, hzs = make_tensors(sizes, torch.float32, device_of(target), 13)
    h = hyper(4)
    step_hzs = hzs if estimate else None
    before = clone_lists(params, exp_avgs, exp_hz_sqs)
    call_target(target, params, grads, exp_avgs, exp_hz_sqs, step_hzs, h)
    assert_step_matches(before, (params, exp_avgs, exp_hz_sqs), grads, step_hzs, h, torch.float32)


# CUDA-only.


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_graph_capture_plain_step():
    params, grads, exp_avgs, exp_hz_sqs, _ = make_tensors([1000, 3, 70000], torch.float32, "cuda", 17)
    h = hyper(5)
    kwargs = {k: v for k, v in h.items() if k != "beta2"}
    expected = clone_lists(params, exp_avgs, exp_hz_sqs)
    ops.esgd_update_(expected[0], grads, expected[1], expected[2], **kwargs)
    ops.esgd_update_(expected[0], grads, expected[1], expected[2], **kwargs)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    snapshot = clone_lists(params, exp_avgs, exp_hz_sqs)
    with torch.cuda.stream(side):
        ops.esgd_update_(params, grads, exp_avgs, exp_hz_sqs, **kwargs)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(side)
    for dst, src in zip(params + exp_avgs, snapshot[0] + snapshot[1]):
        dst.copy_(src)
    with torch.cuda.graph(graph):
        ops.esgd_update_(params, grads, exp_avgs, exp_hz_sqs, **kwargs)
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(params + exp_avgs, expected[0] + expected[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_tensor_over_2_31_elements():
    n = 2**31 + 2 * 65536 + 5
    # fp16 params and grads (2 B each), fp32 exp_avgs and exp_hz_sqs (4 B each), plus headroom.
    need = n * (2 + 2 + 4 + 4) + (1 << 30)
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    p = torch.zeros(n, dtype=torch.float16, device="cuda")
    g = torch.zeros(n, dtype=torch.float16, device="cuda")
    m = torch.zeros(n, dtype=torch.float32, device="cuda")
    d = torch.ones(n, dtype=torch.float32, device="cuda")
    # Distinct values around the int32 boundary and at both ends, where a 32-bit offset would
    # wrap into the start of the tensor.
    probes = torch.tensor([0, 1, 2**31 - 2, 2**31 - 1, 2**31, 2**31 + 1, n - 65536, n - 1],
                          device="cuda")
    values = torch.linspace(-2, 2, len(probes), device="cuda")
    p[probes] = values.half()
    g[probes] = (values * 0.5 + 0.25).half()
    h = hyper(6)
    sel = lambda t: [t[probes].clone()]  # noqa: E731
    before = (sel(p), sel(m), sel(d))
    grads = sel(g)
    call([p], [g], [m], [d], None, h, fused=True)
    assert_step_matches(before, (sel(p), sel(m), sel(d)), grads, None, h, torch.float16)
    # Untouched zero elements stay zero: p*decay - lr*0/denom.
    assert int(torch.count_nonzero(p)) == int(torch.count_nonzero(p[probes]))
