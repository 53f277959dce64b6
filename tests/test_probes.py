"""Counter-based Rademacher probes and the finite-difference perturbation (esgd_cuda.probes).

Every implementation of the probe bits (the pure-PyTorch twin, the fused CPU kernel, the CUDA kernel
and its CPU emulation) is checked against `reference_bits`, plain Python integers written from the
definition, and the perturbation against a float64 reference built on those bits.
"""

import pytest
import torch

from esgd_cuda import _extension, probes

MASK64 = (1 << 64) - 1
HAS_NATIVE = _extension.LOADED
NATIVE_ONLY = pytest.mark.skipif(not HAS_NATIVE, reason=f"native kernels not loaded ({_extension.LOAD_ERROR})")
HAS_CUDA = torch.cuda.is_available() and _extension.fused_supported(torch.device("cuda"), torch.float32)
CUDA_ONLY = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
# "foreach" is the pure-PyTorch twin on CPU, "foreach-cuda" on the GPU (int64 tensor ops there).
TARGETS = [
    "foreach",
    pytest.param("cpu", marks=NATIVE_ONLY),
    pytest.param("cuda-emulated", marks=NATIVE_ONLY),
    pytest.param("cuda", marks=CUDA_ONLY),
    pytest.param("foreach-cuda", marks=CUDA_ONLY),
]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SIZES = [0, 1, 3, 63, 64, 65, 4097, 65537]


def mix64(x):
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & MASK64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def reference_bits(key, offset, n):
    """Bit j of the probe (1 means -1) for j in [offset, offset + n), from the definition."""
    out, cache = [], {}
    for j in range(offset, offset + n):
        w = j >> 6
        if w not in cache:
            cache[w] = mix64((key + (w + 1) * 0x9E3779B97F4A7C15) & MASK64)
        out.append((cache[w] >> (j & 63)) & 1)
    return out


def reference_probe(key, offset, shape, dtype=torch.float64):
    n = int(torch.Size(shape).numel())
    bits = torch.tensor(reference_bits(key, offset, n), dtype=torch.float64)
    return (1.0 - 2.0 * bits).reshape(shape).to(dtype)


def device_of(target):
    return "cuda" if target in ("cuda", "foreach-cuda") else "cpu"


def run_rademacher(target, tensors, keys, offsets):
    if target == "cuda-emulated":
        from esgd_cuda import _C

        return _C.emulate_cuda_rademacher(tensors, keys, offsets)
    probes.rademacher_(tensors, keys, offsets, fused=not target.startswith("foreach"))
    return None


def run_perturb(target, params, backups, scale, keys, offsets, sign, save):
    if target == "cuda-emulated":
        from esgd_cuda import _C

        return _C.emulate_cuda_fd_perturb(params, backups, scale, keys, offsets, sign=sign, save=save)
    probes.fd_perturb_(params, backups, scale, keys, offsets, sign=sign, save=save,
                       fused=not target.startswith("foreach"))
    return None


KEYS = [0, 1, 0x5DEECE66D, (1 << 63) - 1, probes.probe_key(7, 3, 1)]


# ------------------------------------------------------------------------------------------ keys


def test_probe_key_is_splitmix64():
    """probe_key mixes its values like the optimizer's seed derivation, into [0, 2**63)."""

    def splitmix(*values):
        x = 0
        for value in values:
            x = ((x ^ (value & MASK64)) + 0x9E3779B97F4A7C15) & MASK64
            x = mix64(x)
        return x >> 1

    for values in [(), (0,), (1,), (123, 4, 5, 6), (-1, 2**70), (2**63 - 1, 0)]:
        assert probes.probe_key(*values) == splitmix(*values)
        assert 0 <= probes.probe_key(*values) < 2**63
    assert probes.probe_key(1, 2) != probes.probe_key(2, 1)
    # The first value's known splitmix64 output (state 0 -> 0xE220A8397B1DCDAF), halved.
    assert probes.probe_key(0) == 0xE220A8397B1DCDAF >> 1


def test_reference_words_are_splitmix64():
    """word(K, w) is the splitmix64 sequence seeded with K: its first outputs for seed 0 are known."""
    bits = reference_bits(0, 0, 128)
    words = [sum(b << i for i, b in enumerate(bits[k * 64:(k + 1) * 64])) for k in range(2)]
    assert words == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]


