"""Convergence benchmark: how fast ESGD-M trains real models, against Adam, AdamW and SGD (Nesterov), and
against the second-order peers AdaHessian, SophiaH (pytorch-optimizer) and torchzero's ESGD.

Every optimizer gets the same learning-rate sweep size and the same seeds on each problem. The table
reports, at each optimizer's best learning rate (lowest mean final training loss over seeds): the final
training loss, the test metric, the steps and the training wall-clock seconds until the mean training
loss first reaches the target (Adam's best mean final loss), and the amortized time per step (every
second-order optimizer's Hessian-vector products included, each on its own default schedule: ESGD-M
every 10th step after 20 warm-up estimates, AdaHessian every step, SophiaH every 10th, torchzero ESGD
every 20th; see _peers.py for how each is driven).

    python benchmarks/convergence.py                # --quick: every problem and optimizer, a few minutes
    python benchmarks/convergence.py --full         # longer runs, finer sweep, 5 seeds
    python benchmarks/convergence.py --problems digits-mlp rosenbrock --device cuda
"""

from __future__ import annotations

import argparse
import functools
import math
import multiprocessing as mp
import os
import statistics
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import _peers
from _common import (DEFAULT_OUT, OUT_HELP, command_line, environment, environment_markdown, fmt,
                     import_esgd, load_average, markdown_table, resolve_device, write_outputs)

# ----------------------------------------------------------------------------------------- presets

# Every optimizer gets as many learning rates: decades in --quick (the upper part of each range, where
# the best values lie on these problems), half-decades over the whole range in --full.
LR_GRIDS = {
    "quick": {
        "esgd": [1e-2, 1e-1, 1.0],
        "adam": [1e-3, 1e-2, 1e-1],
        "adamw": [1e-3, 1e-2, 1e-1],
        "sgd": [1e-2, 1e-1, 1.0],
    },
    "full": {
        "esgd": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0],
        "adam": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
        "adamw": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
        "sgd": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0],
    },
    "smoke": {"esgd": [1e-1], "adam": [1e-2], "adamw": [1e-2], "sgd": [1e-2]},
}
SEEDS = {"quick": 3, "full": 5, "smoke": 2}

OPTIMIZER_LABELS = {"esgd": "ESGD-M", "esgd-bf16": "ESGD-M bf16 state", "esgd-fd": "ESGD-M forward difference",
                    "esgd-cd": "ESGD-M central difference", "esgd-nowarmup": "ESGD-M lr_warmup=0", "adam": "Adam",
                    "adamw": "AdamW", "sgd": "SGD (Nesterov)",
                    **{name: peer.label for name, peer in _peers.PEERS.items()}}
OPTIMIZER_COLORS = {"esgd": "tab:red", "esgd-bf16": "tab:brown", "esgd-fd": "tab:pink", "esgd-cd": "tab:olive",
                    "esgd-nowarmup": "tab:orange", "adam": "tab:blue",
                    "adamw": "tab:cyan", "sgd": "tab:gray",
                    **{name: peer.color for name, peer in _peers.PEERS.items()}}
# ESGD-M without its learning-rate warm-up is opt-in: it shows what the warm-up costs on short runs.
# So is the central difference (three passes per estimate), and ESGD-M with bfloat16 state
# (state_dtype=torch.bfloat16, for comparing its final losses with float32 state's); the forward
# difference runs by default, next to the exact ESGD-M.
DEFAULT_OPTIMIZERS = ["esgd", "esgd-fd", "adam", "adamw", "sgd", *_peers.PEERS]
FD_HVP = {"esgd-fd": "finite_difference", "esgd-cd": "central_difference"}
for _preset, _grid in LR_GRIDS.items():
    _grid["esgd-nowarmup"] = _grid["esgd"]
    _grid["esgd-bf16"] = _grid["esgd"]
    for _name in FD_HVP:
        _grid[_name] = _grid["esgd"]
    # Each peer's sweep is centred on its own documented default learning rate.
    for _name in _peers.PEERS:
        _grid[_name] = _peers.lr_grid(_name, _preset)


# ----------------------------------------------------------------------------------------- problems

@dataclass
class Instance:
    """One problem, one seed: the parameters and how to evaluate them."""

    module: nn.Module
    batch_loss: Callable[[int], torch.Tensor]  # loss of the minibatch for a step index
    train_loss: Callable[[], float]  # the training objective whose curve is reported
    test_metric: Callable[[], float | None]


