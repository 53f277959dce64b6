"""Sub-batch curvature on a real-text language model: ESGD-M (exact, forward and central difference,
curvature from 1, 1/2, 1/4 and 1/8 of each batch, `update_d_every` 10 and 20) against AdamW (an lr
sweep), on wall-clock time to AdamW's best validation loss.

The model is a byte-level GPT (d=128, 3 layers, 4 heads, context 64, batch 32) with the default
`F.scaled_dot_product_attention`. The text is English prose that ships with Python, the reference
manual's topics in `pydoc_data.topics` (about 466 KB), or any UTF-8 file given with `--text`; the
last tenth is the validation split. Every optimizer sees the same batches for a given seed.

ESGD-M's curvature closure evaluates the first fraction of the step's batch:
`opt.step(closure, curvature_closure=...)`; a fraction of 1 is the closure alone (today's path). The
exact estimator needs a double backward, which the default (fused) SDPA kernels lack: its Hz passes
run under the math backend (`sdpa_kernel(SDPBackend.MATH)`), the rest of the step under the default.

Reported per setting (mean over seeds): the final validation loss (and its range), the amortized step
time over the whole run (warm-up estimates included) and in steady state (the last half), both as a
multiple of AdamW's in the same run, and the time and steps to AdamW's best validation loss (the
lowest mean final loss of the lr sweep) as a multiple of AdamW's own.

    python benchmarks/lm_curvature.py                       # the whole grid: about an hour on 2 cores
    python benchmarks/lm_curvature.py --estimators finite_difference --fractions 1 0.25 --every 10
    python benchmarks/lm_curvature.py --text some_book.txt  # another text (a held-out check)
    python benchmarks/lm_curvature.py --estimators autograd --fractions 1 --every 10 \
        --state-dtypes float32 bfloat16                     # 16-bit optimizer state against float32
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from _common import (DEFAULT_OUT, OUT_HELP, command_line, environment, environment_markdown, fmt, import_esgd,
                     load_average, markdown_table, write_outputs)

ESTIMATORS = ("autograd", "finite_difference", "central_difference")
# ESGD's state_dtype: m and D in float32 (the default) or bfloat16 (stochastically rounded).
STATE_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}
LABELS = {"autograd": "exact", "finite_difference": "forward", "central_difference": "central"}
PRESETS = {
    # d, layers, heads, context, batch, steps, eval_every, eval_windows
    "default": dict(d=128, layers=3, heads=4, context=64, batch=32, steps=600, eval_every=25, eval_windows=256),
    "smoke": dict(d=32, layers=1, heads=2, context=16, batch=8, steps=24, eval_every=8, eval_windows=16),
}


def pydoc_text() -> bytes:
    """The Python reference manual's topics (English prose with code samples), shipped with Python."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")