# ------------------------------------------------------------------------------------------ bits


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rademacher_matches_reference(target, dtype):
    device = device_of(target)
    keys = [KEYS[i % len(KEYS)] for i in range(len(SIZES))]
    offsets = [0, 5, 64, 63, 1 << 40, (1 << 62) + 17, 123457, 1]
    tensors = [torch.full((n,), 7.0, dtype=dtype, device=device) for n in SIZES]
    run_rademacher(target, tensors, keys, offsets)
    for t, n, key, offset in zip(tensors, SIZES, keys, offsets):
        assert t.dtype == dtype and t.shape == (n,)
        expected = reference_probe(key, offset, (n,), dtype)
        assert torch.equal(t.cpu(), expected), f"size {n}, key {key}, offset {offset}"


@pytest.mark.parametrize("target", TARGETS)
def test_offset_draws_the_matching_slice(target):
    """A shard [a, b) drawn with offset o + a equals elements [a, b) of the full draw with offset o."""
    device = device_of(target)
    n, key, o = 70001, KEYS[4], 1000
    full = torch.empty(n, device=device)
    run_rademacher(target, [full], [key], [o])
    cuts = [0, 1, 63, 64, 65, 4097, 65536, 65600, n]
    shards = [torch.empty(b - a, device=device) for a, b in zip(cuts, cuts[1:])]
    run_rademacher(target, shards, [key] * len(shards), [o + a for a in cuts[:-1]])
    assert torch.equal(torch.cat(shards), full)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_rademacher_non_contiguous_uses_logical_index(target, dtype):
    device = device_of(target)
    base = torch.zeros(33, 70, dtype=dtype, device=device)
    views = [base[:, ::2], base.t()[3:, :], torch.zeros(4, 5, 6, dtype=dtype, device=device).permute(2, 0, 1),
             torch.zeros(4098, dtype=dtype, device=device)[1:]]
    keys, offsets = [KEYS[1], KEYS[2], KEYS[3], KEYS[4]], [3, 0, 64, 9]
    untouched = base[:, 1::2].clone()
    run_rademacher(target, views[:1], keys[:1], offsets[:1])
    assert torch.equal(base[:, 1::2], untouched), "memory outside the view was written"
    run_rademacher(target, views[2:], keys[2:], offsets[2:])
    for v, key, offset in zip(views[:1] + views[2:], keys[:1] + keys[2:], offsets[:1] + offsets[2:]):
        assert torch.equal(v.cpu(), reference_probe(key, offset, v.shape, dtype))
    run_rademacher(target, views[1:2], keys[1:2], offsets[1:2])
    assert torch.equal(views[1].cpu(), reference_probe(keys[1], offsets[1], views[1].shape, dtype))


@pytest.mark.parametrize("target", TARGETS)
def test_rademacher_balance(target):
    """About half of 1M entries are +1, every bit position of the words is used, and neighbours are
    uncorrelated: an all-equal draw, a stuck bit or a repeated word fails."""
    device = device_of(target)
    n = 1 << 20
    t = torch.empty(n, device=device)
    run_rademacher(target, [t], [KEYS[4]], [0])
    t = t.cpu().double()
    assert set(t.unique().tolist()) == {-1.0, 1.0}
    # The count of +1 is Binomial(n, 1/2): sd = 512; 6 sd.
    assert abs(float((t > 0).sum()) - n / 2) < 6 * 512
    lanes = (t.reshape(-1, 64) > 0).double().mean(0)  # each bit position over 16384 words
    assert float((lanes - 0.5).abs().max()) < 6 * 0.5 / 128
    assert abs(float((t[1:] * t[:-1]).mean())) < 6 / 1024
    words = t.reshape(-1, 64)
    assert not torch.equal(words[0], words[1]) and not torch.equal(words[0], words[-1])


def test_different_keys_give_independent_probes():
    a, b = torch.empty(1 << 16), torch.empty(1 << 16)
    probes.rademacher_([a, b], [KEYS[1], KEYS[1] + 1], [0, 0], fused=False)
    assert abs(float((a * b).mean())) < 6 / 256


# ------------------------------------------------------------------------------------------ perturb


def _overlapping(a):
    base = torch.full((8,), 3.0)
    a["params"][0], a["backups"][0] = base[:5], base[3:]


