"""Optimizer step-time benchmark: ESGD-M (fused and pure-PyTorch) against torch.optim.Adam/AdamW.

Reports ms/step, effective memory bandwidth (bytes the update must move / time), that bandwidth as a
fraction of a plain copy measured in the same run, and the ratio to fused Adam on the same shape.

    python benchmarks/step_time.py                 # CPU preset on CPU, CUDA preset when a GPU is present
    python benchmarks/step_time.py --device cuda --preset full
"""

from __future__ import annotations

import argparse
import gc
import math
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils import benchmark as tbench

import _peers
from _common import (DEFAULT_OUT, OUT_HELP, command_line, environment, environment_markdown, fmt,
                     import_esgd, load_average, markdown_table, resolve_device, write_outputs)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}

BETA1, BETA2, V, EPS = 0.9, 0.999, 0.9, 1e-4


@dataclass(frozen=True)
class Shape:
    name: str
    sizes: tuple[int, ...]
    note: str

    @property
    def numel(self) -> int:
        return sum(self.sizes)


def transformer_sizes(vocab: int, d: int, layers: int) -> tuple[int, ...]:
    """Tensor sizes of a GPT-2-style decoder: embeddings, then per layer LN, QKV, proj, MLP."""
    sizes = [vocab * d, 1024 * d]
    for _ in range(layers):
        sizes += [d, d, 3 * d * d, 3 * d, d * d, d, d, d, 4 * d * d, 4 * d, 4 * d * d, d]
    sizes += [d, d]
    return tuple(sizes)


def issue3_sizes() -> tuple[int, ...]:
    """The issue-3 report: 19M fp32 parameters in 150 tensors, a few 4M, many 1M/256K, many tiny."""
    tiny = [64, 128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096]
    sizes = [4 << 20] * 2 + [1 << 20] * 8 + [256 << 10] * 8
    sizes += [tiny[i % len(tiny)] for i in range(150 - len(sizes))]
    return tuple(sizes)


SHAPES = {
    "smoke-mix": Shape("smoke-mix", (4099, 1, 257, 65536, 3), "tiny mixed sizes, for CI"),
    "smoke-small": Shape("smoke-small", (1024,) * 64, "64 x 1K"),
    "gpt-1M": Shape("gpt-1M", transformer_sizes(vocab=2048, d=128, layers=4),
                    "GPT-style, d=128, 4 layers, vocab 2048"),
    "many-small": Shape("many-small", (1024,) * 1000, "1000 tensors x 1K elements"),
    "tiny-150": Shape("tiny-150", (64,) * 150, "150 tensors x 64 elements: the step's host overhead"),
    "issue3-19M": Shape("issue3-19M", issue3_sizes(), "2x4M + 8x1M + 8x256K + 132 tiny"),
    "gpt2-124M": Shape("gpt2-124M", transformer_sizes(vocab=50257, d=768, layers=12),
                       "GPT-2 small, d=768, 12 layers"),
}

PRESETS = {
    "smoke": dict(shapes=["smoke-mix", "smoke-small"], dtypes=["fp32", "bf16"], min_run_time=0.02,
                  copy_mib=16, rounds=1),
    "cpu": dict(shapes=["gpt-1M", "many-small", "issue3-19M"], dtypes=["fp32", "bf16"],
                min_run_time=0.1, copy_mib=256, rounds=3),
    "cuda": dict(shapes=["gpt-1M", "many-small", "issue3-19M", "gpt2-124M"], dtypes=["fp32", "bf16"],
                 min_run_time=0.2, copy_mib=1024, rounds=2),
    "full": dict(shapes=["gpt-1M", "many-small", "issue3-19M", "gpt2-124M"],
                 dtypes=["fp32", "bf16"], min_run_time=0.2, copy_mib=1024, rounds=3),
}


