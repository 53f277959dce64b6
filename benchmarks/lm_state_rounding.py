"""Which part of 16-bit state costs the byte-level GPT's loss, and how much two runs differ when only
their rounding bits do.

ESGD-M with float32 state on the protocol of `lm_curvature.py` (central difference, curvature from a
quarter of each batch, `update_d_every=10`, lr 0.3, 600 steps), where after every step m and/or D
are replaced by bfloat16 values: stochastically rounded (`sr`: the kernels' rule, a uniform 16-bit
integer added to the discarded bits, here drawn from a torch.Generator) or rounded to nearest (`rtn`);
or (`ulp`) moved by one float32 spacing up or down at random, a perturbation like `sr` but 2^16 times
smaller, whose effect on the loss is float32 state's own trajectory noise.
A variant `m=none,D=sr` is float32 momentum with 16-bit D; `m=sr,D=sr` emulates `state_dtype=
torch.bfloat16` with other random bits; `bf16` is the real `state_dtype=torch.bfloat16`. Every run of
a seed sees the same batches and probes as the float32 run of that seed, which is the baseline.

`--round-seeds 0 1` runs each emulated variant with two independent streams of rounding bits: the
difference between them is the trajectory noise that any perturbation of this size causes, the
scale against which a variant's paired difference from float32 state is read.

    python benchmarks/lm_state_rounding.py --variants m=none,D=sr m=rtn,D=sr --seeds 8
    python benchmarks/lm_state_rounding.py --variants m=sr,D=sr --round-seeds 0 1 --seeds 4
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

import lm_curvature as lm
from _common import (DEFAULT_OUT, OUT_HELP, command_line, environment, environment_markdown, fmt,
                     load_average, markdown_table, write_outputs)

RULES = ("none", "sr", "rtn", "ulp")
STATE_KEYS = (("m", "exp_avg"), ("D", "exp_hz_sq"))
# The generator of round seed r for training seed s starts at ROUND_SEED_BASE + s + 1000 r.
ROUND_SEED_BASE = 12345


def round_sr(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """x (float32) rounded to a bfloat16 value, up in magnitude with probability (discarded bits) / 2^16."""
    r = torch.randint(0, 1 << 16, x.shape, generator=gen, dtype=torch.int32)
    return ((x.view(torch.int32) + r) & ~0xFFFF).view(torch.float32)


def round_rtn(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return x.to(torch.bfloat16).float()


def nudge_ulp(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """x moved one float32 spacing up or down in magnitude at random (zeros stay): the same kind of
    perturbation as stochastic rounding, 2^16 times smaller, so float32 state's own trajectory noise."""
    step = torch.randint(0, 2, x.shape, generator=gen, dtype=torch.int32) * 2 - 1
    return torch.where(x == 0, x, (x.view(torch.int32) + step).view(torch.float32))


ROUND = {"sr": round_sr, "rtn": round_rtn, "ulp": nudge_ulp}


def parse_variant(text: str) -> dict:
    """'bf16', 'float32' (nothing rounded) or 'm=RULE,D=RULE' (a key left out is not rounded) ->
    {'m': rule, 'D': rule} or {'bf16': True}."""
    if text == "bf16":
        return {"bf16": True}
    rule = {"m": "none", "D": "none"}
    if text == "float32":
        return rule
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key not in rule or value not in RULES:
            raise ValueError(f"--variants: {text!r} is not 'bf16' or 'm=RULE,D=RULE' with RULE in {RULES}")
        rule[key] = value
    return rule


def draws_bits(variant: str) -> bool:
    rule = parse_variant(variant)
    return bool({"sr", "ulp"} & {rule.get("m"), rule.get("D")})


def run_variant(variant: str, seed: int, round_seed: int, corpus, shape: dict) -> float:
    """The final validation loss of one run."""
    rule = parse_variant(variant)
    cfg = dict(opt="esgd", hvp="central_difference", fraction=0.25, every=10, lr=0.3, name_lr=False,
               state_dtype="bfloat16" if rule.get("bf16") else "float32")
    gen = torch.Generator().manual_seed(ROUND_SEED_BASE + seed + 1000 * round_seed)
    rounds = [(key, ROUND[rule[name]]) for name, key in STATE_KEYS if rule.get(name, "none") != "none"]
    make_step = lm.make_step

    def rounding_step(cfg_, model, params, seed_):
        opt, step = make_step(cfg_, model, params, seed_)

        def step_then_round(x, y):
            loss = step(x, y)
            with torch.no_grad():
                for p in params:
                    state = opt.state[p]
                    for key, fn in rounds:
                        if key in state:
                            state[key].copy_(fn(state[key], gen))
            return loss
        return opt, step_then_round

    lm.make_step = rounding_step if rounds else make_step
    try:
        return lm.run_one(cfg, seed, corpus, shape)["final_val"]
    finally:
        lm.make_step = make_step