def perturb_reference(x, key, offset, h, sign, dtype):
    """P(S(x) + S(sign*h) * z) with S the math dtype, via float64 for the sum's exact value."""
    math_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    step = torch.tensor(sign * h, dtype=torch.float64).to(math_dtype)
    z = reference_probe(key, offset, x.shape, math_dtype)
    return (x.cpu().to(math_dtype) + z * step).to(dtype)


def scale_tensor(h, device):
    return torch.tensor(h, dtype=torch.float64, device=device)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sign", [1.0, -1.0, -0.5])
def test_perturb_save_and_restore(target, dtype, sign):
    device = device_of(target)
    gen = torch.Generator().manual_seed(3)
    h = 1e-3 * (1 + float(torch.rand((), generator=gen, dtype=torch.float64)))
    params = [torch.randn(n, generator=gen, dtype=torch.float64).to(dtype).to(device) for n in SIZES]
    originals = [p.clone() for p in params]
    backups = [torch.full_like(p, 5.0) for p in params]
    keys = [KEYS[(i + 2) % len(KEYS)] for i in range(len(SIZES))]
    offsets = [7 * i + (1 << 33) * (i % 2) for i in range(len(SIZES))]
    scale = scale_tensor(h, device)

    run_perturb(target, params, backups, scale, keys, offsets, sign, save=True)
    for i, (p, b, x) in enumerate(zip(params, backups, originals)):
        assert torch.equal(b, x), f"backups[{i}] must hold the parameter before the move"
        assert torch.equal(p.cpu(), perturb_reference(x, keys[i], offsets[i], h, sign, dtype)), f"params[{i}]"

    # From the backups: +h then -h (a central difference), the backups unchanged.
    run_perturb(target, params, backups, scale, keys, offsets, -sign, save=False)
    for i, (p, b, x) in enumerate(zip(params, backups, originals)):
        assert torch.equal(b, x), f"backups[{i}] changed on a restore"
        assert torch.equal(p.cpu(), perturb_reference(x, keys[i], offsets[i], h, -sign, dtype)), f"params[{i}]"


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_perturb_matches_twin_and_step_is_exact(target, dtype):
    """Bit-identical to the twin; for float32/float64 params the move is exactly +-S(h) wherever the
    sum is exact (values and h on a coarse binary grid)."""
    device = device_of(target)
    gen = torch.Generator().manual_seed(5)
    params = [(torch.randint(-64, 64, (n,), generator=gen) / 8.0).to(dtype).to(device) for n in [1, 3, 4097, 65537]]
    twin = [p.clone() for p in params]
    backups = [torch.empty_like(p) for p in params]
    twin_backups = [torch.empty_like(p) for p in params]
    keys, offsets = KEYS[:4], [0, 1, 2, 3]
    scale = scale_tensor(0.25, device)
    run_perturb(target, params, backups, scale, keys, offsets, 1.0, save=True)
    probes.fd_perturb_(twin, twin_backups, scale, keys, offsets, sign=1.0, save=True, fused=False)
    for p, t, b, key, offset in zip(params, twin, backups, keys, offsets):
        assert torch.equal(p, t)
        z = reference_probe(key, offset, p.shape)
        assert torch.equal((p.double() - b.double()).cpu(), 0.25 * z)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_perturb_views(target, dtype):
    """Misaligned, strided and transposed params and backups, perturbed through their views."""
    device = device_of(target)
    gen = torch.Generator().manual_seed(9)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device)

    pbase, bbase = rand(4099), rand(33, 130)
    params = [pbase[1:], rand(33, 65).t(), rand(5, 6, 7).permute(2, 0, 1), rand(66, 37)]
    backups = [rand(4098), bbase[:, ::2].t(), rand(7, 5, 6), rand(67, 37)[1:]]
    assert [p.shape for p in params] == [b.shape for b in backups]
    originals = [p.clone() for p in params]
    pbase_first, bbase_odd = pbase[0].clone(), bbase[:, 1::2].clone()
    keys, offsets = KEYS[1:5], [0, 3, 64, 1 << 20]
    h, scale = 2.0**-7, scale_tensor(2.0**-7, device)
    run_perturb(target, params, backups, scale, keys, offsets, -1.0, save=True)
    for i, (p, b, x) in enumerate(zip(params, backups, originals)):
        assert torch.equal(b, x), f"backups[{i}]"
        assert torch.equal(p.cpu(), perturb_reference(x, keys[i], offsets[i], h, -1.0, dtype)), f"params[{i}]"
    assert torch.equal(pbase[0], pbase_first) and torch.equal(bbase[:, 1::2], bbase_odd)
    run_perturb(target, params, backups, scale, keys, offsets, 1.0, save=False)
    for i, (p, x) in enumerate(zip(params, originals)):
        assert torch.equal(p.cpu(), perturb_reference(x, keys[i], offsets[i], h, 1.0, dtype)), f"params[{i}]"


