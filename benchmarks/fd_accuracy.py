"""How close finite-difference Hessian-vector products come to the exact one, and what it means for training.

1. `accuracy`: ||Hz_fd - Hz|| / ||Hz|| against the float64 double-backward product with the same probe,
   at initialization, for several models, precisions (float64, float32, float32 parameters under
   bfloat16 autocast) and steps h = fd_step * RMS(theta), for the forward and the central difference.
   The ESGD default step (sqrt(eps) forward, eps^(1/3) central, eps of the parameter dtype) is marked.
2. `relu`: a ReLU conv net with BatchNorm and max pooling on scikit-learn's digits, trained with the exact estimator and
   with both differences over several seeds: steps to a target test accuracy, final accuracy, and the
   estimators' disagreement along the way. Autograd's product drops the ReLU kinks' terms; a gradient
   difference sees every unit that changes sign within h, so on piecewise-linear models the two differ.
3. `sub_batch_bias`: what a curvature estimate from part of the batch (`opt.step(closure,
   curvature_closure=...)` on a slice) does to D. D averages (H_b z)^2, whose expectation is
   diag(H_b^2) = diag(H^2) + the sampling variance of H_b, which grows as the slice shrinks. Measured
   exactly (float64 double backward, the same probes for every slice): E[(H_b z)^2] over every slice of
   a partition of the batch and several probes, against the whole batch's E[(H z)^2], summed over the
   parameters (the ratio of the traces) and per element (the median ratio).

    python benchmarks/fd_accuracy.py            # both (a few minutes on 2 CPU cores)
    python benchmarks/fd_accuracy.py --smoke    # seconds; what CI runs
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from _common import (DEFAULT_OUT, command_line, environment, environment_markdown, fmt, import_esgd, load_average,
                     markdown_table, write_outputs)

PRESETS = {
    "smoke": dict(models=["mlp", "convnet-relu-maxpool"], steps=[1e-3, 1e-2], precisions=["fp32"], seeds=1,
                  relu_steps=30, target=0.5, bias_models=["mlp"], bias_fractions=[1, 0.5], bias_probes=2),
    "default": dict(models=["mlp", "transformer", "convnet-gelu-avgpool", "convnet-relu-maxpool"],
                    steps=[1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1],
                    precisions=["fp64", "fp32", "bf16-autocast"], seeds=3, relu_steps=400, target=0.95,
                    bias_models=["mlp", "transformer", "convnet-gelu-avgpool"],
                    bias_fractions=[1, 0.5, 0.25, 0.125], bias_probes=8),
}


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d))


class Transformer(nn.Module):
    def __init__(self, vocab=32, d=64, heads=4, ctx=32, layers=2):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.randn(ctx, d) * 0.1)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(ln1=nn.LayerNorm(d), attn=Attention(d, heads),
                                                       ln2=nn.LayerNorm(d), mlp=nn.Sequential(
                                                           nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))))
                                    for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.emb(idx) + self.pos[: idx.shape[1]]
        for b in self.blocks:
            x = x + b["attn"](b["ln1"](x))
            x = x + b["mlp"](b["ln2"](x))
        return self.head(self.ln(x))


def convnet(act, pool):
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), act(), nn.Conv2d(16, 32, 3, padding=1),
                         nn.BatchNorm2d(32), act(), pool(2), nn.Flatten(), nn.Linear(32 * 16, 10))


# A smooth conv net (GELU, average pooling) and a piecewise-linear one (ReLU, max pooling: the max
# switches where two inputs tie, which the zero borders of the digits make common).
CONVNETS = {"convnet-gelu-avgpool": (nn.GELU, nn.AvgPool2d), "convnet-relu-maxpool": (nn.ReLU, nn.MaxPool2d)}


def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=gen)
    n = int(0.8 * len(y))
    return (x[perm[:n]], y[perm[:n]]), (x[perm[n:]], y[perm[n:]])


def problem(name, seed=0):
    """(model, batch inputs, targets) at initialization; the batch is the one the products are taken on."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10))
        (x, y), _ = digits()
        x = x.reshape(len(x), -1)[:128]
        return model, x, y[:128]
    if name == "transformer":
        model = Transformer()
        idx = torch.randint(0, 32, (8, 33), generator=gen)
        return model, idx[:, :-1], idx[:, 1:].reshape(-1)
    model = convnet(*CONVNETS[name])
    (x, y), _ = digits()
    return model, x[:64], y[:64]


def loss_of(model, x, y):
    out = model(x)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y)


def exact_hz(model, x, y, zs):
    model64 = copy.deepcopy(model).double()
    params = list(model64.parameters())
    x64 = x.double() if x.is_floating_point() else x
    with sdpa_kernel(SDPBackend.MATH):
        g = torch.autograd.grad(loss_of(model64, x64, y), params, create_graph=True)
        return torch.autograd.grad(g, params, grad_outputs=[z.double() for z in zs])


