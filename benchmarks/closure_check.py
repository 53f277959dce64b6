"""What the finite-difference closure check sees: correct closures against closures that evaluate
another function on their next call (another batch, unreplayed dropout), on a small byte-level GPT.

At every estimation step two statistics are measured:
- the repeat ratio ESGD uses: ||g'(theta + h z) - g(theta + h z)|| / ||g(theta + h z) - g_base||, a
  second pass at theta + h z with the random numbers replayed against the difference it is part of
  (ESGD refuses or skips an estimate above `esgd_cuda._closures.REPEAT_TOLERANCE`, 0.2);
- the loss identity it does not use: r = |dL - pred| / (|dL| + |pred|), with dL = L(theta + h z) - L(theta)
  and pred = h/2 z.(g(theta) + g(theta + h z)) (forward; central: dL = L(theta + h z) - L(theta - h z) and
  Simpson's rule h/3 z.(g(theta - h z) + 4 g(theta) + g(theta + h z))), which needs no extra pass.

    python benchmarks/closure_check.py            # a few minutes on 2 CPU cores
    python benchmarks/closure_check.py --smoke    # seconds; what CI runs
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import (DEFAULT_OUT, OUT_HELP, command_line, environment, environment_markdown, import_esgd,
                     load_average, markdown_table, write_outputs)
from lm_curvature import GPT, load_corpus, windows

SETTINGS = {
    # name: (bfloat16 autocast, fd_step, dropout)
    "float32": (False, None, 0.0),
    "float32, dropout 0.1": (False, None, 0.1),
    "bf16 autocast, fd_step 0.1": (True, 0.1, 0.0),
    "bf16 autocast, default fd_step": (True, None, 0.0),
}
CLOSURES = ("correct", "another batch", "unreplayed dropout")
PRESETS = {"default": dict(steps=60, d=64, layers=2, batch=32), "smoke": dict(steps=8, d=16, layers=1, batch=8)}


def measure(esgd_cuda, corpus, setting: str, hvp: str, closure_kind: str, shape: dict) -> dict:
    autocast, fd_step, dropout = SETTINGS[setting]
    train = corpus[0]
    ctx = 64
    torch.manual_seed(0)
    model = GPT(shape["d"], shape["layers"], 4 if shape["d"] % 4 == 0 else 1, ctx)
    opt = esgd_cuda.ESGD(model.parameters(), lr=0.3, hvp=hvp, fd_step=fd_step, d_warmup=5, update_d_every=5,
                         seed=0)
    # Every estimate is checked in "report" mode (no error on the first): the statistic, not the action.
    opt._checked_closures.update({"closure"})
    ratios, identity = [], []
    batches = torch.Generator().manual_seed(1)
    own = torch.Generator().manual_seed(2)
    for _ in range(shape["steps"]):
        x, y = windows(train, torch.randint(0, len(train) - ctx - 1, (shape["batch"],), generator=batches), ctx)
        losses = []

        def closure(x=x, y=y):
            opt.zero_grad()
            if closure_kind == "another batch":
                x, y = windows(train, torch.randint(0, len(train) - ctx - 1, (len(x),), generator=own), ctx)
            with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
                out = model(x)
                if dropout or closure_kind == "unreplayed dropout":
                    gen = own if closure_kind == "unreplayed dropout" else None
                    out = out * (torch.rand(out.shape, generator=gen) > max(dropout, 0.1)) / (1 - max(dropout, 0.1))
                loss = F.cross_entropy(out.flatten(0, 1).float(), y.flatten())
            loss.backward()
            losses.append(float(loss.detach()))
            return loss

        estimating = opt.is_estimation_step()
        index = opt._step_index
        captured = {}
        real = opt._curvature.finite_difference

        def spy(*args, **kwargs):
            captured["fd"] = fd = real(*args, **kwargs)
            return fd

        opt._curvature.finite_difference = spy
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rejected estimates warn; here only the statistic counts
            opt.step(closure)
        del opt._curvature.finite_difference
        fd = captured.get("fd")
        if not estimating or fd is None:
            continue
        ratios.append(fd.repeat_ratio)
        identity.append(loss_identity(opt, fd, index, losses, hvp == "central_difference"))
    return dict(setting=setting, hvp=hvp, closure=closure_kind, repeat_ratio=ratios, loss_identity=identity)


def loss_identity(opt, fd, index: int, losses: list, central: bool) -> float:
    """r of the trapezoid (forward) or Simpson (central) rule along z, from the step's passes. The
    passes ran in the order theta, theta + h z, (repeat), (theta - h z)."""
    params = opt._trainable_params()
    zs = opt._curvature.probes(params, params, index, opt._use_fused)
    h = float(opt._curvature.last_h)

    def dot(grads):
        return sum(float((z.double() * g.double()).sum()) for z, g in zip(zs, grads) if g is not None)

    g0 = [p.grad for p in params]
    plus = [fd.plus.get(p) for p in params]
    if central:
        minus = [fd.minus.get(p) for p in params]
        d_loss = losses[1] - losses[-1]
        pred = h / 3 * (dot(minus) + 4 * dot(g0) + dot(plus))
    else:
        d_loss = losses[1] - losses[0]
        pred = h / 2 * (dot(g0) + dot(plus))
    return abs(d_loss - pred) / (abs(d_loss) + abs(pred))


def summary(values: list) -> str:
    values = sorted(v for v in values if v is not None)
    if not values:
        return "—"
    return f"{values[0]:.2g} / {values[len(values) // 2]:.2g} / {values[-1]:.2g}"


def to_markdown(result: dict) -> str:
    rows = [[r["setting"], r["hvp"].replace("_difference", ""), r["closure"], len(r["repeat_ratio"]),
             summary(r["repeat_ratio"]), summary(r["loss_identity"])] for r in result["runs"]]
    return "\n".join([
        "# The closure check: correct closures against closures that change between calls", "",
        environment_markdown(result["environment"]),
        f"- Byte-level GPT d={result['shape']['d']}, {result['shape']['layers']} layers, context 64, batch "
        f"{result['shape']['batch']}, {result['shape']['steps']} steps, an estimate every 5 steps; min / median / max "
        "over the estimates", "",
        markdown_table(["setting", "difference", "closure", "estimates",
                        f"repeat ratio (ESGD refuses > {result['tolerance']:g})", "loss identity r (not used)"],
                       rows),
    ])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", dest="preset", action="store_const", const="smoke", default="default")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=OUT_HELP)
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    esgd_cuda = import_esgd()

    shape = PRESETS[args.preset]
    corpus = load_corpus(None)
    env = environment(torch.device("cpu"), command=command_line("closure_check.py", argv))
    runs = []
    # ESGD checks the first estimate and then every REPEAT_CHECK_EVERY-th; here every one is measured.
    optimizer_module = sys.modules[type(esgd_cuda.ESGD([torch.zeros(1, requires_grad=True)])).__module__]
    every = optimizer_module.REPEAT_CHECK_EVERY
    optimizer_module.REPEAT_CHECK_EVERY = 1
    try:
        for setting in SETTINGS:
            for hvp in ("finite_difference", "central_difference"):
                for kind in CLOSURES:
                    if kind == "unreplayed dropout" and not SETTINGS[setting][2]:
                        continue
                    runs.append(measure(esgd_cuda, corpus, setting, hvp, kind, shape))
                    print(f"{setting}, {hvp}, {kind}: repeat {summary(runs[-1]['repeat_ratio'])}", file=sys.stderr)
    finally:
        optimizer_module.REPEAT_CHECK_EVERY = every
    env["load_avg_end"] = load_average()
    from esgd_cuda._closures import REPEAT_TOLERANCE

    result = dict(environment=env, shape=shape, runs=runs, tolerance=REPEAT_TOLERANCE)
    markdown = to_markdown(result)
    json_path, md_path = write_outputs(args.out, f"closure_check_{args.preset}", result, markdown)
    print(markdown)
    result["outputs"] = dict(json=json_path, markdown=md_path)
    return result


if __name__ == "__main__":
    main()