class Problem:
    name: str = ""
    description: str = ""
    metric: str | None = None  # name of the test metric, None when the problem has no test set
    steps: dict[str, int]  # training steps per preset
    eval_points = 20

    def instance(self, seed: int, device: torch.device, preset: str) -> Instance:
        raise NotImplementedError


@functools.lru_cache(maxsize=None)
def _digits(device_str: str):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    # A fixed split: every optimizer and seed sees the same 80/20 train/test partition.
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    n_train = int(0.8 * len(x))
    tr, te = perm[:n_train], perm[n_train:]
    return tuple(t.to(device_str) for t in (x[tr], y[tr], x[te], y[te]))


def _per_step(draw: Callable[[], torch.Tensor]) -> Callable[[int], torch.Tensor]:
    """`draw()` once per step index: optimizers that re-evaluate the loss within a step (closures) must
    see the same minibatch, and the stream of batches stays the same for those that evaluate once."""
    last: dict[int, torch.Tensor] = {}

    def at(step: int) -> torch.Tensor:
        if step not in last:
            last.clear()
            last[step] = draw()
        return last[step]
    return at


def _batch_sampler(n: int, batch: int, seed: int, device: torch.device) -> Callable[[int], torch.Tensor]:
    gen = torch.Generator().manual_seed(10_000 + seed)
    return _per_step(lambda: torch.randint(0, n, (batch,), generator=gen).to(device))


class DigitsMLP(Problem):
    name = "digits-mlp"
    description = "MLP 64-128-128-10 (tanh) classifier on scikit-learn digits, batch 64"
    metric = "test acc"
    steps = {"smoke": 24, "quick": 400, "full": 2000}

    def instance(self, seed, device, preset):
        xtr, ytr, xte, yte = _digits(str(device))
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(),
                              nn.Linear(128, 10)).to(device)
        sample = _batch_sampler(len(xtr), 64, seed, device)

        def batch_loss(step):
            idx = sample(step)
            return F.cross_entropy(model(xtr[idx]), ytr[idx])

        @torch.no_grad()
        def test_metric():
            return (model(xte).argmax(1) == yte).float().mean().item()

        return Instance(model, batch_loss, _no_grad_loss(lambda: F.cross_entropy(model(xtr), ytr)),
                        test_metric)


class DigitsAutoencoder(Problem):
    name = "digits-autoencoder"
    description = ("deep autoencoder 64-128-64-32-8-32-64-128-64 (tanh, sigmoid output), "
                   "MSE on scikit-learn digits, batch 128")
    metric = "test MSE"
    steps = {"smoke": 24, "quick": 500, "full": 3000}

    def instance(self, seed, device, preset):
        xtr, _, xte, _ = _digits(str(device))
        torch.manual_seed(seed)
        widths = [64, 128, 64, 32, 8, 32, 64, 128, 64]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b))
            layers.append(nn.Sigmoid() if i == len(widths) - 2 else nn.Tanh())
        model = nn.Sequential(*layers).to(device)
        sample = _batch_sampler(len(xtr), 128, seed, device)

        def batch_loss(step):
            xb = xtr[sample(step)]
            return F.mse_loss(model(xb), xb)

        return Instance(model, batch_loss, _no_grad_loss(lambda: F.mse_loss(model(xtr), xtr)),
                        _no_grad_loss(lambda: F.mse_loss(model(xte), xte)))


STDLIB_MODULES = ("textwrap.py", "heapq.py", "bisect.py", "fnmatch.py", "shlex.py", "glob.py",
                  "colorsys.py", "string.py", "queue.py", "sched.py", "contextlib.py", "functools.py")


