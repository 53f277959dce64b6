"""What an estimation step costs, exact (double backward) vs finite differences, against Adam.

Two models, each measured in one process with the optimizers taking turns (the machine's noise hits
all of them alike; the fastest of several blocks is kept):

- `mlp`: a wide tanh MLP (784-2304-2304-2304-10, 12.5M parameters, batch 100). Reports the bare
  passes an estimation step needs (forward + double backward for the exact product; 2 or 3 forward +
  backward passes for a forward or central difference), the whole estimation step
  (`opt.backward(loss); opt.step()` or `opt.step(closure)`), the overhead of the step beyond its
  passes, the plain step, fused Adam's step, and the amortized ESGD-M step (one estimation step in
  `update_d_every`=10) as a multiple of Adam's.
- `char-lm`: the convergence benchmark's char transformer written with F.scaled_dot_product_attention.
  Finite differences run it as users write it (default SDPA backend, `torch.compile`), against Adam on
  the same compiled model; the exact product needs the math backend and eager mode, and runs beside it.
  Peak memory of one estimation step at a longer context, exact vs finite difference: the growth of
  the process's peak RSS (CPU; each measurement in a fresh process) or torch.cuda.max_memory_allocated.

The MLP table also counts minor page faults per call. A finite-difference step holds a second set of
gradients while the first is alive; on CPU, glibc's malloc returns that memory to the system when it
is freed and takes fresh, zero-filled pages again on the next estimation step. Running with
MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_MMAP_THRESHOLD_=33554432 (or jemalloc/tcmalloc) keeps it
(CUDA's caching allocator always does).

    python benchmarks/fd_cost.py                  # both, on CPU (or CUDA when present)
    python benchmarks/fd_cost.py --smoke          # seconds; what CI runs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

try:
    import resource
except ImportError:  # not on Windows
    resource = None
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from _common import (DEFAULT_OUT, command_line, environment, environment_markdown, fmt, import_esgd, load_average,
                     markdown_table, resolve_device, write_outputs)

PRESETS = {
    "smoke": dict(mlp=(64, [96, 96], 10, 8), lm=dict(d=16, heads=2, layers=1, ctx=16, batch=4), mem_ctx=32,
                  rounds=1, block=10, compile=False),
    "default": dict(mlp=(784, [2304, 2304, 2304], 10, 100), lm=dict(d=128, heads=4, layers=2, ctx=128, batch=8),
                    mem_ctx=512, rounds=7, block=10, compile=True),
}
EVERY = 10  # update_d_every: one estimation step per block of 10


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _minor_faults():
    """The process's minor page faults so far (first touches of fresh memory; 0 where unknown)."""
    if resource is None:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def best_times(fns, device, rounds, reps=3, faults=None):
    """{name: seconds per call}: the functions take turns, `rounds` times `reps` calls each, and each
    keeps its fastest round. Taking turns spreads the machine's noise over all of them alike, and
    other processes only ever add time. `faults`, a dict, gets each function's minor page faults per
    call, over all its timed calls."""
    for fn in fns.values():
        fn()
    best = {name: math.inf for name in fns}
    counted = {name: 0 for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync(device)
            before = _minor_faults()
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            _sync(device)
            best[name] = min(best[name], (time.perf_counter() - start) / reps)
            counted[name] += _minor_faults() - before
    if faults is not None:
        faults.update({name: n / (rounds * reps) for name, n in counted.items()})
    return best


# ------------------------------------------------------------------------------------------ MLP

def make_mlp(spec, device, seed=0):
    d_in, hidden, d_out, batch = spec
    torch.manual_seed(seed)
    layers, prev = [], d_in
    for h in hidden:
        layers += [nn.Linear(prev, h), nn.Tanh()]
        prev = h
    layers.append(nn.Linear(prev, d_out))
    model = nn.Sequential(*layers).to(device)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, d_in, generator=gen).to(device)
    y = torch.randint(0, d_out, (batch,), generator=gen).to(device)
    return model, lambda: F.cross_entropy(model(x), y)


