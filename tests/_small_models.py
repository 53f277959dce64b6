"""Small models the tests share: the classifier and data of the closure-protocol tests
(test_fd_protocol.py, test_curvature_closure.py) and the tanh regression of the state and checkpoint
tests (test_optimizer_state.py, test_state_bf16_optimizer.py)."""

import torch
import torch.nn as nn


def mlp(dtype=torch.float64, seed=0, dropout=0.0, batchnorm=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 10)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(10))
    layers += [nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers += [nn.Linear(10, 3)]
    return nn.Sequential(*layers).to(dtype)


def data(dtype=torch.float64, n=24, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen).to(dtype), torch.randint(0, 3, (n,), generator=gen)


class TanhRegression:
    """tanh(x W + b) regressed on y plus a quartic term in W: a Hessian that is not diagonal, so the
    result depends on every probe drawn. `mean` averages the squared errors (else sums them) and
    evaluates in the parameters' dtype (else in float64)."""

    def __init__(self, seed=30, dtype=torch.float64, device="cpu", shape=(4, 3), rows=6, mean=False, quartic=0.1):
        gen = torch.Generator().manual_seed(seed)

        def draw(*size):
            return torch.randn(*size, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

        self.w = draw(*shape).requires_grad_()
        self.b = draw(shape[1]).requires_grad_()
        self.x = draw(rows, shape[0])
        self.y = draw(rows, shape[1])
        self.mean, self.quartic = mean, quartic

    @property
    def params(self):
        return [self.w, self.b]

    def loss(self):
        out = torch.tanh(self.x @ self.w + self.b)
        if self.mean:
            return ((out - self.y) ** 2).mean() + self.quartic * (self.w**4).mean()
        return ((out - self.y) ** 2).sum().double() + self.quartic * (self.w**4).sum().double()

    def copy(self):
        other = type(self).__new__(type(self))
        other.__dict__.update(self.__dict__)
        other.w = self.w.detach().clone().requires_grad_()
        other.b = self.b.detach().clone().requires_grad_()
        return other
