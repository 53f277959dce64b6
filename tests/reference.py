"""An independent float64 reference for ESGD-M, written from the algorithm's formulas.

Deliberately shares nothing with `esgd_cuda`: every element is updated one at a time with Python
floats (IEEE double), so a bug in the vectorised or native paths cannot hide in shared code.

The reference works on separable objectives
    f(p) = sum_i a_i * p_i**4 / 4 + b_i * p_i**2 / 2 + c_i * p_i
whose Hessian is diagonal, H_ii = 3 a_i p_i**2 + b_i.  For any Rademacher probe z, (Hz)_i**2 = H_ii**2,
so the reference reproduces the optimizer's curvature estimate exactly without knowing its probes.
"""

import math
from dataclasses import dataclass, field


def estimation_schedule(num_steps, d_warmup, update_d_every):
    """Which 0-based global steps estimate the curvature.

    A step estimates while inside the warm-up, or once `update_d_every` steps have passed since the
    previous estimate; before any estimate has happened, the previous one counts as infinitely old.
    """
    flags = []
    last = None
    for s in range(num_steps):
        estimate = s < d_warmup or last is None or s - last >= update_d_every
        if estimate:
            last = s
        flags.append(estimate)
    return flags


@dataclass
class Hyper:
    lr: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.999
    v: float = None
    lr_warmup: float = 0.99
    eps: float = 1e-4
    weight_decay: float = 0.0

    def momentum_mix(self):
        return self.beta1 if self.v is None else self.v


@dataclass
class Separable:
    """Coefficients of one parameter's separable objective, flattened."""

    a: list
    b: list
    c: list

    def grad(self, i, p):
        return self.a[i] * p**3 + self.b[i] * p + self.c[i]

    def hess(self, i, p):
        return 3.0 * self.a[i] * p**2 + self.b[i]


@dataclass
class _ParamState:
    m: list
    d: list
    mb: float = 1.0
    db: float = 1.0
    warm: float = 1.0


@dataclass
class ReferenceParam:
    """One parameter tracked by the reference: its values, objective and hyperparameters."""

    values: list
    objective: Separable
    hyper: Hyper = field(default_factory=Hyper)
    state: _ParamState = None

    def step(self, estimate, lr=None):
        """Apply one optimizer step in which this parameter has a gradient."""
        h = self.hyper
        if self.state is None:
            if not estimate:
                return
            n = len(self.values)
            self.state = _ParamState(m=[0.0] * n, d=[0.0] * n)
        st = self.state
        lr = h.lr if lr is None else lr
        v = h.momentum_mix()
        st.mb *= h.beta1
        if estimate:
            st.db *= h.beta2
        st.warm *= h.lr_warmup
        step_size = lr * (1.0 - st.warm)
        new_values = []
        for i, p in enumerate(self.values):
            g = self.objective.grad(i, p)
            st.m[i] = h.beta1 * st.m[i] + (1.0 - h.beta1) * g
            if estimate:
                hz = self.objective.hess(i, p)
                st.d[i] = h.beta2 * st.d[i] + (1.0 - h.beta2) * hz * hz
            denom = math.sqrt(st.d[i]) / math.sqrt(1.0 - st.db) + h.eps
            est = v * st.m[i] + (1.0 - v) * g
            p = p * (1.0 - h.weight_decay * step_size)
            p = p - step_size / (1.0 - st.mb * v) * est / denom
            new_values.append(p)
        self.values = new_values


def run_reference(params, num_steps, d_warmup, update_d_every, lr_at=None, has_grad=None):
    """Run the reference for `num_steps` steps and return the trajectory.

    `params` is a list of ReferenceParam; `lr_at(s, j)` optionally overrides the learning rate of
    parameter j on step s (an LR scheduler); `has_grad(s, j)` says whether parameter j has a gradient
    on step s (default: always).  Returns a list, one entry per step, of lists of value lists.
    """
    schedule = estimation_schedule(num_steps, d_warmup, update_d_every)
    trajectory = []
    for s in range(num_steps):
        for j, rp in enumerate(params):
            if has_grad is not None and not has_grad(s, j):
                continue
            rp.step(schedule[s], None if lr_at is None else lr_at(s, j))
        trajectory.append([list(rp.values) for rp in params])
    return trajectory
