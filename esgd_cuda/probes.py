"""Counter-based Rademacher probes and the finite-difference perturbation of parameters.

A probe element is a pure function of a 63-bit key and the element's index, so any device, any shard
and any replay draws the same bits without an RNG state:

    mix64(x)   = splitmix64's finalizer (x ^= x >> 30; x *= 0xBF58476D1CE4E5B9; x ^= x >> 27;
                 x *= 0x94D049BB133111EB; x ^= x >> 31), on uint64 modulo 2**64
    word(K, w) = mix64(K + (w + 1) * 0x9E3779B97F4A7C15)
    z(K, j)    = -1 if bit (j & 63) of word(K, j >> 6) is set, else +1

Element i (row-major logical index) of tensors[t] gets z(keys[t], offsets[t] + i), so a shard that
starts at element `o` of a parameter draws exactly its slice of the full parameter's probe by passing
offset `o`. `fused=True` runs the native ops (`esgd_cuda.ops`), which generate the bits inside the
kernels; `fused=False` is the pure-PyTorch twin, bit-identical on every device.

The stochastic rounding of bfloat16 optimizer state draws its bits the same way (csrc/rounding.h;
the twin is below): parameter number `ordinal` of an optimizer with probe seed `seed` has the base
key B = rounding_key(seed, ordinal); on its t-th step, element j (its index in the whole parameter:
a shard adds its offset) rounds with

    K          = word(B, t)                                    (the probe word formula above)
    bits(K, j) = lowbias32(((j mod 2**32) ^ lo32(K)) + ((j >> 32) ^ hi32(K)) * 0x9E3779B9)
    lowbias32(x): x ^= x >> 16; x *= 0x21F0AAAD; x ^= x >> 15; x *= 0xD35A2D97; x ^= x >> 15  (mod 2**32)

m with the low 16 bits and D with the high 16: x rounds away from zero where the discarded low
16 bits of its float32 encoding plus the random 16 bits carry into the kept ones.
"""

import functools
from typing import List, Sequence, Union

import torch
from torch import Tensor

from .functional import _check_device_scalar, state_dtype

__all__ = ["probe_key", "rademacher_", "fd_perturb_", "rounding_key", "round_bf16_stochastic"]