def measure_mlp(preset, device, esgd):
    spec = PRESETS[preset]["mlp"]
    rounds = PRESETS[preset]["rounds"]
    model, loss_fn = make_mlp(spec, device)
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)

    def fb():
        for p in params:
            p.grad = None
        loss_fn().backward()

    def double_backward():
        loss = loss_fn()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        torch.autograd.grad(grads, params, grad_outputs=[torch.ones_like(g) for g in grads])

    def esgd_opt(hvp):
        return esgd.ESGD(params, lr=1e-4, hvp=hvp, d_warmup=10**9, update_d_every=1, seed=0)

    exact = esgd_opt("autograd")

    def exact_step():
        exact.zero_grad()
        exact.backward(loss_fn())
        exact.step()

    def fd_step(opt):
        def closure():
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            return loss

        return lambda: opt.step(closure)

    # State starts on the first (estimation) step; every later step is plain.
    plain = esgd.ESGD(params, lr=1e-4, d_warmup=0, update_d_every=10**9, seed=0)
    plain.zero_grad()
    plain.backward(loss_fn())
    plain.step()

    def plain_step():
        plain.zero_grad()
        loss_fn().backward()
        plain.step()

    try:
        adam = torch.optim.Adam(params, lr=1e-4, fused=True)
    except RuntimeError:
        adam = torch.optim.Adam(params, lr=1e-4, foreach=True)

    def adam_step():
        adam.zero_grad()
        loss_fn().backward()
        adam.step()

    faults = {}
    rows = best_times({
        "forward+backward": fb,
        "forward+double backward (exact passes)": double_backward,
        "ESGD-M exact estimation step": exact_step,
        "ESGD-M forward-difference estimation step": fd_step(esgd_opt("finite_difference")),
        "ESGD-M central-difference estimation step": fd_step(esgd_opt("central_difference")),
        "ESGD-M plain step": plain_step,
        "Adam (fused) step": adam_step,
    }, device, rounds, faults=faults)
    fbt = rows["forward+backward"]
    passes = {"exact": rows["forward+double backward (exact passes)"], "forward": 2 * fbt, "central": 3 * fbt}
    steps = {"exact": rows["ESGD-M exact estimation step"],
             "forward": rows["ESGD-M forward-difference estimation step"],
             "central": rows["ESGD-M central-difference estimation step"]}
    summary = {}
    # What a plain step adds to its forward+backward: the update itself, which every step pays.
    plain_update = rows["ESGD-M plain step"] - fbt
    for mode in ("exact", "forward", "central"):
        amortized = (steps[mode] + (EVERY - 1) * rows["ESGD-M plain step"]) / EVERY
        extra = steps[mode] - passes[mode]
        summary[mode] = dict(passes_ms=1e3 * passes[mode], step_ms=1e3 * steps[mode],
                             overhead_ms=1e3 * extra, overhead_fraction=extra / passes[mode],
                             estimation_overhead_fraction=(extra - plain_update) / passes[mode],
                             amortized_ms=1e3 * amortized, amortized_vs_adam=amortized / rows["Adam (fused) step"])
    return dict(params=n_params, spec=list(map(str, spec)), times_ms={k: 1e3 * v for k, v in rows.items()},
                page_faults=faults, modes=summary, plain_vs_adam=rows["ESGD-M plain step"] / rows["Adam (fused) step"])


# ------------------------------------------------------------------------------------------ char LM