@pytest.mark.parametrize("target", TARGETS)
def test_perturb_scale_is_read_on_the_device(target):
    """h comes from the tensor when the op runs: a later in-place change of `scale` is seen."""
    device = device_of(target)
    p = torch.zeros(100, device=device)
    b = torch.empty_like(p)
    scale = scale_tensor(1.0, device)
    scale.fill_(0.5)
    run_perturb(target, [p], [b], scale, [KEYS[0]], [0], 1.0, save=True)
    assert torch.equal(p.cpu(), 0.5 * reference_probe(KEYS[0], 0, (100,), torch.float32))


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=NATIVE_ONLY)])
@pytest.mark.parametrize("case", [
    (lambda a: a.update(keys=a["keys"][:1]), ValueError, r"keys has 1 entries but there are 2 tensors"),
    (lambda a: a.update(offsets=[0, -1]), ValueError, r"offsets\[1\] = -1 is outside \[0, 2\*\*63\)"),
    (lambda a: a.update(keys=[2**63, 0]), ValueError, r"keys\[0\] = 9223372036854775808 is outside"),
    (lambda a: a.update(offsets=[0, 2**63 - 2]), ValueError, r"offsets\[1\] \+ tensors\[1\].numel\(\)"),
    (lambda a: a.update(keys=[0, 1.5]), TypeError, r"keys\[1\] must be an int"),
    (lambda a: a["tensors"].__setitem__(1, torch.full((3,), 3, dtype=torch.int32)), TypeError,
     r"tensors\[1\] has dtype torch.int32"),
], ids=["keys_len", "neg_offset", "big_key", "offset_overflow", "float_key", "int_tensor"])
def test_rademacher_bad_input(fused, case):
    corrupt, exc, message = case
    args = dict(tensors=[torch.full((5,), 3.0), torch.full((3,), 3.0)], keys=[1, 2], offsets=[0, 0])
    corrupt(args)
    with pytest.raises(exc, match=message):
        probes.rademacher_(args["tensors"], args["keys"], args["offsets"], fused=fused)
    assert all(bool((t == 3).all()) for t in args["tensors"])


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=NATIVE_ONLY)])
@pytest.mark.parametrize("case", [
    (lambda a: a.update(backups=a["backups"][:1]), ValueError, r"backups has 1 tensors but params has 2"),
    (lambda a: a.update(scale=a["scale"].float()), TypeError, r"scale has dtype torch.float32"),
    (lambda a: a.update(scale=torch.zeros(2, dtype=torch.float64)), ValueError, r"scale has 2 elements"),
    (lambda a: a["backups"].__setitem__(1, a["backups"][1].double()), ValueError,
     r"backups\[1\] is torch.float64 \[3\] on cpu, expected torch.float32 \[3\]"),
    (lambda a: a["backups"].__setitem__(0, a["backups"][0][:4]), ValueError, r"backups\[0\] is torch.float32 \[4\]"),
    (lambda a: a.update(offsets=[-3, 0]), ValueError, r"offsets\[0\] = -3"),
    (lambda a: a["params"].__setitem__(1, a["params"][1].half()), ValueError, r"backups\[1\] is torch.float32"),
    (lambda a: a["backups"].__setitem__(1, a["params"][1]), ValueError, r"backups\[1\] shares memory with params\[1\]"),
    (lambda a: _overlapping(a), ValueError, r"backups\[0\] shares memory with params\[0\]"),
], ids=["backups_len", "scale_dtype", "scale_numel", "backup_dtype", "backup_shape", "neg_offset", "param_dtype",
        "alias", "overlap"])
def test_perturb_bad_input(fused, case):
    corrupt, exc, message = case
    args = dict(params=[torch.full((5,), 3.0), torch.full((3,), 3.0)],
                backups=[torch.zeros(5), torch.zeros(3)], scale=torch.tensor(0.1, dtype=torch.float64),
                keys=[1, 2], offsets=[0, 0])
    fresh_backups = list(args["backups"])
    corrupt(args)
    with pytest.raises(exc, match=message):
        probes.fd_perturb_(args["params"], args["backups"], args["scale"], args["keys"], args["offsets"],
                           sign=1.0, save=True, fused=fused)
    assert all(bool((t == 3).all()) for t in args["params"])
    assert all(bool((t == 0).all()) for t in fresh_backups)