@functools.lru_cache(maxsize=None)
def _stdlib_text(device_str: str):
    """Bytes of a fixed list of standard-library modules: a local corpus that needs no download."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks = [(root / name).read_bytes() for name in STDLIB_MODULES if (root / name).is_file()]
    if sum(map(len, chunks)) < 50_000:
        raise RuntimeError(f"char-transformer: too little standard-library source found under {root}")
    data = torch.tensor(list(b"\n".join(chunks)), dtype=torch.long)
    vocab, ids = torch.unique(data, return_inverse=True)
    n_train = int(0.9 * len(ids))
    return ids[:n_train].to(device_str), ids[n_train:].to(device_str), len(vocab)


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x, mask):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # Attention written out: the flash/efficient SDPA kernels have no double backward, which the
        # Hessian-vector product needs.
        att = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5
        att = att.masked_fill(mask[:t, :t], float("-inf")).softmax(-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class CharTransformer(nn.Module):
    def __init__(self, vocab: int, d: int, heads: int, layers: int, ctx: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(ctx, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", torch.triu(torch.ones(ctx, ctx, dtype=torch.bool), 1),
                             persistent=False)
        nn.init.normal_(self.tok.weight, std=0.02)

    def forward(self, idx):
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            x = block(x, self.mask)
        return self.head(self.ln(x))


class CharTransformerLM(Problem):
    name = "char-transformer"
    description = ("char-level transformer LM (2 layers, d=32, 4 heads, context 32, batch 16) "
                   "on Python standard-library source")
    metric = "test bits/char"
    steps = {"smoke": 24, "quick": 300, "full": 2000}
    d, heads, layers, ctx, batch = 32, 4, 2, 32, 16

    def instance(self, seed, device, preset):
        train, test, vocab = _stdlib_text(str(device))
        torch.manual_seed(seed)
        model = CharTransformer(vocab, self.d, self.heads, self.layers, self.ctx).to(device)
        gen = torch.Generator().manual_seed(10_000 + seed)
        batch_starts = _per_step(lambda: torch.randint(0, len(train) - self.ctx - 1, (self.batch,), generator=gen))

        def windows(data, starts):
            offsets = torch.arange(self.ctx + 1, device=device)
            w = data[starts.to(device)[:, None] + offsets]
            return w[:, :-1], w[:, 1:]

        def loss_on(data, starts):
            x, y = windows(data, starts)
            return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

        def batch_loss(step):
            return loss_on(train, batch_starts(step))

        # Fixed evaluation windows, the same for every optimizer and seed.
        n_eval = 32 if preset != "smoke" else 8
        eval_gen = torch.Generator().manual_seed(1)
        train_starts = torch.randint(0, len(train) - self.ctx - 1, (n_eval,), generator=eval_gen)
        test_starts = torch.linspace(0, len(test) - self.ctx - 2, n_eval).long()

        return Instance(model, batch_loss, _no_grad_loss(lambda: loss_on(train, train_starts)),
                        _no_grad_loss(lambda: loss_on(test, test_starts) / math.log(2)))


class ParamVector(nn.Module):
    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.x = nn.Parameter(x0)


class Rosenbrock(Problem):
    name = "rosenbrock"
    description = "10-d Rosenbrock, start (-1.2, 1, ...) + N(0, 0.1^2), full gradient"
    steps = {"smoke": 24, "quick": 1000, "full": 5000}
    dim = 10

    def instance(self, seed, device, preset):
        gen = torch.Generator().manual_seed(seed)
        x0 = torch.tensor([-1.2, 1.0] * (self.dim // 2)) + 0.1 * torch.randn(self.dim, generator=gen)
        module = ParamVector(x0.to(device))

        def f():
            x = module.x
            return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()

        return Instance(module, lambda step: f(), _no_grad_loss(f), lambda: None)


class RotatedQuadratic(Problem):
    name = "quadratic"
    description = "ill-conditioned rotated quadratic, 100-d, eigenvalues 1e-2..1e2 (condition 1e4)"
    steps = {"smoke": 24, "quick": 800, "full": 4000}
    dim = 100

    def instance(self, seed, device, preset):
        # The matrix is part of the problem (fixed); the starting point depends on the seed.
        q, _ = torch.linalg.qr(torch.randn(self.dim, self.dim, generator=torch.Generator().manual_seed(1234),
                                           dtype=torch.float64))
        a = (q * torch.logspace(-2, 2, self.dim, dtype=torch.float64)) @ q.T
        a = a.float().to(device)
        gen = torch.Generator().manual_seed(seed)
        module = ParamVector(torch.randn(self.dim, generator=gen).to(device))

        def f():
            x = module.x
            return 0.5 * x @ (a @ x) / self.dim

        return Instance(module, lambda step: f(), _no_grad_loss(f), lambda: None)


def _no_grad_loss(fn: Callable[[], torch.Tensor]) -> Callable[[], float]:
    def evaluate():
        with torch.no_grad():
            return float(fn())
    return evaluate


PROBLEMS: dict[str, Problem] = {p.name: p for p in (DigitsMLP(), DigitsAutoencoder(), CharTransformerLM(),
                                                   Rosenbrock(), RotatedQuadratic())}


# ----------------------------------------------------------------------------------------- running

def make_optimizer(name: str, params, lr: float, seed: int, device: torch.device):
    if name == "esgd":
        return import_esgd().ESGD(params, lr=lr, seed=seed)
    if name == "esgd-nowarmup":
        return import_esgd().ESGD(params, lr=lr, lr_warmup=0.0, seed=seed)
    if name == "esgd-bf16":
        return import_esgd().ESGD(params, lr=lr, seed=seed, state_dtype=torch.bfloat16)
    if name in FD_HVP:
        return import_esgd().ESGD(params, lr=lr, seed=seed, hvp=FD_HVP[name])
    if name in ("adam", "adamw"):
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        # The fastest Adam torch offers on this device is the fair baseline.
        try:
            return cls(params, lr=lr, fused=True)
        except RuntimeError:
            return cls(params, lr=lr, foreach=True)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)
    if name in _peers.PEERS:
        return _peers.make(name, params, lr, seed)
    raise ValueError(f"unknown optimizer {name!r}")


def train_step(name: str, opt, batch_loss: Callable[[int], torch.Tensor], step: int) -> None:
    """One training step on minibatch `step`, driven as each optimizer documents."""
    if name in _peers.PEERS:
        _peers.train_step(name, opt, lambda: batch_loss(step))
        return
    if name in FD_HVP:
        def closure():
            opt.zero_grad(set_to_none=True)
            loss = batch_loss(step)
            loss.backward()
            return loss

        opt.step(closure)
        return
    opt.zero_grad(set_to_none=True)
    loss = batch_loss(step)
    if name.startswith("esgd"):
        opt.backward(loss)
    else:
        loss.backward()
    opt.step()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(task: tuple) -> dict:
    """Train one (problem, optimizer, lr, seed); time only the training steps, not the evaluations."""
    problem_name, opt_name, lr, seed, device_str, preset = task
    device = torch.device(device_str)
    problem = PROBLEMS[problem_name]
    steps = problem.steps[preset]
    inst = problem.instance(seed, device, preset)
    params = list(inst.module.parameters())
    opt = make_optimizer(opt_name, params, lr, seed, device)
    eval_every = max(1, steps // problem.eval_points)

    curve_steps, curve_loss, curve_time = [0], [inst.train_loss()], [0.0]
    train_seconds = 0.0
    diverged = not math.isfinite(curve_loss[0])
    step = 0
    while step < steps and not diverged:
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(min(eval_every, steps - step)):
            train_step(opt_name, opt, inst.batch_loss, step)
            step += 1
        _synchronize(device)
        train_seconds += time.perf_counter() - start
        value = inst.train_loss()
        curve_steps.append(step)
        curve_loss.append(value if math.isfinite(value) else math.inf)
        curve_time.append(train_seconds)
        diverged = not math.isfinite(value)
    test = None if diverged else inst.test_metric()
    return dict(problem=problem_name, optimizer=opt_name, lr=lr, seed=seed, steps=curve_steps,
                loss=curve_loss, time=curve_time, steps_done=step, train_seconds=train_seconds,
                final_loss=curve_loss[-1], test_metric=test, diverged=diverged)


def estimation_period(name: str) -> int:
    """Steps per Hessian-vector product of optimizer `name` in its steady state (1: first-order)."""
    if name.startswith("esgd"):
        return 10  # the library default update_d_every, after d_warmup
    return _peers.PEERS[name].period if name in _peers.PEERS else 1


def steady_block(optimizers: list[str], at_least: int) -> int:
    """The shortest block of >= `at_least` steps that holds a whole number of every optimizer's
    estimation periods, so each block amortizes exactly its share of Hessian-vector products."""
    period = math.lcm(*(estimation_period(o) for o in optimizers))
    return period * max(1, -(-at_least // period))


def measure_steady_step_times(problems: list[str], optimizers: list[str], device: torch.device,
                              preset: str, threads: int, rounds: int = 3, block: int = 30,
                              warmup: int = 20) -> dict:
    """Amortized step time after ESGD-M's estimation warm-up, every optimizer on the same model.

    The training runs' own timings include ESGD-M's first `d_warmup` estimation steps and whatever
    else the machine was doing. Here the optimizers take turns in this process: blocks of `block` steps
    (from `steady_block`: a whole number of every optimizer's estimation periods), `rounds` times, the
    fastest block kept, after `warmup` steps (20: past ESGD-M's d_warmup=20 estimation steps).
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = {}
        for problem_name in problems:
            problem = PROBLEMS[problem_name]
            trainers = []
            for opt_name in optimizers:
                inst = problem.instance(0, device, preset)
                # The smallest learning rate of the sweep: step cost does not depend on it, and it
                # keeps the parameters finite for the whole measurement.
                opt = make_optimizer(opt_name, list(inst.module.parameters()),
                                     min(LR_GRIDS[preset][opt_name]), 0, device)
                trainers.append((opt_name, inst, opt))
            step_index = {name: 0 for name in optimizers}

            def train(opt_name, inst, opt, n):
                for _ in range(n):
                    train_step(opt_name, opt, inst.batch_loss, step_index[opt_name])
                    step_index[opt_name] += 1

            for opt_name, inst, opt in trainers:
                train(opt_name, inst, opt, warmup)
            best = {name: math.inf for name in optimizers}
            for _ in range(rounds):
                for opt_name, inst, opt in trainers:
                    _synchronize(device)
                    start = time.perf_counter()
                    train(opt_name, inst, opt, block)
                    _synchronize(device)
                    best[opt_name] = min(best[opt_name], (time.perf_counter() - start) / block)
            for opt_name in optimizers:
                result[(problem_name, opt_name)] = 1e3 * best[opt_name]
        return result
    finally:
        torch.set_num_threads(previous_threads)


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def run_tasks(tasks: list[tuple], jobs: int, threads: int, progress: bool) -> list[dict]:
    from tqdm import tqdm

    bar = tqdm(total=len(tasks), desc="convergence runs", unit="run", disable=not progress,
               dynamic_ncols=True)
    results = []
    previous_threads = torch.get_num_threads()
    try:
        if jobs <= 1:
            torch.set_num_threads(threads)
            for task in tasks:
                bar.set_postfix_str(f"{task[0]} {task[1]} lr={task[2]:g} seed={task[3]}", refresh=False)
                results.append(run_one(task))
                bar.update()
        else:
            # spawn, not fork: forking a process that already ran OpenMP/intra-op threads can hang.
            ctx = mp.get_context("spawn")
            with ctx.Pool(jobs, initializer=_worker_init, initargs=(threads,)) as pool:
                for result in pool.imap_unordered(run_one, tasks):
                    results.append(result)
                    bar.update()
    finally:
        bar.close()
        torch.set_num_threads(previous_threads)
    return results


# ----------------------------------------------------------------------------------------- analysis

def _mean(values):
    values = list(values)
    if any(not math.isfinite(v) for v in values):
        return math.inf
    return sum(values) / len(values)


def aggregate(results: list[dict], steady_ms: dict | None = None) -> dict:
    """Per (problem, optimizer, lr): curves averaged over seeds; then the best lr per optimizer.

    `steady_ms` ({(problem, optimizer): ms}, from `measure_steady_step_times`) replaces the step time
    taken from the training runs where given.
    """
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["problem"], r["optimizer"], r["lr"]), []).append(r)
    sweeps: dict[tuple, dict] = {}
    for (problem, opt, lr), runs in groups.items():
        runs.sort(key=lambda r: r["seed"])
        n_points = max(len(r["steps"]) for r in runs)
        longest = max(runs, key=lambda r: len(r["steps"]))
        # A diverged seed stops early; it counts as infinite loss from there on.
        loss = [_mean(r["loss"][i] if i < len(r["loss"]) else math.inf for r in runs)
                for i in range(n_points)]
        # Timings take the minimum over seeds: the runs do the same work, and on a shared machine the
        # least disturbed one is the best estimate of what the optimizer costs.
        times = [min(r["time"][min(i, len(r["time"]) - 1)] for r in runs) for i in range(n_points)]
        finals = [r["final_loss"] for r in runs]
        tests = [r["test_metric"] for r in runs]
        completed = [r for r in runs if not r["diverged"]] or runs
        sweeps[(problem, opt, lr)] = dict(
            problem=problem, optimizer=opt, lr=lr, seeds=[r["seed"] for r in runs],
            steps=longest["steps"], loss=loss, time=times, final_loss=_mean(finals),
            final_loss_std=statistics.pstdev(finals) if all(map(math.isfinite, finals)) else math.inf,
            test_metric=None if any(t is None for t in tests) else statistics.fmean(tests),
            diverged=sum(r["diverged"] for r in runs),
            ms_per_step=1e3 * min(r["train_seconds"] / max(r["steps_done"], 1) for r in completed),
        )

    best: dict[tuple, dict] = {}
    for key, s in sweeps.items():
        k = (s["problem"], s["optimizer"])
        if k not in best or s["final_loss"] < best[k]["final_loss"]:
            best[k] = s

    summary = []
    problems = sorted({k[0] for k in best}, key=list(PROBLEMS).index)
    for problem in problems:
        opts = [o for o in OPTIMIZER_LABELS if (problem, o) in best]
        # Step time does not depend on the learning rate: use every completed run for it.
        run_ms = {o: min(s["ms_per_step"] for s in sweeps.values()
                         if s["problem"] == problem and s["optimizer"] == o)
                  for o in opts}
        step_ms = {o: (steady_ms or {}).get((problem, o), run_ms[o]) for o in opts}
        adam = best.get((problem, "adam"))
        target = adam["final_loss"] if adam and math.isfinite(adam["final_loss"]) else None
        for o in opts:
            s = best[(problem, o)]
            hit = None
            if target is not None:
                hit = next((i for i, v in enumerate(s["loss"]) if v <= target), None)
            summary.append(dict(
                problem=problem, optimizer=o, best_lr=s["lr"], final_loss=s["final_loss"],
                final_loss_std=s["final_loss_std"], test_metric=s["test_metric"],
                diverged_seeds=s["diverged"], n_seeds=len(s["seeds"]), target=target,
                steps_to_target=None if hit is None else s["steps"][hit],
                seconds_to_target=None if hit is None else s["time"][hit],
                ms_per_step=step_ms[o], run_ms_per_step=run_ms[o],
                step_time_vs_adam=step_ms[o] / step_ms["adam"] if "adam" in step_ms else None,
            ))
        adam_row = next((r for r in summary if r["problem"] == problem and r["optimizer"] == "adam"), None)
        for r in summary:
            if r["problem"] != problem:
                continue
            r["time_to_target_vs_adam"] = (
                r["seconds_to_target"] / adam_row["seconds_to_target"]
                if adam_row and r["seconds_to_target"] is not None and adam_row["seconds_to_target"]
                else None)
    return dict(sweeps=list(sweeps.values()), best=list(best.values()), summary=summary)