def fd_hz(esgd, model, x, y, hvp, fd_step, autocast):
    """The optimizer's own finite-difference products for its first step, and its probes."""
    opt = esgd.ESGD(model.parameters(), hvp=hvp, fd_step=fd_step, seed=3)
    params = opt._trainable_params()
    zs = opt._curvature.probes(params, params, 0, opt._use_fused)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()

    def closure():
        opt.zero_grad()
        with ctx:
            loss = loss_of(model, x, y)
        loss.backward()
        return loss

    fd = opt._finite_difference(closure, 0)
    fd.restore()  # the parameters stay perturbed until the update (or this) restores them
    grads = [p.grad for p in params]
    plus, minus = fd.lists(params, grads)
    base = grads if minus is None else minus
    hz = [(a.double() - b.double()) * fd.hz_scale[p.device].double() for p, a, b in zip(params, plus, base)]
    return hz, zs


def rel_err(a, b):
    a = torch.cat([t.reshape(-1) for t in a])
    b = torch.cat([t.reshape(-1) for t in b])
    return float((a - b).norm() / b.norm())


def default_step(esgd, hvp, precision):
    dtype = torch.float64 if precision == "fp64" else torch.float32
    return esgd.curvature.default_fd_step(hvp, [dtype])


def measure_accuracy(preset, esgd):
    cfg = PRESETS[preset]
    rows = []
    for name in cfg["models"]:
        for precision in cfg["precisions"]:
            model, x, y = problem(name)
            if precision == "fp64":
                model = model.double()
                x = x.double() if x.is_floating_point() else x
            for hvp in ("finite_difference", "central_difference"):
                default = default_step(esgd, hvp, precision)
                errs = {}
                for step in sorted(set(cfg["steps"]) | {default}):
                    m = copy.deepcopy(model)
                    hz, zs = fd_hz(esgd, m, x, y, hvp, step, precision == "bf16-autocast")
                    errs[step] = rel_err(hz, exact_hz(m, x, y, zs))
                best = min(errs, key=errs.get)
                rows.append(dict(model=name, precision=precision, hvp=hvp, errors=errs, default_step=default,
                                 default_error=errs[default], best_step=best, best_error=errs[best]))
    return rows


def train_relu(esgd, hvp, seed, steps, target):
    (xtr, ytr), (xte, yte) = digits()
    torch.manual_seed(seed)
    model = convnet(*CONVNETS["convnet-relu-maxpool"])
    opt = esgd.ESGD(model.parameters(), lr=0.3, hvp=hvp, seed=seed, buffers=model)
    gen = torch.Generator().manual_seed(100 + seed)
    reached, accs, disagreement = None, [], []
    for step in range(steps):
        idx = torch.randint(0, len(ytr), (64,), generator=gen)
        xb, yb = xtr[idx], ytr[idx]
        if hvp == "autograd":
            opt.zero_grad()
            opt.backward(loss_of(model, xb, yb))
            opt.step()
        else:
            def closure():
                opt.zero_grad()
                loss = loss_of(model, xb, yb)
                loss.backward()
                return loss

            opt.step(closure)
        if (step + 1) % 10 == 0:
            model.eval()
            with torch.no_grad():
                acc = float((model(xte).argmax(1) == yte).float().mean())
            model.train()
            accs.append(acc)
            if reached is None and acc >= target:
                reached = step + 1
    if hvp != "autograd":
        # Where the trained model stands: this estimator's products against autograd's.
        m = copy.deepcopy(model)
        hz, zs = fd_hz(esgd, m, xtr[:64], ytr[:64], hvp, None, False)
        disagreement.append(rel_err(hz, exact_hz(m, xtr[:64], ytr[:64], zs)))
    return dict(hvp=hvp, seed=seed, steps_to_target=reached, final_acc=accs[-1] if accs else None,
                disagreement_at_end=disagreement[0] if disagreement else None)


def measure_relu(preset, esgd):
    cfg = PRESETS[preset]
    runs = []
    for hvp in ("autograd", "finite_difference", "central_difference"):
        for seed in range(cfg["seeds"]):
            runs.append(train_relu(esgd, hvp, seed, cfg["relu_steps"], cfg["target"]))
    return dict(target=cfg["target"], steps=cfg["relu_steps"], runs=runs)


def rows_of(name, x, y, rows):
    """The slice of a problem's batch made of the samples `rows` (sequences, for the transformer)."""
    if name == "transformer":
        return x[rows], y.view(len(x), -1)[rows].reshape(-1)
    return x[rows], y[rows]