_MASK64 = (1 << 64) - 1
_KEY_LIMIT = 1 << 63
_SUPPORTED = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _int64(value: int) -> int:
    """A uint64 constant as the int64 with the same bits (tensor ops wrap modulo 2**64)."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _int64(0x9E3779B97F4A7C15)
_MUL1 = _int64(0xBF58476D1CE4E5B9)
_MUL2 = _int64(0x94D049BB133111EB)


def probe_key(*values: int) -> int:
    """splitmix64 over the values: nearby inputs (consecutive steps) give unrelated keys in [0, 2**63)."""
    x = 0
    for value in values:
        x = ((x ^ (value & _MASK64)) + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x >> 1


# Distinguishes the rounding keys from the probes' (probe_key(seed, step, i) takes three values).
ROUNDING_STREAM = 0x726F756E64  # "round"
_MASK32 = (1 << 32) - 1
_ROUND_GOLDEN = 0x9E3779B9


@functools.lru_cache(maxsize=1 << 16)
def rounding_key(seed: int, ordinal: int) -> int:
    """The base key B of parameter number `ordinal` (its position in the optimizer's param groups)
    for the stochastic rounding of its bfloat16 state, in [0, 2**63). Cached: the optimizer asks
    for every parameter's on every step."""
    return probe_key(seed, ordinal, ROUNDING_STREAM, 0)


def _mix64_int(x: int) -> int:
    x &= _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_key(base: int, step: Union[int, Tensor]) -> Union[int, Tensor]:
    """K = word(B, t): a step's rounding key, a Python int, or an int64 tensor (its bits) for a
    device step count (capturable mode: nothing syncs)."""
    if isinstance(step, Tensor):
        t = step.reshape(()).to(torch.int64)
        return _mix64((t + 1) * _GOLDEN + _int64(base))
    return _mix64_int(base + (int(step) + 1) * 0x9E3779B97F4A7C15)


def _lowbias32(x: Tensor) -> Tensor:
    """On int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0xD35A2D97) & _MASK32
    return x ^ (x >> 15)


def _dense_positions(t: Tensor) -> Tensor:
    """Each element's position in `t`'s memory order when its layout is non-overlapping and dense (the
    order the fused kernels walk it in), else its row-major index; int64, shaped like t."""
    n = t.numel()
    index = torch.arange(n, dtype=torch.int64, device=t.device)
    dims = sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return index.view(t.shape)
        expected *= size
    return index.as_strided(t.shape, t.stride())


def rounding_bits(key: Union[int, Tensor], offset: int, like: Tensor) -> Tensor:
    """bits(K, offset + position) for every element of `like` (int64 holding uint32), K a step key
    (`step_key`)."""
    if isinstance(key, Tensor):
        low, high = key & _MASK32, _shr(key, 32)
    else:
        low, high = key & _MASK32, key >> 32
    j = _dense_positions(like) + offset
    x = ((j & _MASK32) ^ low) + (((j >> 32) ^ high) * _ROUND_GOLDEN)
    return _lowbias32(x & _MASK32)


def round_bf16_stochastic(x: Tensor, r16: Tensor) -> Tensor:
    """float32 `x` rounded to bfloat16, away from zero where x's discarded 16 bits plus `r16` (int64,
    values < 2**16) carry into the kept ones; NaN stays NaN. The twin of csrc/rounding.h."""
    u = x.contiguous().view(torch.int32).to(torch.int64) & _MASK32
    rounded = (u + r16) >> 16
    nan = (u >> 16) | 0x40
    bits = torch.where((u & 0x7FFFFFFF) > 0x7F800000, nan, rounded) & 0xFFFF
    return ((bits ^ 0x8000) - 0x8000).to(torch.int16).view(torch.bfloat16).view(x.shape)


def _shr(x: Tensor, shift: int) -> Tensor:
    # int64 `>>` is arithmetic; the mask clears the copies of the sign bit it shifts in.
    return (x >> shift) & ((1 << (64 - shift)) - 1)


def _mix64(x: Tensor) -> Tensor:
    x = x ^ _shr(x, 30)
    x = x * _MUL1
    x = x ^ _shr(x, 27)
    x = x * _MUL2
    return x ^ _shr(x, 31)


def _sign_bits(key: int, offset: int, numel: int, device: torch.device) -> Tensor:
    """Bits (int64 0/1, flat) of z(key, offset + i) for i < numel; 1 means -1."""
    first, last = offset >> 6, (offset + numel - 1) >> 6
    words = _mix64(torch.arange(first + 1, last + 2, dtype=torch.int64, device=device) * _GOLDEN + key)
    lanes = torch.arange(64, dtype=torch.int64, device=device)
    bits = (words.unsqueeze(1) >> lanes) & 1  # arithmetic shift is fine: only bit `lane` is kept
    start = offset - (first << 6)
    return bits.reshape(-1)[start:start + numel]


def _probe(key: int, offset: int, like: Tensor, dtype: torch.dtype) -> Tensor:
    """z(key, offset + i) in `dtype`, shaped (and row-major ordered) like `like`."""
    if like.numel() == 0:
        return torch.empty(like.shape, dtype=dtype, device=like.device)
    bits = _sign_bits(key, offset, like.numel(), like.device)
    return (1 - 2 * bits).to(dtype).reshape(like.shape)


def _check_keys(op: str, n: int, keys: Sequence[int], offsets: Sequence[int]) -> None:
    for name, values in (("keys", keys), ("offsets", offsets)):
        if len(values) != n:
            raise ValueError(f"{op}: {name} has {len(values)} entries but there are {n} tensors")
        for i, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{op}: {name}[{i}] must be an int, got {type(value).__name__}")
            if not 0 <= value < _KEY_LIMIT:
                raise ValueError(f"{op}: {name}[{i}] = {value} is outside [0, 2**63)")


def _check_tensor(op: str, name: str, i: int, t: Tensor, offset: int) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name}[{i}] must be a tensor, got {type(t).__name__}")
    if t.dtype not in _SUPPORTED:
        raise TypeError(f"{op}: {name}[{i}] has dtype {t.dtype}, expected one of float32, float64, "
                        "float16, bfloat16")
    if offset + t.numel() > _KEY_LIMIT:
        raise ValueError(f"{op}: offsets[{i}] + {name}[{i}].numel() = {offset + t.numel()} exceeds 2**63")


def rademacher_(tensors: List[Tensor], keys: List[int], offsets: List[int], *, fused: bool) -> None:
    """Fill each tensor in place with +-1 in its own dtype: element i of tensors[t] (row-major logical
    index, whatever the strides) becomes z(keys[t], offsets[t] + i)."""
    _check_keys("rademacher_", len(tensors), keys, offsets)
    for i, t in enumerate(tensors):
        _check_tensor("rademacher_", "tensors", i, t, offsets[i])
    if fused:
        from . import ops

        ops.esgd_rademacher_(list(tensors), list(keys), list(offsets))
        return
    with torch.no_grad():
        for t, key, offset in zip(tensors, keys, offsets):
            t.copy_(_probe(key, offset, t, t.dtype))


def _may_overlap(a: Tensor, b: Tensor) -> bool:
    """Whether the memory spans of two tensors intersect (conservative for interleaved views)."""
    if a.numel() == 0 or b.numel() == 0 or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t: Tensor):
        first = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if s < 0)
        last = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if s > 0)
        return first, last

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 <= b1 and b0 <= a1


def fd_perturb_(
    params: List[Tensor],
    backups: List[Tensor],
    scale: Tensor,
    keys: List[int],
    offsets: List[int],
    *,
    sign: float,
    save: bool,
    fused: bool,
) -> None:
    """Move every parameter by sign*h along its probe: p = P(S(x) + S(sign*h) * z).

    `scale` is a 1-element float64 tensor on the parameters' device holding h; it is only read by
    device code, so nothing synchronizes. save=True first copies each parameter into its backup and
    perturbs from the parameter (x = p); save=False perturbs from the backup (x = backup), leaving
    the backups unchanged, which is how a central difference moves from +h to -h. S is the math
    dtype (float32, float64 for float64 parameters) and P the parameter dtype: 16-bit parameters are
    rounded once. sign*h is formed in float64, then cast to S. z is the probe of `rademacher_`.
    """
    op = "fd_perturb_"
    n = len(params)
    if len(backups) != n:
        raise ValueError(f"{op}: backups has {len(backups)} tensors but params has {n}")
    _check_keys(op, n, keys, offsets)
    if n == 0:
        return
    _check_device_scalar(op, "scale", scale, params[0].device)
    for i, (p, b) in enumerate(zip(params, backups)):
        _check_tensor(op, "params", i, p, offsets[i])
        if p.device != params[0].device:
            raise ValueError(f"{op}: params[{i}] is on {p.device}, expected {params[0].device} "
                             "(the device of params[0])")
        if b.dtype != p.dtype or b.shape != p.shape or b.device != p.device:
            raise ValueError(f"{op}: backups[{i}] is {b.dtype} {list(b.shape)} on {b.device}, expected "
                             f"{p.dtype} {list(p.shape)} on {p.device} (as params[{i}])")
        if _may_overlap(p, b):
            raise ValueError(f"{op}: backups[{i}] shares memory with params[{i}]")
    if fused:
        from . import ops

        ops.esgd_fd_perturb_(list(params), list(backups), scale, list(keys), list(offsets),
                             sign=float(sign), save=bool(save))
        return
    with torch.no_grad():
        step = {}
        for p, b, key, offset in zip(params, backups, keys, offsets):
            math_dtype = state_dtype(p.dtype)
            if math_dtype not in step:
                step[math_dtype] = (scale.reshape(()) * float(sign)).to(math_dtype)
            if save:
                b.copy_(p)
            z = _probe(key, offset, p, math_dtype)
            # z is +-1, so z*step is exact and the sum is rounded once in S, then once to P.
            p.copy_(b.to(math_dtype) + z * step[math_dtype])