@pytest.mark.parametrize("case", [
    (lambda a: a.update(keys=[1, -2]), r"esgd_rademacher_: keys\[1\] = -2 is negative"),
    (lambda a: a.update(offsets=[-1, 0]), r"esgd_rademacher_: offsets\[0\] = -1 is negative"),
    (lambda a: a.update(offsets=[0]), r"esgd_rademacher_: offsets has 1 entries but out has 2 tensors"),
    (lambda a: a.update(offsets=[0, 2**63 - 2]), r"offsets\[1\] \+ out\[1\].numel\(\) exceeds"),
    (lambda a: a["out"].__setitem__(1, torch.full((3,), 3, dtype=torch.int64)),
     r"esgd_rademacher_: out\[1\] has dtype int64, expected one of"),
], ids=["neg_key", "neg_offset", "offsets_len", "overflow", "int_out"])
@NATIVE_ONLY
def test_native_rademacher_errors_name_the_argument(case):
    """The op's own checks (probes.rademacher_ checks first, so they are reached only directly)."""
    from esgd_cuda import ops

    corrupt, message = case
    args = dict(out=[torch.full((5,), 3.0), torch.full((3,), 3.0)], keys=[1, 2], offsets=[0, 0])
    corrupt(args)
    with pytest.raises(RuntimeError, match=message):
        ops.esgd_rademacher_(args["out"], args["keys"], args["offsets"])
    assert all(bool((t == 3).all()) for t in args["out"])


@pytest.mark.parametrize("case", [
    (lambda a: a["backups"].__setitem__(0, torch.zeros(4)), r"backups\[0\] has shape \[4\], expected \[5\]"),
    (lambda a: a["backups"].__setitem__(1, a["params"][1]), r"backups\[1\] shares memory with params\[1\]"),
    (_overlapping, r"backups\[0\] shares memory with params\[0\]"),
    (lambda a: a["backups"].__setitem__(0, torch.zeros(5, dtype=torch.float16)),
     r"backups\[0\] has dtype float16, expected float32 \(the dtype of params\[0\]\)"),
    (lambda a: a.update(scale=torch.tensor(0.1)), r"esgd_fd_perturb_: scale has dtype float32, expected float64"),
    (lambda a: a.update(scale=torch.zeros(1, 2, dtype=torch.float64)), r"scale has 2 elements, expected 1"),
    (lambda a: a.update(keys=[-5, 0]), r"keys\[0\] = -5 is negative"),
    (lambda a: a["backups"].pop(), r"esgd_fd_perturb_: backups has 1 tensors but params has 2"),
], ids=["shape", "same_tensor", "overlap", "dtype", "scale_dtype", "scale_numel", "neg_key", "backups_len"])
@NATIVE_ONLY
def test_native_perturb_errors_name_the_argument(case):
    from esgd_cuda import ops

    corrupt, message = case
    args = dict(params=[torch.full((5,), 3.0), torch.full((3,), 3.0)],
                backups=[torch.zeros(5), torch.zeros(3)], scale=torch.tensor(0.1, dtype=torch.float64),
                keys=[1, 2], offsets=[0, 0])
    corrupt(args)
    with pytest.raises(RuntimeError, match=message):
        ops.esgd_fd_perturb_(args["params"], args["backups"], args["scale"], args["keys"], args["offsets"],
                             sign=1.0, save=True)
    assert all(bool((t == 3).all()) for t in args["params"])