def _metric_str(problem: str, value) -> str:
    if value is None:
        return "—"
    if PROBLEMS[problem].metric == "test acc":
        return f"{100 * value:.1f}%"
    return fmt(value)


def to_markdown(result: dict) -> str:
    env = result["environment"]
    agg = result["aggregate"]
    parts = [f"## Convergence ({result['preset']}, {result['device']})", "", environment_markdown(env),
             f"- {result['n_seeds']} seeds per learning rate; learning rates: "
             + "; ".join(f"{OPTIMIZER_LABELS[o]} {', '.join(f'{lr:g}' for lr in lrs)}"
                         for o, lrs in result["lr_grid"].items()),
             f"- {len(result['runs'])} runs, {result['jobs']} worker process(es) x "
             f"{result['threads']} torch thread(s), wall time {result['elapsed_s']:.0f} s",
             "- Target = Adam's best mean final training loss; \"to target\" = first evaluation where "
             "the seed-mean training loss is <= target; seconds count training steps only "
             "(no evaluation), the minimum over seeds (the run least disturbed by other processes). "
             "ms/step: amortized steady-state training step (forward, backward, step), optimizers taking "
             f"turns in one process, best of {result.get('steady_rounds', 5)} blocks of "
             f"{result.get('steady_block', 30)} steps; the runs' own amortized step times (which include "
             "ESGD-M's 20 warm-up estimation steps) are in the JSON as run_ms_per_step.",
             "- Hessian-vector products, each optimizer on its library's default schedule: "
             + "; ".join(f"{OPTIMIZER_LABELS[o]} {_schedule(o)}" for o in result["lr_grid"]
                         if estimation_period(o) > 1 or o in _peers.PEERS), ""]
    headers = ["problem", "optimizer", "best lr", "final train loss", "test", "steps to target",
               "s to target", "time to target vs Adam", "ms/step", "step time vs Adam"]
    rows = []
    for r in agg["summary"]:
        loss = fmt(r["final_loss"])
        if math.isfinite(r["final_loss_std"]) and r["n_seeds"] > 1:
            loss += f" ± {fmt(r['final_loss_std'], 2)}"
        if r["diverged_seeds"]:
            loss += f" ({r['diverged_seeds']}/{r['n_seeds']} diverged)"
        rows.append([
            r["problem"], OPTIMIZER_LABELS[r["optimizer"]], f"{r['best_lr']:g}", loss,
            _metric_str(r["problem"], r["test_metric"]),
            "not reached" if r["steps_to_target"] is None else r["steps_to_target"],
            "not reached" if r["seconds_to_target"] is None else fmt(r["seconds_to_target"]),
            "—" if r["time_to_target_vs_adam"] is None else f"{r['time_to_target_vs_adam']:.2f}x",
            fmt(r["ms_per_step"]),
            "—" if r["step_time_vs_adam"] is None else f"{r['step_time_vs_adam']:.2f}x",
        ])
    parts.append(markdown_table(headers, rows))
    parts.append("")
    parts.append("Problems:")
    for name in result["problems"]:
        p = PROBLEMS[name]
        parts.append(f"- `{name}`: {p.description}; {p.steps[result['preset']]} steps"
                     + (f"; test metric: {p.metric}" if p.metric else ""))
    goals = goal_lines(agg["summary"])
    if goals:
        parts += ["", "Performance goals (measured, not asserted):"] + goals
    return "\n".join(parts) + "\n"