def state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def bytes_per_param(kind: str | None, param_dtype: torch.dtype) -> int | None:
    """Bytes one parameter's update must read and write, at best, in one step.

    ESGD plain: read p, g, m, D; write p, m. Estimation adds read Hz and write D. A "_bf16state"
    suffix: the same with 2-byte m and D (ESGD(state_dtype=torch.bfloat16)).
    Adam: read p, g, m, v; write p, m, v (torch keeps Adam state in the parameter dtype).
    AdaHessian and SophiaH ("peer", state in the parameter dtype): as ESGD; "peer_hz" with their
    Hessian estimate given. torchzero ESGD ("tz", no momentum): read p, g, D; write p.
    None: the row includes work no byte model covers (a closure's finite difference, autograd).
    The finite-difference and probe kinds are described below.
    """
    if kind is None:
        return None
    ps = torch.empty((), dtype=param_dtype).element_size()
    ss = torch.empty((), dtype=state_dtype(param_dtype)).element_size()
    if kind.endswith("_bf16state"):
        kind, ss = kind[: -len("_bf16state")], 2
    if kind in ("peer", "peer_hz", "tz"):
        return {"peer": 6, "peer_hz": 8, "tz": 4}[kind] * ps
    if kind == "esgd":
        return 3 * ps + 3 * ss
    if kind == "esgd_hz":
        return 4 * ps + 4 * ss
    if kind == "adam":
        return 7 * ps
    # Finite-difference estimation: the forward difference reads g+ where esgd_hz reads Hz (p, g, m,
    # D, g+ in; p, m, D out); the central one also reads g-.
    if kind == "esgd_fd_forward":
        return 4 * ps + 4 * ss
    if kind == "esgd_fd_central":
        return 5 * ps + 4 * ss
    # Perturbation with save: read p, write the backup and p; without: read the backup, write p.
    if kind == "perturb_save":
        return 3 * ps
    if kind == "perturb_restore":
        return 2 * ps
    # Probe fill and Tensor.fill_: write the tensor once.
    if kind == "fill":
        return ps
    raise ValueError(f"unknown byte model {kind!r}")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], None], device: torch.device, min_run_time: float,
                   warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    synchronize(device)
    # Timer defaults to one thread; an optimizer step should use the threads training would use.
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def copy_bandwidth(device: torch.device, mib: int, min_run_time: float) -> float:
    n = mib * (1 << 20) // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    t = median_seconds(lambda: dst.copy_(src), device, max(min_run_time, 0.1))
    return 2 * src.numel() * src.element_size() / t / 1e9


def make_tensors(shape: Shape, dtype: torch.dtype, device: torch.device, gen: torch.Generator,
                 scale: float = 1.0) -> list[torch.Tensor]:
    return [(torch.randn(n, generator=gen, device=device) * scale).to(dtype) for n in shape.sizes]


class Case:
    """One benchmark row: a callable that performs one step, plus how many bytes that step must move."""

    def __init__(self, name: str, byte_kind: str, fn: Callable[[], None]):
        self.name, self.byte_kind, self.fn = name, byte_kind, fn


# Rows of ESGD with bfloat16 state (state_dtype=torch.bfloat16: m and D stochastically rounded).
BF16_STATE = " bf16 state"


def esgd_step_case(esgd_cuda, shape, dtype, device, gen, fused: bool, capturable: bool = False,
                   bf16_state: bool = False) -> Case:
    """opt.step() on a plain (non-estimation) step with existing state, grads fixed; with
    capturable=True, opt.plain_step() (device-side counters and step scalars, no host sync)."""
    params = [torch.nn.Parameter(t) for t in make_tensors(shape, dtype, device, gen)]
    grads = make_tensors(shape, dtype, device, gen, scale=1e-2)
    lr = torch.tensor(1e-3, device=device) if capturable else 1e-3
    opt = esgd_cuda.ESGD(params, lr=lr, d_warmup=1, update_d_every=10 ** 9, seed=0, fused=fused,
                         capturable=capturable, state_dtype=torch.bfloat16 if bf16_state else None)
    if not opt.should_create_graph():
        raise RuntimeError("ESGD.should_create_graph() is False on step 0 with d_warmup=1; "
                           "the schedule does not match the documented API")
    opt.zero_grad()
    loss = sum(0.5 * (p.float() ** 2).sum() for p in params)
    opt.backward(loss)
    opt.step()
    del loss
    if opt.should_create_graph():
        raise RuntimeError("ESGD still wants an estimation step after its only warm-up step")
    for p, g in zip(params, grads):
        p.grad = g
    label = ("fused" if fused else "fused=False") + (BF16_STATE if bf16_state else "")
    kind = "esgd_bf16state" if bf16_state else "esgd"
    if capturable:
        return Case(f"ESGD {label} capturable: plain_step()", kind, opt.plain_step)
    return Case(f"ESGD {label}: opt.step() plain", kind, opt.step)