def measure_sub_batch_bias(preset, esgd):
    """E[(H_b z)^2] over the slices b of a partition of the batch, against E[(H z)^2] of the batch."""
    cfg = PRESETS[preset]
    out = []
    for name in cfg["bias_models"]:
        model, x, y = problem(name)
        model = model.double()
        x = x.double() if x.is_floating_point() else x
        params = list(model.parameters())
        gen = torch.Generator().manual_seed(5)
        squares = {f: [torch.zeros_like(p) for p in params] for f in cfg["bias_fractions"]}
        for _ in range(cfg["bias_probes"]):
            zs = [torch.randint(0, 2, p.shape, generator=gen, dtype=torch.float64) * 2 - 1 for p in params]
            for f in cfg["bias_fractions"]:
                parts = round(1 / f)
                for rows in torch.arange(len(x)).chunk(parts):
                    hz = exact_hz(model, *rows_of(name, x, y, rows), zs)
                    for acc, h in zip(squares[f], hz):
                        acc.add_(h * h, alpha=1.0 / (parts * cfg["bias_probes"]))
        whole = torch.cat([t.reshape(-1) for t in squares[1]])
        for f in cfg["bias_fractions"]:
            part = torch.cat([t.reshape(-1) for t in squares[f]])
            mask = whole > 0
            out.append(dict(model=name, fraction=f, batch=len(x), slice=len(x) // round(1 / f),
                            trace_ratio=float(part.sum() / whole.sum()),
                            median_ratio=float((part[mask] / whole[mask]).median())))
    return out


def to_markdown(result):
    env = result["environment"]
    lines = ["# Finite-difference accuracy", "", environment_markdown(env), ""]
    steps = sorted({s for r in result["accuracy"] for s in r["errors"]})
    rows = []
    for r in result["accuracy"]:
        cells = []
        for s in steps:
            e = r["errors"].get(s)
            cell = "" if e is None else f"{e:.1e}"
            if e is not None and s == r["default_step"]:
                cell = f"**{cell}** (default)"
            cells.append(cell)
        rows.append([r["model"], r["precision"], r["hvp"].replace("_difference", "")] + cells)
    lines += ["## ||Hz_fd - Hz|| / ||Hz|| by relative step fd_step (h = fd_step * RMS(theta))", "",
              markdown_table(["model", "precision", "difference"] + [f"{s:.2g}" for s in steps], rows), ""]
    relu = result["relu"]
    rows = []
    for hvp in ("autograd", "finite_difference", "central_difference"):
        runs = [r for r in relu["runs"] if r["hvp"] == hvp]
        reached = [r["steps_to_target"] for r in runs if r["steps_to_target"] is not None]
        mean_steps = sum(reached) / len(reached) if reached else None
        dis = [r["disagreement_at_end"] for r in runs if r["disagreement_at_end"] is not None]
        rows.append([hvp, f"{len(reached)}/{len(runs)}", fmt(mean_steps),
                     fmt(sum(r["final_acc"] for r in runs) / len(runs)),
                     fmt(sum(dis) / len(dis)) if dis else "—"])
    lines += [f"## ReLU + max-pool conv net on digits: steps to {relu['target']:.0%} test accuracy "
              f"({relu['steps']} steps, lr 0.3)",
              "", markdown_table(["estimator", "seeds reaching target", "mean steps to target", "mean final accuracy",
                                  "disagreement with autograd at the end"], rows), ""]
    bias = result.get("sub_batch_bias") or []
    if bias:
        rows = [[r["model"], f"{r['slice']} of {r['batch']}", f"{r['trace_ratio']:.3f}", f"{r['median_ratio']:.3f}"]
                for r in bias]
        lines += ["## Sub-batch curvature: E[(H_b z)^2] on a slice b against E[(H z)^2] on the whole batch "
                  "(float64, exact products, every slice of a partition, the same probes)", "",
                  markdown_table(["model", "slice (samples)", "ratio of sums over the parameters",
                                  "median ratio per element"], rows), ""]
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=list(PRESETS), default="default")
    ap.add_argument("--smoke", action="store_const", const="smoke", dest="preset")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    esgd = import_esgd()
    import esgd_cuda.curvature  # noqa: F401  (default_fd_step)

    env = environment(torch.device("cpu"), command=command_line("fd_accuracy.py", argv))
    result = dict(environment=env, preset=args.preset)
    result["accuracy"] = measure_accuracy(args.preset, esgd)
    result["relu"] = measure_relu(args.preset, esgd)
    result["sub_batch_bias"] = measure_sub_batch_bias(args.preset, esgd)
    env["load_avg_end"] = load_average()
    markdown = to_markdown(result)
    json_path, md_path = write_outputs(args.out, f"fd_accuracy_{args.preset}", result, markdown)
    print(markdown)
    result["outputs"] = dict(json=json_path, markdown=md_path)
    return result


if __name__ == "__main__":
    main()