def _schedule(name: str) -> str:
    if name in FD_HVP:
        passes = 2 if name == "esgd-fd" else 3
        return (f"every 10th step after 20 warm-up estimates, each by {passes} forward+backward passes "
                f"(hvp={FD_HVP[name]!r}, default fd_step)")
    if name.startswith("esgd"):
        return "every 10th step after 20 warm-up estimates (update_d_every=10, d_warmup=20)"
    return _peers.PEERS[name].schedule


def goal_lines(summary: list[dict]) -> list[str]:
    esgd = [r for r in summary if r["optimizer"] == "esgd"]
    if not esgd or not any(r["step_time_vs_adam"] for r in esgd):
        return []
    lines = []
    within = [r for r in esgd if r["step_time_vs_adam"] is not None and r["step_time_vs_adam"] <= 1.10]
    lines.append(f"- Amortized step time <= 1.10x Adam: {len(within)}/{len(esgd)} problems ("
                 + ", ".join(f"{r['problem']} {r['step_time_vs_adam']:.2f}x" for r in esgd
                             if r["step_time_vs_adam"] is not None) + ")")
    faster = [r for r in esgd if r["time_to_target_vs_adam"] is not None and r["time_to_target_vs_adam"] < 1]
    lines.append(f"- Reaches Adam's best final loss in less wall-clock time than Adam: "
                 f"{len(faster)}/{len(esgd)} problems ("
                 + ", ".join(f"{r['problem']} "
                             + ("not reached" if r["time_to_target_vs_adam"] is None
                                else f"{r['time_to_target_vs_adam']:.2f}x")
                             for r in esgd) + ")")
    return lines