def rounding_kwargs(esgd_cuda, n: int, bf16_state: bool) -> dict:
    """The rounding arguments of bf16 state (the keys of parameters 0..n-1 of seed 0, step 50)."""
    if not bf16_state:
        return {}
    probes = _probes_module(esgd_cuda)
    return dict(rounding_keys=[probes.rounding_key(0, i) for i in range(n)], rounding_offsets=[0] * n,
                rounding_step=50)


def esgd_kernel_case(esgd_cuda, shape, dtype, device, gen, fused: bool, hz: bool, bf16_state: bool = False) -> Case:
    """functional.esgd_update on ready state tensors: the update alone, no optimizer bookkeeping."""
    sdt = torch.bfloat16 if bf16_state else state_dtype(dtype)
    params = make_tensors(shape, dtype, device, gen)
    grads = make_tensors(shape, dtype, device, gen, scale=1e-2)
    exp_avgs = make_tensors(shape, sdt, device, gen, scale=1e-2)
    exp_hz_sqs = [t.abs_() for t in make_tensors(shape, sdt, device, gen, scale=1e-2)]
    hzs = make_tensors(shape, dtype, device, gen, scale=1e-1) if hz else None
    t = 50
    kwargs = dict(beta1=BETA1, beta2=BETA2, v=V, eps=EPS, weight_decay=0.0, step_size=1e-3,
                  momentum_scale=1.0 / (1.0 - BETA1 ** t * V),
                  denom_scale=1.0 / math.sqrt(1.0 - BETA2 ** 6), fused=fused,
                  **rounding_kwargs(esgd_cuda, len(params), bf16_state))
    update = esgd_cuda.functional.esgd_update

    def fn():
        update(params, grads, exp_avgs, exp_hz_sqs, hzs, **kwargs)

    label = ("fused" if fused else "fused=False") + (BF16_STATE if bf16_state else "")
    what = "estimation (+Hz)" if hz else "plain"
    kind = ("esgd_hz" if hz else "esgd") + ("_bf16state" if bf16_state else "")
    return Case(f"ESGD {label}: esgd_update {what}", kind, fn)


def fd_update_case(esgd_cuda, shape, dtype, device, gen, central: bool, bf16_state: bool = False) -> Case:
    """functional.esgd_update_fd (fused): an estimation step whose Hz is a gradient difference."""
    sdt = torch.bfloat16 if bf16_state else state_dtype(dtype)
    params = make_tensors(shape, dtype, device, gen)
    grads = make_tensors(shape, dtype, device, gen, scale=1e-2)
    exp_avgs = make_tensors(shape, sdt, device, gen, scale=1e-2)
    exp_hz_sqs = [t.abs_() for t in make_tensors(shape, sdt, device, gen, scale=1e-2)]
    grads_plus = make_tensors(shape, dtype, device, gen, scale=1e-2)
    grads_minus = make_tensors(shape, dtype, device, gen, scale=1e-2) if central else None
    hz_scale = torch.tensor(500.0 if central else 1000.0, dtype=torch.float64, device=device)
    t = 50
    kwargs = dict(beta1=BETA1, beta2=BETA2, v=V, eps=EPS, weight_decay=0.0, step_size=1e-3,
                  momentum_scale=1.0 / (1.0 - BETA1 ** t * V),
                  denom_scale=1.0 / math.sqrt(1.0 - BETA2 ** 6), fused=True,
                  **rounding_kwargs(esgd_cuda, len(params), bf16_state))
    update = esgd_cuda.functional.esgd_update_fd

    def fn():
        update(params, grads, exp_avgs, exp_hz_sqs, grads_plus, grads_minus, hz_scale, **kwargs)

    what = "central" if central else "forward"
    label = "fused" + (BF16_STATE if bf16_state else "")
    return Case(f"ESGD {label}: esgd_update_fd {what}", f"esgd_fd_{what}" + ("_bf16state" if bf16_state else ""), fn)


