import os
import re
import sys

import pytest
import torch

# The repository root is deliberately not put on sys.path: the suite tests the installed package
# (with its compiled extension), which scripts/test.sh checks.
TESTS = os.path.dirname(os.path.abspath(__file__))
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

from reference import Hyper, ReferenceParam, Separable  # noqa: E402



def pytest_report_header(config):
    import esgd_cuda

    info = esgd_cuda.extension_info()
    built = info["built"]
    return (
        f"esgd_cuda {esgd_cuda.__file__}: extension loaded={info['loaded']} cpu={built['cpu']} "
        f"cuda={built['cuda']} archs={built['cuda_archs']} (load error: {info['load_error']})"
    )


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]

# The CUDA tests carry the `cuda` marker, so that benchmarks/gpu_suite.sh can run exactly the tests
# CI cannot (`pytest -m cuda`) inside its one short call on a GPU machine. A skip(if) mark whose
# reason names CUDA or a GPU adds it; a test that skips from its body marks itself. In a run without
# a GPU, an unmarked test that skips for lack of one fails, so none can be left out unnoticed.
NEEDS_GPU = re.compile(r"\b(cuda|gpu)\b", re.IGNORECASE)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cuda: needs a CUDA device; benchmarks/gpu_suite.sh runs these (-m cuda)"
    )


def _mark_reason(mark):
    return str(mark.kwargs.get("reason", mark.args[0] if mark.name == "skip" and mark.args else ""))


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items):
    for item in items:
        marks = list(item.iter_markers("skipif")) + list(item.iter_markers("skip"))
        if any(NEEDS_GPU.search(_mark_reason(m)) for m in marks):
            item.add_marker(pytest.mark.cuda)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if not report.skipped or hasattr(report, "wasxfail") or item.get_closest_marker("cuda"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if NEEDS_GPU.search(reason):
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid} skipped for lack of a GPU ({reason}) but has no `cuda` marker, so "
            "benchmarks/gpu_suite.sh (pytest -m cuda) would never run it: add @pytest.mark.cuda"
        )


@pytest.fixture(params=[False, None], ids=["fused=False", "fused=None"])
def fused(request):
    """Every optimizer test runs on the pure-PyTorch path and on whatever `fused=None` picks."""
    return request.param


class SeparableProblem:
    """Parameters with separable quartic objectives, plus the matching float64 reference.

    Values and coefficients are drawn in float64 and rounded to the parameter dtype once, so the
    optimizer and the reference start from exactly the same numbers.
    """

    def __init__(self, shapes, dtype=torch.float64, seed=0, hypers=None, linear_only=(), device="cpu"):
        gen = torch.Generator().manual_seed(seed)
        self.linear_only = set(linear_only)
        self.params, self.coeffs, self.refs = [], [], []
        dtypes = dtype if isinstance(dtype, (list, tuple)) else [dtype] * len(shapes)
        for j, shape in enumerate(shapes):
            n = int(torch.Size(shape).numel())
            dt = dtypes[j]

            def draw(lo, hi):
                u = torch.rand(n, generator=gen, dtype=torch.float64)
                return (lo + (hi - lo) * u).to(dt).reshape(shape).to(device)

            p0 = draw(-1.5, 1.5)
            if j in linear_only:
                a = torch.zeros(shape, dtype=dt, device=device)
                b = torch.zeros(shape, dtype=dt, device=device)
            else:
                a = draw(0.2, 1.0)
                b = draw(0.1, 1.0)
            c = draw(-1.0, 1.0)
            self.params.append(p0.clone().requires_grad_())
            self.coeffs.append((a, b, c))
            hyper = hypers[j] if hypers is not None else Hyper()
            self.refs.append(
                ReferenceParam(
                    values=p0.double().flatten().tolist(),
                    objective=Separable(
                        a.double().flatten().tolist(),
                        b.double().flatten().tolist(),
                        c.double().flatten().tolist(),
                    ),
                    hyper=hyper,
                )
            )

    def astype(self, dtype):
        """A copy of this problem (same start, same reference) stored in another dtype."""
        other = SeparableProblem.__new__(SeparableProblem)
        other.params = [p.detach().to(dtype).clone().requires_grad_() for p in self.params]
        other.coeffs = [tuple(t.to(dtype) for t in abc) for abc in self.coeffs]
        other.refs = self.refs
        other.linear_only = self.linear_only
        return other

    def loss(self, active=None):
        total = None
        for j, (p, (a, b, c)) in enumerate(zip(self.params, self.coeffs)):
            if active is not None and j not in active:
                continue
            if j in self.linear_only:
                # Only the linear term: the gradient is a constant with no autograd graph at all.
                term = (c * p).sum().double()
            else:
                term = (a * p**4 / 4 + b * p**2 / 2 + c * p).sum().double()
            total = term if total is None else total + term
        return total


def run_steps(opt, problem, num_steps, has_grad=None, use_helper=True):
    """Drive `opt` on `problem`; returns the float64 parameter values after every step."""
    trajectory = []
    for s in range(num_steps):
        opt.zero_grad(set_to_none=True)
        active = None
        if has_grad is not None:
            active = {j for j in range(len(problem.params)) if has_grad(s, j)}
        loss = problem.loss(active)
        if loss is not None:
            if use_helper:
                opt.backward(loss)
            else:
                loss.backward(create_graph=opt.should_create_graph())
        opt.step()
        trajectory.append([p.detach().double().clone() for p in problem.params])
    return trajectory


def assert_trajectory_matches(actual, expected, shapes, rtol):
    """Each step's parameters match the reference to `rtol`, relative to the parameter's scale."""
    for j, shape in enumerate(shapes):
        ref = torch.tensor([step[j] for step in expected], dtype=torch.float64)
        got = torch.stack([step[j].flatten().cpu() for step in actual])
        ref = ref.reshape(got.shape)
        assert torch.isfinite(ref).all(), "reference diverged; pick a tamer problem"
        scale = ref.abs().max().clamp_min(1e-3)
        err = (got - ref).abs().max()
        worst = int((got - ref).abs().max(dim=1).values.argmax())
        assert err <= rtol * scale, (
            f"param {j} {tuple(shape)}: max error {err:.3e} exceeds {rtol:g} x scale {scale:.3e} "
            f"(worst at step {worst})"
        )