class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class CharLM(nn.Module):
    def __init__(self, vocab, d, heads, layers, ctx):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(ctx, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def char_data(device):
    from convergence import _stdlib_text

    train, _, vocab = _stdlib_text(str(device))
    return train, vocab


def lm_setup(cfg, device, seed=0):
    train, vocab = char_data(device)
    torch.manual_seed(seed)
    model = CharLM(vocab, cfg["d"], cfg["heads"], cfg["layers"], cfg["ctx"]).to(device)
    gen = torch.Generator().manual_seed(seed + 7)
    offsets = torch.arange(cfg["ctx"] + 1, device=device)

    def batch():
        starts = torch.randint(0, len(train) - cfg["ctx"] - 1, (cfg["batch"],), generator=gen).to(device)
        w = train[starts[:, None] + offsets]
        return w[:, :-1], w[:, 1:]

    return model, batch


def measure_lm(preset, device, esgd):
    """Amortized training step (10 steps: one estimation, nine plain) of each optimizer."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cfg = PRESETS[preset]["lm"]
    rounds, block = PRESETS[preset]["rounds"], PRESETS[preset]["block"]
    runs = {}

    def trainer(kind):
        # "<estimator>@1/4": Hz from a curvature closure on the first quarter of each batch.
        kind, _, sub = kind.partition("@")
        model, batch = lm_setup(cfg, device)
        compiled = kind != "exact" or bool(sub)
        fwd = torch.compile(model) if compiled and PRESETS[preset]["compile"] else model
        params = list(model.parameters())
        if kind == "adam":
            try:
                opt = torch.optim.Adam(params, lr=1e-4, fused=True)
            except RuntimeError:
                opt = torch.optim.Adam(params, lr=1e-4, foreach=True)
        else:
            opt = esgd.ESGD(params, lr=1e-3, hvp="autograd" if kind == "exact" else kind, seed=0)

        def loss_of(x, y, net=fwd):
            return F.cross_entropy(net(x).flatten(0, 1), y.flatten())

        def step():
            x, y = batch()
            if kind == "exact" and not sub:
                with sdpa_kernel(SDPBackend.MATH):
                    opt.zero_grad()
                    opt.backward(loss_of(x, y))
                opt.step()
                return

            def closure():
                opt.zero_grad()
                loss = loss_of(x, y)
                if kind == "adam":
                    loss.backward()
                else:
                    opt.backward(loss)  # a plain backward, also for the exact estimator with a curvature closure
                return loss

            def curvature_closure():
                n = max(1, len(x) // 4)
                opt.zero_grad()
                if kind == "exact":
                    # The double backward needs the eager model and the math kernel: only here.
                    with sdpa_kernel(SDPBackend.MATH):
                        loss = loss_of(x[:n], y[:n], net=model)
                        opt.backward(loss)
                else:
                    loss = loss_of(x[:n], y[:n])
                    loss.backward()
                return loss

            if kind == "adam":
                closure()
                opt.step()
            else:
                opt.step(closure, curvature_closure=curvature_closure if sub else None)

        return step

    kinds = {"adam": "Adam (fused), compiled, default SDPA",
             "finite_difference": "ESGD-M forward difference, compiled, default SDPA",
             "central_difference": "ESGD-M central difference, compiled, default SDPA",
             "exact": "ESGD-M exact (double backward), eager, math SDPA",
             "finite_difference@1/4": "ESGD-M forward difference, curvature from 1/4 of the batch, compiled",
             "central_difference@1/4": "ESGD-M central difference, curvature from 1/4 of the batch, compiled",
             "exact@1/4": "ESGD-M exact, curvature from 1/4 of the batch (eager, math SDPA; the step compiled)"}
    steps = {k: trainer(k) for k in kinds}
    for k, step in steps.items():
        for _ in range(20 + 2):  # past d_warmup=20 and compilation
            step()
    best = {k: math.inf for k in kinds}
    for _ in range(rounds):
        for k, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(block):
                step()
            _sync(device)
            best[k] = min(best[k], (time.perf_counter() - start) / block)
    adam = best["adam"]
    for k, label in kinds.items():
        runs[k] = dict(label=label, ms_per_step=1e3 * best[k], vs_adam=best[k] / adam)
    return dict(config=cfg, amortized=runs)


def memory_child(args):
    """One estimation step in this fresh process; prints JSON with the peak-memory growth."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = torch.device(args.device)
    esgd = import_esgd()
    cfg = dict(PRESETS[args.preset]["lm"], ctx=PRESETS[args.preset]["mem_ctx"])
    model, batch = lm_setup(cfg, device)
    x, y = batch()
    opt = esgd.ESGD(model.parameters(), lr=1e-3, seed=0,
                    hvp="autograd" if args.memory in ("exact", "plain") else args.memory)
    # The first step, measured alone in a fresh process: what it allocates on top of the model, the
    # batch and the optimizer (its state is a few MiB here, against hundreds for the activations).
    def run(kind):
        if kind == "plain":
            opt.zero_grad()
            F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        elif kind == "exact":
            with sdpa_kernel(SDPBackend.MATH):
                opt.zero_grad()
                opt.backward(F.cross_entropy(model(x).flatten(0, 1), y.flatten()))
            opt.step()
        else:
            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
                loss.backward()
                return loss

            opt.step(closure)

    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _reset_peak_rss()
    run(args.memory)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        grown = torch.cuda.max_memory_allocated(device) - base
    else:
        grown = _peak_rss() - base
    print(json.dumps(dict(kind=args.memory, ctx=cfg["ctx"], grown_mib=grown / 2**20)))


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss():
    """The current RSS in bytes, after making it the process's peak (VmHWM), so that the peak read
    after the step is that step's own (Linux: writing 5 to /proc/self/clear_refs resets VmHWM)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


def _peak_rss():
    return _status_kib("VmHWM") * 1024


def measure_memory(preset, device, esgd):
    out = {}
    # The child must import the esgd_cuda this process measures, installed or not.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(esgd.__file__).resolve().parent.parent)]
                                        + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    for kind in ("plain", "exact", "finite_difference", "central_difference"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory", kind, "--preset", preset,
               "--device", str(device)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
        if res.returncode != 0:
            raise RuntimeError(f"memory measurement {kind} failed:\n{res.stderr[-3000:]}")
        out[kind] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


# ------------------------------------------------------------------------------------------ report

def to_markdown(result):
    env = result["environment"]
    lines = ["# Estimation-step cost: exact vs finite differences", "", environment_markdown(env), ""]
    mlp = result["mlp"]
    lines += [f"## MLP ({mlp['params'] / 1e6:.1f}M parameters, {' / '.join(mlp['spec'])})", "",
              markdown_table(["what", "ms", "page faults / call"],
                             [[k, fmt(v), f"{mlp['page_faults'][k]:.0f}"] for k, v in mlp["times_ms"].items()]),
              "", "Page faults: minor faults per call (first touches of memory the allocator got fresh from the "
              "system), averaged over every timed call.", ""]
    rows = []
    for mode, s in mlp["modes"].items():
        rows.append([mode, fmt(s["passes_ms"]), fmt(s["step_ms"]), fmt(s["overhead_ms"]),
                     f"{100 * s['overhead_fraction']:.0f}%", f"{100 * s['estimation_overhead_fraction']:.0f}%",
                     fmt(s["amortized_ms"]), f"{s['amortized_vs_adam']:.2f}x"])
    lines += [markdown_table(["estimator", "passes ms", "estimation step ms", "overhead ms", "overhead / passes",
                              "overhead beyond a plain step's update / passes", "amortized step ms (1 in 10)",
                              "vs Adam (fused)"], rows), "",
              f"Plain step vs Adam (fused): {mlp['plain_vs_adam']:.2f}x", ""]
    lm = result["lm"]
    cfg = lm["config"]
    lines += [f"## Char transformer (d={cfg['d']}, {cfg['layers']} layers, context {cfg['ctx']}, "
              f"batch {cfg['batch']}): amortized training step", "",
              markdown_table(["optimizer", "ms/step", "vs Adam"],
                             [[r["label"], fmt(r["ms_per_step"]), f"{r['vs_adam']:.2f}x"]
                              for r in lm["amortized"].values()]), ""]
    mem = result["memory"]
    ctx = next(iter(mem.values()))["ctx"]
    how = "torch.cuda.max_memory_allocated" if env["device"].startswith("cuda") else "peak RSS growth"
    lines += [f"## Peak memory of one step at context {ctx} ({how}, fresh process each)", "",
              markdown_table(["step", "MiB"], [[k, fmt(v["grown_mib"])] for k, v in mem.items()]), ""]
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=list(PRESETS), default="default")
    ap.add_argument("--smoke", action="store_const", const="smoke", dest="preset")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--only", choices=["mlp", "lm", "memory"], nargs="*", default=None)
    ap.add_argument("--_memory", dest="memory", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory:
        args.device = str(resolve_device(args.device))
        memory_child(args)
        return None
    device = resolve_device(args.device)
    esgd = import_esgd()
    env = environment(device, command=command_line("fd_cost.py", argv))
    only = set(args.only or ["mlp", "lm", "memory"])
    result = dict(environment=env, preset=args.preset)
    result["mlp"] = measure_mlp(args.preset, device, esgd) if "mlp" in only else None
    result["lm"] = measure_lm(args.preset, device, esgd) if "lm" in only else None
    result["memory"] = measure_memory(args.preset, device, esgd) if "memory" in only else None
    env["load_avg_end"] = load_average()
    markdown = to_markdown(result) if only == {"mlp", "lm", "memory"} else json.dumps(result, indent=1, default=str)
    stem = f"fd_cost_{args.preset}_{device.type}"
    json_path, md_path = write_outputs(args.out, stem, result, markdown)
    print(markdown)
    result["outputs"] = dict(json=json_path, markdown=md_path)
    return result


if __name__ == "__main__":
    main()