def _probes_module(esgd_cuda):
    import importlib

    return importlib.import_module(esgd_cuda.__name__ + ".probes")


def perturb_case(esgd_cuda, shape, dtype, device, gen, save: bool) -> Case:
    """probes.fd_perturb_ (fused): every parameter moved by h along its probe, h on the device."""
    probes = _probes_module(esgd_cuda)
    params = make_tensors(shape, dtype, device, gen)
    backups = [p.clone() for p in params]
    scale = torch.tensor(1e-3, dtype=torch.float64, device=device)
    keys = [probes.probe_key(0, i) for i in range(len(params))]
    offsets = [0] * len(params)

    def fn():
        probes.fd_perturb_(params, backups, scale, keys, offsets, sign=1.0, save=save, fused=True)

    what = "save" if save else "restore"
    return Case(f"ESGD fused: fd_perturb_ {what}", f"perturb_{what}", fn)


def rademacher_case(esgd_cuda, shape, dtype, device, gen) -> Case:
    """probes.rademacher_ (fused): each tensor filled with its probe."""
    probes = _probes_module(esgd_cuda)
    tensors = make_tensors(shape, dtype, device, gen)
    keys = [probes.probe_key(1, i) for i in range(len(tensors))]
    offsets = [0] * len(tensors)

    def fn():
        probes.rademacher_(tensors, keys, offsets, fused=True)

    return Case("ESGD fused: rademacher_", "fill", fn)


def fill_case(shape, dtype, device, gen) -> Case:
    """Tensor.fill_ on tensors of the rademacher_ row's shapes: the write-only ceiling for it."""
    tensors = make_tensors(shape, dtype, device, gen)

    def fn():
        for t in tensors:
            t.fill_(1.0)

    return Case("Tensor.fill_ (the rademacher_ tensors)", "fill", fn)


def adam_case(shape, dtype, device, gen, cls, impl: str) -> Case:
    params = [torch.nn.Parameter(t) for t in make_tensors(shape, dtype, device, gen)]
    for p, g in zip(params, make_tensors(shape, dtype, device, gen, scale=1e-2)):
        p.grad = g
    opt = cls(params, lr=1e-3, **{impl: True})
    opt.step()
    return Case(f"{cls.__name__} {impl}", "adam", opt.step)


def _quadratic(params: list[torch.Tensor]) -> torch.Tensor:
    """The cheapest loss with a Hessian: 0.5*|p|^2, whose gradient and Hz are a few elementwise passes."""
    return sum(0.5 * (p.float() ** 2).sum() for p in params)


def _precomputed_grads_closure(params, grads):
    """A torchzero closure that hands back fixed gradients: its step is timed without a model.

    torchzero's finite difference then subtracts the fixed gradient from itself in place, so its Hz
    (and from the first estimate on, the gradient) is zero; the work done does not depend on the values.
    """
    loss = torch.zeros((), device=params[0].device)

    def closure(backward=True):
        if backward:
            for p, g in zip(params, grads):
                p.grad = g
        return loss
    return closure


