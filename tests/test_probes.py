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
], ids=["backups_len", "scale_dtype", "scale_numel", "backup_dtype", "backup_shape", "neg_offset", "param_dtype"])
def test_perturb_bad_input(fused, case):
    corrupt, exc, message = case
    args = dict(params=[torch.full((5,), 3.0), torch.full((3,), 3.0)],
                backups=[torch.zeros(5), torch.zeros(3)], scale=torch.tensor(0.1, dtype=torch.float64),
                keys=[1, 2], offsets=[0, 0])
    corrupt(args)
    with pytest.raises(exc, match=message):
        probes.fd_perturb_(args["params"], args["backups"], args["scale"], args["keys"], args["offsets"],
                           sign=1.0, save=True, fused=fused)
    assert all(bool((t == 3).all()) for t in args["params"])
    assert all(bool((t == 0).all()) for t in args["backups"] if t.dtype == torch.float32 and t.numel() != 4)