def summarize(finals: dict, seeds: list[int]) -> tuple[list[dict], list[dict]]:
    """Per (variant, round seed): mean loss, and its difference from float32 state paired by seed."""
    base = finals[("float32", 0)]
    rows = []
    for (variant, rs), losses in finals.items():
        diffs = [losses[s] - base[s] for s in seeds]
        n = len(diffs)
        mean = sum(diffs) / n
        se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else None
        rows.append(dict(variant=variant, round_seed=rs, mean=sum(losses[s] for s in seeds) / n, diff=mean, se=se,
                         higher=sum(d > 0 for d in diffs), n=n, per_seed=[losses[s] for s in seeds]))
    pairs = {}
    for (variant, rs), losses in finals.items():
        pairs.setdefault(variant, []).append(losses)
    noise = []
    for variant, runs in pairs.items():
        if variant != "float32" and len(runs) > 1:
            d = [runs[0][s] - runs[1][s] for s in seeds]
            noise.append(dict(variant=variant, rms=math.sqrt(sum(x * x for x in d) / len(d)), diffs=d))
    return rows, noise


def to_markdown(result: dict) -> str:
    rows, noise = result["rows"], result["noise"]
    headers = ["variant", "round seed", "final val loss, mean", "minus float32 state, paired mean (s.e.)",
               "seeds higher", "per seed"]
    table = [[r["variant"], r["round_seed"] if draws_bits(r["variant"]) else "—", fmt(r["mean"], 4),
              "—" if r["variant"] == "float32" else f"{r['diff']:+.4f} ({fmt(r['se'], 2)})",
              "—" if r["variant"] == "float32" else f"{r['higher']}/{r['n']}",
              " ".join(f"{x:.4f}" for x in r["per_seed"])] for r in rows]
    lines = ["# Rounding 16-bit state on the byte-level GPT", "", environment_markdown(result["environment"]),
             f"- Seeds {result['seeds'][0]}-{result['seeds'][-1]}; {result['shape']['steps']} steps; "
             f"wall time {result['elapsed_s'] / 60:.1f} min", "", markdown_table(headers, table)]
    for n in noise:
        lines += ["", f"Trajectory noise, {n['variant']} with round seeds 0 and 1: RMS difference "
                      f"{n['rms']:.4f} (per seed: {' '.join(f'{d:+.4f}' for d in n['diffs'])})"]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", dest="preset", action="store_const", const="smoke", default="default",
                   help="a tiny model and a few steps, for CI")
    p.add_argument("--variants", nargs="+", default=["m=none,D=sr", "m=rtn,D=sr"],
                   help="'bf16' (state_dtype=torch.bfloat16) or m=RULE,D=RULE with RULE none, sr, rtn or ulp")
    p.add_argument("--round-seeds", nargs="+", type=int, default=[0],
                   help="streams of rounding bits for each emulated variant")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=OUT_HELP)
    args = p.parse_args(argv)
    for v in args.variants:
        try:
            parse_variant(v)
        except ValueError as e:
            p.error(str(e))
    if args.seeds < 1:
        p.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.first_seed < 0:
        p.error(f"--first-seed must be >= 0, got {args.first_seed}")
    if any(rs < 0 for rs in args.round_seeds):
        p.error(f"--round-seeds must be >= 0, got {args.round_seeds}")
    args.command = command_line("lm_state_rounding.py", argv)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    shape = dict(lm.PRESETS[args.preset])
    corpus = lm.load_corpus(None)
    env = environment(torch.device("cpu"), command=args.command)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    # Only sr and ulp draw random bits: other variants run once per seed.
    runs = [("float32", 0)] + [(v, rs) for v in args.variants
                               for rs in (args.round_seeds if draws_bits(v) else [0])]
    started = time.perf_counter()
    finals: dict = {}
    for seed in seeds:
        for variant, rs in runs:
            loss = run_variant(variant, seed, rs, corpus, shape)
            finals.setdefault((variant, rs), {})[seed] = loss
            print(f"[seed {seed}] {variant} (round seed {rs}): final val {loss:.4f}", file=sys.stderr, flush=True)
    env["load_avg_end"] = load_average()
    rows, noise = summarize(finals, seeds)
    result = dict(environment=env, shape=shape, seeds=seeds, elapsed_s=time.perf_counter() - started,
                  rows=rows, noise=noise)
    markdown = to_markdown(result)
    json_path, md_path = write_outputs(args.out, f"lm_state_rounding_{args.preset}", result, markdown)
    print(markdown)
    print(f"wrote {md_path}, {json_path}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
