"""How much noise 16-bit optimizer state adds to ESGD-M's curvature average D, against the noise the
estimator itself puts there.

Along one training trajectory (ESGD-M, float32 state, every step an estimation step so that D averages
thousands of estimates), copies of the optimizer's m and D are kept side by side, all fed the same
gradients g and Hessian-vector products Hz:

- float64: the reference;
- bfloat16, stochastic rounding: the fused kernels' own update (`esgd_update(..., state_dtype bf16)`);
- bfloat16, round-to-nearest: the same recurrence, each value rounded to nearest;
- float64 from a second, independent probe z': the estimator's own noise, i.e. how far D would be
  from the reference with other random probes (the difference of two independent estimates, / sqrt 2).

Reported at checkpoints (the number of estimates averaged): the per-element relative error of sqrt(D)
(the preconditioner the momentum is divided by) against the reference, as an RMS over elements, and
its mean (a bias), for each copy; and the error of m relative to its RMS.

    python benchmarks/state_precision.py                       # char-transformer and digits-mlp, 3000 estimates
    python benchmarks/state_precision.py --problems digits-mlp --steps 1000
    python benchmarks/state_precision.py --smoke
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

import convergence
from _common import (DEFAULT_OUT, OUT_HELP, command_line, environment, environment_markdown, import_esgd,
                     load_average, markdown_table, write_outputs)

BETA1, BETA2, EPS = 0.9, 0.999, 1e-4
# The best ESGD-M learning rate of the convergence benchmark's sweep on each problem.
LR = {"char-transformer": 1.0, "digits-mlp": 0.1, "digits-autoencoder": 0.1}
CHECKPOINTS = (10, 30, 100, 300, 1000, 3000, 10000)


def _rademacher(like, gen):
    return [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p.dtype) for p in like]


def _sqrt_errors(copy, reference):
    """(RMS, mean) over elements of sqrt(copy)/sqrt(reference) - 1, where the reference is positive."""
    a = torch.cat([c.double().flatten() for c in copy])
    r = torch.cat([x.double().flatten() for x in reference])
    keep = r > 0
    rel = a[keep].sqrt() / r[keep].sqrt() - 1.0
    return float(rel.square().mean().sqrt()), float(rel.mean())


def _relative_norm(copy, reference):
    a = torch.cat([c.double().flatten() for c in copy])
    r = torch.cat([x.double().flatten() for x in reference])
    return float((a - r).norm() / r.norm())


def measure(problem_name: str, steps: int, seed: int, checkpoints: tuple[int, ...]) -> dict:
    esgd_cuda = import_esgd()
    from esgd_cuda import functional, probes

    problem = convergence.PROBLEMS[problem_name]
    inst = problem.instance(seed, torch.device("cpu"), "full")
    params = [p for p in inst.module.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(seed)
    lr = LR.get(problem_name, 0.1)
    def state(dtype):
        # Fresh tensors each call: m and D must not alias (zeros.to(float32) of float32 would).
        return [torch.zeros_like(p, dtype=dtype) for p in params]

    m32, d32 = state(torch.float32), state(torch.float32)
    m64, d64, d_alt = state(torch.float64), state(torch.float64), state(torch.float64)
    m_sr, d_sr = state(torch.bfloat16), state(torch.bfloat16)
    m_rn, d_rn = state(torch.bfloat16), state(torch.bfloat16)
    keys = [probes.rounding_key(seed, i) for i in range(len(params))]
    offsets = [0] * len(params)
    fused = esgd_cuda._extension.fused_supported(torch.device("cpu"), torch.float32)
    rows, losses = [], []
    started = time.perf_counter()
    for step in range(steps):
        loss = inst.batch_loss(step)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        hz = [h.detach() for h in torch.autograd.grad(grads, params, _rademacher(params, gen), retain_graph=True)]
        hz_alt = [h.detach() for h in torch.autograd.grad(grads, params, _rademacher(params, gen))]
        g = [x.detach() for x in grads]
        del grads
        losses.append(float(loss.detach()))
        t = step + 1
        kw = dict(beta1=BETA1, beta2=BETA2, v=BETA1, eps=EPS, weight_decay=0.0, step_size=lr * (1.0 - 0.99**t),
                  momentum_scale=1.0 / (1.0 - BETA1**t * BETA1), denom_scale=1.0 / math.sqrt(1.0 - BETA2**t),
                  fused=fused)
        with torch.no_grad():
            # The kernels' bfloat16 update, on copies of the parameters (its parameters are discarded).
            functional.esgd_update([p.detach().clone() for p in params], g, m_sr, d_sr, hz, rounding_keys=keys,
                                   rounding_offsets=offsets, rounding_step=t, **kw)
            # The trajectory: float32 state.
            functional.esgd_update([p.data for p in params], g, m32, d32, hz, **kw)
            for i in range(len(params)):
                g64, h64, a64 = g[i].double(), hz[i].double(), hz_alt[i].double()
                m64[i].mul_(BETA1).add_(g64, alpha=1 - BETA1)
                d64[i].mul_(BETA2).addcmul_(h64, h64, value=1 - BETA2)
                d_alt[i].mul_(BETA2).addcmul_(a64, a64, value=1 - BETA2)
                m_rn[i] = (BETA1 * m_rn[i].float() + (1 - BETA1) * g[i].float()).bfloat16()
                d_rn[i] = (BETA2 * d_rn[i].float() + (1 - BETA2) * hz[i].float().square()).bfloat16()
        if t in checkpoints or t == steps:
            est_rms, est_mean = _sqrt_errors(d_alt, d64)
            sr_rms, sr_mean = _sqrt_errors(d_sr, d64)
            rn_rms, rn_mean = _sqrt_errors(d_rn, d64)
            fp32_rms, _ = _sqrt_errors(d32, d64)
            rows.append(dict(estimates=t, estimator_rms=est_rms / math.sqrt(2), estimator_mean=est_mean,
                             sr_rms=sr_rms, sr_mean=sr_mean, rn_rms=rn_rms, rn_mean=rn_mean, fp32_rms=fp32_rms,
                             m_sr=_relative_norm(m_sr, m64), m_rn=_relative_norm(m_rn, m64),
                             loss=sum(losses[-50:]) / len(losses[-50:])))
            print(f"[{problem_name}] {t} estimates: sqrt(D) estimator {est_rms / math.sqrt(2):.2%}, "
                  f"stochastic {sr_rms:.2%} (bias {sr_mean:+.3%}), nearest {rn_rms:.2%} (bias {rn_mean:+.2%})",
                  file=sys.stderr, flush=True)
    return dict(problem=problem_name, description=problem.description, lr=lr, seed=seed, steps=steps,
                params=sum(p.numel() for p in params), first_loss=losses[0], rows=rows,
                seconds=time.perf_counter() - started)


def to_markdown(result: dict) -> str:
    parts = ["## Noise of 16-bit state in D against the estimator's own", "",
             environment_markdown(result["environment"]), ""]
    headers = ["estimates", "estimator (other probes)", "bf16 stochastic", "bias", "bf16 nearest", "bias",
               "float32", "m: stochastic", "m: nearest", "train loss"]
    for run in result["runs"]:
        parts.append(f"### {run['problem']}: {run['description']}, {run['params']} parameters, lr {run['lr']:g}, "
                     f"every step an estimate, seed {run['seed']} ({run['seconds']:.0f} s)")
        parts.append("")
        parts.append(markdown_table(headers, [[
            r["estimates"], f"{r['estimator_rms']:.2%}", f"{r['sr_rms']:.2%}", f"{r['sr_mean']:+.3%}",
            f"{r['rn_rms']:.2%}", f"{r['rn_mean']:+.2%}", f"{r['fp32_rms']:.1e}", f"{r['m_sr']:.2%}",
            f"{r['m_rn']:.2%}", f"{r['loss']:.4g}"] for r in run["rows"]]))
        parts.append("")
    parts.append("Per-element relative error of sqrt(D) against the float64 average of the same estimates, RMS "
                 "over elements (and its mean: the bias); \"estimator\": the same for an average of estimates "
                 "with independent probes, divided by sqrt(2) (the noise of one estimate of sqrt(D)); m: "
                 "||m - m_float64|| / ||m_float64||.")
    return "\n".join(parts) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problems", nargs="+", default=["char-transformer", "digits-mlp"],
                   choices=[n for n in convergence.PROBLEMS if n in LR])
    p.add_argument("--steps", type=int, default=3000, help="training steps, each an estimation step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--smoke", action="store_true", help="digits-mlp, 30 steps, for CI")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=OUT_HELP)
    args = p.parse_args(argv)
    if args.smoke:
        args.problems, args.steps = ["digits-mlp"], 30
    args.command = command_line("state_precision.py", argv)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(torch.device("cpu"), command=args.command)
    runs = [measure(name, args.steps, args.seed, CHECKPOINTS) for name in args.problems]
    env["load_avg_end"] = load_average()
    result = dict(environment=env, runs=runs)
    markdown = to_markdown(result)
    json_path, md_path = write_outputs(args.out, "state_precision" + ("_smoke" if args.smoke else ""), result, markdown)
    print(markdown)
    print(f"wrote {md_path} and {json_path}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