@NATIVE_ONLY
@pytest.mark.parametrize("target", ["cpu", "cuda-emulated", pytest.param("cuda", marks=CUDA_ONLY)])
def test_mixed_dtypes_in_one_call(target):
    """The native ops run each dtype of a list separately; every tensor still gets its own probe."""
    device = device_of(target)
    dtypes = [torch.float16, torch.float32, torch.bfloat16, torch.float64, torch.float32]
    sizes = [70001, 3, 4097, 65, 0]
    keys, offsets = KEYS, [0, 9, 64, 1 << 50, 3]
    out = [torch.zeros(n, dtype=dt, device=device) for n, dt in zip(sizes, dtypes)]
    run_rademacher(target, out, keys, offsets)
    for t, key, offset in zip(out, keys, offsets):
        assert torch.equal(t.cpu(), reference_probe(key, offset, t.shape, t.dtype))
    params = [torch.randn(n, dtype=torch.float64).to(dt).to(device) for n, dt in zip(sizes, dtypes)]
    originals = [p.clone() for p in params]
    backups = [torch.empty_like(p) for p in params]
    run_perturb(target, params, backups, scale_tensor(0.01, device), keys, offsets, -1.0, save=True)
    for p, x, key, offset in zip(params, originals, keys, offsets):
        assert torch.equal(p.cpu(), perturb_reference(x, key, offset, 0.01, -1.0, p.dtype))