def plot(result: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = result["aggregate"]["best"]
    targets = {r["problem"]: r["target"] for r in result["aggregate"]["summary"]}
    problems = result["problems"]
    fig, axes = plt.subplots(2, len(problems), figsize=(3.6 * len(problems), 6.2), squeeze=False)
    for col, problem in enumerate(problems):
        for row, xkey in enumerate(("steps", "time")):
            ax = axes[row][col]
            for s in best:
                if s["problem"] != problem:
                    continue
                xs = s[xkey]
                ys = [v if math.isfinite(v) else float("nan") for v in s["loss"]]
                ax.plot(xs, ys, color=OPTIMIZER_COLORS[s["optimizer"]], lw=1.5,
                        label=f"{OPTIMIZER_LABELS[s['optimizer']]} lr={s['lr']:g}")
            if targets.get(problem) is not None:
                ax.axhline(targets[problem], color="k", ls=":", lw=1, label="target (Adam best)")
            curves = [s["loss"] for s in best if s["problem"] == problem]
            if all(v > 0 for c in curves for v in c):
                ax.set_yscale("log")
            # A diverging optimizer would otherwise stretch the axis over many decades.
            ax.set_ylim(top=3 * max(c[0] for c in curves))
            ax.set_xlabel("step" if xkey == "steps" else "training seconds")
            if col == 0:
                ax.set_ylabel("train loss (seed mean)")
            if row == 0:
                ax.set_title(problem, fontsize=10)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=8)
            if row == 0:
                ax.legend(fontsize=7)
    fig.suptitle(f"ESGD-M vs {', '.join(OPTIMIZER_LABELS[o] for o in result['lr_grid'] if o != 'esgd')}, "
                 f"best lr per optimizer, {result['n_seeds']} seeds "
                 f"({result['device']}, {result['preset']})", fontsize=11)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"convergence_{result['preset']}_{torch.device(result['device']).type}.png"
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return [path]