def peer_case(esgd_cuda, name: str, kind: str, shape, dtype, device, gen) -> Case:
    """One step of a second-order peer (or, for kind "quadratic", of ESGD-M too), on ready state.

    kind "plain": step() on a step that does not estimate, p.grad set (AdaHessian and SophiaH with
    update_period=10**9, so that no timed step estimates; their plain step does not depend on it).
    kind "hessian": AdaHessian/SophiaH step(hessian=Hz): the update given the Hessian estimate; excludes
    the probe, the Hessian-vector product and their z*Hz product, as ESGD's esgd_update (+Hz) row
    excludes the probe and Hz.
    kind "fd": torchzero ESGD's estimation step with hvp_method="fd_forward" and a closure that hands
    back fixed gradients: the probe, the parameter perturbation and restore, the difference and the
    update, without the model's two gradient evaluations.
    kind "quadratic": a whole estimation step on the loss 0.5*|p|^2, the Hessian-vector product by
    autograd included, every optimizer driven as documented (ESGD-M: opt.backward(loss) + step();
    AdaHessian/SophiaH: backward(create_graph=True) + step(); torchzero: step(closure)).
    """
    params = [torch.nn.Parameter(t) for t in make_tensors(shape, dtype, device, gen)]
    grads = make_tensors(shape, dtype, device, gen, scale=1e-2)
    hz = make_tensors(shape, dtype, device, gen, scale=1e-1)
    lr = 1e-3
    if kind == "quadratic":
        if name == "esgd":
            opt = esgd_cuda.ESGD(params, lr=lr, update_d_every=1, d_warmup=1, seed=0, fused=True)

            def fn():
                opt.zero_grad()
                opt.backward(_quadratic(params))
                opt.step()
        elif name == "tz-esgd":
            opt = _peers.make(name, params, lr, 0, update_freq=1)

            def closure(backward=True):
                loss = _quadratic(params)
                if backward:
                    opt.zero_grad()
                    loss.backward()
                return loss

            def fn():
                opt.step(closure)
        else:
            opt = _peers.make(name, params, lr, 0, update_period=1)

            def fn():
                opt.zero_grad()
                _quadratic(params).backward(create_graph=True)
                opt.step()
                opt.zero_grad()
        fn()
    elif name == "tz-esgd":
        tz_closure = _precomputed_grads_closure(params, grads)
        # Every step estimates for "fd"; for "plain" only the first (setting up the state) does.
        opt = _peers.make(name, params, lr, 0, hvp_method="fd_forward", update_freq=1 if kind == "fd" else 10 ** 9)
        # Copies for the first step, so that the plain steps timed after it keep nonzero gradients.
        opt.step(_precomputed_grads_closure(params, [g.clone() for g in grads]))

        def fn():
            opt.step(tz_closure)
    else:
        opt = _peers.make(name, params, lr, 0, update_period=10 ** 9)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step(hessian=hz)  # the first step estimates: state and the Hessian EMA exist from here on

        def fn():
            if kind == "hessian":
                opt.step(hessian=hz)
            else:
                opt.step()
    case = Case(_step_label(name, kind), _peer_byte_kind(name, kind), fn)
    case.optimizer = opt
    return case


def _step_label(name: str, kind: str) -> str:
    label = "ESGD fused" if name == "esgd" else _peers.PEERS[name].label
    if kind == "quadratic":
        how = "step(closure)" if name == "tz-esgd" else "backward + step()"
        return f"quadratic: {label}{' autograd' if name == 'tz-esgd' else ''}: {how} estimation"
    if name == "tz-esgd":
        return f"{label} fd_forward: step(closure) estimation" if kind == "fd" else f"{label}: step(closure) plain"
    return f"{label}: step(hessian=Hz) estimation" if kind == "hessian" else f"{label}: step() plain"


PEER_ROWS = [("adahessian", "plain"), ("adahessian", "hessian"), ("sophiah", "plain"), ("sophiah", "hessian"),
             ("tz-esgd", "plain"), ("tz-esgd", "fd"), ("esgd", "quadratic"), ("adahessian", "quadratic"),
             ("sophiah", "quadratic"), ("tz-esgd", "quadratic")]


def _peer_byte_kind(name: str, kind: str) -> str | None:
    if kind == "plain":
        return "tz" if name == "tz-esgd" else "peer"
    return "peer_hz" if kind == "hessian" else None


def peer_specs(esgd_cuda, shape: Shape, dtype: torch.dtype, device: torch.device, gen, fused_why):
    """build_cases' rows for the second-order peers (n/a with the reason when a library is missing)."""
    specs = []
    for name, kind in PEER_ROWS:
        label = _step_label(name, kind)
        absent = _peers.missing([name])
        why = (f"{' '.join(absent)} is not installed (pip install esgd_cuda[bench])" if absent
               else fused_why if name == "esgd" else None)
        specs.append((label, _peer_byte_kind(name, kind), why,
                      lambda name=name, kind=kind: peer_case(esgd_cuda, name, kind, shape, dtype, device, gen)))
    return specs