def load_corpus(path: Path | None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(train bytes, validation bytes, description): the last tenth validates."""
    raw = pydoc_text() if path is None else path.read_bytes()
    if len(raw) < 20_000:
        raise SystemExit(f"--text: {len(raw)} bytes is too little text for a language model (need 20 KB)")
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    cut = int(0.9 * len(data))
    name = "pydoc_data.topics (Python's reference manual)" if path is None else str(path)
    return data[:cut], data[cut:], f"{name}, {len(raw)} bytes"


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (u.view(b, t, self.heads, c // self.heads).transpose(1, 2)
                   for u in self.qkv(self.ln1(x)).split(c, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, d: int, layers: int, heads: int, context: int, vocab: int = 256):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def lm_loss(model, x, y):
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def windows(data: torch.Tensor, starts: torch.Tensor, context: int):
    w = data[starts[:, None] + torch.arange(context + 1)]
    return w[:, :-1], w[:, 1:]


def math_sdpa():
    """The math SDPA backend, which has a double backward (the default fused kernels do not)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def config_name(cfg: dict) -> str:
    if cfg["opt"] == "adamw":
        return f"AdamW lr={cfg['lr']:g}"
    frac = "1" if cfg["fraction"] == 1 else f"1/{round(1 / cfg['fraction'])}"
    lr = f", lr {cfg['lr']:g}" if cfg.get("name_lr") else ""
    state = ", bf16 state" if cfg.get("state_dtype", "float32") == "bfloat16" else ""
    return f"ESGD-M {LABELS[cfg['hvp']]}, curvature {frac}, every {cfg['every']}{lr}{state}"


def make_step(cfg: dict, model, params, seed: int):
    """(optimizer, step(x, y) -> loss) for one configuration."""
    if cfg["opt"] == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg["lr"])

        def adamw_step(x, y):
            opt.zero_grad()
            loss = lm_loss(model, x, y)
            loss.backward()
            opt.step()
            return loss

        return opt, adamw_step

    esgd_cuda = import_esgd()
    opt = esgd_cuda.ESGD(params, lr=cfg["lr"], hvp=cfg["hvp"], update_d_every=cfg["every"], seed=seed,
                         state_dtype=STATE_DTYPES[cfg.get("state_dtype", "float32")])

    def closure_on(x, y):
        def closure():
            opt.zero_grad()
            # Only the exact estimator's Hz passes need the math kernel (should_create_graph() is
            # True exactly there, also inside a curvature closure).
            with math_sdpa() if opt.should_create_graph() else contextlib.nullcontext():
                loss = lm_loss(model, x, y)
                opt.backward(loss)
            return loss
        return closure

    def esgd_step(x, y):
        curvature = None
        if cfg["fraction"] < 1:
            n = max(1, round(len(x) * cfg["fraction"]))
            curvature = closure_on(x[:n], y[:n])
        return opt.step(closure_on(x, y), curvature_closure=curvature)

    return opt, esgd_step


def run_one(cfg: dict, seed: int, corpus, shape: dict) -> dict:
    train, val, _ = corpus
    torch.manual_seed(seed)
    model = GPT(shape["d"], shape["layers"], shape["heads"], shape["context"])
    _, step = make_step(cfg, model, list(model.parameters()), seed)
    ctx = shape["context"]
    eval_starts = torch.linspace(0, len(val) - ctx - 2, shape["eval_windows"]).long()
    eval_x, eval_y = windows(val, eval_starts, ctx)

    def validate() -> float:
        model.eval()
        with torch.no_grad():
            total = sum(lm_loss(model, xb, yb).item() * len(xb)
                        for xb, yb in zip(eval_x.split(64), eval_y.split(64)))
        model.train()
        return total / len(eval_x)

    times, losses, curve = [], [], []
    elapsed = 0.0
    for s in range(shape["steps"]):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + s)
        x, y = windows(train, torch.randint(0, len(train) - ctx - 1, (shape["batch"],), generator=gen), ctx)
        t0 = time.perf_counter()
        loss = step(x, y)
        dt = time.perf_counter() - t0
        elapsed += dt
        times.append(dt)
        losses.append(float(loss.detach()))
        if (s + 1) % shape["eval_every"] == 0 or s + 1 == shape["steps"]:
            curve.append((s + 1, validate(), elapsed))
    return dict(config=cfg, name=config_name(cfg), seed=seed, step_times=times, train_losses=losses, curve=curve,
                final_val=curve[-1][1])


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def first_crossing(curve: list, target: float):
    """(steps, seconds) at the first evaluation at or below target, or (None, None)."""
    for step, value, seconds in curve:
        if value <= target:
            return step, seconds
    return None, None