@NATIVE_ONLY
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["rademacher", "perturb-save", "perturb-restore"])
def test_cuda_probe_vector_path_choice(dtype, op):
    """Which blocks of the CUDA probe kernels take the 16-byte vector path, through the emulation:
    exactly those whose lists are all aligned to 16 bytes and whose chunk is whole vectors."""
    from esgd_cuda import _C

    chunk = _C.CHUNK_SIZE
    width = 16 // torch.empty((), dtype=dtype).element_size()
    # (numel, element offset of the params/out view, element offset of the backups view)
    layouts = [
        (2 * chunk + 3, 0, 0),  # two aligned chunks, then a 3-element tail: scalar
        (chunk + width, 0, 0),  # a tail of exactly one vector: vector
        (chunk + 2 * width, 1, 0),  # params one element off: scalar throughout
        (chunk, 0, width // 2),  # backups half a vector off: scalar (perturb only)
        (chunk, width, width),  # both one whole vector off, still aligned: vector
        (width - 1, 0, 0),  # shorter than a vector: scalar
    ]
    params = [torch.randn(n + po, dtype=torch.float64).to(dtype)[po:] for n, po, _ in layouts]
    backups = [torch.randn(n + bo, dtype=torch.float64).to(dtype)[bo:] for n, _, bo in layouts]
    keys, offsets = [KEYS[i % len(KEYS)] for i in range(len(layouts))], [5 * i for i in range(len(layouts))]
    originals = [p.clone() for p in params]
    sources = originals if op != "perturb-restore" else [b.clone() for b in backups]
    if op == "rademacher":
        rows = run_rademacher("cuda-emulated", params, keys, offsets)
        lists = [params]
        for p, key, offset in zip(params, keys, offsets):
            assert torch.equal(p, reference_probe(key, offset, p.shape, dtype))
    else:
        save = op == "perturb-save"
        rows = run_perturb("cuda-emulated", params, backups, scale_tensor(0.5, "cpu"), keys, offsets, 1.0, save)
        lists = [params, backups]
        for p, x, key, offset in zip(params, sources, keys, offsets):
            assert torch.equal(p, perturb_reference(x, key, offset, 0.5, 1.0, dtype))
    blocks = {(t, c): bool(v) for t, c, v in rows}
    assert len(blocks) == len(rows), "a chunk was processed twice"
    assert set(blocks) == {(t, c) for t, (n, _, _) in enumerate(layouts) for c in range(-(-n // chunk))}
    for (t, c), vectorized in blocks.items():
        n = min(chunk, layouts[t][0] - c * chunk)
        aligned = all((x[t].data_ptr() + c * chunk * x[t].element_size()) % 16 == 0 for x in lists)
        assert vectorized == (aligned and n % width == 0), f"tensor {t} chunk {c}"
    assert blocks[(0, 0)] and blocks[(0, 1)] and not blocks[(0, 2)]
    assert blocks[(1, 1)] and blocks[(4, 0)]
    assert not any(blocks[(2, c)] for c in range(2)) and not blocks[(5, 0)]
    assert blocks[(3, 0)] == (op == "rademacher")


@NATIVE_ONLY
@pytest.mark.parametrize("target", ["cuda-emulated", pytest.param("cuda", marks=CUDA_ONLY)])
def test_probe_launch_boundaries(target):
    """More tensors than one launch's table, empty tensors between and at the end, and one tensor
    spanning more blocks than a launch holds: every element gets its own bit."""
    from esgd_cuda import _C

    device = device_of(target)
    chunk = _C.CHUNK_SIZE
    sizes = [(i * 977) % 3000 for i in range(_C.MAX_TENSORS_PROBE + 20)]
    sizes[10:10] = [0, chunk - 1, chunk, chunk + 1, 0, 1, 3]
    sizes.append(chunk * _C.MAX_BLOCKS + 5)
    sizes += [0, 0]
    keys = [probes.probe_key(9, i) for i in range(len(sizes))]
    offsets = [(i * 37) % 200 for i in range(len(sizes))]
    out = [torch.empty(n, dtype=torch.float16, device=device) for n in sizes]
    run_rademacher(target, out, keys, offsets)
    twin = [torch.empty_like(t) for t in out]
    probes.rademacher_(twin, keys, offsets, fused=False)
    for i, (a, b) in enumerate(zip(out, twin)):
        assert torch.equal(a, b), f"tensor {i} of {sizes[i]} elements"
    for i in (11, 12, 13, len(sizes) - 3):
        assert torch.equal(out[i].cpu(), reference_probe(keys[i], offsets[i], out[i].shape, torch.float16))
    params = [torch.zeros(n, dtype=torch.float16, device=device) for n in sizes]
    backups = [torch.empty_like(p) for p in params]
    run_perturb(target, params, backups, scale_tensor(1.0, device), keys, offsets, 1.0, save=True)
    for i, (p, z) in enumerate(zip(params, out)):
        assert torch.equal(p, z), f"tensor {i}"


OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor") + (
    ("test_aot_dispatch_dynamic",) if _extension.COMPILABLE else ()
)


@NATIVE_ONLY
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA_ONLY)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(device, dtype):
    out = [torch.empty(n, dtype=dtype, device=device) for n in (3, 0, 130)]
    torch.library.opcheck(torch.ops.esgd_cuda.esgd_rademacher_.default, (out, [1, 2, 3], [0, 4, 64]),
                          test_utils=OPCHECK_UTILS)
    params = [torch.randn(n, device=device).to(dtype) for n in (3, 0, 130)]
    backups = [torch.empty_like(p) for p in params]
    scale = scale_tensor(0.01, device)
    for save in (True, False):
        torch.library.opcheck(torch.ops.esgd_cuda.esgd_fd_perturb_.default,
                              (params, backups, scale, [1, 2, 3], [0, 4, 64]), dict(sign=-1.0, save=save),
                              test_utils=OPCHECK_UTILS)


@NATIVE_ONLY
@pytest.mark.skipif(not _extension.COMPILABLE, reason=f"torch {torch.__version__} cannot compile the ops")
def test_torch_compile_fullgraph():
    from esgd_cuda import ops

    def perturb(params, backups, out, scale):
        ops.esgd_fd_perturb_(params, backups, scale, [3, 4], [0, 7], sign=1.0, save=True)
        ops.esgd_rademacher_(out, [3, 4], [0, 7])

    def fresh():
        params = [torch.arange(5.0), torch.ones(2, 3)]
        return params, [torch.empty_like(p) for p in params], [torch.empty(5), torch.empty(2, 3)]

    eager, compiled = fresh(), fresh()
    scale = scale_tensor(0.125, "cpu")
    perturb(*eager, scale)
    torch._dynamo.reset()
    torch.compile(perturb, fullgraph=True, backend="aot_eager")(*compiled, scale)
    for a, b in zip(sum(eager, []), sum(compiled, [])):
        assert torch.equal(a, b)


@CUDA_ONLY
def test_cuda_probes_capture_and_no_sync():
    """Both ops read h on the device: no host sync, and a captured graph replays with a new h."""
    params = [torch.randn(n, device="cuda") for n in (1000, 3, 70000)]
    originals = [p.clone() for p in params]
    backups = [torch.empty_like(p) for p in params]
    out = [torch.empty_like(p) for p in params]
    keys, offsets = [5, 6, 7], [0, 1, 2]
    scale = scale_tensor(0.5, "cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        probes.fd_perturb_(params, backups, scale, keys, offsets, sign=1.0, save=True, fused=True)
        probes.rademacher_(out, keys, offsets, fused=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        probes.fd_perturb_(params, backups, scale, keys, offsets, sign=-1.0, save=False, fused=True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        probes.fd_perturb_(params, backups, scale, keys, offsets, sign=-1.0, save=False, fused=True)
    scale.fill_(0.25)
    graph.replay()
    torch.cuda.synchronize()
    for p, x, z in zip(params, originals, out):
        assert torch.equal(p, x - 0.25 * z)