def build_cases(esgd_cuda, shape: Shape, dtype: torch.dtype, device: torch.device, seed: int):
    """Yield (name, byte_kind, case factory or skip reason). Factories build lazily so each row's
    tensors can be freed before the next one is allocated (the 124M shape is large on a CPU box)."""
    fused_ok = esgd_cuda._extension.fused_supported(device, dtype)
    fused_why = None if fused_ok else (
        f"fused ESGD unsupported for {device.type}/{dtype}: "
        f"{esgd_cuda._extension.LOAD_ERROR or 'extension has no kernel for this device/dtype'}")
    # Drawn on the device: filling 124M parameters several times over from the host takes minutes.
    gen = torch.Generator(device=device).manual_seed(seed)
    specs = [
        ("ESGD fused: opt.step() plain", "esgd", fused_why,
         lambda: esgd_step_case(esgd_cuda, shape, dtype, device, gen, fused=True)),
        ("ESGD fused capturable: plain_step()", "esgd", fused_why,
         lambda: esgd_step_case(esgd_cuda, shape, dtype, device, gen, fused=True, capturable=True)),
        ("ESGD fused: esgd_update plain", "esgd", fused_why,
         lambda: esgd_kernel_case(esgd_cuda, shape, dtype, device, gen, fused=True, hz=False)),
        ("ESGD fused: esgd_update estimation (+Hz)", "esgd_hz", fused_why,
         lambda: esgd_kernel_case(esgd_cuda, shape, dtype, device, gen, fused=True, hz=True)),
        (f"ESGD fused{BF16_STATE}: opt.step() plain", "esgd_bf16state", fused_why,
         lambda: esgd_step_case(esgd_cuda, shape, dtype, device, gen, fused=True, bf16_state=True)),
        (f"ESGD fused{BF16_STATE}: esgd_update plain", "esgd_bf16state", fused_why,
         lambda: esgd_kernel_case(esgd_cuda, shape, dtype, device, gen, fused=True, hz=False, bf16_state=True)),
        (f"ESGD fused{BF16_STATE}: esgd_update estimation (+Hz)", "esgd_hz_bf16state", fused_why,
         lambda: esgd_kernel_case(esgd_cuda, shape, dtype, device, gen, fused=True, hz=True, bf16_state=True)),
        (f"ESGD fused{BF16_STATE}: esgd_update_fd forward", "esgd_fd_forward_bf16state", fused_why,
         lambda: fd_update_case(esgd_cuda, shape, dtype, device, gen, central=False, bf16_state=True)),
        ("ESGD fused=False: opt.step() plain", "esgd", None,
         lambda: esgd_step_case(esgd_cuda, shape, dtype, device, gen, fused=False)),
        ("ESGD fused=False: esgd_update plain", "esgd", None,
         lambda: esgd_kernel_case(esgd_cuda, shape, dtype, device, gen, fused=False, hz=False)),
        ("ESGD fused=False: esgd_update estimation (+Hz)", "esgd_hz", None,
         lambda: esgd_kernel_case(esgd_cuda, shape, dtype, device, gen, fused=False, hz=True)),
    ]
    for central in (False, True):
        what = "central" if central else "forward"
        specs.append((f"ESGD fused: esgd_update_fd {what}", f"esgd_fd_{what}", fused_why,
                      lambda central=central: fd_update_case(esgd_cuda, shape, dtype, device, gen, central)))
    for save in (True, False):
        what = "save" if save else "restore"
        specs.append((f"ESGD fused: fd_perturb_ {what}", f"perturb_{what}", fused_why,
                      lambda save=save: perturb_case(esgd_cuda, shape, dtype, device, gen, save)))
    specs.append(("ESGD fused: rademacher_", "fill", fused_why,
                  lambda: rademacher_case(esgd_cuda, shape, dtype, device, gen)))
    specs.append(("Tensor.fill_ (the rademacher_ tensors)", "fill", None,
                  lambda: fill_case(shape, dtype, device, gen)))
    for cls in (torch.optim.Adam, torch.optim.AdamW):
        for impl in ("fused", "foreach"):
            specs.append((f"{cls.__name__} {impl}", "adam", None,
                          lambda cls=cls, impl=impl: adam_case(shape, dtype, device, gen, cls, impl)))
    specs += peer_specs(esgd_cuda, shape, dtype, device, gen, fused_why)
    return specs