def aggregate(runs: list[dict]) -> dict:
    names = list(dict.fromkeys(r["name"] for r in runs))
    by_name = {n: [r for r in runs if r["name"] == n] for n in names}
    adamw = [n for n in names if by_name[n][0]["config"]["opt"] == "adamw"]
    if not adamw:
        raise ValueError("aggregate: no AdamW run to compare with")
    seeds = sorted({r["seed"] for r in runs})

    def mean_curve(rs):
        # Seeds share the evaluation steps: average loss and cumulative time point by point.
        return [(rs[0]["curve"][i][0], _mean([r["curve"][i][1] for r in rs]), _mean([r["curve"][i][2] for r in rs]))
                for i in range(len(rs[0]["curve"]))]

    def step_time(r, steady):
        t = r["step_times"]
        t = t[len(t) // 2:] if steady else t
        return sum(t) / len(t)

    # Step times against AdamW's of the same seed (the runs of a seed were interleaved), then averaged.
    adamw_time = {(s, steady): _mean([step_time(r, steady) for n in adamw for r in by_name[n] if r["seed"] == s])
                  for s in seeds for steady in (False, True)}
    best_adamw = min(adamw, key=lambda n: _mean([r["final_val"] for r in by_name[n]]))
    target = _mean([r["final_val"] for r in by_name[best_adamw]])
    adamw_steps, adamw_seconds = first_crossing(mean_curve(by_name[best_adamw]), target)
    rows = []
    for n in names:
        rs = by_name[n]
        steps, seconds = first_crossing(mean_curve(rs), target)
        finals = [r["final_val"] for r in rs]
        rows.append(dict(
            name=n, config=rs[0]["config"], seeds=len(rs), final_val=_mean(finals), final_min=min(finals),
            final_max=max(finals),
            step_ms=1e3 * _mean([step_time(r, False) for r in rs]),
            step_ratio=_mean([step_time(r, False) / adamw_time[(r["seed"], False)] for r in rs]),
            steady_ratio=_mean([step_time(r, True) / adamw_time[(r["seed"], True)] for r in rs]),
            steps_to_target=steps,
            time_to_target_ratio=None if seconds is None else seconds / adamw_seconds,
        ))
    return dict(target=target, best_adamw=best_adamw, adamw_steps_to_target=adamw_steps,
                adamw_seconds_to_target=adamw_seconds, rows=rows)


def goal_lines(agg: dict) -> list[str]:
    quarter = [r for r in agg["rows"] if r["config"]["opt"] == "esgd" and r["config"]["fraction"] == 0.25]
    if not quarter:
        return []
    lines = ["Goals (curvature from a quarter of each batch):"]
    for r in quarter:
        t = r["time_to_target_ratio"]
        lines.append(f"- {r['name']}: amortized step {r['step_ratio']:.3f}x AdamW (steady {r['steady_ratio']:.3f}x; "
                     f"goal <= 1.05x: {'met' if r['step_ratio'] <= 1.05 else 'not met'}), time to AdamW's best loss "
                     + ("not reached" if t is None else f"{t:.2f}x AdamW's")
                     + f" (goal <= 0.70x: {'met' if t is not None and t <= 0.70 else 'not met'})")
    return lines


def to_markdown(result: dict) -> str:
    agg = result["aggregate"]
    shape = result["shape"]
    headers = ["setting", "final val loss (nats/byte)", "range over seeds", "steps to target",
               "time to target vs AdamW", "amortized step vs AdamW", "steady step vs AdamW", "step (ms)"]
    rows = [[r["name"], fmt(r["final_val"], 4), f"{fmt(r['final_min'], 4)}-{fmt(r['final_max'], 4)}",
             fmt(r["steps_to_target"]), "—" if r["time_to_target_ratio"] is None else f"{r['time_to_target_ratio']:.2f}x",
             f"{r['step_ratio']:.3f}x", f"{r['steady_ratio']:.3f}x", f"{r['step_ms']:.1f}"] for r in agg["rows"]]
    lines = [
        "# Sub-batch curvature on a byte-level GPT",
        "",
        environment_markdown(result["environment"]),
        f"- Text: {result['corpus']}",
        f"- Model: GPT d={shape['d']}, {shape['layers']} layers, {shape['heads']} heads, context {shape['context']}, "
        f"batch {shape['batch']}, {result['n_params']} parameters, default SDPA; {shape['steps']} steps, "
        f"{result['n_seeds']} seeds; validation on {shape['eval_windows']} windows every {shape['eval_every']} steps",
        f"- Target: AdamW's best validation loss, {agg['target']:.4f} ({agg['best_adamw']}, reached at step "
        f"{agg['adamw_steps_to_target']}); ESGD-M lr {', '.join(f'{lr:g}' for lr in result['esgd_lr'])}, "
        "other settings at their defaults",
        f"- Wall time of the whole run: {result['elapsed_s'] / 60:.1f} min",
        "",
        markdown_table(headers, rows),
        "",
        *goal_lines(agg),
    ]
    return "\n".join(lines)


def configurations(args) -> list[dict]:
    esgd = [dict(opt="esgd", hvp=h, fraction=f, every=e, lr=lr, name_lr=len(args.esgd_lr) > 1, state_dtype=sd)
            for h in args.estimators for e in args.every for f in args.fractions for lr in args.esgd_lr
            for sd in args.state_dtypes]
    adamw = [dict(opt="adamw", lr=lr) for lr in args.adamw_lrs]
    # AdamW's runs spread over the others, so that a machine that drifts slows both alike.
    out, gap = [], max(1, len(esgd) // max(1, len(adamw)))
    for i, a in enumerate(adamw):
        out += [a] + esgd[i * gap:(i + 1) * gap]
    return out + esgd[len(adamw) * gap:]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", dest="preset", action="store_const", const="smoke", default="default",
                   help="a tiny model and a few steps of everything, for CI")
    p.add_argument("--text", type=Path, default=None, help="a UTF-8 text file (default: pydoc_data.topics)")
    p.add_argument("--estimators", nargs="+", choices=ESTIMATORS, default=list(ESTIMATORS))
    p.add_argument("--fractions", nargs="+", type=float, default=[1.0, 0.5, 0.25, 0.125],
                   help="curvature batch as a fraction of the step's batch (1: the closure alone)")
    p.add_argument("--every", nargs="+", type=int, default=[10, 20], help="update_d_every values")
    p.add_argument("--esgd-lr", nargs="+", type=float, default=[0.3], help="ESGD-M learning rate(s)")
    p.add_argument("--state-dtypes", "--state-dtype", nargs="+", choices=list(STATE_DTYPES), default=["float32"],
                   help="ESGD's state_dtype (m and D): float32 (default) and/or bfloat16")
    p.add_argument("--adamw-lrs", nargs="+", type=float, default=[1e-3, 3e-3, 1e-2])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--first-seed", type=int, default=0,
                   help="seeds are first-seed .. first-seed + seeds - 1 (more seeds for an earlier run's settings)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: preset)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=OUT_HELP)
    args = p.parse_args(argv)
    for f in args.fractions:
        if not 0 < f <= 1:
            p.error(f"--fractions: {f} is not in (0, 1]")
    if args.seeds < 1:
        p.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.first_seed < 0:
        p.error(f"--first-seed must be >= 0, got {args.first_seed}")
    args.command = command_line("lm_curvature.py", argv)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    shape = dict(PRESETS[args.preset])
    if args.steps is not None:
        shape["steps"] = args.steps
    corpus = load_corpus(args.text)
    env = environment(torch.device("cpu"), command=args.command)
    configs = configurations(args)
    started = time.perf_counter()
    runs = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for i, cfg in enumerate(configs):
            run = run_one(cfg, seed, corpus, shape)
            runs.append(run)
            print(f"[seed {seed}, {i + 1}/{len(configs)}] {run['name']}: final val {run['final_val']:.4f}, "
                  f"{1e3 * sum(run['step_times']) / len(run['step_times']):.1f} ms/step", file=sys.stderr, flush=True)
    env["load_avg_end"] = load_average()
    n_params = sum(p.numel() for p in GPT(shape["d"], shape["layers"], shape["heads"], shape["context"]).parameters())
    result = dict(environment=env, corpus=corpus[2], shape=shape, n_params=n_params, n_seeds=args.seeds,
                  esgd_lr=args.esgd_lr, elapsed_s=time.perf_counter() - started, aggregate=aggregate(runs),
                  runs=runs)
    markdown = to_markdown(result)
    json_path, md_path = write_outputs(args.out, f"lm_curvature_{args.preset}", result, markdown)
    print(markdown)
    print(f"wrote {md_path}, {json_path}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