# ----------------------------------------------------------------------------------------- CLI

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--quick", dest="preset", action="store_const", const="quick",
                        help="default: every problem, short runs, 3 learning rates, 3 seeds")
    preset.add_argument("--full", dest="preset", action="store_const", const="full",
                        help="longer runs, half-decade lr sweep, 5 seeds")
    preset.add_argument("--smoke", dest="preset", action="store_const", const="smoke",
                        help="a few steps of everything, for CI")
    p.set_defaults(preset="quick")
    p.add_argument("--problems", nargs="+", default=None, choices=list(PROBLEMS), metavar="PROBLEM",
                   help=f"subset of: {', '.join(PROBLEMS)}")
    p.add_argument("--optimizers", nargs="+", default=DEFAULT_OPTIMIZERS, choices=list(OPTIMIZER_LABELS),
                   metavar="OPT", help=f"any of: {', '.join(OPTIMIZER_LABELS)} (default: "
                   f"{' '.join(DEFAULT_OPTIMIZERS)}; adam sets the target)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per learning rate (default: preset)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, or auto")
    p.add_argument("--jobs", type=int, default=None,
                   help="parallel worker processes (default: one per core on CPU, 1 on CUDA)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per worker (default: cores / jobs)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=OUT_HELP)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bar")
    args = p.parse_args(argv)
    args.command = command_line("convergence.py", argv)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    cores = os.cpu_count() or 1
    if args.jobs is not None and args.jobs < 1:
        raise SystemExit(f"--jobs must be >= 1, got {args.jobs}")
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")
    if args.seeds is not None and args.seeds < 1:
        raise SystemExit(f"--seeds must be >= 1, got {args.seeds}")
    # These models are small: one thread each, with one run per core, uses a CPU far better than
    # several threads fighting over one tiny matmul. A GPU runs one job at a time.
    jobs = args.jobs or (1 if device.type == "cuda" or args.preset == "smoke" else min(cores, 8))
    threads = args.threads or max(1, cores // jobs)
    problems = args.problems or list(PROBLEMS)
    n_seeds = args.seeds or SEEDS[args.preset]
    grid = {o: LR_GRIDS[args.preset][o] for o in args.optimizers}
    absent = _peers.missing(grid)
    if absent:
        raise SystemExit(f"--optimizers: the peers {', '.join(o for o in grid if o in _peers.PEERS)} need "
                         f"{' '.join(absent)} (pip install {' '.join(absent)}, or scripts/setup.sh); "
                         f"or leave them out with --optimizers {' '.join(o for o in grid if o not in _peers.PEERS)}")

    tasks = [(problem, opt, lr, seed, str(device), args.preset)
             for problem in problems
             for seed in range(n_seeds)
             for opt, lrs in grid.items()
             for lr in lrs]
    # Longest problems first, so the last worker to finish is not stuck with a long tail.
    cost = {"char-transformer": 0, "digits-autoencoder": 1, "digits-mlp": 2}
    tasks.sort(key=lambda t: cost.get(t[0], 3))

    env = environment(device, command=args.command)
    started = time.perf_counter()
    runs = run_tasks(tasks, jobs, threads, args.progress)
    steady_rounds = 1 if args.preset == "smoke" else 5
    block = steady_block(list(grid), 10 if args.preset == "smoke" else 30)
    # --smoke only checks that the measurement runs: no warm-up past ESGD-M's estimation phase.
    steady = measure_steady_step_times(problems, list(grid), device, args.preset, threads,
                                       rounds=steady_rounds, block=block,
                                       warmup=2 if args.preset == "smoke" else 20)
    elapsed = time.perf_counter() - started
    env["load_avg_end"] = load_average()
    runs.sort(key=lambda r: (problems.index(r["problem"]), list(grid).index(r["optimizer"]), r["lr"], r["seed"]))
    result = dict(environment=env, preset=args.preset, device=str(device), problems=problems,
                  lr_grid=grid, n_seeds=n_seeds, jobs=jobs, threads=threads, elapsed_s=elapsed,
                  steady_rounds=steady_rounds, steady_block=block,
                  aggregate=aggregate(runs, steady), runs=runs)
    markdown = to_markdown(result)
    stem = f"convergence_{args.preset}_{device.type}"
    json_path, md_path = write_outputs(args.out, stem, result, markdown)
    pngs = plot(result, args.out)
    print(markdown)
    print(f"wrote {md_path}, {json_path}, {', '.join(map(str, pngs))}", file=sys.stderr)
    result["outputs"] = dict(json=json_path, markdown=md_path, png=pngs)
    return result


if __name__ == "__main__":
    main()