def run(args) -> dict:
    device = resolve_device(args.device)
    preset = PRESETS[args.preset or ("cuda" if device.type == "cuda" else "cpu")]
    shapes = args.shapes or preset["shapes"]
    dtypes = args.dtypes or preset["dtypes"]
    min_run_time = args.min_run_time if args.min_run_time is not None else preset["min_run_time"]
    rounds = args.rounds if args.rounds is not None else preset["rounds"]
    if rounds < 1:
        raise SystemExit(f"--rounds must be >= 1, got {rounds}")
    for name in shapes:
        if name not in SHAPES:
            raise SystemExit(f"--shapes: unknown shape {name!r}; choose from {', '.join(SHAPES)}")
    for name in dtypes:
        if name not in DTYPES:
            raise SystemExit(f"--dtypes: unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    if args.threads:
        torch.set_num_threads(args.threads)

    esgd_cuda = import_esgd()
    env = environment(device, command=args.command)
    started = time.perf_counter()
    # The copy is re-measured in every round, next to the rows it is compared with, and the best kept:
    # the ceiling must not be lowered by a moment of contention.
    copies = [copy_bandwidth(device, preset["copy_mib"], min_run_time)]
    rows = []
    for shape_name in shapes:
        shape = SHAPES[shape_name]
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            specs = build_cases(esgd_cuda, shape, dtype, device, args.seed)
            if args.cases is not None:
                # Fused Adam stays: every ratio is against it.
                specs = [s for s in specs if s[0] == "Adam fused" or args.cases.search(s[0])]
            group = [dict(shape=shape.name, shape_note=shape.note, dtype=dtype_name, params=shape.numel,
                          tensors=len(shape.sizes), case=name,
                          bytes_per_param=bytes_per_param(byte_kind, dtype), skipped=skip,
                          round_ms=[], ms=None, gbs=None, copy_fraction=None, vs_adam_fused=None)
                     for name, byte_kind, skip, _ in specs]
            # Rounds interleave the cases, so a burst of load from other processes hits one round of
            # a case rather than all of its samples; each round's median is kept, and the best reported.
            for _ in range(rounds):
                copies.append(copy_bandwidth(device, preset["copy_mib"], min_run_time))
                for row, (_, _, _, factory) in zip(group, specs):
                    if row["skipped"] is not None:
                        continue
                    case = None
                    try:
                        case = factory()
                        row["round_ms"].append(1e3 * median_seconds(case.fn, device, min_run_time))
                    except Exception as exc:  # one broken path must not hide the other rows
                        row["skipped"] = f"error: {type(exc).__name__}: {exc}"
                    finally:
                        del case
                # Optimizers hold reference cycles; free their tensors before the next round allocates.
                gc.collect()
            for row in group:
                if row["skipped"] is None:
                    row["ms"] = min(row["round_ms"])
                    if row["bytes_per_param"] is not None:
                        row["gbs"] = row["bytes_per_param"] * shape.numel / (row["ms"] / 1e3) / 1e9
                if args.verbose:
                    print(f"  {shape.name:>12} {dtype_name:>5} {row['case']:<46} {fmt(row['ms'])} ms"
                          + (f"  {row['skipped']}" if row["skipped"] else ""), file=sys.stderr, flush=True)
            # The ratio to Adam is paired by round: each round's median over Adam's in the same round,
            # and the median of those. The machine's bandwidth drifts between rounds (by a third on a
            # shared 2-core VM), which a ratio of two bests taken in different rounds would keep.
            adam = next((r for r in group if r["case"] == "Adam fused" and r["ms"]), None)
            for r in group:
                if adam and r["ms"]:
                    r["vs_adam_fused"] = statistics.median(
                        case / base for case, base in zip(r["round_ms"], adam["round_ms"]))
            rows.extend(group)
    copy_gbs = max(copies)
    for row in rows:
        if row["gbs"] is not None:
            row["copy_fraction"] = row["gbs"] / copy_gbs
    env["load_avg_end"] = load_average()
    return dict(environment=env, preset=args.preset, device=str(device), min_run_time=min_run_time,
                rounds=rounds, copy_gbs=copy_gbs, copy_gbs_samples=copies, copy_mib=preset["copy_mib"],
                rows=rows,
                elapsed_s=time.perf_counter() - started)


def to_markdown(result: dict) -> str:
    env = result["environment"]
    parts = [f"## Optimizer step time ({result['device']})", "", environment_markdown(env),
             f"- Copy bandwidth (`dst.copy_(src)`, {result['copy_mib']} MiB, 2 x bytes / time, best of "
             f"{len(result['copy_gbs_samples'])} measurements interleaved with the rows): "
             f"{result['copy_gbs']:.1f} GB/s",
             f"- ms/step: median of `torch.utils.benchmark` blocked_autorange "
             f"(min_run_time={result['min_run_time']} s) after warm-up; best of "
             f"{result['rounds']} interleaved round(s); x Adam fused: the median over rounds of the "
             f"row's round median / Adam fused's in the same round", ""]
    headers = ["case", "ms/step", "GB/s", "% of copy", "x Adam fused", "B/param"]
    keyed = {}
    for r in result["rows"]:
        keyed.setdefault((r["shape"], r["dtype"]), []).append(r)
    for (shape, dtype), rows in keyed.items():
        first = rows[0]
        parts.append(f"### {shape}, {dtype}: {first['params'] / 1e6:.2f}M params in "
                     f"{first['tensors']} tensors ({first['shape_note']})")
        parts.append("")
        table = []
        for r in rows:
            if r["ms"] is None:
                table.append([r["case"], "n/a", "", "", "", r["bytes_per_param"]])
                continue
            table.append([r["case"], fmt(r["ms"]), fmt(r["gbs"]),
                          "—" if r["copy_fraction"] is None else f"{100 * r['copy_fraction']:.0f}%",
                          fmt(r["vs_adam_fused"]), "—" if r["bytes_per_param"] is None else r["bytes_per_param"]])
        parts.append(markdown_table(headers, table))
        skipped = sorted({r["skipped"] for r in rows if r["skipped"]})
        if skipped:
            parts.append("")
            parts.extend(f"n/a: {why}" for why in skipped)
        parts.append("")
    return "\n".join(parts)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="shape/dtype set (default: cuda on a GPU, cpu otherwise)")
    p.add_argument("--smoke", dest="preset", action="store_const", const="smoke",
                   help="same as --preset smoke: tiny sizes, seconds, for CI")
    p.add_argument("--shapes", nargs="+", default=None, help=f"subset of: {', '.join(SHAPES)}")
    p.add_argument("--dtypes", nargs="+", default=None, help=f"subset of: {', '.join(DTYPES)}")
    p.add_argument("--min-run-time", type=float, default=None, help="seconds of timing per row")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved timing rounds per row; the best round median is reported")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--cases", default=None, metavar="REGEX",
                   help="only the rows whose name matches REGEX (Python re.search), and Adam fused: more "
                        "rounds for a few rows in the same time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=OUT_HELP)
    p.add_argument("--quiet", dest="verbose", action="store_false", help="no per-row progress")
    args = p.parse_args(argv)
    if args.cases is not None:
        try:
            args.cases = re.compile(args.cases)
        except re.error as exc:
            p.error(f"--cases: {args.cases!r} is not a regular expression: {exc}")
    args.command = command_line("step_time.py", argv)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    previous_threads = torch.get_num_threads()
    try:
        result = run(args)
    finally:
        torch.set_num_threads(previous_threads)
    markdown = to_markdown(result)
    stem = f"step_time_{torch.device(result['device']).type}"
    json_path, md_path = write_outputs(args.out, stem, result, markdown)
    print(markdown)
    print(f"wrote {md_path} and {json_path}", file=sys.stderr)
    result["outputs"] = dict(json=json_path, markdown=md_path)
    return result


if __name__ == "__main__":
    main()
